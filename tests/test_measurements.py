"""OS_IMAGE_HASH in Python: raw bytes hashed, never hex text; nitro-cli JSON accepted."""

from __future__ import annotations

import hashlib
import json

import pytest

from keyutil.measurements import (
    MeasurementError,
    is_debug_measurement,
    os_image_hash,
    pcr_from_hex,
    pcrs_from_nitro_cli,
)

PCR0 = "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b"
PCR1 = "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f"
PCR2 = "d8f114da658de5481f8d9ec73907feb553560787522f705c92d7d96beed8e15e2aa611984e098c576832c292e8dc469a"
EXPECTED = "0x959df09185f8ea3a073b2107a64feee2970b3251bb1770176c254fc4769fa48e"


def test_vector_hash() -> None:
    assert os_image_hash(bytes.fromhex(PCR0), bytes.fromhex(PCR1), bytes.fromhex(PCR2)) == EXPECTED


def test_hex_text_method_gives_a_different_wrong_value() -> None:
    wrong = "0x" + hashlib.sha256(f"{PCR0}{PCR1}{PCR2}\n".encode()).hexdigest()
    assert wrong != EXPECTED


def test_nitro_cli_build_enclave_output() -> None:
    output = {
        "Measurements": {
            "HashAlgorithm": "Sha384 { ... }",
            "PCR0": PCR0,
            "PCR1": PCR1.upper(),
            "PCR2": "0x" + PCR2,
        }
    }
    assert os_image_hash(*pcrs_from_nitro_cli(json.dumps(output))) == EXPECTED
    assert os_image_hash(*pcrs_from_nitro_cli(output["Measurements"])) == EXPECTED


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        "[]",
        '{"Measurements": "x"}',
        '{"Measurements": {"PCR0": "00", "PCR1": "00"}}',
        json.dumps({"Measurements": {"PCR0": PCR0, "PCR1": PCR1, "PCR2": "zz"}}),
    ],
    ids=["not-json", "not-object", "measurements-not-object", "pcr2-missing", "pcr2-not-hex"],
)
def test_bad_nitro_cli_json(document: str) -> None:
    with pytest.raises(MeasurementError):
        pcrs_from_nitro_cli(document)


@pytest.mark.parametrize("text", ["abc", "00" * 47, "00" * 49, "g" * 96, ""])
def test_bad_pcr_hex(text: str) -> None:
    with pytest.raises(MeasurementError):
        pcr_from_hex(text)


def test_mixed_pcr_lengths_refused() -> None:
    with pytest.raises(MeasurementError):
        os_image_hash(bytes(48), bytes(48), bytes(32))


def test_debug_measurement() -> None:
    assert is_debug_measurement(bytes(48), bytes(48), bytes(48))
    assert not is_debug_measurement(bytes(48), bytes(48), b"\x00" * 47 + b"\x01")
