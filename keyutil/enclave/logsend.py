"""The log bridge's enclave side: lines go to the host over vsock, and never hold up the app.

    >>> from keyutil.enclave.logsend import LogSender
    >>> sender = LogSender(lambda: None, max_lines=2)    # a host that never answers
    >>> for n in range(5):
    ...     sender.emit("stdout", f"line {n}")
    >>> sender.buffered, sender.dropped_pending
    (2, 3)

A production enclave has no console, so without this its boot is invisible. The supervisor
passes every line (its own log, the app's stdout and stderr) to :meth:`LogSender.emit`, which
only appends to a bounded buffer under a lock: it never waits for the host. One thread
connects to the host (``keyutil logs --listen vsock://:PORT`` there), sends the preamble and
then whatever is buffered, and reconnects with backoff when the host goes away. While the host
is absent or slow, the buffer keeps the newest lines (at most ``max_lines`` and ``max_bytes``)
and drops the oldest; the count is sent as a ``dropped`` frame ahead of the lines kept, so
the host learns what it missed when it comes back. Lines being sent when a connection breaks
are counted as dropped too (some of them may have arrived).

Wire format: :mod:`keyutil.logwire`. What crosses is visible to the host: the supervisor logs
no key material, but the app's own output is the app's business.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
import time
from collections.abc import Callable

from keyutil.logwire import HELLO, encode_dropped, encode_line

DEFAULT_MAX_LINES = 10_000
DEFAULT_MAX_BYTES = 4 << 20
SEND_TIMEOUT = 5.0  # a host that takes no bytes for this long is dropped and reconnected
RETRY_INITIAL = 0.05
RETRY_MAX = 1.0

Connect = Callable[[], socket.socket | None]
"""Open a connection to the host's log sink; None or OSError when it is not there."""


class LogSender:
    def __init__(
        self,
        connect: Connect,
        *,
        max_lines: int = DEFAULT_MAX_LINES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
    ) -> None:
        if max_lines < 1 or max_bytes < 1:
            raise ValueError("the log buffer needs room for at least one line")
        self._connect = connect
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.clock = clock
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self._frames: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._dropped = 0  # since the last report that went out
        self.dropped_total = 0
        self.sent_lines = 0
        self._in_flight = 0
        self._changed = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    # -- the app's side: never blocks on I/O --
    def emit(self, stream: str, text: str | bytes) -> None:
        frame = encode_line(stream, self.clock(), text)
        with self._changed:
            self._frames.append(frame)
            self._bytes += len(frame)
            while len(self._frames) > self.max_lines or (
                self._bytes > self.max_bytes and len(self._frames) > 1
            ):
                self._bytes -= len(self._frames.popleft())
                self._dropped += 1
                self.dropped_total += 1
            self._changed.notify()

    @property
    def buffered(self) -> int:
        return len(self._frames)

    @property
    def dropped_pending(self) -> int:
        return self._dropped

    # -- the sending thread --
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="log-sender", daemon=True)
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the buffer to be sent; True if it was."""
        end = time.monotonic() + timeout
        with self._changed:
            while self._frames or self._in_flight or self._dropped:
                left = end - time.monotonic()
                if left <= 0 or self._thread is None:
                    return False
                self._changed.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _wait(self, seconds: float) -> None:
        with self._changed:
            if not self._closing:
                self._changed.wait(seconds)

    def _run(self) -> None:
        delay = self.retry_initial
        while not self._closing:
            try:
                sock = self._connect()
            except OSError:
                sock = None
            if sock is None:
                self._wait(delay)
                delay = min(self.retry_max, delay * 2)
                continue
            delay = self.retry_initial
            self._sock = sock
            try:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendall(HELLO)
                self._pump(sock)
            except OSError:
                pass
            finally:
                self._sock = None
                with self._changed:
                    self._dropped += self._in_flight
                    self.dropped_total += self._in_flight
                    self._in_flight = 0
                    self._changed.notify_all()
                sock.close()

    def _pump(self, sock: socket.socket) -> None:
        while True:
            with self._changed:
                while not self._frames and not self._dropped and not self._closing:
                    self._changed.wait()
                if self._closing and not self._frames and not self._dropped:
                    return
                dropped, self._dropped = self._dropped, 0
                batch = list(self._frames)
                self._frames.clear()
                self._bytes = 0
                self._in_flight = len(batch)
            if dropped:
                try:
                    sock.sendall(encode_dropped(dropped))
                except OSError:
                    with self._changed:
                        self._dropped += dropped
                    raise
            sock.sendall(b"".join(batch))
            with self._changed:
                self.sent_lines += self._in_flight
                self._in_flight = 0
                self._changed.notify_all()
