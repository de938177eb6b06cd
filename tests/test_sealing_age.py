"""The age format, in-process and against the stock age CLI: interop, and every way a sealed
file can be damaged, refused with its code."""

from __future__ import annotations

import io
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from keyutil import keytypes
from keyutil.sealing import age
from keyutil.sealing.age import CHUNK, SEALED_CHUNK, Identity, Recipient, SealedError

SEED = bytes(range(32))
OTHER = bytes(range(1, 33))
needs_age = pytest.mark.usefixtures("age_cli")


@pytest.fixture(scope="module")
def me() -> Identity:
    return Identity(SEED)


@pytest.fixture
def identity_file(tmp_path: Path) -> Path:
    path = tmp_path / "id.key"
    path.write_bytes(keytypes.get("age").private_file(SEED, "age"))
    return path


def sealed(data: bytes, *recipients: Recipient) -> bytes:
    out = io.BytesIO()
    age.seal(io.BytesIO(data), out, list(recipients))
    return out.getvalue()


def opened(blob: bytes, identity: Identity) -> bytes:
    out = io.BytesIO()
    size = age.unseal(io.BufferedReader(io.BytesIO(blob)), out.write, identity)  # type: ignore[arg-type]
    assert size == len(out.getvalue())
    return out.getvalue()


def refused(blob: bytes, identity: Identity) -> str:
    chunks: list[bytes] = []
    with pytest.raises(SealedError) as err:
        age.unseal(io.BytesIO(blob), chunks.append, identity)
    return err.value.code


SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17]


@needs_age
@pytest.mark.parametrize("size", SIZES)
def test_sealed_by_age_opened_here_and_back(
    size: int, me: Identity, identity_file: Path
) -> None:
    data = os.urandom(size)
    by_age = subprocess.run(
        ["age", "-r", str(me.recipient)], input=data, capture_output=True, check=True
    ).stdout
    assert opened(by_age, me) == data
    ours = sealed(data, Identity(OTHER).recipient, me.recipient)
    by_us = subprocess.run(
        ["age", "-d", "-i", str(identity_file)], input=ours, capture_output=True, check=True
    ).stdout
    assert by_us == data


def layout(blob: bytes) -> tuple[int, list[int]]:
    """(offset of the payload nonce, offsets of each chunk) of a sealed file."""
    header_end = blob.index(b"\n---") + 1
    payload = blob.index(b"\n", header_end) + 1
    first = payload + age.NONCE_LENGTH
    starts = list(range(first, len(blob), SEALED_CHUNK))
    return payload, starts


@pytest.fixture(scope="module")
def three(me: Identity) -> tuple[bytes, bytes]:
    data = os.urandom(2 * CHUNK + 1000)
    return data, sealed(data, me.recipient)


def test_truncation_at_every_chunk_boundary_is_refused(
    three: tuple[bytes, bytes], me: Identity
) -> None:
    _, blob = three
    payload, starts = layout(blob)
    assert len(starts) == 3
    cuts = {
        "inside the header": 30,
        "after the header": payload,
        "inside the nonce": payload + 5,
        "after the nonce": starts[0],
        "after chunk 0": starts[1],
        "after chunk 1": starts[2],
        "inside chunk 1": starts[1] + 100,
        "inside the last chunk": len(blob) - 1,
    }
    codes = {what: refused(blob[:at], me) for what, at in cuts.items()}
    assert codes == {
        "inside the header": "sealed_header_invalid",
        "after the header": "sealed_truncated",
        "inside the nonce": "sealed_truncated",
        "after the nonce": "sealed_truncated",
        "after chunk 0": "sealed_truncated",
        "after chunk 1": "sealed_truncated",
        "inside chunk 1": "sealed_altered",
        "inside the last chunk": "sealed_altered",
    }


def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


