"""Sealed data: files encrypted with age (age-encryption.org/v1) to an application's recipient.

    $ age -r "$(keyutil recipient --kms URL --kms-pubkey PIN --app my-app --key weights)" \\
          -o weights.age weights.bin                                   # on the build host
    $ keyutil get-key --key weights --type age --unseal weights.age --unseal-to /run/weights.bin

Modules, by who uses them:

- :mod:`keyutil.sealing.age` the age v1 format: header parsing, the X25519 recipient stanza,
  the STREAM payload; sealing and opening over byte streams, no file system (both sides);
- :mod:`keyutil.sealing.recipient` the KMS-signed statement of an application's recipient
  (the KMS signs it, ``keyutil recipient`` checks it);
- :mod:`keyutil.sealing.streams` where sealed input comes from (a file, stdin, an ``https://``
  URL through the enclave's egress proxy) and where plaintext goes (a file published only
  once the whole input is authenticated, or stdout);
- :mod:`keyutil.sealing.dotenv` a sealed dotenv file opened into an environment, in memory.

See docs/sealing.md and docs/adr/0008-age-sealing.md.
"""

from __future__ import annotations


def parse_sha256(text: str) -> bytes:
    """The 32 bytes of a SHA-256 written as 64 hex digits (``sha256sum``'s output, an
    optional ``0x``); ValueError otherwise."""
    value = text.strip().lower().removeprefix("0x")
    try:
        digest = bytes.fromhex(value)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError("expected a SHA-256 as 64 hex digits (sha256sum's output)")
    return digest
