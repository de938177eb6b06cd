"""A working loopback inside the enclave: interface ``lo`` up, with 127.0.0.1/8 assigned.

    >>> from keyutil.netup import loopback_up
    >>> report = loopback_up()                                    # doctest: +SKIP
    >>> report.to_json()                                          # doctest: +SKIP
    {'interface': 'lo', 'address': '127.0.0.1/8', 'was_up': False, 'now_up': True,
     'address_added': True}

A Nitro Enclave boots with its loopback interface down and without 127.0.0.1, so anything in
the enclave that talks to itself over TCP (an application and its sidecar, a local proxy)
fails until someone sets it up. Bringing the link up alone is not enough where the kernel
does not add the address by itself, so both are done here, explicitly, in this order:

1. read the interface flags (``SIOCGIFFLAGS``) and its IPv4 address (``SIOCGIFADDR``);
2. if ``lo`` has no IPv4 address, assign 127.0.0.1 (``SIOCSIFADDR``) and the /8 netmask
   (``SIOCSIFNETMASK``); if it has 127.0.0.1 already, leave it; if it has another address,
   stop with ``address_conflict`` rather than replace an address someone else set;
3. if the link is down, set ``IFF_UP`` (``SIOCSIFFLAGS``);
4. read the flags back, then connect a TCP client to a listener on 127.0.0.1: unless the
   link is up and that works, fail with ``verify_failed``.

Everything goes through ioctls on one AF_INET datagram socket, with ``struct ifreq``, so no
``ip`` or ``ifconfig`` binary is needed in the image. A second run finds everything in place
and changes nothing (and so needs no privilege). Changing an interface needs the
CAP_NET_ADMIN capability in the network namespace: without it the kernel answers EPERM,
reported as ``permission_denied`` naming the capability.

The ioctl, the socket and the final probe are passed in (:func:`loopback_up`), so the error
mapping is tested with a simulated kernel; the real ones are ``fcntl.ioctl``,
``socket.socket`` and :func:`tcp_probe`.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Callable
from typing import Any

IoctlFn = Callable[[int, int, bytes], bytes]
"""``ioctl(fd, request, ifreq) -> ifreq``, as ``fcntl.ioctl`` does with a bytes argument."""

SocketFactory = Callable[[], socket.socket]

LOOPBACK_INTERFACE = "lo"
LOOPBACK_ADDRESS = "127.0.0.1"
LOOPBACK_PREFIX = 8

# <linux/sockios.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
# <net/if.h>
IFF_UP = 0x1
IFNAMSIZ = 16
# struct ifreq: the name, then a 24-byte union (struct sockaddr, short flags, ...) on 64-bit.
IFREQ_SIZE = 40
_IFREQ_FLAGS = struct.Struct(f"={IFNAMSIZ}sH{IFREQ_SIZE - IFNAMSIZ - 2}x")
# struct sockaddr_in inside the union: family (host order), port, address, zero padding.
_IFREQ_INET = struct.Struct(f"={IFNAMSIZ}sH2s4s{IFREQ_SIZE - IFNAMSIZ - 8}x")

_OPERATIONS = {
    SIOCGIFFLAGS: "SIOCGIFFLAGS (read the interface flags)",
    SIOCSIFFLAGS: "SIOCSIFFLAGS (bring the link up)",
    SIOCGIFADDR: "SIOCGIFADDR (read the address)",
    SIOCSIFADDR: "SIOCSIFADDR (assign the address)",
    SIOCSIFNETMASK: "SIOCSIFNETMASK (set the netmask)",
}


class NetUpError(Exception):
    """The loopback could not be set up. ``code`` is stable; ``message`` is one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class NetUpReport:
    """What :func:`loopback_up` found and did."""

    interface: str
    address: str  # "127.0.0.1/8"
    was_up: bool
    now_up: bool
    address_added: bool

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, f"errno {number}")


def map_ioctl_error(request: int, interface: str, error: OSError) -> NetUpError:
    """The stable error for an ioctl that failed; the message names what was missing."""
    operation = _OPERATIONS.get(request, f"ioctl {request:#x}")
    name = _errno_name(error.errno)
    if error.errno in (errno.EPERM, errno.EACCES):
        return NetUpError(
            "permission_denied",
            f"setting up {interface} needs the CAP_NET_ADMIN capability, which this process "
            f"lacks ({operation}: {name}); run it as root inside the enclave",
        )
    if error.errno in (errno.ENODEV, errno.ENXIO):
        return NetUpError(
            "no_such_interface", f"there is no network interface named {interface!r} ({name})"
        )
    reason = error.strerror or "failed"
    return NetUpError("ioctl_failed", f"{operation} on {interface}: {name}: {reason}")


