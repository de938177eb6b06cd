"""What an attacker's review of the provenance statements found (issue 12 follow-up): hostile
statement text that must be refused with a stable code, never a traceback, and never read one
way here and another way by a verifier in another language."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from e2e_support import KEYUTIL
from eth_account import Account
from test_provenance_contract import onchain  # noqa: F401  (the fixture: eth-tester, anvil)

from keyutil import protocol as p
from keyutil import provenance
from keyutil.provenance import ProvenanceError, parse_statement, verify_statement
from mock_kms import signer
from mock_kms.provenance import ProvenanceIssuer, SignerChoice
from mock_kms.state import KmsState

APP = b"app-a".ljust(32, b"\0")
CONTRACT = "0x" + "5a" * 20


@pytest.fixture
def state() -> KmsState:
    return KmsState(bytes(range(32)), ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
def issuer(state: KmsState, tmp_path: Path) -> ProvenanceIssuer:
    account = Account.create()

    class Ring(signer.SignerKeyring):
        def account(self, address: str) -> Any:
            return account

    registered = signer.RegisteredSigner(read=lambda: account.address)
    return ProvenanceIssuer(state, 31337, CONTRACT, SignerChoice(registered, Ring(tmp_path)))


def _pin_text(state: KmsState) -> str:
    return state.identity_text


# --- hostile JSON text ------------------------------------------------------------------


@pytest.fixture
def stock_recursion_limit() -> Iterator[None]:
    """The interpreter's default limit, which `keyutil` runs with; importing eth_account
    (py_ecc) raises it to 100000 for the whole test process."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(old)


@pytest.mark.usefixtures("stock_recursion_limit")
@pytest.mark.parametrize("text", [b"[" * 4000, b'{"v":' * 600 + b"1" + b"}" * 600])
def test_deeply_nested_text_is_malformed_not_a_recursion_error(text: bytes) -> None:
    assert len(text) <= 4096
    with pytest.raises(ProvenanceError) as e:
        parse_statement(text)
    assert e.value.code == "statement_malformed"


def test_a_member_twice_is_refused_whichever_copy_is_genuine(
    state: KmsState, issuer: ProvenanceIssuer
) -> None:
    genuine = issuer.issue(APP, p.KeyRequest("wallet", 32, "secp256k1"))
    text = json.dumps(genuine)
    other = '"application": "0x' + "11" * 32 + '"'
    # A first-wins parser would read the forged application, Python's the genuine one: the
    # same bytes must not mean two things, so both orders are refused.
    for forged in ("{" + other + ", " + text[1:], text[:-1] + ", " + other + "}"):
        with pytest.raises(ProvenanceError) as e:
            verify_statement(forged.encode(), state.identity.public_key())
        assert e.value.code == "statement_malformed"
        assert "twice" in e.value.message
    verify_statement(text.encode(), state.identity.public_key())


