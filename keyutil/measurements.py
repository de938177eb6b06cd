"""OS_IMAGE_HASH: the enclave image's identity, as the allowlist contract knows it.

OS_IMAGE_HASH = sha256(PCR0 || PCR1 || PCR2) over the raw PCR bytes (48 bytes each for
SHA-384 measurements), written as 0x-prefixed lowercase hex.

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

PCR_LENGTHS = (32, 48, 64)
_HEX = re.compile(r"\A(?:0x)?([0-9a-fA-F]*)\Z")


class MeasurementError(ValueError):
    """A PCR value or a nitro-cli measurements document is not what it must be."""


def os_image_hash(pcr0: bytes, pcr1: bytes, pcr2: bytes) -> str:
    """sha256(PCR0 || PCR1 || PCR2) over raw bytes, as 0x-prefixed hex."""
    lengths = {len(pcr0), len(pcr1), len(pcr2)}
    if len(lengths) != 1 or next(iter(lengths)) not in PCR_LENGTHS:
        found = ", ".join(str(len(p)) for p in (pcr0, pcr1, pcr2))
        raise MeasurementError(
            f"PCR0, PCR1 and PCR2 must have one length of 32, 48 or 64 bytes; found {found}"
        )
    return "0x" + hashlib.sha256(pcr0 + pcr1 + pcr2).hexdigest()


def is_debug_measurement(pcr0: bytes, pcr1: bytes, pcr2: bytes) -> bool:
    """Debug-mode enclaves report all-zero PCR0, PCR1 and PCR2."""
    return not any(pcr0) and not any(pcr1) and not any(pcr2)


def pcr_from_hex(text: str, *, name: str = "PCR") -> bytes:
    """Decode one PCR given as hex (0x prefix allowed); checks the length."""
    match = _HEX.match(text.strip())
    if match is None or len(match.group(1)) % 2:
        raise MeasurementError(f"{name} must be hex digits; found {text[:20]!r}")
    value = bytes.fromhex(match.group(1))
    if len(value) not in PCR_LENGTHS:
        raise MeasurementError(f"{name} must be 32, 48 or 64 bytes; found {len(value)} bytes")
    return value


def pcrs_from_nitro_cli(document: str | Mapping[str, Any]) -> tuple[bytes, bytes, bytes]:
    """PCR0..PCR2 from the JSON that ``nitro-cli build-enclave`` / ``describe-eif`` print.

    Accepts the whole output (with a ``Measurements`` object) or the object itself.
    """
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as e:
            raise MeasurementError(f"expected nitro-cli JSON; it does not parse: {e}") from e
    if not isinstance(document, Mapping):
        raise MeasurementError("expected a JSON object with a Measurements object")
    measurements = document.get("Measurements", document)
    if not isinstance(measurements, Mapping):
        raise MeasurementError("expected Measurements to be a JSON object")
    pcrs = []
    for name in ("PCR0", "PCR1", "PCR2"):
        value = measurements.get(name)
        if not isinstance(value, str):
            raise MeasurementError(f"expected Measurements.{name} as a hex string; not found")
        pcrs.append(pcr_from_hex(value, name=name))
    return pcrs[0], pcrs[1], pcrs[2]
