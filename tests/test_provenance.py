"""Signing key types (ed25519, secp256k1) and provenance statements, without processes:
the derivation, the files get-key writes, the statement's form, every way it fails to verify,
and `keyutil verify-provenance` in-process."""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from eth_account import Account

from keyutil import keytypes, provenance
from keyutil import protocol as p
from keyutil.cli import cli
from keyutil.provenance import ProvenanceError, parse_statement, verify_statement
from mock_kms import signer
from mock_kms.errors import ErrorCode, UnavailableError
from mock_kms.provenance import ProvenanceIssuer, SignerChoice, parse_query
from mock_kms.state import KmsState

ROOT = bytes(range(32))
APP_A = b"app-a".ljust(32, b"\0")
APP_B = b"app-b".ljust(32, b"\0")
CONTRACT = "0x" + "5a" * 20
CHAIN_ID = 31337
N = keytypes.SECP256K1_ORDER


@pytest.fixture
def state() -> KmsState:
    return KmsState(ROOT, ed25519.Ed25519PrivateKey.generate())


@pytest.fixture
def kms_signer() -> Any:
    return Account.create()


@pytest.fixture
def issuer(state: KmsState, kms_signer: Any, tmp_path: Path) -> ProvenanceIssuer:
    registered = signer.RegisteredSigner(read=lambda: kms_signer.address)

    class Ring(signer.SignerKeyring):
        def account(self, address: str) -> Any:
            assert address == kms_signer.address
            return kms_signer

    return ProvenanceIssuer(state, CHAIN_ID, CONTRACT,
                            SignerChoice(registered, Ring(tmp_path)))


def pin(state: KmsState) -> ed25519.Ed25519PublicKey:
    return state.identity.public_key()


def wallet(app: bytes = APP_A) -> tuple[bytes, p.KeyRequest]:
    return app, p.KeyRequest("wallet", 32, "secp256k1")


# --- the key types ----------------------------------------------------------------------


def test_secp256k1_accepts_exactly_the_scalars_1_to_n_minus_1() -> None:
    kind = keytypes.get("secp256k1")
    assert not kind.accepts(bytes(32))
    assert kind.accepts((1).to_bytes(32, "big"))
    assert kind.accepts((N - 1).to_bytes(32, "big"))
    assert not kind.accepts(N.to_bytes(32, "big"))
    assert not kind.accepts(b"\xff" * 32)
    assert not kind.accepts(b"\x01" * 31)


def test_secp256k1_file_is_what_eth_account_reads_and_its_public_half_the_account(
    state: KmsState,
) -> None:
    kind = keytypes.get("secp256k1")
    seed = state.derive_key(*wallet())
    text = kind.private_file(seed, "hex")
    assert text.startswith(b"0x") and len(text) == 66 and b"\n" not in text
    account = Account.from_key(text.decode())
    public = kind.public(seed)
    assert public is not None and public.startswith("0x04") and len(public) == 132
    assert provenance.account_of(public) == account.address
    with pytest.raises(ValueError):
        kind.private_file(seed, "pem")


def test_ed25519_files_pem_and_raw_read_back_to_the_public_half(state: KmsState) -> None:
    kind = keytypes.get("ed25519")
    seed = state.derive_key(APP_A, p.KeyRequest("signing", 32, "ed25519"))
    pem = serialization.load_pem_private_key(kind.private_file(seed, "pem"), None)
    raw = ed25519.Ed25519PrivateKey.from_private_bytes(kind.private_file(seed, "raw"))
    assert isinstance(pem, ed25519.Ed25519PrivateKey)
    for key in (pem, raw):
        public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        assert kind.public(seed) == "0x" + public.hex()


def test_raw_age_ed25519_secp256k1_of_one_name_are_unrelated(state: KmsState) -> None:
    seeds = {t: state.derive_key(APP_A, p.KeyRequest("k", 32, t))
             for t in ("raw", "age", "ed25519", "secp256k1")}
    assert len(set(seeds.values())) == 4
    # Not even a shared run of 8 bytes between any two of them.
    values = list(seeds.values())
    for i, a in enumerate(values):
        for b in values[i + 1:]:
            assert not any(a[j:j + 8] in b for j in range(25))


def test_signing_keys_depend_on_application_and_name_only(state: KmsState) -> None:
    key = p.KeyRequest("wallet", 32, "secp256k1")
    assert state.derive_key(APP_A, key) == state.derive_key(APP_A, key)
    assert state.derive_key(APP_A, key) != state.derive_key(APP_B, key)
    assert state.derive_key(APP_A, key) != state.derive_key(
        APP_A, p.KeyRequest("wallet2", 32, "secp256k1"))