def test_verify_provenance_cli_deep_nesting_exits_6_without_traceback(
    state: KmsState, tmp_path: Path
) -> None:
    path = tmp_path / "deep.json"
    path.write_bytes(b"[" * 3000)
    # A real process: its recursion limit is the default one, not the test process's.
    run = subprocess.run(
        [KEYUTIL, "verify-provenance", "--kms-pubkey", _pin_text(state), "--json", str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 6, run.stderr
    assert json.loads(run.stdout.splitlines()[0])["error"] == "statement_malformed"
    assert "Traceback" not in run.stderr


def test_fuzz_run_runs_the_provenance_target(capsys: pytest.CaptureFixture[str]) -> None:
    from fuzz.run import main

    assert main(["provenance", "--runs", "30", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["execs"] == 30


# --- verify-provenance --application ------------------------------------------------------


def _verify_ed25519_statement(state: KmsState, issuer: ProvenanceIssuer, tmp_path: Path,
                              *options: str) -> subprocess.CompletedProcess[str]:
    """`keyutil verify-provenance OPTIONS FILE` (a real process) on a genuine statement."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps(issuer.issue(APP, p.KeyRequest("signing", 32, "ed25519"))))
    return subprocess.run(
        [KEYUTIL, "verify-provenance", "--kms-pubkey", _pin_text(state), *options, str(path)],
        capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize("given", ["0x" + "zz" * 32, "0x" + "ab" * 31, "0xabc", "é" * 3,
                                   "0X" + APP.hex(),
                                   "x" * 33, "", "0x" + "00" * 32])
def test_verify_provenance_refuses_a_bad_application_as_usage(
    state: KmsState, issuer: ProvenanceIssuer, tmp_path: Path, given: str
) -> None:
    run = _verify_ed25519_statement(state, issuer, tmp_path, "--application", given)
    assert run.returncode == 2, run.stderr
    assert "--application" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("given", ["app-a", "0x" + APP.hex(), "0x" + APP.hex().upper()])
def test_verify_provenance_application_as_the_chain_writes_it(
    state: KmsState, issuer: ProvenanceIssuer, tmp_path: Path, given: str
) -> None:
    from mock_kms.chain import parse_application

    assert parse_application(given) == APP
    run = _verify_ed25519_statement(state, issuer, tmp_path, "--application", given)
    assert run.returncode == 0, run.stderr


# --- the host answers for the KMS -----------------------------------------------------------


@pytest.mark.usefixtures("stock_recursion_limit")
def test_a_response_nested_too_deep_is_not_json_not_a_recursion_error() -> None:
    """The host can answer any request of the enclave (a statement travels in the answer):
    JSON nested deeper than the stack reads as no JSON (bad_response upstream)."""
    import http.server
    import threading

    from keyutil.transport import HttpTransport, TransportError

    class Deep(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"[" * 50_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Deep)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        transport = HttpTransport.from_url(f"http://127.0.0.1:{server.server_address[1]}")
        try:
            response = transport.request("GET", "/v1/health", timeout=10)
            assert response.status == 200 and response.json is None
        except TransportError as e:  # or refused outright for its depth
            assert e.code == "bad_response"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- the cost of GET /v1/provenance (public, unauthenticated) -----------------------------


def test_a_statement_asked_again_is_not_signed_again(
    state: KmsState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mock_kms import provenance as kms_provenance

    signed: list[str] = []
    real_sign = kms_provenance.sign_typed

    def counting_sign(account: Any, message: Any) -> bytes:
        signed.append(account.address)
        return real_sign(account, message)

    monkeypatch.setattr(kms_provenance, "sign_typed", counting_sign)
    old, new = Account.create(), Account.create()
    current = [old]

    class Ring(signer.SignerKeyring):
        def account(self, address: str) -> Any:
            return next(a for a in (old, new) if a.address == address)

    registered = signer.RegisteredSigner(read=lambda: current[0].address, max_staleness=0)
    issuer = ProvenanceIssuer(state, 31337, CONTRACT,
                              SignerChoice(registered, Ring(tmp_path)))
    fresh = ProvenanceIssuer(state, 31337, CONTRACT, SignerChoice(registered, Ring(tmp_path)))
    key = p.KeyRequest("wallet", 32, "secp256k1")
    first = issuer.issue(APP, key)
    first["application"] = "0x" + "11" * 32  # a caller's change does not reach the cache
    again = issuer.issue(APP, key)
    assert signed == [old.address]
    # What the cache gives is byte for byte what a fresh issuer makes (deterministic).
    assert again == fresh.issue(APP, key)
    verify_statement(again, state.identity.public_key())
    # Rotation: the new signer's statement is made afresh, by the new signer.
    current[0] = new
    rotated = issuer.issue(APP, key)
    assert rotated["signer"] == new.address and signed[-1] == new.address
    # Another key of the same application is its own entry.
    assert issuer.issue(APP, p.KeyRequest("wallet", 32, "ed25519"))["type"] == "ed25519"


def test_the_statement_cache_is_bounded(state: KmsState, issuer: ProvenanceIssuer) -> None:
    from mock_kms.provenance import _StatementCache

    small = ProvenanceIssuer(state, issuer.chain_id, issuer.contract, issuer.signer,
                             cache=_StatementCache(3))
    for i in range(10):
        small.issue(APP, p.KeyRequest(f"k{i}", 32, "ed25519"))
    assert len(small.cache._items) == 3


def test_the_signer_key_is_parsed_once_while_its_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from mock_kms.errors import UnavailableError

    ring = signer.SignerKeyring(tmp_path)
    address = ring.new()
    parsed: list[str] = []
    real = signer.Account.from_key

    def counting(key: Any) -> Any:
        parsed.append("x")
        return real(key)

    monkeypatch.setattr(signer.Account, "from_key", counting)
    assert ring.account(address).address == address
    assert ring.account(address).address == address
    assert len(parsed) == 1
    path = next(ring.directory.iterdir())
    # A file made readable to others is refused as before, not served from memory.
    os.chmod(path, 0o644)
    with pytest.raises(UnavailableError) as e:
        ring.account(address)
    assert e.value.code == "state_invalid"
    # A file removed: this KMS no longer holds the key.
    path.unlink()
    with pytest.raises(UnavailableError) as e:
        ring.account(address)
    assert e.value.code == "signer_unavailable"


# --- on chain: the zero signer --------------------------------------------------------------


def test_after_unregistering_no_signature_verifies_not_even_one_ecrecover_maps_to_zero(
    onchain: Any,  # noqa: F811  (the fixture imported above)
) -> None:
    """With signer() zero, a malformed signature (signerOf gives the zero address, as
    ecrecover does for a point it cannot recover) must not match it: belongsTo checks
    the registered signer is set. Pins that guard, for both chains."""
    from test_provenance_contract import ZERO, belongs, make_statement

    c = onchain
    kms = Account.create()
    c.send(signer.set_signer_request(c.allowlist, kms.address))
    s = make_statement(c, kms)
    app = bytes.fromhex(s.message["message"]["application"][2:])
    assert belongs(c, app, s) is True
    c.send(signer.set_signer_request(c.allowlist, ZERO))
    account = Account.from_key(bytes(31) + b"\x01").address  # any account
    for sig in (s.signature, bytes(65), bytes(64) + b"\x1b", s.signature[:64] + b"\x00",
                b"", s.signature + b"\x00"):
        assert c.check.functions.signerOf(s.struct(), sig).call() in (ZERO, kms.address)
        assert belongs(c, app, s, signature=sig) is False
        assert c.check.functions.isApplicationAccount(app, account, s.struct(), sig).call() \
            is False


# --- the KMS identity signs two kinds of bytes: neither passes for the other ----------------


def test_a_statement_signature_is_no_answer_signature_and_vice_versa(
    state: KmsState, issuer: ProvenanceIssuer
) -> None:
    pin = state.identity.public_key()
    statement = issuer.issue(APP, p.KeyRequest("wallet", 32, "secp256k1"))
    # The statement, taken for an answer body: same members, same signature.
    with pytest.raises(p.ProtocolError) as e:
        p.verify_answer(pin, statement)
    assert e.value.code == "answer_unauthenticated"
    # An answer signature over exactly the statement's members, taken for a statement.
    body = {k: v for k, v in statement.items() if k != "signature"}
    as_answer = p.sign_answer(state.identity, body)
    assert p.verify_answer(pin, as_answer) == body
    with pytest.raises(ProvenanceError) as f:
        verify_statement(as_answer, pin)
    assert f.value.code == "statement_unauthenticated"
    # Contexts: neither is a prefix of the other, and both end before the 0x00 separator.
    contexts = {p.ANSWER_CONTEXT, provenance.STATEMENT_CONTEXT}
    assert all(b"\x00" not in c for c in contexts) and len(contexts) == 2


def test_the_fuzz_target_nests_deep_under_keyutils_recursion_limit() -> None:
    """The provenance fuzz target now makes "nest" mutants and checks them with the
    recursion limit keyutil has: it finds the RecursionError of the merged parser."""
    import collections

    from fuzz.mutate import RandomChooser
    from fuzz.provenance_target import ProvenanceTarget

    target = ProvenanceTarget()
    chooser = RandomChooser(7)
    kinds: collections.Counter[str] = collections.Counter()
    nested = 0
    for _ in range(600):
        execution = target.one(chooser)
        kinds[execution.kind] += 1
        nested += "nest" in execution.ops
    assert nested > 0 and kinds["crash"] == 0, kinds
    assert sys.getrecursionlimit() >= 100_000  # restored: eth_account's, in this process


def test_public_statements_being_made_are_capped_503_overloaded_releases_are_not(
    state: KmsState, issuer: ProvenanceIssuer, tmp_path: Path
) -> None:
    """GET /v1/provenance makes at most PUBLIC_CONCURRENCY new statements at once; beyond,
    503 overloaded at once (no worker thread held); what is cached is still served, and a
    release's statement (attested) is never refused for it."""
    import io

    from mock_kms import provenance as kms_provenance
    from mock_kms.allowlist import EmbeddedAllowlist
    from mock_kms.errors import UnavailableError
    from mock_kms.server import KmsApp
    from mock_kms.service import ReleaseService
    from mock_kms.verifier import AttestationVerifier

    service = ReleaseService(verifier=AttestationVerifier.aws(),
                             allowlist=EmbeddedAllowlist.create(), state=state,
                             provenance=issuer)
    app = KmsApp(service)

    def get(name: str) -> tuple[str, Any]:
        status: list[str] = []
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/v1/provenance",
                   "QUERY_STRING": f"application=app-a&name={name}&type=secp256k1",
                   "wsgi.input": io.BytesIO()}
        body = json.loads(b"".join(app(environ, lambda s, h: status.append(s))))
        return status[0], body

    assert get("cached")[0].startswith("200")
    held = [issuer.public_slots.acquire(blocking=False)
            for _ in range(kms_provenance.PUBLIC_CONCURRENCY)]
    assert all(held)
    try:
        status, body = get("new")
        assert status.startswith("503") and body["error"] == "overloaded"
        with pytest.raises(UnavailableError):
            issuer.issue(APP, p.KeyRequest("new", 32, "secp256k1"), public=True)
        assert get("cached")[0].startswith("200")
        # The release path: not counted.
        made = issuer.issue(APP, p.KeyRequest("new", 32, "secp256k1"))
        verify_statement(made, state.identity.public_key())
    finally:
        for _ in held:
            issuer.public_slots.release()
    status, body = get("other")
    assert status.startswith("200") and body["name"] == "other"


def test_signer_show_on_a_fresh_state_dir_makes_it_0700_like_serve(tmp_path: Path) -> None:
    import os
    import stat

    state_dir = tmp_path / "fresh" / "state"
    old = os.umask(0o022)
    try:
        run = subprocess.run([str(Path(KEYUTIL).parent / "mock-kms"), "signer", "show",
                              "--state-dir", str(state_dir)],
                             capture_output=True, text=True, timeout=60)
    finally:
        os.umask(old)
    assert run.returncode == 0, run.stderr
    for path in (state_dir, state_dir / "signers"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    (key,) = (state_dir / "signers").iterdir()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().strip()[2:] not in run.stdout + run.stderr


# --- the registered signer's reads: public requests must not multiply RPC calls -------------


def test_a_failed_signer_read_is_kept_a_moment_not_repeated_per_request() -> None:
    from mock_kms.errors import ErrorCode, UnavailableError

    now = [0.0]
    reads: list[float] = []
    up = [False]

    def read() -> str:
        reads.append(now[0])
        if not up[0]:
            raise UnavailableError(ErrorCode.CHAIN_UNAVAILABLE, "the RPC endpoint failed")
        return "0x" + "01" * 20

    registered = signer.RegisteredSigner(read=read, max_staleness=2.0, clock=lambda: now[0])
    for _ in range(50):  # 50 public requests in the same instant of an outage
        with pytest.raises(UnavailableError) as e:
            registered.current()
        assert e.value.code == "chain_unavailable"
    assert len(reads) == 1
    up[0] = True
    now[0] = signer.FAILED_READ_KEPT - 0.01
    with pytest.raises(UnavailableError):
        registered.current()
    now[0] = signer.FAILED_READ_KEPT
    assert registered.current() == "0x" + "01" * 20
    assert len(reads) == 2


def test_concurrent_callers_share_one_signer_read() -> None:
    import threading
    import time

    reads: list[int] = []
    gate = threading.Event()

    def slow_read() -> str:
        reads.append(1)
        gate.wait(5)
        return "0x" + "02" * 20

    registered = signer.RegisteredSigner(read=slow_read, max_staleness=2.0)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(registered.current()))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)  # all eight are in current(): one reading, seven waiting for it
    gate.set()
    for thread in threads:
        thread.join(10)
    assert results == ["0x" + "02" * 20] * 8
    assert len(reads) == 1
