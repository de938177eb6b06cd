"""HTTP to the KMS over TCP, TLS, a unix socket or AF_VSOCK, on the standard library only.

    >>> from keyutil.transport import HttpTransport
    >>> kms = HttpTransport.from_url("vsock://3:8000")
    >>> kms.endpoint.family.name
    'AF_VSOCK'
    >>> response = kms.request("GET", "/v1/health", timeout=2.0)   # doctest: +SKIP

URLs: ``http://host:port``, ``https://host:port`` (verified against ``ca_file`` when given,
otherwise the system store), ``unix:///path/to.sock`` and ``vsock://CID:PORT``. The unix and
vsock forms differ from plain TCP only in the socket family and address handed to
``connect()``; everything above the socket (HTTP/1.1 framing, limits, error translation) is
the same code, which the tests drive over TCP and unix sockets.

Time: ``timeout`` bounds the whole request, not each socket call. Every blocking socket call
(connect, the TLS handshake, each send and receive) gets the time left until that end, so a
peer that trickles bytes cannot stretch a request, and name resolution runs in a daemon thread
that is abandoned when it overruns.

Errors are translated here: any failure to get a complete HTTP response becomes
:class:`TransportError` (``unreachable``, ``timeout`` or ``bad_response``: all mean "the KMS
could not be asked", and the caller may retry). Any complete response, whatever its status,
is returned as :class:`HttpResponse` for the caller to judge.
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any, Protocol

from keyutil import protocol

MAX_RESPONSE_BYTES = 1 << 20  # 1 MiB: a release answer of 16 sealed keys is a few KiB
MAX_REQUEST_BYTES = 1 << 20
USER_AGENT = "keyutil/1"

Address = tuple[str, int] | str | tuple[int, int]


class TransportError(Exception):
    """No complete HTTP response: ``code`` is ``unreachable``, ``timeout`` or ``bad_response``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class HttpResponse:
    """A complete response. ``json`` is the parsed body, or None if it was not JSON."""

    status: int
    json: Any


MAX_JSON_DEPTH = 32  # an answer needs 3; json's parser recurses once per level


