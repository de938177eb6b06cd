"""The ImageAllowlist contract, run on the embedded EVM (eth-tester + py-evm) and on anvil.

Each test is named for what it guards against. Gas used per call is recorded and printed in
the terminal summary ("allowlist contract: gas used per call")."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from chain_fixtures import Anvil, record_gas
from eth_account.signers.local import LocalAccount
from eth_utils.crypto import keccak
from web3 import EthereumTesterProvider, Web3
from web3.contract import Contract

from mock_kms import chain
from mock_kms.chain import DEBUG_IMAGE_HASH, TxRequest
from mock_kms.errors import ErrorCode, InvalidError, UnavailableError

IMAGE_A1 = bytes.fromhex("a1" * 32)
# Computed here from the signatures, not from the ABI: what dstack's tooling expects.
SEL_ALLOWED = keccak(text="allowedOsImages(bytes32)")[:4]
TOPIC_ADDED = keccak(text="OsImageHashAdded(bytes32)")
TOPIC_REMOVED = keccak(text="OsImageHashRemoved(bytes32)")
TOPIC_ASSIGNED = keccak(text="OsImageHashAssigned(bytes32,bytes32)")
IMAGE_A2 = bytes.fromhex("a2" * 32)
IMAGE_A3 = bytes.fromhex("a3" * 32)
IMAGE_B1 = bytes.fromhex("b1" * 32)
APP_A = chain.parse_application("billing")
APP_B = chain.parse_application("0x" + "0b" * 32)


@dataclasses.dataclass(frozen=True)
class Party:
    address: str
    signer: LocalAccount | None  # None: an account the node signs for (eth-tester)


@dataclasses.dataclass
class Deployed:
    backend: str
    w3: Web3
    address: str
    owner: Party
    other: Party
    third: Party

    def send(self, tx: TxRequest, party: Party) -> chain.Receipt:
        return chain.send(self.w3, tx, sender=party.address, sign=party.signer)

    def logs(self, receipt: chain.Receipt) -> list[tuple[list[bytes], bytes]]:
        raw = self.w3.eth.get_transaction_receipt(receipt.tx_hash)  # type: ignore[arg-type]
        return [([bytes(t) for t in log["topics"]], bytes(log["data"])) for log in raw["logs"]]

    def status(self, image: bytes) -> tuple[bool, bytes]:
        return chain.read_image_status(self.contract, image)

    def allowed(self, image: bytes) -> bool:
        """dstack's view, called by its hand-computed selector (not through our ABI)."""
        out = chain.eth_call(self.w3, self.address, SEL_ALLOWED + image)
        return int.from_bytes(out, "big") == 1

    @property
    def contract(self) -> Contract:
        return chain.contract(self.w3, self.address)

    def view(self, function: str) -> object:
        return chain.call(self.contract, function)


@pytest.fixture(params=["eth-tester", "anvil"])
def deployed(request: pytest.FixtureRequest) -> Deployed:
    if request.param == "anvil":
        node: Anvil = request.getfixturevalue("anvil")
        w3 = node.w3()
        owner, other, third = (node.new_account() for _ in range(3))
        parties = [Party(a.address, a) for a in (owner, other, third)]
    else:
        w3 = Web3(EthereumTesterProvider())
        parties = [Party(a, None) for a in w3.eth.accounts[:3]]
    receipt = chain.send(w3, chain.deploy_request(parties[0].address),
                         sender=parties[0].address, sign=parties[0].signer)
    assert receipt.contract_address is not None
    record_gas(request.param, "deploy", receipt.gas_used)
    return Deployed(request.param, w3, receipt.contract_address, *parties)


def _refused(d: Deployed, tx: TxRequest, party: Party, code: ErrorCode) -> InvalidError:
    block = d.w3.eth.block_number
    with pytest.raises(InvalidError) as info:
        d.send(tx, party)
    assert info.value.code == code
    assert d.w3.eth.block_number == block, "a refused call must not be mined"
    return info.value


# --- deployment and views ---------------------------------------------------------------


def test_deploy_sets_owner_block_and_no_pending_owner(deployed: Deployed) -> None:
    d = deployed
    assert d.view("owner") == d.owner.address
    assert int(str(d.view("pendingOwner")), 16) == 0
    assert 0 < int(str(d.view("deploymentBlock"))) <= d.w3.eth.block_number


def test_deploy_with_zero_owner_is_refused(deployed: Deployed) -> None:
    tx = TxRequest(to=None, data=chain.load_artifact().bytecode + bytes(32))
    _refused(deployed, tx, deployed.owner, ErrorCode.ADDRESS_INVALID)


def test_unknown_image_is_not_allowed_and_has_no_application(deployed: Deployed) -> None:
    assert deployed.status(IMAGE_A1) == (False, bytes(32))
    assert deployed.allowed(IMAGE_A1) is False


