"""The release flow: health, challenge, attestation, release, then checking and opening the answer.

    >>> from keyutil.client import ReleaseRequest, release_keys
    >>> from keyutil.nsm import open_nsm
    >>> from keyutil.transport import HttpTransport
    >>> request = ReleaseRequest.build(["disk"], identity="ed25519:" + "A" * 43 + "=")
    >>> [k.name for k in request.keys], request.suite
    (['disk'], 'x25519-hkdf-sha256-aes-256-gcm')
    >>> released = release_keys(                                   # doctest: +SKIP
    ...     HttpTransport.from_url("vsock://3:8000"), open_nsm("device"), request, deadline_s=60
    ... )

One attempt is: ``GET /v1/health`` (ready?), ``POST /v1/challenge``, a fresh HPKE key pair,
an attestation document binding nonce, public key and request, ``POST /v1/release``, and
:func:`check_answer` then :func:`open_keys`. An attempt that finds the KMS unavailable (503,
no connection, a timeout, a garbled response) is repeated from the start, with a new
challenge and a new document, after an exponential, jittered pause, until the overall
deadline; a denial (HTTP 4xx) is final; so is an answer that fails any check.

The deciding parts (:func:`classify`, :func:`parse_challenge`, :func:`check_answer`,
:func:`open_keys`, :func:`backoff_delay`) do no I/O; the transport, the NSM, the clock, the
sleep and the random source are passed in. Nothing here logs or raises key material.
"""

from __future__ import annotations

import dataclasses
import hmac
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from keyutil import keytypes, protocol
from keyutil.nsm import NSM, NSM_FIELD_MAX
from keyutil.protocol import KeyRequest, ProtocolError
from keyutil.transport import HttpResponse, Transport, TransportError

DEFAULT_KEY_NAME = "default"
DEFAULT_KEY_LENGTH = 32
HEX_32 = re.compile(r"\A0x[0-9a-fA-F]{64}\Z")
MAX_SEALED_B64 = 4096  # HPKE enc (at most 97 bytes) + a 64-byte key + tag, in base64
MAX_MESSAGE = 300
# Unavailable, yet no retry can help: the peer does not speak TLS or fails its checks.
NOT_RETRIED = frozenset({"tls_failed"})

Log = Callable[[str, str, Mapping[str, Any]], None]
"""``log(level, event, fields)``; level is debug, info, warning or error."""

T = TypeVar("T")


def _no_log(level: str, event: str, fields: Mapping[str, Any]) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long one request may take, and how the pause between attempts grows."""

    request_timeout: float = 10.0  # one HTTP request, capped further by the time left
    initial_delay: float = 0.2
    max_delay: float = 5.0
    min_attempt_time: float = 0.05  # no new attempt with less than this left


# -- Errors: three outcomes besides success, each with a stable code -----------------------


class ReleaseError(Exception):
    """The release did not happen. ``code`` is stable; ``message`` holds no secrets."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class KmsUnavailable(ReleaseError):
    """The KMS could not be asked, or said 503: retried until the deadline."""


