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


