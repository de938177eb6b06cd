"""Provenance statements: which application a released key's public half belongs to.

    >>> from keyutil.provenance import parse_statement, verify_statement   # doctest: +SKIP
    >>> from keyutil.protocol import parse_identity                         # doctest: +SKIP
    >>> pin = parse_identity(open("/etc/keyutil/kms.pub").read())           # doctest: +SKIP
    >>> verified = verify_statement(open("wallet.provenance.json", "rb").read(), pin)
    >>> verified.address                                                    # doctest: +SKIP
    '0x5B38Da6a701c568545dCfcB03FcB875f56beddC4'

The KMS issues one statement per typed key (a key type with a public half): it binds the
application id, the key's name and type, its public half, the KMS identity, and the chain and
allowlist contract whose governance decides which images belong to the application. It is
JSON (docs/protocol.md, "Provenance", gives the exact bytes):

- ``signature``: Ed25519 by the KMS identity over
  ``"nitro-keyrelease/v1/provenance" || 0x00 || canonical_json(statement without "signature")``;
  anyone holding the pinned identity checks it offline (``keyutil verify-provenance``).
- for ``secp256k1`` keys also ``signer`` and ``signer_signature``: an EIP-712 signature by the
  KMS's secp256k1 signer, whose address governance registers in the allowlist contract
  (``kms-gov set-signer``), so a contract checks it with ``ecrecover``
  (contracts/src/ProvenanceCheck.sol). ``address`` is the key's Ethereum account.

Parsing and the Ed25519 check need only ``cryptography``. The EIP-712 check of a secp256k1
statement (keccak-256 and public-key recovery) needs ``eth-account``: the ``[provenance]``
extra (included in ``[kms]``). It is imported only then, so the enclave's boot path never
loads it; without it such a statement is refused with ``dependency_missing``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyutil.protocol import (
    KEY_NAME,
    ProtocolError,
    b64d,
    b64e,
    canonical_json,
    format_identity,
    parse_identity,
)

STATEMENT_VERSION = 1
STATEMENT_CONTEXT = b"nitro-keyrelease/v1/provenance"
MAX_STATEMENT_SIZE = 4096

EIP712_NAME = "nitro-keyrelease"
EIP712_VERSION = "1"
EIP712_TYPES: dict[str, list[dict[str, str]]] = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "KeyProvenance": [
        {"name": "application", "type": "bytes32"},
        {"name": "keyName", "type": "string"},
        {"name": "keyType", "type": "string"},
        {"name": "publicKey", "type": "bytes"},
        {"name": "kmsIdentity", "type": "bytes32"},
    ],
}
# Key types whose statements the KMS's secp256k1 signer also signs (for contracts).
ONCHAIN_TYPES = frozenset({"secp256k1"})

# secp256k1n / 2: ecrecover-checking contracts refuse a larger s (its malleated twin).
_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0

_HEX32 = re.compile(r"\A0x[0-9a-f]{64}\Z")
_ADDRESS = re.compile(r"\A0x[0-9a-fA-F]{40}\Z")
_SIG65 = re.compile(r"\A0x[0-9a-f]{130}\Z")
_SECP256K1_PUBLIC = re.compile(r"\A0x04[0-9a-f]{128}\Z")
_TYPE = re.compile(r"\A[a-z0-9][a-z0-9-]{0,31}\Z")
_BASE_FIELDS = frozenset(
    {"v", "application", "name", "type", "public_key", "kms_identity", "chain_id", "contract",
     "signature"}
)
_ONCHAIN_FIELDS = frozenset({"address", "signer", "signer_signature"})


class ProvenanceError(ProtocolError):
    """A statement is malformed or does not verify; ``code`` is stable:

    ``statement_malformed``, ``statement_unauthenticated`` (not signed by the pinned KMS
    identity), ``signer_signature_invalid`` (the EIP-712 signature is not the named signer's),
    ``address_mismatch`` (the account is not that of the public key), ``statement_mismatch``
    (another application, key, chain or contract than expected), ``dependency_missing``."""


@dataclasses.dataclass(frozen=True)
class ProvenanceStatement:
    """A parsed statement (its signatures not yet checked)."""

    application: bytes
    name: str
    key_type: str
    public_key: str
    kms_identity: str
    chain_id: int
    contract: str
    signature: bytes
    address: str | None = None
    signer: str | None = None
    signer_signature: bytes | None = None

    def body(self) -> dict[str, Any]:
        """Every field but ``signature``, as it is signed."""
        out: dict[str, Any] = {
            "v": STATEMENT_VERSION,
            "application": "0x" + self.application.hex(),
            "name": self.name,
            "type": self.key_type,
            "public_key": self.public_key,
            "kms_identity": self.kms_identity,
            "chain_id": self.chain_id,
            "contract": self.contract,
        }
        if self.key_type in ONCHAIN_TYPES:
            assert self.signer_signature is not None
            out.update(address=self.address, signer=self.signer,
                       signer_signature="0x" + self.signer_signature.hex())
        return out

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "signature": b64e(self.signature)}

    def to_bytes(self) -> bytes:
        """The file ``--provenance-out`` writes: canonical JSON and a newline."""
        return canonical_json(self.to_json()) + b"\n"


def signing_bytes(body: Mapping[str, Any]) -> bytes:
    """What the KMS identity signs."""
    return STATEMENT_CONTEXT + b"\x00" + canonical_json(dict(body))


def public_key_bytes(key_type: str, public_key: str) -> bytes:
    """``publicKey`` of the EIP-712 message: for secp256k1 the 65-byte uncompressed point."""
    if key_type == "secp256k1" and _SECP256K1_PUBLIC.match(public_key):
        return bytes.fromhex(public_key[2:])
    raise ProvenanceError(
        "statement_malformed",
        f"public_key: expected 0x04 and 128 lowercase hex digits for {key_type}",
    )


def eip712_message(
    *, application: bytes, name: str, key_type: str, public_key: str, kms_identity: str,
    chain_id: int, contract: str,
) -> dict[str, Any]:
    """The EIP-712 typed data the KMS signer signs (``eth_account``'s ``full_message`` form)."""
    identity = parse_identity(kms_identity)
    from cryptography.hazmat.primitives import serialization

    raw_identity = identity.public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    return {
        "types": EIP712_TYPES,
        "primaryType": "KeyProvenance",
        "domain": {"name": EIP712_NAME, "version": EIP712_VERSION, "chainId": chain_id,
                   "verifyingContract": contract},
        "message": {
            "application": "0x" + application.hex(),
            "keyName": name,
            "keyType": key_type,
            "publicKey": "0x" + public_key_bytes(key_type, public_key).hex(),
            "kmsIdentity": "0x" + raw_identity.hex(),
        },
    }


def statement_eip712(statement: ProvenanceStatement) -> dict[str, Any]:
    return eip712_message(
        application=statement.application, name=statement.name,
        key_type=statement.key_type, public_key=statement.public_key,
        kms_identity=statement.kms_identity, chain_id=statement.chain_id,
        contract=statement.contract,
    )


# --- parse ----------------------------------------------------------------------------------


def parse_application(text: str) -> bytes:
    """An application id as the allowlist contract stores it: ``0x`` + 64 hex digits, or a
    name of 1 to 32 printable ASCII characters, left-aligned and zero-padded (the rule of
    ``mock_kms.chain.parse_application``, which this package cannot import). The zero id is
    reserved. ValueError otherwise."""
    if text.startswith(("0x", "0X")):
        if not re.fullmatch(r"0x[0-9a-fA-F]{64}", text):
            raise ValueError("expected 0x + 64 hex digits")
        value = bytes.fromhex(text[2:])
    elif 1 <= len(text) <= 32 and all(0x20 <= ord(c) <= 0x7E for c in text):
        value = text.encode("ascii").ljust(32, b"\0")
    else:
        raise ValueError("expected a name of 1 to 32 printable ASCII characters or 0x + 64 hex")
    if not any(value):
        raise ValueError("the zero application id is reserved")
    return value



def _malformed(message: str) -> ProvenanceError:
    return ProvenanceError("statement_malformed", message)


def _text(obj: Mapping[str, Any], field: str, pattern: re.Pattern[str], what: str) -> str:
    value = obj.get(field)
    if not isinstance(value, str) or not pattern.match(value):
        raise _malformed(f"{field}: expected {what}")
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose member names are distinct: with a name twice, parsers disagree
    on which value counts (Python's the last, others the first), so such text is refused."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _malformed("a member name appears twice")
    return obj


def parse_statement(data: bytes | str | Mapping[str, Any]) -> ProvenanceStatement:
    """A statement from its JSON (bytes, text or a decoded object); only its form is checked."""
    if isinstance(data, bytes | str):
        if len(data) > MAX_STATEMENT_SIZE:
            raise _malformed(f"expected at most {MAX_STATEMENT_SIZE} bytes; found {len(data)}")
        try:
            obj = json.loads(data, object_pairs_hook=_unique_members)
        except ProvenanceError:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError):
            # RecursionError: "[[[[..." nested deeper than the interpreter's stack, well
            # within the size limit; a statement is one flat object.
            raise _malformed("expected a JSON object") from None
    else:
        obj = data
    if not isinstance(obj, Mapping):
        raise _malformed("expected a JSON object")
    if type(obj.get("v")) is not int or obj.get("v") != STATEMENT_VERSION:
        raise _malformed(f"v: expected the integer {STATEMENT_VERSION}")
    key_type = _text(obj, "type", _TYPE, "a key type name")
    onchain = key_type in ONCHAIN_TYPES
    expected = _BASE_FIELDS | (_ONCHAIN_FIELDS if onchain else frozenset())
    if set(obj) != expected:
        extra = sorted(set(obj) - expected)
        missing = sorted(expected - set(obj))
        raise _malformed(f"fields: unexpected {extra}, missing {missing}")
    name = obj["name"]
    if not isinstance(name, str) or not KEY_NAME.match(name):
        raise _malformed("name: expected a key name")
    public_key = obj["public_key"]
    if not isinstance(public_key, str) or not 0 < len(public_key) <= 512:
        raise _malformed("public_key: expected text")
    chain_id = obj["chain_id"]
    if type(chain_id) is not int or not 0 < chain_id < 2**64:
        raise _malformed("chain_id: expected a positive integer")
    try:
        kms_identity = obj["kms_identity"]
        parse_identity(kms_identity if isinstance(kms_identity, str) else "")
        signature = b64d(obj["signature"], "signature", max_len=200)
    except ProtocolError as e:
        raise _malformed(e.message) from None
    statement = ProvenanceStatement(
        application=bytes.fromhex(_text(obj, "application", _HEX32, "0x + 64 hex digits")[2:]),
        name=name,
        key_type=key_type,
        public_key=public_key,
        kms_identity=kms_identity,
        chain_id=chain_id,
        contract=_text(obj, "contract", _ADDRESS, "an address, 0x + 40 hex digits"),
        signature=signature,
    )
    if onchain:
        public_key_bytes(key_type, public_key)
        statement = dataclasses.replace(
            statement,
            address=_text(obj, "address", _ADDRESS, "an address, 0x + 40 hex digits"),
            signer=_text(obj, "signer", _ADDRESS, "an address, 0x + 40 hex digits"),
            signer_signature=bytes.fromhex(
                _text(obj, "signer_signature", _SIG65, "0x + 130 lowercase hex digits")[2:]
            ),
        )
    return statement


# --- verify ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerifiedProvenance:
    """A statement whose signatures verified: what it proves."""

    statement: ProvenanceStatement
    signer_checked: bool  # the EIP-712 signature was checked too (secp256k1 statements)

    @property
    def address(self) -> str | None:
        return self.statement.address

    def to_json(self) -> dict[str, Any]:
        s = self.statement
        out: dict[str, Any] = {
            "application": "0x" + s.application.hex(), "name": s.name, "type": s.key_type,
            "public_key": s.public_key, "kms_identity": s.kms_identity,
            "chain_id": s.chain_id, "contract": s.contract,
        }
        if s.key_type in ONCHAIN_TYPES:
            out.update(address=s.address, signer=s.signer)
        return out


def check_identity(statement: ProvenanceStatement, identity: ed25519.Ed25519PublicKey) -> None:
    """The Ed25519 signature is the pinned identity's (no other dependency needed)."""
    if statement.kms_identity != format_identity(identity):
        raise ProvenanceError(
            "statement_unauthenticated",
            "the statement names another KMS identity than the pinned one",
        )
    try:
        identity.verify(statement.signature, signing_bytes(statement.body()))
    except InvalidSignature:
        raise ProvenanceError(
            "statement_unauthenticated", "the statement is not signed by the pinned KMS identity"
        ) from None


def _require_eth_account() -> None:
    try:
        import eth_account  # noqa: F401
    except ImportError:
        raise ProvenanceError(
            "dependency_missing",
            "checking a secp256k1 statement (keccak-256, ecrecover) needs eth-account: "
            "pip install 'nitro-keyrelease[provenance]'",
        ) from None


def recover_signer(statement: ProvenanceStatement) -> str:
    """The address that made ``signer_signature`` (EIP-712, as ecrecover sees it)."""
    _require_eth_account()
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    assert statement.signer_signature is not None
    signature = statement.signer_signature
    # ecrecover takes v = 27 or 28 and the contract refuses s in the upper half (malleable).
    if signature[64] not in (27, 28) or int.from_bytes(signature[32:64], "big") > _HALF_ORDER:
        raise ProvenanceError(
            "signer_signature_invalid", "signer_signature: expected v 27/28 and a low s"
        )
    try:
        signable = encode_typed_data(full_message=statement_eip712(statement))
        recovered: str = Account.recover_message(signable, signature=signature)
    except Exception:  # eth_keys raises several types for a bad point or signature
        raise ProvenanceError(
            "signer_signature_invalid", "signer_signature: no signer recovers from it"
        ) from None
    return recovered


def account_of(public_key: str) -> str:
    """The Ethereum account (checksummed) of a secp256k1 public key ``0x04...``."""
    _require_eth_account()  # eth-keys comes with it
    from eth_keys.datatypes import PublicKey

    raw = public_key_bytes("secp256k1", public_key)
    return str(PublicKey(raw[1:]).to_checksum_address())


def verify_statement(
    data: bytes | str | Mapping[str, Any] | ProvenanceStatement,
    identity: ed25519.Ed25519PublicKey,
    *,
    application: bytes | None = None,
    name: str | None = None,
    key_type: str | None = None,
    public_key: str | None = None,
    chain_id: int | None = None,
    contract: str | None = None,
) -> VerifiedProvenance:
    """Parse, then check the Ed25519 signature against ``identity`` and, for secp256k1, the
    EIP-712 signature against ``signer`` and ``address`` against the public key; then every
    expectation given. Raises :class:`ProvenanceError`.

    This proves what the KMS asserted; whether ``signer`` is the one registered on chain
    *now* is for the chain to say (ProvenanceCheck.belongsTo)."""
    statement = data if isinstance(data, ProvenanceStatement) else parse_statement(data)
    check_identity(statement, identity)
    signer_checked = False
    if statement.key_type in ONCHAIN_TYPES:
        assert statement.signer is not None and statement.address is not None
        if recover_signer(statement).lower() != statement.signer.lower():
            raise ProvenanceError(
                "signer_signature_invalid",
                f"signer_signature: not made by the signer {statement.signer}",
            )
        if account_of(statement.public_key).lower() != statement.address.lower():
            raise ProvenanceError(
                "address_mismatch", "address: not the account of the statement's public key"
            )
        signer_checked = True
    expectations: list[tuple[str, object, object]] = [
        ("application", application, statement.application),
        ("name", name, statement.name),
        ("type", key_type, statement.key_type),
        ("public_key", public_key, statement.public_key),
        ("chain_id", chain_id, statement.chain_id),
        ("contract", contract.lower() if contract else None, statement.contract.lower()),
    ]
    for field, wanted, found in expectations:
        if wanted is not None and wanted != found:
            shown = "0x" + found.hex() if isinstance(found, bytes) else found
            raise ProvenanceError(
                "statement_mismatch", f"{field}: the statement is for {shown}"
            )
    return VerifiedProvenance(statement=statement, signer_checked=signer_checked)
