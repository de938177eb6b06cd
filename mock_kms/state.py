"""The KMS's secrets on disk: the root secret and the identity key, in one state directory.

    >>> from pathlib import Path
    >>> from mock_kms.state import KmsState
    >>> state = KmsState.load_or_create(Path("/tmp/kms-state"))   # doctest: +SKIP
    >>> state.identity_text                                          # doctest: +SKIP
    'ed25519:...'

Layout (the directory is created 0700, the files 0600, on first start, and reused after)::

    STATE_DIR/root-secret        32 random bytes: every released key derives from it
    STATE_DIR/identity.pem       the Ed25519 key that signs every answer (PKCS#8)

Keeping both across restarts is what makes a restarted KMS release the same keys and keep the
identity that enclave images pin. Losing ``root-secret`` loses every key derived from it.

Keys are derived, never stored: HKDF-SHA256 over the root secret, with the application id
(from the chain), the key's name and its length as context. Every approved image of one
application gets the same keys; different applications never share one.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyutil import keytypes
from keyutil.protocol import KeyRequest, format_identity
from mock_kms.errors import ErrorCode, UnavailableError

ROOT_SECRET_FILE = "root-secret"  # noqa: S105 - a file name, not a secret
IDENTITY_FILE = "identity.pem"
ROOT_SECRET_LENGTH = 32

KEY_DERIVATION_SALT = b"nitro-keyrelease/v1/key"
NONCE_KEY_INFO = b"nitro-keyrelease/v1/nonce-mac"


class StateError(UnavailableError):
    """The state directory cannot be read or created: the KMS cannot serve."""


def _write_secret(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    # link() fails if another process created the file first: both then use that one.
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


def _read_private(path: Path) -> bytes:
    info = path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise StateError(
            ErrorCode.STATE_INVALID,
            f"{path} is readable by group or others (mode {stat.S_IMODE(info.st_mode):o}); "
            "expected 0600",
        )
    return path.read_bytes()


class KmsState:
    """The root secret and the identity key. Holds secrets: never logged, never printed."""

    def __init__(self, root_secret: bytes, identity: ed25519.Ed25519PrivateKey) -> None:
        if len(root_secret) != ROOT_SECRET_LENGTH:
            raise ValueError("the root secret is 32 bytes")
        self._root_secret = root_secret
        self.identity = identity
        self.identity_text = format_identity(identity.public_key())
        self.nonce_key = self._hkdf(NONCE_KEY_INFO, 32)

    def __repr__(self) -> str:
        return f"KmsState(identity={self.identity_text!r})"

    @classmethod
    def load_or_create(cls, directory: Path) -> KmsState:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            secret_path = directory / ROOT_SECRET_FILE
            identity_path = directory / IDENTITY_FILE
            if not secret_path.exists():
                _write_secret(secret_path, secrets.token_bytes(ROOT_SECRET_LENGTH))
            if not identity_path.exists():
                key = ed25519.Ed25519PrivateKey.generate()
                _write_secret(
                    identity_path,
                    key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                )
            root_secret = _read_private(secret_path)
            identity = serialization.load_pem_private_key(
                _read_private(identity_path), password=None
            )
        except OSError as e:
            raise StateError(
                ErrorCode.STATE_INVALID, f"state directory {directory}: {e.strerror}"
            ) from None
        except ValueError:
            raise StateError(
                ErrorCode.STATE_INVALID, f"state directory {directory}: the identity key is damaged"
            ) from None
        if not isinstance(identity, ed25519.Ed25519PrivateKey):
            raise StateError(
                ErrorCode.STATE_INVALID, f"{directory}/{IDENTITY_FILE}: expected an Ed25519 key"
            )
        if len(root_secret) != ROOT_SECRET_LENGTH:
            raise StateError(
                ErrorCode.STATE_INVALID,
                f"{directory}/{ROOT_SECRET_FILE}: expected {ROOT_SECRET_LENGTH} bytes; "
                f"found {len(root_secret)}",
            )
        return cls(root_secret, identity)

    def _hkdf(self, info: bytes, length: int) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=length, salt=KEY_DERIVATION_SALT, info=info
        ).derive(self._root_secret)

    def derive_key(self, application: bytes, key: KeyRequest) -> bytes:
        """The key ``key.name`` of type ``key.type`` of ``application``: same inputs, same
        key, on any replica.

        raw: HKDF info ``"key" 0x00 || app || len(name) (2) || name || length (2)``, the
        derivation from before key types. Every other type: ``"typed-key" 0x00 || len(label)
        (1) || label || app || len(name) (2) || name || counter (1)``, 32 bytes, with the
        counter counting up from 0 until the type accepts the seed (a scalar must be below
        its group order): a type's keys share no material with another type's or with raw.
        """
        if len(application) != 32:
            raise ValueError("an application id is 32 bytes")
        name = key.name.encode()
        kind = keytypes.get(key.type)
        if kind.seed_length is None:
            info = (
                b"key\x00"
                + application
                + len(name).to_bytes(2, "big")
                + name
                + key.length.to_bytes(2, "big")
            )
            return self._hkdf(info, key.length)
        prefix = (
            b"typed-key\x00"
            + len(kind.label).to_bytes(1, "big")
            + kind.label
            + application
            + len(name).to_bytes(2, "big")
            + name
        )
        for counter in range(256):
            seed = self._hkdf(prefix + counter.to_bytes(1, "big"), kind.seed_length)
            if kind.accepts(seed):
                return seed
        raise ValueError(f"key type {kind.name}: no acceptable seed in 256 derivations")

    def public_key(self, application: bytes, key: KeyRequest) -> str | None:
        """The public half of a typed key (``age1...``), from the same derivation; None for
        a type without one (raw). Needs no attestation: it is public."""
        return keytypes.get(key.type).public(self.derive_key(application, key))
