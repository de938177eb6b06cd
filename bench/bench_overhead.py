"""Where a release's CPU goes beyond the crypto floor: the KMS app alone, then what the
replay store, the server, the log line, the network and idle time add, in one run.

    .venv/bin/python bench/bench_overhead.py [--releases 1000] [--rounds 3] [--json]

Every row is CPU per release, the median of ``--rounds`` rounds run interleaved (round 1 of
every row, then round 2, ...), so that background load on a shared machine weighs on all
rows alike. Each round sends ``--releases`` fresh releases, built beforehand (challenge, key
pair, document), one after the other.

- ``floor``: the crypto a KMS must compute per release (``bench_release.FloorBench``: ES384
  COSE signature, leaf certificate signature, HPKE seal, Ed25519 answer), in a hot loop.
- ``app``: the WSGI app (``mock_kms.server.KmsApp``) called in this process, releases back to
  back: the service ``mock-kms serve`` builds (SQLite replay store, embedded chain).
  ``app, memory store``: the same with ``--replay-store memory``.
- ``app, TCP between``: as ``app``, with a loopback TCP exchange of a release's sizes
  (connect, accept, 6.5 KB up, 1.1 KB down, close) between two releases; ``app, idle
  between``: with a 0.2 ms sleep instead. Only the app's own CPU is counted (thread CPU time
  around each call): what these rows add is how much slower the same work runs after the
  kernel's network code, or after the CPU sat idle, ran in between.
- ``server``: ``mock-kms serve --workers 1`` (utime + stime from ``/proc``), each release on
  a new TCP connection as keyutil sends it, the next sent when the answer is in;
  ``server --quiet``: without the INFO line per release; ``server --quiet, memory store``:
  also without the SQLite claim.

``floor / row`` is the share of the row's CPU that is the floor; ``bench_release.py`` gives
the same ratio for the server under concurrent load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench_release import Client, FloorBench, app_cost, in_process_app
from benchlib import LocalKms, cpu_seconds, environment

REQUEST_BYTES = 6500  # a one-key release request with a simulator document, about
ANSWER_BYTES = 1100  # and its answer
IDLE_S = 0.0002

SERVE_ARGS = ["--workers", "1", "--nonce-lifetime", "600", "--max-age", "600"]
SERVERS = {
    "server": [],
    "server --quiet": ["--quiet"],
    "server --quiet, memory store": ["--quiet", "--replay-store", "memory"],
}


class LoopbackExchange:
    """A release's traffic over loopback TCP, both ends in this process."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.request, self.answer = b"r" * REQUEST_BYTES, b"a" * ANSWER_BYTES

    def __call__(self) -> None:
        with socket.create_connection(self.address) as client:
            server, _ = self.listener.accept()
            with server:
                client.sendall(self.request)
                _read(server, len(self.request))
                server.sendall(self.answer)
                _read(client, len(self.answer))

    def close(self) -> None:
        self.listener.close()


def _read(sock: socket.socket, n: int) -> None:
    while n > 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed early")
        n -= len(chunk)


def _idle() -> None:
    time.sleep(IDLE_S)


def app_cpu(client: Client, releases: int, between: Callable[[], None] | None = None) -> float:
    """The app's CPU per release (ms), ``between`` run (and not counted) before each."""
    return float(app_cost(client, releases, between)["cpu_ms_per_release"])


def server_cpu(kms: LocalKms, releases: int) -> float:
    """``kms``'s CPU per release (ms), serial releases on new connections."""
    kms.start()
    try:
        client = Client("127.0.0.1", kms.port, kms.sim_dir, kms.state_dir, kms.identity)
        ready = [client.prepare() for _ in range(releases + 20)]
        for prepared in ready[:20]:  # warm-up, not counted
            client.send_raw(prepared)
        before = cpu_seconds(kms.pid, with_children=True)
        answers = [client.send_raw(p)[1] for p in ready[20:]]
        cpu = cpu_seconds(kms.pid, with_children=True) - before
        for prepared, data in zip(ready[20:40], answers, strict=False):
            client.check(prepared, data)
        return 1000 * cpu / releases
    finally:
        kms.stop()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    samples: dict[str, list[float]] = {}
    exchange = LoopbackExchange()
    try:
        kms = LocalKms(work / "kms", app="app", serve_args=SERVE_ARGS)
        floor = FloorBench(kms)
        app, service = in_process_app(kms)
        memory_app, memory_service = in_process_app(kms, "memory")
        rows: dict[str, Callable[[], float]] = {
            "app": lambda: app_cpu(app, args.releases),
            "app, memory store": lambda: app_cpu(memory_app, args.releases),
            "app, TCP between": lambda: app_cpu(app, args.releases, exchange),
            "app, idle between": lambda: app_cpu(app, args.releases, _idle),
        }
        for name, extra in SERVERS.items():
            server = LocalKms(work / name.replace(" ", "").replace(",", "-"), app="app",
                              serve_args=[*SERVE_ARGS, *extra])
            rows[name] = lambda server=server: server_cpu(server, args.releases)
        floor_ms = []
        for _ in range(args.rounds):
            floor_ms.append(floor.rounds(args.floor_seconds, rounds=3))
            for name, measure in rows.items():
                samples.setdefault(name, []).append(measure())
        service.nonces.store.close()
        memory_service.nonces.store.close()
    finally:
        exchange.close()
        shutil.rmtree(work, ignore_errors=True)
    floor_median = statistics.median(floor_ms)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    return {
        **environment(),
        "releases": args.releases,
        "rounds": args.rounds,
        "floor_ms": floor_median,
        "floor_ms_by_round": floor_ms,
        "rows": {
            name: {
                "cpu_ms_per_release": medians[name],
                "by_round": samples[name],
                "floor_over_cpu": floor_median / medians[name],
                "over_app": medians[name] / medians["app"],
            }
            for name in samples
        },
    }


def print_report(report: dict[str, Any]) -> None:
    print(f"bench_overhead  {report['date']}  nproc {report['nproc']}  load "
          f"{report['loadavg_1m']}  python {report['python']}  {report['openssl']}")
    print(f"{report['releases']} releases per row and round, {report['rounds']} rounds, "
          "interleaved; CPU ms per release, median of rounds\n")
    print(f"{'row':<30} {'cpu ms':>7} {'floor/row':>9} {'row/app':>8}  rounds")
    print(f"{'floor':<30} {report['floor_ms']:>7.3f} {1:>9.2f} {'':>8}  "
          f"{[round(x, 3) for x in report['floor_ms_by_round']]}")
    for name, row in report["rows"].items():
        print(f"{name:<30} {row['cpu_ms_per_release']:>7.3f} {row['floor_over_cpu']:>9.2f} "
              f"{row['over_app']:>8.3f}  {[round(x, 3) for x in row['by_round']]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--releases", type=int, default=1000, help="per row and round (1000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--floor-seconds", type=float, default=2.0,
                        help="floor timing per round (2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