def test_view_gas_is_recorded(deployed: Deployed) -> None:
    d = deployed
    d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    data = keccak(text="imageStatus(bytes32)")[:4] + IMAGE_A1
    params = {"to": d.address, "data": "0x" + data.hex()}
    record_gas(d.backend, "imageStatus (eth_estimateGas, whole tx)",
               int(d.w3.eth.estimate_gas(params)))  # type: ignore[arg-type]


# --- adding and removing ----------------------------------------------------------------


def test_owner_adds_image_with_dstack_compatible_events(deployed: Deployed) -> None:
    d = deployed
    receipt = d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    record_gas(d.backend, "addOsImageHash (first image)", receipt.gas_used)
    assert d.status(IMAGE_A1) == (True, APP_A)
    assert d.allowed(IMAGE_A1) is True
    logs = d.logs(receipt)
    # OsImageHashAdded(bytes32) with the hash as (non-indexed) data, as dstack's contract emits.
    assert (logs[0][0], logs[0][1]) == ([TOPIC_ADDED], IMAGE_A1)
    # OsImageHashAssigned(bytes32 indexed, bytes32 indexed): the binding to the application.
    assert logs[1] == ([TOPIC_ASSIGNED, IMAGE_A1, APP_A], b"")


def test_owner_removes_image_with_event(deployed: Deployed) -> None:
    d = deployed
    d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    receipt = d.send(chain.remove_request(d.address, IMAGE_A1), d.owner)
    record_gas(d.backend, "removeOsImageHash", receipt.gas_used)
    assert d.status(IMAGE_A1) == (False, bytes(32))
    assert d.logs(receipt) == [([TOPIC_REMOVED], IMAGE_A1)]


def test_rolling_upgrade_keeps_several_images_of_one_app(deployed: Deployed) -> None:
    d = deployed
    d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    second = d.send(chain.add_request(d.address, IMAGE_A2, APP_A), d.owner)
    record_gas(d.backend, "addOsImageHash (another image)", second.gas_used)
    d.send(chain.add_request(d.address, IMAGE_A3, APP_A), d.owner)
    d.send(chain.add_request(d.address, IMAGE_B1, APP_B), d.owner)
    d.send(chain.remove_request(d.address, IMAGE_A1), d.owner)
    assert d.status(IMAGE_A1) == (False, bytes(32))
    assert d.status(IMAGE_A2) == (True, APP_A)
    assert d.status(IMAGE_A3) == (True, APP_A)
    assert d.status(IMAGE_B1) == (True, APP_B)


def test_removed_image_can_be_added_again_for_another_app(deployed: Deployed) -> None:
    d = deployed
    d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    d.send(chain.remove_request(d.address, IMAGE_A1), d.owner)
    d.send(chain.add_request(d.address, IMAGE_A1, APP_B), d.owner)
    assert d.status(IMAGE_A1) == (True, APP_B)


def test_allowed_image_is_never_silently_moved_to_another_app(deployed: Deployed) -> None:
    d = deployed
    d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    err = _refused(d, chain.add_request(d.address, IMAGE_A1, APP_B), d.owner,
                   ErrorCode.TRANSACTION_REVERTED)
    assert "already allowed for application billing" in err.message
    assert d.status(IMAGE_A1) == (True, APP_A)


def test_adding_twice_for_the_same_app_is_refused(deployed: Deployed) -> None:
    d = deployed
    d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    _refused(d, chain.add_request(d.address, IMAGE_A1, APP_A), d.owner,
             ErrorCode.TRANSACTION_REVERTED)


def test_removing_an_image_that_is_not_allowed_is_refused(deployed: Deployed) -> None:
    d = deployed
    err = _refused(d, chain.remove_request(d.address, IMAGE_A1), d.owner,
                   ErrorCode.TRANSACTION_REVERTED)
    assert "not allowed" in err.message


def test_zero_hash_is_refused(deployed: Deployed) -> None:
    d = deployed
    _refused(d, chain.add_request(d.address, bytes(32), APP_A), d.owner, ErrorCode.HASH_INVALID)


def test_debug_enclave_hash_is_refused(deployed: Deployed) -> None:
    d = deployed
    _refused(d, chain.add_request(d.address, DEBUG_IMAGE_HASH, APP_A), d.owner,
             ErrorCode.DEBUG_ENCLAVE)
    assert d.status(DEBUG_IMAGE_HASH) == (False, bytes(32))


def test_zero_application_is_refused(deployed: Deployed) -> None:
    d = deployed
    _refused(d, chain.add_request(d.address, IMAGE_A1, bytes(32)), d.owner,
             ErrorCode.APPLICATION_INVALID)


# --- access control ---------------------------------------------------------------------


def test_stranger_cannot_add(deployed: Deployed) -> None:
    d = deployed
    err = _refused(d, chain.add_request(d.address, IMAGE_A1, APP_A), d.other, ErrorCode.NOT_OWNER)
    assert d.other.address in err.message
    assert d.status(IMAGE_A1) == (False, bytes(32))


