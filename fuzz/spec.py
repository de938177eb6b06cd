"""The reference: what the format documents as valid, decided without the product's code.

    >>> from pathlib import Path
    >>> from fuzz.spec import reference
    >>> verdict = reference(Path("tests/vectors/aws-nondebug-2022-10-13.cose").read_bytes())
    >>> verdict.valid, verdict.meaning.module_id
    (True, 'i-020b6af9246d90e92-enc0183d09086c24190')

The product parses with cbor2 and checks with its own code; this module decodes with
:mod:`fuzz.cbor` (an independent reader) and checks the format as documented in
``mock_kms/attestation.py``, ``docs/protocol.md`` and the limits of ``mock_kms.config``.
The fuzz targets compare the two: whatever the product accepts must be valid here and mean
the same. What counts as valid:

- envelope: an array of 4, untagged or under exactly one tag 18; protected header exactly
  the bytes ``a1 01 38 22``; unprotected header an empty map; payload a byte string holding
  exactly one item; signature a byte string of 96 bytes;
- payload: a map with exactly the nine fields as text keys, each once (equal values written
  differently are the same key); module_id text of 1 to 256 characters; digest one of
  SHA256, SHA384, SHA512; timestamp an unsigned integer in (0, year 10000); pcrs a map of
  1 to 32 entries, unsigned integer keys 0..31, 0, 1 and 2 present, values of the digest's
  length; certificate 1 to 4096 bytes; cabundle an array of 1 to 8 byte strings of at most
  4096 bytes; public_key, user_data, nonce null or at most 1024 bytes;
- no tags anywhere but that one tag 18; text is valid UTF-8; the whole is at most 16 KiB;
- encoding variants carry the same meaning and are valid: definite or indefinite lengths,
  non-minimal heads, byte and text strings in chunks, any order of map entries.

The release request (:func:`reference_request`) is a JSON object with ``version`` the integer
1 (not true, not 1.0), ``suite`` one of the two suites, ``keys`` a list of 1 to 16 objects
with a ``name`` string matching the documented pattern and an integer ``length`` of 16 to 64,
names distinct, and ``attestation`` strict standard base64. The JSON layer is Python's own
(the text in UTF-8, -16 or -32; a member given twice counts once, the last time): it is not
what is under test, the typed checks on top of it are. Unknown members are ignored, as JSON
protocols do.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import json
import re
from typing import Any

from fuzz.cbor import Array, Bytes, CborError, Int, Map, Node, Simple, Tag, Text, decode
from mock_kms.config import LIMITS, Limits

PROTECTED_ES384 = bytes.fromhex("a1013822")
SIGNATURE_LENGTH = 96
FIELDS = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
          "public_key", "user_data", "nonce")
OPTIONALS = ("public_key", "user_data", "nonce")
PCR_LENGTH = {"SHA256": 32, "SHA384": 48, "SHA512": 64}
# 10000-01-01T00:00:00Z in milliseconds since 1970: (10000 - 1970) years, 1947 leap days.
YEAR_10000_MS = ((10000 - 1970) * 365 + 1947) * 86_400_000
SUITES = ("x25519-hkdf-sha256-aes-256-gcm", "p384-hkdf-sha384-aes-256-gcm")
KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The release request's attestation member: base64 of at most max_document_size bytes.
ATTESTATION_B64_MAX = 4 * LIMITS.max_document_size // 3 + 4


@dataclasses.dataclass(frozen=True)
class Meaning:
    """Everything a valid document says, as the reference reads it."""

    tagged: bool
    protected: bytes
    payload: bytes
    signature: bytes
    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: tuple[tuple[int, bytes], ...]  # sorted by index
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None

    @property
    def pcr_map(self) -> dict[int, bytes]:
        return dict(self.pcrs)

    @property
    def os_image_hash(self) -> str:
        pcrs = self.pcr_map
        return "0x" + hashlib.sha256(pcrs[0] + pcrs[1] + pcrs[2]).hexdigest()

    @property
    def debug(self) -> bool:
        pcrs = self.pcr_map
        return all(pcrs[i] == bytes(len(pcrs[i])) for i in (0, 1, 2))

    def fields(self) -> dict[str, Any]:
        """The payload's meaning, without the envelope's bytes."""
        return {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp_ms": self.timestamp_ms,
            "pcrs": self.pcr_map,
            "certificate": self.certificate,
            "cabundle": self.cabundle,
            "public_key": self.public_key,
            "user_data": self.user_data,
            "nonce": self.nonce,
        }


@dataclasses.dataclass(frozen=True)
class Verdict:
    meaning: Meaning | None
    reason: str = ""

    @property
    def valid(self) -> bool:
        return self.meaning is not None


class _Invalid(Exception):
    pass


def _text(node: Node, what: str) -> str:
    if not isinstance(node, Text):
        raise _Invalid(f"{what}: not a text string")
    try:
        return node.value.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(f"{what}: invalid UTF-8") from None


def _bytes(node: Node, what: str, max_len: int) -> bytes:
    if not isinstance(node, Bytes):
        raise _Invalid(f"{what}: not a byte string")
    if len(node.value) > max_len:
        raise _Invalid(f"{what}: {len(node.value)} bytes, more than {max_len}")
    return node.value


def _uint(node: Node, what: str) -> int:
    if not isinstance(node, Int) or node.value < 0:
        raise _Invalid(f"{what}: not an unsigned integer")
    return node.value


def _envelope(data: bytes, limits: Limits) -> tuple[bool, bytes, bytes, bytes]:
    if len(data) > limits.max_document_size:
        raise _Invalid("document larger than the limit")
    try:
        top = decode(data)
    except CborError as e:
        raise _Invalid(f"COSE_Sign1: not well-formed CBOR ({e})") from None
    tagged = isinstance(top, Tag)
    if isinstance(top, Tag):
        if top.tag != 18:
            raise _Invalid(f"COSE_Sign1: tag {top.tag}")
        top = top.inner
    if not isinstance(top, Array) or len(top.items) != 4:
        raise _Invalid("COSE_Sign1: not an array of 4")
    protected, unprotected, payload, signature = top.items
    protected_bytes = _bytes(protected, "protected", limits.max_document_size)
    if protected_bytes != PROTECTED_ES384:
        raise _Invalid("protected header: not exactly {1: -35}")
    if not isinstance(unprotected, Map) or unprotected.pairs:
        raise _Invalid("unprotected header: not an empty map")
    payload_bytes = _bytes(payload, "payload", limits.max_document_size)
    signature_bytes = _bytes(signature, "signature", limits.max_document_size)
    if len(signature_bytes) != SIGNATURE_LENGTH:
        raise _Invalid("signature: not 96 bytes")
    return tagged, protected_bytes, payload_bytes, signature_bytes


def _pcrs(node: Node, digest: str, limits: Limits) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(node, Map):
        raise _Invalid("pcrs: not a map")
    if not 0 < len(node.pairs) <= limits.max_pcr_count:
        raise _Invalid("pcrs: count out of range")
    pcrs: dict[int, bytes] = {}
    for key, value in node.pairs:
        index = _uint(key, "pcr index")
        if index > limits.max_pcr_index:
            raise _Invalid("pcr index out of range")
        if index in pcrs:
            raise _Invalid(f"pcrs: index {index} twice")
        pcr = _bytes(value, f"PCR{index}", 1 << 20)
        if len(pcr) != PCR_LENGTH[digest]:
            raise _Invalid(f"PCR{index}: wrong length")
        pcrs[index] = pcr
    if not {0, 1, 2} <= set(pcrs):
        raise _Invalid("pcrs: PCR0, PCR1 or PCR2 missing")
    return tuple(sorted(pcrs.items()))


def _payload(payload: bytes, limits: Limits) -> dict[str, Node]:
    try:
        node = decode(payload)
    except CborError as e:
        raise _Invalid(f"payload: not one well-formed CBOR item ({e})") from None
    if not isinstance(node, Map):
        raise _Invalid("payload: not a map")
    fields: dict[str, Node] = {}
    for key, value in node.pairs:
        name = _text(key, "payload key")
        if name in fields:
            raise _Invalid(f"payload: {name!r} twice")
        fields[name] = value
    if set(fields) != set(FIELDS):
        raise _Invalid("payload: not exactly the nine fields")
    return fields


@functools.lru_cache(maxsize=64)
def reference(data: bytes, limits: Limits = LIMITS) -> Verdict:
    """Whether ``data`` is a valid attestation document, and what it means if it is.

    Cached: an oracle asks about the same document more than once (its verdicts are
    immutable)."""
    try:
        tagged, protected, payload, signature = _envelope(data, limits)
        fields = _payload(payload, limits)
        module_id = _text(fields["module_id"], "module_id")
        if not 0 < len(module_id) <= limits.max_module_id:
            raise _Invalid("module_id: length out of range")
        digest = _text(fields["digest"], "digest")
        if digest not in PCR_LENGTH:
            raise _Invalid("digest: unknown")
        timestamp = _uint(fields["timestamp"], "timestamp")
        if not 0 < timestamp < YEAR_10000_MS:
            raise _Invalid("timestamp: out of range")
        pcrs = _pcrs(fields["pcrs"], digest, limits)
        certificate = _bytes(fields["certificate"], "certificate", limits.max_certificate_size)
        if not certificate:
            raise _Invalid("certificate: empty")
        bundle = fields["cabundle"]
        if not isinstance(bundle, Array):
            raise _Invalid("cabundle: not an array")
        if not 0 < len(bundle.items) <= limits.max_cabundle_length:
            raise _Invalid("cabundle: length out of range")
        cabundle = tuple(
            _bytes(item, "cabundle entry", limits.max_certificate_size) for item in bundle.items
        )
        optionals: dict[str, bytes | None] = {}
        for name in OPTIONALS:
            value = fields[name]
            if isinstance(value, Simple) and value.value == 22:
                optionals[name] = None
            else:
                optionals[name] = _bytes(value, name, limits.max_optional_field)
    except _Invalid as e:
        return Verdict(None, str(e))
    return Verdict(
        Meaning(
            tagged=tagged,
            protected=protected,
            payload=payload,
            signature=signature,
            module_id=module_id,
            digest=digest,
            timestamp_ms=timestamp,
            pcrs=pcrs,
            certificate=certificate,
            cabundle=cabundle,
            public_key=optionals["public_key"],
            user_data=optionals["user_data"],
            nonce=optionals["nonce"],
        )
    )


# -- the release request ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RequestVerdict:
    suite: str | None = None
    keys: tuple[tuple[str, int], ...] = ()
    attestation: bytes | None = None
    reason: str = ""

    @property
    def valid(self) -> bool:
        return self.attestation is not None


def _strict_int(value: object) -> bool:
    return type(value) is int


def reference_request(body: bytes) -> RequestVerdict:
    """Whether ``body`` is a well-formed release request (its document not judged here)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return RequestVerdict(reason="not JSON")
    if not isinstance(value, dict):
        return RequestVerdict(reason="not an object")
    version = value.get("version")
    if not (_strict_int(version) and version == 1):
        return RequestVerdict(reason="version: not the integer 1")
    suite = value.get("suite")
    if not isinstance(suite, str) or suite not in SUITES:
        return RequestVerdict(reason="suite: unknown")
    keys = value.get("keys")
    if not isinstance(keys, list) or not 0 < len(keys) <= 16:
        return RequestVerdict(reason="keys: not a list of 1 to 16")
    parsed: list[tuple[str, int]] = []
    for item in keys:
        if not isinstance(item, dict):
            return RequestVerdict(reason="keys: not objects")
        name, length = item.get("name"), item.get("length")
        if not isinstance(name, str) or not KEY_NAME.fullmatch(name):
            return RequestVerdict(reason="key name: not a matching string")
        if not (_strict_int(length) and isinstance(length, int) and 16 <= length <= 64):
            return RequestVerdict(reason="key length: not an integer of 16 to 64")
        parsed.append((name, length))
    if len({n for n, _ in parsed}) != len(parsed):
        return RequestVerdict(reason="keys: names not distinct")
    attestation = value.get("attestation")
    if not isinstance(attestation, str) or len(attestation) > ATTESTATION_B64_MAX:
        return RequestVerdict(reason="attestation: not base64 text of the allowed size")
    try:
        document = base64.b64decode(attestation, validate=True)
    except ValueError:  # binascii.Error, or text that is not ASCII
        return RequestVerdict(reason="attestation: not strict base64")
    return RequestVerdict(suite=suite, keys=tuple(parsed), attestation=document)
