"""``kms-gov add-image --measurements`` refuses what no Nitro enclave can match, and says why.

Each refusal happens before any RPC: no chain is needed, and nothing can have been sent
(the RPC URL points at a closed port; reaching it would be exit 3, not 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mock_kms import gov

PCRS = [bytes([i]) * 48 for i in (1, 2, 3)]
CLOSED = {"KMS_GOV_RPC_URL": "http://127.0.0.1:9", "KMS_GOV_CONTRACT": "0x" + "11" * 20,
          "KMS_GOV_PRIVATE_KEY": "0x" + "22" * 32}


def add_image(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              tmp_path: Path, text: str) -> tuple[int, dict[str, str], str]:
    for name, value in CLOSED.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "measurements.json"
    path.write_text(text)
    code = gov.main(["add-image", "--measurements", str(path), "--app", "api", "--json"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, json.loads(captured.out.strip().splitlines()[-1]), captured.err


def doc(algorithm: str | None, size: int) -> dict[str, object]:
    measurements: dict[str, object] = {f"PCR{i}": bytes([i + 1]).hex() * size for i in range(3)}
    if algorithm is not None:
        measurements["HashAlgorithm"] = algorithm
    return {"Measurements": measurements}


@pytest.mark.parametrize(("document", "words"), [
    (doc("Sha256 { ... }", 32), ['HashAlgorithm is "Sha256 { ... }"', "SHA-384"]),
    (doc(None, 32), ["PCR0 must be 48 bytes", "found 32 bytes (a SHA-256 value)"]),
    (doc(None, 64), ["PCR0 must be 48 bytes", "found 64 bytes (a SHA-512 value)"]),
    (doc("Sha384 { ... }", 32), ["PCR0 must be 48 bytes", "SHA-256"]),
], ids=["sha256-named", "32-byte", "64-byte", "sha384-named-but-32-byte"])
def test_pcrs_that_are_not_sha384_are_refused(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path, document: dict[str, object],
                                              words: list[str]) -> None:
    code, answer, err = add_image(monkeypatch, capsys, tmp_path, json.dumps(document))
    assert (code, answer["error"]) == (gov.EXIT_USAGE, "measurements_invalid")
    for word in words:
        assert word in err


def test_describe_enclaves_output_gets_a_hint(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    running = [{"EnclaveID": "i-0abc-enc0def", "EnclaveCID": 16, "State": "RUNNING",
                **doc("Sha384 { ... }", 48)}]
    code, answer, err = add_image(monkeypatch, capsys, tmp_path, json.dumps(running))
    assert (code, answer["error"]) == (gov.EXIT_USAGE, "measurements_invalid")
    assert "describe-enclaves" in err and "describe-eif --eif-path" in err


def test_build_output_mixed_with_stderr_gets_a_hint(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path) -> None:
    text = ("Start building the Enclave Image...\nEnclave Image successfully created.\n"
            + json.dumps(doc("Sha384 { ... }", 48), indent=2))
    code, answer, err = add_image(monkeypatch, capsys, tmp_path, text)
    assert (code, answer["error"]) == (gov.EXIT_USAGE, "measurements_invalid")
    assert "does not parse" in err and "not `2>&1`" in err
