"""The KMS's HTTP/1.1 server: one event loop per worker process, requests run in the loop.

    >>> server = HttpServer(app, settings, listen(settings))          # doctest: +SKIP
    >>> server.run()        # until server.stop(), from a signal handler   # doctest: +SKIP

Why not a general WSGI server (docs/adr/0011-kms-workers.md): a release is about a
millisecond of CPU with no waiting in it (the embedded chain, the SQLite replay store and
the audit log are all local), so the cheapest way to serve one is to run it where its bytes
arrived. Each worker process is one loop (epoll on Linux, poll elsewhere) that accepts,
reads whole requests, runs the application and writes the answer; nothing is handed between
threads, and a worker uses one core at most, so N workers use N cores. With ``threads`` > 1
whole requests are handed to that many threads instead, for a KMS whose chain node or replay
store is slow to answer (the loop keeps reading and writing meanwhile).

What the loop does for a hostile or slow peer, per connection:

- nothing is run until the request is whole: a slow client costs a socket and a buffer;
- the head must be whole ``header_timeout`` after its first byte, the whole request within
  ``request_timeout``; a connection between requests is closed after ``keepalive_timeout``
  and any connection with no byte either way after ``channel_timeout``;
- at most ``max_connections_per_peer`` connections from one TCP peer (an IPv6 /64), the next
  closed at accept; at most ``connection_limit`` in all, beyond which a new connection
  takes the place of the one idle longest between requests (``EVICT_IDLE_S`` at least) or,
  with none, the worker stops accepting and leaves the rest in the kernel's queue;
- the head is at most ``MAX_HEAD`` bytes and ``MAX_HEADERS`` fields; the body is sized by
  ``Content-Length`` only (no ``Transfer-Encoding``), at most ``max_body`` bytes;
- pipelined requests are run one per connection per turn of the loop, so that one client
  cannot hold the loop with a packet of requests;
- a connection closed after an error answer is shut for writing and read to its end (for
  at most ``LINGER_S``), so that the peer sees the answer rather than a reset.

A release ends an enclave's exchange, so its connection is closed after the answer: the
next exchange connects anew and goes to whichever worker is waiting (the listening socket
wakes one waiting worker per connection, ``EPOLLEXCLUSIVE``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import email.utils
import errno
import functools
import io
import ipaddress
import json
import logging
import re
import select
import socket
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024
MAX_HEADERS = 64
# Connections accepted per turn of the loop, so that a burst is shared with other workers.
ACCEPT_BATCH = 8
RECV_SIZE = 64 * 1024
# How long the worker stops accepting after an accept() error that is not one connection's
# (out of file descriptors or memory, or one this loop does not know).
ACCEPT_PAUSE_S = 0.5
# At the connection limit, a connection idle between requests for at least this long is
# closed to make room for a new one (the longest idle first).
EVICT_IDLE_S = 1.0
# How long a connection closed after an error is read to its end before it is dropped.
LINGER_S = 2.0
# How often the connections' clocks are looked at (seconds).
SWEEP_INTERVAL = 0.25
# After stop(): how long requests in progress get to finish and their answers to be sent.
STOP_GRACE_S = 5.0
# The names of the threads that run requests (``--threads`` > 1).
REQUEST_THREAD_PREFIX = "kms-request"

_IN = getattr(select, "EPOLLIN", select.POLLIN)
_OUT = getattr(select, "EPOLLOUT", select.POLLOUT)
_ERR = getattr(select, "EPOLLERR", select.POLLERR) | getattr(select, "EPOLLHUP", select.POLLHUP)
# accept() errors that are one connection's (accept(2): a network error already pending on
# it, or a firewall's refusal): the next one is taken.
_ACCEPT_NEXT = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED", "EPROTO", "EPERM", "ENETDOWN", "ENETUNREACH", "EHOSTDOWN",
        "EHOSTUNREACH", "ENONET", "ENOPROTOOPT", "EOPNOTSUPP",
    )
    if hasattr(errno, name)
)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a field value (a tab is allowed)
_NOT_IN_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_EMPTY_LINES = re.compile(rb"(?:\r\n)+")
# The reason phrase of each status this server or the KMS's application answers with.
REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

Application = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BadRequest(Exception):
    """A request this server will not pass on: answered with ``status`` and closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Request:
    """A parsed request head (the body follows: ``length`` bytes)."""

    __slots__ = (
        "expect_continue",
        "headers",
        "keep_alive",
        "length",
        "method",
        "path",
        "query",
        "version",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        version: str,
        headers: dict[str, str],
        length: int,
        keep_alive: bool,
        expect_continue: bool,
    ) -> None:
        self.method, self.path, self.query, self.version = method, path, query, version
        self.headers, self.length, self.keep_alive = headers, length, keep_alive
        self.expect_continue = expect_continue