def test_a_flipped_byte_in_each_part_is_refused(three: tuple[bytes, bytes], me: Identity) -> None:
    _, blob = three
    payload, starts = layout(blob)
    stanza = blob.index(b"-> X25519 ")
    body = blob.index(b"\n", stanza) + 1
    footer = blob.index(b"\n---") + 1
    parts = {
        "intro": 3,
        "stanza type": stanza + 4,
        "stanza share": stanza + 12,
        "stanza body": body + 5,
        "header mac": footer + 10,
        "payload nonce": payload + 3,
        "chunk 0": starts[0] + 7,
        "chunk 1": starts[1] + SEALED_CHUNK - 1,  # its tag
        "last chunk": len(blob) - 20,
    }
    codes = {part: refused(flip(blob, at), me) for part, at in parts.items()}
    assert codes["intro"] == "sealed_header_invalid"
    assert codes["stanza type"] == "sealed_not_for_key"  # not an X25519 stanza any more
    assert codes["stanza share"] in ("sealed_not_for_key", "sealed_header_invalid")
    assert codes["stanza body"] in ("sealed_not_for_key", "sealed_header_invalid")
    assert codes["header mac"] in ("sealed_header_altered", "sealed_header_invalid")
    for part in ("payload nonce", "chunk 0", "chunk 1", "last chunk"):
        assert codes[part] == "sealed_altered", part


def test_a_header_mac_that_does_not_match_is_refused(me: Identity) -> None:
    a, b = sealed(b"a" * 10, me.recipient), sealed(b"b" * 10, me.recipient)
    # b's MAC line on a's header: well-formed, wrong MAC.
    mac_a, mac_b = (x[x.index(b"\n---") : x.index(b"\n", x.index(b"\n---") + 1)] for x in (a, b))
    assert refused(a.replace(mac_a, mac_b), me) == "sealed_header_altered"


def test_swapped_chunks_are_refused(three: tuple[bytes, bytes], me: Identity) -> None:
    _, blob = three
    _, starts = layout(blob)
    c0 = blob[starts[0] : starts[1]]
    c1 = blob[starts[1] : starts[2]]
    swapped = blob[: starts[0]] + c1 + c0 + blob[starts[2] :]
    assert refused(swapped, me) == "sealed_altered"
    dropped = blob[: starts[1]] + blob[starts[2] :]
    assert refused(dropped, me) == "sealed_altered"
    doubled = blob[: starts[2]] + c1 + blob[starts[2] :]
    assert refused(doubled, me) == "sealed_altered"


def test_data_after_the_final_chunk_is_refused(me: Identity) -> None:
    blob = sealed(b"x" * CHUNK, me.recipient)  # exactly one full, final chunk
    assert refused(blob + b"more", me) == "sealed_trailing_data"


def test_a_header_for_another_recipient_is_refused(me: Identity) -> None:
    blob = sealed(b"secret", Identity(OTHER).recipient)
    assert refused(blob, me) == "sealed_not_for_key"


def test_an_empty_final_chunk_after_data_is_refused(me: Identity) -> None:
    # Built by hand: a full chunk marked not-last, then an empty last chunk (what no
    # conforming sealer writes: the full chunk itself must be the last).
    blob = sealed(b"y" * CHUNK, me.recipient)
    payload, starts = layout(blob)
    header = age.read_header(io.BytesIO(blob))
    file_key = age.unwrap(header, [me])
    nonce = blob[payload : payload + age.NONCE_LENGTH]
    aead = ChaCha20Poly1305(age._hkdf(file_key, nonce, b"payload"))
    body = aead.encrypt(age._chunk_nonce(0, False), b"y" * CHUNK, None)
    body += aead.encrypt(age._chunk_nonce(1, True), b"", None)
    assert refused(blob[: starts[0]] + body, me) == "sealed_altered"


def test_an_empty_file_opens(me: Identity) -> None:
    assert opened(sealed(b"", me.recipient), me) == b""


HEADER = b"age-encryption.org/v1\n"


