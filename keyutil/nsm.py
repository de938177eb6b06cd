"""Access to the Nitro Secure Module: the real ``/dev/nsm`` device, or the simulator.

    >>> from keyutil.nsm import open_nsm
    >>> nsm = open_nsm("simulator", sim_dir="/tmp/sim")         # doctest: +SKIP
    >>> document = nsm.attestation(nonce=b"n" * 32)              # doctest: +SKIP

The device speaks CBOR through one ioctl, ``_IOWR(0x0A, 0, struct nsm_message)`` where
``struct nsm_message { struct iovec request; struct iovec response; }`` (32 bytes on 64-bit,
so the request number is 0xC0200A00). The request is at most 4 KiB::

    {"Attestation": {"user_data": bstr/null, "nonce": bstr/null, "public_key": bstr/null}}

and the response, at most 12 KiB, is ``{"Attestation": {"document": bstr}}`` or
``{"Error": "<name>"}``. This module is pure Python (ctypes buffers and fcntl.ioctl): no
compiled extension, so it runs in any enclave image that has Python.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

import cbor2

NSM_DEVICE = "/dev/nsm"
NSM_IOCTL_MAGIC = 0x0A
NSM_MESSAGE_SIZE = 32  # two struct iovec of (pointer, size_t) on a 64-bit kernel
NSM_REQUEST_MAX = 4 * 1024
NSM_RESPONSE_MAX = 12 * 1024
NSM_FIELD_MAX = 1024  # user_data, nonce and public_key each


def _iowr(magic: int, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (magic << 8) | number


NSM_IOCTL_REQUEST = _iowr(NSM_IOCTL_MAGIC, 0, NSM_MESSAGE_SIZE)  # 0xC0200A00

NsmKind = Literal["device", "simulator", "auto"]
IoctlFn = Callable[[int, int, bytearray, bool], Any]


class NsmError(Exception):
    """The NSM cannot be used or refused the request. ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NSM(Protocol):
    """Anything that can produce an attestation document."""

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        """Raw COSE_Sign1 bytes of a fresh attestation document."""
        ...


def check_fields(user_data: bytes | None, nonce: bytes | None, public_key: bytes | None) -> None:
    for name, value in (("user_data", user_data), ("nonce", nonce), ("public_key", public_key)):
        if value is not None and len(value) > NSM_FIELD_MAX:
            raise NsmError(
                "nsm_field_too_large",
                f"{name}: the NSM accepts at most {NSM_FIELD_MAX} bytes; got {len(value)}",
            )


def encode_attestation_request(
    user_data: bytes | None, nonce: bytes | None, public_key: bytes | None
) -> bytes:
    check_fields(user_data, nonce, public_key)
    request = bytes(
        cbor2.dumps(
            {"Attestation": {"user_data": user_data, "nonce": nonce, "public_key": public_key}}
        )
    )
    if len(request) > NSM_REQUEST_MAX:  # pragma: no cover - three 1 KiB fields fit in 4 KiB
        raise NsmError("nsm_field_too_large", f"request of {len(request)} bytes exceeds 4 KiB")
    return request


def decode_attestation_response(response: bytes) -> bytes:
    """The document out of an NSM response, or :class:`NsmError` with the NSM's reason."""
    try:
        value: Any = cbor2.loads(response)
    except (cbor2.CBORDecodeError, ValueError) as e:
        raise NsmError("nsm_bad_response", f"the NSM answered with malformed CBOR: {e}") from None
    if isinstance(value, dict) and "Error" in value:
        raise NsmError("nsm_refused", f"the NSM refused the request: {value['Error']!s:.100}")
    if isinstance(value, dict) and isinstance(value.get("Attestation"), dict):
        document = value["Attestation"].get("document")
        if isinstance(document, bytes) and document:
            return document
    raise NsmError(
        "nsm_bad_response", "the NSM answered without an Attestation document in its response"
    )


class DeviceNSM:
    """The real NSM, through ``/dev/nsm``. Opened per request; nothing is held open.

    ``ioctl`` is the system call (``fcntl.ioctl``); tests pass a function that plays the
    kernel's side of the contract.
    """

    def __init__(self, path: str = NSM_DEVICE, *, ioctl: IoctlFn = fcntl.ioctl) -> None:
        self.path = path
        self._ioctl = ioctl

    def attestation(
        self,
        *,
        user_data: bytes | None = None,
        nonce: bytes | None = None,
        public_key: bytes | None = None,
    ) -> bytes:
        request = encode_attestation_request(user_data, nonce, public_key)
        return decode_attestation_response(self.exchange(request))

    def exchange(self, request: bytes) -> bytes:
        """One ioctl round trip: CBOR request in, CBOR response out."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NsmError(
                "nsm_unavailable",
                f"{self.path} does not exist: not inside a Nitro Enclave "
                "(use --nsm simulator for development)",
            ) from None
        except OSError as e:
            raise NsmError("nsm_unavailable", f"cannot open {self.path}: {e.strerror}") from None
        try:
            request_buf = ctypes.create_string_buffer(request, len(request))
            response_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX)
            message = bytearray(
                struct.pack(
                    "QQQQ",
                    ctypes.addressof(request_buf),
                    len(request),
                    ctypes.addressof(response_buf),
                    NSM_RESPONSE_MAX,
                )
            )
            try:
                self._ioctl(fd, NSM_IOCTL_REQUEST, message, True)
            except OSError as e:
                reason = (
                    "it is not an NSM device" if e.errno in (errno.ENOTTY, errno.EINVAL) else ""
                )
                raise NsmError(
                    "nsm_ioctl_failed",
                    f"NSM ioctl on {self.path} failed: {e.strerror}"
                    + (f" ({reason})" if reason else ""),
                ) from None
            response_len = struct.unpack("QQQQ", bytes(message))[3]
            if not 0 < response_len <= NSM_RESPONSE_MAX:
                raise NsmError(
                    "nsm_bad_response",
                    f"the NSM reported a response of {response_len} bytes "
                    f"(expected 1 to {NSM_RESPONSE_MAX})",
                )
            return response_buf.raw[:response_len]
        finally:
            os.close(fd)


def open_nsm(kind: NsmKind = "auto", *, sim_dir: str | os.PathLike[str] | None = None) -> NSM:
    """The NSM to use: ``device``, ``simulator`` (needs ``sim_dir``), or ``auto``.

    ``auto`` chooses the device when ``/dev/nsm`` exists, otherwise the simulator if a
    simulator directory was given, otherwise fails saying both.
    """
    if kind == "auto":
        if Path(NSM_DEVICE).exists():
            kind = "device"
        elif sim_dir is not None:
            kind = "simulator"
        else:
            raise NsmError(
                "nsm_unavailable",
                f"{NSM_DEVICE} does not exist and no simulator directory was given "
                "(--sim-dir or KEYUTIL_SIM_DIR)",
            )
    if kind == "device":
        return DeviceNSM()
    if kind == "simulator":
        if sim_dir is None:
            raise NsmError(
                "nsm_unavailable", "the NSM simulator needs --sim-dir (or KEYUTIL_SIM_DIR)"
            )
        from keyutil.simulator import SimulatedNSM  # only development images need it

        return SimulatedNSM.load(Path(sim_dir))
    raise NsmError("nsm_unavailable", f"unknown NSM kind {kind!r}")
