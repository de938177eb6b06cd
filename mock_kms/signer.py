"""The KMS's secp256k1 signer: its keys in the state directory, its registration on chain.

    >>> from mock_kms.signer import SignerKeyring                       # doctest: +SKIP
    >>> ring = SignerKeyring(Path("/var/lib/mock-kms"))                 # doctest: +SKIP
    >>> ring.newest().address                                           # doctest: +SKIP
    '0x...'            # what `kms-gov set-signer` registers in the allowlist contract

The signer signs the EIP-712 provenance statement of every secp256k1 key the KMS releases
(:mod:`keyutil.provenance`), so that a contract can check it with ``ecrecover`` against the
address governance registered (``ImageAllowlist.setSigner``, event ``SignerChanged``).

Rotation: ``mock-kms signer new`` adds a key to ``STATE_DIR/signers/`` (0600 each, never
deleted by the KMS); governance registers its address; from then on the KMS signs with
whichever of its keys the contract names (read through :class:`RegisteredSigner`, cached for
the revocation delay), and statements of the old signer stop verifying on chain. A KMS whose
keys do not include the registered signer refuses to sign (503 ``signer_unavailable``).

Contract calls go through web3's contract objects built from the committed ABI.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexAddress, HexStr
from web3 import Web3
from web3.contract import Contract

from mock_kms import chain
from mock_kms.errors import ErrorCode, KmsError, UnavailableError

SIGNERS_DIR = "signers"
_KEY_FILE = re.compile(r"\A(\d{13})-(0x[0-9a-fA-F]{40})\.key\Z")
ZERO_ADDRESS = "0x" + "00" * 20


# --- the contract, through web3's contract objects ----------------------------------------


@functools.cache
def _abi(name: str) -> tuple[Mapping[str, Any], ...]:
    text = resources.files("mock_kms").joinpath("data", f"{name}.json").read_text("utf-8")
    return tuple(json.loads(text)["abi"])


def contract_object(w3: Web3, name: str, address: str) -> Contract:
    """The committed contract ``name`` (its artifact's ABI) at ``address``."""
    checksummed = ChecksumAddress(HexAddress(HexStr(chain.parse_address(address))))
    return w3.eth.contract(address=checksummed, abi=list(_abi(name)))


def allowlist_contract(w3: Web3, address: str) -> Contract:
    """The ImageAllowlist contract at ``address`` as a web3 contract object."""
    return contract_object(w3, "ImageAllowlist", address)


def set_signer_request(contract: str, signer: str) -> chain.TxRequest:
    """``setSigner(signer)`` as an unsigned call (no I/O)."""
    target = chain.parse_address(signer)
    data = allowlist_contract(Web3(), contract).encode_abi("setSigner", args=[target])
    return chain.TxRequest(to=chain.parse_address(contract), data=bytes.fromhex(data[2:]))


def read_signer(w3: Web3, contract: str, sender: str | None = None) -> str:
    """The signer registered in the allowlist contract (the zero address when none)."""
    call: Any = {} if sender is None else {"from": sender}
    with chain.chain_errors("reading the registered signer"):
        address = allowlist_contract(w3, contract).functions.signer().call(call)
    return chain.parse_address(str(address))


# --- the keys ---------------------------------------------------------------------------


class SignerKeyring:
    """The signer keys in ``STATE_DIR/signers/``: ``<created ms>-<address>.key``, 0600, each
    holding the private key as 0x-hex. Holds secrets: never logged, never printed."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = state_dir / SIGNERS_DIR
        self._clock = clock
        self._lock = threading.Lock()
        # The parsed key of each file, while the file (inode, time, mode, size) is unchanged:
        # parsing derives the public key, a pure-Python curve multiplication per statement.
        self._loaded: dict[Path, tuple[tuple[int, ...], LocalAccount]] = {}

    def __repr__(self) -> str:
        return f"SignerKeyring({str(self.directory)!r})"

    def _files(self) -> list[tuple[str, str, Path]]:
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            match = _KEY_FILE.match(name)
            if match:
                out.append((match.group(1), chain.parse_address(match.group(2)),
                            self.directory / name))
        return out

    def addresses(self) -> list[str]:
        """Every signer address, oldest first."""
        return [address for _, address, _ in self._files()]

    def new(self) -> str:
        """Make a new signer key; returns its address (for ``kms-gov set-signer``)."""
        from mock_kms.state import _write_secret

        account: LocalAccount = Account.create()
        with self._lock:
            # The state directory too, as `mock-kms serve` makes it (parents=True alone would
            # make it with the umask's mode when `signer show` runs first).
            self.directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.directory.mkdir(mode=0o700, exist_ok=True)
            stamp = max([int(self._clock() * 1000), *(int(c) + 1 for c, _, _ in self._files())])
            path = self.directory / f"{stamp:013d}-{account.address}.key"
            _write_secret(path, ("0x" + bytes(account.key).hex() + "\n").encode())
        return str(account.address)

    def newest(self, *, create: bool = False) -> str | None:
        """The most recently made signer's address; with ``create``, make one if none."""
        files = self._files()
        if not files:
            return self.new() if create else None
        return files[-1][1]

    def account(self, address: str) -> LocalAccount:
        """The key of ``address``; ``signer_unavailable`` when this KMS does not hold it."""
        for _, held, path in self._files():
            if held.lower() == address.lower():
                return self._load(path, held)
        raise UnavailableError(
            ErrorCode.SIGNER_UNAVAILABLE,
            f"the registered signer {address} is not among this KMS's signer keys "
            f"({self.directory}); register one of them with kms-gov set-signer",
        )

    def _load(self, path: Path, held: str) -> LocalAccount:
        from mock_kms.state import _read_private

        try:
            info = path.stat()
            version = (info.st_ino, info.st_mtime_ns, info.st_mode, info.st_size)
            with self._lock:
                loaded = self._loaded.get(path)
            if loaded is not None and loaded[0] == version:
                return loaded[1]
            key = _read_private(path).decode().strip()
            account: LocalAccount = Account.from_key(key)
        except (OSError, ValueError, UnicodeDecodeError):
            raise UnavailableError(
                ErrorCode.SIGNER_UNAVAILABLE, f"{path}: not a readable signer key"
            ) from None
        if account.address != held:
            raise UnavailableError(
                ErrorCode.SIGNER_UNAVAILABLE, f"{path}: the key is not {held}'s"
            )
        with self._lock:
            self._loaded[path] = (version, account)
        return account


def sign_typed(account: LocalAccount, message: Mapping[str, Any]) -> bytes:
    """EIP-712 signature (r || s || v, v 27/28, low s) of ``message`` (full_message form)."""
    signed = account.sign_message(encode_typed_data(full_message=dict(message)))
    return bytes(signed.signature)


# --- which key signs --------------------------------------------------------------------


# How long a failed read of the registered signer is answered from memory (at most the
# revocation delay): GET /v1/provenance is public, and without it every request for a
# secp256k1 statement during an RPC outage was one more RPC call, each holding a worker
# thread up to the RPC timeout.
FAILED_READ_KEPT = 1.0


@dataclasses.dataclass
class RegisteredSigner:
    """The signer registered on chain, read through ``read`` and kept at most
    ``max_staleness`` seconds (the revocation delay): a rotation takes effect within it.
    One read at a time (callers meanwhile wait for its answer); a failed read's error is
    kept :data:`FAILED_READ_KEPT` seconds (no longer than ``max_staleness``)."""

    read: Callable[[], str]
    max_staleness: float = 2.0
    clock: Callable[[], float] = time.monotonic
    _cached: tuple[float, str | KmsError] | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    _reading: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def _fresh(self, now: float) -> str | KmsError | None:
        with self._lock:
            if self._cached is None:
                return None
            read_at, value = self._cached
            keep = self.max_staleness
            if isinstance(value, KmsError):
                keep = min(keep, FAILED_READ_KEPT)
            return value if now - read_at < keep else None

    def current(self) -> str:
        found = self._fresh(self.clock())
        if found is None:
            with self._reading:
                now = self.clock()
                found = self._fresh(now)  # read by another thread while this one waited
                if found is None:
                    try:
                        found = self.read()
                    except KmsError as e:
                        found = e
                    with self._lock:
                        self._cached = (now, found)
        if isinstance(found, KmsError):
            # A new instance each time: one raised again and again grows its traceback.
            raise type(found)(found.code, found.message) from None
        return found

    def forget(self) -> None:
        with self._lock:
            self._cached = None


def signing_account(registered: RegisteredSigner, ring: SignerKeyring) -> LocalAccount:
    """The key to sign with now: the registered signer's, if this KMS holds it."""
    address = registered.current()
    if address == chain.parse_address(ZERO_ADDRESS):
        raise UnavailableError(
            ErrorCode.SIGNER_UNAVAILABLE,
            "no signer is registered in the allowlist contract: register this KMS's "
            "(mock-kms signer show) with kms-gov set-signer",
        )
    return ring.account(address)



def provenance_check_deploy_request(allowlist: str) -> chain.TxRequest:
    """Deploy the example ProvenanceCheck contract reading the signer from ``allowlist``."""
    from eth_abi.abi import encode as abi_encode

    text = resources.files("mock_kms").joinpath("data", "ProvenanceCheck.json").read_text("utf-8")
    bytecode = bytes.fromhex(json.loads(text)["bytecode"].removeprefix("0x"))
    args = abi_encode(["address"], [chain.parse_address(allowlist)])
    return chain.TxRequest(to=None, data=bytecode + args)