class KmsDenied(ReleaseError):
    """The KMS refused (HTTP 4xx). ``code`` is the KMS's own code. Never retried."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(code, message)
        self.status = status


class AnswerRejected(ReleaseError):
    """The answer failed authentication or did not match the request. Never retried."""


# -- Values ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReleaseRequest:
    """Which keys, which HPKE suite, and the KMS identity the answer must be signed by.

    ``identity=None`` skips the signature check only (``--insecure-skip-kms-auth``); the
    nonce, binding and key-list checks still apply. ``expect_app`` (32 bytes, from
    ``--expect-app NAME|0xID``): an answer releasing another application's keys is refused.
    """

    keys: tuple[KeyRequest, ...]
    suite: str
    identity: ed25519.Ed25519PublicKey | None
    expect_app: bytes | None = None

    def __post_init__(self) -> None:
        protocol.check_key_list(self.keys)
        protocol.hpke_suite(self.suite)  # ProtocolError for an unknown suite

    @classmethod
    def build(
        cls,
        names: Iterable[str],
        *,
        lengths: Sequence[int] = (DEFAULT_KEY_LENGTH,),
        types: Sequence[str] = (keytypes.DEFAULT_TYPE,),
        suite: str = protocol.SUITE_X25519,
        identity: str | None,
        expect_app: str | None = None,
    ) -> ReleaseRequest:
        """From names, one length and one type for all or one per name, and
        ``ed25519:...`` (or None)."""
        names = list(names)
        lengths = _one_or_each(lengths, len(names), "key length")
        types = _one_or_each(types, len(names), "key type")
        keys = tuple(
            KeyRequest(n, ln, t) for n, ln, t in zip(names, lengths, types, strict=True)
        )
        pinned = protocol.parse_identity(identity) if identity is not None else None
        app = protocol.parse_application(expect_app) if expect_app is not None else None
        return cls(keys=keys, suite=suite, identity=pinned, expect_app=app)


_Item = TypeVar("_Item")


def _one_or_each(values: Sequence[_Item], count: int, what: str) -> list[_Item]:
    if len(values) == 1:
        return list(values) * count
    if len(values) != count:
        raise ProtocolError(
            "bad_request",
            f"expected one {what} for all keys or one per key; "
            f"found {len(values)} for {count} keys",
        )
    return list(values)


@dataclasses.dataclass(frozen=True)
class Challenge:
    nonce: bytes
    expires_at_ms: int


@dataclasses.dataclass(frozen=True)
class ReleasedKey:
    """One opened key. ``value`` is a bytearray so :meth:`wipe` can zero it after use."""

    name: str
    value: bytearray = dataclasses.field(repr=False)
    type: str = keytypes.DEFAULT_TYPE

    def private_file(self, fmt: str | None = None) -> ReleasedKey:
        """The key as its type writes it (``AGE-SECRET-KEY-1...`` for age), in ``fmt`` or the
        type's default format; a new ReleasedKey, to be wiped as well."""
        kind = keytypes.get(self.type)
        data = kind.private_file(bytes(self.value), fmt or kind.formats[0])
        return ReleasedKey(self.name, bytearray(data), self.type)

    def wipe(self) -> None:
        self.value[:] = bytes(len(self.value))


@dataclasses.dataclass(frozen=True)
class Release:
    """A successful release: the keys, and what the KMS said the enclave is (not secret)."""

    keys: tuple[ReleasedKey, ...]
    application: str
    os_image_hash: str
    attempts: int
    # One per key: the KMS's provenance statement of a typed key (checked), else None.
    statements: tuple[Any, ...] = ()
    debug: bool = False  # the KMS says (signed): debug-domain keys for a debug-mode enclave

    def wipe(self) -> None:
        for key in self.keys:
            key.wipe()


# -- Deciding, without I/O -----------------------------------------------------------------


def _clip(text: object) -> str:
    return str(text)[:MAX_MESSAGE]


def classify(response: HttpResponse, what: str) -> Any:
    """The JSON body of a 2xx response; KmsUnavailable for 5xx; KmsDenied for the rest."""
    body = response.json
    code = body.get("error") if isinstance(body, dict) else None
    message = body.get("message") if isinstance(body, dict) else None
    if 200 <= response.status < 300:
        if body is None:
            raise KmsUnavailable("bad_response", f"{what}: the KMS answered without JSON")
        return body
    code = _clip(code) if isinstance(code, str) and code else f"http_{response.status}"
    text = _clip(message) if isinstance(message, str) else f"HTTP {response.status}"
    if response.status >= 500:
        raise KmsUnavailable(code, f"{what}: {text}")
    raise KmsDenied(code, f"{what}: {text}", response.status)


def parse_health(body: Any) -> dict[str, Any]:
    """A ready health body, or KmsUnavailable saying what the KMS reported."""
    if not isinstance(body, dict) or body.get("status") != "ready":
        status = body.get("status") if isinstance(body, dict) else None
        raise KmsUnavailable("kms_not_ready", f"health: status {_clip(status)!r}, not 'ready'")
    return body


def parse_challenge(body: Any) -> Challenge:
    """The challenge's nonce; KmsUnavailable (retried) if the body is not a challenge."""
    try:
        if not isinstance(body, dict):
            raise ProtocolError("bad_response", "challenge: expected a JSON object")
        nonce = protocol.b64d(body.get("nonce"), "challenge nonce", max_len=2 * NSM_FIELD_MAX)
        expires = body.get("expires_at_ms")
        if not 0 < len(nonce) <= NSM_FIELD_MAX:
            raise ProtocolError(
                "bad_response", f"challenge nonce: expected 1 to {NSM_FIELD_MAX} bytes"
            )
        if type(expires) is not int:
            raise ProtocolError("bad_response", "challenge: expected integer expires_at_ms")
    except ProtocolError as e:
        raise KmsUnavailable("bad_response", e.message) from None
    return Challenge(nonce=nonce, expires_at_ms=expires)


