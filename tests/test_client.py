"""The release flow against a fake KMS that does the real cryptography, attack by attack.

The fake KMS (also used by test_client_cli.py over real sockets) verifies the simulator's
documents with mock_kms's verifier, checks nonce and binding, seals with HPKE and signs with
Ed25519, all through keyutil.protocol. Each attack is a hook that rewrites its answer.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import json
import secrets
import socketserver
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyutil import protocol
from keyutil.client import (
    AnswerRejected,
    KmsDenied,
    KmsUnavailable,
    ReleaseRequest,
    RetryPolicy,
    backoff_delay,
    check_answer,
    classify,
    exchange,
    parse_challenge,
    release_keys,
    wait_ready,
)
from keyutil.nsm import NsmError
from keyutil.protocol import KeyRequest
from keyutil.simulator import SimulatedNSM
from keyutil.transport import HttpResponse, TransportError
from mock_kms.roots import load_pem_roots
from mock_kms.verifier import AttestationVerifier

APP = "0x" + "ab" * 32

Answer = dict[str, Any]


class FakeKms:
    """A KMS in a few lines, on keyutil.protocol and mock_kms's attestation verifier."""

    def __init__(self, sim_dir: Path) -> None:
        self.identity = ed25519.Ed25519PrivateKey.generate()
        self.root_secret = secrets.token_bytes(32)
        self.verifier = AttestationVerifier(trusted_roots=load_pem_roots(sim_dir / "root.pem"))
        self.nonces: set[bytes] = set()
        self.calls: Counter[str] = Counter()
        # Scripted responses, consumed first: path -> list of (status, body).
        self.script: dict[str, list[tuple[int, Any]]] = {}
        # An attack: rewrites the signed answer (given the parsed request too).
        self.tamper: Callable[[Answer, dict[str, Any]], Answer] | None = None
        self.recipient_override: bytes | None = None
        self.ready = True

    @property
    def pubkey(self) -> str:
        return protocol.format_identity(self.identity.public_key())

    def secret(self, name: str, length: int) -> bytes:
        return hashlib.sha512(self.root_secret + name.encode()).digest()[:length]

    def sign(self, body: Mapping[str, Any], key: ed25519.Ed25519PrivateKey | None = None) -> Answer:
        return protocol.sign_answer(key or self.identity, body)

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        self.calls[path] += 1
        if self.script.get(path):
            return self.script[path].pop(0)
        if (method, path) == ("GET", "/v1/health"):
            if not self.ready:
                return 503, {"error": "chain_unavailable", "message": "cannot read the chain"}
            return 200, {"status": "ready", "identity": self.pubkey}
        if (method, path) == ("POST", "/v1/challenge"):
            nonce = secrets.token_bytes(32)
            self.nonces.add(nonce)
            return 200, {"nonce": protocol.b64e(nonce), "expires_at_ms": 1}
        if (method, path) == ("POST", "/v1/release"):
            return self.release(body)
        return 404, {"error": "not_found", "message": path}

    def release(self, body: Any) -> tuple[int, Any]:
        keys = tuple(KeyRequest(k["name"], k["length"]) for k in body["keys"])
        suite = body["suite"]
        doc = self.verifier.verify(
            base64.b64decode(body["attestation"]), at=datetime.datetime.now(datetime.UTC)
        )
        nonce = doc.nonce or b""
        if nonce not in self.nonces:
            return 400, {"error": "nonce_invalid", "message": "unknown or used nonce"}
        self.nonces.discard(nonce)
        if doc.user_data != protocol.request_binding(keys, suite, nonce):
            return 400, {"error": "binding_mismatch", "message": "user_data"}
        recipient = protocol.load_recipient_public(
            suite, self.recipient_override or doc.public_key or b""
        )
        answer = self.sign(
            {
                "version": 1,
                "suite": suite,
                "application": APP,
                "os_image_hash": doc.os_image_hash,
                "nonce": protocol.b64e(nonce),
                "binding": protocol.request_binding(keys, suite, nonce).hex(),
                "keys": [
                    {
                        **k.to_json(),
                        "sealed": protocol.b64e(
                            protocol.seal(suite, recipient, k, nonce, self.secret(k.name, k.length))
                        ),
                    }
                    for k in keys
                ],
            }
        )
        if self.tamper is not None:
            answer = self.tamper(answer, body)
        return 200, answer


