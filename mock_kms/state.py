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

import contextlib
import fcntl
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Literal

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

DEBUG_DOMAIN_TAG = b"debug\x00"

logger = logging.getLogger(__name__)

Domain = Literal["production", "debug"]


class StateError(UnavailableError):
    """The state directory cannot be read or created: the KMS cannot serve."""


def _problem(info: os.stat_result, *, is_dir: bool) -> str | None:
    """What makes a state directory or file untrustworthy (None when nothing does)."""
    if info.st_uid != os.geteuid():
        return f"is owned by uid {info.st_uid}, not by this KMS's uid {os.geteuid()}"
    mode = stat.S_IMODE(info.st_mode)
    if is_dir and mode & 0o022:
        return f"is writable by group or others (mode {mode:o}); expected 0700"
    if not is_dir and mode & 0o077:
        return f"is readable or writable by group or others (mode {mode:o}); expected 0600"
    return None


def _refuse(path: Path, problem: str) -> StateError:
    return StateError(ErrorCode.STATE_INVALID, f"{path} {problem}")


def _open_directory(directory: Path) -> tuple[int, bool]:
    """The state directory opened without following a symlink (created 0700 if missing),
    and whether it was created; StateError if it is not ours or is writable by others."""
    created = False
    if not os.path.lexists(directory):
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)
            created = True
    if os.path.islink(directory):
        raise _refuse(directory, "is a symbolic link; give the real directory")
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    problem = _problem(os.fstat(fd), is_dir=True)
    if problem:
        os.close(fd)
        raise _refuse(directory, problem)
    return fd, created


def _write_secret_at(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    finally:
        os.unlink(tmp, dir_fd=dir_fd)


def _read_private_at(dir_fd: int, directory: Path, name: str) -> bytes:
    path = directory / name
    if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        raise _refuse(path, "is a symbolic link; the state files must be regular files")
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, "is not a regular file")
        problem = _problem(info, is_dir=False)
        if problem:
            raise _refuse(path, problem)
        return f.read(64 * 1024)


def _write_secret(path: Path, data: bytes) -> None:
    """``data`` to the new file ``path`` (0600, never through a symlink); the existing file
    if another process made it first. For secrets kept beside the state (signer keys)."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _write_secret_at(dir_fd, path.name, data)
    finally:
        os.close(dir_fd)


def _read_private(path: Path) -> bytes:
    """A secret file read with the state files' checks (no symlink, ours, 0600)."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return _read_private_at(dir_fd, path.parent, path.name)
    finally:
        os.close(dir_fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


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
        """The state in ``directory``, created (both files) if the directory holds neither.

        Refused (StateError ``state_invalid``, naming the path and the problem): a directory
        or file reached through a symlink, not owned by this process's uid, a directory
        writable by group or others, a file readable or writable by them, and a directory
        holding one of the two files only (a new root secret beside an old identity would
        silently change every key). An flock on the directory serializes concurrent starts.
        """
        try:
            dir_fd, _ = _open_directory(directory)
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
                present = {n for n in (ROOT_SECRET_FILE, IDENTITY_FILE) if _exists(dir_fd, n)}
                if len(present) == 1:
                    (missing,) = {ROOT_SECRET_FILE, IDENTITY_FILE} - present
                    raise _refuse(
                        directory / missing,
                        f"is missing while {present.pop()} is there; restore it from a backup "
                        "(a new one would change every key or the identity)",
                    )
                created = not present
                if created:
                    _write_secret_at(
                        dir_fd, ROOT_SECRET_FILE, secrets.token_bytes(ROOT_SECRET_LENGTH)
                    )
                    key = ed25519.Ed25519PrivateKey.generate()
                    _write_secret_at(
                        dir_fd,
                        IDENTITY_FILE,
                        key.private_bytes(
                            serialization.Encoding.PEM,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption(),
                        ),
                    )
                root_secret = _read_private_at(dir_fd, directory, ROOT_SECRET_FILE)
                identity = serialization.load_pem_private_key(
                    _read_private_at(dir_fd, directory, IDENTITY_FILE), password=None
                )
            finally:
                os.close(dir_fd)
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
        state = cls(root_secret, identity)
        if created:
            logger.info(
                "created a new KMS state in %s, identity %s", directory, state.identity_text
            )
        return state

    def _hkdf(self, info: bytes, length: int) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(), length=length, salt=KEY_DERIVATION_SALT, info=info
        ).derive(self._root_secret)

    def derive_key(
        self, application: bytes, key: KeyRequest, *, domain: Domain = "production"
    ) -> bytes:
        """The key ``key.name`` of type ``key.type`` of ``application``: same inputs, same
        key, on any replica.

        raw: HKDF info ``"key" 0x00 || app || len(name) (2) || name || length (2)``, the
        derivation from before key types. Every other type: ``"typed-key" 0x00 || len(label)
        (1) || label || app || len(name) (2) || name || counter (1)``, 32 bytes, with the
        counter counting up from 0 until the type accepts the seed (a scalar must be below
        its group order): a type's keys share no material with another type's or with raw.

        ``domain="debug"`` (keys for debug-mode enclaves, ``serve --allow-debug``) puts
        ``"debug" 0x00`` before the info of every type, raw included, so a debug enclave never
        gets a key that a production enclave of the same application gets.
        """
        tag = DEBUG_DOMAIN_TAG if domain == "debug" else b""
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
            return self._hkdf(tag + info, key.length)
        prefix = (
            b"typed-key\x00"
            + len(kind.label).to_bytes(1, "big")
            + kind.label
            + application
            + len(name).to_bytes(2, "big")
            + name
        )
        for counter in range(256):
            seed = self._hkdf(tag + prefix + counter.to_bytes(1, "big"), kind.seed_length)
            if kind.accepts(seed):
                return seed
        raise ValueError(f"key type {kind.name}: no acceptable seed in 256 derivations")

    def public_key(self, application: bytes, key: KeyRequest) -> str | None:
        """The public half of a typed key (``age1...``), from the same derivation; None for
        a type without one (raw). Needs no attestation: it is public."""
        return keytypes.get(key.type).public(self.derive_key(application, key))
