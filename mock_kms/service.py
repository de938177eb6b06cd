"""The release decision: challenge nonces, request checks, allowlist, derivation, sealing.

    >>> from mock_kms.service import ReleaseService                 # doctest: +SKIP
    >>> service = ReleaseService(verifier=..., allowlist=..., state=...)   # doctest: +SKIP
    >>> challenge = service.challenge()                               # doctest: +SKIP
    >>> outcome = service.release(request_json)                       # doctest: +SKIP

No HTTP here: :mod:`mock_kms.server` turns requests into calls and errors into status codes.
The order of checks, each with its own error code, is:

1. the request's form (version, suite, key list, attestation size);
2. the attestation document (:class:`~mock_kms.verifier.AttestationVerifier`: signature,
   chain, age, debug);
3. the nonce inside it: issued by this KMS (any replica sharing the root secret), not
   expired;
4. the binding: ``user_data`` must be the digest of exactly this request;
5. the attested public key, which must be a key of the requested suite;
   then the nonce is spent: not seen before by any worker or replica sharing the replay
   store (a request it does not authorize, refused above, leaves it unspent);
6. the allowlist on chain, which gives the application id (unreachable chain: 503);
7. derive each key, seal it to the attested key, sign the answer.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from keyutil import keytypes, protocol
from keyutil.protocol import KeyRequest, ProtocolError
from mock_kms.allowlist import Allowlist, require_allowed
from mock_kms.chain import format_application
from mock_kms.config import LIMITS
from mock_kms.errors import ErrorCode, InvalidError, KmsError, UnavailableError
from mock_kms.provenance import ProvenanceIssuer, has_statement
from mock_kms.replay import MemoryReplayStore, ReplayStore, Verdict
from mock_kms.state import KmsState
from mock_kms.verifier import AttestationVerifier, VerifiedAttestation

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# How long a readiness answer (ready, or why not) is reused: see ReleaseService.ready.
READY_CACHE_S = 1.0

NONCE_VERSION = 1
# version (1) || issued at, ms (8) || random (16) || HMAC-SHA256 truncated (16)
NONCE_LENGTH = 1 + 8 + 16 + 16


@dataclasses.dataclass(frozen=True)
class ReleaseSettings:
    """Time limits of the protocol (defaults in docs/protocol.md)."""

    nonce_lifetime: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.nonce_lifetime <= 600:
            raise ValueError("the nonce lifetime is between 0 and 600 seconds")


class NonceBook:
    """Issues challenge nonces and accepts each once.

    A nonce is self-authenticating: a MAC (keyed from the root secret) over its issue time and
    randomness, so any replica with the same state directory can check it without shared
    storage. Single use is the replay store's (:mod:`mock_kms.replay`): shared by every
    worker and restart (SQLite) or every replica (Redis), it remembers a used nonce until the
    nonce's own expiry, and a clock step back cannot revive one.
    """

    def __init__(
        self,
        key: bytes,
        settings: ReleaseSettings,
        clock: Clock = time.time,
        store: ReplayStore | None = None,
    ) -> None:
        # Keyed once and copied for each nonce: a new HMAC (hmac.new or hmac.digest) looks
        # its algorithm up in OpenSSL every time, about 10 us of a release in a busy process.
        self._keyed_mac = hmac.new(key, digestmod=hashlib.sha256)
        self._settings = settings
        self._clock = clock
        self.store = store if store is not None else MemoryReplayStore()

    def _mac(self, body: bytes) -> bytes:
        mac = self._keyed_mac.copy()
        mac.update(body)
        return mac.digest()[:16]

    def issue(self) -> tuple[bytes, int]:
        now_ms = int(self._clock() * 1000)
        body = struct.pack(">BQ", NONCE_VERSION, now_ms) + secrets.token_bytes(16)
        expires_ms = now_ms + int(self._settings.nonce_lifetime * 1000)
        return body + self._mac(body), expires_ms

    def accept(self, nonce: bytes | None) -> None:
        """Accept ``nonce`` once, or raise InvalidError with the reason (UnavailableError if
        the replay store cannot answer): :meth:`check`, then :meth:`spend`."""
        self.spend(nonce, self.check(nonce))

    def check(self, nonce: bytes | None) -> int:
        """The expiry (ms) of ``nonce`` if this KMS issued it and it has not expired; or
        InvalidError. Spends nothing: a request is checked in full before its nonce is
        spent, so that a request the nonce does not authorize cannot use it up."""
        if nonce is None:
            raise InvalidError(
                ErrorCode.NONCE_MISSING,
                "attestation nonce: expected the challenge from /v1/challenge; found null",
            )
        if len(nonce) != NONCE_LENGTH or nonce[0] != NONCE_VERSION:
            raise InvalidError(
                ErrorCode.NONCE_INVALID,
                f"attestation nonce: expected a {NONCE_LENGTH}-byte challenge of this KMS; "
                f"found {len(nonce)} bytes",
            )
        body, mac = nonce[:-16], nonce[-16:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise InvalidError(
                ErrorCode.NONCE_INVALID,
                "attestation nonce: not issued by this KMS (its MAC does not verify)",
            )
        issued_ms: int = struct.unpack(">Q", body[1:9])[0]
        issued = issued_ms / 1000
        now = self._clock()
        expires_ms = issued_ms + int(self._settings.nonce_lifetime * 1000)
        if now * 1000 > expires_ms:
            raise InvalidError(
                ErrorCode.NONCE_EXPIRED,
                f"attestation nonce: expected a challenge at most "
                f"{self._settings.nonce_lifetime:g} s old; found one {now - issued:.1f} s old",
            )
        if issued > now + LIMITS.clock_skew.total_seconds():
            raise InvalidError(ErrorCode.NONCE_INVALID, "attestation nonce: issued in the future")
        return expires_ms

    def spend(self, nonce: bytes | None, expires_ms: int) -> None:
        """Claim a nonce that passed :meth:`check` in the replay store: once, or raise."""
        assert nonce is not None
        now = self._clock()
        verdict = self.store.claim(nonce, expires_ms=expires_ms, now_ms=int(now * 1000))
        if verdict is Verdict.EXPIRED:
            raise InvalidError(
                ErrorCode.NONCE_EXPIRED,
                f"attestation nonce: expected a challenge at most "
                f"{self._settings.nonce_lifetime:g} s old; the replay store's time is past "
                "its expiry",
            )
        if verdict is Verdict.REPLAYED:
            raise InvalidError(
                ErrorCode.NONCE_REPLAYED,
                "attestation nonce: this challenge was already used; ask for a new one",
            )


@dataclasses.dataclass(frozen=True)
class ReleaseRequest:
    suite: str
    keys: tuple[KeyRequest, ...]
    attestation: bytes

    @classmethod
    def from_json(cls, body: Any) -> ReleaseRequest:
        try:
            if not isinstance(body, Mapping):
                raise ProtocolError("bad_request", "expected a JSON object")
            version = body.get("version")
            # JSON true and 1.0 compare equal to 1 in Python; the protocol's version is an integer.
            if type(version) is not int or version != protocol.PROTOCOL_VERSION:
                shown = (
                    json.dumps(version)[:20]
                    if version is None or isinstance(version, bool | int | float | str)
                    else f"a JSON {type(version).__name__}"
                )
                raise ProtocolError(
                    "bad_request",
                    f"version: expected the integer {protocol.PROTOCOL_VERSION}; found {shown}",
                )
            suite = body.get("suite")
            if suite not in protocol.SUITES:
                raise ProtocolError(
                    "bad_request",
                    f"suite: expected one of {', '.join(protocol.SUITES)}; "
                    f"found {protocol.echo(suite)}",
                )
            raw_keys = body.get("keys")
            if not isinstance(raw_keys, list):
                raise ProtocolError("bad_request", "keys: expected a list of {name, length}")
            keys = []
            for item in raw_keys[: protocol.MAX_KEYS + 1]:
                if not isinstance(item, Mapping):
                    raise ProtocolError("bad_request", "keys: expected objects {name, length}")
                keys.append(
                    KeyRequest(
                        item.get("name"),  # type: ignore[arg-type]
                        item.get("length"),  # type: ignore[arg-type]
                        item.get("type", keytypes.DEFAULT_TYPE),
                    )
                )
            attestation = protocol.b64d(
                body.get("attestation"),
                "attestation",
                max_len=4 * LIMITS.max_document_size // 3 + 4,
            )
            return cls(suite=suite, keys=protocol.check_key_list(keys), attestation=attestation)
        except ProtocolError as e:
            raise InvalidError(ErrorCode.BAD_REQUEST, e.message) from None


@dataclasses.dataclass(frozen=True)
class ReleaseOutcome:
    """A signed answer, and what the audit log records about it (never key material)."""

    answer: dict[str, Any]
    verified: VerifiedAttestation
    application: bytes
    key_names: tuple[str, ...]


@dataclasses.dataclass
class Timings:
    """Seconds spent in each step of the last release (for the latency histograms)."""

    verification: float = 0.0
    chain_read: float = 0.0
    # The document once it verified: a later refusal's audit line names it as verified.
    verified: VerifiedAttestation | None = None


@dataclasses.dataclass
class _PendingRecord:
    line: bytes
    done: bool = False
    error: OSError | None = None


def audit_line(entry: Mapping[str, Any], limit: int = LIMITS.max_audit_line) -> bytes:
    """``entry`` as one JSON line of at most ``limit`` bytes (control characters escaped):
    too long, it loses its message, then every field but the decision and those of fixed
    size (when, which image and application), and says so."""
    # Fields no request can make long: escaped names (keys, module ids) can be (a character
    # outside the BMP is written as 12 bytes); the time of the decision must never go.
    essential = ("ts", "time", "outcome", "code", "os_image_hash", "application", "debug")
    for attempt in (
        entry,
        {**entry, "message": protocol.echo(entry.get("message"), 256), "truncated": True},
        {**{k: entry[k] for k in essential if k in entry}, "truncated": True},
    ):
        line = (json.dumps(attempt, sort_keys=True, separators=(",", ":")) + "\n").encode()
        if len(line) <= limit:
            return line
    raise ValueError("an audit line without its details is still over the limit")


class AuditLog:
    """One JSON line per decision, durable before the decision is answered; never key material.

    A release that cannot be recorded is refused: :meth:`record` raises UnavailableError
    (``audit_unavailable``) when the line cannot be written and fsynced: disk full, a
    read-only file system, an I/O error.

    Group commit: the fsync is what costs, and one at a time it would serialize every
    release behind the disk. A thread that finds no write in progress becomes the writer: it
    takes every line queued so far (its own included), writes them with one ``write``, fsyncs
    once, and hands each waiting thread its outcome. Lines that arrive meanwhile queue for the
    next batch. :meth:`record` returns only once its own line is durable, and raises if that
    batch failed: every release in it is refused.

    Every batch opens the file (``O_APPEND``), locks it (``flock``: several workers or KMS
    processes may append to one file), writes, fsyncs and closes it. Keeping no
    descriptor open between batches means that a file system can be remounted read-only while
    the KMS runs (Linux refuses to while a file on it is open for writing) and that a rotated
    log (renamed away) is followed by a new file at ``path``. Lines stay whole:

    - a write that fails part way (a full disk takes what fits) is cut off again with
      ``ftruncate`` to the length the file had when this batch took the lock (no other
      writer can have appended since), so a refused batch leaves nothing behind;
    - a file that does not end in a newline (the machine crashed in the middle of a line, or
      a truncation failed) gets one before the next record, and the KMS logs that it did, so
      the torn line stays one unparsable line and every later record is a whole line.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._cond = threading.Condition(threading.Lock())
        self._queue: list[_PendingRecord] = []
        self._writing = False
        if path is not None:
            # At start: fail now if the file cannot be opened, and end a torn last line.
            fd = self._open(path)
            try:
                # Under the writers' lock: a torn tail seen without it may be another
                # process's batch still being written.
                fcntl.flock(fd, fcntl.LOCK_EX)
                if self._torn(fd):
                    os.write(fd, b"\n")
                    os.fsync(fd)
            finally:
                os.close(fd)

    @staticmethod
    def _open(path: Path) -> int:
        # Never through a symlink: whoever planted one would choose what the KMS appends to.
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                e.strerror = f"{path} is a symbolic link; give the real path"
            raise

    def _torn(self, fd: int) -> bool:
        """True (and logged) if the file's last byte is not a newline."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return False
        logger.warning(
            "audit log %s: the last line is incomplete (a crash while it was written); "
            "it is ended with a newline so that new records start on a line of their own",
            self.path,
        )
        return True

    def record(self, entry: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        pending = _PendingRecord(audit_line(entry))
        with self._cond:
            self._queue.append(pending)
            while not pending.done:
                if self._writing:
                    self._cond.wait()
                else:
                    self._write_queue(self.path)
        if pending.error is not None:
            raise UnavailableError(
                ErrorCode.AUDIT_UNAVAILABLE,
                f"the audit log cannot be written ({pending.error.strerror or pending.error}); "
                "releases are refused",
            )

    def _write_queue(self, path: Path) -> None:
        """Write and fsync every queued line as one batch; called and returns with the lock
        held, which it drops while it writes."""
        batch, self._queue = self._queue, []
        self._writing = True
        error: OSError | None = OSError(errno.EIO, "the audit writer failed")
        self._cond.release()
        try:
            self._append(path, b"".join(p.line for p in batch))
            error = None
        except OSError as e:
            error = e
        finally:
            self._cond.acquire()
            self._writing = False
            for p in batch:
                p.error, p.done = error, True
            self._cond.notify_all()

    def _append(self, path: Path, data: bytes) -> None:
        fd = self._open(path)
        try:
            # Other processes (workers, a second KMS) append to the same file: the lock makes
            # "measure, write, take back" one step, so the length measured here is still the
            # file's when a failed write is cut back to it.
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if self._torn(fd):
                data = b"\n" + data
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # took what fitted
                os.fsync(fd)
            except OSError:
                # Take back whatever part of the batch got in: a refused record leaves nothing.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


class ReleaseService:
    """Challenge and release, with every dependency injected; no HTTP, no clock reads
    other than through ``clock``."""

    def __init__(
        self,
        *,
        verifier: AttestationVerifier,
        allowlist: Allowlist,
        state: KmsState,
        settings: ReleaseSettings | None = None,
        audit: AuditLog | None = None,
        clock: Clock = time.time,
        debug_application: bytes | None = None,
        provenance: ProvenanceIssuer | None = None,
        replay_store: ReplayStore | None = None,
    ) -> None:
        self.verifier = verifier
        self.allowlist = allowlist
        self.state = state
        self.settings = settings or ReleaseSettings()
        self.audit = audit or AuditLog(None)
        # serve --allow-debug: debug-mode enclaves (any image: their PCRs are all zero) get
        # this application's keys from the debug derivation domain. None: refused.
        self.debug_application = debug_application
        self.clock = clock
        # Issues the provenance statement of each typed key (None: releases carry none).
        self.provenance = provenance
        self.nonces = NonceBook(state.nonce_key, self.settings, clock, replay_store)
        self._ready_lock = threading.Lock()
        self._ready_at = float("-inf")
        self._ready_error: KmsError | None = None

    def challenge(self) -> dict[str, Any]:
        nonce, expires_ms = self.nonces.issue()
        return {"nonce": protocol.b64e(nonce), "expires_at_ms": expires_ms}

    def ready(self) -> dict[str, Any]:
        """Readiness: secrets loaded (by construction), the chain and the replay store
        answering.

        The answer (ready or the error) is kept ``READY_CACHE_S`` and found by one caller at
        a time: ``/v1/health`` and ``/metrics`` are public, and each check is RPC calls to
        the chain (chain id, contract code) and a store round trip, so a client asking in a
        loop made the KMS spend the RPC provider's quota, and during an outage hold a worker
        thread per request for up to the RPC timeout."""
        with self._ready_lock:
            if time.monotonic() - self._ready_at >= READY_CACHE_S:
                try:
                    self.allowlist.check_ready()
                    self.nonces.store.check_ready()
                    self._ready_error = None
                except KmsError as e:
                    self._ready_error = e
                self._ready_at = time.monotonic()
            error = self._ready_error
        if error is not None:
            # A new exception each time: one object raised again and again from many
            # threads would collect every raise's traceback.
            raise type(error)(error.code, error.message)
        return {"status": "ready", "identity": self.state.identity_text}

    def release(self, body: Any, timings: Timings | None = None) -> ReleaseOutcome:
        timings = timings if timings is not None else Timings()
        request = ReleaseRequest.from_json(body)
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)

        started = time.perf_counter()
        try:
            verified = self.verifier.verify(request.attestation, at=now)
        finally:
            timings.verification = time.perf_counter() - started
        timings.verified = verified
        document = verified.document
        # The nonce is checked here but spent only once the request is known to be the one
        # it authorizes (binding, public key): whoever copies an enclave's document into a
        # request of their own cannot use up the enclave's nonce.
        expires_ms = self.nonces.check(document.nonce)
        assert document.nonce is not None
        binding = protocol.request_binding(request.keys, request.suite, document.nonce)
        if document.user_data is None or not hmac.compare_digest(document.user_data, binding):
            raise InvalidError(
                ErrorCode.BINDING_MISMATCH,
                "attestation user_data: expected the digest binding this request (keys, suite, "
                "nonce); found a different value",
            )
        if document.public_key is None:
            raise InvalidError(
                ErrorCode.PUBLIC_KEY_INVALID,
                "attestation public_key: expected the enclave's HPKE public key; found null",
            )
        try:
            recipient = protocol.load_recipient_public(request.suite, document.public_key)
        except ProtocolError as e:
            raise InvalidError(ErrorCode.PUBLIC_KEY_INVALID, e.message) from None
        self.nonces.spend(document.nonce, expires_ms)

        started = time.perf_counter()
        try:
            if verified.debug and self.debug_application is not None:
                application = self.debug_application
            else:
                application = require_allowed(
                    self.allowlist, bytes.fromhex(verified.os_image_hash[2:])
                )
        finally:
            timings.chain_read = time.perf_counter() - started
        if verified.debug:
            logger.warning(
                "UNSAFE: releasing debug-domain keys of application 0x%s to a debug-mode "
                "enclave (%s)",
                application.hex(),
                protocol.echo(document.module_id),
            )

        sealed = []
        for key in request.keys:
            secret = self.state.derive_key(
                application, key, domain="debug" if verified.debug else "production"
            )
            try:
                sealed_key = protocol.seal(request.suite, recipient, key, document.nonce, secret)
            except ValueError:
                # HPKE's own check of the shared secret (RFC 9180): the key of small order
                # that load_recipient_public's table refuses first, should one get past it.
                raise InvalidError(
                    ErrorCode.PUBLIC_KEY_INVALID,
                    f"attested public_key is not a {request.suite} key: a low-order point, "
                    "which gives no shared secret",
                ) from None
            finally:
                del secret
            sealed.append({**key.to_json(), "sealed": protocol.b64e(sealed_key)})
            # A statement certifies a production key; a debug-domain key gets none (issued,
            # it would name the production public key, which the enclave did not get).
            if self.provenance is not None and has_statement(key) and not verified.debug:
                sealed[-1]["provenance"] = self.provenance.issue(application, key)
        body_out = {
            "version": protocol.PROTOCOL_VERSION,
            "suite": request.suite,
            "application": "0x" + application.hex(),
            "os_image_hash": verified.os_image_hash,
            "nonce": protocol.b64e(document.nonce),
            "binding": binding.hex(),
            "keys": sealed,
        }
        if verified.debug:
            body_out["debug"] = True  # signed: the client learns its keys are debug keys
        return ReleaseOutcome(
            answer=protocol.sign_answer(self.state.identity, body_out),
            verified=verified,
            application=application,
            key_names=tuple(k.name for k in request.keys),
        )

    def audit_entry(
        self,
        *,
        outcome: str,
        code: str | None,
        result: ReleaseOutcome | None = None,
        body: Any = None,
        error: KmsError | None = None,
        verified: VerifiedAttestation | None = None,
    ) -> dict[str, Any]:
        """The audit line for one decision: who, what image, which keys, never key bytes.

        A refusal names the document's module id and image hash as verified only when the
        document verified (``verified``); otherwise :func:`describe_document` may add what it
        claims, under ``claimed``. Every value from the request is cut and escaped by
        :func:`keyutil.protocol.echo`."""
        entry: dict[str, Any] = {
            # Epoch seconds under "ts", as in every log of keyutil, the proxy and the KMS.
            "ts": round(self.clock(), 3),
            "outcome": outcome,
            "code": code,
        }
        if result is not None:
            entry.update(
                module_id=protocol.echo(result.verified.module_id, quoted=False),
                os_image_hash=result.verified.os_image_hash,
                application=format_application(result.application),
                keys=list(result.key_names),
                debug=result.verified.debug,
            )
        elif isinstance(body, Mapping) and isinstance(body.get("keys"), list):
            entry["keys"] = [
                protocol.echo(k.get("name"), quoted=False)
                for k in body["keys"][:16]
                if isinstance(k, Mapping)
            ]
        if verified is not None and result is None:
            entry.update(
                module_id=protocol.echo(verified.module_id, quoted=False),
                os_image_hash=verified.os_image_hash,
                debug=verified.debug,
            )
        if error is not None:
            entry["message"] = error.message
        return entry


def describe_document(attestation_b64: Any) -> dict[str, Any]:
    """What a document that did not verify claims to be (module_id, OS_IMAGE_HASH), under
    ``claimed``: nobody vouches for it, so it is never shown as the enclave's identity."""
    from mock_kms.attestation import parse_attestation

    try:
        doc = parse_attestation(base64.b64decode(str(attestation_b64)[:65536], validate=True))
    except (KmsError, ValueError):
        return {}
    return {
        "claimed": {
            "module_id": protocol.echo(doc.module_id, quoted=False),
            "os_image_hash": doc.os_image_hash,
        }
    }