class _Interface:
    """The ioctls on one interface, with their errors translated."""

    def __init__(self, fd: int, ioctl: IoctlFn, name: str) -> None:
        self.fd, self.ioctl, self.name = fd, ioctl, name
        self.encoded = name.encode()

    def _call(self, request: int, ifreq: bytes, *, tolerate: int = 0) -> bytes | None:
        """The kernel's answer; None if it failed with errno ``tolerate``."""
        try:
            answer = self.ioctl(self.fd, request, ifreq)
        except OSError as e:
            if tolerate and e.errno == tolerate:
                return None
            raise map_ioctl_error(request, self.name, e) from None
        if len(answer) < IFREQ_SIZE:
            raise NetUpError(
                "ioctl_failed",
                f"{_OPERATIONS[request]} on {self.name}: expected a {IFREQ_SIZE}-byte ifreq "
                f"back; found {len(answer)} bytes",
            )
        return answer

    def flags(self) -> int:
        answer = self._call(SIOCGIFFLAGS, _IFREQ_FLAGS.pack(self.encoded, 0))
        assert answer is not None
        return int(_IFREQ_FLAGS.unpack_from(answer)[1])

    def set_flags(self, flags: int) -> None:
        self._call(SIOCSIFFLAGS, _IFREQ_FLAGS.pack(self.encoded, flags & 0xFFFF))

    def _inet(self, address: str) -> bytes:
        return _IFREQ_INET.pack(self.encoded, socket.AF_INET, b"\0\0", socket.inet_aton(address))

    def address(self, hint: str) -> str | None:
        """The IPv4 address labelled with this name; ``hint`` first if it is there.

        With an AF_INET address in the request, Linux looks for that very address among the
        interface's addresses before falling back to the first one; None when it has none.
        """
        answer = self._call(SIOCGIFADDR, self._inet(hint), tolerate=errno.EADDRNOTAVAIL)
        return None if answer is None else socket.inet_ntoa(_IFREQ_INET.unpack_from(answer)[3])

    def set_address(self, address: str) -> bool:
        """Assign ``address``; False when the kernel says it is there already (EEXIST)."""
        return self._call(SIOCSIFADDR, self._inet(address), tolerate=errno.EEXIST) is not None

    def set_netmask(self, prefix: int) -> None:
        mask = str(ipaddress.IPv4Network(f"0.0.0.0/{prefix}").netmask)
        self._call(SIOCSIFNETMASK, self._inet(mask))


def tcp_probe(address: str, timeout: float = 2.0) -> None:
    """Listen on ``address`` (any free port), connect to it, accept: OSError if any fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as server:
        server.settimeout(timeout)
        server.bind((address, 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=timeout):
            server.accept()[0].close()


def _inet_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)


def _kernel_ioctl(fd: int, request: int, ifreq: bytes) -> bytes:
    return fcntl.ioctl(fd, request, ifreq)


def loopback_up(
    *,
    interface: str = LOOPBACK_INTERFACE,
    address: str = LOOPBACK_ADDRESS,
    prefix: int = LOOPBACK_PREFIX,
    ioctl: IoctlFn = _kernel_ioctl,
    open_socket: SocketFactory = _inet_socket,
    probe: Callable[[str], None] | None = None,
) -> NetUpReport:
    """Bring ``interface`` up with ``address``/``prefix``; idempotent. NetUpError on failure.

    ``probe(address)`` checks the result end to end and raises OSError if it does not work;
    the default (for the real kernel) connects a TCP client to a listener on ``address``.
    """
    probe = probe or tcp_probe
    if not interface or len(interface.encode()) >= IFNAMSIZ or ":" in interface:
        raise NetUpError(
            "bad_interface", f"expected an interface name of 1 to {IFNAMSIZ - 1} bytes"
        )
    try:
        sock = open_socket()
    except OSError as e:
        raise NetUpError(
            "socket_unavailable",
            f"cannot open an AF_INET socket to configure {interface}: "
            f"{_errno_name(e.errno)}: {e.strerror}",
        ) from None
    with sock:
        link = _Interface(sock.fileno(), ioctl, interface)
        flags = link.flags()
        was_up = bool(flags & IFF_UP)
        current = link.address(hint=address)
        added = False
        if current is None:
            # EEXIST: the address is on the interface already, under another label.
            added = link.set_address(address)
            if added:
                link.set_netmask(prefix)
        elif current != address:
            raise NetUpError(
                "address_conflict",
                f"{interface} carries {current}, not {address}; net-up does not replace an "
                "address it did not set",
            )
        if not was_up:
            link.set_flags(flags | IFF_UP)
        now_up = bool(link.flags() & IFF_UP)
    if not now_up:
        raise NetUpError(
            "verify_failed", f"after set-up, {interface} is still down (IFF_UP not set)"
        )
    try:
        probe(address)
    except OSError as e:
        raise NetUpError(
            "verify_failed",
            f"after set-up, a TCP connection to {address} fails: "
            f"{_errno_name(e.errno)}: {e.strerror}",
        ) from None
    return NetUpReport(
        interface=interface,
        address=f"{address}/{prefix}",
        was_up=was_up,
        now_up=now_up,
        address_added=added,
    )
