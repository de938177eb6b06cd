"""Benchmark: a normal ``keyutil get-key`` during a slow-client flood, with and without the
KMS's slow-client limits, in one run.

    .venv/bin/python bench/bench_flood.py [--runs 7] [--workers 2] [--connections 1000]
        [--dribblers 50] [--json]

Set-up (not timed): an NSM simulator, a KMS state directory and, for each configuration, one
``mock-kms serve --workers W`` on a free loopback port (``benchlib.LocalKms``):

- ``limits``: the defaults (a TCP peer holds at most ``--max-connections-per-peer`` 32
  connections per worker, a request head must be whole 5 s after its first byte, a
  connection idle 5 s between requests is closed);
- ``no limits``: the same server with those limits lifted (200 connections per peer, which
  is every slot of a worker; a 600 s head limit and an hour's keep-alive), the way it
  behaved before them: only the 10 s request deadline and the 30 s idle timeout.

For each: ``--runs`` get-key runs unloaded, then the flood (``benchlib.Flood``: from
127.0.0.2, ``--connections`` sockets that trickle a request a byte every 0.5 s and reconnect
when cut, at most 400 new connections a second; from 127.0.0.3, ``--dribblers`` keep-alive
connections that send one whole request and then a byte at a time), ``--settle`` seconds for
it to build up, then ``--runs`` get-key runs under it (each with a 60 s ``--deadline``).
Reported: the median get-key time unloaded and under the flood, their ratio (target: under
the flood at most 3x unloaded, with limits), failures, and the flood's connection attempts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import KEYUTIL, Flood, LocalKms, environment

NO_LIMITS = [
    "--max-connections-per-peer", "200", "--header-timeout", "600",
    "--keepalive-timeout", "3600",
]
TARGET = 3.0


def get_key_times(kms: LocalKms, runs: int, out: Path) -> tuple[list[float], int]:
    times, failures = [], 0
    for i in range(runs):
        started = time.perf_counter()
        result = subprocess.run(
            [KEYUTIL, "get-key", "--kms", kms.url, "--kms-pubkey", kms.identity,
             "--nsm", "simulator", "--sim-dir", str(kms.sim_dir), "--deadline", "60",
             "--out", str(out / f"k{i}"), "--allow-persistent"],
            capture_output=True,
            timeout=90,
        )
        times.append(time.perf_counter() - started)
        failures += result.returncode != 0
        (out / f"k{i}").unlink(missing_ok=True)
    return times, failures


def measure(args: argparse.Namespace, work: Path, name: str, extra: list[str]) -> dict[str, Any]:
    kms = LocalKms(work / name.replace(" ", "-"), app="app",
                   serve_args=["--workers", str(args.workers), *extra])
    return {"config": name, **flood_run(kms, args.runs, args.connections, args.dribblers,
                                        args.settle)}


def flood_run(
    kms: LocalKms, runs: int, connections: int, dribblers: int, settle: float
) -> dict[str, Any]:
    """Start ``kms``; ``runs`` get-key times unloaded, then under the flood; stop it."""
    out = Path(tempfile.mkdtemp(prefix="bench-flood-keys-", dir="/dev/shm"))
    try:
        kms.start()
        unloaded, failed_unloaded = get_key_times(kms, runs, out)
        with Flood(kms.url, "127.0.0.2", connections, dribblers) as flood:
            time.sleep(settle)
            flooded, failed_flooded = get_key_times(kms, runs, out)
        attempts = flood.reconnects
    finally:
        kms.stop()
        shutil.rmtree(out, ignore_errors=True)
    u, f = statistics.median(unloaded), statistics.median(flooded)
    return {
        "unloaded_median_s": u,
        "flooded_median_s": f,
        "flooded_max_s": max(flooded),
        "ratio": f / u,
        "failures": failed_unloaded + failed_flooded,
        "flood_connection_attempts": attempts,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="get-key runs per phase (7)")
    parser.add_argument("--workers", type=int, default=2, help="mock-kms --workers (2)")
    parser.add_argument("--connections", type=int, default=1000, help="trickling sockets")
    parser.add_argument("--dribblers", type=int, default=50, help="keep-alive dribblers")
    parser.add_argument("--settle", type=float, default=6.0, help="flood build-up, s (6)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-flood-"))
    try:
        results = [
            measure(args, work, "limits", []),
            measure(args, work, "no limits", NO_LIMITS),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {"benchmark": "bench_flood", **environment(), "workers": args.workers,
              "connections": args.connections, "dribblers": args.dribblers,
              "target_ratio": TARGET, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"bench_flood  {report['date']}  nproc {report['nproc']}  load "
              f"{report['loadavg_1m']}  workers {args.workers}  flood {args.connections} "
              f"trickling + {args.dribblers} keep-alive dribblers")
        print(f"{'config':<10} {'unloaded':>9} {'flooded':>9} {'max':>8} {'ratio':>6} "
              f"{'fail':>5} {'attempts':>9}")
        for r in results:
            print(f"{r['config']:<10} {r['unloaded_median_s']:>9.3f} "
                  f"{r['flooded_median_s']:>9.3f} {r['flooded_max_s']:>8.3f} "
                  f"{r['ratio']:>6.2f} {r['failures']:>5} {r['flood_connection_attempts']:>9}")
        print(f"(get-key seconds, medians; target with limits: ratio <= {TARGET:g})")
    limits = results[0]
    return 0 if limits["ratio"] <= TARGET and limits["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
