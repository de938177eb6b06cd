"""Fuzz target ``http``: the KMS's HTTP/1.1 server (:mod:`mock_kms.httpd`) reading hostile bytes.

    >>> from fuzz.mutate import RandomChooser
    >>> from fuzz.http import HttpTarget
    >>> target = HttpTarget()
    >>> target.one(RandomChooser(1)).kind in ("refused", "accepted")
    True
    >>> target.close()

Anyone who reaches the KMS's port writes every byte the server reads. The target runs two
real :class:`mock_kms.httpd.HttpServer` (``threads=1``) in threads of the fuzz process for
the whole run, one on a unix socket and one on 127.0.0.1, with a small WSGI application that
echoes what it was given (method, path, query, body length and SHA-256) in response header
fields. Each execution builds 1-4 HTTP/1.1 requests from a small grammar (methods, paths with
%-escapes and queries, Host, Content-Length, Connection, Expect, Transfer-Encoding, duplicated
and padded fields, bodies at and past the size limit), mutates the bytes (flips; CR, LF, NUL,
SP, colon inserted; cuts; a line duplicated; a Content-Length made giant; a CRLF made a bare
LF or CR; an obs-fold; space before a colon; a stretch repeated), sends the stream over one
connection (to the unix socket, or to 127.0.0.1 for a quarter of them) in 1-4 sends split at
random points (or, for a short one, a few bytes at a time), with pauses so that the server
reads the pieces apart, shuts the connection for writing and reads every answer until the
server closes.

The oracle is :func:`reference`, a framer written from RFC 9112 (and RFC 9110's rules for
Content-Length, Host and Expect), not from the server's code. For each request in the stream it
says: *answer* (a strict server must answer exactly this method, path, query and body),
*either* (RFC-lenient and strict readers differ: a refusal with one of the statuses, or exactly
this answer), *refuse* (a refusal with one of the statuses, then nothing more), or *open* (the
stream ends inside it: no answer, or a refusal with one of the statuses). The server's limits
are its configuration, given to the reference: head size (with a few bytes of slack either
side, where pieces arriving apart may decide), field count, body size. The leniencies RFC 9112
allows in *framing* (a bare LF ending a line, unfolding obs-fold, chunked bodies) are not
alternatives here: the server promises to refuse them, and a second reading of where a
request ends is what request smuggling is made of.

Each execution ends in one of:

- ``accepted`` / ``refused``: the answers match the reference; the code is the refusal's
  status, or ``answered``;
- ``accepted_mutant``: the server answered a request the reference refuses or has not whole,
  answered another request than the one sent (method, path, query or body differ), or
  answered anything after a refusal or after a request that closes the connection;
- ``refused_valid``: the server refused, or closed without answering, a whole request the
  reference reads as valid;
- ``crash``: an exception in the server's log (``mock_kms.httpd`` at ERROR), a server that
  stopped accepting or serving (a fresh valid request is checked every
  :data:`LIVENESS_EVERY` executions), a refusal with another status than the reference's,
  an error answer that is not ``{"error", "message"}`` JSON, an answer that is not HTTP/1.1,
  a 100 Continue nobody asked for, content in an answer to HEAD (RFC 9110 9.3.2);
- ``harness_error``: the fuzzer's own code failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import select
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fuzz.mutate import Chooser, chance, pick
from fuzz.targets import Execution, _Inflight, _trace
from mock_kms.httpd import MAX_HEAD, MAX_HEADERS, HttpServer
from mock_kms.server import ServerSettings, listen

# The fuzzed server's body limit: a setting, small so that the 413 boundary is cheap to reach.
MAX_BODY = 4096
# A path the fuzzed server closes the connection after (as the KMS does after /v1/release).
CLOSE_PATH = b"/close"
# Bytes either side of the head limit where a refusal (431) and an answer are both allowed:
# a head whose end arrives in a later piece than its limit can be judged on the first piece.
HEAD_SLACK = 8
LIVENESS_EVERY = 50
# Pauses between the pieces of a stream, so that the server reads them apart (seconds); a
# stream this short may be sent a few bytes at a time.
SPLIT_PAUSE = 0.0005
TRICKLE_PAUSE = 0.0001
TRICKLE_MAX = 400
# How long an exchange may take before the server is said to hang (seconds).
EXCHANGE_TIMEOUT = 10.0

# -- the reference framer (RFC 9112) -------------------------------------------------------------

# RFC 9110 5.6.2: token = 1*tchar.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# RFC 3986 pchar = unreserved / pct-encoded / sub-delims / ":" / "@"; a path adds "/", a
# query "/" and "?". "%" is checked apart (it must start a pct-encoded triplet).
_PCHAR = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@%"
)
_PATH_BYTES = _PCHAR | frozenset(b"/")
_QUERY_BYTES = _PATH_BYTES | frozenset(b"?")
# RFC 3986 host [":" port]: reg-name, IP-literal ("[...]") or an IPv4 address.
_HOST_BYTES = _PCHAR - frozenset(b"@") | frozenset(b"[]")
_PCT = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_PCT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_DIGITS = re.compile(rb"[0-9]+")
# A Content-Length this long may be refused as unreadable (400) whatever its value.
LONG_LENGTH_DIGITS = 18
TRANSFER_CODING_REFUSALS = frozenset({400, 411, 501})


@dataclasses.dataclass(frozen=True)
class Expected:
    """A request as the reference reads it: what the application must be given."""

    method: bytes
    path: bytes  # percent-decoded
    query: bytes
    body: bytes
    closes: bool  # the connection ends after its answer


@dataclasses.dataclass(frozen=True)
class Step:
    """What the server must do with one request of the stream (see the module docstring)."""

    kind: str  # "answer", "either", "refuse", "open"
    statuses: frozenset[int]  # refusals allowed (required for "refuse")
    request: Expected | None  # for "answer" and "either"
    method: bytes | None  # the request line's method, when it has one (HEAD answers: no body)
    expects: bool = False  # a 100 Continue may come before its answer


@dataclasses.dataclass
class _Head:
    refuse: bool = False
    statuses: set[int] = dataclasses.field(default_factory=set)
    method: bytes | None = None
    path: bytes = b""
    query: bytes = b""
    version: tuple[int, int] = (1, 1)
    length: int = 0
    closes: bool = False
    expects: bool = False

    def must(self, *statuses: int) -> None:
        self.refuse = True
        self.statuses.update(statuses)

    def may(self, *statuses: int) -> None:
        self.statuses.update(statuses)


def _decode_path(path: bytes) -> bytes:
    return _PCT.sub(lambda m: bytes([int(m[1], 16)]), path)


def _members(values: Iterable[bytes]) -> list[bytes]:
    """The members of list-valued fields (RFC 9110 5.6.1), lowercased, empty ones dropped."""
    found = [m.strip(b" \t").lower() for v in values for m in v.split(b",")]
    return [m for m in found if m]


def _read_request_line(line: bytes, h: _Head) -> None:
    parts = line.split(b" ")  # RFC 9112 3: method SP request-target SP HTTP-version
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        h.must(400)
        return
    method, target, version = parts
    h.method = method
    m = _VERSION.fullmatch(version)
    if m is None:
        # Not HTTP-version's syntax; "HTTP/..." may be read as a version not supported.
        h.must(*((400, 505) if version.startswith(b"HTTP/") else (400,)))
    elif m[1] != b"1":
        h.must(505)
    elif m[2] in (b"0", b"1"):
        h.version = (1, int(m[2]))
    else:
        h.may(505)  # RFC 9110 2.5: a higher minor version is read as the highest known
    # RFC 9112 3.2: origin-form is the form for every method but CONNECT and OPTIONS *; the
    # server serves paths only, so a refusal of the others is strict, not lenient.
    if not target.startswith(b"/") or any(b <= 0x20 or b == 0x7F for b in target):
        h.must(400)
        return
    path, _, query = target.partition(b"?")
    if (any(b not in _PATH_BYTES for b in path) or any(b not in _QUERY_BYTES for b in query)
            or _BAD_PCT.search(target)):
        h.may(400)  # outside RFC 3986's grammar: lenient readers take the bytes as they are
    h.path, h.query = _decode_path(path), query


def _read_fields(lines: list[bytes], h: _Head, max_fields: int) -> list[tuple[bytes, bytes]]:
    if len(lines) > max_fields:
        h.must(431)
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            h.must(400)  # obs-fold, or whitespace before the first field (RFC 9112 5.2, 2.2)
            continue
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            h.must(400)  # no colon, or whitespace before it (RFC 9112 5.1: MUST reject)
            continue
        value = value.strip(b" \t")
        if any(b in (0x00, 0x0A, 0x0D) for b in value):
            h.must(400)  # RFC 9110 5.5: CR, LF and NUL are rejected (or replaced: not here)
        elif any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
            h.may(400)  # other controls are outside field-value's grammar
        fields.append((name.lower(), value))
    return fields


def _read_semantics(fields: list[tuple[bytes, bytes]], h: _Head, whole: bool,
                    max_body: int) -> None:
    def values(name: bytes) -> list[bytes]:
        return [v for n, v in fields if n == name]

    hosts = values(b"host")
    if len(hosts) > 1:
        h.must(400)  # RFC 9112 3.2: more than one Host
    elif not hosts and whole and h.version >= (1, 1):
        h.may(400)  # RFC 9112 3.2 requires a 400; answering it anyway smuggles nothing
    elif hosts and any(b not in _HOST_BYTES for b in hosts[0]):
        h.may(400)  # RFC 9112 3.2: an invalid Host value, likewise
    if values(b"transfer-encoding"):
        # RFC 9112 6.1-6.3: chunked (or a coding not understood); the server sizes bodies
        # by Content-Length only and refuses a request that would need another reading.
        h.must(*TRANSFER_CODING_REFUSALS)
    lengths = values(b"content-length")
    if lengths:
        members = [m.strip(b" \t") for v in lengths for m in v.split(b",")]
        if not all(_DIGITS.fullmatch(m) for m in members):
            h.must(400)  # RFC 9110 8.6: Content-Length = 1*DIGIT
        else:
            numbers = {m.lstrip(b"0") or b"0" for m in members}
            if len(numbers) > 1:
                h.must(400)  # RFC 9112 6.3 (5): differing lengths are unrecoverable
            else:
                if len(members) > 1:
                    h.may(400)  # RFC 9110 8.6: the same value repeated may be read as one
                if any(len(m) > LONG_LENGTH_DIGITS for m in members):
                    h.may(400)
                (number,) = numbers
                h.length = int(number) if len(number) <= 30 else max_body + 1
                if h.length > max_body:
                    h.must(413)
    connection = _members(values(b"connection"))
    # RFC 9112 9.3: "close" ends the connection; HTTP/1.0 persists only with keep-alive.
    h.closes = b"close" in connection or (h.version < (1, 1) and b"keep-alive" not in connection)
    h.closes = h.closes or h.path == CLOSE_PATH
    # RFC 9110 10.1.1: 100-continue is ignored in HTTP/1.0.
    h.expects = h.version >= (1, 1) and b"100-continue" in _members(values(b"expect"))


def read_head(lines: list[bytes], *, whole: bool, max_body: int,
              max_fields: int = MAX_HEADERS) -> _Head:
    """The reading of a head's lines (request line first); ``whole``: its end was seen."""
    h = _Head()
    if lines:
        _read_request_line(lines[0], h)
        fields = _read_fields(lines[1:], h, max_fields)
        _read_semantics(fields, h, whole, max_body)
    return h


