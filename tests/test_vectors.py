"""Real AWS-signed attestation documents verify at their own time, and only then."""

from __future__ import annotations

import datetime

import pytest
from conftest import ms, vector

from keyutil.measurements import os_image_hash
from mock_kms.attestation import parse_attestation
from mock_kms.errors import AttestationError, ErrorCode
from mock_kms.roots import AWS_NITRO_ROOT_G1_SHA256, aws_nitro_root, fingerprint_sha256
from mock_kms.verifier import AttestationPolicy, AttestationVerifier

SECOND = datetime.timedelta(seconds=1)
# Wide enough that only certificate validity decides at the edges of the leaf's window
# (the debug document was made 26 minutes after its leaf's notBefore).
GENEROUS = AttestationPolicy(
    max_age=datetime.timedelta(hours=4),
    clock_skew=datetime.timedelta(hours=1),
    allow_debug=True,
)

NONDEBUG_2022 = {
    "file": "aws-nondebug-2022-10-13.cose",
    "timestamp": 1665651482136,
    "module_id": "i-020b6af9246d90e92-enc0183d09086c24190",
    "pcrs": {
        0: "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b",
        1: "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f",
        2: "d8f114da658de5481f8d9ec73907feb553560787522f705c92d7d96beed8e15e2aa611984e098c576832c292e8dc469a",
        8: "8790eb3cce6c83d07e84b126dc61ca923333d6f66615c4a79157de48c5ab2418bdc60746ea7b7afbff03a1c6210201cb",
    },
    "os_image_hash": "0x959df09185f8ea3a073b2107a64feee2970b3251bb1770176c254fc4769fa48e",
    "debug": False,
    "sizes": {"public_key": None, "user_data": None, "nonce": 256},
}
DEBUG_2023 = {
    "file": "aws-debug-2023-09-18.cose",
    "timestamp": 1695049410860,
    "module_id": "i-0918f6c55e3b61d89-enc018aa8b8e2285d13",
    "pcrs": {0: "00" * 48, 1: "00" * 48, 2: "00" * 48, 8: "00" * 48},
    "os_image_hash": "0x81c611f35bff79491538b2f7cf201c7597a661a5c549633541c62bdc8af1613f",
    "debug": True,
    "sizes": {"public_key": None, "user_data": 91, "nonce": 256},
}
PUBKEY_2024 = {
    "file": "aws-nondebug-pubkey-2024-11-30.cose",
    "timestamp": 1732983768387,
    "module_id": "i-0de38b2b6853cc9e8-enc0193685e7fee7d85",
    "pcrs": {
        0: "ec74bfbe7f7445a6c7610e152935e028276f638042b74797b119648e13f7a3675796b721034c320f140ea001b41aeae2",
        1: "fa2593b59f3e4fc7daba5cbdddfd3449d67cd02d43bb1128885e8f38b914d081dccdb68fff6d5b7a76bcb866a18a74a3",
        2: "56ba201a72e36cd051e95e5c4724c899039b711770f4d9d4fe7a1de007119a10b364badcd35e90f728a5bdc910905723",
    },
    "os_image_hash": "0xb1aeca9b01ddb35438cb616a4099e22276656fc9715398d37ea0a949b9ea4c85",
    "debug": False,
    "sizes": {"public_key": 65, "user_data": None, "nonce": None},
}
ALL = [NONDEBUG_2022, DEBUG_2023, PUBKEY_2024]
ids = [v["file"] for v in ALL]