def parse_head(head: bytes) -> Request:
    """The request line and header fields of ``head`` (without its final empty line).

    Strict where leniency lets two readers disagree about where a request ends: fields are
    ``token ":" value`` with no space before the colon, no folded lines, one
    ``Content-Length`` of digits only, and no ``Transfer-Encoding`` at all."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        raise BadRequest(400, "expected a request line: METHOD /path HTTP/1.1")
    method_b, target, version_b = parts
    if version_b not in (b"HTTP/1.1", b"HTTP/1.0"):
        if version_b.startswith(b"HTTP/"):
            raise BadRequest(505, "expected HTTP/1.1 or HTTP/1.0")
        raise BadRequest(400, "expected a request line: METHOD /path HTTP/1.1")
    if not target.startswith(b"/") or _NOT_IN_TARGET.search(target):
        raise BadRequest(400, "expected a request target that is a path (/v1/...)")
    if len(lines) - 1 > MAX_HEADERS:
        raise BadRequest(431, f"expected at most {MAX_HEADERS} header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest(400, "expected header fields NAME: VALUE, one a line")
        key = name.decode("ascii").lower()
        if _CONTROL.search(value):
            raise BadRequest(400, "expected header values without control characters")
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host"):
                raise BadRequest(400, f"expected one {name.decode('ascii')} field")
            headers[key] += ", " + text
        else:
            headers[key] = text
    if "transfer-encoding" in headers:
        raise BadRequest(411, "expected the body sized by Content-Length, not Transfer-Encoding")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or not length_text.isascii() or len(length_text) > 18:
        raise BadRequest(400, "expected Content-Length to be a number of bytes")
    version = version_b.decode("ascii")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens and (version == "HTTP/1.1" or "keep-alive" in tokens)
    path_b, _, query_b = target.partition(b"?")
    return Request(
        method=method_b.decode("ascii"),
        path=unquote_to_bytes(path_b).decode("latin-1"),
        query=query_b.decode("latin-1"),
        version=version,
        headers=headers,
        length=int(length_text),
        keep_alive=keep_alive,
        expect_continue=version == "HTTP/1.1"
        and headers.get("expect", "").lower() == "100-continue",
    )


class _Connection:
    __slots__ = (
        "busy",
        "close_after",
        "closed",
        "drain",
        "events",
        "fd",
        "inbuf",
        "last_io",
        "linger_until",
        "lingering",
        "out",
        "peer",
        "remote",
        "request",
        "scanned",
        "since",
        "sock",
    )

    def __init__(self, sock: socket.socket, peer: str | None, remote: str, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer  # counted against the per-peer cap, or None (unix socket)
        self.remote = remote
        self.inbuf = bytearray()
        self.scanned = 0  # how much of inbuf is known to hold no end of a head
        self.out = bytearray()
        self.request: Request | None = None  # a head read, its body not yet whole
        self.since: float | None = None  # the current request's first byte
        self.last_io = now
        self.busy = False  # a request handed to a thread, not answered yet
        self.close_after = False  # close once ``out`` is sent
        self.drain = False  # bytes may still come that were never read: linger at close
        self.lingering = False
        self.linger_until = 0.0
        self.events = 0
        self.closed = False


class _Poller:
    """epoll where there is one (Linux), else poll: the same calls, seconds for timeouts."""

    def __init__(self) -> None:
        self._epoll = select.epoll() if hasattr(select, "epoll") else None
        self._poll = None if self._epoll else select.poll()

    def register(self, fd: int, events: int, *, exclusive: bool = False) -> None:
        if self._epoll is not None:
            self._epoll.register(fd, events | (select.EPOLLEXCLUSIVE if exclusive else 0))
        else:
            assert self._poll is not None
            self._poll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        (self._epoll or self._poll).modify(fd, events)  # type: ignore[union-attr]

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError, OSError, ValueError):
            (self._epoll or self._poll).unregister(fd)  # type: ignore[union-attr]

    def forget(self, fd: int) -> None:
        """``fd`` is about to be closed: epoll drops a closed descriptor by itself."""
        if self._epoll is None:
            self.unregister(fd)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        if self._epoll is not None:
            return self._epoll.poll(timeout)
        assert self._poll is not None
        return self._poll.poll(int(timeout * 1000))

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()


class HttpServer:
    """Serve ``app`` (WSGI) on the listening socket ``sock`` until :meth:`stop`.

    ``settings`` is a :class:`mock_kms.server.ServerSettings`; ``close_after`` says which
    paths end their connection once answered. ``clock`` is injected for tests."""

    def __init__(
        self,
        app: Application,
        settings: Any,
        sock: socket.socket,
        *,
        close_after: Iterable[str] = (),
        multiprocess: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.settings = settings
        self.listener = sock
        self.close_after_paths = frozenset(close_after)
        self.clock = clock
        self.poller = _Poller()
        self.conns: dict[int, _Connection] = {}
        # Connections with pipelined requests left to run after this turn of the loop.
        self._again: dict[int, _Connection] = {}
        # Connections closed while their request runs in a thread (counted until it ends).
        self._orphans = 0
        self.per_peer: collections.Counter[str] = collections.Counter()
        self.accepting = False
        self._accept_again_at: float | None = None
        self.stopping = False
        # Requests still running in threads when a stop's grace ran out: close() does not
        # wait for them (see there).
        self.abandoned = 0
        self._last_refusal_log = 0.0
        self._date = (0, "")
        self._tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        host, port = sock.getsockname()[:2] if self._tcp else ("localhost", "")
        self._base_environ = {
            "SCRIPT_NAME": "",
            "SERVER_NAME": str(host),
            "SERVER_PORT": str(port),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": settings.threads > 1,
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
        }
        # Threads: whole requests go to the pool; answers come back through ``_done`` and a
        # byte on the wake-up socket pair.
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._done: collections.deque[tuple[_Connection, int, bytes]] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        if settings.threads > 1:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                settings.threads, thread_name_prefix=REQUEST_THREAD_PREFIX
            )
        self.listener.setblocking(False)
        self.poller.register(self._wake_r.fileno(), _IN)
        self._accept(True)

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> None:
        next_sweep = self.clock() + SWEEP_INTERVAL
        stop_by: float | None = None
        listener_fd = self.listener.fileno()
        wake_fd = self._wake_r.fileno()
        while True:
            if self.stopping:
                if stop_by is None:
                    stop_by = self.clock() + STOP_GRACE_S
                    self._accept(False)
                    for conn in list(self.conns.values()):
                        if not conn.busy and not conn.out:
                            self._close(conn)
                        else:  # the answer due is its last
                            conn.close_after = True
                running = sum(c.busy for c in self.conns.values()) + self._orphans
                if not running and not any(c.out for c in self.conns.values()):
                    break
                if self.clock() > stop_by:
                    if running:
                        self.abandoned = running
                        logger.warning(
                            "stopping with %d request(s) still running after the %g s grace: "
                            "not waiting for them (their connections close unanswered)",
                            running,
                            STOP_GRACE_S,
                        )
                    break
            for fd, mask in self.poller.poll(0.0 if self._again else SWEEP_INTERVAL):
                if fd == listener_fd:
                    self._on_accept()
                elif fd == wake_fd:
                    self._on_wake()
                else:
                    found = self.conns.get(fd)
                    if found is None:
                        continue
                    conn = found
                    if mask & (_IN | _ERR):
                        self._on_readable(conn)
                    if mask & _OUT and not conn.closed:
                        self._flush(conn)
                        self._advance(conn)
            if self._again:
                again, self._again = self._again, {}
                for conn in again.values():
                    self._advance(conn)
                    if not (conn.events or conn.closed or conn.busy) and (
                        self._again.get(conn.fd) is not conn
                    ):
                        self._want(conn, _IN)  # its requests have run: read on
            now = self.clock()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self._sweep(now)

    def stop(self) -> None:
        """Finish: stop accepting, let requests in progress answer (for at most
        ``STOP_GRACE_S``), close. Safe from a signal handler."""
        self.stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"s")

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._close(conn)
        if self._pool is not None:
            # A request stuck in the application (a chain node or a disk that does not
            # answer) must not hold the stop: past the grace its thread is left behind, and
            # the process exits without it (REQUEST_THREAD_PREFIX).
            self._pool.shutdown(wait=not self.abandoned, cancel_futures=True)
        self._accept(False)
        self.poller.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- accepting ----------------------------------------------------------------------------
    def _accept(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        if on:
            self.poller.register(self.listener.fileno(), _IN, exclusive=True)
        else:
            self.poller.unregister(self.listener.fileno())

    def _on_accept(self) -> None:
        settings = self.settings
        for turn in range(ACCEPT_BATCH):
            if len(self.conns) + self._orphans >= settings.connection_limit and not (
                turn == 0 and self._evict()  # (woken: a connection waits to take the room)
            ):
                self._accept(False)  # the rest wait in the queue for a worker with room
                return
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _ACCEPT_NEXT:
                    continue
                # Out of descriptors or memory, or an error this loop does not know: stop
                # accepting for a moment (the listener would wake the loop at once, again
                # and again) rather than end the worker.
                logger.error("cannot accept a connection: %s", e.strerror)
                self._accept(False)
                self._accept_again_at = self.clock() + ACCEPT_PAUSE_S
                return
            sock.setblocking(False)
            peer: str | None = None
            if self._tcp:
                remote = str(addr[0])
                peer = peer_of(remote)
                if self.per_peer[peer] >= settings.max_connections_per_peer:
                    self._refuse(peer)
                    sock.close()
                    continue
                self.per_peer[peer] += 1
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                remote = "unix"
            conn = _Connection(sock, peer, remote, self.clock())
            self.conns[conn.fd] = conn
            conn.events = _IN
            self.poller.register(conn.fd, _IN)
            # A client usually sends its request with the connection: read it now rather
            # than after another turn of the loop.
            self._on_readable(conn)

    def _evict(self) -> bool:
        """At the connection limit: close the connection idle longest between requests (if
        for ``EVICT_IDLE_S`` at least), so that kept-alive connections cannot hold every
        place by sending a request now and then."""
        oldest = self.clock() - EVICT_IDLE_S
        victim = None
        for conn in self.conns.values():
            if conn.last_io < oldest and conn.since is None and not (
                conn.busy or conn.out or conn.inbuf or conn.lingering
            ):
                victim, oldest = conn, conn.last_io
        if victim is None:
            return False
        logger.info("closing a connection from %s to make room (the connection limit)",
                    victim.remote)
        self._close(victim)
        return True

    def _refuse(self, peer: str) -> None:
        now = self.clock()
        if now - self._last_refusal_log > 1.0:
            self._last_refusal_log = now
            logger.warning(
                "refusing connections from %s: it holds %d (the per-peer limit)",
                peer,
                self.settings.max_connections_per_peer,
            )

    # -- reading ------------------------------------------------------------------------------
    def _on_readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        now = self.clock()
        conn.last_io = now
        if conn.lingering:
            return  # read to the end and dropped
        if conn.since is None:
            conn.since = now
        conn.inbuf += data
        if conn.busy or conn.out:
            if len(conn.inbuf) > MAX_HEAD + self.settings.max_body:
                self._want(conn, 0)  # pipelined past any request's size: wait for the answer
            return
        self._advance(conn)

    def _advance(self, conn: _Connection) -> None:
        """Parse and run whatever whole requests ``conn.inbuf`` holds, one at a time."""
        while not conn.closed and not conn.busy and not conn.out and not conn.close_after:
            request = conn.request
            if request is None:
                buf = conn.inbuf
                if buf.startswith(b"\r\n"):  # empty lines before a request line are allowed
                    del buf[: _EMPTY_LINES.match(buf).end()]  # type: ignore[union-attr]
                    conn.scanned = 0
                if buf and conn.since is None:  # a pipelined request: its clock starts now
                    conn.since = self.clock()
                # Only what arrived since the last look (and the 3 bytes before it, where an
                # end could have begun): a head trickled byte by byte is not rescanned whole
                # at every byte.
                end = buf.find(b"\r\n\r\n", max(0, conn.scanned - 3), MAX_HEAD + 4)
                if end < 0:
                    conn.scanned = len(buf)
                    if len(buf) > MAX_HEAD:
                        self._fail(
                            conn, 431, f"expected a request head of at most {MAX_HEAD} bytes"
                        )
                    return  # (empty lines alone leave the head's clock running)
                try:
                    request = parse_head(bytes(buf[:end]))
                except BadRequest as e:
                    self._fail(conn, e.status, e.message)
                    return
                del buf[: end + 4]
                conn.scanned = 0
                conn.request = request
                if request.length > self.settings.max_body:
                    # The application refuses it (its own error and audit line) without
                    # reading; the body is never read, so the connection ends after.
                    conn.close_after = conn.drain = True
                    self._dispatch(conn, request, b"")
                    return
                if request.expect_continue and len(buf) < request.length:
                    conn.out += b"HTTP/1.1 100 Continue\r\n\r\n"
                    self._flush(conn)
                    if conn.closed:
                        return
            if len(conn.inbuf) < request.length:
                return
            body = bytes(conn.inbuf[: request.length])
            del conn.inbuf[: request.length]
            conn.scanned = 0
            self._dispatch(conn, request, body)
            if conn.inbuf and not (conn.closed or conn.busy or conn.out or conn.close_after):
                # One request per connection per turn of the loop: the next pipelined one
                # waits for the other connections' turn. The connection is not read
                # meanwhile: its buffer does not grow, and the end of its bytes (a client
                # may shut its side once it has sent) is not read before its requests ran.
                self._again[conn.fd] = conn
                self._want(conn, 0)
                return

    # -- running the application --------------------------------------------------------------
    def _environ(self, conn: _Connection, request: Request, body: bytes) -> dict[str, Any]:
        environ = dict(self._base_environ)
        environ["REQUEST_METHOD"] = request.method
        environ["PATH_INFO"] = request.path
        environ["QUERY_STRING"] = request.query
        environ["SERVER_PROTOCOL"] = request.version
        environ["REMOTE_ADDR"] = conn.remote
        environ["CONTENT_LENGTH"] = str(request.length)
        environ["wsgi.input"] = io.BytesIO(body)
        for key, value in request.headers.items():
            if key == "content-type":
                environ["CONTENT_TYPE"] = value
            elif key != "content-length" and "_" not in key:
                environ["HTTP_" + key.upper().replace("-", "_")] = value
        return environ

    def _dispatch(self, conn: _Connection, request: Request, body: bytes) -> None:
        conn.request = None
        conn.since = None
        if not request.keep_alive or request.path in self.close_after_paths:
            conn.close_after = True
        environ = self._environ(conn, request, body)
        if self._pool is None:
            status, response = self._call(environ)
            self._respond(conn, status, response)
            return
        conn.busy = True
        self._want(conn, 0)
        self._pool.submit(self._in_thread, conn, environ)

    def _in_thread(self, conn: _Connection, environ: dict[str, Any]) -> None:
        status, response = self._call(environ)
        self._done.append((conn, status, response))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"d")

    def _on_wake(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass
        while self._done:
            conn, status, response = self._done.popleft()
            conn.busy = False
            if conn.closed:
                self._orphans -= 1
                self._release(conn)
            else:
                self._respond(conn, status, response)
                self._advance(conn)

    def _call(self, environ: dict[str, Any]) -> tuple[int, bytes]:
        """Run the application: (status, the whole response's bytes but the framing)."""
        started: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            started[:] = [status, headers]
            return None

        try:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            # Framed here too: a status or field the head cannot carry is the app's failure.
            status_text, headers = started
            status = int(status_text[:3])
            head = [f"HTTP/1.1 {status_text}\r\n"]
            for name, value in headers:
                if name.lower() not in ("connection", "date", "server", "content-length"):
                    head.append(f"{name}: {value}\r\n")
            framed = self._head_text(head, body)
            if body and environ["REQUEST_METHOD"] == "HEAD":  # its length, never its bytes
                framed = framed[: -len(body)]
            return status, framed
        except Exception:
            logger.exception(
                "the application failed on %s %s",
                environ["REQUEST_METHOD"],
                # The client's bytes, decoded: escaped, so that they cannot start a log line.
                environ["PATH_INFO"][:100].encode("unicode_escape").decode("ascii"),
            )
            return 500, self._error_answer(500, "internal error")

    def _error_answer(self, status: int, message: str) -> bytes:
        """This server's own answer: ``{"error": CODE, "message": TEXT}``, the shape of the
        application's errors."""
        code = "internal_error" if status == 500 else "bad_request"
        body = json.dumps({"error": code, "message": message}, separators=(",", ":")).encode()
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n",
            "Content-Type: application/json\r\n",
            "Cache-Control: no-store\r\n",
        ]
        return self._head_text(head, body)

    def _head_text(self, head: list[str], body: bytes) -> bytes:
        """``head`` lines so far plus the framing fields, the empty line, and ``body``;
        "Connection: close" is added by :meth:`_respond` when the connection ends."""
        head.append(
            f"Content-Length: {len(body)}\r\nDate: {self._http_date()}\r\nServer: mock-kms\r\n"
        )
        return "".join(head).encode("latin-1") + b"\r\n" + body

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]

    def _respond(self, conn: _Connection, status: int, response: bytes) -> None:
        if (status >= 500 and status != 503) or self.stopping:
            conn.close_after = True
        if conn.close_after:
            head, sep, rest = response.partition(b"\r\n\r\n")
            response = head + b"\r\nConnection: close" + sep + rest
        conn.out += response
        self._flush(conn)

    # -- writing and closing ------------------------------------------------------------------
    def _flush(self, conn: _Connection) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            if sent:
                conn.last_io = self.clock()
                del conn.out[:sent]
        if conn.out:
            self._want(conn, _OUT)
            return
        if conn.close_after:
            self._finish(conn)
            return
        self._want(conn, _IN)

    def _finish(self, conn: _Connection) -> None:
        """Close after an answer: at once if nothing more was sent, else shut for writing and
        read to the end first, so that unread bytes do not turn the close into a reset."""
        if not conn.inbuf and not conn.drain:
            self._close(conn)
            return
        conn.inbuf.clear()
        conn.lingering = True
        conn.linger_until = self.clock() + LINGER_S
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
        self._want(conn, _IN)

    def _fail(self, conn: _Connection, status: int, message: str) -> None:
        logger.info("refusing a request from %s: %s", conn.remote, message)
        conn.request = None
        conn.close_after = conn.drain = True
        self._respond(conn, status, self._error_answer(status, message))

    def _want(self, conn: _Connection, events: int) -> None:
        if conn.events != events and not conn.closed:
            conn.events = events
            self.poller.modify(conn.fd, events)

    def _close(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.fd, None)
        self.poller.forget(conn.fd)
        conn.sock.close()
        if conn.busy:
            # Its request still runs in a thread: it keeps its places (per peer, per worker)
            # until that ends, else connect-send-reset would queue requests past both caps.
            self._orphans += 1
            return
        self._release(conn)

    def _release(self, conn: _Connection) -> None:
        if conn.peer is not None:
            self.per_peer[conn.peer] -= 1
            if self.per_peer[conn.peer] <= 0:
                del self.per_peer[conn.peer]
        if not self.accepting and not self.stopping and self._accept_again_at is None:
            self._accept(True)

    # -- clocks -------------------------------------------------------------------------------
    def _sweep(self, now: float) -> None:
        settings = self.settings
        if self._accept_again_at is not None and now >= self._accept_again_at:
            self._accept_again_at = None
            if not self.stopping and len(self.conns) + self._orphans < settings.connection_limit:
                self._accept(True)
        elif not self.accepting and not self.stopping and self._accept_again_at is None:
            self._accept(True)  # at the limit: a connection waiting may find room (_evict)
        for conn in list(self.conns.values()):
            reason = None
            if conn.lingering:
                if now > conn.linger_until:
                    self._close(conn)
                continue
            if conn.busy:
                continue
            if conn.since is not None:
                elapsed = now - conn.since
                if conn.request is None and elapsed > settings.header_timeout:
                    reason = f"its request head did not arrive within {settings.header_timeout:g} s"
                elif elapsed > settings.request_timeout:
                    reason = f"its request did not arrive within {settings.request_timeout:g} s"
            elif not conn.out and now - conn.last_io > settings.keepalive_timeout:
                reason = f"idle for {settings.keepalive_timeout:g} s between requests"
            if reason is None and now - conn.last_io > settings.channel_timeout:
                reason = f"nothing sent or received for {settings.channel_timeout} s"
            if reason is not None:
                logger.info("closing a connection from %s: %s", conn.remote, reason)
                self._close(conn)


@functools.lru_cache(maxsize=4096)
def peer_of(address: str) -> str:
    """The unit that ``max_connections_per_peer`` counts: an IPv4 address (an IPv4-mapped
    IPv6 one included), or an IPv6 /64. One host is routinely given a whole /64, so counting
    IPv6 addresses one by one would give it 2^64 allowances."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
