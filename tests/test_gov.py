"""``kms-gov`` against anvil, in-process through ``main(argv)``: each command, each exit code,
and for every refusal, proof that nothing was sent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from chain_fixtures import Anvil
from click.testing import CliRunner
from eth_account import Account

from keyutil.measurements import os_image_hash
from mock_kms import chain, gov

IMAGE = "0x" + "c1" * 32
IMAGE_2 = "0x" + "c2" * 32
PCRS = [bytes([i]) * 48 for i in (1, 2, 3)]
NITRO_CLI = {
    "EnclaveName": "app",
    "Measurements": {
        "HashAlgorithm": "Sha384 { ... }",
        "PCR0": PCRS[0].hex(), "PCR1": PCRS[1].hex(), "PCR2": PCRS[2].hex(),
    },
}


class Run:
    """One kms-gov run: exit code, stdout, stderr, and stdout parsed when it is JSON."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def json(self) -> Any:
        return json.loads(self.out.strip().splitlines()[-1])

    def __repr__(self) -> str:
        return f"Run(code={self.code}, out={self.out!r}, err={self.err!r})"


@pytest.fixture
def kms_gov(capsys: pytest.CaptureFixture[str], gov_env: dict[str, str]) -> Any:
    secret = gov_env["KMS_GOV_PRIVATE_KEY"]

    def run(*argv: str) -> Run:
        code = gov.main(list(argv))
        captured = capsys.readouterr()
        result = Run(code, captured.out, captured.err)
        for text in (result.out, result.err):
            assert secret[2:] not in text.lower(), "the private key leaked into the output"
        return result

    return run