@pytest.fixture(scope="module")
def aws() -> AttestationVerifier:
    return AttestationVerifier.aws(policy=AttestationPolicy(allow_debug=True))


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_real_document_verifies_at_its_timestamp(case: dict, aws: AttestationVerifier) -> None:
    verified = aws.verify(vector(case["file"]), at=ms(case["timestamp"]))
    assert verified.module_id == case["module_id"]
    assert verified.document.timestamp_ms == case["timestamp"]
    assert verified.os_image_hash == case["os_image_hash"]
    assert verified.debug is case["debug"]
    for index, value in case["pcrs"].items():
        assert verified.document.pcrs[index].hex() == value
    assert sorted(verified.document.pcrs) == list(range(16))
    assert all(len(p) == 48 for p in verified.document.pcrs.values())
    for field, size in case["sizes"].items():
        value = getattr(verified, field)
        assert (value is None) if size is None else (len(value) == size)


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_os_image_hash_is_sha256_of_raw_pcrs(case: dict) -> None:
    doc = parse_attestation(vector(case["file"]))
    assert os_image_hash(doc.pcrs[0], doc.pcrs[1], doc.pcrs[2]) == case["os_image_hash"]


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_fails_one_second_after_leaf_not_after(case: dict) -> None:
    leaf_end = _leaf(case).not_valid_after_utc
    verifier = AttestationVerifier.aws(policy=GENEROUS)
    verifier.verify(vector(case["file"]), at=leaf_end)  # the last valid second
    with pytest.raises(AttestationError) as err:
        verifier.verify(vector(case["file"]), at=leaf_end + SECOND)
    assert err.value.code == ErrorCode.CERTIFICATE_EXPIRED


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_fails_one_second_before_leaf_not_before(case: dict) -> None:
    leaf_start = _leaf(case).not_valid_before_utc
    verifier = AttestationVerifier.aws(policy=GENEROUS)
    verifier.verify(vector(case["file"]), at=leaf_start)  # the first valid second
    with pytest.raises(AttestationError) as err:
        verifier.verify(vector(case["file"]), at=leaf_start - SECOND)
    assert err.value.code == ErrorCode.CERTIFICATE_NOT_YET_VALID


@pytest.mark.parametrize("case", ALL, ids=ids)
def test_expiry_edges_hold_on_the_cached_path_too(case: dict) -> None:
    verifier = AttestationVerifier.aws(policy=GENEROUS)
    at = ms(case["timestamp"])
    verifier.verify(vector(case["file"]), at=at)  # fills the chain cache
    with pytest.raises(AttestationError) as err:
        verifier.verify(vector(case["file"]), at=_leaf(case).not_valid_after_utc + SECOND)
    assert err.value.code == ErrorCode.CERTIFICATE_EXPIRED


def test_debug_document_refused_by_default() -> None:
    verifier = AttestationVerifier.aws()
    with pytest.raises(AttestationError) as err:
        verifier.verify(vector(DEBUG_2023["file"]), at=ms(DEBUG_2023["timestamp"]))
    assert err.value.code == ErrorCode.DEBUG_ENCLAVE


def test_debug_document_accepted_only_when_allowed_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    verifier = AttestationVerifier.aws(policy=AttestationPolicy(allow_debug=True))
    verified = verifier.verify(vector(DEBUG_2023["file"]), at=ms(DEBUG_2023["timestamp"]))
    assert verified.debug is True
    assert any("debug-mode enclave document" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", [NONDEBUG_2022, PUBKEY_2024], ids=lambda c: c["file"])
def test_real_document_too_old_at_default_max_age(case: dict) -> None:
    at = ms(case["timestamp"]) + datetime.timedelta(minutes=5, seconds=1)
    with pytest.raises(AttestationError) as err:
        AttestationVerifier.aws().verify(vector(case["file"]), at=at)
    assert err.value.code == ErrorCode.DOCUMENT_TOO_OLD


def test_real_documents_are_untagged_es384_with_all_nine_fields() -> None:
    for case in ALL:
        raw = vector(case["file"])
        assert raw[:8].hex() == "8444a1013822a059"
        doc = parse_attestation(raw)
        assert len(doc.cabundle) == 4
        assert doc.cabundle[0] == _root_der()


def test_embedded_root_matches_published_fingerprint() -> None:
    assert fingerprint_sha256(aws_nitro_root()) == AWS_NITRO_ROOT_G1_SHA256
    assert aws_nitro_root().subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"


def test_verification_time_must_be_timezone_aware() -> None:
    with pytest.raises(TypeError):
        AttestationVerifier.aws().verify(
            vector(NONDEBUG_2022["file"]), at=datetime.datetime(2022, 10, 13, 9, 0)
        )


def _leaf(case: dict):  # type: ignore[no-untyped-def]
    from cryptography import x509

    return x509.load_der_x509_certificate(parse_attestation(vector(case["file"])).certificate)


def _root_der() -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return aws_nitro_root().public_bytes(Encoding.DER)