@pytest.mark.parametrize(
    ("blob", "needle"),
    [
        (b"", "ends inside"),
        (b"age-encryption.org/v2\n", "expected the line"),
        (b"-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n", "ASCII-armored"),
        (HEADER + b"--- " + b"A" * 43 + b"\n", "no recipient stanza"),
        (HEADER + b"-> X25519  x\n\n--- " + b"A" * 43 + b"\n", "empty or bad field"),
        (HEADER + b"-> X25519 x\n" + b"A" * 65 + b"\n", "exceeds 64 columns"),
        (HEADER + b"-> X25519 x\nAA==\n", "non-canonical"),
        (HEADER + b"-> X25519 x\nA*A\n", "unpadded base64"),
        (HEADER + b"-> X25519 x\nAB\n", "non-canonical"),
        (HEADER + b"-> X25519 x\n\nnot the footer\n", "expected a stanza or"),
        (HEADER + b"-> X25519 x\n\n--- AAAA\n", "not 32 bytes"),
        (HEADER + b"-> a\n\n" * 65, "more than 64 stanzas"),
        (HEADER + b"-> " + b"a" * 5000 + b"\n", "too long"),
        (HEADER + b"-> a\n" + (b"A" * 64 + b"\n") * 1100, "header exceeds"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_headers_are_refused(blob: bytes, needle: str, me: Identity) -> None:
    with pytest.raises(SealedError) as err:
        age.unseal(io.BytesIO(blob + b"\x00" * 40), lambda _: None, me)
    assert err.value.code == "sealed_header_invalid"
    assert needle in err.value.message


@pytest.mark.parametrize(
    ("args", "body_len", "needle"),
    [(2, 32, "wrong shape"), (1, 31, "wrong shape"), (1, 32, "share is not 32 bytes")],
)
def test_x25519_stanzas_of_the_wrong_shape(
    args: int, body_len: int, needle: str, me: Identity
) -> None:
    share = age._b64encode(b"s" * (32 if needle == "wrong shape" else 31))
    stanza = age.Stanza(b"X25519", (share,) * args, b"b" * body_len)
    header = age.Header((stanza,), b"m" * 32, b"")
    with pytest.raises(SealedError, match=needle):
        age.unwrap(header, [me])


def test_a_small_order_share_is_refused(me: Identity) -> None:
    stanza = age.Stanza(b"X25519", (age._b64encode(bytes(32)),), b"b" * 32)
    with pytest.raises(SealedError, match="small order"):
        age.unwrap(age.Header((stanza,), b"m" * 32, b""), [me])


def test_identity_files_and_recipients() -> None:
    text = keytypes.get("age").private_file(SEED, "age")
    (identity,) = Identity.from_file(b"\n# a comment\n" + text + b"\n")
    assert str(identity.recipient) == keytypes.get("age").public(SEED)
    assert "AGE-SECRET" not in repr(identity)
    for bad in (b"", b"# only a comment\n", b"AGE-SECRET-KEY-1QQQQ\n", b"\xff\n"):
        with pytest.raises(SealedError) as err:
            Identity.from_file(bad)
        assert err.value.code == "identity_invalid"
    assert str(Recipient.parse(str(identity.recipient).upper())) == str(identity.recipient)
    for bad_recipient in ("age1qqqq", "AGE-SECRET-KEY-1", str(identity.recipient)[:-1] + "x"):
        with pytest.raises(SealedError) as err:
            Recipient.parse(bad_recipient)
        assert err.value.code == "recipient_invalid"


@needs_age
def test_differential_against_stock_age_on_damaged_files(tmp_path: Path) -> None:
    """Mutants of the fuzzer's seeds: the stock age CLI and this opener agree on every one
    (both refuse, or both open it to the same plaintext)."""
    from fuzz.mutate import RandomChooser
    from fuzz.sealed import FUZZ_IDENTITY, SealedTarget

    identity = tmp_path / "fuzz.key"
    scalar = bytes(range(7, 39))
    assert str(Identity(scalar).recipient) == str(FUZZ_IDENTITY.recipient)
    identity.write_bytes(keytypes.get("age").private_file(scalar, "age"))
    target = SealedTarget()
    chooser = RandomChooser(4242)
    kinds = set()
    for _ in range(150):
        execution = target.one(chooser)
        theirs = subprocess.run(["age", "-d", "-i", str(identity)], input=execution.data,
                                capture_output=True)
        ours_ok = execution.kind == "accepted"
        assert ours_ok == (theirs.returncode == 0), (execution.ops, execution.code, theirs.stderr)
        if ours_ok:
            out = io.BytesIO()
            age.unseal(io.BytesIO(execution.data), out.write, FUZZ_IDENTITY)
            assert out.getvalue() == theirs.stdout
        kinds.add(execution.code)
    assert len(kinds) >= 5, kinds


def test_a_pinned_digest_refuses_other_plaintext_after_the_last_chunk(me: Identity) -> None:
    import hashlib

    blob = sealed(b"z" * (CHUNK + 5), me.recipient)
    written: list[bytes] = []
    with pytest.raises(SealedError) as err:
        age.unseal(io.BytesIO(blob), written.append, me, expect_sha256=hashlib.sha256(b"x").digest())
    assert err.value.code == "sealed_digest_mismatch"
    assert sum(map(len, written)) == CHUNK + 5  # refused at the end: the caller publishes nothing
    pin = hashlib.sha256(b"z" * (CHUNK + 5)).digest()
    assert age.unseal(io.BytesIO(blob), lambda _: None, me, expect_sha256=pin) == CHUNK + 5
