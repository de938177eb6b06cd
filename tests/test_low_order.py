"""X25519 recipient keys of small order: refused as ``public_key_invalid``, by a table.

The KMS used to find a key of small order by a key exchange with a fresh key pair (a zero
shared secret); :func:`keyutil.protocol.x25519_small_order` finds the same by comparing the
reduced u-coordinate with the five of small order, and HPKE's own check when sealing stays
behind it. Each test here can fail: the table, the reduction of encodings, the order of
checks (the nonce stays unspent) and the seal's refusal.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from test_fuzz_regressions import LOW_ORDER_X25519, P25519, chain, release  # noqa: F401 (fixtures)
from test_service import Enclave

from keyutil import protocol as p
from mock_kms.errors import ErrorCode, KmsError
from mock_kms.service import ReleaseService

# Every encoding of the small-order points: the seven u values below 2^255 (p and p + 1
# are 0 and 1 unreduced) and each with the top bit set, which X25519 ignores.
ENCODINGS = [(u | top).to_bytes(32, "little") for u in LOW_ORDER_X25519 for top in (0, 1 << 255)]


def dh_refuses(data: bytes) -> bool:
    """What the KMS checked before: a key exchange with a fresh key pair fails."""
    try:
        x25519.X25519PrivateKey.generate().exchange(x25519.X25519PublicKey.from_public_bytes(data))
    except ValueError:
        return True
    return False


def test_fourteen_encodings() -> None:
    assert len(set(ENCODINGS)) == 14


@pytest.mark.parametrize("data", ENCODINGS, ids=[e.hex()[:4] + e.hex()[-2:] for e in ENCODINGS])
def test_the_table_refuses_what_the_key_exchange_refuses(data: bytes) -> None:
    assert dh_refuses(data)
    assert p.x25519_small_order(data)
    with pytest.raises(p.ProtocolError) as err:
        p.load_recipient_public(p.SUITE_X25519, data)
    assert err.value.code == "public_key_invalid"
    assert "low-order" in err.value.message


@pytest.mark.parametrize("data", ENCODINGS, ids=[e.hex()[:4] + e.hex()[-2:] for e in ENCODINGS])
def test_hpke_refuses_to_seal_to_each_encoding(data: bytes) -> None:
    """The library guarantee behind the KMS's second line: RFC 9180's check of the DH output."""
    key = x25519.X25519PublicKey.from_public_bytes(data)
    with pytest.raises(ValueError):
        p.hpke_suite(p.SUITE_X25519).encrypt(bytes(32), key, info=b"")


def test_the_table_accepts_what_the_key_exchange_accepts() -> None:
    """Neighbours of the small-order values (u +- 1, +- p) and random keys: both agree."""
    near = [
        v.to_bytes(32, "little")
        for u in LOW_ORDER_X25519
        for v in (u - 1, u + 1, u + P25519, u - P25519)
        if 0 <= v < 1 << 256
    ]
    randoms = [os.urandom(32) for _ in range(2000)]
    for data in near + randoms + [bytes([9]) + bytes(31)]:
        assert p.x25519_small_order(data) == dh_refuses(data), data.hex()


@pytest.mark.parametrize("data", ENCODINGS, ids=[e.hex()[:4] + e.hex()[-2:] for e in ENCODINGS])
def test_release_to_each_encoding_is_refused_before_the_nonce_is_spent(
    release: tuple[ReleaseService, Enclave],  # noqa: F811
    data: bytes,
) -> None:
    service, enclave = release
    with pytest.raises(KmsError) as err:
        service.release(enclave.request(service, public_key=data))
    assert err.value.code is ErrorCode.PUBLIC_KEY_INVALID
    assert "low-order" in err.value.message
    # Refused before the nonce was spent: the enclave's own request with it is released.
    outcome = service.release(enclave.request(service, nonce=enclave.nonce))
    assert len(enclave.open(service, outcome.answer)) == 1


@pytest.mark.parametrize("data", ENCODINGS[:4], ids=["u0", "u0-top", "u1", "u1-top"])
def test_the_seal_refuses_a_key_that_gets_past_the_table(
    release: tuple[ReleaseService, Enclave],  # noqa: F811
    data: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the table, HPKE refuses to seal: the same code, not an exception (HTTP 500)."""
    service, enclave = release
    monkeypatch.setattr(p, "x25519_small_order", lambda data: False)
    with pytest.raises(KmsError) as err:
        service.release(enclave.request(service, public_key=data))
    assert err.value.code is ErrorCode.PUBLIC_KEY_INVALID
    assert "low-order" in err.value.message
