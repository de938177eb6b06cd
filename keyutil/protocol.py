"""The key-release protocol, v1: messages, bindings, sealing and the answer's signature.

Both sides import this module; it does no I/O. See docs/protocol.md for the exchange.

    >>> from keyutil.protocol import KeyRequest, request_binding
    >>> keys = (KeyRequest("disk", 32),)
    >>> len(request_binding(keys, SUITE_X25519, b"nonce"))
    32

1. ``POST /v1/challenge`` gives a nonce (opaque to the client).
2. The client makes an HPKE key pair, and asks the NSM for a document with
   ``nonce`` = the challenge, ``public_key`` = its HPKE public key, and
   ``user_data`` = :func:`request_binding` of the keys it asks for and the suite.
3. ``POST /v1/release`` carries the document and the same key list; the KMS checks the
   binding, seals each derived key to the attested public key, and signs the whole answer
   with its identity key (Ed25519).
4. The client checks the signature against its pinned identity and opens the keys.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from keyutil import keytypes

PROTOCOL_VERSION = 1
SUITE_X25519 = "x25519-hkdf-sha256-aes-256-gcm"
SUITE_P384 = "p384-hkdf-sha384-aes-256-gcm"
SUITES = (SUITE_X25519, SUITE_P384)

KEY_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MIN_KEY_LENGTH = 16
MAX_KEY_LENGTH = 64
MAX_KEYS = 16

BINDING_CONTEXT = b"nitro-keyrelease/v1/request"
SEAL_CONTEXT = b"nitro-keyrelease/v1/seal"
ANSWER_CONTEXT = b"nitro-keyrelease/v1/answer"
IDENTITY_PREFIX = "ed25519:"


MAX_ECHO = 64


def echo(value: Any, limit: int = MAX_ECHO, *, quoted: bool = True) -> str:
    """``value`` as a message or a log may echo it: text and bytes as an escaped repr (no
    control character survives; ``quoted=False`` drops the quotes), numbers as written,
    anything else by its type only, and cut to ``limit`` characters in all (ending in
    ``...`` when cut)."""
    if isinstance(value, str | bytes):
        text = repr(value[:limit])
        text = text if quoted else text[1 + isinstance(value, bytes) : -1]
    elif value is None or isinstance(value, bool | int | float):
        try:
            text = repr(value)
        except ValueError:  # an integer past Python's conversion limit
            text = "a very large integer"
    else:
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ProtocolError(ValueError):
    """A message does not have the form the protocol requires. ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class KeyRequest:
    """One key asked for: its name (the derivation context), its length in bytes and its
    type (:mod:`keyutil.keytypes`; ``raw`` by default). A typed key's length is its type's
    seed length (32)."""

    name: str
    length: int
    type: str = keytypes.DEFAULT_TYPE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            # A JSON number or list is not a name, even if its text would be one.
            raise ProtocolError(
                "bad_request", f"key name: expected a string; found {type(self.name).__name__}"
            )
        if not KEY_NAME.match(self.name):
            raise ProtocolError(
                "bad_request",
                "key name: expected 1 to 64 of A-Z a-z 0-9 . _ - (starting alphanumeric); "
                f"found {echo(self.name)}",
            )
        if type(self.length) is not int or not MIN_KEY_LENGTH <= self.length <= MAX_KEY_LENGTH:
            raise ProtocolError(
                "bad_request",
                f"key length: expected {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} bytes; "
                f"found {echo(self.length)}",
            )
        try:
            kind = keytypes.get(self.type)
        except keytypes.UnknownKeyType as e:
            raise ProtocolError("bad_request", str(e)) from None
        if kind.seed_length is not None and self.length != kind.seed_length:
            raise ProtocolError(
                "bad_request",
                f"key length: a key of type {kind.name} is {kind.seed_length} bytes; "
                f"found {self.length}",
            )

    def to_json(self) -> dict[str, Any]:
        """The key object on the wire; ``type`` is absent for raw, so that a raw request
        (and its binding) is byte for byte what it was before key types."""
        if self.type == keytypes.DEFAULT_TYPE:
            return {"name": self.name, "length": self.length}
        return {"name": self.name, "length": self.length, "type": self.type}


def check_key_list(keys: Sequence[KeyRequest]) -> tuple[KeyRequest, ...]:
    if not 0 < len(keys) <= MAX_KEYS:
        raise ProtocolError(
            "bad_request", f"keys: expected 1 to {MAX_KEYS} keys; found {len(keys)}"
        )
    pairs = [(k.name, k.type) for k in keys]
    if len(set(pairs)) != len(pairs):
        raise ProtocolError("bad_request", "keys: expected distinct (name, type) pairs")
    return tuple(keys)


