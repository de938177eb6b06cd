"""The KMS over HTTP: a WSGI application and the server settings.

    >>> from mock_kms.server import KmsApp, ServerSettings, create_server  # doctest: +SKIP
    >>> settings = ServerSettings(host="127.0.0.1", port=8420)              # doctest: +SKIP
    >>> create_server(KmsApp(service), settings).run()  # until .stop()      # doctest: +SKIP

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

:mod:`mock_kms.httpd` serves it: one event loop per worker process that runs each whole
request where it arrived, bounds the request head and body, caps open connections in all and
per peer address, and closes connections on four clocks, so a client that trickles a byte now
and then, or keeps an idle connection alive, cannot keep a slot. Several workers
(:mod:`mock_kms.workers`) accept on one listening socket made by :func:`listen`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from keyutil.protocol import json_nesting
from mock_kms.config import LIMITS
from mock_kms.errors import ErrorCode, InvalidError, KmsError, UnavailableError
from mock_kms.httpd import REASONS, HttpServer, peer_of
from mock_kms.service import ReleaseService, Timings, describe_document

logger = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
Environ = dict[str, Any]

RELEASE_PATH = "/v1/release"
__all__ = ["HttpServer", "KmsApp", "ServerSettings", "create_server", "listen", "peer_of"]

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8420
    unix_socket: str | None = None
    # Requests one worker runs at once: 1 runs each in the worker's event loop; more hands
    # whole requests to that many threads (for a chain node or replay store slow to answer).
    threads: int = 1
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
    return f"{status} {REASONS.get(status, 'Error')}"


def http_status(error: KmsError) -> int:
    if isinstance(error, UnavailableError):
        return 503
    # A malformed application name or id (GET /v1/recipient's app) is a malformed
    # parameter, not a denial.
    if error.code in (
        ErrorCode.BAD_REQUEST, ErrorCode.INPUT_ENCODING, ErrorCode.APPLICATION_INVALID
    ):
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


def create_server(
    app: KmsApp, settings: ServerSettings, sock: socket.socket | None = None, *,
    multiprocess: bool = False,
) -> HttpServer:
    """The server on ``sock`` (or a new one bound for ``settings``); ``.run()`` serves until
    ``.stop()``. A release closes its connection once answered: it ends an enclave's
    exchange, and the next exchange then connects to whichever worker is free."""
    return HttpServer(
        app,
        settings,
        sock if sock is not None else listen(settings),
        close_after=(RELEASE_PATH,),
        multiprocess=multiprocess,
    )
