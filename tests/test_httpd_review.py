"""mock_kms/httpd.py attacked from the network (loopback, real sockets): each test is a way
a hostile or broken peer could hurt the server before the fix it came with.

The server's ordinary behaviour is in test_httpd.py; these are its review's findings."""

from __future__ import annotations

import errno
import http.client
import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import test_httpd
from test_httpd import _Stream, hang_up, read_response

from mock_kms.httpd import EVICT_IDLE_S, MAX_HEAD, RECV_SIZE
from mock_kms.server import ServerSettings, listen

Environ = dict[str, Any]


class App:
    """Counts what it runs; /slow sleeps 0.3 s, /nap 10 ms, /boom raises, /latin answers a
    header value that latin-1 cannot carry (a broken application, not a hostile peer)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> list[bytes]:
        path = environ["PATH_INFO"]
        with self.lock:
            self.calls.append(path)
        if path.startswith("/boom"):
            raise RuntimeError("the application failed")
        if path == "/slow":
            time.sleep(0.3)
        elif path == "/nap":
            time.sleep(0.01)
        headers = [("Content-Type", "application/json")]
        if path == "/latin":
            headers.append(("X-Name", "\u2603"))
        start_response("200 OK", headers)
        return [json.dumps({"path": path}).encode()]


class Running(test_httpd.Running):
    """The server with :class:`App`, no path closing its connection."""

    def __init__(self, sock: socket.socket | None = None, **settings: Any) -> None:
        super().__init__(sock, app=App(), close_after=(), **settings)


@pytest.fixture
def serve() -> Iterator[Callable[..., Running]]:
    yield from test_httpd.serving(Running)


def reset(sock: socket.socket) -> None:
    """Close with a reset (RST), not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    hang_up(sock)


def test_with_threads_a_peer_that_resets_its_running_requests_cannot_queue_more_than_its_cap(
    serve: Any,
) -> None:
    """Before: a connection reset while its request ran in a thread gave its places (per
    peer, per worker) back at once, so a peer could connect, send a whole request, reset,
    and again: every request queued for the pool (bodies and all) past both caps."""
    r = serve(threads=2, max_connections_per_peer=2, connection_limit=4)
    for _ in range(20):
        sock = r.connect()
        sock.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
        time.sleep(0.02)  # read and handed to a thread
        reset(sock)
    time.sleep(0.3 * 6)  # anything queued has run by now (two threads)
    ran = r.app.calls.count("/slow")
    assert ran <= 4, f"{ran} requests ran for a peer allowed 2 connections"
    assert r.get("/x") == 200  # the places are given back once the requests have ended


def test_a_connection_pipelining_many_requests_does_not_hold_the_loop(serve: Any) -> None:
    """Before: the loop ran every whole request a connection had sent before it looked at
    any other connection, so one client pipelining a few hundred requests in one packet
    held a worker for all of them (here 300 x 10 ms) while the others' requests waited."""
    r = serve()
    with r.connect() as greedy, r.connect() as other:
        greedy.sendall(b"GET /nap HTTP/1.1\r\n\r\n" * 300)
        time.sleep(0.1)
        started = time.monotonic()
        other.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        assert read_response(other).status == 200
        waited = time.monotonic() - started
        for _ in range(300):  # the greedy one's answers all come, in order
            response = read_response(greedy)
            assert json.loads(response.read()) == {"path": "/nap"}
        hang_up(greedy)
    assert waited < 1.0, f"a request waited {waited:.2f} s behind another connection's"


def test_empty_lines_without_a_request_do_not_stop_the_clocks(serve: Any) -> None:
    """Before: the empty lines allowed before a request line were dropped and the head's
    clock with them, so a client sending "\\r\\n" now and then held its connection (and a
    place) for ever, past header_timeout and keepalive_timeout."""
    r = serve(header_timeout=0.5, keepalive_timeout=0.5, request_timeout=1.0)
    with r.connect() as sock:
        closed = False
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not closed:
            try:
                sock.sendall(b"\r\n")
                sock.settimeout(0.2)
                closed = sock.recv(1) == b""
            except TimeoutError:
                pass
            except ConnectionError:
                closed = True
        assert closed, "still open 3 s after its first byte"
        hang_up(sock)


