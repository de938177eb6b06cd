"""The KMS side of provenance: it issues the statement of a typed key (keyutil.provenance).

    >>> issuer = ProvenanceIssuer(state=state, chain_id=31337, contract="0x...",
    ...                           signer=SignerChoice(registered, ring))    # doctest: +SKIP
    >>> issuer.issue(application, KeyRequest("wallet", 32, "secp256k1"))   # doctest: +SKIP
    {'v': 1, 'application': '0x...', 'name': 'wallet', 'type': 'secp256k1', ...}

A statement holds no secret: the KMS derives the key (the same derivation as a release),
keeps only its public half, and signs. So it is issued inside a release (next to the sealed
key) and to anyone who asks ``GET /v1/provenance``: the public half of an application's key
is not confidential, and who holds the private half is what the statement proves.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any

from eth_account.signers.local import LocalAccount

from keyutil import keytypes, provenance
from keyutil.protocol import KeyRequest, ProtocolError, b64e
from mock_kms import chain
from mock_kms.errors import ErrorCode, InvalidError, KmsError, UnavailableError
from mock_kms.signer import RegisteredSigner, SignerKeyring, sign_typed, signing_account
from mock_kms.state import KmsState


@dataclasses.dataclass(frozen=True)
class SignerChoice:
    """Which key signs secp256k1 statements: the registered signer, from this KMS's keys."""

    registered: RegisteredSigner
    ring: SignerKeyring

    def account(self) -> LocalAccount:
        return signing_account(self.registered, self.ring)


# Statements kept by (application, name, type, signer): GET /v1/provenance is public and a
# secp256k1 statement costs two curve multiplications in pure Python (eth-keys' native
# backend), some 30 times an identity request; the same statement asked again costs a lookup.
STATEMENT_CACHE_SIZE = 4096
# At most this many statements made at once for GET /v1/provenance (cache misses); more are
# 503 overloaded at once, so that a flood of new names holds neither the worker threads nor
# more of the GIL than this. Releases (attested) are not counted.
PUBLIC_CONCURRENCY = 2

_CacheKey = tuple[bytes, str, str, str | None]


class _StatementCache:
    """A bounded LRU map, safe across the server's threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: collections.OrderedDict[_CacheKey, dict[str, Any]] = (
            collections.OrderedDict())
        self._lock = threading.Lock()

    def get(self, key: _CacheKey) -> dict[str, Any] | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: _CacheKey, value: dict[str, Any]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@dataclasses.dataclass(frozen=True)
class ProvenanceIssuer:
    """Makes signed statements for one KMS, chain and allowlist contract.

    A statement is a function of its key (application, name, type) and the signer that signs
    it (Ed25519 and eth-keys' ECDSA are both deterministic), so the last
    :data:`STATEMENT_CACHE_SIZE` are kept, keyed by the signer too: after a rotation the new
    signer's statements are made afresh."""

    state: KmsState
    chain_id: int
    contract: str
    signer: SignerChoice | None  # None: secp256k1 statements are refused (signer_unavailable)
    cache: _StatementCache = dataclasses.field(
        default_factory=lambda: _StatementCache(STATEMENT_CACHE_SIZE), compare=False,
        repr=False)
    public_slots: threading.BoundedSemaphore = dataclasses.field(
        default_factory=lambda: threading.BoundedSemaphore(PUBLIC_CONCURRENCY), compare=False,
        repr=False)

    def issue(self, application: bytes, key: KeyRequest, *, public: bool = False
              ) -> dict[str, Any]:
        """The signed statement of ``key`` of ``application`` (a type with a public half).
        ``public``: asked without attestation (GET /v1/provenance), so a statement not in the
        cache is made only if one of :data:`PUBLIC_CONCURRENCY` slots is free, else 503
        ``overloaded``."""
        account = None
        if key.type in provenance.ONCHAIN_TYPES:
            if self.signer is None:
                raise UnavailableError(
                    ErrorCode.SIGNER_UNAVAILABLE, "this KMS has no secp256k1 signer configured"
                )
            account = self.signer.account()
        cache_key = (application, key.name, key.type, account.address if account else None)
        cached = self.cache.get(cache_key)
        if cached is not None:
            return dict(cached)
        if public and not self.public_slots.acquire(blocking=False):
            raise UnavailableError(
                ErrorCode.OVERLOADED, "too many provenance statements being made; retry"
            )
        try:
            statement = self._make(application, key, account)
        finally:
            if public:
                self.public_slots.release()
        self.cache.put(cache_key, statement)
        return dict(statement)

    def _make(self, application: bytes, key: KeyRequest, account: LocalAccount | None
              ) -> dict[str, Any]:
        public = self.state.public_key(application, key)
        if public is None:
            raise InvalidError(
                ErrorCode.BAD_REQUEST,
                f"a key of type {key.type} has no public half, so no provenance statement",
            )
        contract = chain.parse_address(self.contract)
        body: dict[str, Any] = {
            "v": provenance.STATEMENT_VERSION,
            "application": "0x" + application.hex(),
            "name": key.name,
            "type": key.type,
            "public_key": public,
            "kms_identity": self.state.identity_text,
            "chain_id": self.chain_id,
            "contract": contract,
        }
        if account is not None:
            message = provenance.eip712_message(
                application=application, name=key.name, key_type=key.type, public_key=public,
                kms_identity=self.state.identity_text, chain_id=self.chain_id,
                contract=contract,
            )
            body.update(
                address=provenance.account_of(public),
                signer=account.address,
                signer_signature="0x" + sign_typed(account, message).hex(),
            )
        signature = self.state.identity.sign(provenance.signing_bytes(body))
        return {**body, "signature": b64e(signature)}


def parse_query(application: str | None, name: str | None, key_type: str | None
                ) -> tuple[bytes, KeyRequest]:
    """``GET /v1/provenance?application=APP&name=NAME&type=TYPE`` -> what to issue."""
    if not application or not name or not key_type:
        raise InvalidError(
            ErrorCode.BAD_REQUEST, "expected the query parameters application, name and type"
        )
    try:
        app = chain.parse_application(application)
        kind = keytypes.get(key_type)
        key = KeyRequest(name, kind.seed_length or 32, key_type)
    except KmsError as e:
        raise InvalidError(ErrorCode.BAD_REQUEST, e.message) from None
    except (keytypes.UnknownKeyType, ProtocolError) as e:
        raise InvalidError(ErrorCode.BAD_REQUEST, str(e)) from None
    if key.type == keytypes.DEFAULT_TYPE:
        raise InvalidError(ErrorCode.BAD_REQUEST, "raw keys have no public half to vouch for")
    return app, key


def has_statement(key: KeyRequest) -> bool:
    """Every typed key (age, ed25519, secp256k1) has a public half, so a statement."""
    return key.type != keytypes.DEFAULT_TYPE
