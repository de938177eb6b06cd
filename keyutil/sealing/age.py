"""The age v1 file format (age-encryption.org/v1) with X25519 recipients, streaming.

    >>> import io
    >>> from keyutil.sealing.age import Identity, seal, unseal
    >>> me = Identity(bytes(range(32)))
    >>> sealed, opened = io.BytesIO(), io.BytesIO()
    >>> seal(io.BytesIO(b"weights"), sealed, [me.recipient])
    7
    >>> _ = sealed.seek(0)
    >>> unseal(sealed, opened.write, me)
    7
    >>> opened.getvalue()
    b'weights'

A file is a text header, then a binary payload::

    age-encryption.org/v1
    -> X25519 <base64 ephemeral share>          one stanza per recipient
    <base64 of the wrapped file key, 64 columns a line, the last line shorter>
    --- <base64 HMAC-SHA256 of the header up to and including "---">
    <16-byte nonce><STREAM: ChaCha20-Poly1305 chunks of 64 KiB plaintext + 16-byte tag>

The file key (16 random bytes) is wrapped to each recipient with ChaCha20-Poly1305 under
HKDF-SHA256(X25519 shared secret, salt = share || recipient, "age-encryption.org/v1/X25519");
the header MAC key is HKDF(file key, "", "header"); the payload key HKDF(file key, nonce,
"payload"). Chunk ``i`` is sealed with the nonce ``i`` (11 bytes, big-endian) || ``last``
(1 byte, 1 on the final chunk), so a chunk cannot be moved, dropped or duplicated, and a file
cut at a chunk boundary lacks its final chunk: every such change is refused.

Parse (:func:`read_header`), verify (:func:`unwrap`, :meth:`Header.check_mac`, the chunk
tags in :func:`open_payload`) and act (the caller's ``write``) are apart. Refusals are
:class:`SealedError` with a stable ``code`` (:data:`CODES`); no message carries key material
or plaintext. :func:`unseal` hands plaintext to ``write`` one authenticated chunk at a time and
returns only after the final chunk authenticated: a caller that publishes output on return
(:mod:`keyutil.sealing.streams`) never publishes a truncated or altered file.

Written on ``cryptography`` rather than bound to an age library: see
docs/adr/0008-age-sealing.md for the measurement.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import os
from collections.abc import Callable, Iterator, Sequence
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyutil import keytypes

INTRO = b"age-encryption.org/v1"
STANZA_PREFIX = b"-> "
FOOTER_PREFIX = b"---"
X25519_LABEL = b"age-encryption.org/v1/X25519"
CHUNK = 64 * 1024
TAG = 16
SEALED_CHUNK = CHUNK + TAG
NONCE_LENGTH = 16
FILE_KEY_LENGTH = 16
BODY_COLUMNS = 64
ARMOR_BEGIN = b"-----BEGIN AGE ENCRYPTED FILE-----"
# Limits on what the header may hold before it is authenticated (age itself sets none; real
# headers are a few hundred bytes).
MAX_HEADER = 64 * 1024
MAX_LINE = 4 * 1024
MAX_STANZAS = 64

CODES = {
    "sealed_header_invalid": "the input is not an age v1 file (or breaks its header rules)",
    "sealed_not_for_key": "no recipient stanza of the header opens with this identity",
    "sealed_header_altered": "the header's MAC does not verify: the header was altered",
    "sealed_truncated": "the input ends before its final chunk",
    "sealed_altered": "a chunk failed authentication: altered, reordered or cut",
    "sealed_trailing_data": "data follows the final chunk",
    "sealed_digest_mismatch": "the plaintext's SHA-256 is not the expected one",
    "identity_invalid": "the identity file holds no AGE-SECRET-KEY-1 line",
    "recipient_invalid": "not an age1 X25519 recipient",
}

Writer = Callable[[bytes], object]


class SealedError(Exception):
    """Sealed input refused. ``code`` is one of :data:`CODES`; ``message`` has no secret."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def _b64encode(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _b64decode(text: bytes, what: str) -> bytes:
    """Canonical unpadded standard base64 (age's encoding), or sealed_header_invalid."""
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SealedError("sealed_header_invalid", f"{what}: expected unpadded base64") from None
    if b"=" in text or _b64encode(data) != text:
        raise SealedError("sealed_header_invalid", f"{what}: non-canonical base64")
    return data


# -- Keys -----------------------------------------------------------------------------------


