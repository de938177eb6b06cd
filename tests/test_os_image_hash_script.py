"""scripts/compute_os_image_hash.sh agrees with keyutil.measurements, byte for byte.

Every test runs the script with bash in a subprocess. The Python functions are the
reference: for any input, the script prints what ``os_image_hash`` returns, or fails with
exit code 3 where ``pcr_from_hex`` / ``pcrs_from_nitro_cli`` raise MeasurementError.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyutil.measurements import (
    MeasurementError,
    os_image_hash,
    pcr_from_hex,
    pcrs_from_nitro_cli,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compute_os_image_hash.sh"
BASH = shutil.which("bash") or "/bin/bash"

EXIT_USAGE = 2
EXIT_INVALID = 3
EXIT_UNREADABLE = 4

# (PCR0, PCR1, PCR2, OS_IMAGE_HASH): two real enclaves (tests/vectors) and debug mode.
VECTORS = [
    (
        "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d5599936332687e6f66fc890ac8cf150142d8b",
        "bcdf05fefccaa8e55bf2c8d6dee9e79bbff31e34bf28a99aa19e6b29c37ee80b214a414b7607236edf26fcb78654e63f",
        "d8f114da658de5481f8d9ec73907feb553560787522f705c92d7d96beed8e15e2aa611984e098c576832c292e8dc469a",
        "0x959df09185f8ea3a073b2107a64feee2970b3251bb1770176c254fc4769fa48e",
    ),
    (
        "ec74bfbe7f7445a6c7610e152935e028276f638042b74797b119648e13f7a3675796b721034c320f140ea001b41aeae2",
        "fa2593b59f3e4fc7daba5cbdddfd3449d67cd02d43bb1128885e8f38b914d081dccdb68fff6d5b7a76bcb866a18a74a3",
        "56ba201a72e36cd051e95e5c4724c899039b711770f4d9d4fe7a1de007119a10b364badcd35e90f728a5bdc910905723",
        "0xb1aeca9b01ddb35438cb616a4099e22276656fc9715398d37ea0a949b9ea4c85",
    ),
    (
        "00" * 48,
        "00" * 48,
        "00" * 48,
        "0x81c611f35bff79491538b2f7cf201c7597a661a5c549633541c62bdc8af1613f",
    ),
]
PCR0, PCR1, PCR2, EXPECTED = VECTORS[0]

# Each example spawns a bash process: keep the property tests small.
FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(
    *args: str,
    stdin: str | bytes | None = None,
    env: dict[str, str] | None = None,
    stdin_fd: int | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Runs the script with bash; stdin is /dev/null unless given (never a terminal)."""
    data = stdin.encode() if isinstance(stdin, str) else stdin
    stdin_arg: int | None = None
    if data is None:
        stdin_arg = subprocess.DEVNULL if stdin_fd is None else stdin_fd
    return subprocess.run(
        [BASH, str(SCRIPT), *args],
        input=data,
        stdin=stdin_arg,
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )


def reference_from_args(texts: tuple[str, str, str]) -> str | None:
    try:
        pcrs = [pcr_from_hex(text, name=f"PCR{i}") for i, text in enumerate(texts)]
        return os_image_hash(pcrs[0], pcrs[1], pcrs[2])
    except MeasurementError:
        return None


def reference_from_json(text: str) -> str | None:
    try:
        return os_image_hash(*pcrs_from_nitro_cli(text))
    except MeasurementError:
        return None


def fill(template: str, *values: str) -> str:
    """The template with each %s replaced in turn (JSON text is full of braces)."""
    for value in values:
        template = template.replace("%s", value, 1)
    return template


def assert_ok(result: subprocess.CompletedProcess[bytes], expected: str) -> None:
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode() == expected + "\n"
    assert result.stderr == b""


def assert_fails(result: subprocess.CompletedProcess[bytes], code: int, *words: str) -> None:
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == code, (result.returncode, stderr)
    assert result.stdout == b""
    assert stderr.startswith("compute_os_image_hash.sh: error: "), stderr
    for word in words:
        assert word in stderr, stderr


def assert_agrees(result: subprocess.CompletedProcess[bytes], expected: str | None) -> None:
    if expected is None:
        assert_fails(result, EXIT_INVALID)
    else:
        assert_ok(result, expected)


