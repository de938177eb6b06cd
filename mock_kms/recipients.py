"""Public halves of typed keys, signed: what ``GET /v1/recipient`` and ``mock-kms recipient``
answer. No attestation, no chain: a public key is public, and an application must be able to
receive sealed data before its first image is registered.

    >>> from mock_kms.recipients import recipient_statement                 # doctest: +SKIP
    >>> recipient_statement(state, app="my-app", name="weights")["recipient"]  # doctest: +SKIP
    'age1...'
"""

from __future__ import annotations

from typing import Any

from keyutil import keytypes
from keyutil.protocol import KeyRequest, ProtocolError, parse_application
from keyutil.sealing.recipient import sign_statement
from mock_kms.errors import ErrorCode, InvalidError
from mock_kms.state import KmsState


def recipient_statement(
    state: KmsState, *, app: str, name: str, key_type: str = "age"
) -> dict[str, Any]:
    """The signed statement of the public half of key ``name`` of ``key_type`` of ``app``
    (a name or 0x + 64 hex digits, as ``--allow-image HASH=APP`` takes it)."""
    try:
        application = parse_application(app)
    except ValueError as e:
        raise InvalidError(ErrorCode.APPLICATION_INVALID, f"app: {e}") from None
    try:
        kind = keytypes.get(key_type)
        if kind.seed_length is None:
            raise ProtocolError("bad_request", f"key type {kind.name} has no public half")
        key = KeyRequest(name, kind.seed_length, kind.name)
        public = state.public_key(application, key)
        if public is None:
            raise ProtocolError("bad_request", f"key type {kind.name} has no public half")
    except (keytypes.UnknownKeyType, ProtocolError) as e:
        raise InvalidError(ErrorCode.BAD_REQUEST, getattr(e, "message", str(e))) from None
    return sign_statement(
        state.identity,
        {
            "application": "0x" + application.hex(),
            "name": name,
            "type": kind.name,
            "recipient": public,
        },
    )
