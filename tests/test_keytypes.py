"""Key types: the registry, the wire form, the derivation, the age identity against age-keygen."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyutil import keytypes
from keyutil import protocol as p
from keyutil.client import ReleasedKey, ReleaseRequest
from mock_kms.state import KEY_DERIVATION_SALT, KmsState

ROOT = bytes(range(32))
APP_A = b"app-a".ljust(32, b"\0")
APP_B = b"app-b".ljust(32, b"\0")


@pytest.fixture
def state() -> KmsState:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return KmsState(ROOT, ed25519.Ed25519PrivateKey.generate())


def test_raw_derivation_is_the_one_from_before_key_types(state: KmsState) -> None:
    # Pinned (computed by the KMS before key types): an upgraded KMS releases the same raw keys.
    key = state.derive_key(APP_A, p.KeyRequest("disk", 32))
    info = b"key\x00" + APP_A + b"\x00\x04disk" + b"\x00\x20"
    expected = HKDF(hashes.SHA256(), 32, KEY_DERIVATION_SALT, info).derive(ROOT)
    assert key == expected
    assert hashlib.sha256(key).hexdigest()[:16] == "6dd0f7e686e4d43a"


def test_a_type_shares_no_material_with_raw_or_another_app(state: KmsState) -> None:
    raw = state.derive_key(APP_A, p.KeyRequest("weights", 32))
    age = state.derive_key(APP_A, p.KeyRequest("weights", 32, "age"))
    other_app = state.derive_key(APP_B, p.KeyRequest("weights", 32, "age"))
    other_name = state.derive_key(APP_A, p.KeyRequest("weights2", 32, "age"))
    assert len({raw, age, other_app, other_name}) == 4
    assert state.derive_key(APP_A, p.KeyRequest("weights", 32, "age")) == age


def test_raw_request_json_and_binding_unchanged_a_typed_one_carries_its_type() -> None:
    raw = p.KeyRequest("k", 32)
    assert raw.to_json() == {"name": "k", "length": 32}
    assert p.KeyRequest("k", 32, "raw").to_json() == raw.to_json()
    age = p.KeyRequest("k", 32, "age")
    assert age.to_json() == {"name": "k", "length": 32, "type": "age"}
    nonce = b"n" * 16
    assert p.request_binding([raw], p.SUITE_X25519, nonce) != p.request_binding(
        [age], p.SUITE_X25519, nonce
    )
    assert p.seal_info(raw, nonce) != p.seal_info(age, nonce)


@pytest.mark.parametrize(
    ("name", "length", "kind", "needle"),
    [
        ("k", 32, "rsa", "key type"),
        ("k", 32, None, "key type"),
        ("k", 32, ["age"], "key type"),
        ("k", 16, "age", "a key of type age is 32 bytes"),
        ("k", 64, "age", "a key of type age is 32 bytes"),
    ],
)
def test_bad_key_types_are_bad_requests(name: str, length: int, kind: object, needle: str) -> None:
    with pytest.raises(p.ProtocolError) as err:
        p.KeyRequest(name, length, kind)  # type: ignore[arg-type]
    assert err.value.code == "bad_request"
    assert needle in err.value.message


def test_name_and_type_pairs_are_unique_a_name_may_come_as_two_types() -> None:
    both = (p.KeyRequest("k", 32), p.KeyRequest("k", 32, "age"))
    assert p.check_key_list(both) == both
    with pytest.raises(p.ProtocolError, match="distinct"):
        p.check_key_list((p.KeyRequest("k", 32, "age"), p.KeyRequest("k", 32, "age")))


def test_build_takes_one_type_for_all_or_one_per_key() -> None:
    request = ReleaseRequest.build(["a", "b"], types=["age"], identity=None)
    assert [k.type for k in request.keys] == ["age", "age"]
    request = ReleaseRequest.build(["a", "b"], types=["raw", "age"], identity=None)
    assert [k.type for k in request.keys] == ["raw", "age"]
    with pytest.raises(p.ProtocolError, match="one key type for all keys or one per key"):
        ReleaseRequest.build(["a", "b", "c"], types=["raw", "age"], identity=None)


def test_registry_refuses_a_taken_name_or_label() -> None:
    with pytest.raises(ValueError, match="taken"):
        keytypes.register(keytypes.AgeKey())

    class Clash(keytypes.AgeKey):
        name = "age2"

    with pytest.raises(ValueError, match="label is taken"):
        keytypes.register(Clash())
    with pytest.raises(keytypes.UnknownKeyType):
        keytypes.get("age2")


def test_formats() -> None:
    raw = keytypes.get("raw")
    assert raw.private_file(b"\x01\x02", "hex") == b"0102"
    assert raw.private_file(b"\x01\x02", "base64") == b"AQI="
    with pytest.raises(ValueError, match="format"):
        keytypes.get("age").private_file(ROOT, "hex")
    key = ReleasedKey("w", bytearray(ROOT), "age").private_file()
    assert key.value.startswith(b"# public key: age1")


def test_bech32_round_trip_and_refusals() -> None:
    text = keytypes.bech32_encode("age", ROOT)
    assert keytypes.bech32_decode(text, "age") == ROOT
    assert keytypes.bech32_decode(text.upper(), "age") == ROOT
    for bad in (
        text[:-1] + ("q" if text[-1] != "q" else "p"),  # checksum
        text[:5] + text[5].upper() + text[6:],  # mixed case
        "agf" + text[3:],  # another prefix
        text[:10] + "b" + text[11:],  # 'b' is not in the alphabet
    ):
        with pytest.raises(keytypes.Bech32Error):
            keytypes.bech32_decode(bad, "age")


@pytest.mark.usefixtures("age_cli")
def test_age_identity_is_what_age_keygen_reads(tmp_path: Path) -> None:
    age = keytypes.get("age")
    identity = tmp_path / "id.key"
    identity.write_bytes(age.private_file(ROOT, "age"))
    out = subprocess.run(
        ["age-keygen", "-y", str(identity)], capture_output=True, check=True, text=True
    )
    assert out.stdout.strip() == age.public(ROOT)
    # And the other way: an identity age-keygen made decodes to the scalar of its recipient.
    made = subprocess.run(["age-keygen"], capture_output=True, check=True, text=True).stdout
    secret_line = next(ln for ln in made.splitlines() if ln.startswith("AGE-SECRET-KEY-1"))
    public_line = next(ln for ln in made.splitlines() if ln.startswith("# public key: "))
    scalar = keytypes.bech32_decode(secret_line, keytypes.AGE_IDENTITY_HRP)
    assert age.public(scalar) == public_line.removeprefix("# public key: ")


@pytest.mark.slow
@pytest.mark.usefixtures("age_cli")
def test_get_key_type_age_end_to_end(tmp_path: Path) -> None:
    from e2e_support import Setup

    s = Setup(tmp_path)
    try:
        kms = s.kms().start().wait_listening()
        out = s.keys / "weights.key"
        args = ("--key", "weights", "--key", "weights", "--type", "age", "--type", "raw")
        result = s.get_key(kms.url, *args, "--stdout", "--format", "hex")
        assert result.returncode == 2, result.stderr  # hex applies to raw keys only
        result = s.get_key(kms.url, "--key", "weights", "--type", "age", "--out", str(out))
        assert result.returncode == 0, result.stderr.decode()
        recipient = subprocess.run(
            ["age-keygen", "-y", str(out)], capture_output=True, check=True, text=True
        ).stdout.strip()
        state = KmsState.load_or_create(s.state)
        assert recipient == state.public_key(APP_A, p.KeyRequest("weights", 32, "age"))
        raw = s.get_key(kms.url, "--key", "weights", "--stdout", "--format", "hex")
        assert bytes.fromhex(raw.stdout.decode()) == state.derive_key(
            APP_A, p.KeyRequest("weights", 32)
        )
    finally:
        s.close()