def build_enclave_json(p0: str, p1: str, p2: str) -> dict[str, Any]:
    """What ``nitro-cli build-enclave`` prints on stdout."""
    return {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": p0, "PCR1": p1, "PCR2": p2}}


def describe_eif_json(p0: str, p1: str, p2: str) -> dict[str, Any]:
    """What ``nitro-cli describe-eif`` prints: more keys, nested objects, PCR8, decoys."""
    return {
        "EifVersion": 4,
        "Measurements": {
            "HashAlgorithm": "Sha384 { ... }",
            "PCR0": p0,
            "PCR1": p1,
            "PCR2": p2,
            "PCR8": "8790eb3cce6c83d07e84b126dc61ca923333d6f66615c4a79157de48c5ab2418"
            "bdc60746ea7b7afbff03a1c6210201cb",
        },
        "IsSigned": True,
        "SigningCertificate": {"IssuerName": {"commonName": "enclave-signer"}},
        "CheckCRC": True,
        "ImageName": 'app "quoted" \\ {braces} [brackets], é ✓',
        "ImageVersion": "1.0",
        "Metadata": {
            "BuildTime": "2024-11-30T16:22:48.387Z",
            "BuildTool": "nitro-cli",
            "BuildToolVersion": "1.3.4",
            "OperatingSystem": "Linux",
            "KernelVersion": "6.1",
            "DockerInfo": {
                "Architecture": "amd64",
                "Size": 123456789,
                "Ratio": -1.5e-3,
                "Config": {
                    "Cmd": ["/app", "--port", "8000"],
                    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin"],
                    "Labels": None,
                    # Not the top-level Measurements: must be ignored.
                    "Measurements": {"PCR0": "00" * 48, "PCR1": "00" * 48, "PCR2": "00" * 48},
                },
                "RootFS": {"Type": "layers", "Layers": ["sha256:" + "ab" * 32] * 3},
            },
        },
    }


# --- the known vectors -------------------------------------------------------------------


@pytest.mark.parametrize(("p0", "p1", "p2", "expected"), VECTORS)
def test_vectors(p0: str, p1: str, p2: str, expected: str) -> None:
    assert os_image_hash(bytes.fromhex(p0), bytes.fromhex(p1), bytes.fromhex(p2)) == expected
    assert_ok(run(p0, p1, p2), expected)
    assert_ok(run("0x" + p0.upper(), "0x" + p1, p2.upper()), expected)


def test_not_the_hex_text_method() -> None:
    """The script hashes raw bytes, not `sha256sum <<< "${PCR0}${PCR1}${PCR2}"`."""
    wrong = subprocess.run(
        [BASH, "-c", 'sha256sum <<< "${PCR0}${PCR1}${PCR2}"'],
        env={**os.environ, "PCR0": PCR0, "PCR1": PCR1, "PCR2": PCR2},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    assert wrong == hashlib.sha256(f"{PCR0}{PCR1}{PCR2}\n".encode()).hexdigest()
    result = run(PCR0, PCR1, PCR2)
    assert_ok(result, EXPECTED)
    assert wrong not in result.stdout.decode()
    # Nor the hex text without the newline.
    assert hashlib.sha256(f"{PCR0}{PCR1}{PCR2}".encode()).hexdigest() not in EXPECTED


# --- nitro-cli JSON ----------------------------------------------------------------------

FORMATS: dict[str, Callable[[dict[str, Any]], str]] = {
    "pretty": lambda doc: json.dumps(doc, indent=2) + "\n",
    "compact": lambda doc: json.dumps(doc, separators=(",", ":")),
    "one-line": lambda doc: json.dumps(doc, ensure_ascii=False),
    "crlf-tabs": lambda doc: json.dumps(doc, indent="\t").replace("\n", "\r\n") + "\r\n",
}
DOCS = {"build-enclave": build_enclave_json, "describe-eif": describe_eif_json}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("style", DOCS)
def test_nitro_cli_json_from_a_file_and_stdin(tmp_path: Path, style: str, fmt: str) -> None:
    p0, p1, p2, expected = VECTORS[0] if style == "build-enclave" else VECTORS[1]
    text = FORMATS[fmt](DOCS[style](p0, p1, p2))
    assert reference_from_json(text) == expected
    path = tmp_path / "measurements.json"
    path.write_text(text, encoding="utf-8", newline="")
    assert_ok(run(str(path)), expected)
    assert_ok(run(stdin=text), expected)


def test_every_way_to_name_the_json(tmp_path: Path) -> None:
    text = json.dumps(describe_eif_json(PCR0, PCR1, PCR2), indent=4)
    path = tmp_path / "describe eif.json"  # a space in the name
    path.write_text(text)
    assert_ok(run("--json", str(path)), EXPECTED)
    assert_ok(run(f"--json={path}"), EXPECTED)
    assert_ok(run("-", stdin=text), EXPECTED)
    assert_ok(run("--json", "-", stdin=text), EXPECTED)
    substituted = subprocess.run(  # a pipe named as a file: nitro-cli ... | or <(...)
        [BASH, "-c", 'bash "$0" <(cat "$1")', str(SCRIPT), str(path)],
        capture_output=True,
        check=False,
    )
    assert_ok(substituted, EXPECTED)


def test_json_quirks_as_python_reads_them() -> None:
    """Escapes, duplicate keys, a bare Measurements object, Python's strip()."""
    esc = "".join(f"\\u{ord(c):04x}" for c in PCR1)
    cases = [
        # a bare Measurements object (what pcrs_from_nitro_cli also accepts)
        json.dumps({"PCR0": PCR0, "PCR1": PCR1, "PCR2": PCR2}),
        # escaped key and value; \/ escape elsewhere
        fill(
            '{"Measur\\u0065ments": {"PCR\\u0030": "%s", "PCR1": "%s", "PCR2": "%s", "x": "\\/"}}',
            PCR0,
            esc,
            PCR2,
        ),
        # duplicates: the last one wins
        json.dumps({"Measurements": 1})[:-1]
        + fill(
            ', "Measurements": {"PCR0": "zz", "PCR0": "%s", "PCR1": "%s", "PCR2": "%s"}}',
            PCR0,
            PCR1,
            PCR2,
        ),
        # surrounding whitespace that str.strip() removes, ASCII and Unicode
        json.dumps(
            {
                "Measurements": {
                    "PCR0": f" \t\n{PCR0}\u00a0",
                    "PCR1": f"\u3000{PCR1}\u2029",
                    "PCR2": f"\x1c0x{PCR2}\u0085",
                }
            },
            ensure_ascii=False,
        ),
        json.dumps({"Measurements": {"PCR0": f"\u2003{PCR0}", "PCR1": PCR1, "PCR2": PCR2}}),
        # NaN, Infinity, big numbers and a non-BMP escape elsewhere
        fill(
            '{"a": [NaN, -Infinity, Infinity, 1e400, -0.0e-0, %s], "b": "\\ud83d\\ude00",'
            ' "Measurements": {"PCR0": "%s", "PCR1": "%s", "PCR2": "%s"}}',
            "1" * 600,
            PCR0,
            PCR1,
            PCR2,
        ),
    ]
    for text in cases:
        assert reference_from_json(text) == EXPECTED, text
        assert_ok(run(stdin=text), EXPECTED)


def test_a_large_describe_eif_document() -> None:
    doc = describe_eif_json(PCR0, PCR1, PCR2)
    doc["Metadata"]["DockerInfo"]["History"] = [
        {"created_by": "RUN " + "x" * 200, "layer": i, "empty": False} for i in range(250)
    ]
    text = json.dumps(doc, indent=2)
    assert len(text) > 70_000  # describe-eif output is a few kB
    assert_ok(run(stdin=text), EXPECTED)


# --- random input: the script agrees with the Python reference ----------------------------

hex_case = st.sampled_from(
    [str.lower, str.upper, lambda s: s[: len(s) // 2].upper() + s[len(s) // 2 :]]
)
prefixes = st.sampled_from(["", "0x"])
padding = st.sampled_from(["", " ", "\t", "\n ", "\u00a0", "\u2009\r"])


@st.composite
def pcr_texts(draw: st.DrawFn, size: int) -> str:
    value = draw(st.binary(min_size=size, max_size=size)).hex()
    return draw(padding) + draw(prefixes) + draw(hex_case)(value) + draw(padding)


@st.composite
def valid_pcr_triples(draw: st.DrawFn) -> tuple[str, str, str]:
    return draw(pcr_texts(48)), draw(pcr_texts(48)), draw(pcr_texts(48))


@FEW
@given(valid_pcr_triples())
def test_random_pcrs_as_arguments(texts: tuple[str, str, str]) -> None:
    expected = reference_from_args(texts)
    assert expected is not None
    assert_ok(run(*texts), expected)


@FEW
@given(valid_pcr_triples(), st.sampled_from(sorted(DOCS)), st.sampled_from(sorted(FORMATS)))
def test_random_pcrs_in_nitro_cli_json(texts: tuple[str, str, str], style: str, fmt: str) -> None:
    text = FORMATS[fmt](DOCS[style](*texts))
    expected = reference_from_json(text)
    assert expected is not None
    assert expected == reference_from_args(texts)
    assert_ok(run(stdin=text), expected)


@st.composite
def maybe_bad_pcr_text(draw: st.DrawFn) -> str:
    """Mostly near-valid: lengths off by one or two digits, junk characters, odd prefixes."""
    digits = draw(st.sampled_from([64, 96, 128])) + draw(st.sampled_from([0, 0, -2, -1, 1, 2]))
    value = draw(st.text(alphabet="0123456789abcdefABCDEF", min_size=digits, max_size=digits))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(value)))
        junk = draw(st.sampled_from(["g", "x", "0x", "0X", " ", "-", "\u00a0", "é", "\x01"]))
        value = value[:at] + junk + value[at:]
    return draw(padding) + draw(st.sampled_from(["", "0x", "0X", "x", "00x"])) + value


@FEW
@given(st.tuples(maybe_bad_pcr_text(), maybe_bad_pcr_text(), maybe_bad_pcr_text()))
def test_arguments_accepted_and_rejected_as_python_does(texts: tuple[str, str, str]) -> None:
    assert_agrees(run(*texts), reference_from_args(texts))


json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False)
    | st.text(st.characters(exclude_categories=["Cs"]), max_size=8)
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
pcr_entries = st.one_of(
    pcr_texts(48),
    maybe_bad_pcr_text(),
    json_leaves,
    st.just(PCR0),
)
MUTATION_CHARS = '{}[],:"\\ \n\t\r\x00\x01\x02\x1f\u00a0aeE0189+-.xuntfNI/'


@st.composite
def nitro_cli_like_documents(draw: st.DrawFn) -> str:
    measurements: dict[str, Any] = {"HashAlgorithm": "Sha384 { ... }"}
    for name in ("PCR0", "PCR1", "PCR2", "PCR8"):
        if draw(st.integers(0, 9)) > 0:
            measurements[name] = draw(pcr_entries)
    extra = draw(
        st.dictionaries(
            st.sampled_from(["EifVersion", "Metadata", "IsSigned", "PCR0"]), json_values, max_size=2
        )
    )
    doc: Any
    shape = draw(st.sampled_from(["nested", "nested", "bare", "wrong-type", "none"]))
    if shape == "nested":
        doc = {**extra, "Measurements": measurements}
    elif shape == "bare":
        doc = measurements
    elif shape == "wrong-type":
        doc = {**extra, "Measurements": draw(json_values.filter(lambda v: not isinstance(v, dict)))}
    else:
        doc = draw(json_values)
    text = json.dumps(
        doc,
        indent=draw(st.sampled_from([None, 0, 2, "\t"])),
        ensure_ascii=draw(st.booleans()),
    )
    for _ in range(draw(st.integers(0, 2))):  # small edits: Python may or may not still parse it
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()) and at < len(text):
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + draw(st.sampled_from(MUTATION_CHARS)) + text[at:]
    return text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nitro_cli_like_documents())
