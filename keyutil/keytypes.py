"""Key types: what a released key is, besides its bytes.

    >>> from keyutil import keytypes
    >>> age = keytypes.get("age")
    >>> seed = bytes(range(32))
    >>> age.public(seed)[:4], age.seed_length
    ('age1', 32)
    >>> age.private_file(seed, "age").splitlines()[-1][:16]
    b'AGE-SECRET-KEY-1'

A key type turns the 32-byte seed the KMS derives (HKDF over the root secret, the application,
the key's name and the type's :attr:`KeyType.label`, see mock_kms/state.py) into the key
material an application uses: ``raw`` is the bytes themselves (any length the request asks),
``age`` an X25519 identity ``AGE-SECRET-KEY-1...`` whose public half is the ``age1...``
recipient anyone can seal data to. The KMS and the enclave both import this module: the KMS
to publish public halves without attestation, the enclave to write the private file. It does
no I/O.

Adding a type: subclass :class:`KeyType` (name, label, :meth:`~KeyType.public`,
:meth:`~KeyType.private_file`, and :meth:`~KeyType.accepts` if not every 32-byte string is a
valid key, e.g. a scalar below a group order), and :func:`register` an instance. The name is
the wire form (``"type"`` in a key request); the label goes into the derivation and must
never change once keys have been released under it.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

DEFAULT_TYPE = "raw"
SEED_LENGTH = 32


class UnknownKeyType(ValueError):
    """A key type name that is not registered."""


class KeyType:
    """One kind of key. Subclasses set the class attributes and override the methods."""

    name: str = ""
    # 32 for every derived type; None for raw, whose length is the request's.
    seed_length: int | None = SEED_LENGTH
    # Goes into the HKDF info: distinct per type, fixed forever once keys were released.
    label: bytes = b""
    # What private_file can write; the first is what ``get-key`` writes by default.
    formats: tuple[str, ...] = ()

    def accepts(self, seed: bytes) -> bool:
        """True if ``seed`` is a valid key of this type (the KMS re-derives with a counter
        until it is; see mock_kms/state.py)."""
        return len(seed) == self.seed_length

    def public(self, seed: bytes) -> str | None:
        """The public half as text (``age1...``), or None for a type without one."""
        return None

    def private_file(self, seed: bytes, fmt: str) -> bytes:
        """What ``keyutil get-key`` writes for this key, in format ``fmt``."""
        raise NotImplementedError

    def _check_format(self, fmt: str) -> None:
        if fmt not in self.formats:
            raise ValueError(
                f"key type {self.name}: format {fmt!r} is not one of {', '.join(self.formats)}"
            )


class RawKey(KeyType):
    """The derived bytes themselves: a symmetric key of the requested length."""

    name = "raw"
    seed_length = None
    label = b""  # raw keeps the derivation it had before key types existed
    formats = ("raw", "hex", "base64")

    def accepts(self, seed: bytes) -> bool:
        return True

    def private_file(self, seed: bytes, fmt: str) -> bytes:
        import base64

        self._check_format(fmt)
        if fmt == "hex":
            return seed.hex().encode()
        if fmt == "base64":
            return base64.b64encode(seed)
        return bytes(seed)


class AgeKey(KeyType):
    """An age (age-encryption.org/v1) X25519 identity; the seed is the X25519 scalar."""

    name = "age"
    label = b"age-x25519"
    formats = ("age",)

    def public(self, seed: bytes) -> str:
        return age_recipient(x25519.X25519PrivateKey.from_private_bytes(seed).public_key())

    def private_file(self, seed: bytes, fmt: str) -> bytes:
        """The identity file ``age -d -i FILE`` reads: a comment with the recipient, then
        the ``AGE-SECRET-KEY-1...`` line (no creation time, so that it is reproducible)."""
        self._check_format(fmt)
        return (
            f"# public key: {self.public(seed)}\n"
            f"{bech32_encode(AGE_IDENTITY_HRP, seed).upper()}\n"
        ).encode()


_REGISTRY: dict[str, KeyType] = {}


def register(key_type: KeyType) -> None:
    """Add a type; its name and label must be new (a label shared would share keys)."""
    if not key_type.name or key_type.name in _REGISTRY:
        raise ValueError(f"key type name {key_type.name!r} is empty or taken")
    if any(t.label == key_type.label for t in _REGISTRY.values()):
        raise ValueError(f"key type {key_type.name}: its derivation label is taken")
    _REGISTRY[key_type.name] = key_type


def get(name: str) -> KeyType:
    """The registered type ``name``; UnknownKeyType if there is none."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownKeyType(
            f"key type: expected one of {', '.join(names())}; found {str(name)[:20]!r}"
        ) from None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


register(RawKey())
register(AgeKey())


# -- Bech32 (BIP 173), as age uses it: no 90-character limit ---------------------------------

