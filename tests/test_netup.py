"""`keyutil net-up`: a working loopback in a fresh network namespace, and its error mapping.

The namespace tests create their own network namespace (a `unshare -n sleep` process) and
run every command inside it with `nsenter`: the host's own loopback is never touched. `ip`
is used here only to prepare and inspect states; the product uses ioctls.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import KEYUTIL

from keyutil import netup
from keyutil.netup import (
    IFF_UP,
    SIOCGIFADDR,
    SIOCGIFFLAGS,
    SIOCSIFADDR,
    SIOCSIFFLAGS,
    SIOCSIFNETMASK,
    NetUpError,
    loopback_up,
    map_ioctl_error,
)

EXIT_NETWORK = 8

# In the namespace: serve one TCP client on 127.0.0.1 and check it gets the answer.
PROBE = r"""
import json, socket, sys
try:
    with socket.socket() as server:
        server.settimeout(3)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=3) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                peer.sendall(peer.recv(4).replace(b"ping", b"pong"))
                answer = client.recv(4)
    print(json.dumps({"ok": answer == b"pong", "answer": answer.decode()}))
except OSError as e:
    print(json.dumps({"ok": False, "error": e.errno}))
"""

UNPRIVILEGED = {
    "setpriv (nobody, no capabilities)": [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ],
    # capsh runs bash with what follows "--": have it exec the command given after it
    "capsh (root without cap_net_admin)": [
        "capsh",
        "--drop=cap_net_admin",
        "--",
        "-c",
        'exec "$0" "$@"',
    ],
}

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("nsenter") is None,
    reason="needs root and util-linux unshare/nsenter to create network namespaces",
)


class Netns:
    """A network namespace held open by a sleeping process; commands run in it via nsenter."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(["unshare", "--net", "sleep", "300"])
        self.path = f"/proc/{self.holder.pid}/ns/net"
        for _ in range(100):  # until unshare has exec'd sleep in the new namespace
            if os.readlink(self.path) != os.readlink("/proc/self/ns/net"):
                break
            subprocess.run(["sleep", "0.01"], check=True)
        else:
            raise AssertionError("unshare did not enter a new network namespace")

    def run(self, *cmd: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", f"--net={self.path}", *prefix, *cmd],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def ip(self, *args: str) -> None:
        result = self.run("ip", *args)
        assert result.returncode == 0, result.stderr

    def lo(self) -> dict[str, Any]:
        """`ip -j addr show dev lo` as a dict: flags, and addr_info (IPv4 ones only)."""
        out = self.run("ip", "-j", "-4", "addr", "show", "dev", "lo")
        assert out.returncode == 0, out.stderr
        link = json.loads(out.stdout)
        if not link:  # -4 prints nothing for a link without IPv4 addresses
            out = self.run("ip", "-j", "link", "show", "dev", "lo")
            link = json.loads(out.stdout)
            link[0]["addr_info"] = []
        return {"flags": link[0]["flags"], "addr_info": link[0]["addr_info"]}

    def probe(self) -> dict[str, Any]:
        out = self.run(sys.executable, "-c", PROBE)
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def net_up(self, prefix: tuple[str, ...] = ()) -> tuple[int, dict[str, Any], str]:
        """Run `keyutil net-up --log-format json`: exit code, its last log record, stderr."""
        result = self.run(KEYUTIL, "net-up", "--log-format", "json", prefix=prefix)
        lines = result.stderr.strip().splitlines()
        assert lines, f"net-up logged nothing (exit {result.returncode})"
        return result.returncode, json.loads(lines[-1]), result.stderr

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def netns() -> Iterator[Netns]:
    ns = Netns()
    yield ns
    ns.close()


def addresses(state: dict[str, Any]) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in state["addr_info"]]


# -- In a fresh network namespace ----------------------------------------------------------


