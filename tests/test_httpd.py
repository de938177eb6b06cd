"""The KMS's HTTP/1.1 server (mock_kms/httpd.py) on real loopback sockets: framing, limits,
refusals with their stable statuses, threads, and a graceful stop.

The KMS itself behind it (floods, timeouts, workers) is exercised in test_kms_scale.py."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest

from mock_kms.httpd import MAX_HEAD, MAX_HEADERS, BadRequest, HttpServer, parse_head
from mock_kms.server import ServerSettings, listen

Environ = dict[str, Any]


def echo_app(environ: Environ, start_response: Callable[..., Any]) -> list[bytes]:
    """Answers what the server passed on; /slow sleeps, /boom raises, /big is 1 MiB."""
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError("the application failed")
    if path.startswith("/slow"):
        time.sleep(0.5)
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    if int(environ.get("CONTENT_LENGTH") or 0) > 1024:
        data = json.dumps({"error": "body_too_large", "message": "too large"}).encode()
        start_response("413 Payload Too Large", [("Content-Length", str(len(data)))])
        return [data]
    if path == "/big":
        data = b"x" * (1 << 20)
    else:
        data = json.dumps(
            {
                "method": environ["REQUEST_METHOD"],
                "path": path,
                "query": environ["QUERY_STRING"],
                "body": body.decode("latin-1"),
                "remote": environ["REMOTE_ADDR"],
                "headers": sorted(k for k in environ if k.startswith("HTTP_")),
                "type": environ.get("CONTENT_TYPE"),
            }
        ).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [data]


class Running:
    """An HttpServer in a thread on a loopback port (or on ``sock``), serving ``app``."""

    def __init__(
        self,
        sock: socket.socket | None = None,
        *,
        app: Callable[..., Any] = echo_app,
        close_after: tuple[str, ...] = ("/close",),
        **settings: Any,
    ) -> None:
        self.settings = ServerSettings(port=0, **settings)
        self.sock = sock if sock is not None else listen(self.settings)
        self.port = self.sock.getsockname()[1]
        self.app = app
        self.server = HttpServer(app, self.settings, self.sock, close_after=close_after)
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # what would have killed a worker
            self.failure = e
        finally:
            self.server.close()
            self.sock.close()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def get(self, path: str) -> int:
        with self.connect() as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\n\r\n".encode())
            status = read_response(sock).status
            hang_up(sock)
            return status

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


def serving(kind: Callable[..., Running]) -> Iterator[Callable[..., Running]]:
    """A fixture's body: ``start(sock=None, **settings)`` servers, each stopped and checked
    (nothing escaped its loop) at the end."""
    running: list[Running] = []

    def start(sock: socket.socket | None = None, **settings: Any) -> Running:
        running.append(kind(sock, **settings))
        return running[-1]

    yield start
    _Stream.readers.clear()
    for r in running:
        if r.thread.is_alive():
            r.stop()
        assert r.failure is None, r.failure


@pytest.fixture
def serve() -> Iterator[Callable[..., Running]]:
    yield from serving(Running)


class _Stream:
    """One buffered reader per socket for every response read from it: http.client reads
    ahead, and a second reader would miss what the first one buffered."""

    readers: ClassVar[weakref.WeakKeyDictionary[socket.socket, Any]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, sock: socket.socket) -> None:
        if sock not in self.readers:
            self.readers[sock] = sock.makefile("rb")
        self.fp = self.readers[sock]

    def makefile(self, mode: str) -> Any:
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fp, name)

    def close(self) -> None:  # the response's close: the socket stays readable
        pass


def hang_up(sock: socket.socket) -> None:
    """Close ``sock`` for real (its reader holds the descriptor open otherwise)."""
    reader = _Stream.readers.pop(sock, None)
    if reader is not None:
        reader.close()
    sock.close()


def read_response(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(_Stream(sock))  # type: ignore[arg-type]
    response.begin()
    return response


def read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# -- the head parser ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status", "words"),
    [
        (b"GET /v1/x", 400, "request line"),
        (b"GET  /v1/x HTTP/1.1", 400, "request line"),
        (b"G(T /v1/x HTTP/1.1", 400, "request line"),
        (b"GET /v1/x HTTP/2.0", 505, "HTTP/1.1"),
        (b"GET /v1/x FTP/1.1", 400, "request line"),
        (b"GET http://kms/v1/x HTTP/1.1", 400, "path"),
        (b"GET /v1/\x7fx HTTP/1.1", 400, "path"),
        (b"GET /v1/x HTTP/1.1\r\nHost : kms", 400, "NAME: VALUE"),
        (b"GET /v1/x HTTP/1.1\r\nHost: kms\r\n folded", 400, "NAME: VALUE"),
        (b"GET /v1/x HTTP/1.1\r\nno colon", 400, "NAME: VALUE"),
        (b"GET /v1/x HTTP/1.1\r\nX: a\x00b", 400, "control"),
        (b"POST /v1/x HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5", 400, "one"),
        (b"GET /v1/x HTTP/1.1\r\nHost: a\r\nHost: b", 400, "one"),
        (b"POST /v1/x HTTP/1.1\r\nTransfer-Encoding: chunked", 411, "Content-Length"),
        (b"POST /v1/x HTTP/1.1\r\nContent-Length: -1", 400, "number"),
        (b"POST /v1/x HTTP/1.1\r\nContent-Length: +5", 400, "number"),
        (b"POST /v1/x HTTP/1.1\r\nContent-Length: 0x10", 400, "number"),
        (b"POST /v1/x HTTP/1.1\r\nContent-Length: \xd9\xa5", 400, "number"),
        (b"POST /v1/x HTTP/1.1\r\nContent-Length: 1" + b"0" * 18, 400, "number"),
        (b"GET /v1/x HTTP/1.1" + b"\r\nX: y" * (MAX_HEADERS + 1), 431, "header fields"),
    ],
)
def test_heads_that_are_refused(head: bytes, status: int, words: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_head(head)
    assert err.value.status == status
    assert words in err.value.message


def test_a_head_as_read() -> None:
    request = parse_head(
        b"POST /v1/a%20b?x=1&y=%41 HTTP/1.1\r\nContent-Length:  12 \r\nConnection: Close\r\n"
        b"X-A: 1\r\nx-a: 2\r\nExpect: 100-continue"
    )
    assert (request.method, request.path, request.query) == ("POST", "/v1/a b", "x=1&y=%41")
    assert request.length == 12 and not request.keep_alive and request.expect_continue
    assert request.headers["x-a"] == "1, 2"
    http10 = parse_head(b"GET / HTTP/1.0")
    assert not http10.keep_alive and not http10.expect_continue
    assert parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive").keep_alive
    assert parse_head(b"GET / HTTP/1.1").keep_alive


# -- over a socket -----------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_on_one_connection(serve: Any) -> None:
    r = serve()
    with r.connect() as sock:
        sock.sendall(
            b"\r\nGET /one?a=1 HTTP/1.1\r\nHost: kms\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n"
            b"POST /two HTTP/1.1\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nhello"
            b"GET /three HTTP/1.1\r\n\r\n"
        )
        answers = []
        for _ in range(3):
            response = read_response(sock)
            assert response.status == 200 and response.getheader("Connection") is None
            assert response.getheader("Server") == "mock-kms" and response.getheader("Date")
            answers.append(json.loads(response.read()))
    assert [a["path"] for a in answers] == ["/one", "/two", "/three"]
    assert answers[0]["query"] == "a=1" and answers[0]["remote"] == "127.0.0.1"
    # A header name with "_" is dropped: it would read as the same variable as X-Forwarded-For.
    assert answers[0]["headers"] == ["HTTP_HOST"]
    assert answers[1]["body"] == "hello" and answers[1]["type"] == "text/plain"


def test_a_path_that_closes_and_http_1_0_end_the_connection(serve: Any) -> None:
    r = serve()
    for request in (b"GET /close HTTP/1.1\r\n\r\n", b"GET /x HTTP/1.0\r\n\r\n",
                    b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n"):
        with r.connect() as sock:
            sock.sendall(request)
            response = read_response(sock)
            assert response.status == 200 and response.getheader("Connection") == "close"
            response.read()
            assert sock.recv(1) == b""


def test_an_oversized_head_is_refused_with_431_and_the_client_reads_it(serve: Any) -> None:
    r = serve()
    with r.connect() as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10))
        data = read_to_end(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ") and b"Connection: close" in head
    assert json.loads(body) == {
        "error": "bad_request",
        "message": f"expected a request head of at most {MAX_HEAD} bytes",
    }


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        (b"GET /x HTTP/3\r\n\r\n", 505),
        (b"GET /x HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
    ],
)
def test_refused_requests_get_a_json_error_then_the_connection_closes(
    serve: Any, request_bytes: bytes, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    r = serve()
    with caplog.at_level(logging.INFO, logger="mock_kms.httpd"), r.connect() as sock:
        sock.sendall(request_bytes)
        response = read_response(sock)
        assert response.status == status
        assert json.loads(response.read())["error"] == "bad_request"
        assert response.getheader("Connection") == "close"
        assert sock.recv(1) == b""
    assert "refusing a request from 127.0.0.1" in caplog.text


def test_a_body_past_the_limit_is_refused_unread_and_the_client_sees_the_answer(
    serve: Any,
) -> None:
    """The application refuses it from Content-Length alone; the client still sending its
    megabyte must read the 413, not a connection reset."""
    r = serve()
    with r.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n")
        try:
            for _ in range(16):
                sock.sendall(b"x" * 65536)
        except OSError:
            pass  # the server shut its side; what it sent is still there to read
        data = read_to_end(sock)
    assert data.startswith(b"HTTP/1.1 413 ") and b"Connection: close" in data
    assert b"body_too_large" in data


def test_expect_100_continue_is_answered_before_the_body(serve: Any) -> None:
    r = serve()
    with r.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abc")
        response = read_response(sock)
        assert response.status == 200 and json.loads(response.read())["body"] == "abc"


def test_an_application_failure_is_a_500_without_its_details(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    r = serve()
    with caplog.at_level(logging.ERROR, logger="mock_kms.httpd"):
        with r.connect() as sock:
            sock.sendall(b"GET /boom HTTP/1.1\r\n\r\n")
            response = read_response(sock)
            assert response.status == 500 and response.getheader("Connection") == "close"
            assert json.loads(response.read()) == {
                "error": "internal_error", "message": "internal error"
            }
        with r.connect() as sock:  # still serving
            sock.sendall(b"GET /x HTTP/1.1\r\n\r\n")
            assert read_response(sock).status == 200
    assert "the application failed on GET /boom" in caplog.text
    assert "RuntimeError" in caplog.text  # the traceback is the operator's, in the log


def test_a_large_answer_to_a_slow_reader_arrives_whole(serve: Any) -> None:
    r = serve()
    with r.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
        time.sleep(0.3)
        response = read_response(sock)
        assert response.status == 200 and len(response.read()) == 1 << 20
        assert read_response(sock).status == 200  # the pipelined one, after it


@pytest.mark.parametrize(("threads", "waits"), [(4, False), (1, True)])
def test_a_slow_request_holds_the_others_only_in_the_loop(
    serve: Any, threads: int, waits: bool
) -> None:
    r = serve(threads=threads)
    with r.connect() as slow, r.connect() as fast:
        slow.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
        time.sleep(0.05)
        started = time.monotonic()
        fast.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        assert read_response(fast).status == 200
        elapsed = time.monotonic() - started
        assert elapsed > 0.3 if waits else elapsed < 0.4
        assert read_response(slow).status == 200


def test_a_peer_past_its_connection_cap_is_closed_at_accept(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    r = serve(max_connections_per_peer=2)
    with caplog.at_level(logging.WARNING, logger="mock_kms.httpd"):
        first, second = r.connect(), r.connect()
        for sock in (first, second):  # both accepted and served
            sock.sendall(b"GET /x HTTP/1.1\r\n\r\n")
            assert read_response(sock).status == 200
        with r.connect() as third:
            third.sendall(b"GET /x HTTP/1.1\r\n\r\n")
            with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
                read_response(third)
        hang_up(first)
        time.sleep(0.2)
        with r.connect() as fourth:  # room again
            fourth.sendall(b"GET /x HTTP/1.1\r\n\r\n")
            assert read_response(fourth).status == 200
        hang_up(second)
    assert "refusing connections from 127.0.0.1: it holds 2" in caplog.text


def test_past_the_connection_limit_new_connections_wait_for_room(serve: Any) -> None:
    r = serve(connection_limit=2, max_connections_per_peer=2)
    first, second = r.connect(), r.connect()
    for sock in (first, second):
        sock.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        assert read_response(sock).status == 200
    with r.connect() as third:  # in the kernel's queue, not accepted yet
        third.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        third.settimeout(0.5)
        with pytest.raises(TimeoutError):
            third.recv(1)
        hang_up(first)
        third.settimeout(10)
        assert read_response(third).status == 200
    hang_up(second)


def test_stop_lets_a_request_in_progress_answer_then_returns(serve: Any) -> None:
    r = serve(threads=2)
    with r.connect() as busy, r.connect() as idle:
        idle.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        assert read_response(idle).status == 200
        busy.sendall(b"GET /slow HTTP/1.1\r\n\r\n")
        time.sleep(0.1)
        r.server.stop()
        response = read_response(busy)
        assert response.status == 200 and json.loads(response.read())["path"] == "/slow"
        assert idle.recv(1) == b""  # idle connections are closed at once
        r.thread.join(5)
        assert not r.thread.is_alive()
    with pytest.raises(OSError):
        r.connect().close()  # nothing listens any more


def test_a_head_arriving_in_pieces_is_found_whatever_the_split(serve: Any) -> None:
    """The end of a head is looked for only in what arrived since the last look (and the
    three bytes before it): every way of cutting the final CRLF CRLF across two reads, and
    a head sent a byte at a time, are still read as one head."""
    r = serve()
    request = b"GET /x?pieces HTTP/1.1\r\nHost: kms\r\nX-Pad: " + b"p" * 40 + b"\r\n\r\n"
    for cut in range(len(request) - 6, len(request)):
        with r.connect() as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(request[:cut])
            time.sleep(0.05)  # read apart from what follows
            sock.sendall(request[cut:])
            response = read_response(sock)
            assert response.status == 200, cut
            assert json.loads(response.read())["query"] == "pieces"
    with r.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(request)):
            sock.sendall(request[i : i + 1])
            time.sleep(0.002)
        assert read_response(sock).status == 200