@pytest.mark.parametrize("threads", [1, 2])
def test_an_answer_the_server_cannot_frame_is_a_500_and_the_worker_goes_on(
    serve: Any, threads: int
) -> None:
    """Before: the application's status and header fields were framed outside the guard
    that turns its failures into a 500, so a header value latin-1 cannot carry raised out
    of run() (the worker died) or, in a thread, left the connection busy for ever."""
    r = serve(threads=threads)
    with r.connect() as sock:
        sock.sendall(b"GET /latin HTTP/1.1\r\n\r\n")
        response = read_response(sock)
        assert response.status == 500 and json.loads(response.read())["error"] == "internal_error"
        hang_up(sock)
    assert r.get("/x") == 200


def test_a_failing_request_s_path_cannot_write_lines_into_the_log(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the path of a request the application failed on was logged as decoded, so
    %0a in it wrote a line of the client's choosing into the operator's log."""
    r = serve()
    with caplog.at_level(logging.ERROR, logger="mock_kms.httpd"):
        assert r.get("/boom%0aCRITICAL%20mock_kms:%20forged") == 500
    assert "the application failed on GET" in caplog.text
    assert "\nCRITICAL mock_kms: forged" not in caplog.text


class _FlakyListener(socket.socket):
    """A real listening socket whose next accept() fails once with ``errno`` first, the
    way Linux's accept() passes on a network error already pending on the new connection
    (or a firewall's EPERM): loopback cannot be made to do that on demand."""

    fail_with: int | None = None

    def accept(self) -> tuple[socket.socket, Any]:
        if self.fail_with is not None:
            code, self.fail_with = self.fail_with, None
            raise OSError(code, "injected")
        return super().accept()


@pytest.mark.parametrize("code", [errno.ENETDOWN, errno.EHOSTUNREACH, errno.EPERM, errno.EINVAL, errno.EMFILE])
def test_an_error_from_accept_does_not_end_the_worker(serve: Any, code: int) -> None:
    """Before: accept() errors other than "out of descriptors" and ECONNABORTED/EPROTO
    raised out of run(): a network error pending on one new connection (which accept(2)
    says to treat like EAGAIN) ended the whole worker."""
    plain = listen(ServerSettings(port=0))
    sock = _FlakyListener(plain.family, plain.type, fileno=plain.detach())
    sock.fail_with = code
    r = serve(sock)
    assert r.get("/x") == 200  # the first wake-up fails, the connection is taken next
    assert r.get("/x") == 200


@pytest.mark.parametrize("threads", [1, 2])
def test_on_stop_a_connection_with_an_answer_due_gets_it_then_is_closed(
    serve: Any, threads: int
) -> None:
    """Before: after stop(), a connection whose answer was still due kept running the
    requests it had pipelined (and could send more) until the grace period ran out; its
    answer did not say it was the last."""
    r = serve(threads=threads)
    with r.connect() as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
        if threads == 1:  # the loop is inside /slow: the stop lands as the signal would
            threading.Timer(0.1, r.server.stop).start()
        else:
            time.sleep(0.1)
            r.server.stop()
        response = read_response(sock)
        assert response.status == 200 and response.getheader("Connection") == "close"
        assert json.loads(response.read()) == {"path": "/slow"}
        assert sock.recv(100) == b""
        hang_up(sock)
    r.thread.join(5)
    assert not r.thread.is_alive()
    assert r.app.calls == ["/slow"]


def test_a_connection_pipelining_faster_than_its_turns_does_not_grow_its_buffer(
    serve: Any,
) -> None:
    """One request per connection per turn must not mean reading 64 KiB per turn: a client
    sending tiny pipelined requests faster than its turns come would grow its buffer
    without bound. It is read no further than a request's largest size ahead."""
    r = serve()
    count = 100_000
    request = b"GET /x HTTP/1.1\r\n\r\n"
    with r.connect() as sock:
        answers = []

        def read_all() -> None:
            reader = sock.makefile("rb")
            for _ in range(count):
                line = reader.readline()
                while reader.readline() != b"\r\n":
                    pass
                answers.append(line)
                reader.read(len(b'{"path": "/x"}'))

        reading = threading.Thread(target=read_all, daemon=True)
        reading.start()
        sending = threading.Thread(target=sock.sendall, args=(request * count,), daemon=True)
        sending.start()
        largest = 0
        while reading.is_alive() and len(answers) < count:
            for conn in list(r.server.conns.values()):
                largest = max(largest, len(conn.inbuf))
            time.sleep(0.001)
        reading.join(60)
        sending.join(10)
        assert len(answers) == count and set(answers) == {b"HTTP/1.1 200 OK\r\n"}
    bound = MAX_HEAD + r.settings.max_body + RECV_SIZE
    assert largest <= bound, f"{largest} bytes buffered for one connection (bound {bound})"


def test_an_answer_to_head_has_no_body_and_the_next_answer_is_read_where_it_starts(
    serve: Any,
) -> None:
    """Before: the answer to a HEAD request carried the application's body, which a client
    or a proxy in front (that knows HEAD answers have none) read as the start of the next
    answer on the connection: the answers after it were desynchronized."""
    r = serve()
    with r.connect() as sock:
        sock.sendall(b"HEAD /x HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n")
        head = http.client.HTTPResponse(_Stream(sock), method="HEAD")  # type: ignore[arg-type]
        head.begin()
        assert head.status == 200 and head.read() == b""
        assert int(head.getheader("Content-Length") or 0) == len(b'{"path": "/x"}')
        after = read_response(sock)
        assert after.status == 200 and json.loads(after.read()) == {"path": "/after"}
        hang_up(sock)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_client_that_pipelines_then_shuts_its_side_gets_every_answer(
    serve: Any, threads: int
) -> None:
    """A client may send all its requests, shut its side for writing (FIN) and read: the
    end of its bytes is not the end of its answers (all of them run, in order)."""
    r = serve(threads=threads)
    with r.connect() as sock:
        sock.sendall(b"".join(b"GET /n%d HTTP/1.1\r\n\r\n" % i for i in range(200)))
        sock.shutdown(socket.SHUT_WR)
        for i in range(200):
            assert json.loads(read_response(sock).read()) == {"path": f"/n{i}"}
        hang_up(sock)


def test_at_the_connection_limit_the_longest_idle_kept_alive_connection_makes_room(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: connections kept alive between requests held their places for as long as
    they sent a request every keepalive_timeout, so a few addresses (127.0.0.0/8 is all
    one host's) sending one request each per 3 s held a worker's 200 places and a new
    client waited in the kernel's queue for ever. Now, at the limit, the connection idle
    longest between requests (for at least EVICT_IDLE_S) is closed to make room."""
    r = serve(connection_limit=3, max_connections_per_peer=3)
    held = [
        socket.create_connection(("127.0.0.1", r.port), timeout=10, source_address=(a, 0))
        for a in ("127.0.0.2", "127.0.0.3", "127.0.0.3")
    ]
    for sock in held:
        sock.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        assert json.loads(read_response(sock).read()) == {"path": "/x"}
        time.sleep(0.1)
    time.sleep(EVICT_IDLE_S)
    with caplog.at_level(logging.INFO, logger="mock_kms.httpd"), r.connect() as new:
        new.settimeout(3)
        new.sendall(b"GET /new HTTP/1.1\r\n\r\n")
        assert read_response(new).status == 200
        hang_up(new)
    assert held[0].recv(1) == b""  # the oldest was closed; the others are still served
    for sock in held[1:]:
        sock.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        assert json.loads(read_response(sock).read()) == {"path": "/x"}
    for sock in held:
        hang_up(sock)
    assert "to make room (the connection limit)" in caplog.text