@needs_namespaces
def test_fresh_namespace_loopback_works_only_after_net_up(netns: Netns) -> None:
    before = netns.lo()
    assert "UP" not in before["flags"] and addresses(before) == []
    failed = netns.probe()
    assert failed["ok"] is False
    assert failed["error"] in (errno.EADDRNOTAVAIL, errno.ENETUNREACH)

    code, record, _ = netns.net_up()

    assert code == 0
    assert record["event"] == "net_up"
    assert {
        k: record[k] for k in ("interface", "address", "was_up", "now_up", "address_added")
    } == {
        "interface": "lo",
        "address": "127.0.0.1/8",
        "was_up": False,
        "now_up": True,
        "address_added": True,
    }
    after = netns.lo()
    assert "UP" in after["flags"] and addresses(after) == ["127.0.0.1/8"]
    assert netns.probe() == {"ok": True, "answer": "pong"}


@needs_namespaces
def test_link_up_without_the_address_is_not_enough(netns: Netns) -> None:
    netns.ip("link", "set", "lo", "up")
    netns.ip("addr", "flush", "dev", "lo")
    state = netns.lo()
    assert "UP" in state["flags"] and addresses(state) == []
    assert netns.probe()["ok"] is False  # the link is up, and still nothing answers

    code, record, _ = netns.net_up()

    assert code == 0
    assert (record["was_up"], record["now_up"], record["address_added"]) == (True, True, True)
    assert addresses(netns.lo()) == ["127.0.0.1/8"]
    assert netns.probe() == {"ok": True, "answer": "pong"}


@needs_namespaces
def test_address_without_the_link_is_not_enough(netns: Netns) -> None:
    netns.ip("addr", "add", "127.0.0.1/8", "dev", "lo")
    assert netns.probe()["ok"] is False

    code, record, _ = netns.net_up()

    assert code == 0
    assert (record["was_up"], record["now_up"], record["address_added"]) == (False, True, False)
    assert netns.probe()["ok"] is True


@needs_namespaces
def test_second_run_changes_nothing(netns: Netns) -> None:
    assert netns.net_up()[0] == 0
    configured = netns.lo()

    code, record, _ = netns.net_up()

    assert code == 0
    assert (record["was_up"], record["now_up"], record["address_added"]) == (True, True, False)
    assert netns.lo() == configured
    assert netns.probe()["ok"] is True


@needs_namespaces
@pytest.mark.parametrize("drop", list(UNPRIVILEGED), ids=["setpriv", "capsh"])
def test_without_cap_net_admin_exit_8_and_nothing_changes(netns: Netns, drop: str) -> None:
    before = netns.lo()

    code, record, stderr = netns.net_up(prefix=tuple(UNPRIVILEGED[drop]))

    assert code == EXIT_NETWORK
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert record["event"] == "net_up_failed" and record["exit"] == EXIT_NETWORK
    assert record["code"] == "permission_denied"
    assert "CAP_NET_ADMIN" in record["message"]
    assert netns.lo() == before
    assert netns.probe()["ok"] is False


@needs_namespaces
def test_without_cap_net_admin_text_log_is_one_line_naming_the_capability(netns: Netns) -> None:
    result = netns.run(
        KEYUTIL, "net-up", prefix=tuple(UNPRIVILEGED["capsh (root without cap_net_admin)"])
    )
    assert result.returncode == EXIT_NETWORK
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith('keyutil: error: net_up_failed exit=8 code="permission_denied"')
    assert "CAP_NET_ADMIN" in lines[0]


@needs_namespaces
def test_already_working_loopback_needs_no_privilege(netns: Netns) -> None:
    assert netns.net_up()[0] == 0

    code, record, _ = netns.net_up(prefix=tuple(UNPRIVILEGED["setpriv (nobody, no capabilities)"]))

    assert code == 0
    assert (record["was_up"], record["address_added"]) == (True, False)


@needs_namespaces
def test_another_address_on_lo_is_left_alone(netns: Netns) -> None:
    netns.ip("addr", "add", "127.0.0.2/8", "dev", "lo")
    before = netns.lo()

    code, record, _ = netns.net_up()

    assert code == EXIT_NETWORK
    assert record["code"] == "address_conflict"
    assert "127.0.0.2" in record["message"]
    assert netns.lo() == before


