"""The release decision, in-process: every refusal with its code, and what is released."""

from __future__ import annotations

import base64
import datetime
import io
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from keyutil import protocol as p
from keyutil.simulator import SimulatedNSM
from mock_kms.allowlist import EmbeddedAllowlist, ImageStatus
from mock_kms.errors import ErrorCode, InvalidError, KmsError, UnavailableError
from mock_kms.roots import load_pem_roots
from mock_kms.server import KmsApp
from mock_kms.service import AuditLog, ReleaseService, ReleaseSettings
from mock_kms.state import KmsState
from mock_kms.verifier import AttestationPolicy, AttestationVerifier

T0 = datetime.datetime(2026, 5, 1, 12, 0, 0, tzinfo=datetime.UTC)
APP_A = b"app-a".ljust(32, b"\0")
APP_B = b"app-b".ljust(32, b"\0")
KEYS = (p.KeyRequest("disk", 32),)


class Clock:
    def __init__(self) -> None:
        self.now = T0.timestamp()

    def __call__(self) -> float:
        return self.now

    def dt(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.now, datetime.UTC)


@pytest.fixture(scope="module")
def chain() -> EmbeddedAllowlist:
    return EmbeddedAllowlist.create()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_sim(directory: Path, clock: Clock, **kwargs: Any) -> SimulatedNSM:
    return SimulatedNSM.init(directory, clock=clock.dt, **kwargs)


@pytest.fixture
def sim(tmp_path: Path, clock: Clock, chain: EmbeddedAllowlist) -> SimulatedNSM:
    nsm = make_sim(tmp_path / "sim", clock)
    chain.register_image(bytes.fromhex(nsm.identity.os_image_hash[2:]), APP_A)
    return nsm


def make_service(
    tmp_path: Path,
    sim: SimulatedNSM,
    chain: Any,
    clock: Clock,
    *,
    allow_debug: bool = False,
    audit: AuditLog | None = None,
    debug_application: bytes | None = None,
) -> ReleaseService:
    verifier = AttestationVerifier(
        trusted_roots=load_pem_roots(sim.directory / "root.pem"),
        policy=AttestationPolicy(max_age=datetime.timedelta(seconds=60), allow_debug=allow_debug),
    )
    return ReleaseService(
        verifier=verifier,
        allowlist=chain,
        state=KmsState.load_or_create(tmp_path / "state"),
        settings=ReleaseSettings(nonce_lifetime=30),
        audit=audit,
        clock=clock,
        debug_application=debug_application,
    )


@pytest.fixture
def service(
    tmp_path: Path, sim: SimulatedNSM, chain: EmbeddedAllowlist, clock: Clock
) -> ReleaseService:
    return make_service(tmp_path, sim, chain, clock)


class Enclave:
    """The client side of one exchange, done by hand so each step can be attacked."""

    def __init__(self, nsm: SimulatedNSM, suite: str = p.SUITE_X25519) -> None:
        self.nsm = nsm
        self.suite = suite
        self.recipient = p.generate_recipient(suite)

    def request(
        self,
        service: ReleaseService,
        keys: tuple[p.KeyRequest, ...] = KEYS,
        *,
        nonce: bytes | None = None,
        user_data: bytes | None = None,
        public_key: bytes | None = None,
        bound_keys: tuple[p.KeyRequest, ...] | None = None,
    ) -> dict[str, Any]:
        if nonce is None:
            nonce = p.b64d(service.challenge()["nonce"], "nonce")
        self.nonce = nonce
        binding = p.request_binding(bound_keys or keys, self.suite, nonce)
        document = self.nsm.attestation(
            nonce=nonce,
            public_key=public_key or p.recipient_public_bytes(self.recipient),
            user_data=binding if user_data is None else user_data,
        )
        return {
            "version": 1,
            "suite": self.suite,
            "keys": [k.to_json() for k in keys],
            "attestation": p.b64e(document),
        }

    def open(self, service: ReleaseService, answer: dict[str, Any]) -> list[bytes]:
        body = p.verify_answer(service.state.identity.public_key(), answer)
        return [
            p.open_sealed(
                self.suite,
                self.recipient,
                p.KeyRequest(k["name"], k["length"]),
                self.nonce,
                p.b64d(k["sealed"], "sealed"),
            )
            for k in body["keys"]
        ]