def reference(stream: bytes, *, max_body: int = MAX_BODY, max_head: int = MAX_HEAD,
              max_fields: int = MAX_HEADERS) -> list[Step]:
    """The steps a strict server takes on ``stream`` (one connection, then end of input)."""
    steps: list[Step] = []
    at = 0
    while True:
        while stream.startswith(b"\r\n", at):
            at += 2  # RFC 9112 2.2: empty lines before a request line are ignored
        if at >= len(stream):
            steps.append(Step("open", frozenset(), None, None))
            return steps
        end = stream.find(b"\r\n\r\n", at)
        if end < 0:
            rest = stream[at:]
            lines = rest.split(b"\r\n")[:-1]  # the lines seen whole so far
            h = read_head(lines, whole=False, max_body=max_body, max_fields=max_fields)
            statuses = set(h.statuses)
            if len(rest) > max_head - HEAD_SLACK:
                statuses.add(431)
                if len(lines[:1]) == 0 and len(rest) > max_head // 2:
                    statuses.add(414)  # RFC 9112 3: a request line too long to read
            kind = "refuse" if len(rest) > max_head + HEAD_SLACK else "open"
            steps.append(Step(kind, frozenset(statuses), None, h.method))
            return steps
        head = stream[at:end]
        h = read_head(head.split(b"\r\n"), whole=True, max_body=max_body,
                      max_fields=max_fields)
        if len(head) > max_head + HEAD_SLACK:
            h.must(431)
        elif len(head) > max_head - HEAD_SLACK:
            h.may(431)
        allowed = frozenset(h.statuses)
        if h.refuse:
            steps.append(Step("refuse", allowed, None, h.method))
            return steps
        assert h.method is not None
        at = end + 4
        body = stream[at : at + h.length]
        expects = h.expects and h.length > 0
        if len(body) < h.length:
            steps.append(Step("open", allowed, None, h.method, expects))
            return steps
        at += h.length
        request = Expected(h.method, h.path, h.query, body, h.closes)
        steps.append(Step("either" if allowed else "answer", allowed, request, h.method,
                          expects))
        if h.closes:
            return steps


