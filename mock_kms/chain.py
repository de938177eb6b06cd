"""The ImageAllowlist contract as the KMS and ``kms-gov`` talk to it: encoding, decoding, I/O.

Parsing values (image hashes, application ids, addresses) and encoding calls do no I/O; the
functions that take a ``Web3`` do, and they translate every transport failure into
:class:`~mock_kms.errors.UnavailableError` (``chain_unavailable``) and every contract revert
into :class:`~mock_kms.errors.InvalidError` with a sentence naming the contract's reason.

    >>> from mock_kms.chain import parse_application, format_application, parse_image_hash
    >>> app = parse_application("billing")
    >>> app.hex()[:16], format_application(app)
    ('62696c6c696e6700', 'billing')
    >>> parse_image_hash("0x" + "ab" * 32) == bytes([0xAB]) * 32
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

import requests
from eth.exceptions import Revert as EvmRevert
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_abi.exceptions import DecodingError
from eth_tester.exceptions import TransactionFailed
from eth_utils.address import to_checksum_address
from eth_utils.crypto import keccak
from web3 import Web3
from web3.exceptions import ContractLogicError, Web3Exception

from keyutil import protocol
from mock_kms.errors import ErrorCode, InvalidError, UnavailableError

ARTIFACT_NAME = "ImageAllowlist.json"

DEBUG_IMAGE_HASH = bytes.fromhex(
    "81c611f35bff79491538b2f7cf201c7597a661a5c549633541c62bdc8af1613f"
)
"""sha256 of 144 zero bytes: the OS_IMAGE_HASH of a debug enclave (PCR0..2 all zero)."""

ZERO32 = bytes(32)

_HEX32 = re.compile(r"\A(?:0x)?([0-9a-fA-F]{64})\Z")
_ADDRESS = re.compile(r"\A0x[0-9a-fA-F]{40}\Z")


# --- values ---------------------------------------------------------------------------------


def parse_image_hash(text: str) -> bytes:
    """An OS_IMAGE_HASH given as 64 hex digits (0x prefix optional) -> 32 bytes."""
    match = _HEX32.match(text.strip())
    if match is None:
        shown = text.strip()[:24]
        raise InvalidError(
            ErrorCode.HASH_INVALID,
            f"expected an image hash of 32 bytes as 64 hex digits (0x optional); "
            f"found {shown!r} ({len(text.strip())} characters)",
        )
    return bytes.fromhex(match.group(1))


def check_image_hash(image_hash: bytes) -> bytes:
    """Raise ``hash_invalid`` unless ``image_hash`` is 32 bytes."""
    if not isinstance(image_hash, bytes | bytearray) or len(image_hash) != 32:
        found = len(image_hash) if isinstance(image_hash, bytes | bytearray) else "not bytes"
        raise InvalidError(
            ErrorCode.HASH_INVALID, f"expected an image hash of 32 bytes; found {found}"
        )
    return bytes(image_hash)


def refuse_unregistrable(image_hash: bytes) -> None:
    """The contract refuses these two hashes; say so before anything is sent."""
    if image_hash == ZERO32:
        raise InvalidError(ErrorCode.HASH_INVALID, "the zero hash is not an image hash")
    if image_hash == DEBUG_IMAGE_HASH:
        raise InvalidError(
            ErrorCode.DEBUG_ENCLAVE,
            "this is the hash of all-zero PCRs, i.e. a debug-mode enclave; it is never allowed",
        )


def parse_application(text: str) -> bytes:
    """An application id: ``0x`` + 64 hex digits, or a name of 1..32 printable ASCII characters
    stored left-aligned and zero-padded in 32 bytes. The zero id is refused."""
    try:
        return protocol.parse_application(text)
    except protocol.ProtocolError as e:
        raise InvalidError(ErrorCode.APPLICATION_INVALID, e.message) from None


def format_application(app: bytes) -> str:
    """The name when ``app`` decodes as a parse_application name, else 0x-hex."""
    return protocol.format_application(app)


def parse_address(text: str) -> str:
    """A 20-byte address as 0x + 40 hex digits -> its checksummed form."""
    if not _ADDRESS.match(text.strip()):
        raise InvalidError(
            ErrorCode.ADDRESS_INVALID,
            f"expected an address of 0x + 40 hex digits; found {text.strip()[:44]!r}",
        )
    return to_checksum_address(text.strip())


# --- the compiled contract ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContractArtifact:
    """The committed compiler output (contracts/artifacts/, shipped in mock_kms/data/)."""

    abi: tuple[Mapping[str, Any], ...]
    bytecode: bytes
    deployed_bytecode: bytes
    compiler_version: str


@functools.cache
def load_artifact() -> ContractArtifact:
    text = resources.files("mock_kms").joinpath("data", ARTIFACT_NAME).read_text("utf-8")
    raw = json.loads(text)
    return ContractArtifact(
        abi=tuple(raw["abi"]),
        bytecode=bytes.fromhex(raw["bytecode"].removeprefix("0x")),
        deployed_bytecode=bytes.fromhex(raw["deployedBytecode"].removeprefix("0x")),
        compiler_version=raw["compiler"]["version"],
    )


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


SEL_IMAGE_STATUS = _selector("imageStatus(bytes32)")
SEL_ALLOWED = _selector("allowedOsImages(bytes32)")
SEL_ADD = _selector("addOsImageHash(bytes32,bytes32)")
SEL_REMOVE = _selector("removeOsImageHash(bytes32)")
SEL_OWNER = _selector("owner()")
SEL_PENDING_OWNER = _selector("pendingOwner()")
SEL_DEPLOYMENT_BLOCK = _selector("deploymentBlock()")
SEL_TRANSFER = _selector("transferOwnership(address)")
SEL_ACCEPT = _selector("acceptOwnership()")

TOPIC_ADDED = keccak(text="OsImageHashAdded(bytes32)")
TOPIC_REMOVED = keccak(text="OsImageHashRemoved(bytes32)")
TOPIC_ASSIGNED = keccak(text="OsImageHashAssigned(bytes32,bytes32)")

# Custom errors: selector -> (name, argument types, code, sentence template).
_REVERTS: dict[bytes, tuple[str, tuple[str, ...], ErrorCode, str]] = {
    _selector(sig): (sig.split("(")[0], types, code, text)
    for sig, types, code, text in [
        ("NotOwner(address)", ("address",), ErrorCode.NOT_OWNER,
         "the sender {0} is not the owner of the allowlist contract"),
        ("NotPendingOwner(address)", ("address",), ErrorCode.NOT_OWNER,
         "the sender {0} is not the pending owner, so it cannot accept ownership"),
        ("ZeroAddress()", (), ErrorCode.ADDRESS_INVALID,
         "the contract refused the zero address as owner"),
        ("ZeroOsImageHash()", (), ErrorCode.HASH_INVALID,
         "the contract refused the zero image hash"),
        ("DebugOsImageHash()", (), ErrorCode.DEBUG_ENCLAVE,
         "the contract refused the hash of all-zero PCRs (a debug-mode enclave)"),
        ("ZeroApplication()", (), ErrorCode.APPLICATION_INVALID,
         "the contract refused the zero application id"),
        ("OsImageHashAlreadyAllowed(bytes32,bytes32)", ("bytes32", "bytes32"),
         ErrorCode.TRANSACTION_REVERTED,
         "image {0} is already allowed for application {1}; remove it first to rebind it"),
        ("OsImageHashNotAllowed(bytes32)", ("bytes32",), ErrorCode.TRANSACTION_REVERTED,
         "image {0} is not allowed, so there is nothing to remove"),
    ]
}


@dataclasses.dataclass(frozen=True)
class RevertReason:
    """A decoded contract revert."""

    name: str
    code: ErrorCode
    sentence: str


def _show(name: str, index: int, arg: object) -> str:
    if isinstance(arg, bytes):
        if index == 1 and name == "OsImageHashAlreadyAllowed":
            return format_application(arg)
        return "0x" + arg.hex()
    if isinstance(arg, str) and arg.startswith("0x"):
        return to_checksum_address(arg)
    return str(arg)


def decode_revert(data: bytes) -> RevertReason | None:
    """Name the contract's custom error in revert ``data``; None when it is not one of ours."""
    entry = _REVERTS.get(data[:4])
    if entry is None:
        return None
    name, types, code, template = entry
    try:
        args = abi_decode(list(types), data[4:]) if types else ()
    except DecodingError:  # malformed revert data is simply not ours
        return None
    shown = [_show(name, i, a) for i, a in enumerate(args)]
    return RevertReason(name=name, code=code, sentence=template.format(*shown))