class Identity:
    """An X25519 age identity (the private half). Never printed, never in a message."""

    def __init__(self, scalar: bytes) -> None:
        if len(scalar) != 32:
            raise SealedError("identity_invalid", "an age X25519 identity is 32 bytes")
        self._key = x25519.X25519PrivateKey.from_private_bytes(scalar)
        self.recipient = Recipient(self._key.public_key())

    def __repr__(self) -> str:
        return f"Identity(recipient={self.recipient})"

    @classmethod
    def from_file(cls, text: bytes) -> list[Identity]:
        """Every ``AGE-SECRET-KEY-1...`` line of an identity file (comments and blank lines
        are skipped, as age does); identity_invalid if there is none or a line is damaged."""
        found = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                scalar = keytypes.bech32_decode(line.decode("ascii"), keytypes.AGE_IDENTITY_HRP)
            except (UnicodeDecodeError, keytypes.Bech32Error):
                raise SealedError(
                    "identity_invalid", f"identity file line {number}: not an AGE-SECRET-KEY-1"
                ) from None
            found.append(cls(scalar))
        if not found:
            raise SealedError("identity_invalid", "the identity file holds no AGE-SECRET-KEY-1")
        return found

    def share(self, ephemeral: x25519.X25519PublicKey) -> bytes:
        return self._key.exchange(ephemeral)


