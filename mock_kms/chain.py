"""The ImageAllowlist contract as the KMS and ``kms-gov`` talk to it: values, calls, I/O.

Calls, return values, events and custom errors are encoded and decoded by web3's contract
API from the committed ABI (:func:`contract`; ``encode_abi``, ``functions.X().call()``,
``events.X().process_log``); nothing here hand-builds a selector or a topic. Parsing values
(image hashes, application ids, addresses) and encoding calls do no I/O; the functions that
take a ``Web3`` or a bound contract do, and they translate every transport failure into
:class:`~mock_kms.errors.UnavailableError` (``chain_unavailable``), an answer that does not
decode into ``chain_misconfigured``, and every contract revert into
:class:`~mock_kms.errors.InvalidError` with a sentence naming the contract's reason.

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
from typing import Any, cast

import requests
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_abi.exceptions import DecodingError
from eth_tester.exceptions import TransactionFailed
from eth_typing import ABI, ABIError, ChecksumAddress
from eth_utils.abi import (
    filter_abi_by_type,
    function_abi_to_4byte_selector,
    get_abi_input_types,
    get_abi_output_types,
)
from eth_utils.address import to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.exceptions import BadFunctionCallOutput, ContractLogicError, Web3Exception

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


def _abi() -> ABI:
    return cast("ABI", list(load_artifact().abi))


@functools.cache
def _factory() -> type[Contract]:
    """The contract class, bound to no node: encodes calls and deployments without I/O."""
    return Web3().eth.contract(abi=_abi(), bytecode=load_artifact().bytecode)


def contract(w3: Web3, address: str) -> Contract:
    """The deployed ImageAllowlist at ``address`` as a web3 contract object. Its calls raise
    web3's exceptions: wrap them in :func:`chain_errors`, or use the functions below."""
    checksummed = cast("ChecksumAddress", parse_address(address))
    return w3.eth.contract(address=checksummed, abi=_abi())


# Custom errors, by name as the ABI declares them: (code, sentence template over the
# decoded arguments). A test checks that every error of the ABI has one.
_REVERT_SENTENCES: dict[str, tuple[ErrorCode, str]] = {
    "NotOwner": (ErrorCode.NOT_OWNER,
                 "the sender {0} is not the owner of the allowlist contract"),
    "NotPendingOwner": (ErrorCode.NOT_OWNER,
                        "the sender {0} is not the pending owner, so it cannot accept ownership"),
    "ZeroAddress": (ErrorCode.ADDRESS_INVALID, "the contract refused the zero address as owner"),
    "ZeroOsImageHash": (ErrorCode.HASH_INVALID, "the contract refused the zero image hash"),
    "DebugOsImageHash": (ErrorCode.DEBUG_ENCLAVE,
                         "the contract refused the hash of all-zero PCRs (a debug-mode enclave)"),
    "ZeroApplication": (ErrorCode.APPLICATION_INVALID,
                        "the contract refused the zero application id"),
    "OsImageHashAlreadyAllowed": (
        ErrorCode.TRANSACTION_REVERTED,
        "image {0} is already allowed for application {1}; remove it first to rebind it"),
    "OsImageHashNotAllowed": (ErrorCode.TRANSACTION_REVERTED,
                              "image {0} is not allowed, so there is nothing to remove"),
}


@functools.cache
def _custom_errors() -> dict[bytes, ABIError]:
    """The ABI's custom errors by their 4-byte selector."""
    errors = filter_abi_by_type("error", _abi())
    return {function_abi_to_4byte_selector(e): e for e in errors}


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
    """Name the contract's custom error in revert ``data`` (decoded by its ABI entry); None
    when it is not one of ours."""
    error = _custom_errors().get(data[:4])
    if error is None or error["name"] not in _REVERT_SENTENCES:
        return None
    try:
        args = abi_decode(get_abi_input_types(error), data[4:])
    except DecodingError:  # malformed revert data is simply not ours
        return None
    code, template = _REVERT_SENTENCES[error["name"]]
    shown = [_show(error["name"], i, a) for i, a in enumerate(args)]
    return RevertReason(name=error["name"], code=code, sentence=template.format(*shown))


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


def _request(address: str, function: str, *args: Any) -> TxRequest:
    data = _factory().encode_abi(function, args=list(args))
    return TxRequest(to=parse_address(address), data=bytes.fromhex(data[2:]))


def deploy_request(owner: str) -> TxRequest:
    data = _factory().constructor(parse_address(owner)).data_in_transaction
    return TxRequest(to=None, data=bytes.fromhex(data[2:]))


def add_request(contract: str, image_hash: bytes, app: bytes) -> TxRequest:
    return _request(contract, "addOsImageHash", check_image_hash(image_hash), app)


def remove_request(contract: str, image_hash: bytes) -> TxRequest:
    return _request(contract, "removeOsImageHash", check_image_hash(image_hash))


def transfer_request(contract: str, new_owner: str) -> TxRequest:
    return _request(contract, "transferOwnership", parse_address(new_owner))


def accept_request(contract: str) -> TxRequest:
    return _request(contract, "acceptOwnership")


# --- I/O ------------------------------------------------------------------------------------