def refused(service: ReleaseService, request: Any) -> KmsError:
    with pytest.raises(KmsError) as err:
        service.release(request)
    return err.value


def test_release_opens_to_the_derived_key(service: ReleaseService, sim: SimulatedNSM) -> None:
    enclave = Enclave(sim)
    outcome = service.release(enclave.request(service))
    (key,) = enclave.open(service, outcome.answer)
    assert key == service.state.derive_key(APP_A, KEYS[0])
    assert outcome.answer["application"] == "0x" + APP_A.hex()


def test_p384_suite(service: ReleaseService, sim: SimulatedNSM) -> None:
    enclave = Enclave(sim, p.SUITE_P384)
    (key,) = enclave.open(service, service.release(enclave.request(service)).answer)
    assert key == service.state.derive_key(APP_A, KEYS[0])


def test_several_keys_of_their_lengths(service: ReleaseService, sim: SimulatedNSM) -> None:
    keys = (p.KeyRequest("disk", 32), p.KeyRequest("weights", 64), p.KeyRequest("tls", 16))
    enclave = Enclave(sim)
    opened = enclave.open(service, service.release(enclave.request(service, keys)).answer)
    assert [len(k) for k in opened] == [32, 64, 16]
    assert len(set(opened)) == 3


def test_same_key_for_two_images_of_one_application(
    tmp_path: Path,
    service: ReleaseService,
    sim: SimulatedNSM,
    chain: EmbeddedAllowlist,
    clock: Clock,
) -> None:
    other = make_sim(tmp_path / "sim2", clock)  # another image: new PCRs (and its own CA)
    chain.register_image(bytes.fromhex(other.identity.os_image_hash[2:]), APP_A)
    second = make_service(tmp_path, other, chain, clock)  # same state directory
    enclave_1, enclave_2 = Enclave(sim), Enclave(other)
    key_1 = enclave_1.open(service, service.release(enclave_1.request(service)).answer)
    key_2 = enclave_2.open(second, second.release(enclave_2.request(second)).answer)
    assert key_1 == key_2


def test_different_key_for_another_application(
    tmp_path: Path,
    service: ReleaseService,
    sim: SimulatedNSM,
    chain: EmbeddedAllowlist,
    clock: Clock,
) -> None:
    other = make_sim(tmp_path / "sim2", clock)
    chain.register_image(bytes.fromhex(other.identity.os_image_hash[2:]), APP_B)
    second = make_service(tmp_path, other, chain, clock)
    enclave_1, enclave_2 = Enclave(sim), Enclave(other)
    key_1 = enclave_1.open(service, service.release(enclave_1.request(service)).answer)
    key_2 = enclave_2.open(second, second.release(enclave_2.request(second)).answer)
    assert key_1 != key_2


def test_restart_with_same_state_releases_same_key(
    tmp_path: Path,
    service: ReleaseService,
    sim: SimulatedNSM,
    chain: EmbeddedAllowlist,
    clock: Clock,
) -> None:
    enclave = Enclave(sim)
    first = enclave.open(service, service.release(enclave.request(service)).answer)
    restarted = make_service(tmp_path, sim, chain, clock)
    enclave = Enclave(sim)
    assert enclave.open(restarted, restarted.release(enclave.request(restarted)).answer) == first


def test_replayed_nonce_refused(service: ReleaseService, sim: SimulatedNSM) -> None:
    request = Enclave(sim).request(service)
    service.release(request)
    assert refused(service, request).code == ErrorCode.NONCE_REPLAYED


def test_expired_nonce_refused(service: ReleaseService, sim: SimulatedNSM, clock: Clock) -> None:
    nonce = p.b64d(service.challenge()["nonce"], "nonce")
    clock.now += 31
    request = Enclave(sim).request(service, nonce=nonce)
    assert refused(service, request).code == ErrorCode.NONCE_EXPIRED


def test_nonce_accepted_at_the_end_of_its_lifetime(
    service: ReleaseService, sim: SimulatedNSM, clock: Clock
) -> None:
    nonce = p.b64d(service.challenge()["nonce"], "nonce")
    clock.now += 30
    service.release(Enclave(sim).request(service, nonce=nonce))


def test_forged_nonce_refused(service: ReleaseService, sim: SimulatedNSM) -> None:
    nonce = bytearray(p.b64d(service.challenge()["nonce"], "nonce"))
    nonce[12] ^= 1
    assert refused(service, Enclave(sim).request(service, nonce=bytes(nonce))).code == (
        ErrorCode.NONCE_INVALID
    )


