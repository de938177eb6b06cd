"""``kms-gov set-signer`` and ``kms-gov signer`` against anvil, in-process through main()."""

from __future__ import annotations

import json
from typing import Any

import pytest
from chain_fixtures import Anvil
from eth_account import Account

from mock_kms import gov, signer

ZERO = "0x" + "00" * 20


@pytest.fixture
def kms_gov(capsys: pytest.CaptureFixture[str], gov_env: dict[str, str]) -> Any:
    secret = gov_env["KMS_GOV_PRIVATE_KEY"]

    def run(*argv: str) -> tuple[int, str, str]:
        code = gov.main(list(argv))
        captured = capsys.readouterr()
        assert secret[2:] not in (captured.out + captured.err).lower()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def contract(kms_gov: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    code, out, _ = kms_gov("deploy", "--json")
    assert code == 0
    address: str = json.loads(out)["address"]
    monkeypatch.setenv("KMS_GOV_CONTRACT", address)
    return address


def test_set_signer_registers_and_signer_reads_it(kms_gov: Any, contract: str,
                                                  anvil: Anvil) -> None:
    kms = Account.create().address
    code, out, _ = kms_gov("signer")
    assert (code, out.strip()) == (0, ZERO)
    code, out, _ = kms_gov("set-signer", kms, "--json")
    assert code == 0, out
    result = json.loads(out)
    assert result["signer"] == kms and result["gas_used"] > 0
    assert signer.read_signer(anvil.w3(), contract) == kms
    code, out, _ = kms_gov("signer", "--json")
    assert code == 0 and json.loads(out)["signer"] == kms


def test_set_signer_calldata_is_what_a_multisig_sends(kms_gov: Any, contract: str,
                                                      anvil: Anvil,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    kms = Account.create().address
    monkeypatch.delenv("KMS_GOV_PRIVATE_KEY")  # --calldata signs nothing
    head = anvil.w3().eth.block_number
    code, out, _ = kms_gov("set-signer", kms, "--calldata")
    assert code == 0, out
    tx = json.loads(out)
    assert tx["to"] == contract and tx["value"] == 0 and tx["chainId"] == anvil.chain_id
    assert tx["data"] == "0x" + signer.set_signer_request(contract, kms).data.hex()
    fn, args = signer.allowlist_contract(anvil.w3(), contract).decode_function_input(tx["data"])
    assert fn.fn_name == "setSigner" and args == {"newSigner": kms}
    assert anvil.w3().eth.block_number == head, "--calldata must send nothing"


def test_set_signer_by_a_stranger_exits_5_and_sends_nothing(
    kms_gov: Any, contract: str, anvil: Anvil, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = anvil.new_account()
    monkeypatch.setenv("KMS_GOV_PRIVATE_KEY", "0x" + bytes(stranger.key).hex())
    head = anvil.w3().eth.block_number
    code, _, err = kms_gov("set-signer", Account.create().address)
    assert code == gov.EXIT_NOT_OWNER
    assert "not the owner" in err
    assert anvil.w3().eth.block_number == head
    assert signer.read_signer(anvil.w3(), contract) == ZERO


def test_set_signer_with_a_malformed_address_exits_2(kms_gov: Any, contract: str) -> None:
    code, _, err = kms_gov("set-signer", "0x1234")
    assert code == gov.EXIT_USAGE
    assert "expected an address" in err


def test_signer_without_contract_is_a_usage_error(kms_gov: Any) -> None:
    code, _, err = kms_gov("signer")
    assert code == gov.EXIT_USAGE and "--contract" in err


def test_signer_of_an_unreachable_node_exits_3(kms_gov: Any, contract: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_GOV_RPC_URL", "http://127.0.0.1:9")
    code, _, err = kms_gov("signer", "--timeout", "1")
    assert code == gov.EXIT_UNAVAILABLE, err