def release_body(request: ReleaseRequest, attestation: bytes) -> dict[str, Any]:
    return {
        "version": protocol.PROTOCOL_VERSION,
        "suite": request.suite,
        "keys": [k.to_json() for k in request.keys],
        "attestation": protocol.b64e(attestation),
    }


def _reject(code: str, message: str) -> AnswerRejected:
    return AnswerRejected(code, f"the answer failed authentication: {message}")


def check_answer(
    answer: Any, *, request: ReleaseRequest, nonce: bytes, binding: bytes
) -> tuple[bytes, ...]:
    """The sealed keys of an answer that is the pinned KMS's, to this very request.

    Checks, in order: the signature (unless ``request.identity`` is None), version, suite,
    nonce, binding, the application and image hash fields, the application against
    ``request.expect_app``, and that the keys are exactly the ones asked for, in order.
    Unknown extra fields are tolerated: they are signed.
    """
    if not isinstance(answer, dict):
        raise _reject("answer_malformed", "expected a JSON object")
    if request.identity is not None:
        try:
            body = protocol.verify_answer(request.identity, answer)
        except ProtocolError as e:
            raise _reject(e.code, e.message) from None
    else:
        body = {k: v for k, v in answer.items() if k != "signature"}
    version = body.get("version")
    if type(version) is not int or version != protocol.PROTOCOL_VERSION:
        raise _reject(
            "answer_version", f"expected version {protocol.PROTOCOL_VERSION}; found {version!r:.20}"
        )
    if body.get("suite") != request.suite:
        raise _reject("answer_suite_mismatch", f"expected suite {request.suite}")
    try:
        answered_nonce = protocol.b64d(body.get("nonce"), "nonce", max_len=2 * NSM_FIELD_MAX)
    except ProtocolError:
        raise _reject("answer_malformed", "expected a base64 nonce") from None
    if not hmac.compare_digest(answered_nonce, nonce):
        raise _reject("answer_nonce_mismatch", "the answer is for another challenge")
    answered_binding = body.get("binding")
    if not isinstance(answered_binding, str) or not hmac.compare_digest(
        answered_binding.encode("utf-8", "surrogatepass"), binding.hex().encode()
    ):
        raise _reject("answer_binding_mismatch", "the answer is for another request")
    for field in ("application", "os_image_hash"):
        value = body.get(field)
        if not isinstance(value, str) or not HEX_32.match(value):
            raise _reject("answer_malformed", f"expected {field} as 0x and 64 hex digits")
    application = bytes.fromhex(body["application"][2:])
    if request.expect_app is not None and application != request.expect_app:
        raise _reject(
            "answer_application_mismatch",
            f"expected keys of application {protocol.format_application(request.expect_app)}; "
            f"the KMS released keys of {protocol.format_application(application)}",
        )
    keys = body.get("keys")
    if not isinstance(keys, list) or len(keys) != len(request.keys):
        raise _reject("answer_keys_mismatch", f"expected {len(request.keys)} keys")
    sealed: list[bytes] = []
    for asked, given in zip(request.keys, keys, strict=True):
        if (
            not isinstance(given, dict)
            or given.get("name") != asked.name
            or type(given.get("length")) is not int
            or given.get("length") != asked.length
            or given.get("type", keytypes.DEFAULT_TYPE) != asked.type
        ):
            raise _reject(
                "answer_keys_mismatch",
                f"expected key {asked.name!r} of type {asked.type}, {asked.length} bytes, "
                "at this position",
            )
        try:
            sealed.append(protocol.b64d(given.get("sealed"), "sealed", max_len=MAX_SEALED_B64))
        except ProtocolError:
            raise _reject("answer_malformed", f"key {asked.name!r}: expected base64") from None
    return tuple(sealed)