@pytest.fixture
def contract(kms_gov: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    deployed = kms_gov("deploy", "--json")
    assert deployed.code == 0, deployed
    address: str = deployed.json["address"]
    monkeypatch.setenv("KMS_GOV_CONTRACT", address)
    return address


def _head(anvil: Anvil) -> int:
    return int(anvil.w3().eth.block_number)


# --- the happy paths -------------------------------------------------------------------


def test_help_documents_stable_exit_codes() -> None:
    result = CliRunner().invoke(gov.cli, ["check", "--help"])
    assert result.exit_code == 0
    for line in ("0  success", "1  check: the image is not allowed", "3  the RPC endpoint",
                 "4  wrong chain id", "5  the signer is not the owner", "7  no usable signing"):
        assert line in result.output


def test_deploy_prints_address_and_signer_is_owner(kms_gov: Any, gov_env: dict[str, str],
                                                   contract: str) -> None:
    info = kms_gov("info", "--json")
    assert info.code == 0, info
    assert info.json["owner"] == gov_env["_ADDRESS"]
    assert info.json["contract"] == contract
    assert info.json["pending_owner"] is None


def test_deploy_for_another_owner(kms_gov: Any, anvil: Anvil) -> None:
    multisig = anvil.new_account().address
    deployed = kms_gov("deploy", "--owner", multisig, "--json")
    assert deployed.code == 0 and deployed.json["owner"] == multisig
    info = kms_gov("info", "--contract", deployed.json["address"], "--json")
    assert info.json["owner"] == multisig
    # The deployer is not the owner: it cannot register images.
    refused = kms_gov("add-image", IMAGE, "--app", "a", "--contract", deployed.json["address"])
    assert refused.code == gov.EXIT_NOT_OWNER


def test_deploy_with_zero_owner_is_refused(kms_gov: Any, anvil: Anvil) -> None:
    head = _head(anvil)
    result = kms_gov("deploy", "--owner", "0x" + "00" * 20, "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_USAGE, "address_invalid")
    assert _head(anvil) == head


def test_add_check_remove_list(kms_gov: Any, contract: str, anvil: Anvil) -> None:
    added = kms_gov("add-image", IMAGE, "--app", "billing", "--json")
    assert added.code == 0, added
    assert added.json["image_hash"] == IMAGE and added.json["gas_used"] > 21_000
    checked = kms_gov("check", IMAGE)
    assert (checked.code, checked.out.strip()) == (0, "allowed: application billing")
    checked = kms_gov("check", IMAGE, "--json")
    assert checked.json["application"] == "billing"
    assert checked.json["application_hex"] == "0x" + chain.parse_application("billing").hex()
    assert kms_gov("add-image", IMAGE_2, "--app", "billing").code == 0
    removed = kms_gov("remove-image", IMAGE, "--json")
    assert removed.code == 0, removed
    assert kms_gov("check", IMAGE).code == gov.EXIT_NOT_ALLOWED
    listed = kms_gov("list", "--json")
    assert listed.code == 0, listed
    rows = {r["image_hash"]: r for r in listed.json["images"]}
    assert rows[IMAGE]["allowed"] is False
    assert rows[IMAGE]["removed_block"] == removed.json["block"]
    assert rows[IMAGE]["added_block"] == added.json["block"]
    assert rows[IMAGE_2]["allowed"] is True and rows[IMAGE_2]["application"] == "billing"
    text = kms_gov("list")
    assert f"{IMAGE_2}  billing  added@" in text.out and "removed@" in text.out


def test_check_of_unknown_image_exits_1(kms_gov: Any, contract: str) -> None:
    result = kms_gov("check", IMAGE, "--json")
    assert result.code == 1
    assert result.json == {"image_hash": IMAGE, "allowed": False, "application": None,
                           "application_hex": None}


def test_hex_application_id_is_displayed_as_hex(kms_gov: Any, contract: str) -> None:
    app = "0x" + "ff" * 32
    assert kms_gov("add-image", IMAGE, "--app", app).code == 0
    assert kms_gov("check", IMAGE).out.strip() == f"allowed: application {app}"


def test_add_image_from_nitro_cli_measurements_file(kms_gov: Any, contract: str,
                                                    tmp_path: Path) -> None:
    path = tmp_path / "describe-eif.json"
    path.write_text(json.dumps(NITRO_CLI))
    result = kms_gov("add-image", "--measurements", str(path), "--app", "api", "--json")
    assert result.code == 0, result
    assert result.json["image_hash"] == os_image_hash(*PCRS)
    assert kms_gov("check", os_image_hash(*PCRS)).code == 0


def test_add_image_from_measurements_on_stdin(gov_env: dict[str, str], contract: str) -> None:
    env = {k: v for k, v in gov_env.items() if not k.startswith("_")}
    env["KMS_GOV_CONTRACT"] = contract
    result = CliRunner().invoke(gov.cli, ["add-image", "--measurements", "-", "--app", "api"],
                                input=json.dumps(NITRO_CLI), env=env)
    assert result.exit_code == 0, result.output
    checked = CliRunner().invoke(gov.cli, ["check", os_image_hash(*PCRS)], env=env)
    assert checked.exit_code == 0 and "application api" in checked.output


def test_adding_the_same_registration_again_is_a_no_op(kms_gov: Any, contract: str,
                                                       anvil: Anvil) -> None:
    assert kms_gov("add-image", IMAGE, "--app", "billing").code == 0
    head = _head(anvil)
    again = kms_gov("add-image", IMAGE, "--app", "billing", "--json")
    assert again.code == 0 and again.json["already_allowed"] is True
    assert _head(anvil) == head


def test_two_step_ownership_through_kms_gov(kms_gov: Any, contract: str, anvil: Anvil,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    new_owner = anvil.new_account()
    started = kms_gov("transfer-ownership", new_owner.address, "--json")
    assert started.code == 0, started
    assert kms_gov("info", "--json").json["pending_owner"] == new_owner.address
    # The current owner is not the pending owner: it cannot accept.
    refused = kms_gov("accept-ownership", "--json")
    assert refused.code == gov.EXIT_NOT_OWNER and refused.json["error"] == "not_owner"
    monkeypatch.setenv("KMS_GOV_PRIVATE_KEY", "0x" + bytes(new_owner.key).hex())
    accepted = kms_gov("accept-ownership")
    assert accepted.code == 0, accepted
    assert kms_gov("info", "--json").json["owner"] == new_owner.address


# --- --calldata (multisig) -------------------------------------------------------------


def test_calldata_prints_the_transaction_and_sends_nothing(kms_gov: Any, contract: str,
                                                           anvil: Anvil,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.delenv("KMS_GOV_PRIVATE_KEY")  # no key is needed to propose
    head = _head(anvil)
    result = kms_gov("add-image", IMAGE, "--app", "billing", "--calldata")
    assert result.code == 0, result
    tx = result.json
    expected = chain.add_request(contract, bytes.fromhex(IMAGE[2:]),
                                 chain.parse_application("billing"))
    assert tx == {"to": contract, "data": "0x" + expected.data.hex(), "value": 0,
                  "chainId": anvil.chain_id}
    assert _head(anvil) == head


def test_calldata_that_would_revert_is_refused(kms_gov: Any, contract: str) -> None:
    result = kms_gov("remove-image", IMAGE, "--calldata", "--json")
    assert result.code == gov.EXIT_REVERTED
    assert result.json["error"] == "transaction_reverted"


def test_deploy_calldata_needs_an_owner(kms_gov: Any) -> None:
    assert kms_gov("deploy", "--calldata").code == gov.EXIT_USAGE
    owner = "0x" + "ab" * 20
    result = kms_gov("deploy", "--calldata", "--owner", owner)
    assert result.code == 0 and result.json["to"] is None
    assert result.json["data"].endswith("ab" * 20)


# --- bad input: clear error, non-zero exit, nothing sent -------------------------------


@pytest.mark.parametrize("bad", ["0x1234", "0x" + "zz" * 32, "c1" * 33, ""])
def test_hash_that_is_not_32_bytes_of_hex(kms_gov: Any, contract: str, anvil: Anvil,
                                          bad: str) -> None:
    head = _head(anvil)
    for argv in (["add-image", bad, "--app", "billing"], ["remove-image", bad], ["check", bad]):
        result = kms_gov(*argv, "--json")
        assert result.code == gov.EXIT_USAGE, (argv, result)
        assert result.json["error"] == "hash_invalid"
        assert "expected an image hash of 32 bytes" in result.err
    assert _head(anvil) == head


@pytest.mark.parametrize(("image", "code"), [
    ("0x" + "00" * 32, "hash_invalid"),
    ("0x81c611f35bff79491538b2f7cf201c7597a661a5c549633541c62bdc8af1613f", "debug_enclave"),
])
def test_zero_and_debug_hash_are_refused_before_sending(kms_gov: Any, contract: str,
                                                        anvil: Anvil, image: str,
                                                        code: str) -> None:
    head = _head(anvil)
    result = kms_gov("add-image", image, "--app", "billing", "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_USAGE, code)
    assert _head(anvil) == head


def test_debug_enclave_measurements_are_refused(kms_gov: Any, contract: str,
                                                tmp_path: Path) -> None:
    zero = {"Measurements": {f"PCR{i}": "00" * 48 for i in range(3)}}
    path = tmp_path / "debug.json"
    path.write_text(json.dumps(zero))
    result = kms_gov("add-image", "--measurements", str(path), "--app", "a", "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_USAGE, "debug_enclave")


@pytest.mark.parametrize("doc", ["not json", json.dumps({"Measurements": {"PCR0": "00"}})])
def test_malformed_measurements_are_refused(kms_gov: Any, contract: str, tmp_path: Path,
                                            doc: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(doc)
    result = kms_gov("add-image", "--measurements", str(path), "--app", "a", "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_USAGE, "measurements_invalid")


def test_hash_and_measurements_together_is_a_usage_error(kms_gov: Any, contract: str,
                                                         tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(NITRO_CLI))
    assert kms_gov("add-image", IMAGE, "--measurements", str(path), "--app", "a").code == 2
    assert kms_gov("add-image", "--app", "a").code == 2


@pytest.mark.parametrize("app", ["", "x" * 33, "caf\u00e9", "0x12", "0x" + "00" * 32])
def test_bad_application(kms_gov: Any, contract: str, app: str) -> None:
    result = kms_gov("add-image", IMAGE, "--app", app, "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_USAGE, "application_invalid")


def test_bad_contract_address(kms_gov: Any) -> None:
    result = kms_gov("check", IMAGE, "--contract", "0x1234", "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_USAGE, "address_invalid")


def test_missing_rpc_url_and_contract_are_usage_errors(kms_gov: Any,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert kms_gov("check", IMAGE).code == gov.EXIT_USAGE  # no contract
    monkeypatch.setenv("KMS_GOV_CONTRACT", "0x" + "42" * 20)
    monkeypatch.delenv("KMS_GOV_RPC_URL")
    result = kms_gov("check", IMAGE)
    assert result.code == gov.EXIT_USAGE and "--rpc-url" in result.err
    assert kms_gov("check", IMAGE, "--rpc-url", "ws://127.0.0.1:1").code == gov.EXIT_USAGE


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_rpc_url_that_does_not_answer(kms_gov: Any, contract: str) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    for argv in (["check", IMAGE], ["add-image", IMAGE, "--app", "a"], ["deploy"], ["list"]):
        result = kms_gov(*argv, "--rpc-url", url, "--json")
        assert (result.code, result.json["error"]) == (gov.EXIT_UNAVAILABLE, "chain_unavailable")
        assert "RPC endpoint failed" in result.err


def test_wrong_chain_id(kms_gov: Any, contract: str, anvil: Anvil) -> None:
    head = _head(anvil)
    for argv in (["check", IMAGE], ["add-image", IMAGE, "--app", "a"], ["deploy"]):
        result = kms_gov(*argv, "--chain-id", "1", "--json")
        assert (result.code, result.json["error"]) == (gov.EXIT_MISCONFIGURED,
                                                       "chain_misconfigured")
        assert f"expected chain id 1; the RPC endpoint serves chain {anvil.chain_id}" \
            in result.err
    assert _head(anvil) == head


def test_address_with_no_code(kms_gov: Any, anvil: Anvil) -> None:
    nobody = "0x" + "42" * 20
    head = _head(anvil)
    for argv in (["check", IMAGE], ["add-image", IMAGE, "--app", "a"], ["remove-image", IMAGE],
                 ["list"], ["info"]):
        result = kms_gov(*argv, "--contract", nobody, "--json")
        assert (result.code, result.json["error"]) == (gov.EXIT_MISCONFIGURED,
                                                       "chain_misconfigured"), argv
        assert "no contract code" in result.err
    assert _head(anvil) == head


def test_signer_that_is_not_the_owner(kms_gov: Any, contract: str, anvil: Anvil,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    stranger = anvil.new_account()
    monkeypatch.setenv("KMS_GOV_PRIVATE_KEY", "0x" + bytes(stranger.key).hex())
    head = _head(anvil)
    for argv in (["add-image", IMAGE, "--app", "a"], ["remove-image", IMAGE],
                 ["transfer-ownership", stranger.address]):
        result = kms_gov(*argv, "--json")
        assert (result.code, result.json["error"]) == (gov.EXIT_NOT_OWNER, "not_owner"), argv
        assert f"the signer {stranger.address} is not the owner" in result.err
    assert _head(anvil) == head
    assert secret_free(result, bytes(stranger.key).hex())


def secret_free(result: Run, key_hex: str) -> bool:
    return key_hex not in result.out and key_hex not in result.err


def test_contract_revert_is_reported_in_one_sentence(kms_gov: Any, contract: str,
                                                     anvil: Anvil) -> None:
    assert kms_gov("add-image", IMAGE, "--app", "billing").code == 0
    head = _head(anvil)
    result = kms_gov("add-image", IMAGE, "--app", "search")
    assert result.code == gov.EXIT_REVERTED
    assert result.err.strip() == (f"kms-gov: error: image {IMAGE} is already allowed for "
                                  "application billing; remove it first to rebind it")
    result = kms_gov("remove-image", IMAGE_2)
    assert result.code == gov.EXIT_REVERTED and "nothing to remove" in result.err
    assert _head(anvil) == head


# --- signing keys ----------------------------------------------------------------------


def test_no_signing_key(kms_gov: Any, contract: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_GOV_PRIVATE_KEY")
    result = kms_gov("add-image", IMAGE, "--app", "a", "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_SIGNING_KEY,
                                                   "signing_key_unavailable")


def test_malformed_private_key_is_not_echoed(kms_gov: Any, contract: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = "0x" + "5e" * 31 + "zz"
    monkeypatch.setenv("KMS_GOV_PRIVATE_KEY", bogus)
    result = kms_gov("add-image", IMAGE, "--app", "a", "--json")
    assert result.code == gov.EXIT_SIGNING_KEY
    assert "5e5e5e" not in result.out + result.err


@pytest.fixture
def keystore(tmp_path: Path, gov_env: dict[str, str]) -> Path:
    encrypted = Account.encrypt(gov_env["KMS_GOV_PRIVATE_KEY"], "correct horse",
                                kdf="pbkdf2", iterations=1000)
    path = tmp_path / "owner.json"
    path.write_text(json.dumps(encrypted))
    return path


def test_keystore_with_password_from_env(kms_gov: Any, contract: str, keystore: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_GOV_PRIVATE_KEY")
    monkeypatch.setenv("KMS_GOV_KEYSTORE_PASSWORD", "correct horse")
    result = kms_gov("add-image", IMAGE, "--app", "a", "--keystore", str(keystore))
    assert result.code == 0, result
    assert "correct horse" not in result.out + result.err


def test_keystore_with_wrong_password(kms_gov: Any, contract: str, keystore: Path,
                                      anvil: Anvil, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_GOV_PRIVATE_KEY")
    monkeypatch.setenv("KMS_GOV_KEYSTORE_PASSWORD", "battery staple")
    head = _head(anvil)
    result = kms_gov("add-image", IMAGE, "--app", "a", "--keystore", str(keystore), "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_SIGNING_KEY,
                                                   "signing_key_unavailable")
    assert "wrong password" in result.err and "battery staple" not in result.out + result.err
    assert _head(anvil) == head


def test_keystore_password_prompted_on_a_terminal(gov_env: dict[str, str], contract: str,
                                                  keystore: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env = {k: v for k, v in gov_env.items() if not k.startswith("_")}
    env.update(KMS_GOV_CONTRACT=contract, KMS_GOV_PRIVATE_KEY="")
    runner = CliRunner()
    with runner.isolation(input="correct horse\n", env=env) as (_, err, _):
        # The runner's stdin is a pipe; pretend it is a terminal so kms-gov prompts.
        monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
        code = gov.cli.main(["add-image", IMAGE, "--app", "a", "--keystore", str(keystore)],
                            standalone_mode=False)
        prompt = err.getvalue().decode()
    assert code == 0
    assert "Keystore password" in prompt and "correct horse" not in prompt
    checked = CliRunner().invoke(gov.cli, ["check", IMAGE], env=env)
    assert checked.exit_code == 0, checked.output


def test_keystore_without_password_off_a_terminal(kms_gov: Any, contract: str,
                                                  keystore: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KMS_GOV_PRIVATE_KEY")
    result = kms_gov("add-image", IMAGE, "--app", "a", "--keystore", str(keystore), "--json")
    assert result.code == gov.EXIT_SIGNING_KEY
    assert "KMS_GOV_KEYSTORE_PASSWORD" in result.err


def test_unreadable_keystore(kms_gov: Any, contract: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    result = kms_gov("add-image", IMAGE, "--app", "a", "--keystore", str(missing), "--json")
    assert (result.code, result.json["error"]) == (gov.EXIT_SIGNING_KEY,
                                                   "signing_key_unavailable")


def test_there_is_no_command_line_option_for_a_key() -> None:
    for name, command in gov.cli.commands.items():
        for param in command.params:
            assert not any("key" in o and "keystore" not in o for o in param.opts), (name, param)
            assert not any("password" in o for o in param.opts), (name, param)


# --- the console script ----------------------------------------------------------------


def test_console_script_runs(gov_env: dict[str, str], contract: str) -> None:
    script = Path(sys.executable).parent / "kms-gov"
    assert script.exists(), "install the package (pip install -e .) to get the kms-gov script"
    env = {**os.environ, "KMS_GOV_CONTRACT": contract}
    env.update({k: v for k, v in gov_env.items() if not k.startswith("_")})
    done = subprocess.run([str(script), "check", IMAGE, "--json"], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["allowed"] is False