def decode_json(data: bytes, where: str) -> Any:
    """A response body's JSON, or None if it is not JSON; TransportError ``bad_response``
    if it nests deeper than :data:`MAX_JSON_DEPTH` (a hostile answer must not exhaust the
    parser's recursion: it is a bad response, retried, never a crash)."""
    if not data:
        return None
    try:
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    except UnicodeDecodeError:
        return None
    if protocol.json_nesting(text) > MAX_JSON_DEPTH:
        raise TransportError(
            "bad_response", f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: a small stack; never a traceback
        return None


class Transport(Protocol):
    """What the release flow needs from the network; tests pass in-process fakes."""

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float
    ) -> HttpResponse: ...


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where the KMS is: a socket family and address, and what to call it in HTTP and TLS."""

    scheme: str
    family: socket.AddressFamily
    address: Address
    host: str  # the Host header and, for https, the name the certificate must carry

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


SCHEMES = ("http", "https", "unix", "vsock")


def parse_url(url: str) -> Endpoint:
    """The endpoint a KMS URL names; ValueError with a readable reason if it names none."""
    # The scheme first: "127.0.0.1:8420" and "kms:8420" would otherwise read as a path, or
    # as a scheme named "kms", and be refused for a reason that does not name the problem.
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(
            f"expected a URL with a scheme (http://, https://, unix:// or vsock://); "
            f"found {url[:80]!r}: did you mean http://{url[:80]}?"
        )
    if scheme not in SCHEMES:
        raise ValueError(
            f"expected an http, https, unix or vsock URL; found the scheme {scheme[:20]!r}"
        )
    parts = urllib.parse.urlsplit(url)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("a KMS URL has no query, fragment or credentials")
    if scheme == "unix":
        if parts.netloc or not parts.path.startswith("/"):
            raise ValueError(f"expected unix:///absolute/path.sock; found {url[:80]!r}")
        return Endpoint("unix", socket.AF_UNIX, parts.path, "localhost")
    if parts.path not in ("", "/"):
        raise ValueError(f"expected no path after host:port; found {parts.path[:40]!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"expected a port from 1 to 65535 in {url[:80]!r}") from None
    if port is None and scheme == "https":
        port = 443
    if port is None or not 0 < port < 65536:
        raise ValueError(f"expected host:port in {url[:80]!r}")
    host = parts.hostname or ""
    if scheme == "vsock":
        if not host.isdigit():
            raise ValueError(f"expected vsock://CID:PORT with a numeric CID; found {url[:80]!r}")
        return Endpoint("vsock", socket.AF_VSOCK, (int(host), port), "localhost")
    if scheme in ("http", "https"):
        if not host:
            raise ValueError(f"expected {scheme}://host:port; found {url[:80]!r}")
        try:
            family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        except ValueError:
            family = socket.AF_UNSPEC  # a name: resolved at connect time
        return Endpoint(scheme, family, (host, port), host)
    raise ValueError(f"expected an http, https, unix or vsock URL; found {url[:80]!r}")


# -- Sockets that never wait past the request's end ----------------------------------------


class _Deadline:
    def __init__(self, timeout: float) -> None:
        self.end = time.monotonic() + timeout

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request's time is up")
        return left


class _DeadlineSocket(socket.socket):
    """A socket whose every blocking call waits at most until the request's end."""

    deadline: _Deadline | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.left())

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return super().recv_into(buffer, nbytes, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return super().recv(bufsize, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()
        super().sendall(data, flags)


class _DeadlineSSLSocket(ssl.SSLSocket):
    """The TLS counterpart (installed as the context's ``sslsocket_class``)."""

    deadline: _Deadline | None = None

    def _arm(self) -> None:
        if self.deadline is not None:
            self.settimeout(self.deadline.left())

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        self._arm()
        return super().recv_into(buffer, nbytes, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._arm()
        super().sendall(data, flags)


def _resolve(host: str, port: int, deadline: _Deadline) -> list[tuple[int, Any]]:
    """getaddrinfo with a time limit (it has none of its own)."""
    result: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as e:
            error.append(e)

    worker = threading.Thread(target=run, name="keyutil-resolve", daemon=True)
    worker.start()
    worker.join(deadline.left())
    if worker.is_alive():
        raise TimeoutError(f"resolving {host} took too long")
    if error:
        raise error[0]
    return [(family, sockaddr) for family, _, _, _, sockaddr in result]


def _connect(endpoint: Endpoint, deadline: _Deadline) -> _DeadlineSocket:
    if endpoint.family == socket.AF_UNSPEC and isinstance(endpoint.address, tuple):
        host, port = endpoint.address
        targets = _resolve(str(host), int(port), deadline)
    else:
        targets = [(endpoint.family, endpoint.address)]
    last: OSError = OSError(f"no address for {endpoint.host}")
    for family, address in targets:
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(deadline.left())
            sock.connect(address)
            sock.deadline = deadline
            return sock
        except OSError as e:
            sock.close()
            last = e
    raise last


class _Connection(http.client.HTTPConnection):
    """http.client over any socket family: only connect() differs from the standard one."""

    def __init__(
        self, endpoint: Endpoint, deadline: _Deadline, context: ssl.SSLContext | None
    ) -> None:
        super().__init__(endpoint.host, timeout=deadline.left())
        self._endpoint = endpoint
        self._deadline = deadline
        self._context = context

    def connect(self) -> None:
        sock: socket.socket = _connect(self._endpoint, self._deadline)
        if self._context is not None:
            sock.settimeout(self._deadline.left())  # bounds the whole handshake
            tls = self._context.wrap_socket(sock, server_hostname=self._endpoint.host)
            assert isinstance(tls, _DeadlineSSLSocket)
            tls.deadline = self._deadline
            sock = tls
        self.sock = sock


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate and host name checks on; trust ``ca_file`` only, or the system store."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.sslsocket_class = _DeadlineSSLSocket
    return context


class HttpTransport:
    """JSON over HTTP/1.1 to one KMS endpoint; a new connection per request.

    Construction does no network I/O (it may read ``ca_file``).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        ca_file: str | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        if ca_file is not None and not endpoint.tls:
            raise ValueError("a CA file applies to https URLs only")
        self.endpoint = endpoint
        self.max_response_bytes = max_response_bytes
        self._context = tls_context(ca_file) if endpoint.tls else None

    @classmethod
    def from_url(cls, url: str, *, ca_file: str | None = None) -> HttpTransport:
        return cls(parse_url(url), ca_file=ca_file)

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float
    ) -> HttpResponse:
        if timeout <= 0:
            raise TransportError("timeout", "no time left for a request")
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        if len(payload) > MAX_REQUEST_BYTES:
            raise ValueError(f"request body of {len(payload)} bytes is too large")
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json", "Connection": "close"}
        if body is not None or method == "POST":
            headers["Content-Type"] = "application/json"
        deadline = _Deadline(timeout)
        where = f"{method} {path} at {self.endpoint.scheme} {self.endpoint.address}"
        conn = _Connection(self.endpoint, deadline, self._context)
        try:
            conn.request(method, path, body=payload if method == "POST" else None, headers=headers)
            response = conn.getresponse()
            status = response.status
            length = response.getheader("Content-Length")
            if length is not None and length.isdigit() and int(length) > self.max_response_bytes:
                raise TransportError(
                    "bad_response",
                    f"{where}: response of {length} bytes exceeds {self.max_response_bytes}",
                )
            data = response.read(self.max_response_bytes + 1)
            if len(data) > self.max_response_bytes:
                raise TransportError(
                    "bad_response", f"{where}: response exceeds {self.max_response_bytes} bytes"
                )
            # read(n) returns what came before the peer hung up without complaining: a body
            # shorter than its Content-Length is a cut connection, not an answer.
            if length is not None and length.isdigit() and len(data) < int(length):
                raise TransportError(
                    "bad_response", f"{where}: response cut short at {len(data)} of {length} bytes"
                )
        except TransportError:
            raise
        except TimeoutError:
            raise TransportError("timeout", f"{where}: no answer in time") from None
        except (ssl.SSLCertVerificationError, ssl.SSLEOFError, ssl.SSLZeroReturnError) as e:
            # A certificate that does not verify is as good as no KMS, and a handshake cut
            # short (a proxy restarting) as any cut connection: retry, then give up.
            raise TransportError("unreachable", f"{where}: TLS failed: {e.reason}") from None
        except ssl.SSLError as e:
            # The peer does not speak TLS at all (a plain-HTTP KMS): no retry will change
            # that, so it is told at once.
            hint = (
                "; is this KMS served over plain http?"
                if e.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST")
                else ""
            )
            raise TransportError(
                "tls_failed", f"{where}: TLS failed: {e.reason or e}{hint}"
            ) from None
        except ssl.CertificateError as e:  # pragma: no cover - an SSLError on 3.7+
            raise TransportError("unreachable", f"{where}: TLS failed: {e}") from None
        except OSError as e:  # refused, reset, no route; also a peer that hung up mid-way
            reason = e.strerror or type(e).__name__
            raise TransportError("unreachable", f"{where}: {reason}") from None
        except (http.client.HTTPException, ValueError) as e:
            raise TransportError(
                "bad_response", f"{where}: not an HTTP response ({type(e).__name__})"
            ) from None
        finally:
            conn.close()
        return HttpResponse(status=status, json=decode_json(data, where))
