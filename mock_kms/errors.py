"""Errors of the KMS, in two families under one base.

``InvalidError``: the input or the request is wrong, or policy denies it. Never retried;
HTTP 4xx. ``UnavailableError``: something the KMS depends on (the chain, its state) cannot be
reached right now. Retried by clients until their deadline; HTTP 503.

Every error carries a stable machine-readable ``code`` (an :class:`ErrorCode`) and a human
sentence that says what was expected and what was found. Messages never contain secrets.

    >>> from mock_kms.errors import InvalidError, ErrorCode
    >>> err = InvalidError(ErrorCode.DEBUG_ENCLAVE, "debug-mode enclave refused")
    >>> err.to_json()
    {'error': 'debug_enclave', 'message': 'debug-mode enclave refused'}
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """The catalogue of stable error codes. Values never change once released."""

    # Input framing and CBOR
    INPUT_TOO_LARGE = "input_too_large"
    INPUT_ENCODING = "input_encoding"
    CBOR_MALFORMED = "cbor_malformed"
    CBOR_DUPLICATE_KEY = "cbor_duplicate_key"
    CBOR_TRAILING_BYTES = "cbor_trailing_bytes"
    # COSE_Sign1 envelope
    COSE_STRUCTURE = "cose_structure"
    COSE_ALGORITHM = "cose_algorithm"
    COSE_UNPROTECTED_HEADER = "cose_unprotected_header"
    COSE_SIGNATURE_LENGTH = "cose_signature_length"
    # Attestation payload fields
    FIELD_MISSING = "field_missing"
    FIELD_UNKNOWN = "field_unknown"
    FIELD_TYPE = "field_type"
    FIELD_TOO_LARGE = "field_too_large"
    DIGEST_UNKNOWN = "digest_unknown"
    PCR_INVALID = "pcr_invalid"
    CABUNDLE_LENGTH = "cabundle_length"
    # Cryptographic verification
    CERTIFICATE_MALFORMED = "certificate_malformed"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    CHAIN_UNTRUSTED = "chain_untrusted"
    CHAIN_INVALID = "chain_invalid"
    SIGNATURE_INVALID = "signature_invalid"
    # Policy on a verified document
    DOCUMENT_TOO_OLD = "document_too_old"
    DOCUMENT_FROM_FUTURE = "document_from_future"
    DEBUG_ENCLAVE = "debug_enclave"
    # Trust roots and configuration
    TRUST_ROOT_INVALID = "trust_root_invalid"
    # Allowlist (on-chain)
    IMAGE_NOT_ALLOWED = "image_not_allowed"
    HASH_INVALID = "hash_invalid"
    CHAIN_UNAVAILABLE = "chain_unavailable"
    CHAIN_MISCONFIGURED = "chain_misconfigured"
    APPLICATION_INVALID = "application_invalid"
    ADDRESS_INVALID = "address_invalid"
    MEASUREMENTS_INVALID = "measurements_invalid"
    # Governance transactions (kms-gov)
    NOT_OWNER = "not_owner"
    TRANSACTION_REVERTED = "transaction_reverted"
    SIGNING_KEY_UNAVAILABLE = "signing_key_unavailable"
    # Key-release protocol (mock-kms serve)
    BAD_REQUEST = "bad_request"
    BODY_TOO_LARGE = "body_too_large"
    NOT_FOUND = "not_found"
    NONCE_MISSING = "nonce_missing"
    NONCE_INVALID = "nonce_invalid"
    NONCE_EXPIRED = "nonce_expired"
    NONCE_REPLAYED = "nonce_replayed"
    BINDING_MISMATCH = "binding_mismatch"
    PUBLIC_KEY_INVALID = "public_key_invalid"
    STATE_INVALID = "state_invalid"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    OVERLOADED = "overloaded"
    # provenance statements (issue 12)
    SIGNER_UNAVAILABLE = "signer_unavailable"
    REPLAY_STORE_UNAVAILABLE = "replay_store_unavailable"


class KmsError(Exception):
    """Base of every error the KMS raises on purpose."""

    http_status = 400

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"error": str(self.code), "message": self.message}


class InvalidError(KmsError):
    """Bad input or a policy denial: final, never retried (HTTP 4xx)."""

    http_status = 403


class AttestationError(InvalidError):
    """The attestation document is malformed, unverifiable, or refused by policy."""

    http_status = 403


class UnavailableError(KmsError):
    """A dependency is unreachable: retry until the deadline (HTTP 503)."""

    http_status = 503