def test_nonce_of_another_kms_refused(
    tmp_path: Path,
    service: ReleaseService,
    sim: SimulatedNSM,
    chain: EmbeddedAllowlist,
    clock: Clock,
) -> None:
    other_state = make_service(tmp_path / "other", sim, chain, clock)
    nonce = p.b64d(other_state.challenge()["nonce"], "nonce")
    assert (
        refused(service, Enclave(sim).request(service, nonce=nonce)).code == ErrorCode.NONCE_INVALID
    )


def test_nonce_verifiable_by_a_replica_sharing_the_state(
    tmp_path: Path,
    service: ReleaseService,
    sim: SimulatedNSM,
    chain: EmbeddedAllowlist,
    clock: Clock,
) -> None:
    replica = make_service(tmp_path, sim, chain, clock)  # same state dir, separate process state
    nonce = p.b64d(service.challenge()["nonce"], "nonce")
    replica.release(Enclave(sim).request(replica, nonce=nonce))


def test_missing_nonce_refused(service: ReleaseService, sim: SimulatedNSM) -> None:
    enclave = Enclave(sim)
    document = sim.attestation(
        public_key=p.recipient_public_bytes(enclave.recipient), user_data=b"x"
    )
    request = {
        "version": 1,
        "suite": p.SUITE_X25519,
        "keys": [KEYS[0].to_json()],
        "attestation": p.b64e(document),
    }
    assert refused(service, request).code == ErrorCode.NONCE_MISSING


def test_binding_to_other_keys_refused(service: ReleaseService, sim: SimulatedNSM) -> None:
    request = Enclave(sim).request(service, bound_keys=(p.KeyRequest("other", 32),))
    assert refused(service, request).code == ErrorCode.BINDING_MISMATCH


def test_request_keys_swapped_by_host_refused(service: ReleaseService, sim: SimulatedNSM) -> None:
    request = Enclave(sim).request(service)
    request["keys"] = [{"name": "disk", "length": 64}]
    assert refused(service, request).code == ErrorCode.BINDING_MISMATCH


def test_missing_public_key_refused(service: ReleaseService, sim: SimulatedNSM) -> None:
    nonce = p.b64d(service.challenge()["nonce"], "nonce")
    document = sim.attestation(
        nonce=nonce, user_data=p.request_binding(KEYS, p.SUITE_X25519, nonce)
    )
    request = {
        "version": 1,
        "suite": p.SUITE_X25519,
        "keys": [KEYS[0].to_json()],
        "attestation": p.b64e(document),
    }
    assert refused(service, request).code == ErrorCode.PUBLIC_KEY_INVALID


def test_public_key_of_the_wrong_suite_refused(service: ReleaseService, sim: SimulatedNSM) -> None:
    p384 = p.recipient_public_bytes(p.generate_recipient(p.SUITE_P384))
    request = Enclave(sim).request(service, public_key=p384)
    assert refused(service, request).code == ErrorCode.PUBLIC_KEY_INVALID


def test_answer_cannot_be_opened_with_another_key(
    service: ReleaseService, sim: SimulatedNSM
) -> None:
    """A host substituting its own key cannot: the attested key is the only recipient."""
    enclave = Enclave(sim)
    answer = service.release(enclave.request(service)).answer
    enclave.recipient = p.generate_recipient(p.SUITE_X25519)
    with pytest.raises(Exception) as err:
        enclave.open(service, answer)
    assert not isinstance(err.value, AssertionError)


def test_image_not_on_allowlist_refused(
    tmp_path: Path, chain: EmbeddedAllowlist, clock: Clock
) -> None:
    unregistered = make_sim(tmp_path / "unregistered", clock)
    service = make_service(tmp_path, unregistered, chain, clock)
    assert (
        refused(service, Enclave(unregistered).request(service)).code == ErrorCode.IMAGE_NOT_ALLOWED
    )


def test_revoked_image_refused_after_the_revocation(
    tmp_path: Path,
    service: ReleaseService,
    sim: SimulatedNSM,
    chain: EmbeddedAllowlist,
    clock: Clock,
) -> None:
    service.release(Enclave(sim).request(service))
    chain.remove_image(bytes.fromhex(sim.identity.os_image_hash[2:]))
    clock.now += 2.01  # past the documented revocation delay
    assert refused(service, Enclave(sim).request(service)).code == ErrorCode.IMAGE_NOT_ALLOWED


