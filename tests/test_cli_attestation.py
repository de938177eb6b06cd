"""`mock-kms verify-attestation`, `keyutil attest` and `keyutil sim init`, in-process."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import VECTORS

from keyutil.cli import cli as keyutil_cli
from mock_kms.cli import cli as kms_cli

NONDEBUG = VECTORS / "aws-nondebug-2022-10-13.cose"
DEBUG = VECTORS / "aws-debug-2023-09-18.cose"
AT_NONDEBUG = "2022-10-13T08:58:03Z"


def run(cli, args, input=None, env=None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, args, input=input, env=env, catch_exceptions=False)


def test_verify_json_output_has_the_documented_fields() -> None:
    result = run(kms_cli, ["verify-attestation", str(NONDEBUG), "--at", AT_NONDEBUG, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["module_id"] == "i-020b6af9246d90e92-enc0183d09086c24190"
    assert out["timestamp"] == 1665651482136
    assert out["digest"] == "SHA384"
    assert out["os_image_hash"] == (
        "0x959df09185f8ea3a073b2107a64feee2970b3251bb1770176c254fc4769fa48e"
    )
    assert out["debug"] is False
    assert out["pcrs"]["8"].startswith("8790eb3c")
    assert len(out["pcrs"]) == 16
    assert out["public_key"] is None and out["user_data"] is None
    assert len(out["nonce"]) == 512


@pytest.mark.parametrize(
    "when", ["1665651483", "1665651483000", "1665651482.5", AT_NONDEBUG, "2022-10-13T08:58:03"]
)
def test_verify_time_formats(when: str) -> None:
    result = run(kms_cli, ["verify-attestation", str(NONDEBUG), "--at", when, "--json"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("encoding", ["hex", "base64", "base64url", "hex-0x-wrapped"])
def test_verify_detects_text_encodings(encoding: str, tmp_path: Path) -> None:
    raw = NONDEBUG.read_bytes()
    text = {
        "hex": raw.hex(),
        "base64": base64.b64encode(raw).decode(),
        "base64url": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "hex-0x-wrapped": "0x"
        + "\n".join(raw.hex()[i : i + 64] for i in range(0, 2 * len(raw), 64)),
    }[encoding]
    path = tmp_path / "doc.txt"
    path.write_text(text + "\n")
    result = run(kms_cli, ["verify-attestation", str(path), "--at", AT_NONDEBUG, "--json"])
    assert result.exit_code == 0, result.output


def test_verify_reads_stdin() -> None:
    result = run(
        kms_cli,
        ["verify-attestation", "-", "--at", AT_NONDEBUG],
        input=base64.b64encode(NONDEBUG.read_bytes()),
    )
    assert result.exit_code == 0
    assert "0x959df09185f8ea3a073b2107a64feee2970b3251bb1770176c254fc4769fa48e" in result.stdout


def test_verify_invalid_gives_exit_1_and_json_error() -> None:
    result = run(kms_cli, ["verify-attestation", str(DEBUG), "--at", "1695049411", "--json"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["error"] == "debug_enclave"
    assert "all zeros" in out["message"]


def test_verify_debug_allowed_is_reported_as_debug() -> None:
    result = run(
        kms_cli,
        ["verify-attestation", str(DEBUG), "--at", "1695049411", "--allow-debug", "--json"],
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["debug"] is True


def test_verify_stale_document_and_max_age_option() -> None:
    late = "2022-10-13T09:08:03Z"  # ten minutes after it was made
    stale = run(kms_cli, ["verify-attestation", str(NONDEBUG), "--at", late, "--json"])
    assert stale.exit_code == 1
    assert json.loads(stale.stdout)["error"] == "document_too_old"
    ok = run(
        kms_cli,
        ["verify-attestation", str(NONDEBUG), "--at", late, "--max-age", "900", "--json"],
    )
    assert ok.exit_code == 0


def test_verify_now_refuses_an_old_real_document_with_expired_certificate() -> None:
    result = run(kms_cli, ["verify-attestation", str(NONDEBUG), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == "certificate_expired"


def test_verify_garbage_input_is_an_encoding_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage"
    path.write_bytes(b"this is not a document!")
    result = run(kms_cli, ["verify-attestation", str(path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == "input_encoding"


def test_verify_empty_input(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.write_bytes(b"")
    result = run(kms_cli, ["verify-attestation", str(path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == "input_encoding"


def test_verify_oversize_input(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"\x84" + b"\x00" * 70_000)
    result = run(kms_cli, ["verify-attestation", str(path), "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["error"] == "input_too_large"


def test_verify_human_error_goes_to_stderr() -> None:
    result = CliRunner().invoke(kms_cli, ["verify-attestation", str(DEBUG), "--at", "1695049411"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "invalid: debug_enclave" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--at", "yesterday"],
        ["--no-aws-root"],
        ["--max-age", "-1"],
    ],
    ids=["bad-time", "no-root-at-all", "negative-max-age"],
)
def test_verify_usage_errors_exit_2(args: list[str]) -> None:
    result = run(kms_cli, ["verify-attestation", str(NONDEBUG), *args])
    assert result.exit_code == 2


def test_verify_missing_file_is_usage_error(tmp_path: Path) -> None:
    result = run(kms_cli, ["verify-attestation", str(tmp_path / "nope")])
    assert result.exit_code == 2


def test_verify_root_file_that_is_not_pem(tmp_path: Path) -> None:
    bad = tmp_path / "root.pem"
    bad.write_text("not a certificate")
    result = run(kms_cli, ["verify-attestation", str(NONDEBUG), "--root", str(bad), "--json"])
    assert result.exit_code == 2  # a usage error, as in keyutil and kms-gov (issue 14, item 10)
    assert "--root" in result.stderr and "expected PEM certificates" in result.stderr


def test_verify_help_teaches_inputs_and_exit_codes() -> None:
    result = run(kms_cli, ["verify-attestation", "--help"])
    assert "raw COSE bytes, hex or base64" in result.stdout
    assert "Exit codes" in result.stdout


# -- keyutil --------------------------------------------------------------------------------


def test_sim_init_attest_and_verify_round_trip(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    init = run(keyutil_cli, ["sim", "init", str(sim), "--pcr0", "ab" * 48, "--json"])
    assert init.exit_code == 0, init.output
    summary = json.loads(init.stdout)
    assert summary["pcrs"]["0"] == "ab" * 48
    assert stat.S_IMODE(os.stat(sim / "ca" / "root.key.pem").st_mode) == 0o600

    doc = tmp_path / "doc.cose"
    attest = run(
        keyutil_cli,
        [
            "attest",
            "--nsm",
            "simulator",
            "--sim-dir",
            str(sim),
            "--nonce",
            "00ff",
            "--out",
            str(doc),
        ],
    )
    assert attest.exit_code == 0, attest.output
    assert doc.read_bytes()[:4].hex() == "8444a101"

    verified = run(
        kms_cli,
        [
            "verify-attestation",
            str(doc),
            "--root",
            str(sim / "root.pem"),
            "--no-aws-root",
            "--json",
        ],
    )
    assert verified.exit_code == 0, verified.output
    out = json.loads(verified.stdout)
    assert out["nonce"] == "00ff"
    assert out["os_image_hash"] == summary["os_image_hash"]

    aws_only = run(kms_cli, ["verify-attestation", str(doc), "--json"])
    assert aws_only.exit_code == 1
    assert json.loads(aws_only.stdout)["error"] == "chain_untrusted"


def test_attest_base64_to_stdout_from_environment(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    assert run(keyutil_cli, ["sim", "init", str(sim)]).exit_code == 0
    result = run(
        keyutil_cli,
        ["attest", "--user-data", "0xdeadbeef"],
        env={"KEYUTIL_NSM": "simulator", "KEYUTIL_SIM_DIR": str(sim)},
    )
    assert result.exit_code == 0, result.output
    assert base64.b64decode(result.stdout)[:1] == b"\x84"


def test_attest_oversize_nonce_is_an_nsm_error(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    run(keyutil_cli, ["sim", "init", str(sim)])
    result = CliRunner().invoke(
        keyutil_cli, ["attest", "--nsm", "simulator", "--sim-dir", str(sim), "--nonce", "00" * 1025]
    )
    assert result.exit_code == 5
    assert "nsm_field_too_large" in result.stderr


def test_attest_device_absent_is_an_nsm_error() -> None:
    if os.path.exists("/dev/nsm"):
        pytest.skip("a real NSM is present")
    result = CliRunner().invoke(keyutil_cli, ["attest", "--nsm", "device"])
    assert result.exit_code == 5
    assert "nsm_unavailable" in result.stderr


def test_attest_bad_hex_is_usage_error() -> None:
    result = CliRunner().invoke(keyutil_cli, ["attest", "--nonce", "xyz"])
    assert result.exit_code == 2


def test_attest_unwritable_output_is_output_error(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    run(keyutil_cli, ["sim", "init", str(sim)])
    result = CliRunner().invoke(
        keyutil_cli,
        [
            "attest",
            "--nsm",
            "simulator",
            "--sim-dir",
            str(sim),
            "--out",
            str(tmp_path / "no" / "doc"),
        ],
    )
    assert result.exit_code == 7


def test_sim_init_refuses_existing_and_debug_with_pcrs(tmp_path: Path) -> None:
    sim = tmp_path / "sim"
    assert run(keyutil_cli, ["sim", "init", str(sim)]).exit_code == 0
    assert CliRunner().invoke(keyutil_cli, ["sim", "init", str(sim)]).exit_code == 2
    both = CliRunner().invoke(
        keyutil_cli, ["sim", "init", str(tmp_path / "d"), "--debug", "--pcr0", "00" * 48]
    )
    assert both.exit_code == 2


def test_sim_init_rejects_wrong_pcr_length(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        keyutil_cli, ["sim", "init", str(tmp_path / "s"), "--pcr0", "ab" * 32]
    )
    assert result.exit_code == 2
    assert "48 bytes" in result.output