# --- calls ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TxRequest:
    """An unsigned call: what a multisig needs to propose it (``to`` None: a deployment)."""

    to: str | None
    data: bytes
    value: int = 0

    def to_json(self, chain_id: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"to": self.to, "data": "0x" + self.data.hex(), "value": self.value}
        if chain_id is not None:
            out["chainId"] = chain_id
        return out


def deploy_request(owner: str) -> TxRequest:
    args = abi_encode(["address"], [parse_address(owner)])
    return TxRequest(to=None, data=load_artifact().bytecode + args)


def add_request(contract: str, image_hash: bytes, app: bytes) -> TxRequest:
    data = SEL_ADD + abi_encode(["bytes32", "bytes32"], [check_image_hash(image_hash), app])
    return TxRequest(to=parse_address(contract), data=data)


def remove_request(contract: str, image_hash: bytes) -> TxRequest:
    data = SEL_REMOVE + abi_encode(["bytes32"], [check_image_hash(image_hash)])
    return TxRequest(to=parse_address(contract), data=data)


def transfer_request(contract: str, new_owner: str) -> TxRequest:
    data = SEL_TRANSFER + abi_encode(["address"], [parse_address(new_owner)])
    return TxRequest(to=parse_address(contract), data=data)


def accept_request(contract: str) -> TxRequest:
    return TxRequest(to=parse_address(contract), data=SEL_ACCEPT)