class InProcess:
    """A Transport straight into a FakeKms; ``fail`` makes every request unreachable."""

    def __init__(self, kms: FakeKms) -> None:
        self.kms = kms
        self.fail: TransportError | None = None
        self.timeouts: list[float] = []

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float
    ) -> HttpResponse:
        self.timeouts.append(timeout)
        if self.fail is not None:
            raise self.fail
        # Through JSON and back, as on the wire.
        status, answer = self.kms.handle(method, path, json.loads(json.dumps(body)))
        return HttpResponse(status, json.loads(json.dumps(answer)))


# -- Real-socket servers for the same fake (used by the CLI and transport tests) -----------


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        status, answer = self.server.app(self.command, self.path, body)
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _serve
    do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def address_string(self) -> str:
        return "test"


class TcpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app: Callable[[str, str, Any], tuple[int, Any]]) -> None:
        self.app = app
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, app: Callable[[str, str, Any], tuple[int, Any]]) -> None:
        self.app = app
        super().__init__(str(path), _Handler)

    @property
    def url(self) -> str:
        return f"unix://{self.server_address}"


@pytest.fixture
def serve() -> Iterator[Callable[[socketserver.BaseServer], str]]:
    """Run servers in threads for the test; returns their URL."""
    servers: list[socketserver.BaseServer] = []

    def start(server: socketserver.BaseServer) -> str:
        servers.append(server)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        return str(server.url)  # type: ignore[attr-defined]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# -- Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> SimulatedNSM:
    return SimulatedNSM.init(tmp_path_factory.mktemp("client") / "sim")


@pytest.fixture
def kms(nsm: SimulatedNSM) -> FakeKms:
    return FakeKms(nsm.directory)


@pytest.fixture
def transport(kms: FakeKms) -> InProcess:
    return InProcess(kms)


def request_for(kms: FakeKms, *names: str, suite: str = protocol.SUITE_X25519) -> ReleaseRequest:
    return ReleaseRequest.build(names or ("default",), suite=suite, identity=kms.pubkey)


def run(transport: InProcess, nsm: SimulatedNSM, request: ReleaseRequest, **kw: Any) -> Any:
    kw.setdefault("deadline_s", 10.0)
    kw.setdefault("sleep", lambda s: None)
    return release_keys(transport, nsm, request, **kw)


def rejected(transport: InProcess, nsm: SimulatedNSM, request: ReleaseRequest) -> str:
    before = transport.kms.calls["/v1/release"]
    with pytest.raises(AnswerRejected) as info:
        run(transport, nsm, request)
    assert transport.kms.calls["/v1/release"] == before + 1  # never retried
    return info.value.code


# -- The happy path ---------------------------------------------------------------------------


@pytest.mark.parametrize("suite", protocol.SUITES)
def test_release_opens_the_kms_keys(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms, suite: str
) -> None:
    request = ReleaseRequest.build(
        ["disk", "weights"], lengths=[32, 64], suite=suite, identity=kms.pubkey
    )
    release = run(transport, nsm, request)
    assert [(k.name, bytes(k.value)) for k in release.keys] == [
        ("disk", kms.secret("disk", 32)),
        ("weights", kms.secret("weights", 64)),
    ]
    assert release.application == APP and release.attempts == 1
    assert release.os_image_hash == nsm.identity.os_image_hash
    release.wipe()
    assert all(not any(k.value) for k in release.keys)