def test_a_signing_key_of_another_length_is_a_bad_request() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.KeyRequest("wallet", 16, "secp256k1")
    assert info.value.code == "bad_request"


# --- issuing and verifying ------------------------------------------------------------------


def test_secp256k1_statement_verifies_and_names_the_keys_account(
    state: KmsState, issuer: ProvenanceIssuer, kms_signer: Any
) -> None:
    statement = issuer.issue(*wallet())
    seed = state.derive_key(*wallet())
    verified = verify_statement(statement, pin(state), application=APP_A, name="wallet",
                                key_type="secp256k1", chain_id=CHAIN_ID, contract=CONTRACT)
    assert verified.signer_checked
    assert verified.address == Account.from_key(seed).address
    assert statement["signer"] == kms_signer.address
    assert statement["public_key"] == keytypes.get("secp256k1").public(seed)
    # The same statement, byte for byte, every time (Ed25519 and RFC 6979 are deterministic).
    assert issuer.issue(*wallet()) == statement
    # It survives its own file form.
    again = parse_statement(parse_statement(statement).to_bytes())
    assert verify_statement(again, pin(state)).statement == verified.statement


def test_ed25519_statement_has_no_onchain_part(state: KmsState, issuer: ProvenanceIssuer) -> None:
    statement = issuer.issue(APP_A, p.KeyRequest("signing", 32, "ed25519"))
    assert {"address", "signer", "signer_signature"}.isdisjoint(statement)
    verified = verify_statement(json.dumps(statement), pin(state))
    assert not verified.signer_checked


def test_statement_signed_by_another_kms_identity_is_unauthenticated(
    issuer: ProvenanceIssuer,
) -> None:
    statement = issuer.issue(*wallet())
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ProvenanceError) as info:
        verify_statement(statement, other)
    assert info.value.code == "statement_unauthenticated"


@pytest.mark.parametrize("field,value", [
    ("application", "0x" + APP_B.hex()),
    ("name", "wallet2"),
    ("public_key", keytypes.get("secp256k1").public((7).to_bytes(32, "big"))),
    ("chain_id", CHAIN_ID + 1),
    ("contract", "0x" + "5b" * 20),
    ("address", "0x" + "12" * 20),
    ("signer", "0x" + "34" * 20),
])
def test_any_changed_field_breaks_the_kms_signature(
    state: KmsState, issuer: ProvenanceIssuer, field: str, value: object
) -> None:
    statement = {**issuer.issue(*wallet()), field: value}
    with pytest.raises(ProvenanceError) as info:
        verify_statement(statement, pin(state))
    assert info.value.code == "statement_unauthenticated"


def _resign(state: KmsState, statement: dict[str, Any]) -> dict[str, Any]:
    """As a KMS would sign it: the Ed25519 part is right, so what is checked is the rest."""
    body = {k: v for k, v in statement.items() if k != "signature"}
    return {**body, "signature": p.b64e(state.identity.sign(provenance.signing_bytes(body)))}


def test_eip712_signature_of_another_signer_is_refused(
    state: KmsState, issuer: ProvenanceIssuer,
) -> None:
    statement = issuer.issue(*wallet())
    impostor = Account.create()
    message = provenance.statement_eip712(parse_statement(statement))
    forged = _resign(state, {**statement, "signer_signature":
                             "0x" + signer.sign_typed(impostor, message).hex()})
    with pytest.raises(ProvenanceError) as info:
        verify_statement(forged, pin(state))
    assert info.value.code == "signer_signature_invalid"


def test_high_s_twin_and_bad_v_are_refused(state: KmsState, issuer: ProvenanceIssuer) -> None:
    statement = issuer.issue(*wallet())
    sig = bytes.fromhex(statement["signer_signature"][2:])
    s = int.from_bytes(sig[32:64], "big")
    twin = sig[:32] + (N - s).to_bytes(32, "big") + bytes([55 - sig[64]])
    for bad in (twin, sig[:64] + b"\x01", sig[:32] + bytes(32) + sig[64:]):
        forged = _resign(state, {**statement, "signer_signature": "0x" + bad.hex()})
        with pytest.raises(ProvenanceError) as info:
            verify_statement(forged, pin(state))
        assert info.value.code == "signer_signature_invalid"


def test_address_that_is_not_the_public_keys_is_refused(
    state: KmsState, issuer: ProvenanceIssuer,
) -> None:
    statement = _resign(state, {**issuer.issue(*wallet()), "address": "0x" + "12" * 20})
    with pytest.raises(ProvenanceError) as info:
        verify_statement(statement, pin(state))
    assert info.value.code == "address_mismatch"


