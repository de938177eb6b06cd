"""An application's public key (its age recipient), as the KMS signs it.

    >>> from cryptography.hazmat.primitives.asymmetric import ed25519
    >>> from keyutil.protocol import parse_application
    >>> from keyutil.sealing.recipient import sign_statement, verify_statement
    >>> kms = ed25519.Ed25519PrivateKey.generate()
    >>> app = parse_application("my-app")
    >>> body = {"application": "0x" + app.hex(), "name": "weights", "type": "age",
    ...         "recipient": "age1..."}
    >>> statement = sign_statement(kms, body)
    >>> verify_statement(kms.public_key(), statement, application=app, name="weights",
    ...                  key_type="age")["recipient"]
    'age1...'

Sealing needs no attestation: anyone may seal to an application. But the recipient comes
from the KMS through hosts that may swap it for their own, so the KMS signs
``"nitro-keyrelease/v1/recipient" || 0x00 || canonical_json({"version", "application",
"name", "type", "recipient"})`` with its identity key (the one enclaves pin), a context of
its own so that no release answer or other statement can pass for it. ``keyutil recipient``
checks the signature and that the statement names the application, key and type it asked
for before printing the recipient. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from keyutil.protocol import PROTOCOL_VERSION, ProtocolError, b64d, b64e, canonical_json

RECIPIENT_CONTEXT = b"nitro-keyrelease/v1/recipient"
STATEMENT_FIELDS = ("version", "application", "name", "type", "recipient")


def statement_signing_bytes(body: Mapping[str, Any]) -> bytes:
    return RECIPIENT_CONTEXT + b"\x00" + canonical_json(
        {k: body.get(k) for k in STATEMENT_FIELDS}
    )


def sign_statement(identity: ed25519.Ed25519PrivateKey, body: Mapping[str, Any]) -> dict[str, Any]:
    """The statement: ``body`` (application, name, type, recipient), the version, and the
    identity's signature."""
    full = {"version": PROTOCOL_VERSION, **{k: body[k] for k in STATEMENT_FIELDS[1:]}}
    return {**full, "signature": b64e(identity.sign(statement_signing_bytes(full)))}


def verify_statement(
    identity: ed25519.Ed25519PublicKey,
    statement: Any,
    *,
    application: bytes,
    name: str,
    key_type: str,
) -> dict[str, Any]:
    """The statement if the pinned identity signed it and it is about this application, key
    and type; ProtocolError (``recipient_unauthenticated`` / ``recipient_mismatch``) if not."""
    if not isinstance(statement, Mapping):
        raise ProtocolError("recipient_unauthenticated", "expected a JSON object")
    try:
        signature = b64d(statement.get("signature"), "signature", max_len=200)
        identity.verify(signature, statement_signing_bytes(statement))
    except (ProtocolError, InvalidSignature):
        raise ProtocolError(
            "recipient_unauthenticated",
            "the recipient statement is not signed by the pinned KMS identity",
        ) from None
    expected = {
        "version": PROTOCOL_VERSION,
        "application": "0x" + application.hex(),
        "name": name,
        "type": key_type,
    }
    for field, value in expected.items():
        if statement.get(field) != value:
            raise ProtocolError(
                "recipient_mismatch",
                f"the signed statement is for another {field} than the one asked for",
            )
    if not isinstance(statement.get("recipient"), str):
        raise ProtocolError("recipient_mismatch", "the statement has no recipient text")
    return {k: statement[k] for k in STATEMENT_FIELDS}