def test_json_accepted_and_rejected_as_python_does(text: str) -> None:
    assert_agrees(run(stdin=text), reference_from_json(text))


# --- errors: distinct exit codes, a message on stderr ---------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((PCR0, PCR1), ["three PCR values", "2 arguments"]),
        ((PCR0, PCR1, PCR2, PCR0), ["4 arguments"]),
        ((PCR0,), ["one PCR value"]),
        (("--json",), ["--json needs a FILE"]),
        (("--bogus",), ["unknown option"]),
        (("--json", "x.json", PCR0), ["--json"]),
        (("",), ["empty argument"]),
    ],
)
def test_usage_errors(args: tuple[str, ...], words: list[str]) -> None:
    result = run(*args)
    assert_fails(result, EXIT_USAGE, *words)
    assert "--help" in result.stderr.decode()


def test_no_arguments_with_stdin_a_terminal_is_a_usage_error() -> None:
    main, replica = os.openpty()
    try:
        assert_fails(run(stdin_fd=replica), EXIT_USAGE, "no input")
    finally:
        os.close(main)
        os.close(replica)


BAD_ARGS = [
    # (PCR0, PCR1, PCR2), words expected on stderr
    (("zz" * 48, PCR1, PCR2), ["PCR0", "hex digits"]),
    ((PCR0, PCR1[:-1], PCR2), ["PCR1", "odd number"]),
    ((PCR0, PCR1, PCR2[:-2]), ["PCR2", "47 bytes"]),
    ((PCR0, PCR1, PCR2 + "00"), ["PCR2", "49 bytes"]),
    ((PCR0[:64], PCR1, PCR2), ["PCR0", "48 bytes", "found 32 bytes (a SHA-256 value)"]),
    ((PCR0, PCR1 + PCR1[:32], PCR2), ["PCR1", "48 bytes", "found 64 bytes (a SHA-512 value)"]),
    ((PCR0[:64], PCR1[:64], PCR2[:64]), ["PCR0", "SHA-384", "SHA-256"]),
    (("0X" + PCR0, PCR1, PCR2), ["PCR0", "hex digits"]),
    ((PCR0, "", PCR2), ["PCR1", "0 bytes"]),
    ((PCR0, "0x", PCR2), ["PCR1", "0 bytes"]),
    ((PCR0, PCR1, f"{PCR2[:40]} {PCR2[40:]}"), ["PCR2", "hex digits"]),
    ((PCR0, PCR1, "-" + PCR2), ["PCR2", "hex digits"]),
]


