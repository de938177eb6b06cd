"""Interop with an independent client: foundry's ``cast`` and ``kms-gov`` / the KMS reader
agree on the same contract on anvil, in both directions. cast signs from a keystore file, so
no key is ever on a command line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from chain_fixtures import Anvil
from eth_account import Account

from mock_kms import chain, gov
from mock_kms.allowlist import RpcAllowlist, require_allowed

IMAGE = "0x" + "d1" * 32
APP_NAME = "interop"
APP_HEX = "0x" + chain.parse_application(APP_NAME).hex()


def _cast(cast_bin: Path, *args: str) -> str:
    done = subprocess.run([str(cast_bin), *args], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def cast_wallet(tmp_path: Path, gov_env: dict[str, str]) -> list[str]:
    """cast's wallet options for kms-gov's signer: an encrypted keystore + a password file."""
    encrypted = Account.encrypt(gov_env["KMS_GOV_PRIVATE_KEY"], "interop-pw", kdf="pbkdf2",
                                iterations=1000)
    keystore = tmp_path / "keystore.json"
    keystore.write_text(json.dumps(encrypted))
    password = tmp_path / "password"
    password.write_text("interop-pw")
    return ["--keystore", str(keystore), "--password-file", str(password)]


@pytest.fixture
def deployed_by_kms_gov(capsys: pytest.CaptureFixture[str], gov_env: dict[str, str],
                        monkeypatch: pytest.MonkeyPatch) -> str:
    assert gov.main(["deploy", "--json"]) == 0
    address: str = json.loads(capsys.readouterr().out)["address"]
    monkeypatch.setenv("KMS_GOV_CONTRACT", address)
    return address


def test_cast_registers_and_kms_gov_and_the_kms_reader_see_it(
    anvil: Anvil, cast_bin: Path, cast_wallet: list[str], deployed_by_kms_gov: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address = deployed_by_kms_gov
    _cast(cast_bin, "send", address, "addOsImageHash(bytes32,bytes32)", IMAGE, APP_HEX,
          "--rpc-url", anvil.url, *cast_wallet)
    # The KMS reader.
    reader = RpcAllowlist.from_url(anvil.url, address, expected_chain_id=anvil.chain_id)
    assert require_allowed(reader, bytes.fromhex(IMAGE[2:])) == bytes.fromhex(APP_HEX[2:])
    # kms-gov check and list.
    assert gov.main(["check", IMAGE]) == 0
    assert capsys.readouterr().out.strip() == f"allowed: application {APP_NAME}"
    assert gov.main(["list", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["images"]
    assert (row["image_hash"], row["application"], row["allowed"]) == (IMAGE, APP_NAME, True)
    # cast revokes; kms-gov sees the revocation.
    _cast(cast_bin, "send", address, "removeOsImageHash(bytes32)", IMAGE,
          "--rpc-url", anvil.url, *cast_wallet)
    assert gov.main(["check", IMAGE]) == 1


def test_kms_gov_registers_and_cast_reads_it(
    anvil: Anvil, cast_bin: Path, deployed_by_kms_gov: str, capsys: pytest.CaptureFixture[str],
) -> None:
    address = deployed_by_kms_gov
    assert gov.main(["add-image", IMAGE, "--app", APP_NAME]) == 0
    capsys.readouterr()
    status = _cast(cast_bin, "call", address, "imageStatus(bytes32)(bool,bytes32)", IMAGE,
                   "--rpc-url", anvil.url)
    assert status.split() == ["true", APP_HEX]
    allowed = _cast(cast_bin, "call", address, "allowedOsImages(bytes32)(bool)", IMAGE,
                    "--rpc-url", anvil.url)
    assert allowed == "true"
    other = _cast(cast_bin, "call", address, "allowedOsImages(bytes32)(bool)", "0x" + "d2" * 32,
                  "--rpc-url", anvil.url)
    assert other == "false"


def test_kms_gov_calldata_executed_by_cast(
    anvil: Anvil, cast_bin: Path, cast_wallet: list[str], deployed_by_kms_gov: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The multisig path: kms-gov prints the call, another client sends those exact bytes."""
    address = deployed_by_kms_gov
    assert gov.main(["add-image", IMAGE, "--app", APP_NAME, "--calldata"]) == 0
    tx: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert tx["to"] == address
    _cast(cast_bin, "send", tx["to"], "--data", tx["data"], "--value", str(tx["value"]),
          "--rpc-url", anvil.url, *cast_wallet)
    assert gov.main(["check", IMAGE]) == 0


def test_cast_decodes_the_events_kms_gov_caused(
    anvil: Anvil, cast_bin: Path, deployed_by_kms_gov: str, capsys: pytest.CaptureFixture[str],
) -> None:
    address = deployed_by_kms_gov
    assert gov.main(["add-image", IMAGE, "--app", APP_NAME, "--json"]) == 0
    block = json.loads(capsys.readouterr().out)["block"]
    logs = json.loads(_cast(cast_bin, "logs", "--json", "--address", address,
                            "--from-block", str(block), "--to-block", str(block),
                            "OsImageHashAdded(bytes32)", "--rpc-url", anvil.url))
    assert len(logs) == 1 and logs[0]["data"] == IMAGE
    sig = _cast(cast_bin, "sig-event", "OsImageHashAdded(bytes32)")
    assert logs[0]["topics"] == [sig]