@pytest.mark.parametrize("expect", [
    {"application": APP_B}, {"name": "other"}, {"key_type": "ed25519"},
    {"public_key": "0x04" + "00" * 64}, {"chain_id": 1}, {"contract": "0x" + "00" * 20},
])
def test_expectations_that_differ_are_a_mismatch(
    state: KmsState, issuer: ProvenanceIssuer, expect: dict[str, Any]
) -> None:
    with pytest.raises(ProvenanceError) as info:
        verify_statement(issuer.issue(*wallet()), pin(state), **expect)
    assert info.value.code == "statement_mismatch"


@pytest.mark.parametrize("mutate", [
    lambda s: "not json",
    lambda s: json.dumps([s]),
    lambda s: json.dumps({**s, "v": 2}),
    lambda s: json.dumps({**s, "v": True}),
    lambda s: json.dumps({**s, "extra": 1}),
    lambda s: json.dumps({k: v for k, v in s.items() if k != "signer"}),
    lambda s: json.dumps({**s, "name": "../etc"}),
    lambda s: json.dumps({**s, "application": "0xAB"}),
    lambda s: json.dumps({**s, "chain_id": 0}),
    lambda s: json.dumps({**s, "chain_id": "1"}),
    lambda s: json.dumps({**s, "public_key": "0x03" + "00" * 32}),
    lambda s: json.dumps({**s, "signer_signature": "0x00"}),
    lambda s: json.dumps({**s, "kms_identity": "rsa:abc"}),
    lambda s: json.dumps({**s, "signature": "***"}),
    lambda s: json.dumps({**s, "type": "Not A Type"}),
    lambda s: " " * (provenance.MAX_STATEMENT_SIZE + 1),
    lambda s: b"\xff\xfe",
])
def test_malformed_statements_are_refused_by_form(
    state: KmsState, issuer: ProvenanceIssuer, mutate: Any
) -> None:
    with pytest.raises(ProvenanceError) as info:
        verify_statement(mutate(issuer.issue(*wallet())), pin(state))
    assert info.value.code == "statement_malformed"