# -- The error mapping, against a simulated kernel -----------------------------------------


class FakeKernel:
    """The interface ioctls of one loopback device, decoded from the real ifreq bytes."""

    def __init__(
        self,
        *,
        up: bool = False,
        address: str | None = None,
        fail: dict[int, int] | None = None,
        ignore_flags: bool = False,
    ) -> None:
        self.flags = 0x8 | (IFF_UP if up else 0)  # IFF_LOOPBACK
        self.address = address
        self.netmask: str | None = "255.0.0.0" if address else None
        self.fail = fail or {}
        self.ignore_flags = ignore_flags
        self.calls: list[tuple[int, str]] = []

    def ioctl(self, fd: int, request: int, ifreq: bytes) -> bytes:
        assert isinstance(fd, int) and len(ifreq) == 40
        name = ifreq[:16].rstrip(b"\0").decode()
        self.calls.append((request, name))
        if request in self.fail:
            raise OSError(self.fail[request], os.strerror(self.fail[request]))
        if name != "lo":
            raise OSError(errno.ENODEV, "No such device")
        if request == SIOCGIFFLAGS:
            return ifreq[:16] + struct.pack("=H22x", self.flags)
        if request == SIOCSIFFLAGS:
            if not self.ignore_flags:
                (self.flags,) = struct.unpack_from("=H", ifreq, 16)
            return ifreq
        family, _, raw = struct.unpack_from("=H2s4s", ifreq, 16)
        assert family == socket.AF_INET
        value = socket.inet_ntoa(raw)
        if request == SIOCGIFADDR:
            if self.address is None:
                raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
            return ifreq[:20] + socket.inet_aton(self.address) + bytes(16)
        if request == SIOCSIFADDR:
            self.address = value
            return ifreq
        if request == SIOCSIFNETMASK:
            self.netmask = value
            return ifreq
        raise AssertionError(f"unexpected ioctl {request:#x}")

    def probe(self, address: str) -> None:
        if not (self.flags & IFF_UP and self.address == address):
            raise OSError(errno.ENETUNREACH, "Network is unreachable")


def run(kernel: FakeKernel, **kw: Any) -> netup.NetUpReport:
    return loopback_up(ioctl=kernel.ioctl, probe=kernel.probe, **kw)


def test_down_and_bare_lo_gets_address_netmask_and_up_in_that_order() -> None:
    kernel = FakeKernel()
    report = run(kernel)
    assert report.to_json() == {
        "interface": "lo",
        "address": "127.0.0.1/8",
        "was_up": False,
        "now_up": True,
        "address_added": True,
    }
    assert (kernel.address, kernel.netmask, kernel.flags & IFF_UP) == ("127.0.0.1", "255.0.0.0", 1)
    assert kernel.flags & 0x8, "the other flags are kept"
    assert [r for r, _ in kernel.calls] == [
        SIOCGIFFLAGS,
        SIOCGIFADDR,
        SIOCSIFADDR,
        SIOCSIFNETMASK,
        SIOCSIFFLAGS,
        SIOCGIFFLAGS,
    ]


def test_configured_lo_is_left_alone_with_reads_only() -> None:
    kernel = FakeKernel(up=True, address="127.0.0.1")
    report = run(kernel)
    assert (report.was_up, report.now_up, report.address_added) == (True, True, False)
    assert {r for r, _ in kernel.calls} == {SIOCGIFFLAGS, SIOCGIFADDR}


@pytest.mark.parametrize("err", [errno.EPERM, errno.EACCES])
def test_refused_address_is_permission_denied_naming_the_capability(err: int) -> None:
    kernel = FakeKernel(fail={SIOCSIFADDR: err})
    with pytest.raises(NetUpError) as e:
        run(kernel)
    assert e.value.code == "permission_denied"
    assert "CAP_NET_ADMIN" in e.value.message and "SIOCSIFADDR" in e.value.message
    assert "\n" not in e.value.message
    assert kernel.flags & IFF_UP == 0, "nothing else was tried"


