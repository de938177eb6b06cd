"""Benchmark the enclave's inbound path, ``keyutil proxy`` twice against socat twice.

    .venv/bin/python bench/bench_inbound.py [--mb 100] [--repeats 5] [--rtts 2000] [--json]

The path a client of the enclave's app takes: host TCP -> host forwarder -> vsock -> the
enclave's forwarder (``keyutil run``'s ``[[forward]]``) -> the app on TCP 127.0.0.1. A unix
socket stands in for vsock (no vsock loopback here; the family is the only difference):

- ours:  ``keyutil proxy --listen tcp://127.0.0.1:A --to unix://W/k.sock`` and
         ``keyutil proxy --listen unix://W/k.sock --to tcp://127.0.0.1:P``;
- socat: ``socat TCP-LISTEN:B,fork UNIX-CONNECT:W/s.sock`` and
         ``socat UNIX-LISTEN:W/s.sock,fork TCP:127.0.0.1:P``;
- direct: the client straight to the app (the server, :mod:`streamlib`, on port P).

One connection through each chain, kept for the run; every repeat measures both chains (the
order alternates) and the direct connection: upload and download of ``--mb`` MiB and
``--rtts`` round trips of 64 bytes. Reported: median MB/s each way, RTT median and p99, the
latency each chain adds (its RTT minus the direct one), CPU seconds per GB (both processes of
a chain, from /proc) and the ratios ours/socat. Target: ours >= socat's throughput, added
latency <= 1.5x socat's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import KEYUTIL, PYTHON, environment, free_port
from streamlib import Contender, connect_unix, rounds, serve


class Chain(Contender):
    """Two forwarder processes; the client connects over TCP to the first one."""

    def __init__(self, name: str, first: list[str], second: list[str], port: int,
                 work: Path, hop: Path) -> None:
        super().__init__(name, first, hop, work / f"{name}-1.log")
        self.second_argv, self.port = second, port
        self.second: subprocess.Popen[bytes] | None = None
        self.second_log = work / f"{name}-2.log"

    def pids(self) -> list[int]:
        return super().pids() + ([self.second.pid] if self.second is not None else [])

    def start(self) -> None:
        with self.second_log.open("wb") as log:
            self.second = subprocess.Popen(self.second_argv, stdout=subprocess.DEVNULL,
                                           stderr=log)
        connect_unix(self.sock_path).close()  # the second hop listens before the first starts
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log)
        end = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def stop(self) -> int | None:
        code = super().stop()
        if self.second is not None and self.second.poll() is None:
            self.second.terminate()
            self.second.wait(10)
        return code


def run(args: argparse.Namespace) -> dict[str, Any]:
    socat = shutil.which("socat")
    if socat is None:
        raise SystemExit("socat is not installed (apt-get install socat)")
    work = Path(tempfile.mkdtemp(prefix="binb", dir="/tmp"))
    server = subprocess.Popen([PYTHON, __file__, "--serve"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    chains: list[Chain] = []
    try:
        assert server.stdout is not None
        app = int(server.stdout.readline())
        a, b = free_port(), free_port()
        ours = Chain(
            "keyutil",
            [KEYUTIL, "proxy", "--listen", f"tcp://127.0.0.1:{a}", "--to",
             f"unix://{work}/k.sock", "--idle-timeout", "600"],
            [KEYUTIL, "proxy", "--listen", f"unix://{work}/k.sock", "--to",
             f"tcp://127.0.0.1:{app}", "--idle-timeout", "600"],
            a, work, work / "k.sock",
        )
        theirs = Chain(
            "socat",
            [socat, *args.socat_arg, f"TCP-LISTEN:{b},bind=127.0.0.1,fork,reuseaddr,nodelay",
             f"UNIX-CONNECT:{work}/s.sock"],
            [socat, *args.socat_arg, f"UNIX-LISTEN:{work}/s.sock,fork",
             f"TCP:127.0.0.1:{app},nodelay"],
            b, work, work / "s.sock",
        )
        chains = [ours, theirs]
        for c in chains:
            c.start()
        direct = socket.create_connection(("127.0.0.1", app))
        direct.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            results = rounds(chains, direct, args)
        except OSError as e:
            logs = [p for c in chains for p in (c.log, c.second_log) if p.exists()]
            raise SystemExit(
                f"a chain broke: {e}; the logs:\n" + "\n".join(p.read_text()[-2000:] for p in logs)
            ) from None
        direct.close()
        ratios = {
            key: results["keyutil"][key] / results["socat"][key]
            for key in ("up_mb_s_median", "down_mb_s_median", "added_rtt_us_median",
                        "added_rtt_us_p99", "cpu_s_per_gb")
            if results["socat"][key]
        }
        return {
            **environment(),
            "mib_each_way": args.mb,
            "repeats": args.repeats,
            "rtts_per_repeat": args.rtts,
            "socat_args": args.socat_arg,
            "results": results,
            "ratios_ours_over_socat": ratios,
            "target_met": ratios.get("up_mb_s_median", 0) >= 1
            and ratios.get("down_mb_s_median", 0) >= 1
            and ratios.get("added_rtt_us_median", 9) <= 1.5,
        }
    finally:
        for c in chains:
            c.stop()
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def print_table(r: dict[str, Any]) -> None:
    print(f"bench_inbound  {r['date']}  nproc {r['nproc']}  load {r['loadavg_1m']}  "
          f"python {r['python']}")
    print(f"host TCP -> forwarder -> unix (for vsock) -> forwarder -> app TCP; "
          f"{r['mib_each_way']} MiB each way x {r['repeats']} repeats, "
          f"{r['rtts_per_repeat']} round trips of 64 bytes per repeat")
    header = (f"{'path':<9} {'up MB/s':>9} {'down MB/s':>10} {'RTT med us':>11} "
              f"{'RTT p99 us':>11} {'+med us':>8} {'+p99 us':>8}")
    print(header)
    print("-" * len(header))
    for name, s in r["results"].items():
        print(f"{name:<9} {s['up_mb_s_median']:>9.0f} {s['down_mb_s_median']:>10.0f} "
              f"{s['rtt_us_median']:>11.1f} {s['rtt_us_p99']:>11.1f} "
              f"{s.get('added_rtt_us_median', 0):>8.1f} {s.get('added_rtt_us_p99', 0):>8.1f}")
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in r["ratios_ours_over_socat"].items())
    print(f"ours / socat: {ratios}; target met: {r['target_met']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=100, help="MiB each way per repeat (100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (5)")
    parser.add_argument("--rtts", type=int, default=2000, help="round trips per repeat (2000)")
    parser.add_argument("--socat-arg", action="append", default=[], help="extra socat option")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else "", end="")
    if not args.json:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