def test_released_key_repr_hides_the_value(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    release = run(transport, nsm, request_for(kms))
    secret = kms.secret("default", 32)
    for text in (repr(release), str(release)):
        assert secret.hex() not in text and repr(secret) not in text


# -- Answers that must fail authentication (exit 6) ------------------------------------------


def test_answer_signed_by_another_key(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    kms.tamper = lambda a, _: kms.sign({k: v for k, v in a.items() if k != "signature"}, other)
    assert rejected(transport, nsm, request_for(kms)) == "answer_unauthenticated"


def _flip_sealed_byte(answer: Answer) -> Answer:
    sealed = bytearray(base64.b64decode(answer["keys"][0]["sealed"]))
    sealed[-1] ^= 1
    keys = [{**answer["keys"][0], "sealed": protocol.b64e(bytes(sealed))}, *answer["keys"][1:]]
    return {**answer, "keys": keys}


def test_sealed_byte_flipped_and_resigned_by_an_attacker(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    attacker = ed25519.Ed25519PrivateKey.generate()

    def tamper(answer: Answer, _: Any) -> Answer:
        body = _flip_sealed_byte(answer)
        del body["signature"]
        return kms.sign(body, attacker)

    kms.tamper = tamper
    assert rejected(transport, nsm, request_for(kms)) == "answer_unauthenticated"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("application", "0x" + "cd" * 32),
        ("os_image_hash", "0x" + "00" * 32),
        ("suite", protocol.SUITE_P384),
        ("version", 2),
        ("extra", "field"),
    ],
)
def test_field_changed_without_resigning(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms, field: str, value: Any
) -> None:
    kms.tamper = lambda a, _: {**a, field: value}
    assert rejected(transport, nsm, request_for(kms)) == "answer_unauthenticated"


def test_signature_removed(transport: InProcess, nsm: SimulatedNSM, kms: FakeKms) -> None:
    kms.tamper = lambda a, _: {k: v for k, v in a.items() if k != "signature"}
    assert rejected(transport, nsm, request_for(kms)) == "answer_unauthenticated"


def test_sealed_to_another_public_key_host_substitution(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    # A genuinely signed answer, right nonce and binding, but sealed to a key the host holds:
    # only the HPKE open catches it, and it must count as an authentication failure.
    host_key = protocol.generate_recipient(protocol.SUITE_X25519)
    kms.recipient_override = protocol.recipient_public_bytes(host_key)
    assert rejected(transport, nsm, request_for(kms)) == "answer_open_failed"


def test_flipped_sealed_byte_without_signature_check_fails_to_open(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    kms.tamper = lambda a, _: _flip_sealed_byte(a)
    request = ReleaseRequest.build(["default"], identity=None)
    assert rejected(transport, nsm, request) == "answer_open_failed"


def test_replayed_answer_has_another_nonce(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    captured: list[Answer] = []
    kms.tamper = lambda a, _: captured.append(a) or a
    run(transport, nsm, request_for(kms))
    kms.tamper = lambda a, _: captured[0]  # the host replays yesterday's genuine answer
    assert rejected(transport, nsm, request_for(kms)) == "answer_nonce_mismatch"
    assert kms.calls["/v1/release"] == 2


def test_nonce_mismatch_signed_by_the_kms(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    def tamper(answer: Answer, _: Any) -> Answer:
        body = {k: v for k, v in answer.items() if k != "signature"}
        return kms.sign({**body, "nonce": protocol.b64e(b"another nonce")})

    kms.tamper = tamper
    assert rejected(transport, nsm, request_for(kms)) == "answer_nonce_mismatch"


def test_binding_mismatch_signed_by_the_kms(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    def tamper(answer: Answer, _: Any) -> Answer:
        body = {k: v for k, v in answer.items() if k != "signature"}
        return kms.sign({**body, "binding": "00" * 32})

    kms.tamper = tamper
    assert rejected(transport, nsm, request_for(kms)) == "answer_binding_mismatch"


@pytest.mark.parametrize(
    "rewrite",
    [
        pytest.param(lambda ks: [{**ks[0], "name": "other"}, ks[1]], id="renamed"),
        pytest.param(lambda ks: [ks[1], ks[0]], id="reordered"),
        pytest.param(lambda ks: ks[:1], id="missing"),
        pytest.param(lambda ks: [*ks, ks[0]], id="extra"),
        pytest.param(lambda ks: [{**ks[0], "length": 16}, ks[1]], id="length"),
    ],
)
def test_wrong_keys_signed_by_the_kms(
    transport: InProcess,
    nsm: SimulatedNSM,
    kms: FakeKms,
    rewrite: Callable[[list[Any]], list[Any]],
) -> None:
    def tamper(answer: Answer, _: Any) -> Answer:
        body = {k: v for k, v in answer.items() if k != "signature"}
        return kms.sign({**body, "keys": rewrite(body["keys"])})

    kms.tamper = tamper
    assert rejected(transport, nsm, request_for(kms, "a", "b")) == "answer_keys_mismatch"


@pytest.mark.parametrize(
    "answer", [None, [], "text", {"signature": "!!"}], ids=["null", "list", "str", "junk"]
)
def test_malformed_answers(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms, answer: Any
) -> None:
    kms.tamper = lambda a, _: answer
    with pytest.raises((AnswerRejected, KmsUnavailable)):
        run(transport, nsm, request_for(kms), deadline_s=0.2)


def test_check_answer_without_identity_still_checks_nonce(kms: FakeKms) -> None:
    request = ReleaseRequest.build(["default"], identity=None)
    nonce = b"n" * 32
    binding = protocol.request_binding(request.keys, request.suite, nonce)
    body = {
        "version": 1,
        "suite": request.suite,
        "application": APP,
        "os_image_hash": APP,
        "nonce": protocol.b64e(b"m" * 32),
        "binding": binding.hex(),
        "keys": [{"name": "default", "length": 32, "sealed": "AA=="}],
    }
    with pytest.raises(AnswerRejected) as info:
        check_answer(body, request=request, nonce=nonce, binding=binding)
    assert info.value.code == "answer_nonce_mismatch"


def test_insecure_mode_is_logged(transport: InProcess, nsm: SimulatedNSM) -> None:
    events: list[tuple[str, str]] = []
    run(
        transport,
        nsm,
        ReleaseRequest.build(["default"], identity=None),
        log=lambda level, event, fields: events.append((level, event)),
    )
    assert ("warning", "kms_auth_skipped") in events


# -- Denials, unavailability and the deadline ---------------------------------------------------


def test_denial_is_final_and_carries_the_kms_code(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    kms.script["/v1/release"] = [(403, {"error": "image_not_allowed", "message": "not on chain"})]
    with pytest.raises(KmsDenied) as info:
        run(transport, nsm, request_for(kms))
    assert (info.value.code, info.value.status) == ("image_not_allowed", 403)
    assert kms.calls["/v1/release"] == 1 and kms.calls["/v1/challenge"] == 1


def test_503_then_success_is_retried_from_a_new_challenge(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    kms.script["/v1/release"] = [(503, {"error": "chain_unavailable", "message": "rpc down"})]
    sleeps: list[float] = []
    release = run(transport, nsm, request_for(kms), sleep=sleeps.append)
    assert release.attempts == 2 and len(sleeps) == 1
    assert kms.calls["/v1/challenge"] == 2 and kms.calls["/v1/release"] == 2


def test_not_ready_is_waited_for(transport: InProcess, nsm: SimulatedNSM, kms: FakeKms) -> None:
    kms.script["/v1/health"] = [(503, {"error": "starting", "message": "loading"})] * 3
    release = run(transport, nsm, request_for(kms))
    assert release.attempts == 4 and kms.calls["/v1/challenge"] == 1


def test_one_exchange_without_the_health_check_goes_straight_to_the_challenge(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    kms.ready = False  # an unhealthy KMS: only /v1/release's own answer tells
    release = exchange(transport, nsm, request_for(kms), time_left_s=10, check_health=False)
    assert bytes(release.keys[0].value) == kms.secret("default", 32)
    assert kms.calls["/v1/health"] == 0 and kms.calls["/v1/release"] == 1
    with pytest.raises(KmsUnavailable) as info:
        exchange(transport, nsm, request_for(kms), time_left_s=10)
    assert info.value.code == "chain_unavailable" and kms.calls["/v1/health"] == 1


def test_nsm_error_is_not_retried(transport: InProcess, kms: FakeKms) -> None:
    class Broken:
        def attestation(self, **kw: Any) -> bytes:
            raise NsmError("nsm_refused", "no")

    with pytest.raises(NsmError):
        run(transport, Broken(), request_for(kms))  # type: ignore[arg-type]
    assert kms.calls["/v1/challenge"] == 1


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


def test_unreachable_until_the_deadline_with_capped_backoff(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    t = FakeTime()
    transport.fail = TransportError("unreachable", "connection refused")
    with pytest.raises(KmsUnavailable) as info:
        run(transport, nsm, request_for(kms), deadline_s=30.0, clock=t.clock, sleep=t.sleep)
    assert info.value.code == "unreachable"
    assert t.now - 1000.0 <= 30.0
    assert max(t.slept) <= RetryPolicy().max_delay
    assert all(0 < timeout <= 30.0 for timeout in transport.timeouts)
    # Pauses grow: the first few double (with jitter in the upper half).
    assert t.slept[0] <= 0.2 < t.slept[3]


def test_request_timeouts_never_exceed_the_time_left(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    t = FakeTime()
    transport.fail = TransportError("timeout", "no answer")
    with pytest.raises(KmsUnavailable):
        run(transport, nsm, request_for(kms), deadline_s=3.0, clock=t.clock, sleep=t.sleep)
    assert transport.timeouts[0] == 3.0
    assert all(timeout <= 3.0 for timeout in transport.timeouts)


def test_backoff_is_bounded_and_jittered() -> None:
    policy = RetryPolicy(initial_delay=0.2, max_delay=5.0)
    assert backoff_delay(1, policy, lambda: 0.0) == pytest.approx(0.1)
    assert backoff_delay(1, policy, lambda: 1.0) == pytest.approx(0.2)
    assert backoff_delay(3, policy, lambda: 1.0) == pytest.approx(0.8)
    assert backoff_delay(100, policy, lambda: 1.0) == 5.0


def test_wait_ready(transport: InProcess, kms: FakeKms) -> None:
    assert wait_ready(transport, deadline_s=1.0)["status"] == "ready"
    kms.ready = False
    t = FakeTime()
    with pytest.raises(KmsUnavailable) as info:
        wait_ready(transport, deadline_s=2.0, clock=t.clock, sleep=t.sleep)
    assert info.value.code == "chain_unavailable"


# -- The pure parts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error", "code"),
    [
        (503, {"error": "chain_unavailable", "message": "x"}, KmsUnavailable, "chain_unavailable"),
        (502, b"<html>", KmsUnavailable, "http_502"),
        (403, {"error": "debug_refused", "message": "x"}, KmsDenied, "debug_refused"),
        (404, None, KmsDenied, "http_404"),
        (200, None, KmsUnavailable, "bad_response"),
    ],
)
def test_classify(status: int, body: Any, error: type[Exception], code: str) -> None:
    with pytest.raises(error) as info:
        classify(HttpResponse(status, None if isinstance(body, bytes) else body), "x")
    assert info.value.code == code  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "body",
    [
        None,
        {"nonce": "***", "expires_at_ms": 1},
        {"nonce": "", "expires_at_ms": 1},
        {"nonce": protocol.b64e(b"x" * 1025), "expires_at_ms": 1},
        {"nonce": "AA==", "expires_at_ms": "soon"},
    ],
)
def test_bad_challenges_are_unavailable_not_fatal(body: Any) -> None:
    with pytest.raises(KmsUnavailable):
        parse_challenge(body)


def test_request_validation() -> None:
    with pytest.raises(protocol.ProtocolError):
        ReleaseRequest.build(["a", "a"], identity=None)
    with pytest.raises(protocol.ProtocolError):
        ReleaseRequest.build(["../x"], identity=None)
    with pytest.raises(protocol.ProtocolError):
        ReleaseRequest.build(["a", "b"], lengths=[32, 32, 32], identity=None)
    with pytest.raises(protocol.ProtocolError):
        ReleaseRequest.build(["a"], identity="rsa:abc")


def test_logged_durations_are_rounded_and_never_negative(
    transport: InProcess, nsm: SimulatedNSM, kms: FakeKms
) -> None:
    """Issue 14, item 16: retry_in_s=0.14, not 0.14213...; no 'for -0.2 s'."""
    events: list[tuple[str, dict[str, Any]]] = []
    transport.fail = TransportError("unreachable", "connection refused")
    t = FakeTime()
    with pytest.raises(KmsUnavailable):
        run(
            transport, nsm, request_for(kms), deadline_s=3.0, clock=t.clock, sleep=t.sleep,
            log=lambda level, event, fields: events.append((event, dict(fields))),
        )
    delays = [f["retry_in_s"] for e, f in events if e == "kms_unavailable"]
    assert delays and all(d == round(d, 2) and d >= 0 for d in delays)
    lefts = [f["time_left_s"] for e, f in events if e == "attempt"]
    assert lefts and all(x == round(x, 2) and x >= 0 for x in lefts)
    with pytest.raises(KmsUnavailable) as info:
        run(transport, nsm, request_for(kms), deadline_s=-0.25, clock=t.clock, sleep=t.sleep)
    assert "for 0 s" in info.value.message and "-" not in info.value.message.split(";")[0]