# json.dumps with these options makes a new encoder on every call; one serves them all (an
# encoder keeps no state between calls).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_json(value: Any) -> bytes:
    """The one byte form of a JSON value that both sides hash and sign."""
    return _CANONICAL.encode(value).encode()


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64d(text: Any, what: str, *, max_len: int = 1 << 16) -> bytes:
    if not isinstance(text, str) or len(text) > max_len:
        raise ProtocolError("bad_request", f"{what}: expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ProtocolError("bad_request", f"{what}: expected base64 text") from None


def request_binding(keys: Sequence[KeyRequest], suite: str, nonce: bytes) -> bytes:
    """The digest the enclave puts in ``user_data``: which keys, which suite, which nonce."""
    body = {
        "v": PROTOCOL_VERSION,
        "keys": [k.to_json() for k in keys],
        "suite": suite,
        "nonce": nonce.hex(),
    }
    return hashlib.sha256(BINDING_CONTEXT + b"\x00" + canonical_json(body)).digest()


def seal_info(key: KeyRequest, nonce: bytes) -> bytes:
    """HPKE ``info`` for one sealed key: a sealed key opens only as the key it was sent as."""
    return (
        SEAL_CONTEXT
        + b"\x00"
        + canonical_json({**key.to_json(), "nonce": nonce.hex()})
    )


_HPKE_SUITES = {
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    SUITE_P384: hpke.Suite(hpke.KEM.P384, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM),
}


def hpke_suite(suite: str) -> hpke.Suite:
    found = _HPKE_SUITES.get(suite) if isinstance(suite, str) else None
    if found is not None:
        return found
    raise ProtocolError(
        "bad_request", f"suite: expected one of {', '.join(SUITES)}; found {echo(suite)}"
    )


RecipientPrivateKey = x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey
RecipientPublicKey = x25519.X25519PublicKey | ec.EllipticCurvePublicKey


def generate_recipient(suite: str) -> RecipientPrivateKey:
    """The enclave's ephemeral HPKE key pair for one release."""
    if suite == SUITE_X25519:
        return x25519.X25519PrivateKey.generate()
    if suite == SUITE_P384:
        return ec.generate_private_key(ec.SECP384R1())
    raise ProtocolError("bad_request", f"suite: unknown {echo(suite)}")


def recipient_public_bytes(key: RecipientPrivateKey) -> bytes:
    """The public key as it goes into the attestation document's ``public_key``."""
    if isinstance(key, x25519.X25519PrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


_P25519 = 2**255 - 19
# The u-coordinates of Curve25519's points of small order, and of its twist's (X25519 takes
# any u in the field, so a u not on the curve is a point of the twist). The curve's group is
# cyclic of order 8 * l and the twist's of order 4 * l' (l, l' primes, both of 253 bits):
# the points whose order divides 8 are the point at infinity, (0, 0) of order 2, a pair of
# order 4 with u = 1 and two pairs of order 8 (the last two values below); the twist adds one
# pair of order 4, u = p - 1. Every other u has l or l' in its order, and an X25519 scalar (a
# multiple of 8 below 2^255) is never a multiple of 8 * l or 8 * l' (both above 2^255), so it
# gives a non-zero shared secret. These five, and no other u, give the all-zero secret that
# HPKE (RFC 9180, 7.1.4) refuses, whatever the scalar.
_X25519_SMALL_ORDER = frozenset(
    {
        0,
        1,
        _P25519 - 1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
    }
)


def x25519_small_order(data: bytes) -> bool:
    """True if the 32-byte X25519 public key ``data`` is a point of small order, in any of
    its encodings: X25519 ignores the top bit (RFC 7748, 5) and reduces u modulo p (so
    p and p + 1 are 0 and 1). The check costs a dictionary look-up; the key exchange that
    finds the same (a zero shared secret) costs a scalar multiplication, which HPKE does
    anyway when it seals, and refuses these keys there too."""
    return (int.from_bytes(data, "little") & ((1 << 255) - 1)) % _P25519 in _X25519_SMALL_ORDER


def load_recipient_public(suite: str, data: bytes) -> RecipientPublicKey:
    """The attested public key, as the suite requires it; ProtocolError if it is not."""
    try:
        if suite == SUITE_X25519:
            if len(data) != 32:
                raise ValueError(f"expected 32 bytes; found {len(data)}")
            if x25519_small_order(data):
                raise ValueError("a low-order point, which gives no shared secret")
            return x25519.X25519PublicKey.from_public_bytes(data)
        if suite == SUITE_P384:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(), data)
    except ValueError as e:
        raise ProtocolError(
            "public_key_invalid", f"attested public_key is not a {suite} key: {e}"
        ) from None
    raise ProtocolError("bad_request", f"suite: unknown {echo(suite)}")


def seal(
    suite: str, recipient: RecipientPublicKey, key: KeyRequest, nonce: bytes, secret: bytes
) -> bytes:
    return hpke_suite(suite).encrypt(secret, recipient, info=seal_info(key, nonce))


def open_sealed(
    suite: str, recipient: RecipientPrivateKey, key: KeyRequest, nonce: bytes, sealed: bytes
) -> bytes:
    return hpke_suite(suite).decrypt(sealed, recipient, info=seal_info(key, nonce))


# -- Applications and answers' JSON ----------------------------------------------------------

_APP_HEX = re.compile(r"\A0[xX]([0-9a-fA-F]{64})\Z")


def parse_application(text: str) -> bytes:
    """An application id: ``0x`` + 64 hex digits, or a name of 1..32 printable ASCII
    characters stored left-aligned and zero-padded in 32 bytes (as the allowlist contract
    stores it). The zero id is refused. ProtocolError ``application_invalid`` if not one."""
    if text.startswith(("0x", "0X")):
        match = _APP_HEX.match(text)
        if match is None:
            raise ProtocolError(
                "application_invalid",
                f"expected an application id of 0x + 64 hex digits; found {len(text) - 2} "
                "characters after 0x",
            )
        value = bytes.fromhex(match.group(1))
    else:
        if not 1 <= len(text) <= 32 or not all(0x20 <= ord(c) <= 0x7E for c in text):
            raise ProtocolError(
                "application_invalid",
                "expected an application name of 1 to 32 printable ASCII characters "
                f"(or 0x + 64 hex digits); found {len(text)} characters",
            )
        value = text.encode("ascii").ljust(32, b"\0")
    if value == bytes(32):
        raise ProtocolError("application_invalid", "the zero application id is reserved")
    return value


_PRINTABLE_ASCII = re.compile(rb"[\x20-\x7e]+")


def format_application(app: bytes) -> str:
    """The name when ``app`` decodes as a :func:`parse_application` name, else 0x-hex."""
    name = app.rstrip(b"\0")
    # One regex match rather than a Python step per byte: every release's audit entry and
    # log line name the application.
    if _PRINTABLE_ASCII.fullmatch(name) and not name.startswith((b"0x", b"0X")):
        return name.decode("ascii")
    return "0x" + app.hex()


_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def json_nesting(text: str) -> int:
    """How deep arrays and objects nest in JSON ``text`` (brackets inside strings skipped).

    A linear scan that needs no stack: it runs before the parser, which recurses per level.
    The text is cut at its quotes (``str.split``, a C loop): the parts alternate between
    outside and inside strings, and a part inside a string ends the string unless an odd run
    of backslashes ends it (the quote is escaped). Only the parts outside strings are
    searched for brackets, so the base64 of a document costs a copy, not a step per
    character.
    """
    depth = deepest = 0
    outside = True  # the text starts outside any string
    for part in text.split('"'):
        if outside:
            if "[" in part or "{" in part or "]" in part or "}" in part:
                for match in _JSON_BRACKETS.finditer(part):
                    if match.group() in "[{":
                        depth += 1
                        deepest = max(deepest, depth)
                    else:
                        depth -= 1
            outside = False  # the quote after this part opens a string
        elif (len(part) - len(part.rstrip("\\"))) % 2 == 0:
            outside = True  # the quote after this part closes the string
    return deepest


# -- The KMS identity and the signed answer ------------------------------------------------


def format_identity(public_key: ed25519.Ed25519PublicKey) -> str:
    """``ed25519:<base64>``: the form ``keyutil get-key --kms-pubkey`` takes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return IDENTITY_PREFIX + b64e(raw)


def parse_identity(text: str) -> ed25519.Ed25519PublicKey:
    value = text.strip()
    if not value.startswith(IDENTITY_PREFIX):
        raise ProtocolError(
            "identity_invalid", f"expected a KMS identity 'ed25519:<base64>'; found {value[:16]!r}"
        )
    try:
        raw = base64.b64decode(value[len(IDENTITY_PREFIX) :], validate=True)
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ProtocolError(
            "identity_invalid", "expected a KMS identity of 32 bytes in base64 after 'ed25519:'"
        ) from None


def answer_signing_bytes(body: Mapping[str, Any]) -> bytes:
    """What the identity key signs: a context string and the canonical answer body."""
    return ANSWER_CONTEXT + b"\x00" + canonical_json(dict(body))


def sign_answer(identity: ed25519.Ed25519PrivateKey, body: Mapping[str, Any]) -> dict[str, Any]:
    return {**body, "signature": b64e(identity.sign(answer_signing_bytes(body)))}


def verify_answer(identity: ed25519.Ed25519PublicKey, answer: Mapping[str, Any]) -> dict[str, Any]:
    """The answer body if its signature is the pinned identity's; ProtocolError if not."""
    body = {k: v for k, v in answer.items() if k != "signature"}
    try:
        signature = b64d(answer.get("signature"), "signature", max_len=200)
        identity.verify(signature, answer_signing_bytes(body))
    except (ProtocolError, InvalidSignature):
        raise ProtocolError(
            "answer_unauthenticated",
            "the KMS answer is not signed by the pinned KMS identity",
        ) from None
    return body


def application_text(application: str) -> str:
    """An application id (0x + 64 hex digits, as answers carry it) for people to read: its
    name when it is a name padded with zero bytes (``demo-app``), else as given."""
    try:
        raw = bytes.fromhex(application.removeprefix("0x"))
    except ValueError:
        return application
    name = raw.rstrip(b"\0")
    printable = len(raw) == 32 and name and all(0x20 <= b <= 0x7E for b in name)
    if printable and not name.startswith((b"0x", b"0X")):
        return name.decode("ascii")
    return application