def open_keys(
    request: ReleaseRequest,
    recipient: protocol.RecipientPrivateKey,
    nonce: bytes,
    sealed: Sequence[bytes],
) -> tuple[ReleasedKey, ...]:
    """Open each sealed key; a key that does not open is an unauthenticated answer."""
    opened: list[ReleasedKey] = []
    try:
        for key, blob in zip(request.keys, sealed, strict=True):
            try:
                value = bytearray(protocol.open_sealed(request.suite, recipient, key, nonce, blob))
            except Exception:  # InvalidTag, ValueError: the library's reason is not ours to log
                raise _reject(
                    "answer_open_failed", f"key {key.name!r} does not open with our HPKE key"
                ) from None
            if len(value) != key.length:
                value[:] = bytes(len(value))
                raise _reject(
                    "answer_keys_mismatch", f"key {key.name!r} opened to the wrong length"
                )
            opened.append(ReleasedKey(key.name, value, key.type))
    except AnswerRejected:
        for done in opened:
            done.wipe()
        raise
    return tuple(opened)


def check_statements(
    request: ReleaseRequest, keys: Sequence[ReleasedKey], answer: Mapping[str, Any]
) -> tuple[Any, ...]:
    """The provenance statement of each typed key (None where the answer has none), each
    checked against what the enclave knows: signed by the pinned KMS identity (when one is
    pinned), for the answer's application, this key's name and type, and the public half of
    the key just opened. (The secp256k1 signer's EIP-712 signature is for contracts and
    ``verify-provenance``: checking it needs keccak, which the enclave does not carry.)"""
    from keyutil import provenance

    out: list[provenance.ProvenanceStatement | None] = []
    for key, given in zip(keys, answer["keys"], strict=True):
        raw = given.get("provenance") if isinstance(given, dict) else None
        if raw is None or key.type == keytypes.DEFAULT_TYPE:
            out.append(None)
            continue
        try:
            statement = provenance.parse_statement(raw)
            if request.identity is not None:
                provenance.check_identity(statement, request.identity)
        except ProtocolError as e:
            raise _reject("answer_provenance_invalid", f"key {key.name!r}: {e.message}") from None
        public = keytypes.get(key.type).public(bytes(key.value))
        if (
            "0x" + statement.application.hex() != answer["application"]
            or (statement.name, statement.key_type) != (key.name, key.type)
            or statement.public_key != public
        ):
            raise _reject(
                "answer_provenance_invalid",
                f"key {key.name!r}: the statement is not about this application and key",
            )
        out.append(statement)
    return tuple(out)


def backoff_delay(attempt: int, policy: RetryPolicy, rand: Callable[[], float]) -> float:
    """The pause after failed attempt ``attempt`` (1-based): exponential, half of it jittered."""
    ceiling = min(policy.max_delay, policy.initial_delay * 2 ** min(attempt - 1, 30))
    return float(ceiling / 2 + rand() * ceiling / 2)


# -- Doing: one attempt, and the retry loop --------------------------------------------------


class _Clock:
    def __init__(self, clock: Callable[[], float], deadline_s: float) -> None:
        self._clock = clock
        self.end = clock() + deadline_s

    def left(self) -> float:
        return self.end - self._clock()


def _call(
    transport: Transport,
    method: str,
    path: str,
    body: Mapping[str, Any] | None,
    *,
    clock: _Clock,
    policy: RetryPolicy,
) -> Any:
    timeout = min(policy.request_timeout, clock.left())
    if timeout <= 0:
        raise KmsUnavailable("timeout", f"{method} {path}: no time left")
    try:
        response = transport.request(method, path, body, timeout=timeout)
    except TransportError as e:
        raise KmsUnavailable(e.code, e.message) from None
    return classify(response, f"{method} {path}")


def _retrying(
    attempt: Callable[[int], T],
    *,
    deadline: _Clock,
    deadline_s: float,
    sleep: Callable[[float], None],
    rand: Callable[[], float],
    log: Log,
    policy: RetryPolicy,
) -> T:
    """Call ``attempt(n)`` until it returns, raises other than KmsUnavailable, or time is up."""
    n = 0
    while True:
        n += 1
        try:
            return attempt(n)
        except KmsUnavailable as e:
            if e.code in NOT_RETRIED:
                raise
            last = e
        left = deadline.left()
        if left < policy.min_attempt_time:
            raise KmsUnavailable(
                last.code,
                f"KMS unavailable for {max(0.0, deadline_s):.3g} s ({n} attempts); "
                f"last: {last.message}",
            ) from None
        delay = min(backoff_delay(n, policy, rand), left - policy.min_attempt_time)
        log(
            "warning",
            "kms_unavailable",
            {
                "code": last.code,
                "message": last.message,
                "attempt": n,
                "retry_in_s": round(delay, 2),
            },
        )
        sleep(delay)