def test_without_eth_account_a_secp256k1_statement_is_dependency_missing(
    state: KmsState, issuer: ProvenanceIssuer, monkeypatch: pytest.MonkeyPatch
) -> None:
    statement = issuer.issue(*wallet())
    ed = issuer.issue(APP_A, p.KeyRequest("signing", 32, "ed25519"))
    real_import = builtins.__import__

    def no_eth(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith(("eth_account", "eth_keys")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_eth)
    with pytest.raises(ProvenanceError) as info:
        verify_statement(statement, pin(state))
    assert info.value.code == "dependency_missing"
    assert verify_statement(ed, pin(state)).statement.key_type == "ed25519"  # needs nothing


def test_no_registered_signer_or_a_foreign_one_is_signer_unavailable(
    state: KmsState, tmp_path: Path
) -> None:
    ring = signer.SignerKeyring(tmp_path)
    held = ring.new()
    for registered in ("0x" + "00" * 20, Account.create().address):
        choice = SignerChoice(signer.RegisteredSigner(read=lambda r=registered: r), ring)
        with pytest.raises(UnavailableError) as info:
            ProvenanceIssuer(state, CHAIN_ID, CONTRACT, choice).issue(*wallet())
        assert info.value.code == ErrorCode.SIGNER_UNAVAILABLE
    choice = SignerChoice(signer.RegisteredSigner(read=lambda: held), ring)
    statement = ProvenanceIssuer(state, CHAIN_ID, CONTRACT, choice).issue(*wallet())
    assert statement["signer"] == held
    with pytest.raises(UnavailableError):
        ProvenanceIssuer(state, CHAIN_ID, CONTRACT, None).issue(*wallet())


def test_signer_keyring_files_are_private_and_ordered(tmp_path: Path) -> None:
    ring = signer.SignerKeyring(tmp_path, clock=lambda: 1_700_000_000.0)
    first, second = ring.new(), ring.new()  # the same clock: still two ordered files
    assert ring.addresses() == [first, second] and ring.newest() == second
    for path in (tmp_path / "signers").iterdir():
        assert path.stat().st_mode & 0o077 == 0
        assert first not in repr(ring)
    assert ring.account(first).address == first
    (tmp_path / "signers" / "junk.key").write_text("ignored")
    assert ring.addresses() == [first, second]


def test_registered_signer_is_cached_for_the_revocation_delay() -> None:
    now = [0.0]
    reads: list[str] = []
    current = ["0x" + "01" * 20]

    def read() -> str:
        reads.append(current[0])
        return current[0]

    registered = signer.RegisteredSigner(read=read, max_staleness=2.0, clock=lambda: now[0])
    assert registered.current() == current[0]
    current[0] = "0x" + "02" * 20
    now[0] = 1.9
    assert registered.current() == "0x" + "01" * 20
    now[0] = 2.0
    assert registered.current() == "0x" + "02" * 20
    assert len(reads) == 2


@pytest.mark.parametrize("query,message", [
    ((None, "w", "secp256k1"), "application, name and type"),
    (("app-a", "w", "raw"), "no public half"),
    (("app-a", "w", "rsa"), "key type"),
    (("app-a", "../w", "ed25519"), "key name"),
    (("0x12", "w", "ed25519"), "application id"),
])
def test_provenance_queries_that_are_bad_requests(query: Any, message: str) -> None:
    from mock_kms.errors import InvalidError

    with pytest.raises(InvalidError) as info:
        parse_query(*query)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert message in info.value.message


# --- keyutil verify-provenance ---------------------------------------------------------------


def _verify(*args: str) -> Any:
    return CliRunner().invoke(cli, ["verify-provenance", *args])


def test_verify_provenance_cli(state: KmsState, issuer: ProvenanceIssuer,
                               tmp_path: Path) -> None:
    path = tmp_path / "wallet.json"
    path.write_bytes(parse_statement(issuer.issue(*wallet())).to_bytes())
    pin_text = state.identity_text
    ok = _verify("--kms-pubkey", pin_text, str(path), "--application", "app-a",
                 "--chain-id", str(CHAIN_ID))
    assert ok.exit_code == 0, ok.output
    assert "valid: secp256k1 key 'wallet'" in ok.output and "address" in ok.output
    as_json = _verify("--kms-pubkey", pin_text, str(path), "--json")
    assert json.loads(as_json.output)["address"] == provenance.account_of(
        json.loads(path.read_text())["public_key"])
    pin_file = tmp_path / "kms.pub"
    pin_file.write_text(pin_text + "\n")
    assert _verify("--kms-pubkey", f"@{pin_file}", str(path)).exit_code == 0
    other = _verify("--kms-pubkey", pin_text, str(path), "--application", "app-b", "--json")
    assert other.exit_code == 6
    assert json.loads(other.output.splitlines()[0])["error"] == "statement_mismatch"
    wrong = p.format_identity(ed25519.Ed25519PrivateKey.generate().public_key())
    assert _verify("--kms-pubkey", wrong, str(path)).exit_code == 6
    assert _verify("--kms-pubkey", "ed25519:xx", str(path)).exit_code == 2
    assert _verify("--kms-pubkey", pin_text, str(tmp_path / "missing.json")).exit_code == 2
    assert _verify(str(path)).exit_code == 2
    assert _verify("--kms-pubkey", pin_text, str(path), "--application", "x" * 40).exit_code == 2


def test_secp256k1_public_key_matches_cryptography_point() -> None:
    seed = (123456789).to_bytes(32, "big")
    key = ec.derive_private_key(123456789, ec.SECP256K1())
    point = key.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    assert keytypes.get("secp256k1").public(seed) == "0x" + point.hex()


# --- the enclave's check of the statements in an answer ------------------------------------


def _answer_for(issuer: ProvenanceIssuer, state: KmsState, key: p.KeyRequest,
                app: bytes = APP_A) -> tuple[Any, Any]:
    from keyutil.client import ReleasedKey, ReleaseRequest

    request = ReleaseRequest(keys=(key,), suite=p.SUITE_X25519, identity=pin(state))
    released = ReleasedKey(key.name, bytearray(state.derive_key(app, key)), key.type)
    answer = {"application": "0x" + app.hex(),
              "keys": [{**key.to_json(), "provenance": issuer.issue(app, key)}]}
    return request, (released, answer)


def test_enclave_accepts_its_own_statement(state: KmsState, issuer: ProvenanceIssuer) -> None:
    from keyutil.client import check_statements

    request, (released, answer) = _answer_for(issuer, state, wallet()[1])
    (statement,) = check_statements(request, [released], answer)
    assert statement.address == Account.from_key(bytes(released.value)).address


@pytest.mark.parametrize("tamper", ["another_key", "another_app", "unsigned", "garbage"])
def test_enclave_rejects_a_statement_not_about_its_key(
    state: KmsState, issuer: ProvenanceIssuer, tamper: str
) -> None:
    from keyutil.client import AnswerRejected, check_statements

    key = wallet()[1]
    request, (released, answer) = _answer_for(issuer, state, key)
    entry = answer["keys"][0]
    if tamper == "another_key":
        entry["provenance"] = issuer.issue(APP_A, p.KeyRequest("other", 32, "secp256k1"))
    elif tamper == "another_app":
        entry["provenance"] = issuer.issue(APP_B, key)
    elif tamper == "unsigned":
        entry["provenance"] = {**entry["provenance"], "signature": p.b64e(bytes(64))}
    else:
        entry["provenance"] = {"v": 1}
    with pytest.raises(AnswerRejected) as info:
        check_statements(request, [released], answer)
    assert info.value.code == "answer_provenance_invalid"


def test_provenance_endpoint_is_not_found_without_an_issuer(tmp_path: Path) -> None:
    import io

    from mock_kms.allowlist import EmbeddedAllowlist
    from mock_kms.server import KmsApp
    from mock_kms.service import ReleaseService
    from mock_kms.verifier import AttestationVerifier

    service = ReleaseService(verifier=AttestationVerifier.aws(),
                             allowlist=EmbeddedAllowlist.create(),
                             state=KmsState.load_or_create(tmp_path / "state"))
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/v1/provenance",
               "QUERY_STRING": "application=a&name=w&type=ed25519",
               "wsgi.input": io.BytesIO()}
    body = json.loads(b"".join(KmsApp(service)(environ, lambda s, h: status.append(s))))
    assert status[0].startswith("404") and body["error"] == "not_found"


