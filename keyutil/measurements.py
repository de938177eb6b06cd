"""OS_IMAGE_HASH: the enclave image's identity, as the allowlist contract knows it.

OS_IMAGE_HASH = sha256(PCR0 || PCR1 || PCR2) over the raw PCR bytes, written as 0x-prefixed
lowercase hex. Nitro Enclaves measure with SHA-384, so an image's PCRs are 48 bytes each:
the governance inputs (:func:`os_image_hash`, :func:`pcr_from_hex`,
:func:`pcrs_from_nitro_cli`) refuse any other length, because an image hash computed from
32-byte (SHA-256) PCRs is one no Nitro enclave can ever match.

    >>> from keyutil.measurements import os_image_hash
    >>> os_image_hash(bytes(48), bytes(48), bytes(48))
    '0x81c611f35bff79491538b2f7cf201c7597a661a5c549633541c62bdc8af1613f'

The hex text of the PCRs is never hashed: ``sha256sum <<< "${PCR0}${PCR1}${PCR2}"`` hashes
ASCII plus a newline and gives a different, useless value.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

PCR_LENGTH = 48
"""Bytes in a Nitro Enclaves PCR: a SHA-384 digest."""

_DIGEST_BY_LENGTH = {32: "SHA-256", 48: "SHA-384", 64: "SHA-512"}
_HEX = re.compile(r"\A(?:0x)?([0-9a-fA-F]*)\Z")
_JSON_LINE = re.compile(r"^[ \t]*[{\[]", re.MULTILINE)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")

MAX_JSON_DEPTH = 512
"""nitro-cli output nests 5 deep. The bound is checked before parsing: a process that imports
web3 (kms-gov) runs with py-evm's recursion limit of 100000, where json.loads of deeply nested
input overflows the C stack instead of raising RecursionError."""

HINT_DESCRIBE_ENCLAVES = (
    "this is `nitro-cli describe-enclaves` output (the running enclaves), not an image's "
    "measurements: use the JSON of `nitro-cli build-enclave` or `nitro-cli describe-eif "
    "--eif-path IMAGE.eif`"
)
HINT_STDERR_MIXED = (
    "nitro-cli prints progress on stderr and the JSON on stdout: capture stdout only "
    "(`> build.json`, not `2>&1`)"
)


class MeasurementError(ValueError):
    """A PCR value or a nitro-cli measurements document is not what it must be."""


def _check_length(pcr: bytes, name: str) -> None:
    if len(pcr) == PCR_LENGTH:
        return
    digest = _DIGEST_BY_LENGTH.get(len(pcr))
    what = f"a {digest} value" if digest else "not a digest size Nitro uses"
    raise MeasurementError(
        f"{name} must be 48 bytes (96 hex digits): Nitro Enclaves measure with SHA-384; "
        f"found {len(pcr)} bytes ({what})"
    )


def hash_pcrs(pcr0: bytes, pcr1: bytes, pcr2: bytes) -> str:
    """sha256(PCR0 || PCR1 || PCR2) of PCRs of any one length, as an attestation document
    reports them (its ``digest`` says which); the KMS's view. Governance uses
    :func:`os_image_hash`, which takes SHA-384 PCRs only."""
    if not len(pcr0) == len(pcr1) == len(pcr2):
        raise MeasurementError(
            f"PCR0, PCR1 and PCR2 must have one length; found {len(pcr0)}, {len(pcr1)} "
            f"and {len(pcr2)} bytes"
        )
    return "0x" + hashlib.sha256(pcr0 + pcr1 + pcr2).hexdigest()


def os_image_hash(pcr0: bytes, pcr1: bytes, pcr2: bytes) -> str:
    """sha256(PCR0 || PCR1 || PCR2) over three raw 48-byte (SHA-384) PCRs, as 0x-prefixed hex."""
    for i, pcr in enumerate((pcr0, pcr1, pcr2)):
        _check_length(pcr, f"PCR{i}")
    return hash_pcrs(pcr0, pcr1, pcr2)


def is_debug_measurement(pcr0: bytes, pcr1: bytes, pcr2: bytes) -> bool:
    """Debug-mode enclaves report all-zero PCR0, PCR1 and PCR2."""
    return not any(pcr0) and not any(pcr1) and not any(pcr2)


def pcr_from_hex(text: str, *, name: str = "PCR") -> bytes:
    """Decode one PCR given as hex (0x prefix allowed); it must be 48 bytes (SHA-384)."""
    match = _HEX.match(text.strip())
    if match is None or len(match.group(1)) % 2:
        raise MeasurementError(f"{name} must be hex digits; found {text[:20]!r}")
    value = bytes.fromhex(match.group(1))
    _check_length(value, name)
    return value


def _nesting(text: str) -> int:
    """How deep arrays and objects nest (brackets in strings skipped), without recursion."""
    depth = deepest = 0
    for match in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if match.group() in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _parse_hint(text: str, error: json.JSONDecodeError) -> str:
    """Why nitro-cli output may not parse: progress lines mixed in by ``2>&1``."""
    first = _JSON_LINE.search(text)
    if error.msg == "Extra data" or (first is not None and first.start() > 0):
        return "; " + HINT_STDERR_MIXED
    return ""


def _is_describe_enclaves(document: object) -> bool:
    return isinstance(document, list) and any(
        isinstance(e, Mapping) and ("EnclaveID" in e or "EnclaveCID" in e) for e in document
    )


def pcrs_from_nitro_cli(document: str | Mapping[str, Any]) -> tuple[bytes, bytes, bytes]:
    """PCR0..PCR2 from the JSON that ``nitro-cli build-enclave`` / ``describe-eif`` print.

    Accepts the whole output (with a ``Measurements`` object) or the object itself. A
    ``HashAlgorithm`` other than ``Sha384 ...`` is refused and named in the message.
    """
    if isinstance(document, str):
        text = document
        if not text.strip():
            raise MeasurementError("expected nitro-cli JSON; the input is empty")
        if _nesting(text) > MAX_JSON_DEPTH:
            raise MeasurementError(
                f"expected nitro-cli JSON; it is nested too deeply (over {MAX_JSON_DEPTH} levels)"
            )
        try:
            document = json.loads(text)
        except json.JSONDecodeError as e:
            raise MeasurementError(
                f"expected nitro-cli JSON; it does not parse: {e}{_parse_hint(text, e)}"
            ) from None
        except RecursionError:
            raise MeasurementError("expected nitro-cli JSON; it is nested too deeply") from None
    if _is_describe_enclaves(document):
        raise MeasurementError(HINT_DESCRIBE_ENCLAVES)
    if not isinstance(document, Mapping):
        raise MeasurementError("expected a JSON object with a Measurements object")
    measurements = document.get("Measurements", document)
    if not isinstance(measurements, Mapping):
        raise MeasurementError("expected Measurements to be a JSON object")
    algorithm = measurements.get("HashAlgorithm")
    if algorithm is not None and not (
        isinstance(algorithm, str) and algorithm.startswith("Sha384")
    ):
        shown = json.dumps(algorithm)[:40]
        raise MeasurementError(
            f"Measurements.HashAlgorithm is {shown}: Nitro Enclaves measure with SHA-384 "
            "(\"Sha384 { ... }\", 48-byte PCRs), so no Nitro enclave can match these values"
        )
    pcrs = []
    for name in ("PCR0", "PCR1", "PCR2"):
        value = measurements.get(name)
        if not isinstance(value, str):
            raise MeasurementError(f"expected Measurements.{name} as a hex string; not found")
        pcrs.append(pcr_from_hex(value, name=name))
    return pcrs[0], pcrs[1], pcrs[2]