def decode_image_status(output: bytes) -> tuple[bool, bytes]:
    """The 64-byte return of imageStatus(bytes32) -> (allowed, application id)."""
    if len(output) != 64:
        raise UnavailableError(
            ErrorCode.CHAIN_MISCONFIGURED,
            f"expected 64 bytes from imageStatus(bytes32); found {len(output)}: is the "
            "address an ImageAllowlist contract?",
        )
    flag = int.from_bytes(output[:32], "big")
    if flag > 1:
        raise UnavailableError(
            ErrorCode.CHAIN_MISCONFIGURED, "imageStatus returned a boolean that is not 0 or 1"
        )
    return flag == 1, output[32:]


# --- I/O ------------------------------------------------------------------------------------


def _revert_data(exc: BaseException) -> bytes:
    """The revert payload: JSON-RPC nodes put it in ``ContractLogicError.data`` as hex; the
    eth-tester provider re-raises with a text message, the bytes stay on the exception it
    replaced (``__context__``), so walk the chain."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        data = getattr(seen, "data", None)
        if isinstance(data, str) and data.startswith("0x"):
            with contextlib.suppress(ValueError):
                return bytes.fromhex(data[2:])
        if isinstance(seen, TransactionFailed | EvmRevert) and seen.args:
            first = seen.args[0]
            if isinstance(first, Exception) and first.args:
                first = first.args[0]
            if isinstance(first, bytes):
                return first
        seen = seen.__cause__ or seen.__context__
    return b""


@contextlib.contextmanager
def chain_errors(what: str) -> Iterator[None]:
    """Translate every failure of a chain call into the KMS's two error families."""
    try:
        yield
    except (ContractLogicError, TransactionFailed) as e:
        revert = decode_revert(_revert_data(e))
        if revert is not None:
            raise InvalidError(revert.code, revert.sentence) from None
        raise InvalidError(
            ErrorCode.TRANSACTION_REVERTED, f"{what}: the contract reverted without a reason"
        ) from None
    except (Web3Exception, requests.RequestException, OSError, ValueError) as e:
        # The message names the failure class only: URLs may carry credentials (API keys).
        raise UnavailableError(
            ErrorCode.CHAIN_UNAVAILABLE, f"{what}: the RPC endpoint failed ({type(e).__name__})"
        ) from e


def eth_call(w3: Web3, to: str, data: bytes, block: int | str = "latest",
             sender: str | None = None) -> bytes:
    params: dict[str, Any] = {"to": to, "data": "0x" + data.hex()}
    if sender is not None:
        params["from"] = sender
    with chain_errors("eth_call"):
        return bytes(w3.eth.call(params, block))  # type: ignore[arg-type]


def read_image_status(w3: Web3, contract: str, image_hash: bytes,
                      block: int | str = "latest", sender: str | None = None
                      ) -> tuple[bool, bytes]:
    data = SEL_IMAGE_STATUS + check_image_hash(image_hash)
    return decode_image_status(eth_call(w3, contract, data, block, sender))


def read_address(w3: Web3, contract: str, selector: bytes) -> str:
    out = eth_call(w3, contract, selector)
    if len(out) != 32:
        raise UnavailableError(ErrorCode.CHAIN_MISCONFIGURED, "expected a 32-byte address word")
    return to_checksum_address(out[12:])


def read_uint(w3: Web3, contract: str, selector: bytes) -> int:
    out = eth_call(w3, contract, selector)
    if len(out) != 32:
        raise UnavailableError(ErrorCode.CHAIN_MISCONFIGURED, "expected a 32-byte integer word")
    return int.from_bytes(out, "big")