def test_debug_enclave_refused_by_default(
    tmp_path: Path, chain: EmbeddedAllowlist, clock: Clock
) -> None:
    debug = make_sim(tmp_path / "debug", clock, debug=True)
    service = make_service(tmp_path, debug, chain, clock)
    assert refused(service, Enclave(debug).request(service)).code == ErrorCode.DEBUG_ENCLAVE


def test_debug_enclave_refused_by_the_allowlist_even_when_allowed_by_policy(
    tmp_path: Path, chain: EmbeddedAllowlist, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    debug = make_sim(tmp_path / "debug", clock, debug=True)
    service = make_service(tmp_path, debug, chain, clock, allow_debug=True)
    assert refused(service, Enclave(debug).request(service)).code == ErrorCode.DEBUG_ENCLAVE
    assert any("debug-mode" in r.getMessage() for r in caplog.records)


def test_stale_document_refused(service: ReleaseService, sim: SimulatedNSM, clock: Clock) -> None:
    request = Enclave(sim).request(service)
    clock.now += 61
    assert refused(service, request).code == ErrorCode.DOCUMENT_TOO_OLD


class DownChain:
    def lookup(self, image_hash: bytes) -> ImageStatus:
        raise UnavailableError(ErrorCode.CHAIN_UNAVAILABLE, "connection refused")

    def check_ready(self) -> None:
        raise UnavailableError(ErrorCode.CHAIN_UNAVAILABLE, "connection refused")


def test_chain_unavailable_is_unavailable_not_denied(
    tmp_path: Path, sim: SimulatedNSM, clock: Clock
) -> None:
    service = make_service(tmp_path, sim, DownChain(), clock)
    err = refused(service, Enclave(sim).request(service))
    assert isinstance(err, UnavailableError) and err.code == ErrorCode.CHAIN_UNAVAILABLE
    with pytest.raises(UnavailableError):
        service.ready()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.update(version=2), "version"),
        (lambda r: r.update(suite="rsa"), "suite"),
        (lambda r: r.update(keys=[]), "keys"),
        (lambda r: r.update(keys=[{"name": "../etc", "length": 32}]), "key name"),
        (lambda r: r.update(keys=[{"name": "k", "length": 8}]), "key length"),
        (lambda r: r.update(keys=[{"name": "k", "length": 32}] * 2), "distinct"),
        (lambda r: r.update(keys=[{"name": f"k{i}", "length": 32} for i in range(17)]), "keys"),
        (lambda r: r.update(attestation="***"), "attestation"),
        (lambda r: r.update(attestation=base64.b64encode(b"\0" * 30000).decode()), "attestation"),
    ],
    ids=[
        "version",
        "suite",
        "no-keys",
        "bad-name",
        "short-key",
        "duplicate-name",
        "too-many",
        "not-base64",
        "oversize",
    ],
)
def test_malformed_requests(
    service: ReleaseService, sim: SimulatedNSM, mutate: Any, message: str
) -> None:
    request = {
        "version": 1,
        "suite": p.SUITE_X25519,
        "keys": [KEYS[0].to_json()],
        "attestation": "hA==",
    }
    mutate(request)
    err = refused(service, request)
    assert err.code == ErrorCode.BAD_REQUEST
    assert message in err.message


# -- HTTP layer (WSGI, in-process) ---------------------------------------------------------


def call(app: KmsApp, method: str, path: str, body: bytes = b"") -> tuple[str, Any]:
    status: list[str] = []
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
    }
    out = b"".join(app(environ, lambda s, h: status.append(s)))
    return status[0], (json.loads(out) if path != "/metrics" else out.decode())