@pytest.mark.parametrize(("args", "words"), BAD_ARGS)
def test_invalid_pcr_arguments(args: tuple[str, str, str], words: list[str]) -> None:
    assert reference_from_args(args) is None
    assert_fails(run(*args), EXIT_INVALID, *words)


BAD_JSON = [
    (json.dumps({"EifVersion": 4, "IsSigned": False}), ["PCR0", "not found"]),
    (json.dumps({"Measurements": {"PCR0": PCR0, "PCR1": PCR1}}), ["PCR2", "not found"]),
    (json.dumps({"Measurements": {"PCR0": PCR0, "PCR1": 7, "PCR2": PCR2}}), ["PCR1"]),
    (json.dumps({"Measurements": [PCR0, PCR1, PCR2]}), ["Measurements", "object"]),
    (json.dumps({"Measurements": None}), ["Measurements", "object"]),
    (json.dumps({"Measurements": {"PCR0": PCR0, "PCR1": PCR1, "PCR2": "xyz"}}), ["PCR2", "hex"]),
    (json.dumps([{"Measurements": {"PCR0": PCR0, "PCR1": PCR1, "PCR2": PCR2}}]), ["object"]),
    (
        fill('{"Measurements": {"PCR0": "%s", "PCR1": "%s", "PCR2": "%s",}}', PCR0, PCR1, PCR2),
        ["not valid JSON"],
    ),
    (fill('{"Measurements": {"PCR0": "%s"', PCR0), ["not valid JSON"]),
    ("", ["not valid JSON", "end of input"]),
    (
        "Start building the Enclave Image...\n"
        + json.dumps(build_enclave_json(PCR0, PCR1, PCR2), indent=2),
        ["not valid JSON", "stdout only", "not `2>&1`"],
    ),
    (
        json.dumps(build_enclave_json(PCR0, PCR1, PCR2), indent=2)
        + "\nEnclave Image successfully created.\n",
        ["not valid JSON", "stdout only", "not `2>&1`"],
    ),
    (
        json.dumps([{"EnclaveID": "i-0abc-enc0def", "EnclaveCID": 16, "State": "RUNNING",
                     **build_enclave_json(PCR0, PCR1, PCR2)}], indent=2),
        ["describe-enclaves", "describe-eif --eif-path"],
    ),
    (
        json.dumps({"Measurements": {"HashAlgorithm": "Sha256 { ... }", "PCR0": PCR0[:64],
                                     "PCR1": PCR1[:64], "PCR2": PCR2[:64]}}),
        ['HashAlgorithm is "Sha256 { ... }"', "SHA-384"],
    ),
    (
        json.dumps({"Measurements": {"PCR0": PCR0[:64], "PCR1": PCR1[:64], "PCR2": PCR2[:64]}}),
        ["PCR0", "48 bytes", "SHA-256"],
    ),
    (
        json.dumps({"HashAlgorithm": 384, "PCR0": PCR0, "PCR1": PCR1, "PCR2": PCR2}),
        ["HashAlgorithm is"],
    ),
    (json.dumps(build_enclave_json(PCR0, PCR1, PCR2)) + " {}", ["not valid JSON", "not `2>&1`"]),
    ('{"a": ' + "[" * 513 + "]" * 513 + "}", ["nested"]),
]