# -- reading the server's answers --------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3}) [\x20-\x7e\x80-\xff]*")


@dataclasses.dataclass
class Answer:
    status: int
    fields: dict[bytes, list[bytes]]
    body: bytes | None  # None: none sent (an interim answer, or one to HEAD)
    head_body: bool = False  # content was sent in answer to HEAD

    def field(self, name: bytes) -> bytes | None:
        found = self.fields.get(name)
        return found[-1] if found else None


class Unreadable(Exception):
    """The server's bytes are not HTTP/1.1 answers."""


def read_answers(data: bytes, steps: list[Step]) -> list[Answer]:
    """The answers in ``data``; the n-th final one is framed as the answer to ``steps[n]``
    (an answer to HEAD has no content, RFC 9112 6.3)."""
    answers: list[Answer] = []
    at = finals = 0
    while at < len(data):
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            raise Unreadable(f"an answer's head is cut short: {data[at:at + 80]!r}")
        lines = data[at:end].split(b"\r\n")
        m = _STATUS_LINE.fullmatch(lines[0])
        if m is None:
            raise Unreadable(f"not a status line: {lines[0][:80]!r}")
        fields: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                raise Unreadable(f"not a field line: {line[:80]!r}")
            fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
        status = int(m[1])
        at = end + 4
        if 100 <= status < 200:
            answers.append(Answer(status, fields, None))
            continue
        lengths = fields.get(b"content-length", [])
        if len(lengths) != 1 or not _DIGITS.fullmatch(lengths[0]):
            raise Unreadable(f"an answer without one Content-Length: {lengths!r}")
        size = int(lengths[0])
        method = steps[finals].method if finals < len(steps) else None
        if method == b"HEAD" and (at == len(data) or data.startswith(b"HTTP/", at)):
            answers.append(Answer(status, fields, None))
        else:
            if len(data) - at < size:
                raise Unreadable("an answer's content is cut short")
            answers.append(Answer(status, fields, data[at : at + size], method == b"HEAD"))
            at += size
        finals += 1
    return answers


def error_shape_problem(answer: Answer) -> str:
    """What is wrong with an error answer ("" if it is the documented JSON shape)."""
    if answer.body is None:
        return ""  # an answer to HEAD
    if answer.field(b"content-type") != b"application/json":
        return f"content type {answer.field(b'content-type')!r}"
    try:
        parsed = json.loads(answer.body)
    except ValueError:
        return f"not JSON: {answer.body[:100]!r}"
    if not isinstance(parsed, dict) or set(parsed) != {"error", "message"}:
        return f"not {{error, message}}: {answer.body[:100]!r}"
    if not all(isinstance(v, str) and v for v in parsed.values()):
        return "error or message is not a text"
    if (answer.status == 413) != (parsed["error"] == "body_too_large"):
        return f"{parsed['error']} with status {answer.status}"
    return ""


def echo_differences(answer: Answer, request: Expected) -> list[str]:
    """Where the request the application was given differs from ``request``."""
    body = request.body
    pairs = (
        ("method", answer.field(b"x-method"), request.method),
        ("path", answer.field(b"x-path"), request.path.hex().encode()),
        ("query", answer.field(b"x-query"), request.query.hex().encode()),
        ("content_length", answer.field(b"x-length"), str(len(body)).encode()),
        ("body_read", answer.field(b"x-read"), str(len(body)).encode()),
        ("body_sha256", answer.field(b"x-sha256"), hashlib.sha256(body).hexdigest().encode()),
    )
    return [name for name, ours, theirs in pairs if ours != theirs]


def judge(steps: list[Step], answers: list[Answer]) -> tuple[str, str, str]:
    """(kind, code, detail) for the answers to a stream the reference read as ``steps``."""
    done = 0  # final answers matched to steps
    refused: int | None = None
    closing = False  # an answer said "Connection: close"
    for answer in answers:
        step = steps[done] if done < len(steps) else None
        if answer.body is None and answer.status < 200:
            if answer.status != 100 or step is None or not step.expects or refused is not None:
                return "crash", "interim", f"an interim {answer.status} not asked for"
            continue
        if answer.head_body and answer.status in (200, 413):
            return "crash", "head_body", f"{answer.status} to HEAD carries content"
        if refused is not None:
            return "accepted_mutant", "after_refusal", f"an answer {answer.status} after {refused}"
        if closing:
            return "accepted_mutant", "after_close", "an answer after one that closes"
        closing = answer.field(b"connection") == b"close"
        if step is None:
            closes = bool(steps) and steps[-1].request is not None and steps[-1].request.closes
            why = "after a request that closes" if closes else "for no request the reference sees"
            return "accepted_mutant", "extra_answer", f"an answer {answer.status} {why}"
        done += 1
        if answer.status == 200:
            if step.request is None:
                return ("accepted_mutant", "answered_" + step.kind,
                        f"answered a request the reference finds {step.kind}: "
                        f"{sorted(step.statuses)}")
            differ = echo_differences(answer, step.request)
            if differ:
                return "accepted_mutant", "another_request", f"answered another request: {differ}"
            if step.request.closes and answer.field(b"connection") != b"close":
                return "crash", "close_field", "the answer before a close says nothing of it"
            continue
        problem = error_shape_problem(answer)
        if problem:
            return "crash", "shape", problem
        if step.kind == "answer":
            return "refused_valid", str(answer.status), f"refused {answer.status} a valid request"
        if answer.status not in step.statuses:
            return "crash", "status", f"{answer.status}, expected one of {sorted(step.statuses)}"
        refused = answer.status
    if refused is not None:
        return "refused", str(refused), ""
    if done < len(steps):
        step = steps[done]
        if step.kind in ("answer", "either"):
            return ("refused_valid", "closed",
                    f"closed without answering a whole request ({step.kind})")
        if step.kind == "refuse":
            return "crash", "silent", f"closed without the refusal {sorted(step.statuses)}"
    return "accepted", "answered" if done else "nothing", ""


# -- the application and the server --------------------------------------------------------------


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """What the server passed on, in header fields (readable in an answer to HEAD too)."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    if length > MAX_BODY:  # the server leaves this refusal to the application
        data = json.dumps({"error": "body_too_large", "message": "expected a smaller body"})
        start_response("413 Payload Too Large", [("Content-Type", "application/json")])
        return [data.encode()]
    body = environ["wsgi.input"].read()
    start_response("200 OK", [
        ("Content-Type", "application/json"),
        ("X-Method", environ["REQUEST_METHOD"]),
        ("X-Path", environ["PATH_INFO"].encode("latin-1").hex()),
        ("X-Query", environ["QUERY_STRING"].encode("latin-1").hex()),
        ("X-Length", str(length)),
        ("X-Read", str(len(body))),
        ("X-Sha256", hashlib.sha256(body).hexdigest()),
    ])
    return [b'{"echo":true}']


class _Errors(logging.Handler):
    """The server's log records at ERROR and above (an exception it caught is one)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


class LiveServer:
    """A real HttpServer in a thread of this process: on a unix socket in a new directory,
    or (``tcp``) on 127.0.0.1, where a close with bytes unread turns into a reset."""

    def __init__(self, tcp: bool = False) -> None:
        if tcp:
            self.settings = ServerSettings(port=0, threads=1, max_body=MAX_BODY)
            self._remove: Callable[[], Any] = lambda: None
        else:
            directory = tempfile.mkdtemp(prefix="fuzz-http-")
            # Removed by stop(), or at exit (python -m fuzz.run never stops the target).
            self._remove = weakref.finalize(self, shutil.rmtree, directory, True)
            self.settings = ServerSettings(unix_socket=str(Path(directory) / "kms.sock"),
                                           threads=1, max_body=MAX_BODY)
        self.sock = listen(self.settings)
        self.address: str | tuple[str, int] = self.sock.getsockname()
        self.server = HttpServer(echo_app, self.settings, self.sock,
                                 close_after=(CLOSE_PATH.decode(),))
        self.failure = ""
        self.thread = threading.Thread(target=self._run, name="fuzz-http-server", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # reported as a crash by the next exchange
            self.failure = _trace(e)
        finally:
            self.server.close()
            self.sock.close()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        self._remove()


class Hang(Exception):
    """The server neither answered nor closed in time."""


def exchange(address: str | tuple[str, int], pieces: list[bytes], pause: float,
             eof_after: float) -> bytes:
    """Send ``pieces`` over one connection (``pause`` seconds apart), shut it for writing
    after ``eof_after`` more, and return every byte read until the server closes."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.connect(address)
        sock.setblocking(False)
        received = bytearray()
        deadline = time.monotonic() + EXCHANGE_TIMEOUT
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLOUT)
        closed = False

        def wait(events: int) -> int:
            poller.modify(sock, events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hang(f"{len(received)} bytes read")
            ready = poller.poll(left * 1000)
            return ready[0][1] if ready else 0

        def read() -> None:
            nonlocal closed
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                closed = True
            received.extend(data)

        for n, piece in enumerate(pieces):
            view = memoryview(piece)
            while view and not closed:
                events = wait(select.POLLIN | select.POLLOUT)
                if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    read()
                if events & select.POLLOUT and not closed:
                    try:
                        view = view[sock.send(view):]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except OSError:
                        break  # the server closed: read what it sent
            if pause and n < len(pieces) - 1:
                time.sleep(pause)
        if eof_after:
            time.sleep(eof_after)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        while not closed:
            if wait(select.POLLIN):
                read()
        return bytes(received)
    finally:
        sock.close()


# -- building the input --------------------------------------------------------------------------

METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"HEAD", b"X-KMS")
SEGMENTS = (b"v1", b"release", b"health", b"a%2Fb", b"%41%42", b"caf%C3%A9", b"%zz", b"%",
            b"%0", b"~u", b"x;y=1", b"@:", b"close", b"%00", b"..", b"", b"\xc3\xa9", b"{x}")
QUERIES = (b"", b"?", b"?a=1&b=2", b"?a=%20b", b"??x", b"?a=/b?c", b"?%zz", b"?x#frag")
ODD_VERSIONS = (b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b"http/1.1", b"HTTP/1",
                b"HTTP/9.9", b"HTTP/1.1 ")
HOSTS = (b"kms.test", b"127.0.0.1:8420", b"", b"[::1]:8420", b"a b")
CONNECTIONS = (b"keep-alive", b"close", b"Keep-Alive", b"upgrade, close", b"CLOSE", b"te",
               b"keep-alive, close")
EXPECTS = (b"100-continue", b"100-Continue", b"nothing", b"100-continue, x")
CODINGS = (b"chunked", b"gzip, chunked", b"identity", b"Chunked", b"", b" chunked", b"chunked, x")
BODY_SIZES = (0, 0, 0, 1, 5, 64, 1000, MAX_BODY - 1, MAX_BODY, MAX_BODY + 1)
GIANT_LENGTHS = (b"1000000000000000000", b"10000000000000000000", b"18446744073709551616",
                 b"9" * 40, b"0" * 25 + b"5", b"4096", b"4097", b"-1", b"+5", b"0x10", b"5 5",
                 b"5, 5", b"5,6", b"")
LENGTH_NAMES = (b"Content-Length", b"content-length", b"CONTENT-LENGTH")
PAD_COUNTS = (10, MAX_HEADERS - 3, MAX_HEADERS - 2, MAX_HEADERS - 1, MAX_HEADERS, 80)
BIG_VALUES = (100, MAX_HEAD - 300, MAX_HEAD - 90, MAX_HEAD - 70, MAX_HEAD - 50, MAX_HEAD,
              MAX_HEAD + 10, 20000)
INSERTS = {"insert_cr": b"\r", "insert_lf": b"\n", "insert_nul": b"\x00", "insert_sp": b" ",
           "insert_colon": b":", "insert_tab": b"\t", "insert_crlf": b"\r\n",
           "insert_end": b"\r\n\r\n"}


def _request(c: Chooser, ops: list[str], methods: tuple[bytes, ...]) -> bytes:
    method = pick(c, methods)
    if chance(c, 10):
        path = CLOSE_PATH
    else:
        path = b"/" + b"/".join(pick(c, SEGMENTS) for _ in range(c.below(4)))
    target = path + pick(c, QUERIES)
    fields: list[tuple[bytes, bytes]] = []
    if not chance(c, 8):
        fields.append((b"Host", pick(c, HOSTS)))
    if chance(c, 30):
        fields.append((b"Connection", pick(c, CONNECTIONS)))
    if chance(c, 15):
        fields.append((b"Expect", pick(c, EXPECTS)))
    if chance(c, 20):
        fields.append((b"Content-Type", b"application/json"))
    size = pick(c, BODY_SIZES)
    body = c.data(size) if size <= 64 else bytes(c.data(1)) * size
    if chance(c, 8):
        ops.append("transfer_encoding")
        fields.append((b"Transfer-Encoding", pick(c, CODINGS)))
        body = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n" if body else b"0\r\n\r\n"
    if size or chance(c, 20):
        length = str(len(body)).encode()
        if chance(c, 10):
            ops.append("wrong_length")
            length = pick(c, GIANT_LENGTHS) if chance(c, 60) else str(
                max(0, len(body) + pick(c, (-1, 1, 2)))).encode()
        if not chance(c, 5):
            fields.append((pick(c, LENGTH_NAMES), length))
    if chance(c, 5):
        ops.append("pad_fields")
        fields += [(b"X-Pad-%d" % i, b"p") for i in range(pick(c, PAD_COUNTS))]
    if chance(c, 5):
        ops.append("big_field")
        fields.append((b"X-Big", b"b" * pick(c, BIG_VALUES)))
    if fields and chance(c, 10):
        ops.append("dup_field")
        fields.insert(c.below(len(fields) + 1), fields[c.below(len(fields))])
    version = b"HTTP/1.1" if chance(c, 90) else b"HTTP/1.0" if chance(c, 60) else pick(
        c, ODD_VERSIONS)
    head = b"%s %s %s\r\n" % (method, target, version)
    head += b"".join(b"%s: %s\r\n" % f for f in fields)
    return head + b"\r\n" + body


def _crlfs(data: bytearray) -> list[int]:
    return [m.start() for m in re.finditer(rb"\r\n", data)]


def _mutate(c: Chooser, data: bytearray, ops: list[str]) -> bytearray:
    op = pick(c, ("flip", "insert", "cut", "dup_line", "bare_lf", "bare_cr", "obs_fold",
                  "space_colon", "giant_length", "repeat", "leading", "case"))
    crlfs = _crlfs(data)
    if op == "flip" and data:
        data[c.below(len(data))] ^= 1 << c.below(8)
    elif op == "insert":
        name = pick(c, sorted(INSERTS))
        op = name
        at = c.below(len(data) + 1)
        data[at:at] = INSERTS[name]
    elif op == "cut" and data:
        at = c.below(len(data))
        if chance(c, 50):
            del data[at:]
        else:
            del data[at : at + 1 + c.below(16)]
    elif op == "dup_line" and len(crlfs) > 1:
        n = c.below(len(crlfs) - 1)
        line = data[crlfs[n] + 2 : crlfs[n + 1] + 2]
        data[crlfs[n + 1] + 2 : crlfs[n + 1] + 2] = line
    elif op in ("bare_lf", "bare_cr") and crlfs:
        at = pick(c, crlfs)
        data[at : at + 2] = b"\n" if op == "bare_lf" else b"\r"
    elif op == "obs_fold" and crlfs:
        at = pick(c, crlfs)
        data[at:at] = b"\r\n" + pick(c, (b" ", b"\t")) + b"folded"
    elif op == "space_colon":
        colons = [m.start() for m in re.finditer(rb":", data)]
        if colons:
            at = pick(c, colons)
            data[at:at] = pick(c, (b" ", b"\t"))
    elif op == "giant_length":
        found = [m.span(1) for m in re.finditer(rb"(?i)content-length:[ ]*([0-9]*)", data)]
        if found:
            start, stop = pick(c, found)
            data[start:stop] = pick(c, GIANT_LENGTHS)
    elif op == "repeat" and data:
        start = c.below(len(data))
        stop = start + 1 + c.below(len(data) - start)
        data[stop:stop] = data[start:stop]
    elif op == "leading":
        data[0:0] = pick(c, (b"\r\n", b"\r\n\r\n", b"\n", b" ", b"\r\n" * 3))
    elif op == "case":
        letters = [i for i, b in enumerate(data[:4096]) if 0x61 <= (b | 0x20) <= 0x7A]
        if letters:
            data[pick(c, letters)] ^= 0x20
    ops.append(op)
    return data


@dataclasses.dataclass
class Plan:
    stream: bytes
    pieces: list[bytes]
    pause: float
    eof_after: float
    tcp: bool
    ops: list[str]


def build(c: Chooser, methods: tuple[bytes, ...] = METHODS) -> Plan:
    ops: list[str] = []
    count = 1 + c.below(4)
    ops.append(f"requests_{count}")
    data = bytearray(b"".join(_request(c, ops, methods) for _ in range(count)))
    for _ in range(c.below(4)):
        data = _mutate(c, data, ops)
    stream = bytes(data)
    if len(stream) <= TRICKLE_MAX and chance(c, 3):
        ops.append("trickle")  # a few bytes at a time: every boundary read apart
        cuts = list(range(0, len(stream), 1 + c.below(4)))[1:]
        pause = TRICKLE_PAUSE
    else:
        cuts = sorted({c.below(len(stream) + 1) for _ in range(c.below(4))})
        pause = SPLIT_PAUSE if chance(c, 60) else 0.0
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    pieces = [p for p in pieces if p] or [b""]
    if len(pieces) > 1:
        ops.append("split")
    eof_after = 0.003 if chance(c, 10) else 0.0
    if eof_after:
        ops.append("eof_later")
    tcp = chance(c, 25)
    if tcp:
        ops.append("tcp")
    return Plan(stream, pieces, pause, eof_after, tcp, ops)


LIVENESS_REQUEST = b"GET /alive?x=1 HTTP/1.1\r\nHost: kms.test\r\n\r\n"


class HttpTarget(_Inflight):
    name = "http"

    def __init__(self, *_: Any, methods: tuple[bytes, ...] = METHODS) -> None:
        self.methods = methods
        self.servers: dict[bool, LiveServer] = {}  # by tcp
        self.errors = _Errors()
        self.execs = 0

    def _live(self, tcp: bool) -> LiveServer:
        server = self.servers.get(tcp)
        if server is None or not server.alive():
            if server is not None:
                server.stop()  # it died: its crash was reported; serve the rest of the run
            logger = logging.getLogger("mock_kms.httpd")
            if self.errors not in logger.handlers:
                logger.addHandler(self.errors)
            server = self.servers[tcp] = LiveServer(tcp)
        return server

    def close(self) -> None:
        logging.getLogger("mock_kms.httpd").removeHandler(self.errors)
        for server in self.servers.values():
            server.stop()
        self.servers.clear()

    def one(self, c: Chooser) -> Execution:
        try:
            plan = build(c, self.methods)
            server = self._live(plan.tcp)
        except Exception as e:
            return Execution(self.name, "harness_error", type(e).__name__, [], b"",
                             detail=_trace(e))
        return self.check(server, plan)

    def check(self, server: LiveServer, plan: Plan) -> Execution:
        extra: dict[str, Any] = {"pieces": [len(p) for p in plan.pieces]}

        def result(kind: str, code: str, detail: str = "") -> Execution:
            return Execution(self.name, kind, code, plan.ops, plan.stream, "built", detail,
                             extra)

        self.before(plan.stream)
        self.execs += 1
        self.errors.records.clear()
        try:
            got = exchange(server.address, plan.pieces, plan.pause, plan.eof_after)
        except Hang as e:
            return result("crash", "hang", str(e))
        except OSError as e:
            return result("crash", "dead", f"{e}; {server.failure}")
        try:
            steps = reference(plan.stream)
        except Exception as e:
            return result("harness_error", type(e).__name__, _trace(e))
        if self.errors.records:
            return result("crash", "logged", self.errors.records[0])
        if not server.alive():
            return result("crash", "dead", server.failure)
        try:
            answers = read_answers(got, steps)
        except Unreadable as e:
            return result("crash", "unreadable", str(e))
        kind, code, detail = judge(steps, answers)
        extra["answered"] = sum(a.status == 200 for a in answers)
        extra["continues"] = sum(a.status == 100 for a in answers)
        extra["steps"] = [s.kind for s in steps]
        if kind in ("accepted", "refused") and self.execs % LIVENESS_EVERY == 0:
            problem = self._liveness(server)
            if problem:
                return result("crash", "dead", problem)
        return result(kind, code, detail)

    def _liveness(self, server: LiveServer) -> str:
        """A fresh valid request on a new connection is answered ("" when it is)."""
        try:
            got = exchange(server.address, [LIVENESS_REQUEST], 0.0, 0.0)
            answers = read_answers(got, reference(LIVENESS_REQUEST))
        except (Hang, OSError, Unreadable) as e:
            return f"a fresh request after {self.execs} executions: {e}"
        if [a.status for a in answers] != [200]:
            return f"a fresh request was answered {[a.status for a in answers]}"
        return ""
