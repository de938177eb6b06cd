"""The byte-stream benchmarks' peer and client (bench_proxy.py, bench_inbound.py).

A destination server (:func:`serve`, in its own process) answers a 9-byte header (op, 64-bit
length): ``U`` upload (it reads the bytes and answers one byte), ``D`` download (it sends the
bytes), ``P`` ping-pong (that many 64-byte echoes). The client side times each on one
connection (:func:`measure`) and a :class:`Contender` is a forwarder process under test.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import struct
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchlib import cpu_seconds, percentile

HEADER = struct.Struct("!cQ")
CHUNK = 1 << 20
PING = 64
MB = 1_000_000


# -- the destination server (its own process) -----------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("peer closed")
        data += chunk
    return bytes(data)


def drain(sock: socket.socket, n: int, buf: bytearray) -> None:
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
                op, n = HEADER.unpack(recv_exact(conn, HEADER.size))
            except ConnectionError:
                return
            if op == b"U":
                drain(conn, n, buf)
                conn.sendall(b"K")
            elif op == b"D":
                while n > 0:
                    k = min(n, CHUNK)
                    conn.sendall(block[:k])
                    n -= k
            elif op == b"P":
                for _ in range(n):
                    conn.sendall(recv_exact(conn, PING))
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
    if recv_exact(sock, 1) != b"K":
        raise RuntimeError("upload not acknowledged")
    return time.perf_counter() - start


def download(sock: socket.socket, total: int, buf: bytearray) -> float:
    start = time.perf_counter()
    sock.sendall(HEADER.pack(b"D", total))
    drain(sock, total, buf)
    return time.perf_counter() - start


def ping_pong(sock: socket.socket, count: int) -> list[float]:
    message = os.urandom(PING)
    sock.sendall(HEADER.pack(b"P", count))
    rtts = []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(message)
        if recv_exact(sock, PING) != message:
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

    def pids(self) -> list[int]:
        """The processes whose CPU time counts for this contender."""
        return [self.proc.pid] if self.proc is not None else []

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
    pids = c.pids() if c is not None else []
    before = sum(cpu_seconds(pid, with_children=True) for pid in pids)
    up = upload(sock, total, block)
    down = download(sock, total, buf)
    rtts = ping_pong(sock, args.rtts)
    if c is not None and pids:
        c.cpu += sum(cpu_seconds(pid, with_children=True) for pid in pids) - before
        c.bytes_moved += 2 * total
    return total / up / MB, total / down / MB, rtts


def summary(up: list[float], down: list[float], rtts: list[float]) -> dict[str, float]:
    return {
        "up_mb_s_median": statistics.median(up),
        "down_mb_s_median": statistics.median(down),
        "rtt_us_median": statistics.median(rtts) * 1e6,
        "rtt_us_p99": percentile(rtts, 0.99) * 1e6,
    }




def rounds(
    contenders: Sequence[Contender], direct: socket.socket, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """One warm-up round, then ``args.repeats`` timed ones, each measuring every contender
    (the order alternates, so background load hits them alike) and the direct connection.
    The summaries, with the latency each contender adds over the direct path and its CPU
    seconds per GB."""
    block, buf = memoryview(os.urandom(CHUNK)), bytearray(CHUNK)
    d_up: list[float] = []
    d_down: list[float] = []
    d_rtts: list[float] = []
    for rep in range(args.repeats + 1):
        for c in contenders if rep % 2 == 0 else contenders[::-1]:
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
    results = {"direct": summary(d_up, d_down, d_rtts)}
    for c in contenders:
        s = summary(c.up, c.down, c.rtts)
        s["added_rtt_us_median"] = s["rtt_us_median"] - results["direct"]["rtt_us_median"]
        s["added_rtt_us_p99"] = s["rtt_us_p99"] - results["direct"]["rtt_us_p99"]
        s["cpu_s_per_gb"] = c.cpu / (c.bytes_moved / 1e9) if c.bytes_moved else float("nan")
        results[c.name] = s
    return results