def _revert_data(exc: BaseException) -> bytes:
    """The revert payload. Over JSON-RPC, web3 raises ContractCustomError (or another
    ContractLogicError) with the data as hex. web3's eth-tester provider passes eth-tester's
    TransactionFailed through untranslated: its text message replaced the exception that
    holds the bytes (``__context__``), so walk the chain."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        data = getattr(seen, "data", None)
        if isinstance(data, str) and data.startswith("0x"):
            with contextlib.suppress(ValueError):
                return bytes.fromhex(data[2:])
        if isinstance(seen, TransactionFailed) and seen.args:
            first = seen.args[0]
            if isinstance(first, Exception) and first.args:
                first = first.args[0]  # py-evm's Revert(bytes)
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
    except BadFunctionCallOutput:
        raise UnavailableError(
            ErrorCode.CHAIN_MISCONFIGURED,
            f"{what}: the answer does not decode as the ImageAllowlist ABI says; is the "
            "address an ImageAllowlist contract?",
        ) from None
    except (Web3Exception, requests.RequestException, OSError, ValueError) as e:
        # The message names the failure class only: URLs may carry credentials (API keys).
        raise UnavailableError(
            ErrorCode.CHAIN_UNAVAILABLE, f"{what}: the RPC endpoint failed ({type(e).__name__})"
        ) from e


def eth_call(w3: Web3, to: str, data: bytes, block: int | str = "latest",
             sender: str | None = None) -> bytes:
    """Simulate raw calldata (a :class:`TxRequest` already encoded) as ``sender``."""
    params: dict[str, Any] = {"to": to, "data": "0x" + data.hex()}
    if sender is not None:
        params["from"] = sender
    with chain_errors("eth_call"):
        return bytes(w3.eth.call(params, block))  # type: ignore[arg-type]


def call(allowlist: Contract, function: str, *args: Any, block: int | str = "latest",
         sender: str | None = None) -> Any:
    """``allowlist.functions.<function>(*args).call()``, its failures translated."""
    transaction: dict[str, Any] = {} if sender is None else {"from": sender}
    with chain_errors(f"calling {function}"):
        return allowlist.functions[function](*args).call(
            transaction, block_identifier=block  # type: ignore[arg-type]
        )


@functools.cache
def _image_status_abi() -> tuple[bytes, list[str], list[str]]:
    """imageStatus's selector, argument and return types, as web3 derives them from the ABI."""
    function = next(f for f in filter_abi_by_type("function", _abi())
                    if f["name"] == "imageStatus")
    selector = bytes.fromhex(_factory().encode_abi("imageStatus", args=[ZERO32])[2:10])
    return selector, get_abi_input_types(function), get_abi_output_types(function)


def read_image_status(allowlist: Contract, image_hash: bytes, block: int | str = "latest",
                      sender: str | None = None) -> tuple[bool, bytes]:
    """imageStatus(bytes32) -> (allowed, application id): the KMS's per-request read.

    The one call that does not go through ``allowlist.functions.imageStatus(...).call()``:
    that costs about 0.5 ms of CPU per call against anvil and 3 ms on eth-tester, more than
    the node's answer itself (bench/bench_allowlist.py, docs/adr/0003). Selector and types
    still come from the ABI, and eth_abi encodes and decodes, strictly."""
    selector, inputs, outputs = _image_status_abi()
    data = selector + abi_encode(inputs, [check_image_hash(image_hash)])
    out = eth_call(allowlist.w3, allowlist.address, data, block, sender)
    try:
        allowed, app = abi_decode(outputs, out, strict=True)
    except DecodingError:
        raise UnavailableError(
            ErrorCode.CHAIN_MISCONFIGURED,
            f"imageStatus(bytes32) answered {len(out)} bytes that do not decode as "
            "(bool, bytes32): is the address an ImageAllowlist contract?",
        ) from None
    return bool(allowed), bytes(app)


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


def read_events(allowlist: Contract, from_block: int, to_block: int,
                chunk: int = 10_000) -> list[ImageEvent]:
    """Additions (with their application) and removals, oldest first, in block chunks."""
    assigned = allowlist.events.OsImageHashAssigned()
    removed = allowlist.events.OsImageHashRemoved()
    events: list[ImageEvent] = []
    start = from_block
    while start <= to_block:
        end = min(start + chunk - 1, to_block)
        with chain_errors("reading the contract's events"):
            logs = allowlist.w3.eth.get_logs({
                "address": allowlist.address, "fromBlock": start, "toBlock": end,
                "topics": [[assigned.topic, removed.topic]],
            })
        for log in logs:
            topic = "0x" + bytes(log["topics"][0]).hex()
            block = int(log["blockNumber"])
            try:
                if topic == assigned.topic:
                    args = assigned.process_log(log)["args"]
                    events.append(ImageEvent(args["osImageHash"], True, args["appId"], block))
                elif topic == removed.topic:
                    args = removed.process_log(log)["args"]
                    events.append(ImageEvent(args["osImageHash"], False, None, block))
            except (Web3Exception, DecodingError):  # a log not in the ABI's shape: not ours
                continue
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

