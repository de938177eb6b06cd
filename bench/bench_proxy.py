"""Benchmark ``keyutil proxy`` against socat: one connection, unix socket in, TCP out.

    .venv/bin/python bench/bench_proxy.py [--mb 200] [--repeats 5] [--rtts 2000] [--json]

Set-up (not timed): a destination server in its own process (this script with ``--serve``)
on a free loopback TCP port; ``keyutil proxy --listen unix://W/ours.sock --to 127.0.0.1:P``
and ``socat UNIX-LISTEN:W/socat.sock,fork TCP:127.0.0.1:P``, each waited for until its
socket accepts. The client (this process) opens ONE connection through each proxy, and one
directly to the server, and keeps them for the whole run.

On each connection the client asks the server, with a 9-byte header (op, 64-bit length):

- ``U`` upload: the client sends ``--mb`` MiB from a 1 MiB buffer, the server reads them all
  and answers one byte; timed from the first send to that byte;
- ``D`` download: the server sends ``--mb`` MiB; timed from the request to the last byte;
- ``P`` ping-pong: ``--rtts`` round trips of 64 bytes each way, each timed on its own.

Every repeat measures both proxies (the order alternates, so background load on a shared
machine hits both alike) and the direct connection. Reported: median MB/s each way
(1 MB = 10**6 bytes), median and p99 RTT, and the latency a proxy adds (its median or p99
RTT minus the direct one), the ratios ours/socat, and CPU seconds per GB moved (utime +
stime of the proxy process and its children, from /proc). At the end our proxy is stopped
with SIGTERM, and its connection line must count the bytes that were sent each way.

socat runs with its defaults (8 KiB transfer blocks) as deployments run it; ``--socat-arg``
adds options (``--socat-arg=-b262144``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import KEYUTIL, PYTHON, environment
from streamlib import HEADER, PING, Contender, rounds, serve


def run(args: argparse.Namespace) -> dict[str, Any]:
    socat = shutil.which("socat")
    if socat is None:
        raise SystemExit("socat is not installed (apt-get install socat)")
    work = Path(tempfile.mkdtemp(prefix="bproxy", dir="/tmp"))
    server = subprocess.Popen(
        [PYTHON, __file__, "--serve"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    contenders: list[Contender] = []
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        dest = f"127.0.0.1:{port}"
        ours = Contender(
            "keyutil proxy",
            [
                *(KEYUTIL, "proxy", "--listen", f"unix://{work}/ours.sock"),
                *("--to", f"127.0.0.1:{port}", "--idle-timeout", "600", "--log-format", "json"),
            ],
            work / "ours.sock",
            work / "ours.log",
        )
        theirs = Contender(
            "socat",
            [socat, *args.socat_arg, f"UNIX-LISTEN:{work}/socat.sock,fork", f"TCP:{dest}"],
            work / "socat.sock",
            work / "socat.log",
        )
        contenders = [ours, theirs]
        for c in contenders:
            c.start()
        direct = socket.create_connection(("127.0.0.1", port))
        direct.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        results = rounds(contenders, direct, args)
        direct.close()
        n, total = args.repeats + 1, args.mb * (1 << 20)
        expect_to_dest = n * (total + args.rtts * PING + 3 * HEADER.size)
        expect_to_client = n * (total + args.rtts * PING + 1)  # 1: the upload's answer
        exit_codes = {c.name: c.stop() for c in contenders}
        lines = [json.loads(x) for x in ours.log.read_text().splitlines() if x.startswith("{")]
        conn = next((x for x in lines if x.get("event") == "connection"), None)
        counted = (
            conn is not None
            and conn["bytes_to_dest"] == expect_to_dest
            and conn["bytes_to_client"] == expect_to_client
        )
        ratios = {
            key: results["keyutil proxy"][key] / results["socat"][key]
            for key in (
                "up_mb_s_median",
                "down_mb_s_median",
                "added_rtt_us_median",
                "added_rtt_us_p99",
                "cpu_s_per_gb",
            )
            if results["socat"][key]
        }
        return {
            **environment(),
            "socat": subprocess.run([socat, "-V"], capture_output=True, text=True)
            .stdout.splitlines()[1]
            .strip(),
            "socat_args": args.socat_arg,
            "mib_each_way": args.mb,
            "repeats": args.repeats,
            "rtts_per_repeat": args.rtts,
            "results": results,
            "ratios_ours_over_socat": ratios,
            "exit_codes": exit_codes,
            "ours_connection_line": conn,
            "ours_byte_counts_match": counted,
        }
    finally:
        for c in contenders:
            c.stop()
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


def print_table(r: dict[str, Any]) -> None:
    print(
        f"bench_proxy  {r['date']}  nproc {r['nproc']} (usable {r['cpus_usable']})  "
        f"load {r['loadavg_1m']}  python {r['python']}  {r['socat']}"
    )
    print(f"{r['platform']}")
    print(
        f"one connection each, unix socket -> proxy -> TCP 127.0.0.1; {r['mib_each_way']} MiB "
        f"each way x {r['repeats']} repeats (+1 warm-up), {r['rtts_per_repeat']} x 64-byte "
        f"round trips per repeat; socat args {r['socat_args'] or '(defaults)'}"
    )
    print()
    header = (
        f"{'path':<14} {'up MB/s':>9} {'down MB/s':>10} {'RTT med us':>11} {'RTT p99 us':>11} "
        f"{'+med us':>8} {'+p99 us':>8} {'CPU s/GB':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, s in r["results"].items():
        print(
            f"{name:<14} {s['up_mb_s_median']:>9.0f} {s['down_mb_s_median']:>10.0f} "
            f"{s['rtt_us_median']:>11.1f} {s['rtt_us_p99']:>11.1f} "
            f"{s.get('added_rtt_us_median', 0):>8.1f} {s.get('added_rtt_us_p99', 0):>8.1f} "
            f"{s.get('cpu_s_per_gb', float('nan')):>9.2f}"
        )
    print()
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in r["ratios_ours_over_socat"].items())
    print(f"ours / socat: {ratios}")
    print(f"exit codes on SIGTERM: {r['exit_codes']}")
    print(f"keyutil proxy's connection line counts the bytes sent: {r['ours_byte_counts_match']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=200, help="MiB each way per repeat (200)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (5)")
    parser.add_argument("--rtts", type=int, default=2000, help="round trips per repeat (2000)")
    parser.add_argument("--socat-arg", action="append", default=[], help="extra socat option")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.mb < 1 or args.repeats < 1 or args.rtts < 1:
        parser.error("--mb, --repeats and --rtts must be at least 1")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if report["ours_byte_counts_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