def check_chain(w3: Web3, contract: str | None, expected_chain_id: int | None) -> int:
    """The start-up check: the endpoint answers, it is the expected chain, and (when a
    contract is given) there is code at the address. Returns the chain id."""
    with chain_errors("reading the chain id"):
        chain_id = int(w3.eth.chain_id)
    if expected_chain_id is not None and chain_id != expected_chain_id:
        raise UnavailableError(
            ErrorCode.CHAIN_MISCONFIGURED,
            f"expected chain id {expected_chain_id}; the RPC endpoint serves chain {chain_id}",
        )
    if contract is not None:
        with chain_errors("reading the contract code"):
            code = bytes(w3.eth.get_code(parse_address(contract)))  # type: ignore[arg-type]
        if not code:
            raise UnavailableError(
                ErrorCode.CHAIN_MISCONFIGURED,
                f"there is no contract code at {contract} on chain {chain_id}",
            )
    return chain_id


@dataclasses.dataclass(frozen=True)
class ImageEvent:
    """One registration or revocation, as the contract logged it."""

    image_hash: bytes
    added: bool
    application: bytes | None  # set on additions
    block: int


def read_events(w3: Web3, contract: str, from_block: int, to_block: int,
                chunk: int = 10_000) -> list[ImageEvent]:
    """Additions (with their application) and removals, oldest first, in block chunks."""
    events: list[ImageEvent] = []
    start = from_block
    while start <= to_block:
        end = min(start + chunk - 1, to_block)
        with chain_errors("reading the contract's events"):
            logs = w3.eth.get_logs({
                "address": parse_address(contract),  # type: ignore[typeddict-item]
                "fromBlock": start,
                "toBlock": end,
                "topics": [["0x" + t.hex() for t in (TOPIC_REMOVED, TOPIC_ASSIGNED)]],
            })
        for log in logs:
            topics = [bytes(t) for t in log["topics"]]
            block = int(log["blockNumber"])
            if topics[0] == TOPIC_ASSIGNED and len(topics) == 3:
                events.append(ImageEvent(topics[1], True, topics[2], block))
            elif topics[0] == TOPIC_REMOVED:
                data = bytes(log["data"])
                if len(data) == 32:
                    events.append(ImageEvent(data, False, None, block))
        start = end + 1
    return events


@dataclasses.dataclass(frozen=True)
class Receipt:
    """What ``kms-gov`` reports about a mined transaction."""

    tx_hash: str
    block: int
    gas_used: int
    contract_address: str | None


def send(w3: Web3, tx: TxRequest, *, sender: str, sign: Any = None,
         receipt_timeout: float = 120.0) -> Receipt:
    """Simulate ``tx`` from ``sender`` (a revert raises before anything is sent), then send it
    signed by ``sign`` (an eth_account LocalAccount) or, when None, by the node's own account
    ``sender`` (the embedded chain), and wait for the receipt."""
    params: dict[str, Any] = {"from": sender, "data": "0x" + tx.data.hex(), "value": tx.value}
    if tx.to is not None:
        params["to"] = tx.to
    with chain_errors("simulating the transaction"):
        gas = int(w3.eth.estimate_gas(params))  # type: ignore[arg-type]
    params["gas"] = gas + gas // 5 + 10_000
    with chain_errors("sending the transaction"):
        if sign is None:
            tx_hash = w3.eth.send_transaction(params)  # type: ignore[arg-type]
        else:
            params["nonce"] = w3.eth.get_transaction_count(to_checksum_address(sender), "pending")
            params["chainId"] = w3.eth.chain_id
            base_fee = int(w3.eth.get_block("latest").get("baseFeePerGas", 0))
            tip = int(w3.eth.max_priority_fee)
            params["maxPriorityFeePerGas"] = tip
            params["maxFeePerGas"] = 2 * base_fee + tip
            signed = sign.sign_transaction(params)
            tx_hash = w3.eth.send_raw_transaction(signed.raw_transaction)
    shown = "0x" + bytes(tx_hash).hex()
    try:
        with chain_errors("waiting for the receipt"):
            receipt = w3.eth.wait_for_transaction_receipt(
                tx_hash, timeout=receipt_timeout, poll_latency=0.1
            )
    except UnavailableError as e:
        raise UnavailableError(
            ErrorCode.CHAIN_UNAVAILABLE,
            f"transaction {shown} was sent but no receipt came within {receipt_timeout:g} s "
            f"({e.message}); check whether it was mined before sending it again",
        ) from e
    if int(receipt["status"]) != 1:
        raise InvalidError(
            ErrorCode.TRANSACTION_REVERTED,
            f"transaction {shown} was mined in block {receipt['blockNumber']} but reverted",
        )
    created = receipt.get("contractAddress")
    return Receipt(
        tx_hash=shown,
        block=int(receipt["blockNumber"]),
        gas_used=int(receipt["gasUsed"]),
        contract_address=to_checksum_address(created) if created else None,
    )