def test_refused_link_up_is_permission_denied() -> None:
    kernel = FakeKernel(address="127.0.0.1", fail={SIOCSIFFLAGS: errno.EPERM})
    with pytest.raises(NetUpError) as e:
        run(kernel)
    assert e.value.code == "permission_denied"
    assert "SIOCSIFFLAGS" in e.value.message


def test_missing_interface_is_no_such_interface() -> None:
    with pytest.raises(NetUpError) as e:
        run(FakeKernel(fail={SIOCGIFFLAGS: errno.ENODEV}))
    assert e.value.code == "no_such_interface"
    assert "'lo'" in e.value.message


def test_other_ioctl_errors_name_the_operation_and_errno() -> None:
    with pytest.raises(NetUpError) as e:
        run(FakeKernel(fail={SIOCSIFNETMASK: errno.EINVAL}))
    assert e.value.code == "ioctl_failed"
    assert "SIOCSIFNETMASK" in e.value.message and "EINVAL" in e.value.message


def test_unreadable_address_is_an_error_but_no_address_is_not() -> None:
    with pytest.raises(NetUpError) as e:
        run(FakeKernel(fail={SIOCGIFADDR: errno.EFAULT}))
    assert e.value.code == "ioctl_failed" and "SIOCGIFADDR" in e.value.message


def test_address_present_under_another_label_is_not_added_twice() -> None:
    kernel = FakeKernel(up=True, fail={SIOCSIFADDR: errno.EEXIST})
    kernel.address = None  # not under the label "lo"; the kernel still knows it

    def probe(address: str) -> None:  # ... and it is local: connections work
        assert address == "127.0.0.1"

    report = loopback_up(ioctl=kernel.ioctl, probe=probe)
    assert report.address_added is False
    assert SIOCSIFNETMASK not in [r for r, _ in kernel.calls]


def test_other_address_is_a_conflict_and_nothing_is_set() -> None:
    kernel = FakeKernel(address="10.1.2.3")
    with pytest.raises(NetUpError) as e:
        run(kernel)
    assert e.value.code == "address_conflict" and "10.1.2.3" in e.value.message
    assert all(r in (SIOCGIFFLAGS, SIOCGIFADDR) for r, _ in kernel.calls)


def test_link_that_stays_down_fails_verification() -> None:
    with pytest.raises(NetUpError) as e:
        run(FakeKernel(ignore_flags=True))
    assert e.value.code == "verify_failed" and "down" in e.value.message


def test_loopback_that_does_not_answer_fails_verification() -> None:
    kernel = FakeKernel()

    def probe(address: str) -> None:
        raise OSError(errno.ECONNREFUSED, "Connection refused")

    with pytest.raises(NetUpError) as e:
        loopback_up(ioctl=kernel.ioctl, probe=probe)
    assert e.value.code == "verify_failed" and "ECONNREFUSED" in e.value.message


def test_short_ifreq_from_the_kernel_is_an_error() -> None:
    with pytest.raises(NetUpError) as e:
        loopback_up(ioctl=lambda fd, request, ifreq: b"lo", probe=lambda a: None)
    assert e.value.code == "ioctl_failed" and "40-byte" in e.value.message


def test_no_inet_socket_is_socket_unavailable() -> None:
    def no_socket() -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    with pytest.raises(NetUpError) as e:
        loopback_up(ioctl=FakeKernel().ioctl, open_socket=no_socket)
    assert e.value.code == "socket_unavailable" and "EAFNOSUPPORT" in e.value.message


@pytest.mark.parametrize("name", ["", "a" * 16, "lo:0"])
def test_bad_interface_name_is_refused_before_any_ioctl(name: str) -> None:
    kernel = FakeKernel()
    with pytest.raises(NetUpError) as e:
        run(kernel, interface=name)
    assert e.value.code == "bad_interface"
    assert kernel.calls == []


def test_map_ioctl_error_unknown_request_still_says_which() -> None:
    error = map_ioctl_error(0x1234, "lo", OSError(errno.EBUSY, "Device or resource busy"))
    assert error.code == "ioctl_failed" and "0x1234" in error.message and "EBUSY" in error.message