def test_stranger_cannot_remove(deployed: Deployed) -> None:
    d = deployed
    d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    _refused(d, chain.remove_request(d.address, IMAGE_A1), d.other, ErrorCode.NOT_OWNER)
    assert d.status(IMAGE_A1) == (True, APP_A)


def test_stranger_cannot_start_an_ownership_transfer(deployed: Deployed) -> None:
    d = deployed
    _refused(d, chain.transfer_request(d.address, d.other.address), d.other, ErrorCode.NOT_OWNER)


# --- two-step ownership -----------------------------------------------------------------


def test_two_step_ownership_transfer(deployed: Deployed) -> None:
    d = deployed
    start = d.send(chain.transfer_request(d.address, d.other.address), d.owner)
    record_gas(d.backend, "transferOwnership", start.gas_used)
    # Step 1 changes nothing yet: the old owner still governs, the new one cannot.
    assert d.view("owner") == d.owner.address
    assert d.view("pendingOwner") == d.other.address
    d.send(chain.add_request(d.address, IMAGE_A1, APP_A), d.owner)
    _refused(d, chain.add_request(d.address, IMAGE_A2, APP_A), d.other, ErrorCode.NOT_OWNER)
    # Only the pending owner can accept.
    _refused(d, chain.accept_request(d.address), d.third, ErrorCode.NOT_OWNER)
    done = d.send(chain.accept_request(d.address), d.other)
    record_gas(d.backend, "acceptOwnership", done.gas_used)
    assert d.view("owner") == d.other.address
    assert int(str(d.view("pendingOwner")), 16) == 0
    topic = keccak(text="OwnershipTransferred(address,address)")
    assert d.logs(done)[0][0][0] == topic
    # The old owner is out; the new one governs.
    _refused(d, chain.remove_request(d.address, IMAGE_A1), d.owner, ErrorCode.NOT_OWNER)
    d.send(chain.remove_request(d.address, IMAGE_A1), d.other)


def test_pending_transfer_can_be_cancelled(deployed: Deployed) -> None:
    d = deployed
    d.send(chain.transfer_request(d.address, d.other.address), d.owner)
    d.send(chain.transfer_request(d.address, "0x" + "00" * 20), d.owner)
    _refused(d, chain.accept_request(d.address), d.other, ErrorCode.NOT_OWNER)
    assert d.view("owner") == d.owner.address


def test_accept_without_pending_transfer_is_refused(deployed: Deployed) -> None:
    d = deployed
    _refused(d, chain.accept_request(d.address), d.owner, ErrorCode.NOT_OWNER)


# --- transactions that pass simulation but fail when mined (anvil only: needs a mempool) --


def _mining(anvil: Anvil, on: bool) -> None:
    anvil.w3().provider.make_request("evm_setAutomine", [on])


def test_transaction_reverting_when_mined_is_reported(anvil: Anvil) -> None:
    """Two identical registrations in one block: both simulate fine, the second reverts."""
    w3 = anvil.w3()
    owner = anvil.new_account()
    address = anvil.deploy(owner)
    tx = chain.add_request(address, IMAGE_A1, APP_A)
    results: list[BaseException | chain.Receipt] = []

    def submit() -> None:
        try:
            results.append(chain.send(w3, tx, sender=owner.address, sign=owner,
                                      receipt_timeout=20))
        except BaseException as e:
            results.append(e)

    _mining(anvil, False)
    try:
        threads = [threading.Thread(target=submit) for _ in range(2)]
        base = w3.eth.get_transaction_count(owner.address)
        for i, t in enumerate(threads):
            t.start()
            # Wait until it is in the pool, so the next one takes the next nonce.
            deadline = time.monotonic() + 10
            while w3.eth.get_transaction_count(owner.address, "pending") < base + i + 1:
                assert time.monotonic() < deadline, "the transaction never reached the pool"
                time.sleep(0.05)
        anvil.w3().provider.make_request("evm_mine", [])
        for t in threads:
            t.join(30)
    finally:
        _mining(anvil, True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(results) == 2 and len(errors) == 1, results
    assert isinstance(errors[0], InvalidError)
    assert errors[0].code == ErrorCode.TRANSACTION_REVERTED
    assert "was mined in block" in errors[0].message and "reverted" in errors[0].message


def test_transaction_not_mined_in_time_is_unavailable(anvil: Anvil) -> None:
    w3 = anvil.w3()
    owner = anvil.new_account()
    address = anvil.deploy(owner)
    _mining(anvil, False)
    try:
        with pytest.raises(UnavailableError) as info:
            chain.send(w3, chain.add_request(address, IMAGE_A1, APP_A), sender=owner.address,
                       sign=owner, receipt_timeout=1)
    finally:
        anvil.w3().provider.make_request("anvil_dropAllTransactions", [])
        _mining(anvil, True)
    assert info.value.code == ErrorCode.CHAIN_UNAVAILABLE
    assert "no receipt came within 1 s" in info.value.message