AGE_RECIPIENT_HRP = "age"
AGE_IDENTITY_HRP = "age-secret-key-"
_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


class Bech32Error(ValueError):
    """Text that is not the Bech32 encoding asked for (the message names no secret)."""


def _polymod(values: Sequence[int]) -> int:
    checksum = 1
    for value in values:
        top = checksum >> 25
        checksum = (checksum & 0x1FFFFFF) << 5 ^ value
        for i, g in enumerate(_GENERATOR):
            if (top >> i) & 1:
                checksum ^= g
    return checksum


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _regroup(data: Sequence[int], src: int, dst: int, *, pad: bool) -> list[int]:
    acc = bits = 0
    keep = (1 << (src + dst - 1)) - 1
    out: list[int] = []
    for value in data:
        acc = ((acc << src) | value) & keep
        bits += src
        while bits >= dst:
            bits -= dst
            out.append((acc >> bits) & ((1 << dst) - 1))
    if pad and bits:
        out.append((acc << (dst - bits)) & ((1 << dst) - 1))
    elif not pad and (bits >= src or (acc << (dst - bits)) & ((1 << dst) - 1)):
        raise Bech32Error("bech32: non-zero or excess padding")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    """Lower-case Bech32 of ``data`` under human-readable part ``hrp``."""
    words = _regroup(data, 8, 5, pad=True)
    check = _polymod([*_hrp_expand(hrp), *words, 0, 0, 0, 0, 0, 0]) ^ 1
    words += [(check >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(_CHARSET[w] for w in words)


def bech32_decode(text: str, hrp: str) -> bytes:
    """The bytes of a Bech32 string whose human-readable part is ``hrp`` (either case, not
    mixed); Bech32Error otherwise."""
    if text.lower() != text and text.upper() != text:
        raise Bech32Error("bech32: mixed case")
    text = text.lower()
    split = text.rfind("1")
    if split < 1 or text[:split] != hrp or len(text) - split < 7:
        raise Bech32Error(f"bech32: expected the prefix {hrp}1")
    try:
        words = [_CHARSET.index(c) for c in text[split + 1 :]]
    except ValueError:
        raise Bech32Error("bech32: a character outside the Bech32 alphabet") from None
    if _polymod([*_hrp_expand(hrp), *words]) != 1:
        raise Bech32Error("bech32: bad checksum")
    return bytes(_regroup(words[:-6], 5, 8, pad=False))


def age_recipient(public_key: x25519.X25519PublicKey) -> str:
    """``age1...``: an X25519 public key as age writes recipients."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return bech32_encode(AGE_RECIPIENT_HRP, raw)


# -- Signing keys (issue 12): ed25519 and secp256k1 -------------------------------------------

SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class Ed25519Key(KeyType):
    """An Ed25519 signing key; the seed is the RFC 8032 private key (32 bytes).

    Formats: ``pem`` (default), PKCS#8 PEM as ``openssl pkey`` and cryptography's
    ``load_pem_private_key`` read it; ``raw``, the 32 bytes themselves (libsodium's seed,
    ``Ed25519PrivateKey.from_private_bytes``). Public half: ``0x`` + 64 hex digits (the raw
    RFC 8032 public key)."""

    name = "ed25519"
    label = b"ed25519"
    formats = ("pem", "raw")

    def public(self, seed: bytes) -> str:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return "0x" + raw.hex()

    def private_file(self, seed: bytes, fmt: str) -> bytes:
        from cryptography.hazmat.primitives.asymmetric import ed25519

        self._check_format(fmt)
        if fmt == "raw":
            return bytes(seed)
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class Secp256k1Key(KeyType):
    """A secp256k1 (Ethereum) key; the seed is the big-endian scalar, in [1, n-1] (the KMS
    re-derives with the next counter until it is: a miss has probability below 2^-127).

    Format ``hex``: ``0x`` + 64 hex digits, no newline, as ``cast wallet address
    --private-key "$(cat FILE)"`` and web3's ``Account.from_key`` take it. Public half: the
    uncompressed SEC1 point ``0x04`` + x + y (130 hex digits); its Ethereum account is
    keccak-256 of x || y, last 20 bytes (the provenance statement carries it)."""

    name = "secp256k1"
    label = b"secp256k1"
    formats = ("hex",)

    def accepts(self, seed: bytes) -> bool:
        return len(seed) == SEED_LENGTH and 0 < int.from_bytes(seed, "big") < SECP256K1_ORDER

    def public(self, seed: bytes) -> str:
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.derive_private_key(int.from_bytes(seed, "big"), ec.SECP256K1())
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return "0x" + point.hex()

    def private_file(self, seed: bytes, fmt: str) -> bytes:
        self._check_format(fmt)
        return b"0x" + seed.hex().encode()


register(Ed25519Key())
register(Secp256k1Key())