@dataclasses.dataclass(frozen=True)
class Recipient:
    """An X25519 age recipient, ``age1...``."""

    key: x25519.X25519PublicKey

    def raw(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def __str__(self) -> str:
        return keytypes.age_recipient(self.key)

    @classmethod
    def parse(cls, text: str) -> Recipient:
        try:
            raw = keytypes.bech32_decode(text.strip(), keytypes.AGE_RECIPIENT_HRP)
            if len(raw) != 32:
                raise keytypes.Bech32Error("length")
        except keytypes.Bech32Error:
            raise SealedError(
                "recipient_invalid", f"expected an age1... X25519 recipient; found {text[:12]!r}"
            ) from None
        return cls(x25519.X25519PublicKey.from_public_bytes(raw))


# -- The header -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stanza:
    type: bytes
    args: tuple[bytes, ...]
    body: bytes

    def encode(self) -> bytes:
        line = b" ".join((STANZA_PREFIX.rstrip(), self.type, *self.args)) + b"\n"
        text = _b64encode(self.body)
        # Full 64-column lines, then a shorter final line (empty when the body fills the last).
        rows = [text[i : i + BODY_COLUMNS] for i in range(0, len(text), BODY_COLUMNS)]
        if not rows or len(rows[-1]) == BODY_COLUMNS:
            rows.append(b"")
        return line + b"".join(row + b"\n" for row in rows)


@dataclasses.dataclass(frozen=True)
class Header:
    """A parsed header: its stanzas, its MAC, and the bytes the MAC covers."""

    stanzas: tuple[Stanza, ...]
    mac: bytes
    mac_input: bytes

    def check_mac(self, file_key: bytes) -> None:
        expected = hmac.new(_hkdf(file_key, b"", b"header"), self.mac_input, "sha256").digest()
        if not hmac.compare_digest(expected, self.mac):
            raise SealedError("sealed_header_altered", "the age header's MAC does not verify")


def _is_arg(arg: bytes) -> bool:
    return bool(arg) and all(0x21 <= b <= 0x7E for b in arg)


class _LineReader:
    """Lines of the header, within the header limits."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.consumed = bytearray()

    def line(self) -> bytes:
        line = self.stream.readline(MAX_LINE + 1)
        self.consumed += line
        if len(self.consumed) > MAX_HEADER:
            raise SealedError("sealed_header_invalid", f"the header exceeds {MAX_HEADER} bytes")
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE:
                raise SealedError("sealed_header_invalid", "a header line is too long")
            raise SealedError("sealed_header_invalid", "the input ends inside the age header")
        return line[:-1]


def read_header(stream: BinaryIO) -> Header:
    """Parse the header from ``stream``, leaving it at the payload's first byte.

    Strict, like the reference implementation: the exact intro line, stanzas of printable
    arguments separated by single spaces, bodies in canonical unpadded base64 wrapped at
    exactly 64 columns with a shorter final line, then ``--- MAC``.
    """
    lines = _LineReader(stream)
    first = lines.line()
    if first != INTRO:
        if first.startswith(ARMOR_BEGIN):
            raise SealedError(
                "sealed_header_invalid",
                "an ASCII-armored age file: open it with 'age -d', or seal without --armor",
            )
        raise SealedError("sealed_header_invalid", "expected the line 'age-encryption.org/v1'")
    stanzas: list[Stanza] = []
    line = lines.line()
    while line.startswith(STANZA_PREFIX):
        if len(stanzas) == MAX_STANZAS:
            raise SealedError("sealed_header_invalid", f"more than {MAX_STANZAS} stanzas")
        parts = line[len(STANZA_PREFIX) :].split(b" ")
        if not all(_is_arg(p) for p in parts):
            raise SealedError("sealed_header_invalid", "a stanza line has an empty or bad field")
        body = bytearray()
        while True:
            row = lines.line()
            if len(row) > BODY_COLUMNS:
                raise SealedError("sealed_header_invalid", "a stanza body line exceeds 64 columns")
            body += _b64decode(row, "stanza body")
            if len(row) < BODY_COLUMNS:
                break
        stanzas.append(Stanza(parts[0], tuple(parts[1:]), bytes(body)))
        line = lines.line()
    if not stanzas:
        raise SealedError("sealed_header_invalid", "the header has no recipient stanza")
    if not line.startswith(FOOTER_PREFIX + b" "):
        raise SealedError("sealed_header_invalid", "expected a stanza or the '--- MAC' line")
    mac = _b64decode(line[len(FOOTER_PREFIX) + 1 :], "header MAC")
    if len(mac) != 32:
        raise SealedError("sealed_header_invalid", "the header MAC is not 32 bytes")
    mac_input = bytes(lines.consumed[: len(lines.consumed) - len(line) - 1]) + FOOTER_PREFIX
    return Header(tuple(stanzas), mac, mac_input)


def _wrap_key(share: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return _hkdf(share, ephemeral + recipient, X25519_LABEL)


def unwrap(header: Header, identities: Sequence[Identity]) -> bytes:
    """The file key, from the first X25519 stanza one of ``identities`` opens, after checking
    the header MAC with it; sealed_not_for_key if none opens."""
    for stanza in header.stanzas:
        if stanza.type != b"X25519":
            continue  # another recipient type (or grease): not ours
        if len(stanza.args) != 1 or len(stanza.body) != FILE_KEY_LENGTH + TAG:
            raise SealedError("sealed_header_invalid", "an X25519 stanza of the wrong shape")
        ephemeral_raw = _b64decode(stanza.args[0], "X25519 share")
        if len(ephemeral_raw) != 32:
            raise SealedError("sealed_header_invalid", "an X25519 share is not 32 bytes")
        ephemeral = x25519.X25519PublicKey.from_public_bytes(ephemeral_raw)
        for identity in identities:
            try:
                shared = identity.share(ephemeral)
            except ValueError:  # a low-order point: the all-zero shared secret
                raise SealedError(
                    "sealed_header_invalid", "an X25519 share of small order"
                ) from None
            key = _wrap_key(shared, ephemeral_raw, identity.recipient.raw())
            try:
                file_key = ChaCha20Poly1305(key).decrypt(bytes(12), stanza.body, None)
            except InvalidTag:
                continue
            header.check_mac(file_key)
            return file_key
    raise SealedError(
        "sealed_not_for_key", "the file is not sealed to this identity (no stanza opens with it)"
    )


# -- The payload ----------------------------------------------------------------------------


def _read_full(stream: BinaryIO, buffer: bytearray) -> int:
    """Fill ``buffer`` from ``stream`` (short only at the end of the input); the count."""
    view = memoryview(buffer)
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not count:
            break
        filled += count
    return filled


def _chunk_nonce(counter: int, last: bool) -> bytes:
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def open_payload(stream: BinaryIO, file_key: bytes) -> Iterator[bytes]:
    """The plaintext chunks, each yielded only once its tag verified; the generator ends
    normally only after the final chunk authenticated and nothing follows it.

    Two chunk buffers: the next chunk is read before the current one is opened, because only
    the end of the input says which chunk is the final one.
    """
    nonce = bytearray(NONCE_LENGTH)
    if _read_full(stream, nonce) != NONCE_LENGTH:
        raise SealedError("sealed_truncated", "the input ends before the payload nonce")
    aead = ChaCha20Poly1305(_hkdf(file_key, bytes(nonce), b"payload"))
    current, following = bytearray(SEALED_CHUNK), bytearray(SEALED_CHUNK)
    size = _read_full(stream, current)
    counter = 0
    while True:
        if size < TAG:
            raise SealedError("sealed_truncated", f"the input ends before chunk {counter}")
        following_size = _read_full(stream, following) if size == SEALED_CHUNK else 0
        last = following_size == 0
        sealed = memoryview(current)[:size]
        try:
            plain = aead.decrypt(_chunk_nonce(counter, last), sealed, None)
        except InvalidTag:
            raise _explain(aead, counter, last, sealed) from None
        if last and not plain and counter > 0:
            raise SealedError("sealed_altered", "an empty final chunk after data")
        yield plain
        if last:
            return
        counter += 1
        if counter >= 1 << 88:  # pragma: no cover - 2**88 chunks
            raise SealedError("sealed_altered", "the chunk counter overflowed")
        current, following = following, current
        size = following_size


def _explain(aead: ChaCha20Poly1305, counter: int, last: bool, sealed: memoryview) -> SealedError:
    """Why chunk ``counter`` failed: it opens with the other ``last`` flag when the file was
    cut after it (or extended past it); otherwise it was altered or moved."""
    try:
        aead.decrypt(_chunk_nonce(counter, not last), sealed, None)
    except InvalidTag:
        return SealedError(
            "sealed_altered", f"chunk {counter} failed authentication (altered, moved or cut)"
        )
    if last:
        return SealedError("sealed_truncated", f"the input ends after chunk {counter}")
    return SealedError("sealed_trailing_data", f"data follows the final chunk {counter}")


def unseal(
    stream: BinaryIO,
    write: Writer,
    identity: Identity | Sequence[Identity],
    *,
    expect_sha256: bytes | None = None,
) -> int:
    """Open an age file from ``stream``: ``write`` each authenticated chunk of plaintext,
    return the plaintext size once the whole file authenticated; SealedError otherwise.

    ``expect_sha256``: the plaintext's SHA-256 as the author published it. age authenticates
    a file, not its author: the recipient is public, so anyone (a host) can seal a file of
    its own to it. With a digest pinned where the host cannot change it (the image), a
    substituted file is refused (``sealed_digest_mismatch``) like an altered one, after the
    last chunk and before the caller publishes anything.
    """
    identities = [identity] if isinstance(identity, Identity) else list(identity)
    header = read_header(stream)
    file_key = unwrap(header, identities)
    digest = hashlib.sha256() if expect_sha256 is not None else None
    total = 0
    for chunk in open_payload(stream, file_key):
        if digest is not None:
            digest.update(chunk)
        write(chunk)
        total += len(chunk)
    if digest is not None and not hmac.compare_digest(digest.digest(), expect_sha256 or b""):
        raise SealedError(
            "sealed_digest_mismatch",
            "the file opened, but its plaintext is not the one expected (--expect-sha256): "
            "sealed by someone else",
        )
    return total


# -- Sealing ----------------------------------------------------------------------------------


def x25519_stanza(file_key: bytes, recipient: Recipient) -> Stanza:
    ephemeral = x25519.X25519PrivateKey.generate()
    share = ephemeral.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = _wrap_key(ephemeral.exchange(recipient.key), share, recipient.raw())
    body = ChaCha20Poly1305(key).encrypt(bytes(12), file_key, None)
    return Stanza(b"X25519", (_b64encode(share),), body)


def seal(source: BinaryIO, destination: BinaryIO, recipients: Sequence[Recipient]) -> int:
    """Seal ``source`` to ``recipients`` as an age v1 file on ``destination``, streaming;
    the plaintext size. Any age implementation opens it."""
    if not recipients:
        raise ValueError("sealing needs at least one recipient")
    file_key = os.urandom(FILE_KEY_LENGTH)
    header = INTRO + b"\n" + b"".join(x25519_stanza(file_key, r).encode() for r in recipients)
    header += FOOTER_PREFIX
    mac = hmac.new(_hkdf(file_key, b"", b"header"), header, "sha256").digest()
    nonce = os.urandom(NONCE_LENGTH)
    destination.write(header + b" " + _b64encode(mac) + b"\n" + nonce)
    aead = ChaCha20Poly1305(_hkdf(file_key, nonce, b"payload"))
    current, following = bytearray(CHUNK), bytearray(CHUNK)
    size = _read_full(source, current)
    counter = total = 0
    while True:
        following_size = _read_full(source, following) if size == CHUNK else 0
        last = following_size == 0
        destination.write(
            aead.encrypt(_chunk_nonce(counter, last), memoryview(current)[:size], None)
        )
        total += size
        if last:
            return total
        counter += 1
        current, following = following, current
        size = following_size