@pytest.mark.parametrize(("text", "words"), BAD_JSON)
def test_invalid_json(text: str, words: list[str]) -> None:
    assert reference_from_json(text) is None
    assert_fails(run(stdin=text), EXIT_INVALID, *words)


def test_invalid_json_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(BAD_JSON[0][0])
    assert_fails(run("--json", str(path)), EXIT_INVALID, "PCR0", "not found")
    path.write_text(BAD_JSON[7][0])
    assert_fails(run(str(path)), EXIT_INVALID, "not valid JSON")


def test_unreadable_inputs(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert_fails(run("--json", str(missing)), EXIT_UNREADABLE, "missing.json", "no such file")
    assert_fails(run(str(missing)), EXIT_UNREADABLE, "no such file")
    assert_fails(run(str(tmp_path)), EXIT_UNREADABLE, "directory")
    assert_fails(run("--json", str(tmp_path)), EXIT_UNREADABLE, "directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_file_without_read_permission(tmp_path: Path) -> None:
    path = tmp_path / "secret.json"
    path.write_text(json.dumps(build_enclave_json(PCR0, PCR1, PCR2)))
    path.chmod(0)
    try:
        assert_fails(run("--json", str(path)), EXIT_UNREADABLE, "permission denied")
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


# --- help, portability, lint ---------------------------------------------------------------


def test_help() -> None:
    for flag in ("--help", "-h"):
        result = run(flag)
        assert result.returncode == 0
        text = result.stdout.decode()
        for word in (
            "PCR0 PCR1 PCR2",
            "--json FILE",
            "stdin",
            "describe-eif",
            "build-enclave",
            "Examples",
            "Exit codes",
            "sha256sum <<<",
        ):
            assert word in text, word
        for code in range(5):
            assert f"\n  {code}  " in text


def only(tmp_path: Path, *tools: str) -> dict[str, str]:
    """An environment whose PATH holds sha256sum, cat and ``tools``, nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("sha256sum", "cat", *tools):
        # python3 may be a pyenv shim that needs pyenv: link the interpreter itself.
        found = os.path.realpath(sys.executable) if tool == "python3" else shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    return {"PATH": str(bin_dir)}


def test_pcr_arguments_need_only_bash_and_coreutils(tmp_path: Path) -> None:
    """With PATH holding just sha256sum and cat: no jq, xxd, python, openssl."""
    env = only(tmp_path)
    assert_ok(run(PCR0, PCR1, PCR2, env=env), EXPECTED)
    assert_fails(run(PCR0[:64], PCR1[:64], PCR2[:64], env=env), EXIT_INVALID, "SHA-256")
    assert run("--help", env=env).returncode == 0


def test_json_without_python3_or_jq_says_what_to_install(tmp_path: Path) -> None:
    text = json.dumps(describe_eif_json(PCR0, PCR1, PCR2), indent=2)
    assert_fails(run(stdin=text, env=only(tmp_path)), 1, "python3 or jq", "three PCR values")


@pytest.mark.parametrize("reader", ["python3", "jq"])
def test_json_with_either_reader(tmp_path: Path, reader: str) -> None:
    if shutil.which(reader) is None:
        pytest.skip(f"{reader} is not installed")
    env = only(tmp_path, reader)
    path = tmp_path / "describe eif.json"
    for style, (p0, p1, p2, expected) in zip(DOCS, VECTORS, strict=False):
        for fmt in FORMATS:
            path.write_text(FORMATS[fmt](DOCS[style](p0, p1, p2)), encoding="utf-8", newline="")
            assert_ok(run(str(path), env=env), expected)
            assert_ok(run(stdin=path.read_bytes(), env=env), expected)
    for text, words in BAD_JSON:
        if reader == "jq" and "[" * 513 in text:
            words = ["not valid JSON", "depth"]  # jq stops at 256 levels
        assert_fails(run(stdin=text, env=env), EXIT_INVALID, *words)
    padded = {"PCR0": f" \t\n{PCR0}\u00a0", "PCR1": f"\u3000{PCR1}\u2029", "PCR2": f"\x1c0x{PCR2}"}
    assert_ok(run(stdin=json.dumps({"Measurements": padded}), env=env), EXPECTED)


def test_script_is_executable_strict_bash() -> None:
    assert SCRIPT.stat().st_mode & stat.S_IXUSR
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert_ok(
        subprocess.run([str(SCRIPT), PCR0, PCR1, PCR2], capture_output=True, check=False), EXPECTED
    )


def test_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck") or str(
        Path(__file__).resolve().parents[1] / ".venv" / "bin" / "shellcheck"
    )
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout
