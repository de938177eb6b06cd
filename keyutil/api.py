"""The Python API: ``keyutil get-key`` for a program that wants its keys in memory.

    >>> import keyutil
    >>> keys = keyutil.get_key(                                        # doctest: +SKIP
    ...     "vsock://3:8000",
    ...     kms_pubkey="@/etc/keyutil/kms.pub",
    ...     keys=["disk", "weights"],
    ...     lengths=[64, 32],
    ... )
    >>> len(keys["disk"])                                             # doctest: +SKIP
    64

The same checks as the command line, in the same order: the pinned KMS identity is required
(or ``insecure_skip_kms_auth=True``, never both), the key list and lengths are checked before
anything is sent, and the answer must be signed by that identity and be for this very
request. Nothing is written anywhere: the keys are returned as ``bytearray`` values, which
the caller may zero (``value[:] = bytes(len(value))``) when done.

Errors (each has a stable ``code`` and a ``message`` with no secret in it):

==========================================  ==================================  ===========
exception                                   when                                CLI exit
==========================================  ==================================  ===========
``ValueError``                              bad arguments (a usage error)       2
:class:`keyutil.client.KmsUnavailable`      the KMS unreachable by the deadline 3
:class:`keyutil.client.KmsDenied`           the KMS refused (its code)          4
:class:`keyutil.nsm.NsmError`               the NSM failed                      5
:class:`keyutil.client.AnswerRejected`      the answer failed authentication    6
==========================================  ==================================  ===========
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from keyutil.client import DEFAULT_KEY_LENGTH, DEFAULT_KEY_NAME, Log, _no_log
from keyutil.nsm import NsmKind

__all__ = ["get_key", "pinned_identity"]

Suite = Literal["x25519", "p384"]


def pinned_identity(kms_pubkey: str | None, insecure_skip_kms_auth: bool) -> str | None:
    """The KMS identity text (``ed25519:...``, or read from ``@FILE``); ValueError when it is
    missing without ``insecure_skip_kms_auth``, or given with it."""
    identity = kms_pubkey
    if kms_pubkey is not None and kms_pubkey.startswith("@"):
        try:
            identity = Path(kms_pubkey[1:]).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not text"
            raise ValueError(f"--kms-pubkey: cannot read {kms_pubkey[1:]}: {reason}") from None
    if identity is None and not insecure_skip_kms_auth:
        raise ValueError(
            "--kms-pubkey (or KEYUTIL_KMS_PUBKEY) is required: without it a host could feed "
            "this enclave a key of its choosing (--insecure-skip-kms-auth to skip, unsafely)"
        )
    if identity is not None and insecure_skip_kms_auth:
        raise ValueError("give --kms-pubkey or --insecure-skip-kms-auth, not both")
    return identity


def get_key(
    kms: str,
    *,
    kms_pubkey: str | None = None,
    keys: Sequence[str] = (DEFAULT_KEY_NAME,),
    lengths: Sequence[int] = (DEFAULT_KEY_LENGTH,),
    types: Sequence[str] = ("raw",),
    suite: Suite = "x25519",
    deadline: float = 60.0,
    nsm: NsmKind = "auto",
    sim_dir: str | Path | None = None,
    kms_ca: str | None = None,
    insecure_skip_kms_auth: bool = False,
    expect_app: str | None = None,
    log: Log = _no_log,
) -> dict[str, bytearray]:
    """Release ``keys`` from the KMS at ``kms`` to this attested enclave; name -> key bytes.

    ``kms`` is a URL as ``--kms`` takes it (``vsock://3:8000``, ``http://127.0.0.1:8420``,
    ``https://kms.example.com``, ``unix:///run/kms.sock``); ``kms_pubkey`` the pinned
    identity, ``ed25519:BASE64`` or ``@FILE``; ``lengths`` and ``types`` (``raw``, ``age``,
    ``ed25519``, ``secp256k1``: what ``--type`` takes) one for all keys or one per key;
    ``deadline`` the seconds the whole release may take, retries included; ``nsm`` and
    ``sim_dir`` where attestation documents come from; ``expect_app`` (a name or ``0x`` and 64
    hex digits, as ``--expect-app``) refuses keys released for any other application
    (:class:`keyutil.client.AnswerRejected`, code ``answer_application_mismatch``);
    ``log(level, event, fields)``
    receives the same events as ``keyutil get-key``'s log (never key material).
    """
    from keyutil.client import ReleaseRequest, release_keys
    from keyutil.nsm import open_nsm
    from keyutil.protocol import SUITE_P384, SUITE_X25519, ProtocolError
    from keyutil.transport import HttpTransport

    started = time.monotonic()
    if not deadline > 0:
        raise ValueError(f"deadline: expected a positive number of seconds; found {deadline!r}")
    suites = {"x25519": SUITE_X25519, "p384": SUITE_P384}
    if suite not in suites:
        raise ValueError(f"suite: expected x25519 or p384; found {str(suite)[:20]!r}")
    identity = pinned_identity(kms_pubkey, insecure_skip_kms_auth)
    try:
        request = ReleaseRequest.build(
            keys, lengths=tuple(lengths), types=tuple(types), suite=suites[suite],
            identity=identity, expect_app=expect_app,
        )
    except ProtocolError as e:
        raise ValueError(e.message) from None
    try:
        transport = HttpTransport.from_url(kms, ca_file=kms_ca)  # ValueError for a bad URL
    except ssl.SSLError as e:
        raise ValueError(f"--kms-ca: cannot load CA file: {e.reason}") from None
    release = release_keys(
        transport,
        open_nsm(nsm, sim_dir=Path(sim_dir) if sim_dir is not None else None),
        request,
        deadline_s=deadline - (time.monotonic() - started),
        log=log,
    )
    return {key.name: key.value for key in release.keys}
