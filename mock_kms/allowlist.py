"""The KMS's view of the on-chain image allowlist: one small interface, two implementations.

    >>> from mock_kms.allowlist import EmbeddedAllowlist, require_allowed
    >>> allowlist = EmbeddedAllowlist.create()
    >>> image = bytes.fromhex("11" * 32)
    >>> _ = allowlist.register_image(image, b"billing".ljust(32, b"\\0"))
    >>> require_allowed(allowlist, image).rstrip(b"\\0")
    b'billing'
    >>> allowlist.lookup(bytes(32))
    ImageStatus(allowed=False, application=None)

:class:`Allowlist` is the interface: ``lookup(image_hash) -> ImageStatus`` asks (I/O), and
:func:`decide` / :func:`require_allowed` turn the answer into a decision (no I/O). Every
failure to read the chain is an :class:`~mock_kms.errors.UnavailableError`: the KMS denies
(fails closed) and the client may retry.

- :class:`RpcAllowlist` reads a deployed ImageAllowlist contract over JSON-RPC (web3). It
  checks the chain id and the contract code before its first lookup, reads at
  ``latest - confirmations``, bounds every RPC by a timeout, and caches answers for at most
  ``max_staleness`` seconds (the revocation delay, see :class:`ReaderSettings`).
- :class:`EmbeddedAllowlist` runs the same contract on an in-process EVM (eth-tester with
  py-evm), so development needs no node. It keeps NOTHING across restarts: the chain lives in
  memory and is rebuilt, empty, by every ``create()``; register images again at each start
  (see docs/adr/0004-embedded-chain-is-ephemeral.md).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from web3 import Web3
from web3.providers.rpc import HTTPProvider

from mock_kms import chain
from mock_kms.chain import DEBUG_IMAGE_HASH, Receipt, check_image_hash, format_application
from mock_kms.errors import ErrorCode, InvalidError, UnavailableError

__all__ = [
    "Allowlist",
    "CacheStats",
    "EmbeddedAllowlist",
    "ImageStatus",
    "ReaderSettings",
    "RpcAllowlist",
    "decide",
    "parse_allow_image",
    "require_allowed",
]

Clock = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class ImageStatus:
    """The chain's answer for one image: allowed or not, and the application it belongs to
    (32 bytes, None when not allowed)."""

    allowed: bool
    application: bytes | None

    def __post_init__(self) -> None:
        if self.allowed != (self.application is not None):
            raise ValueError("an allowed image has an application; a refused one has none")
        if self.application is not None and len(self.application) != 32:
            raise ValueError("an application id is 32 bytes")

    @property
    def application_name(self) -> str | None:
        """The application as text: its name when it is one, else 0x-hex."""
        return None if self.application is None else format_application(self.application)


class Allowlist(Protocol):
    """What the KMS needs from an allowlist."""

    def lookup(self, image_hash: bytes) -> ImageStatus:
        """The status of one 32-byte OS_IMAGE_HASH. Raises InvalidError(hash_invalid) on a
        malformed hash, UnavailableError when the chain cannot answer."""
        ...

    def check_ready(self) -> None:
        """Raise UnavailableError unless lookups can be answered right now."""
        ...


def decide(image_hash: bytes, status: ImageStatus) -> bytes:
    """The decision, without I/O: the application id, or InvalidError(image_not_allowed).

    The debug-enclave hash is refused whatever the chain says (the contract refuses it too;
    this keeps a misbehaving node or a different contract from allowing it)."""
    if image_hash == DEBUG_IMAGE_HASH:
        raise InvalidError(
            ErrorCode.DEBUG_ENCLAVE, "the image hash is that of all-zero PCRs (a debug enclave)"
        )
    if not status.allowed or status.application is None:
        raise InvalidError(
            ErrorCode.IMAGE_NOT_ALLOWED,
            f"image 0x{image_hash.hex()} is not on the allowlist",
        )
    return status.application


def require_allowed(allowlist: Allowlist, image_hash: bytes) -> bytes:
    """lookup + decide: the application id of an allowed image, else an error."""
    image_hash = check_image_hash(image_hash)
    return decide(image_hash, allowlist.lookup(image_hash))


def parse_allow_image(text: str) -> tuple[bytes, bytes]:
    """``HASH=APP`` (as ``mock-kms serve --allow-image`` takes it) -> (hash, application)."""
    image, sep, app = text.partition("=")
    if not sep:
        raise InvalidError(
            ErrorCode.HASH_INVALID, "expected HASH=APP (an image hash, '=', an application)"
        )
    image_hash = chain.parse_image_hash(image)
    chain.refuse_unregistrable(image_hash)
    return image_hash, chain.parse_application(app)


# --- over JSON-RPC --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReaderSettings:
    """Limits of :class:`RpcAllowlist`.

    Revocation delay: a removal is seen by the KMS at most ``max_staleness`` seconds after the
    KMS reads a block that contains it, i.e. after ``confirmations`` further blocks. With the
    defaults (0 confirmations, 2 s) a revocation takes effect at most 2 s after it is mined,
    plus one ``rpc_timeout`` for a lookup already in flight.
    """

    confirmations: int = 0
    rpc_timeout: float = 2.0
    max_staleness: float = 2.0
    cache_size: int = 4096

    def __post_init__(self) -> None:
        if self.confirmations < 0:
            raise ValueError("confirmations must be >= 0")
        if not 0 < self.rpc_timeout <= 60:
            raise ValueError("rpc_timeout must be in (0, 60] seconds")
        if not 0 <= self.max_staleness <= 60:
            raise ValueError("max_staleness (the revocation delay) must be in [0, 60] seconds")
        if self.cache_size < 0:
            raise ValueError("cache_size must be >= 0")


@dataclasses.dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    size: int


class StatusCache:
    """Chain answers kept for at most ``settings.max_staleness`` seconds (the revocation
    delay), at most ``settings.cache_size`` of them, least recently used dropped first."""

    def __init__(self, settings: ReaderSettings, clock: Clock) -> None:
        self._settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[bytes, tuple[float, ImageStatus]] = (
            collections.OrderedDict()
        )
        self._hits = 0
        self._misses = 0

    def read_through(
        self, image_hash: bytes, read: Callable[[bytes], ImageStatus]
    ) -> ImageStatus:
        """The cached status of ``image_hash`` if it is fresh enough, else ``read`` it (the
        chain) and keep the answer, stamped with the time the read started."""
        now = self._clock()
        cached = self._get(image_hash, now)
        if cached is not None:
            return cached
        status = read(image_hash)
        self._put(image_hash, status, now)
        return status

    def _get(self, image_hash: bytes, now: float) -> ImageStatus | None:
        with self._lock:
            entry = self._entries.get(image_hash)
            if entry is not None and now - entry[0] < self._settings.max_staleness:
                self._entries.move_to_end(image_hash)
                self._hits += 1
                return entry[1]
            self._misses += 1
            return None

    def _put(self, image_hash: bytes, status: ImageStatus, read_at: float) -> None:
        if not (self._settings.cache_size and self._settings.max_staleness):
            return
        with self._lock:
            self._entries[image_hash] = (read_at, status)
            self._entries.move_to_end(image_hash)
            while len(self._entries) > self._settings.cache_size:
                self._entries.popitem(last=False)

    def forget(self, image_hash: bytes) -> None:
        with self._lock:
            self._entries.pop(image_hash, None)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self._hits, misses=self._misses, size=len(self._entries))


class RpcAllowlist:
    """The allowlist contract at ``contract_address`` read through ``w3``.

    Construction does no I/O. :meth:`check_ready` (run it at start, and from the readiness
    probe) verifies the chain id and that the address holds code; :meth:`lookup` runs it once
    by itself if nobody did.
    """

    def __init__(
        self,
        w3: Web3,
        contract_address: str,
        *,
        expected_chain_id: int,
        settings: ReaderSettings | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._w3 = w3
        self._address = chain.parse_address(contract_address)
        self._contract = chain.contract(w3, self._address)
        self._expected_chain_id = expected_chain_id
        self._settings = settings or ReaderSettings()
        self._clock = clock
        self._lock = threading.Lock()
        self._cache = StatusCache(self._settings, clock)
        self._checked = False

    @classmethod
    def from_url(
        cls,
        rpc_url: str,
        contract_address: str,
        *,
        expected_chain_id: int,
        settings: ReaderSettings | None = None,
        clock: Clock = time.monotonic,
    ) -> RpcAllowlist:
        """An HTTP(S) JSON-RPC endpoint; every request bounded by ``settings.rpc_timeout``,
        no transport retries (the caller retries, within its own deadline)."""
        settings = settings or ReaderSettings()
        provider = HTTPProvider(
            rpc_url,
            request_kwargs={"timeout": settings.rpc_timeout},
            exception_retry_configuration=None,
        )
        # No middleware: the chain id is checked once by check_ready; web3's validation
        # middleware would otherwise add an eth_chainId request to every eth_call.
        return cls(
            Web3(provider, middleware=[]),
            contract_address,
            expected_chain_id=expected_chain_id,
            settings=settings,
            clock=clock,
        )

    @property
    def contract_address(self) -> str:
        return self._address

    @property
    def settings(self) -> ReaderSettings:
        return self._settings

    def check_ready(self) -> None:
        chain.check_chain(self._w3, self._address, self._expected_chain_id)
        self._checked = True

    def lookup(self, image_hash: bytes) -> ImageStatus:
        return self._cache.read_through(check_image_hash(image_hash), self._read)

    def stats(self) -> CacheStats:
        return self._cache.stats()

    def _read(self, image_hash: bytes) -> ImageStatus:
        if not self._checked:
            self.check_ready()
        block: int | str = "latest"
        if self._settings.confirmations:
            with chain.chain_errors("reading the block number"):
                head = int(self._w3.eth.block_number)
            block = max(head - self._settings.confirmations, 0)
        allowed, app = chain.read_image_status(self._contract, image_hash, block)
        if allowed and app == chain.ZERO32:
            raise UnavailableError(
                ErrorCode.CHAIN_MISCONFIGURED,
                "the contract reports an allowed image with the zero application id",
            )
        return ImageStatus(allowed=allowed, application=app if allowed else None)


# --- embedded -------------------------------------------------------------------------------


class EmbeddedAllowlist:
    """The allowlist contract deployed on an in-process EVM (eth-tester + py-evm).

    The zero-setup default for development and CI. Images are registered through the
    contract's own ``addOsImageHash``, sent by the contract's owner (the first account of the
    in-process chain), so the contract's checks (zero hash, debug hash, one application per
    image) apply exactly as on a real chain. Lookups are cached like :class:`RpcAllowlist`'s
    (a py-evm ``eth_call`` costs milliseconds); registrations and removals made through this
    object drop the image from the cache, so they take effect for the next lookup.

    Persistence: none. The chain, the contract and every registration live in this process's
    memory and vanish when it exits; ``create()`` always starts from an empty allowlist.
    """

    def __init__(
        self,
        w3: Web3,
        contract_address: str,
        owner: str,
        *,
        settings: ReaderSettings | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._w3 = w3
        self._address = chain.parse_address(contract_address)
        self._contract = chain.contract(w3, self._address)
        self._owner = owner
        self._lock = threading.Lock()  # eth-tester is not thread-safe
        self._cache = StatusCache(settings or ReaderSettings(), clock)

    @classmethod
    def create(
        cls,
        images: Iterable[tuple[bytes, bytes]] = (),
        *,
        settings: ReaderSettings | None = None,
        clock: Clock = time.monotonic,
    ) -> EmbeddedAllowlist:
        """A fresh in-process chain with the contract deployed, then ``images`` registered
        as (hash, application) pairs."""
        # Imported here: eth-tester and py-evm are only needed by the embedded chain.
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider

        w3 = Web3(EthereumTesterProvider(EthereumTester(PyEVMBackend())))
        owner = w3.eth.accounts[0]
        receipt = chain.send(w3, chain.deploy_request(owner), sender=owner)
        assert receipt.contract_address is not None
        allowlist = cls(w3, receipt.contract_address, owner, settings=settings, clock=clock)
        for image_hash, app in images:
            allowlist.register_image(image_hash, app)
        return allowlist

    @property
    def w3(self) -> Web3:
        return self._w3

    @property
    def contract_address(self) -> str:
        return self._address

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def chain_id(self) -> int:
        return int(self._w3.eth.chain_id)

    def register_image(self, image_hash: bytes, application: bytes) -> Receipt:
        """``addOsImageHash(image_hash, application)`` sent by the owner; InvalidError when
        the contract refuses it (zero or debug hash, zero application, already allowed)."""
        request = chain.add_request(self._address, image_hash, application)
        with self._lock:
            receipt = chain.send(self._w3, request, sender=self._owner)
        self._cache.forget(image_hash)
        return receipt

    def remove_image(self, image_hash: bytes) -> Receipt:
        """``removeOsImageHash(image_hash)`` sent by the owner."""
        request = chain.remove_request(self._address, image_hash)
        with self._lock:
            receipt = chain.send(self._w3, request, sender=self._owner)
        self._cache.forget(image_hash)
        return receipt

    def check_ready(self) -> None:
        with self._lock:
            chain.check_chain(self._w3, self._address, None)

    def lookup(self, image_hash: bytes) -> ImageStatus:
        return self._cache.read_through(check_image_hash(image_hash), self._read)

    def _read(self, image_hash: bytes) -> ImageStatus:
        with self._lock:
            # An explicit sender spares the eth-tester provider an eth_accounts round per call.
            allowed, app = chain.read_image_status(self._contract, image_hash,
                                                   sender=self._owner)
        return ImageStatus(allowed=allowed, application=app if allowed else None)

    def stats(self) -> CacheStats:
        return self._cache.stats()