# --- the worked example of docs/protocol.md ------------------------------------------------

VECTOR = Path(__file__).parent / "vectors" / "provenance-secp256k1.json"
VECTOR_PIN = "ed25519:iojj3XQJ8ZX9UtstPLpdcspnCb8dlBIb83SIAbQPb1w="


def test_the_documented_statement_verifies_step_by_step_as_docs_describe() -> None:
    """docs/protocol.md's example, checked the way another language would: by its bytes."""
    import base64

    from eth_account.messages import encode_typed_data
    from eth_utils.crypto import keccak

    statement = json.loads(VECTOR.read_text())
    # 1. Ed25519 over the context, a zero byte and the canonical JSON without "signature".
    body = {k: v for k, v in statement.items() if k != "signature"}
    signed = b"nitro-keyrelease/v1/provenance\x00" + json.dumps(
        body, sort_keys=True, separators=(",", ":")).encode()
    identity = ed25519.Ed25519PublicKey.from_public_bytes(
        base64.b64decode(VECTOR_PIN.removeprefix("ed25519:")))
    identity.verify(base64.b64decode(statement["signature"]), signed)
    # 2. EIP-712: the digests docs/protocol.md prints, and ecrecover gives the signer.
    signable = encode_typed_data(full_message=provenance.statement_eip712(
        parse_statement(statement)))
    assert signable.header.hex() == (
        "15f1d49ae88d370d1e3d366d24c7b39df9cf234215f73e14eb29ecd056bbde3f")
    assert signable.body.hex() == (
        "7ede1846548e81c1e55a4d4a9d462489237ae5f3e90a13897d731d8a6fda8cd8")
    assert keccak(b"\x19\x01" + signable.header + signable.body).hex() == (
        "ac6da105c4c464d1f8ca0d14f413d640e9ee86009a58db17381760b834d35509")
    assert Account.recover_message(
        signable, signature=bytes.fromhex(statement["signer_signature"][2:])
    ) == statement["signer"]
    # 3. The account is keccak-256 of x || y, last 20 bytes.
    point = bytes.fromhex(statement["public_key"][4:])
    assert keccak(point)[12:].hex() == statement["address"][2:].lower()
    docs = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    assert statement["signature"] in docs and statement["signer_signature"] in docs
    assert verify_statement(statement, p.parse_identity(VECTOR_PIN)).signer_checked


def test_verifying_statements_never_imports_web3_and_ed25519_needs_no_eth(
    tmp_path: Path, state: KmsState, issuer: ProvenanceIssuer
) -> None:
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "from keyutil import provenance, protocol\n"
        "pin = protocol.parse_identity(sys.argv[2])\n"
        "provenance.verify_statement(open(sys.argv[1], 'rb').read(), pin)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'web3', 'mock_kms', 'eth_account', 'eth_keys', 'requests'}))\n"
    )
    ed = tmp_path / "ed25519.json"
    ed.write_bytes(parse_statement(issuer.issue(APP_A, p.KeyRequest("s", 32, "ed25519")))
                   .to_bytes())
    for path, pin_text, expected in (
        (ed, state.identity_text, "[]"),
        (VECTOR, VECTOR_PIN, "['eth_account', 'eth_keys']"),
    ):
        out = subprocess.run([sys.executable, "-c", code, str(path), pin_text],
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == expected
