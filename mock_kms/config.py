"""Every limit of the KMS as a named constant, in one frozen value.

    >>> from mock_kms.config import LIMITS
    >>> LIMITS.max_optional_field
    1024
"""

from __future__ import annotations

import dataclasses
import datetime


@dataclasses.dataclass(frozen=True)
class Limits:
    # Attestation documents. The NSM answers with at most 12 KiB, so a document is smaller.
    max_document_size: int = 16 * 1024
    # module_id is "i-<17 hex>-enc<16 hex>" in practice; leave room, not megabytes.
    max_module_id: int = 256
    # public_key, user_data and nonce: the NSM accepts 1024 bytes each (not 512).
    max_optional_field: int = 1024
    # One DER certificate. Real Nitro certificates are 500 to 700 bytes.
    max_certificate_size: int = 4096
    # cabundle is [root, regional, zonal, instance] on real documents; room for two more.
    max_cabundle_length: int = 6
    # The NSM has 32 PCRs; documents carry 16.
    max_pcr_count: int = 32
    max_pcr_index: int = 31
    # CBOR nesting needed by the format is 3 (array > map > map); allow a little more.
    max_cbor_depth: int = 8
    # A document older than this (against the verification time) is refused.
    max_document_age: datetime.timedelta = datetime.timedelta(minutes=5)
    # How far in the future a document timestamp may be (clocks drift).
    clock_skew: datetime.timedelta = datetime.timedelta(seconds=60)
    # Verified intermediate chains kept in memory.
    chain_cache_size: int = 64
    # JSON request bodies: arrays and objects nested at most this deep (a release request
    # needs 3). json's C parser recurses once per level, and web3's dependencies raise
    # Python's recursion limit to 100000, so depth must be bounded before parsing.
    max_json_depth: int = 32
    # One audit log line, in bytes: every echoed value is cut to 64 characters, and a line
    # that would still be longer loses its message, then everything but the decision.
    max_audit_line: int = 4096


LIMITS = Limits()
