"""The attestation document model and its strict parser. Parsing checks form, not trust.

    >>> from mock_kms.attestation import parse_attestation
    >>> doc = parse_attestation(open("tests/vectors/aws-nondebug-2022-10-13.cose", "rb").read())
    >>> doc.module_id
    'i-020b6af9246d90e92-enc0183d09086c24190'
    >>> doc.os_image_hash
    '0x959df09185f8ea3a073b2107a64feee2970b3251bb1770176c254fc4769fa48e'

An AWS Nitro attestation document is a COSE_Sign1 structure (RFC 9052), untagged on every
real document (tag 18 is accepted, never required)::

    [ protected: bstr .cbor {1: -35},   ; ES384, and nothing else
      unprotected: {},                  ; empty on real documents
      payload: bstr .cbor {             ; definite or indefinite length map
          module_id, digest, timestamp, pcrs, certificate, cabundle,
          public_key, user_data, nonce  ; optionals are null or bytes
      },
      signature: bstr .size 96 ]        ; raw r || s

No CBOR tag may appear anywhere else, and each item is refused as what it is not: a tag
inside the envelope is ``cose_structure``, inside the payload ``field_type``.

:func:`parse_attestation` returns an :class:`AttestationDocument`: a parsed, *unverified*
document. Only :class:`mock_kms.verifier.AttestationVerifier` turns one into a
:class:`mock_kms.verifier.VerifiedAttestation`.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import cbor2

from keyutil.measurements import hash_pcrs, is_debug_measurement
from keyutil.protocol import echo
from mock_kms.config import LIMITS, Limits
from mock_kms.errors import AttestationError, ErrorCode

COSE_SIGN1_TAG = 18
COSE_HEADER_ALG = 1
COSE_ALG_ES384 = -35
ES384_SIGNATURE_LENGTH = 96
ES384_PROTECTED_HEADER = bytes.fromhex("a1013822")  # {1: -35}
# 10000-01-01T00:00:00Z in ms: beyond it a timestamp is no date Python can hold.
MAX_TIMESTAMP_MS = 253_402_300_800_000

# PCR length for each digest the NSM may report.
DIGEST_PCR_LENGTH = {"SHA256": 32, "SHA384": 48, "SHA512": 64}

REQUIRED_FIELDS = (
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
)
OPTIONAL_BYTES_FIELDS = ("public_key", "user_data", "nonce")


@dataclasses.dataclass(frozen=True)
class AttestationDocument:
    """A well-formed attestation document. Nothing in it is trusted yet."""

    module_id: str
    digest: str
    timestamp_ms: int
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None
    # The signed bytes, kept for signature verification.
    protected: bytes
    payload: bytes
    signature: bytes

    @property
    def timestamp(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.timestamp_ms / 1000, datetime.UTC)

    @property
    def os_image_hash(self) -> str:
        """sha256(PCR0 || PCR1 || PCR2) over the raw PCR bytes, 0x-prefixed hex."""
        return hash_pcrs(self.pcrs[0], self.pcrs[1], self.pcrs[2])

    @property
    def is_debug(self) -> bool:
        """Debug-mode enclaves report all-zero PCR0, PCR1 and PCR2."""
        return is_debug_measurement(self.pcrs[0], self.pcrs[1], self.pcrs[2])

    def sig_structure(self) -> bytes:
        """The COSE Sig_structure the signature covers (RFC 9052, section 4.4)."""
        return bytes(cbor2.dumps(["Signature1", self.protected, b"", self.payload]))


def _fail(code: ErrorCode, message: str) -> AttestationError:
    return AttestationError(code, message)


class _TagFound(Exception):
    def __init__(self, tag: int) -> None:
        super().__init__(tag)
        self.tag = tag


class _NoTags(Mapping[int, Callable[..., Any]]):
    """cbor2's semantic decoders, overridden for every tag number: any tag is refused.

    The format has no tags (the optional tag 18 around the document is taken off before
    decoding). Left alone, cbor2 turns the tags it knows into plain values: 2 and 3 (bignums)
    into an int, 55799 and 28 into the value they wrap, 29, 25 and 256 into earlier values,
    so a tagged field would pass every type check as if it were untagged.
    """

    def __getitem__(self, tag: int) -> Callable[..., Any]:
        def refuse(*_: Any) -> Any:
            raise _TagFound(tag)

        return refuse

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_TAGS = _NoTags()


def _strict_loads(data: bytes, what: str, limits: Limits, tag_code: ErrorCode) -> Any:
    """Decode one CBOR item, refusing duplicate map keys, tags (with ``tag_code``) and
    trailing bytes."""
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            allow_duplicate_keys=False,
            max_depth=limits.max_cbor_depth,
            semantic_decoders=_NO_TAGS,
        )
        value = decoder.decode()
    except cbor2.CBORDecodeError as e:
        if isinstance(e.__cause__, _TagFound):
            raise _fail(
                tag_code, f"{what}: expected no CBOR tags; found tag {e.__cause__.tag}"
            ) from None
        if "Duplicate map key" in str(e):
            raise _fail(
                ErrorCode.CBOR_DUPLICATE_KEY,
                f"{what}: expected unique map keys; found {echo(str(e), 100)}",
            ) from None
        raise _fail(
            ErrorCode.CBOR_MALFORMED, f"{what}: expected well-formed CBOR; {echo(str(e), 100)}"
        ) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # Defensive: cbor2 has raised these on content it could not turn into values.
        raise _fail(
            ErrorCode.CBOR_MALFORMED, f"{what}: expected well-formed CBOR; {echo(str(e), 100)}"
        ) from None
    if stream.tell() != len(data):
        extra = len(data) - stream.tell()
        raise _fail(
            ErrorCode.CBOR_TRAILING_BYTES,
            f"{what}: expected one CBOR item; found {extra} trailing byte(s)",
        )
    return value


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return type(value).__name__


def _expect_bytes(value: object, field: str, max_len: int) -> bytes:
    if not isinstance(value, bytes):
        raise _fail(
            ErrorCode.FIELD_TYPE, f"{field}: expected a byte string; found {_type_name(value)}"
        )
    if len(value) > max_len:
        raise _fail(
            ErrorCode.FIELD_TOO_LARGE,
            f"{field}: expected at most {max_len} bytes; found {len(value)}",
        )
    return value


def _untagged(data: bytes) -> bytes:
    """``data`` without the tag 18 (COSE_Sign1) in front of it, if there is one."""
    if not data or data[0] >> 5 != 6:
        return data
    info = data[0] & 0x1F
    width = {24: 1, 25: 2, 26: 4, 27: 8}.get(info, 0)
    if info > 27 or len(data) < 1 + width:
        return data  # not well-formed: the decoder says so
    tag = int.from_bytes(data[1 : 1 + width], "big") if width else info
    if tag != COSE_SIGN1_TAG:
        raise _fail(
            ErrorCode.COSE_STRUCTURE, f"expected untagged COSE_Sign1 or tag 18; found tag {tag}"
        )
    return data[1 + width :]


def _parse_cose_envelope(data: bytes, limits: Limits) -> tuple[bytes, bytes, bytes]:
    """(protected, payload, signature) of a COSE_Sign1 with exactly an ES384 header."""
    item = _strict_loads(_untagged(data), "COSE_Sign1", limits, ErrorCode.COSE_STRUCTURE)
    if not isinstance(item, list) or len(item) != 4:
        found = f"array of {len(item)}" if isinstance(item, list) else _type_name(item)
        raise _fail(ErrorCode.COSE_STRUCTURE, f"expected a COSE_Sign1 array of 4; found {found}")
    protected, unprotected, payload, signature = item
    for name, value in (("protected", protected), ("payload", payload), ("signature", signature)):
        if not isinstance(value, bytes):
            raise _fail(
                ErrorCode.COSE_STRUCTURE,
                f"COSE_Sign1 {name}: expected a byte string; found {_type_name(value)}",
            )
    if not isinstance(unprotected, Mapping):
        raise _fail(
            ErrorCode.COSE_STRUCTURE,
            f"COSE_Sign1 unprotected header: expected a map; found {_type_name(unprotected)}",
        )
    if unprotected:
        # Real documents carry an empty unprotected header. Anything there (an algorithm
        # above all) is outside the signature and could steer verification.
        raise _fail(
            ErrorCode.COSE_UNPROTECTED_HEADER,
            f"expected an empty unprotected header; found keys {sorted(map(str, unprotected))}",
        )
    if protected != ES384_PROTECTED_HEADER:
        # Exactly the one encoding of {1: -35} that real documents carry: no other header,
        # no other algorithm, no look-alike key or value types.
        header = (
            _strict_loads(protected, "protected header", limits, ErrorCode.COSE_ALGORITHM)
            if protected
            else {}
        )
        alg = header.get(COSE_HEADER_ALG, "none") if isinstance(header, dict) else "not a map"
        raise _fail(
            ErrorCode.COSE_ALGORITHM,
            f"expected protected header exactly {{1: -35}} (ES384); found algorithm {echo(alg)} "
            f"in {len(protected)} header byte(s)",
        )
    if len(signature) != ES384_SIGNATURE_LENGTH:
        raise _fail(
            ErrorCode.COSE_SIGNATURE_LENGTH,
            f"expected a {ES384_SIGNATURE_LENGTH}-byte ES384 signature; found {len(signature)}",
        )
    return protected, payload, signature


def _parse_pcrs(value: object, digest: str, limits: Limits) -> dict[int, bytes]:
    if not isinstance(value, dict):
        raise _fail(ErrorCode.FIELD_TYPE, f"pcrs: expected a map; found {_type_name(value)}")
    if not 0 < len(value) <= limits.max_pcr_count:
        raise _fail(
            ErrorCode.PCR_INVALID,
            f"pcrs: expected 1 to {limits.max_pcr_count} PCRs; found {len(value)}",
        )
    expected_len = DIGEST_PCR_LENGTH[digest]
    pcrs: dict[int, bytes] = {}
    for index, pcr in value.items():
        if type(index) is not int or not 0 <= index <= limits.max_pcr_index:
            raise _fail(
                ErrorCode.PCR_INVALID,
                f"pcrs: expected indexes 0 to {limits.max_pcr_index}; found {echo(index)}",
            )
        if not isinstance(pcr, bytes):
            raise _fail(
                ErrorCode.FIELD_TYPE, f"PCR{index}: expected a byte string; found {_type_name(pcr)}"
            )
        if len(pcr) != expected_len:
            raise _fail(
                ErrorCode.PCR_INVALID,
                f"PCR{index}: expected {expected_len} bytes for digest {digest}; found {len(pcr)}",
            )
        pcrs[index] = pcr
    for index in (0, 1, 2):
        if index not in pcrs:
            raise _fail(ErrorCode.PCR_INVALID, f"pcrs: expected PCR{index}; not present")
    return pcrs


def _parse_payload(payload: bytes, limits: Limits) -> dict[str, Any]:
    fields = _strict_loads(payload, "payload", limits, ErrorCode.FIELD_TYPE)
    if not isinstance(fields, dict):
        raise _fail(ErrorCode.FIELD_TYPE, f"payload: expected a map; found {_type_name(fields)}")
    unknown = [k for k in fields if k not in REQUIRED_FIELDS]
    if unknown:
        raise _fail(
            ErrorCode.FIELD_UNKNOWN,
            f"payload: expected only the nine attestation fields; found {echo(unknown[0])}",
        )
    for name in REQUIRED_FIELDS:
        if name not in fields:
            raise _fail(ErrorCode.FIELD_MISSING, f"payload: expected field {name!r}; not present")
    return fields


def parse_attestation(data: bytes, *, limits: Limits = LIMITS) -> AttestationDocument:
    """Parse raw COSE_Sign1 bytes into an unverified :class:`AttestationDocument`.

    Raises :class:`AttestationError` with a stable code for every malformation.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("parse_attestation takes bytes")
    data = bytes(data)
    if len(data) > limits.max_document_size:
        raise _fail(
            ErrorCode.INPUT_TOO_LARGE,
            f"expected a document of at most {limits.max_document_size} bytes; found {len(data)}",
        )
    protected, payload, signature = _parse_cose_envelope(data, limits)
    fields = _parse_payload(payload, limits)

    module_id = fields["module_id"]
    if not isinstance(module_id, str):
        raise _fail(
            ErrorCode.FIELD_TYPE, f"module_id: expected text; found {_type_name(module_id)}"
        )
    if not 0 < len(module_id) <= limits.max_module_id:
        raise _fail(
            ErrorCode.FIELD_TOO_LARGE,
            f"module_id: expected 1 to {limits.max_module_id} characters; found {len(module_id)}",
        )
    digest = fields["digest"]
    if not isinstance(digest, str):
        raise _fail(ErrorCode.FIELD_TYPE, f"digest: expected text; found {_type_name(digest)}")
    if digest not in DIGEST_PCR_LENGTH:
        raise _fail(
            ErrorCode.DIGEST_UNKNOWN,
            f"digest: expected one of {', '.join(DIGEST_PCR_LENGTH)}; found {echo(digest, 20)}",
        )
    timestamp = fields["timestamp"]
    if type(timestamp) is not int or not 0 < timestamp < MAX_TIMESTAMP_MS:
        shown = timestamp if type(timestamp) is int else _type_name(timestamp)
        raise _fail(
            ErrorCode.FIELD_TYPE,
            f"timestamp: expected milliseconds since 1970 before the year 10000; found {shown}",
        )
    pcrs = _parse_pcrs(fields["pcrs"], digest, limits)
    certificate = _expect_bytes(fields["certificate"], "certificate", limits.max_certificate_size)
    if not certificate:
        raise _fail(ErrorCode.FIELD_MISSING, "certificate: expected a DER certificate; empty")
    cabundle_value = fields["cabundle"]
    if not isinstance(cabundle_value, list):
        raise _fail(
            ErrorCode.FIELD_TYPE,
            f"cabundle: expected an array; found {_type_name(cabundle_value)}",
        )
    if not 0 < len(cabundle_value) <= limits.max_cabundle_length:
        raise _fail(
            ErrorCode.CABUNDLE_LENGTH,
            f"cabundle: expected 1 to {limits.max_cabundle_length} certificates; "
            f"found {len(cabundle_value)}",
        )
    cabundle = tuple(
        _expect_bytes(c, f"cabundle[{i}]", limits.max_certificate_size)
        for i, c in enumerate(cabundle_value)
    )
    optionals: dict[str, bytes | None] = {}
    for name in OPTIONAL_BYTES_FIELDS:
        value = fields[name]
        optionals[name] = (
            None if value is None else _expect_bytes(value, name, limits.max_optional_field)
        )

    return AttestationDocument(
        module_id=module_id,
        digest=digest,
        timestamp_ms=timestamp,
        pcrs=pcrs,
        certificate=certificate,
        cabundle=cabundle,
        public_key=optionals["public_key"],
        user_data=optionals["user_data"],
        nonce=optionals["nonce"],
        protected=protected,
        payload=payload,
        signature=signature,
    )