def test_http_status_codes_and_metrics(service: ReleaseService, sim: SimulatedNSM) -> None:
    app = KmsApp(service, max_body=8192)
    assert call(app, "GET", "/v1/health")[0] == "200 OK"
    assert call(app, "GET", "/v1/identity")[1]["identity"].startswith("ed25519:")
    assert call(app, "GET", "/nope")[0].startswith("404")
    assert call(app, "GET", "/v1/release")[0].startswith("405")
    assert call(app, "POST", "/v1/release", b"{not json")[1]["error"] == "bad_request"
    status, payload = call(app, "POST", "/v1/release", b"x" * 9000)
    assert status.startswith("413") and payload["error"] == "body_too_large"
    request = Enclave(sim).request(service)
    assert call(app, "POST", "/v1/release", json.dumps(request).encode())[0] == "200 OK"
    status, payload = call(app, "POST", "/v1/release", json.dumps(request).encode())
    assert status.startswith("403") and payload["error"] == "nonce_replayed"
    metrics = call(app, "GET", "/metrics")[1]
    assert 'kms_releases_total{code="ok",outcome="released"} 1.0' in metrics
    assert 'kms_releases_total{code="nonce_replayed",outcome="denied"} 1.0' in metrics
    assert "kms_verification_seconds_bucket" in metrics
    assert "kms_chain_read_seconds_bucket" in metrics


def test_http_chain_down_is_503(tmp_path: Path, sim: SimulatedNSM, clock: Clock) -> None:
    app = KmsApp(make_service(tmp_path, sim, DownChain(), clock))
    status, payload = call(app, "GET", "/v1/health")
    assert status.startswith("503") and payload["error"] == "chain_unavailable"
    request = Enclave(sim).request(app.service)
    status, payload = call(app, "POST", "/v1/release", json.dumps(request).encode())
    assert status.startswith("503") and payload["error"] == "chain_unavailable"


def test_audit_log_records_decisions_without_key_material(
    tmp_path: Path, sim: SimulatedNSM, chain: EmbeddedAllowlist, clock: Clock
) -> None:
    audit_path = tmp_path / "audit.log"
    service = make_service(tmp_path, sim, chain, clock, audit=AuditLog(audit_path))
    app = KmsApp(service)
    enclave = Enclave(sim)
    request = enclave.request(service)
    status, answer = call(app, "POST", "/v1/release", json.dumps(request).encode())
    assert status == "200 OK"
    (key,) = enclave.open(service, answer)
    call(app, "POST", "/v1/release", json.dumps(request).encode())  # replay: a denial
    lines = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert [e["outcome"] for e in lines] == ["released", "denied"]
    assert lines[0]["os_image_hash"] == sim.identity.os_image_hash
    assert lines[0]["module_id"] == sim.identity.module_id
    assert lines[0]["keys"] == ["disk"] and lines[1]["code"] == "nonce_replayed"
    raw = audit_path.read_bytes()
    for form in (
        key,
        key.hex().encode(),
        base64.b64encode(key),
        base64.b64encode(key).rstrip(b"="),
    ):
        assert form not in raw


def test_release_refused_when_the_audit_log_cannot_be_written(
    tmp_path: Path, sim: SimulatedNSM, chain: EmbeddedAllowlist, clock: Clock
) -> None:
    service = make_service(tmp_path, sim, chain, clock, audit=AuditLog(Path("/dev/full")))
    app = KmsApp(service)
    status, payload = call(
        app, "POST", "/v1/release", json.dumps(Enclave(sim).request(service)).encode()
    )
    assert status.startswith("503") and payload["error"] == "audit_unavailable"
    assert "sealed" not in json.dumps(payload)


def test_audit_log_with_a_torn_last_line_is_ended_before_new_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    whole = b'{"code":null,"outcome":"released","time":"2026-05-01T12:00:00Z"}\n'
    torn = b'{"code":null,"outcome":"rel'  # the machine lost power in the middle of a line
    path.write_bytes(whole + torn)
    with caplog.at_level(logging.WARNING, logger="mock_kms.service"):
        audit = AuditLog(path)
    assert "the last line is incomplete" in caplog.text
    assert path.read_bytes() == whole + torn + b"\n"
    audit.record({"outcome": "released", "code": None})
    lines = path.read_bytes().splitlines()
    assert lines[0] == whole.rstrip() and lines[1] == torn
    assert json.loads(lines[2]) == {"outcome": "released", "code": None}


def test_audit_log_torn_while_running_is_ended_before_the_next_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    audit.record({"n": 1})
    with path.open("ab") as f:  # a writer that died mid-line (or a truncation that failed)
        f.write(b'{"n":')
    with caplog.at_level(logging.WARNING, logger="mock_kms.service"):
        audit.record({"n": 2})
    assert "the last line is incomplete" in caplog.text
    assert path.read_bytes() == b'{"n":1}\n{"n":\n{"n":2}\n'


