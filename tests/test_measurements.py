"""OS_IMAGE_HASH in Python: raw bytes hashed, never hex text; nitro-cli JSON accepted."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_os_image_hash_script import nitro_cli_like_documents

from keyutil.measurements import (
    MeasurementError,
    hash_pcrs,
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


@pytest.mark.parametrize("text", ["abc", "00" * 47, "00" * 49, "g" * 96, "", "00" * 32, "00" * 64])
def test_bad_pcr_hex(text: str) -> None:
    with pytest.raises(MeasurementError):
        pcr_from_hex(text)


def test_mixed_pcr_lengths_refused() -> None:
    with pytest.raises(MeasurementError):
        os_image_hash(bytes(48), bytes(48), bytes(32))


def test_debug_measurement() -> None:
    assert is_debug_measurement(bytes(48), bytes(48), bytes(48))
    assert not is_debug_measurement(bytes(48), bytes(48), b"\x00" * 47 + b"\x01")


# --- only SHA-384 (48-byte) PCRs: nothing else can ever match a Nitro enclave ---------------

SHA256_PCRS = ["11" * 32, "22" * 32, "33" * 32]


@pytest.mark.parametrize(("size", "digest"), [(32, "SHA-256"), (64, "SHA-512")])
def test_pcrs_of_another_digest_size_are_refused(size: int, digest: str) -> None:
    with pytest.raises(MeasurementError, match=f"found {size} bytes \\(a {digest} value\\)"):
        pcr_from_hex("ab" * size, name="PCR1")
    with pytest.raises(MeasurementError, match="PCR0 must be 48 bytes"):
        os_image_hash(bytes(size), bytes(size), bytes(size))


def test_sha256_measurements_name_the_hash_algorithm() -> None:
    doc = {"Measurements": {"HashAlgorithm": "Sha256 { ... }",
                            **{f"PCR{i}": v for i, v in enumerate(SHA256_PCRS)}}}
    with pytest.raises(MeasurementError, match=r'HashAlgorithm is "Sha256 \{ \.\.\. \}"'):
        pcrs_from_nitro_cli(json.dumps(doc))
    del doc["Measurements"]["HashAlgorithm"]  # no algorithm given: the size says it
    with pytest.raises(MeasurementError, match=r"PCR0 must be 48 bytes.*SHA-256"):
        pcrs_from_nitro_cli(json.dumps(doc))


@pytest.mark.parametrize("algorithm", [7, "sha384", "", ["Sha384"]])
def test_any_other_hash_algorithm_value_is_refused(algorithm: object) -> None:
    doc = {"HashAlgorithm": algorithm, "PCR0": PCR0, "PCR1": PCR1, "PCR2": PCR2}
    with pytest.raises(MeasurementError, match="HashAlgorithm is"):
        pcrs_from_nitro_cli(doc)


def test_hash_pcrs_takes_any_one_length_for_the_kms() -> None:
    """An attestation document says its own digest; the KMS hashes what it reports."""
    assert hash_pcrs(bytes(32), bytes(32), bytes(32)) == "0x" + hashlib.sha256(bytes(96)).hexdigest()
    with pytest.raises(MeasurementError, match="one length"):
        hash_pcrs(bytes(32), bytes(48), bytes(48))


# --- what people pipe in by mistake get a hint, not just "does not parse" -----------------

DESCRIBE_ENCLAVES = [{
    "EnclaveName": "app", "EnclaveID": "i-0123456789abcdef0-enc0123456789abcdef",
    "ProcessID": 4242, "EnclaveCID": 16, "NumberOfCPUs": 2, "CPUIDs": [1, 3],
    "MemoryMiB": 512, "State": "RUNNING", "Flags": "NONE",
    "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": PCR0, "PCR1": PCR1, "PCR2": PCR2},
}]
BUILD_OUTPUT = json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": PCR0,
                                            "PCR1": PCR1, "PCR2": PCR2}}, indent=2)
PROGRESS = ("Start building the Enclave Image...\nUsing the locally available Docker image...\n"
            "Enclave Image successfully created.\n")


def test_describe_enclaves_output_gets_a_hint() -> None:
    with pytest.raises(MeasurementError, match=r"describe-enclaves.*describe-eif"):
        pcrs_from_nitro_cli(json.dumps(DESCRIBE_ENCLAVES, indent=2))


@pytest.mark.parametrize("text", [PROGRESS + BUILD_OUTPUT, BUILD_OUTPUT + "\n" + PROGRESS],
                         ids=["progress-before", "progress-after"])
def test_output_mixed_with_stderr_gets_a_hint(text: str) -> None:
    with pytest.raises(MeasurementError, match=r"does not parse.*stdout only .*not `2>&1`"):
        pcrs_from_nitro_cli(text)


def test_plain_bad_json_gets_no_stderr_hint() -> None:
    with pytest.raises(MeasurementError) as info:
        pcrs_from_nitro_cli('{"Measurements": ')
    assert "2>&1" not in str(info.value)


@pytest.mark.parametrize("text", ["", " \n"])
def test_empty_input(text: str) -> None:
    with pytest.raises(MeasurementError, match="the input is empty"):
        pcrs_from_nitro_cli(text)


def test_deep_nesting_is_a_measurement_error_not_a_crash() -> None:
    with pytest.raises(MeasurementError, match="nested too deeply"):
        pcrs_from_nitro_cli("[" * 100_000 + "]" * 100_000)


def test_deep_nesting_is_refused_before_parsing_where_web3_raised_the_recursion_limit() -> None:
    """web3 imports py-evm, which sets the recursion limit to 100000: json.loads would crash
    the interpreter (kms-gov) on this input instead of raising RecursionError."""
    code = ("import sys, web3\nassert sys.getrecursionlimit() >= 100000\n"
            "from keyutil.measurements import MeasurementError, pcrs_from_nitro_cli\n"
            "try:\n    pcrs_from_nitro_cli('[' * 300000 + ']' * 300000)\n"
            "except MeasurementError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert (result.returncode, result.stdout.strip()) == (
        0, "expected nitro-cli JSON; it is nested too deeply (over 512 levels)")
    deep_in_strings = json.dumps({"x": "[" * 1000, "Measurements": {"PCR0": PCR0,
                                                                     "PCR1": PCR1, "PCR2": PCR2}})
    assert os_image_hash(*pcrs_from_nitro_cli(deep_in_strings)) == EXPECTED


# --- whatever the input, a tuple of three 48-byte PCRs or a MeasurementError -----------------

bracket_soup = st.text(alphabet='[]{}"\\:, a0', max_size=3000)


@settings(max_examples=400, deadline=None)
@given(st.one_of(nitro_cli_like_documents(), st.text(), bracket_soup,
                 bracket_soup.map(lambda t: "[" * 600 + t)))
def test_any_text_gives_pcrs_or_a_measurement_error(text: str) -> None:
    try:
        pcrs = pcrs_from_nitro_cli(text)
    except MeasurementError:
        return
    assert [len(p) for p in pcrs] == [48, 48, 48]
