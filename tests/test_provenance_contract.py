"""The signer registry of ImageAllowlist and the example ProvenanceCheck contract, on the
embedded EVM (eth-tester + py-evm) and on anvil.

A statement here is made the way the KMS makes it (keyutil.provenance's EIP-712 message,
signed by mock_kms.signer.sign_typed); the KMS itself is exercised in test_provenance_kms.py.
Gas of the checks goes to the terminal summary with the allowlist's figures."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from chain_fixtures import Anvil, record_gas
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from web3 import EthereumTesterProvider, Web3

from keyutil import protocol, provenance
from mock_kms import chain, signer
from mock_kms.errors import ErrorCode, InvalidError

APP_A = chain.parse_application("wallet-app")
APP_B = chain.parse_application("other-app")
ZERO = "0x" + "00" * 20
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclasses.dataclass
class Chain:
    backend: str
    w3: Web3
    owner: str
    owner_key: LocalAccount | None  # None: the node signs (eth-tester)
    stranger: str
    stranger_key: LocalAccount | None
    allowlist: str
    check: Any  # the ProvenanceCheck web3 contract object

    def send(self, tx: chain.TxRequest, *, stranger: bool = False) -> chain.Receipt:
        sender, key = ((self.stranger, self.stranger_key) if stranger
                       else (self.owner, self.owner_key))
        return chain.send(self.w3, tx, sender=sender, sign=key)

    @property
    def chain_id(self) -> int:
        return int(self.w3.eth.chain_id)


@pytest.fixture(params=["eth-tester", "anvil"])
def onchain(request: pytest.FixtureRequest) -> Chain:
    if request.param == "anvil":
        node: Anvil = request.getfixturevalue("anvil")
        w3 = node.w3()
        owner_key, stranger_key = node.new_account(), node.new_account()
        owner, stranger = owner_key.address, stranger_key.address
    else:
        w3 = Web3(EthereumTesterProvider())
        owner, stranger = w3.eth.accounts[:2]
        owner_key = stranger_key = None
    deployed = chain.send(w3, chain.deploy_request(owner), sender=owner, sign=owner_key)
    assert deployed.contract_address is not None
    check = chain.send(w3, signer.provenance_check_deploy_request(deployed.contract_address),
                       sender=owner, sign=owner_key)
    assert check.contract_address is not None
    record_gas(request.param, "ProvenanceCheck deploy", check.gas_used)
    return Chain(request.param, w3, owner, owner_key, stranger, stranger_key,
                 deployed.contract_address,
                 signer.contract_object(w3, "ProvenanceCheck", check.contract_address))


@dataclasses.dataclass(frozen=True)
class Signed:
    message: dict[str, Any]
    signature: bytes

    def struct(self, **change: Any) -> tuple[bytes, str, str, bytes, bytes]:
        m = {**self.message["message"], **change}
        return (bytes.fromhex(m["application"][2:]), m["keyName"], m["keyType"],
                bytes.fromhex(m["publicKey"][2:]), bytes.fromhex(m["kmsIdentity"][2:]))


def secp256k1_public(key: ec.EllipticCurvePrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.UncompressedPoint)
    return "0x" + raw.hex()


def make_statement(c: Chain, kms_signer: LocalAccount, *, application: bytes = APP_A,
                   key: ec.EllipticCurvePrivateKey | None = None) -> Signed:
    key = key or ec.generate_private_key(ec.SECP256K1())
    identity = protocol.format_identity(ed25519.Ed25519PrivateKey.generate().public_key())
    message = provenance.eip712_message(
        application=application, name="wallet", key_type="secp256k1",
        public_key=secp256k1_public(key), kms_identity=identity, chain_id=c.chain_id,
        contract=c.allowlist)
    return Signed(message, signer.sign_typed(kms_signer, message))


def belongs(c: Chain, app: bytes, s: Signed, signature: bytes | None = None,
            **change: Any) -> bool:
    sig = s.signature if signature is None else signature
    return bool(c.check.functions.belongsTo(app, s.struct(**change), sig).call())


# --- the registry in ImageAllowlist -------------------------------------------------------


def test_no_signer_is_registered_after_deployment(onchain: Chain) -> None:
    assert signer.read_signer(onchain.w3, onchain.allowlist) == ZERO


def test_owner_sets_signer_with_event_and_getter(onchain: Chain) -> None:
    c = onchain
    first, second = Account.create(), Account.create()
    receipt = c.send(signer.set_signer_request(c.allowlist, first.address))
    record_gas(c.backend, "setSigner (first)", receipt.gas_used)
    assert signer.read_signer(c.w3, c.allowlist) == first.address
    rotated = c.send(signer.set_signer_request(c.allowlist, second.address))
    record_gas(c.backend, "setSigner (rotation)", rotated.gas_used)
    contract = signer.allowlist_contract(c.w3, c.allowlist)
    mined = c.w3.eth.get_transaction_receipt(rotated.tx_hash)  # type: ignore[arg-type]
    events = contract.events.SignerChanged().process_receipt(mined)
    assert [(e["args"]["previousSigner"], e["args"]["newSigner"]) for e in events] == [
        (first.address, second.address)]
    assert signer.read_signer(c.w3, c.allowlist) == second.address


def test_zero_address_unregisters_the_signer(onchain: Chain) -> None:
    c = onchain
    c.send(signer.set_signer_request(c.allowlist, Account.create().address))
    c.send(signer.set_signer_request(c.allowlist, ZERO))
    assert signer.read_signer(c.w3, c.allowlist) == ZERO


def test_stranger_cannot_set_the_signer(onchain: Chain) -> None:
    c = onchain
    block = c.w3.eth.block_number
    with pytest.raises(InvalidError) as info:
        c.send(signer.set_signer_request(c.allowlist, c.stranger), stranger=True)
    assert info.value.code == ErrorCode.NOT_OWNER
    assert c.w3.eth.block_number == block
    assert signer.read_signer(c.w3, c.allowlist) == ZERO


def test_set_signer_request_refuses_a_malformed_address() -> None:
    with pytest.raises(InvalidError) as info:
        signer.set_signer_request("0x" + "11" * 20, "0x1234")
    assert info.value.code == ErrorCode.ADDRESS_INVALID


# --- ProvenanceCheck ----------------------------------------------------------------------


def test_contract_digest_is_the_eip712_digest_the_kms_signs(onchain: Chain) -> None:
    c = onchain
    s = make_statement(c, Account.create())
    signable = encode_typed_data(full_message=s.message)
    ours = Web3.keccak(b"\x19\x01" + signable.header + signable.body)
    assert bytes(c.check.functions.digest(s.struct()).call()) == bytes(ours)


def test_statement_of_the_registered_signer_belongs_to_its_application(onchain: Chain) -> None:
    c = onchain
    kms = Account.create()
    c.send(signer.set_signer_request(c.allowlist, kms.address))
    key = ec.generate_private_key(ec.SECP256K1())
    s = make_statement(c, kms, key=key)
    assert belongs(c, APP_A, s) is True
    assert c.check.functions.signerOf(s.struct(), s.signature).call() == kms.address
    account = provenance.account_of(secp256k1_public(key))
    assert c.check.functions.accountOf(s.struct()).call() == account
    assert c.check.functions.isApplicationAccount(APP_A, account, s.struct(), s.signature).call()
    gas = c.check.functions.belongsTo(APP_A, s.struct(), s.signature).estimate_gas()
    record_gas(c.backend, "belongsTo (eth_estimateGas, whole tx)", gas)
    gas = c.check.functions.isApplicationAccount(
        APP_A, account, s.struct(), s.signature).estimate_gas()
    record_gas(c.backend, "isApplicationAccount (estimateGas, tx)", gas)


def test_statement_does_not_belong_to_another_application(onchain: Chain) -> None:
    c = onchain
    kms = Account.create()
    c.send(signer.set_signer_request(c.allowlist, kms.address))
    s = make_statement(c, kms)
    assert belongs(c, APP_B, s) is False
    # Relabelled as the other application's, it no longer matches its signature.
    assert belongs(c, APP_B, s, application="0x" + APP_B.hex()) is False


def test_changed_public_key_or_name_does_not_verify(onchain: Chain) -> None:
    c = onchain
    kms = Account.create()
    c.send(signer.set_signer_request(c.allowlist, kms.address))
    s = make_statement(c, kms)
    other = secp256k1_public(ec.generate_private_key(ec.SECP256K1()))
    assert belongs(c, APP_A, s, publicKey=other) is False
    assert belongs(c, APP_A, s, keyName="wallet2") is False
    assert belongs(c, APP_A, s, keyType="ed25519") is False
    account = provenance.account_of(other)
    assert not c.check.functions.isApplicationAccount(APP_A, account, s.struct(),
                                                      s.signature).call()


def test_statement_of_an_unregistered_signer_does_not_verify(onchain: Chain) -> None:
    c = onchain
    kms, impostor = Account.create(), Account.create()
    s = make_statement(c, impostor)
    assert belongs(c, APP_A, s) is False  # nobody registered
    c.send(signer.set_signer_request(c.allowlist, kms.address))
    assert belongs(c, APP_A, s) is False


def test_rotation_retires_the_old_signers_statements(onchain: Chain) -> None:
    c = onchain
    old, new = Account.create(), Account.create()
    c.send(signer.set_signer_request(c.allowlist, old.address))
    before = make_statement(c, old)
    assert belongs(c, APP_A, before) is True
    c.send(signer.set_signer_request(c.allowlist, new.address))
    assert belongs(c, APP_A, before) is False
    after = make_statement(c, new)
    assert belongs(c, APP_A, after) is True


def test_statement_for_another_chain_or_allowlist_does_not_verify(onchain: Chain) -> None:
    c = onchain
    kms = Account.create()
    c.send(signer.set_signer_request(c.allowlist, kms.address))
    s = make_statement(c, kms)
    for domain in ({"chainId": c.chain_id + 1}, {"verifyingContract": "0x" + "11" * 20}):
        message = {**s.message, "domain": {**s.message["domain"], **domain}}
        assert belongs(c, APP_A, s, signature=signer.sign_typed(kms, message)) is False


def test_malleated_or_malformed_signatures_are_refused(onchain: Chain) -> None:
    c = onchain
    kms = Account.create()
    c.send(signer.set_signer_request(c.allowlist, kms.address))
    s = make_statement(c, kms)
    r, sv, v = s.signature[:32], int.from_bytes(s.signature[32:64], "big"), s.signature[64]
    twin = r + (SECP256K1_N - sv).to_bytes(32, "big") + bytes([55 - v])  # 27 <-> 28
    # The twin is the same signature for plain ecrecover; the contract refuses its high s.
    assert belongs(c, APP_A, s, signature=twin) is False
    for bad in (s.signature[:64], s.signature + b"\0", s.signature[:64] + b"\x01",
                bytes(65)):
        assert belongs(c, APP_A, s, signature=bad) is False
        assert c.check.functions.signerOf(s.struct(), bad).call() == ZERO


# --- the committed artifacts --------------------------------------------------------------


def test_provenance_check_artifact_is_a_fresh_compile_and_shipped() -> None:
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    node = shutil.which("node")
    assert node is not None
    done = subprocess.run([node, "contracts/compile.js", "--stdout", "ProvenanceCheck"],
                          cwd=root, capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    committed = root / "contracts" / "artifacts" / "ProvenanceCheck.json"
    assert done.stdout == committed.read_bytes()
    assert (root / "mock_kms" / "data" / "ProvenanceCheck.json").read_bytes() == done.stdout
    missing = subprocess.run([node, "contracts/compile.js", "--stdout", "Nope"], cwd=root,
                             capture_output=True, timeout=120, check=False)
    assert missing.returncode == 2 and b"no contract named Nope" in missing.stderr


def test_the_eip712_types_are_the_contracts() -> None:
    """keyutil.provenance's type list and the contract's type hash name the same struct."""
    from eth_utils.crypto import keccak

    fields = ",".join(f"{f['type']} {f['name']}"
                      for f in provenance.EIP712_TYPES["KeyProvenance"])
    w3 = Web3(EthereumTesterProvider())
    owner = w3.eth.accounts[0]
    deployed = chain.send(w3, signer.provenance_check_deploy_request(owner), sender=owner)
    assert deployed.contract_address is not None
    check = signer.contract_object(w3, "ProvenanceCheck", deployed.contract_address)
    assert bytes(check.functions.KEY_PROVENANCE_TYPEHASH().call()) == keccak(
        text=f"KeyProvenance({fields})")