def wait_ready(
    transport: Transport,
    *,
    deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
    log: Log = _no_log,
    policy: RetryPolicy = RetryPolicy(),
) -> dict[str, Any]:
    """Poll ``/v1/health`` until the KMS is ready (its body) or the deadline (KmsUnavailable)."""
    deadline = _Clock(clock, deadline_s)

    def attempt(n: int) -> dict[str, Any]:
        log("debug", "health_check", {"attempt": n})
        return parse_health(
            _call(transport, "GET", "/v1/health", None, clock=deadline, policy=policy)
        )

    return _retrying(
        attempt,
        deadline=deadline,
        deadline_s=deadline_s,
        sleep=sleep,
        rand=rand,
        log=log,
        policy=policy,
    )


def exchange(
    transport: Transport,
    nsm: NSM,
    request: ReleaseRequest,
    *,
    clock: Callable[[], float] = time.monotonic,
    time_left_s: float,
    policy: RetryPolicy = RetryPolicy(),
    attempt: int = 1,
    check_health: bool = True,
) -> Release:
    """One attempt of the whole exchange, from the health check to the opened keys.

    ``check_health=False`` starts at the challenge: for callers that must see how
    ``/v1/release`` itself answers (a KMS that turns unhealthy answers 503 there too).
    """
    deadline = _Clock(clock, time_left_s)
    if check_health:
        parse_health(_call(transport, "GET", "/v1/health", None, clock=deadline, policy=policy))
    challenge = parse_challenge(
        _call(transport, "POST", "/v1/challenge", None, clock=deadline, policy=policy)
    )
    recipient = protocol.generate_recipient(request.suite)
    binding = protocol.request_binding(request.keys, request.suite, challenge.nonce)
    document = nsm.attestation(
        user_data=binding,
        nonce=challenge.nonce,
        public_key=protocol.recipient_public_bytes(recipient),
    )
    answer = _call(
        transport,
        "POST",
        "/v1/release",
        release_body(request, document),
        clock=deadline,
        policy=policy,
    )
    sealed = check_answer(answer, request=request, nonce=challenge.nonce, binding=binding)
    keys = open_keys(request, recipient, challenge.nonce, sealed)
    try:
        statements = check_statements(request, keys, answer)
    except AnswerRejected:
        for key in keys:
            key.wipe()
        raise
    return Release(
        keys=keys,
        application=str(answer["application"]),
        os_image_hash=str(answer["os_image_hash"]),
        attempts=attempt,
        statements=statements,
        debug=answer.get("debug") is True,
    )


def release_keys(
    transport: Transport,
    nsm: NSM,
    request: ReleaseRequest,
    *,
    deadline_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rand: Callable[[], float] = random.random,
    log: Log = _no_log,
    policy: RetryPolicy = RetryPolicy(),
) -> Release:
    """The keys of ``request``, released by the KMS behind ``transport`` within the deadline.

    Raises KmsUnavailable (deadline passed), KmsDenied (4xx, not retried), AnswerRejected
    (not retried) or :class:`keyutil.nsm.NsmError` (not retried).
    """
    if request.identity is None:
        log(
            "warning",
            "kms_auth_skipped",
            {
                "message": "UNSAFE: the KMS answer's signature is not checked "
                "(--insecure-skip-kms-auth); a host could feed this enclave a key of its choosing"
            },
        )
    deadline = _Clock(clock, deadline_s)

    def attempt(n: int) -> Release:
        log("debug", "attempt", {"attempt": n, "time_left_s": round(max(0.0, deadline.left()), 2)})
        return exchange(
            transport,
            nsm,
            request,
            clock=clock,
            time_left_s=deadline.left(),
            policy=policy,
            attempt=n,
        )

    release = _retrying(
        attempt,
        deadline=deadline,
        deadline_s=deadline_s,
        sleep=sleep,
        rand=rand,
        log=log,
        policy=policy,
    )
    log(
        "info",
        "released",
        {
            "keys": [k.name for k in release.keys],
            "application": protocol.application_text(release.application),
            "os_image_hash": release.os_image_hash,
            "attempts": release.attempts,
        },
    )
    if release.debug:
        log(
            "warning",
            "debug_keys",
            {
                "message": "UNSAFE: the KMS released debug-domain keys to this debug-mode "
                "enclave (mock-kms serve --allow-debug); a production enclave gets other keys"
            },
        )
    return release
