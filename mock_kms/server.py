"""The KMS over HTTP: a WSGI application served by waitress.

    >>> from mock_kms.server import KmsApp, serve                     # doctest: +SKIP
    >>> serve(KmsApp(service), ServerSettings(host="127.0.0.1", port=8420))  # doctest: +SKIP

Endpoints (JSON in and out; errors are ``{"error": CODE, "message": TEXT}``):

=========================  ===================================================================
``GET  /v1/live``          200 ``{"status": "live"}`` while the process serves (liveness: it
                           never asks the chain; restart the process when this fails)
``GET  /v1/health``        200 ``{"status": "ready"}`` when the chain answers, the contract is
                           there and the secrets are loaded; 503 with the reason otherwise
``POST /v1/challenge``     a fresh nonce, single use, short-lived
``POST /v1/release``       the signed, sealed answer; 4xx for denials, 503 when unavailable
``GET  /v1/identity``      ``{"identity": "ed25519:..."}``, the key enclaves pin
``GET  /v1/provenance``    ``?application=APP&name=NAME&type=TYPE``: the signed provenance
                           statement of a typed key (public; no attestation needed)
``GET  /v1/recipient``     ``?app=APP&key=NAME``: an application's age recipient, signed
``GET  /metrics``          Prometheus text: releases by outcome and code, latency histograms,
                           ``kms_build_info{version}`` and ``kms_ready`` (1 ready, 0 not)
=========================  ===================================================================

waitress is concurrent (a thread pool), bounds the request body and header sizes and caps
open connections, in all and per peer address. Four clocks close connections (see
:func:`deadline_channel`), so a client that trickles a byte now and then, or keeps an idle
connection alive, cannot keep a slot. Several workers (:mod:`mock_kms.workers`) accept on one
listening socket made by :func:`listen`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keyutil.protocol import json_nesting
from mock_kms.config import LIMITS
from mock_kms.errors import ErrorCode, InvalidError, KmsError, UnavailableError
from mock_kms.service import ReleaseService, Timings, describe_document

logger = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

RELEASE_PATH = "/v1/release"
# How often each connection's request and keep-alive deadlines are looked at (seconds).
DEADLINE_CHECK_INTERVAL = 0.25

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8420
    unix_socket: str | None = None
    threads: int = 8
    max_body: int = 64 * 1024
    # Seconds a connection may sit idle (nothing sent or received) before it is closed.
    channel_timeout: int = 30
    # Seconds from a request's first byte to its last; a slower request loses its connection.
    request_timeout: float = 10.0
    # Seconds from a request's first byte to the end of its head (request line and headers).
    header_timeout: float = 5.0
    # Seconds a connection may wait between requests (or for its first) before it is closed.
    keepalive_timeout: float = 5.0
    # Connections per worker; and per TCP peer address per worker.
    connection_limit: int = 200
    max_connections_per_peer: int = 32
    backlog: int = 1024

    def __post_init__(self) -> None:
        if (
            self.channel_timeout < 1
            or self.request_timeout <= 0
            or self.header_timeout <= 0
            or self.keepalive_timeout <= 0
        ):
            raise ValueError("the idle and request timeouts are positive (idle: whole seconds)")
        if not 0 < self.max_connections_per_peer <= self.connection_limit:
            raise ValueError("the per-peer connection limit is between 1 and the connection limit")


class Metrics:
    """The server's metrics. With ``multiprocess_dir`` (several workers), each worker writes
    its values to files there (prometheus_client's multiprocess mode) and ``/metrics`` sums
    every worker's, those of workers that have exited included."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.exposition = self.registry
        # This process's view, never summed: the version, and readiness (evaluated at every
        # scrape with set_function: 1 when /v1/health would answer ready; the chain and the
        # replay store are what every worker shares, so any worker's answer is the server's).
        live = self.registry
        if multiprocess_dir is not None:
            live = CollectorRegistry()
        self.build_info = Gauge(
            "kms_build_info", "The running version (always 1)", ["version"], registry=live
        )
        self.build_info.labels(version=_version()).set(1)
        self.ready = Gauge(
            "kms_ready",
            "1 when ready: secrets loaded, chain and contract answering; 0 otherwise",
            registry=live,
        )
        if multiprocess_dir is not None:
            from prometheus_client import multiprocess, values

            # Chosen per metric at construction: the metrics below write to files there.
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiprocess_dir
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
            self.exposition = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.exposition, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            self.exposition.register(_Collected(live))
        self.releases = Counter(
            "kms_releases",
            "Key-release decisions by outcome and error code",
            ["outcome", "code"],
            registry=self.registry,
        )
        self.challenges = Counter(
            "kms_challenges", "Challenge nonces issued", registry=self.registry
        )
        self.verification = Histogram(
            "kms_verification_seconds",
            "Attestation document verification time",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.chain_read = Histogram(
            "kms_chain_read_seconds",
            "Allowlist read time (cache or chain)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.release_latency = Histogram(
            "kms_release_seconds",
            "Whole release request time",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


class _Collected:
    """Another registry's metrics, as one collector (the live gauges next to the summed files)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Any]:
        return self._registry.collect()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nitro-keyrelease")
    except PackageNotFoundError:  # pragma: no cover - run from a tree that is not installed
        return "unknown"


def _status_line(status: int) -> str:
    reasons = {
        200: "OK",
        400: "Bad Request",
        403: "Forbidden",
        404: "Not Found",
        405: "Method Not Allowed",
        413: "Payload Too Large",
        503: "Service Unavailable",
    }
    return f"{status} {reasons.get(status, 'Error')}"


def http_status(error: KmsError) -> int:
    if isinstance(error, UnavailableError):
        return 503
    if error.code in (ErrorCode.BAD_REQUEST, ErrorCode.INPUT_ENCODING):
        return 400
    if error.code == ErrorCode.BODY_TOO_LARGE:
        return 413
    if error.code == ErrorCode.NOT_FOUND:
        return 404
    return 403


class KmsApp:
    """The WSGI application: routing, body limits, JSON, metrics and the audit trail."""

    def __init__(
        self,
        service: ReleaseService,
        *,
        max_body: int = 64 * 1024,
        metrics_dir: str | None = None,
    ) -> None:
        self.service = service
        self.max_body = max_body
        self.metrics = Metrics(metrics_dir)
        self.metrics.ready.set_function(self._ready_value)
        self._routes: dict[tuple[str, str], Callable[[Environ], tuple[int, Any]]] = {
            ("GET", "/v1/live"): lambda environ: (200, {"status": "live"}),
            ("GET", "/v1/health"): self._health,
            ("GET", "/v1/identity"): self._identity,
            ("POST", "/v1/challenge"): self._challenge,
            ("POST", RELEASE_PATH): self._release,
            ("GET", "/v1/provenance"): self._provenance,
            ("GET", "/v1/recipient"): self._recipient,
        }

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        if method == "GET" and path == "/metrics":
            body = generate_latest(self.metrics.exposition)
            start_response(
                "200 OK",
                [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))],
            )
            return [body]
        handler = self._routes.get((method, path))
        if handler is None:
            known = {p for (_, p) in self._routes} | {"/metrics"}
            status, payload = (
                (405, {"error": "method_not_allowed", "message": f"{method} is not served here"})
                if path in known
                else (404, {"error": "not_found", "message": f"no endpoint {path[:100]}"})
            )
        else:
            try:
                status, payload = handler(environ)
            except KmsError as e:
                status, payload = http_status(e), e.to_json()
        return self._json(start_response, status, payload)

    @staticmethod
    def _json(start_response: StartResponse, status: int, payload: Any) -> list[bytes]:
        body = json.dumps(payload, separators=(",", ":")).encode()
        start_response(
            _status_line(status),
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [body]

    def _read_json(self, environ: Environ) -> Any:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise InvalidError(ErrorCode.BAD_REQUEST, "Content-Length is not a number") from None
        if length < 0:  # read(-1) would read to the end, past every limit
            raise InvalidError(ErrorCode.BAD_REQUEST, "Content-Length is negative")
        if length > self.max_body:
            raise InvalidError(
                ErrorCode.BODY_TOO_LARGE,
                f"request body: expected at most {self.max_body} bytes; found {length}",
            )
        data = environ["wsgi.input"].read(length) if length else b""
        try:
            # What json.loads does with bytes (UTF-8, -16 or -32), so the depth is measured
            # on the text it parses.
            text = data.decode(json.detect_encoding(data), "surrogatepass")
        except UnicodeDecodeError:
            raise InvalidError(ErrorCode.BAD_REQUEST, "request body: expected JSON") from None
        limit = LIMITS.max_json_depth
        if json_nesting(text) > limit:
            raise InvalidError(
                ErrorCode.BAD_REQUEST,
                f"request body: expected JSON nested at most {limit} deep",
            )
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            raise InvalidError(ErrorCode.BAD_REQUEST, "request body: expected JSON") from None

    # -- handlers -----------------------------------------------------------------------------
    def _health(self, environ: Environ) -> tuple[int, Any]:
        return 200, self.service.ready()

    def _ready_value(self) -> float:
        try:
            self.service.ready()
        except KmsError:
            return 0.0
        return 1.0

    def _identity(self, environ: Environ) -> tuple[int, Any]:
        return 200, {"identity": self.service.state.identity_text}

    def _recipient(self, environ: Environ) -> tuple[int, Any]:
        """``?app=APP&key=NAME[&type=age]``: the signed public half (docs/sealing.md)."""
        from urllib.parse import parse_qs

        from mock_kms.recipients import recipient_statement

        query = parse_qs(str(environ.get("QUERY_STRING", ""))[:1024], keep_blank_values=True)
        if set(query) - {"app", "key", "type"} or any(len(v) != 1 for v in query.values()):
            raise InvalidError(
                ErrorCode.BAD_REQUEST, "expected the query app=APP&key=NAME[&type=TYPE], once each"
            )
        if "app" not in query or "key" not in query:
            raise InvalidError(ErrorCode.BAD_REQUEST, "expected the query app=APP&key=NAME")
        return 200, recipient_statement(
            self.service.state,
            app=query["app"][0],
            name=query["key"][0],
            key_type=query.get("type", ["age"])[0],
        )

    def _challenge(self, environ: Environ) -> tuple[int, Any]:
        self.metrics.challenges.inc()
        return 200, self.service.challenge()

    def _provenance(self, environ: Environ) -> tuple[int, Any]:
        """The statement of (application, name, type): public, so no attestation."""
        from urllib.parse import parse_qs

        from mock_kms.provenance import parse_query

        issuer = self.service.provenance
        if issuer is None:
            raise InvalidError(ErrorCode.NOT_FOUND, "this KMS issues no provenance statements")
        try:
            query = parse_qs(str(environ.get("QUERY_STRING", ""))[:1024], max_num_fields=8)
        except ValueError:
            raise InvalidError(ErrorCode.BAD_REQUEST, "too many query parameters") from None
        if any(len(v) != 1 for v in query.values()):
            raise InvalidError(ErrorCode.BAD_REQUEST, "expected each query parameter once")
        app, key = parse_query(*(query.get(f, [None])[0] for f in ("application", "name", "type")))
        return 200, issuer.issue(app, key, public=True)

    def _release(self, environ: Environ) -> tuple[int, Any]:
        started = time.perf_counter()
        timings = Timings()
        body: Any = None
        try:
            body = self._read_json(environ)
            outcome = self.service.release(body, timings)
        except KmsError as e:
            kind = "unavailable" if isinstance(e, UnavailableError) else "denied"
            self._observe(kind, str(e.code), timings, started)
            entry = self.service.audit_entry(
                outcome=kind, code=str(e.code), body=body, error=e, verified=timings.verified
            )
            if timings.verified is None and isinstance(body, dict):
                entry.update(describe_document(body.get("attestation")))
            try:
                self.service.audit.record(entry)
            except UnavailableError:
                logger.error("audit log unavailable while recording a refusal")
            logger.info("release %s: %s (%s)", kind, e.code, entry.get("os_image_hash", "-"))
            raise
        entry = self.service.audit_entry(outcome="released", code=None, result=outcome)
        try:
            self.service.audit.record(entry)
        except UnavailableError as e:
            self._observe("unavailable", str(e.code), timings, started)
            logger.error("release refused: %s", e.message)
            raise
        self._observe("released", "ok", timings, started)
        logger.info(
            "release ok: %s app %s keys %s",
            outcome.verified.os_image_hash,
            entry["application"],
            ",".join(outcome.key_names),
        )
        return 200, outcome.answer

    def _observe(self, outcome: str, code: str, timings: Timings, started: float) -> None:
        self.metrics.releases.labels(outcome=outcome, code=code).inc()
        if timings.verification:
            self.metrics.verification.observe(timings.verification)
        if timings.chain_read:
            self.metrics.chain_read.observe(timings.chain_read)
        self.metrics.release_latency.observe(time.perf_counter() - started)


def peer_of(address: str) -> str:
    """The unit that ``max_connections_per_peer`` counts: an IPv4 address (an IPv4-mapped
    IPv6 one included), or an IPv6 /64. One host is routinely given a whole /64, so counting
    IPv6 addresses one by one would give it 2^64 allowances."""
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def deadline_channel(settings: ServerSettings) -> type:
    """waitress's connection class with the limits a slow-client flood runs into.

    waitress's own ``channel_timeout`` counts idle time only: a client that sends one byte
    every few seconds is never idle and would hold its connection (one of
    ``connection_limit``) for as long as it likes. This class adds, per connection:

    - ``header_timeout``: a request's head must be whole this long after its first byte;
    - ``request_timeout``: the whole request (head and body) within this;
    - ``keepalive_timeout``: a connection with no request in progress and nothing to send is
      closed after this long without a byte (a kept-alive connection is not a reservation);
    - ``max_connections_per_peer``: a TCP peer address (an IPv6 /64: :func:`peer_of`)
      holding that many connections to this worker has its next one closed at once, so one
      host cannot take every slot.

    The server loop asks every connection ``readable()`` at least once a second, which is
    where the clocks are checked.
    """
    from waitress.channel import HTTPChannel

    per_peer: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    last_refusal_log = [0.0]

    class DeadlineChannel(HTTPChannel):  # type: ignore[misc]
        _partial: Any = None  # the request being received, or None between requests
        _partial_since = 0.0
        _peer: str | None = None
        _next_check = 0.0
        will_close: bool  # waitress's flag: close once the output is flushed

        def __init__(self, server: Any, sock: Any, addr: Any, adj: Any, map: Any = None) -> None:
            super().__init__(server, sock, addr, adj, map=map)
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return  # a unix socket's peers are one local proxy: no per-peer cap
            peer = peer_of(str(addr[0]))
            with lock:
                over = per_peer[peer] >= settings.max_connections_per_peer
                if not over:
                    per_peer[peer] += 1
                    self._peer = peer
            if over:
                now = time.monotonic()
                if now - last_refusal_log[0] > 1.0:
                    last_refusal_log[0] = now
                    logger.warning(
                        "refusing connections from %s: it holds %d (the per-peer limit)",
                        peer,
                        settings.max_connections_per_peer,
                    )
                self.handle_close()

        def del_channel(self, map: Any = None) -> None:
            super().del_channel(map)
            with lock:
                if self._peer is not None:
                    per_peer[self._peer] -= 1
                    if per_peer[self._peer] <= 0:
                        del per_peer[self._peer]
                    self._peer = None

        def received(self, data: bytes) -> bool:
            result = bool(super().received(data))
            if self.request is not self._partial:
                self._partial = self.request
                self._partial_since = time.monotonic()
            return result

        def service(self) -> None:
            # A release ends an enclave's exchange: close the connection after answering it
            # (with "Connection: close", as if the client had asked), so the next exchange
            # connects anew and lands on whichever worker is free. Kept-alive connections
            # otherwise stay with the worker that accepted them, however busy it is.
            request = self.requests[0] if self.requests else None
            if request is not None and not request.error and request.path == RELEASE_PATH:
                request.headers["CONNECTION"] = "close"
            super().service()

        def _expired(self, now: float) -> str | None:
            partial = self._partial
            if partial is not None:
                since = now - self._partial_since
                if not partial.headers_finished and since > settings.header_timeout:
                    return f"its request head did not arrive within {settings.header_timeout:g} s"
                if since > settings.request_timeout:
                    return f"its request did not arrive within {settings.request_timeout:g} s"
            elif (
                not self.requests
                and not self.total_outbufs_len
                and time.time() - self.last_activity > settings.keepalive_timeout
            ):
                return f"idle for {settings.keepalive_timeout:g} s between requests"
            return None

        def readable(self) -> bool:
            # Asked of every connection at every turn of the server loop: look at the clocks
            # a few times a second, not at every turn (it showed in profiles under load).
            now = time.monotonic()
            if now >= self._next_check and not self.will_close:
                self._next_check = now + DEADLINE_CHECK_INTERVAL
                reason = self._expired(now)
                if reason is not None:
                    logger.info("closing a connection from %s: %s", self.addr, reason)
                    self.will_close = True
            return bool(super().readable())

    return DeadlineChannel


def _answers(path: str) -> bool:
    """True if a process accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:  # refused: nobody listens; any other error: bind will tell
            return False
    return True


def listen(settings: ServerSettings) -> socket.socket:
    """The listening socket, bound before any worker starts (all of them accept on it)."""
    if settings.unix_socket:
        path = settings.unix_socket
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                if _answers(path):  # a running KMS's: taking its path would orphan it
                    raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), path)
                os.unlink(path)  # a socket left by a KMS that did not stop cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
    else:
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
    sock.listen(settings.backlog)
    sock.set_inheritable(False)
    return sock


def create_server(app: KmsApp, settings: ServerSettings, sock: socket.socket | None = None) -> Any:
    """A waitress server on ``sock`` (or a new one bound for ``settings``); ``.run()`` serves."""
    from waitress.server import BaseWSGIServer
    from waitress.server import create_server as waitress_server

    options: dict[str, Any] = {
        "threads": settings.threads,
        "max_request_body_size": settings.max_body,
        "max_request_header_size": 16 * 1024,
        "channel_timeout": settings.channel_timeout,
        # How often idle connections are looked for (waitress's default is every 30 s).
        "cleanup_interval": 1,
        # poll(2), not select(2): no FD_SETSIZE ceiling under a connection flood.
        "asyncore_use_poll": True,
        "connection_limit": settings.connection_limit,
        "backlog": settings.backlog,
        "ident": "mock-kms",
        "clear_untrusted_proxy_headers": True,
        "sockets": [sock if sock is not None else listen(settings)],
    }
    socket_map: dict[int, Any] = {}
    server = waitress_server(app, map=socket_map, **options)
    # waitress takes no connection class as an option: set it on each listening socket.
    channel = deadline_channel(settings)
    for dispatcher in socket_map.values():
        if isinstance(dispatcher, BaseWSGIServer):
            dispatcher.channel_class = channel
    return server
