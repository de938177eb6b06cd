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
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import KEYUTIL, PYTHON, cpu_seconds, environment, percentile

HEADER = struct.Struct("!cQ")
CHUNK = 1 << 20
PING = 64
MB = 1_000_000


# -- the destination server (its own process) ---------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return bytes(data)


def _drain(sock: socket.socket, n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    while n > 0:
        got = sock.recv_into(view[: min(n, len(buf))])
        if not got:
            raise ConnectionError("peer closed")
        n -= got


def _serve_one(conn: socket.socket) -> None:
    buf = bytearray(CHUNK)
    block = memoryview(os.urandom(CHUNK))
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                op, n = HEADER.unpack(_recv_exact(conn, HEADER.size))
            except ConnectionError:
                return
            if op == b"U":
                _drain(conn, n, buf)
                conn.sendall(b"K")
            elif op == b"D":
                while n > 0:
                    k = min(n, CHUNK)
                    conn.sendall(block[:k])
                    n -= k
            elif op == b"P":
                for _ in range(n):
                    conn.sendall(_recv_exact(conn, PING))
            else:
                return


def serve() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


# -- the client ------------------------------------------------------------------------------


def upload(sock: socket.socket, total: int, block: memoryview) -> float:
    start = time.perf_counter()
    sock.sendall(HEADER.pack(b"U", total))
    left = total
    while left > 0:
        k = min(left, len(block))
        sock.sendall(block[:k])
        left -= k
    if _recv_exact(sock, 1) != b"K":
        raise RuntimeError("upload not acknowledged")
    return time.perf_counter() - start


def download(sock: socket.socket, total: int, buf: bytearray) -> float:
    start = time.perf_counter()
    sock.sendall(HEADER.pack(b"D", total))
    _drain(sock, total, buf)
    return time.perf_counter() - start


def ping_pong(sock: socket.socket, count: int) -> list[float]:
    message = os.urandom(PING)
    sock.sendall(HEADER.pack(b"P", count))
    rtts = []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(message)
        if _recv_exact(sock, PING) != message:
            raise RuntimeError("echo differs")
        rtts.append(time.perf_counter() - start)
    return rtts


def connect_unix(path: Path, timeout: float = 20.0) -> socket.socket:
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(path))
            return s
        except OSError:
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


class Contender:
    def __init__(self, name: str, argv: list[str], sock_path: Path, log: Path) -> None:
        self.name, self.argv, self.sock_path, self.log = name, argv, sock_path, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.up: list[float] = []
        self.down: list[float] = []
        self.rtts: list[float] = []
        self.cpu = 0.0
        self.bytes_moved = 0

    def start(self) -> None:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log)
        self.sock = connect_unix(self.sock_path)

    def stop(self) -> int | None:
        if self.sock is not None:
            self.sock.close()
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def measure(
    c: Contender | None,
    sock: socket.socket,
    args: argparse.Namespace,
    block: memoryview,
    buf: bytearray,
) -> tuple[float, float, list[float]]:
    """(upload MB/s, download MB/s, round-trip times) on one connection; CPU to ``c``."""
    total = args.mb * (1 << 20)
    pid = c.proc.pid if c is not None and c.proc is not None else None
    before = cpu_seconds(pid, with_children=True) if pid is not None else 0.0
    up = upload(sock, total, block)
    down = download(sock, total, buf)
    rtts = ping_pong(sock, args.rtts)
    if c is not None and pid is not None:
        c.cpu += cpu_seconds(pid, with_children=True) - before
        c.bytes_moved += 2 * total
    return total / up / MB, total / down / MB, rtts


def summary(up: list[float], down: list[float], rtts: list[float]) -> dict[str, float]:
    return {
        "up_mb_s_median": statistics.median(up),
        "down_mb_s_median": statistics.median(down),
        "rtt_us_median": statistics.median(rtts) * 1e6,
        "rtt_us_p99": percentile(rtts, 0.99) * 1e6,
    }


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
        block, buf = memoryview(os.urandom(CHUNK)), bytearray(CHUNK)
        d_up: list[float] = []
        d_down: list[float] = []
        d_rtts: list[float] = []
        for rep in range(args.repeats + 1):  # the first round warms up, untimed
            order = contenders if rep % 2 == 0 else contenders[::-1]
            for c in order:
                assert c.sock is not None
                up, down, rtts = measure(c, c.sock, args, block, buf)
                if rep:
                    c.up.append(up)
                    c.down.append(down)
                    c.rtts += rtts
            up, down, rtts = measure(None, direct, args, block, buf)
            if rep:
                d_up.append(up)
                d_down.append(down)
                d_rtts += rtts
        direct.close()
        results = {"direct": summary(d_up, d_down, d_rtts)}
        for c in contenders:
            s = summary(c.up, c.down, c.rtts)
            s["added_rtt_us_median"] = s["rtt_us_median"] - results["direct"]["rtt_us_median"]
            s["added_rtt_us_p99"] = s["rtt_us_p99"] - results["direct"]["rtt_us_p99"]
            s["cpu_s_per_gb"] = c.cpu / (c.bytes_moved / 1e9) if c.bytes_moved else float("nan")
            results[c.name] = s
        rounds, total = args.repeats + 1, args.mb * (1 << 20)
        expect_to_dest = rounds * (total + args.rtts * PING + 3 * HEADER.size)
        expect_to_client = rounds * (total + args.rtts * PING + 1)  # 1: the upload's answer
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