def record_concurrently(audit: AuditLog, n: int) -> list[BaseException | None]:
    """``n`` threads record one line each, released at once; what each record() raised."""
    barrier = threading.Barrier(n)
    outcomes: list[BaseException | None] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            audit.record({"n": i})
        except BaseException as e:
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_audit_log_group_commit_writes_concurrent_records_with_fewer_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.log"
    audit = AuditLog(path)
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # a disk that takes its time, as real ones do
        fsyncs.append(fd)
        time.sleep(0.05)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    assert record_concurrently(audit, 8) == [None] * 8
    assert sorted(json.loads(line)["n"] for line in path.read_bytes().splitlines()) == list(
        range(8)
    )
    assert 1 < len(fsyncs) < 8  # the first alone, the others batched behind it


def test_audit_log_failed_batch_refuses_every_record_in_it() -> None:
    outcomes = record_concurrently(AuditLog(Path("/dev/full")), 6)
    assert all(isinstance(e, UnavailableError) for e in outcomes)
    assert {e.code for e in outcomes if isinstance(e, UnavailableError)} == {
        ErrorCode.AUDIT_UNAVAILABLE
    }


def test_state_directory_modes_and_reuse(tmp_path: Path) -> None:
    state = KmsState.load_or_create(tmp_path / "s")
    again = KmsState.load_or_create(tmp_path / "s")
    assert state.identity_text == again.identity_text
    assert oct((tmp_path / "s").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "s" / "root-secret").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "s" / "identity.pem").stat().st_mode & 0o777) == "0o600"
    assert "root" not in repr(state).lower()


def test_state_readable_by_others_is_refused(tmp_path: Path) -> None:
    KmsState.load_or_create(tmp_path / "s")
    (tmp_path / "s" / "root-secret").chmod(0o644)
    with pytest.raises(UnavailableError) as err:
        KmsState.load_or_create(tmp_path / "s")
    assert err.value.code == ErrorCode.STATE_INVALID


def test_damaged_identity_is_refused(tmp_path: Path) -> None:
    KmsState.load_or_create(tmp_path / "s")
    (tmp_path / "s" / "identity.pem").write_bytes(b"garbage")
    with pytest.raises(UnavailableError) as err:
        KmsState.load_or_create(tmp_path / "s")
    assert err.value.code == ErrorCode.STATE_INVALID


def test_invalid_error_is_not_retryable() -> None:
    assert not isinstance(InvalidError(ErrorCode.IMAGE_NOT_ALLOWED, "x"), UnavailableError)


def test_too_many_outstanding_nonces_is_unavailable(clock: Clock) -> None:
    from mock_kms.replay import MemoryReplayStore
    from mock_kms.service import NonceBook

    book = NonceBook(b"k" * 32, ReleaseSettings(), clock, MemoryReplayStore(max_entries=2))
    book.accept(book.issue()[0])
    book.accept(book.issue()[0])
    with pytest.raises(UnavailableError) as err:
        book.accept(book.issue()[0])
    assert err.value.code == ErrorCode.OVERLOADED
    clock.now += 31  # the used ones expire and make room again
    book.accept(book.issue()[0])


def test_nonce_issued_in_the_future_refused(clock: Clock) -> None:
    from mock_kms.service import NonceBook

    book = NonceBook(b"k" * 32, ReleaseSettings(), clock)
    clock.now += 120
    nonce = book.issue()[0]
    clock.now -= 120
    with pytest.raises(InvalidError) as err:
        book.accept(nonce)
    assert err.value.code == ErrorCode.NONCE_INVALID
    assert "future" in err.value.message


def test_root_secret_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    KmsState.load_or_create(tmp_path / "s")
    (tmp_path / "s" / "root-secret").write_bytes(b"short")
    with pytest.raises(UnavailableError) as err:
        KmsState.load_or_create(tmp_path / "s")
    assert err.value.code == ErrorCode.STATE_INVALID
    assert "expected 32 bytes; found 5" in err.value.message


def test_serve_with_an_audit_log_it_cannot_open_exits_1(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mock_kms.cli import cli

    result = CliRunner().invoke(
        cli,
        [
            "serve",
            "--state-dir",
            str(tmp_path / "s"),
            "--audit-log",
            str(tmp_path / "no" / "a.log"),
        ],
    )
    assert result.exit_code == 1
    assert "cannot open the audit log" in result.output
