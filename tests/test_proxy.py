"""`keyutil proxy`: parsing, the allowlist, forwarding over real loopback sockets, and the CLI.

The proxy runs in-process (a thread) for the forwarding cases, and as a real process for the
exit codes, signals and log lines. Destinations are small TCP servers started by each test.
"""

from __future__ import annotations

import doctest
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import KEYUTIL, ProxyProcess, free_port, json_lines
from e2e_support import LoopbackServer as Server

from keyutil import proxy as p
from keyutil.proxy import (
    Allowlist,
    HostPort,
    ListenError,
    Proxy,
    ProxyConfig,
    ProxyConfigError,
    Refused,
    build_allowlist,
    parse_allowlist_yaml,
    parse_hostport,
    parse_listen,
)

AWS_SAMPLE = """\
# the format of /etc/nitro_enclaves/vsock-proxy.yaml
allowlist:
- {address: kms.us-east-1.amazonaws.com, port: 443}
- {address: kms-fips.us-east-1.amazonaws.com, port: 443}
- address: 127.0.0.1
  port: 8443
"""


# -- Parse: listen addresses, destinations, the YAML allowlist ------------------------------


@pytest.mark.parametrize(
    ("text", "family", "address", "shown"),
    [
        ("vsock://:8000", socket.AF_VSOCK, (p.VMADDR_CID_ANY, 8000), "vsock://:8000"),
        ("vsock://3:8000", socket.AF_VSOCK, (3, 8000), "vsock://3:8000"),
        ("unix:///run/kms.sock", socket.AF_UNIX, "/run/kms.sock", "unix:///run/kms.sock"),
        ("tcp://127.0.0.1:9000", socket.AF_INET, ("127.0.0.1", 9000), "tcp://127.0.0.1:9000"),
        ("tcp://[::1]:9000", socket.AF_INET6, ("::1", 9000), "tcp://[::1]:9000"),
        ("TCP://0.0.0.0:1", socket.AF_INET, ("0.0.0.0", 1), "tcp://0.0.0.0:1"),
    ],
)
def test_parse_listen(text: str, family: int, address: Any, shown: str) -> None:
    listen = parse_listen(text)
    assert (listen.family, listen.address, str(listen)) == (family, address, shown)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("8000", "expected vsock://[CID]:PORT, unix:///PATH or tcp://IP:PORT"),
        ("http://127.0.0.1:80", "expected vsock://[CID]:PORT"),
        ("vsock://3", "expected vsock://...:PORT"),
        ("vsock://x:8000", "numeric CID"),
        ("vsock://:0", "port from 1 to 65535"),
        ("vsock://:65536", "port from 1 to 65535"),
        ("vsock://3:8000/x", "nothing after the port"),
        ("unix://run/kms.sock", "unix:///absolute/path.sock"),
        ("unix:///" + "x" * 120, "at most 107 bytes"),
        ("tcp://localhost:80", "an address, not a name"),
        ("tcp://::1:80", "write an IPv6 address in brackets: tcp://[::1]:80"),
        ("tcp://127.0.0.1:80?x=1", "no query"),
        ("tcp://u@127.0.0.1:80", "no query, fragment or user"),
    ],
)
def test_parse_listen_refuses(text: str, reason: str) -> None:
    with pytest.raises(ProxyConfigError, match=re.escape(reason)):
        parse_listen(text)


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("kms.example.com:443", "kms.example.com", 443, "kms.example.com:443"),
        ("KMS.Example.COM.:443", "kms.example.com", 443, "kms.example.com:443"),
        ("127.0.0.1:8000", "127.0.0.1", 8000, "127.0.0.1:8000"),
        ("[::1]:8000", "::1", 8000, "[::1]:8000"),
        ("[0:0::1]:8000", "::1", 8000, "[::1]:8000"),
        ("localhost:1", "localhost", 1, "localhost:1"),
    ],
)
def test_parse_hostport(text: str, host: str, port: int, shown: str) -> None:
    dest = parse_hostport(text)
    assert (dest.host, dest.port, str(dest)) == (host, port, shown)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("kms.example.com", "expected HOST:PORT"),
        (":443", "expected HOST:PORT"),
        ("kms:https", "port from 1 to 65535"),
        ("kms:0", "port from 1 to 65535"),
        ("::1:443", "IPv6 address in brackets"),
        ("[::1]443", r"expected \[IPV6\]:PORT"),
        ("[127.0.0.1]:443", "IPv6 address in brackets"),
        ("kms..example:443", "host name or an IP address"),
        ("kms example:443", "host name or an IP address"),
        ("-kms:443", "host name or an IP address"),
    ],
)
def test_parse_hostport_refuses(text: str, reason: str) -> None:
    with pytest.raises(ProxyConfigError, match=reason):
        parse_hostport(text, what="--to")


def test_aws_allowlist_format() -> None:
    assert parse_allowlist_yaml(AWS_SAMPLE) == (
        HostPort("kms.us-east-1.amazonaws.com", 443),
        HostPort("kms-fips.us-east-1.amazonaws.com", 443),
        HostPort("127.0.0.1", 8443),
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("allowlist: [", "not valid YAML at line"),
        ("- {address: a, port: 1}", "expected a map with one key, allowlist; found list"),
        ("allowlist: []\nextra: 1", r"one key, allowlist; found \['allowlist', 'extra'\]"),
        ("allowlist: []", "non-empty list"),
        ("allowlist:", "non-empty list"),
        ("allowlist: [{adress: kms, port: 443}]", r"entry 1: expected \{address: HOST"),
        ("allowlist: [{address: kms}]", "entry 1: expected"),
        ("allowlist: [{address: kms, port: 443, ip: x}]", "entry 1: expected"),
        ("allowlist: [kms:443]", "entry 1: expected .* found str"),
        ("allowlist: [{address: kms, port: '443'}]", "port must be an integer"),
        ("allowlist: [{address: kms, port: 0}]", "port must be an integer 1..65535"),
        ("allowlist: [{address: kms, port: true}]", "port must be an integer"),
        ("allowlist: [{address: 7, port: 443}]", "address must be a string"),
        ("allowlist: [{address: a b, port: 443}]", "entry 1: expected a host name"),
        ("allowlist: [{address: a, port: 1}, {address: b}]", "entry 2: expected"),
    ],
)
def test_allowlist_yaml_refuses(text: str, reason: str) -> None:
    with pytest.raises(ProxyConfigError, match=reason):
        parse_allowlist_yaml(text)


def test_allowlist_yaml_without_pyyaml_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(ProxyConfigError, match=r"needs PyYAML .*nitro-keyrelease\[proxy\]"):
        parse_allowlist_yaml(AWS_SAMPLE)


def test_allowlist_file_errors(tmp_path: Path) -> None:
    to = HostPort("kms", 443)
    with pytest.raises(ProxyConfigError, match=r"cannot read .*No such file"):
        build_allowlist(to, [], tmp_path / "missing.yaml")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (p.MAX_ALLOWLIST_BYTES + 1))
    with pytest.raises(ProxyConfigError, match="larger than"):
        build_allowlist(to, [], big)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ProxyConfigError, match="not UTF-8"):
        build_allowlist(to, [], binary)


def test_docstring_examples_run() -> None:
    result = doctest.testmod(p)
    assert result.attempted > 0 and result.failed == 0


# -- Decide: the allowlist ------------------------------------------------------------------


def test_allowlist_defaults_to_the_destination_as_typed() -> None:
    to = parse_hostport("kms.example.com:443")
    allowlist = build_allowlist(to, [], None)
    assert allowlist == Allowlist((to,), "destination")
    allowlist.check(to)


def test_allowlist_combines_allow_and_file(tmp_path: Path) -> None:
    file = tmp_path / "vsock-proxy.yaml"
    file.write_text(AWS_SAMPLE)
    allowlist = build_allowlist(HostPort("x", 1), ["[::1]:9", "127.0.0.1:8443"], file)
    assert allowlist.source == f"--allow + {file}"
    assert len(allowlist.entries) == 4  # 127.0.0.1:8443 once
    allowlist.check(parse_hostport("[::1]:9"))
    allowlist.check(parse_hostport("KMS.us-east-1.amazonaws.com.:443"))


@pytest.mark.parametrize(
    ("to", "reason"),
    [
        ("kms.example.com:8443", "kms.example.com is allowed on port 443 only"),
        ("93.184.216.34:443", "not on the allowlist"),  # not resolved: a name is not its IP
        ("kms.example.com.evil:443", "not on the allowlist"),
        ("[::1]:443", "not on the allowlist"),
    ],
)
def test_allowlist_refuses(to: str, reason: str) -> None:
    allowlist = Allowlist((parse_hostport("kms.example.com:443"),), "--allow")
    assert not allowlist.permits(parse_hostport(to))
    with pytest.raises(Refused, match=reason):
        allowlist.check(parse_hostport(to))


def test_empty_allowlist_refuses_everything() -> None:
    with pytest.raises(Refused, match="empty"):
        Allowlist((), "--allow").check(HostPort("kms", 443))


def test_config_limits() -> None:
    listen, to = parse_listen("unix:///x.sock"), HostPort("kms", 443)
    allowlist = Allowlist((to,), "destination")
    with pytest.raises(ProxyConfigError, match="max_connections"):
        ProxyConfig(listen, to, allowlist, max_connections=0)
    with pytest.raises(ProxyConfigError, match="timeouts"):
        ProxyConfig(listen, to, allowlist, idle_timeout=0)


# -- Loopback destinations --------------------------------------------------------------------


def read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(1 << 16):
        data += chunk
    return bytes(data)


def echo(conn: socket.socket) -> None:
    while data := conn.recv(1 << 16):
        conn.sendall(data)


def digest_after_eof(conn: socket.socket) -> None:
    """Reads until the client's EOF, then answers: a reply only a half-close lets through."""
    received = read_all(conn)
    conn.sendall(b"sha256:" + hashlib.sha256(received).hexdigest().encode() + b"\n")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths have at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="kp", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Running:
    """An in-process proxy serving in a thread, with its log lines collected."""

    def __init__(self, proxy_: Proxy) -> None:
        self.proxy = proxy_
        self.lines: list[tuple[str, str, dict[str, Any]]] = []
        self.thread = threading.Thread(target=proxy_.serve, daemon=True)

    def collect(self, level: str, event: str, fields: Any) -> None:
        self.lines.append((level, event, dict(fields)))

    def connect(self) -> socket.socket:
        listen = self.proxy.config.listen
        sock = socket.socket(listen.family)
        sock.settimeout(10)
        sock.connect(listen.address)
        return sock

    def connections(self, n: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        """The first ``n`` connection lines, waiting for them."""
        end = time.monotonic() + timeout
        while True:
            found = [f for _, event, f in self.lines if event == "connection"]
            if len(found) >= n or time.monotonic() > end:
                assert len(found) >= n, self.lines
                assert all(f["end"] in p.END_REASONS for f in found)
                return found
            time.sleep(0.01)

    def stop(self) -> None:
        self.proxy.stop()
        self.thread.join(20)
        assert not self.thread.is_alive()


@pytest.fixture
def run_proxy(sockdir: Path) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(
        to: str, *, allowlist: Allowlist | None = None, proxy_class: type[Proxy] = Proxy, **kw: Any
    ) -> Running:
        dest = parse_hostport(to)
        resolve = kw.pop("resolve", p.resolve)
        config = ProxyConfig(
            listen=parse_listen(kw.pop("listen", f"unix://{sockdir}/p{len(started)}.sock")),
            to=dest,
            allowlist=allowlist or Allowlist((dest,), "destination"),
            **kw,
        )
        running = Running.__new__(Running)
        proxy_ = proxy_class(config, lambda *a: running.collect(*a), resolve=resolve)
        Running.__init__(running, proxy_)
        proxy_.open()
        running.thread.start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


# -- Act: forwarding --------------------------------------------------------------------------


def test_forwards_large_random_data_both_ways_byte_exact(
    run_proxy: Callable[..., Running],
) -> None:
    up, down = os.urandom(6_000_000), os.urandom(4_000_000)
    received: list[bytes] = []

    def exchange(conn: socket.socket) -> None:  # sends its own data while it reads ours
        sender = threading.Thread(target=conn.sendall, args=(down,))
        sender.start()
        received.append(read_all(conn))
        sender.join()

    server = Server(exchange)
    proxy = run_proxy(f"127.0.0.1:{server.port}")
    with proxy.connect() as client:
        sender = threading.Thread(target=lambda: (client.sendall(up), client.shutdown(1)))
        sender.start()
        got = read_all(client)
        sender.join()
    assert got == down
    assert received == [up]
    (line,) = proxy.connections()
    assert line["bytes_to_dest"] == len(up) and line["bytes_to_client"] == len(down)
    assert line["end"] in ("client_closed", "dest_closed")
    server.close()


def test_half_close_lets_the_reply_through(run_proxy: Callable[..., Running]) -> None:
    server = Server(digest_after_eof)
    proxy = run_proxy(f"127.0.0.1:{server.port}")
    request = os.urandom(300_000)
    with proxy.connect() as client:
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        reply = read_all(client)
    assert reply == b"sha256:" + hashlib.sha256(request).hexdigest().encode() + b"\n"
    (line,) = proxy.connections()
    assert line["end"] == "client_closed"
    assert (line["bytes_to_dest"], line["bytes_to_client"]) == (len(request), len(reply))
    assert not server.errors
    server.close()


def test_half_close_from_the_destination_side(run_proxy: Callable[..., Running]) -> None:
    got: list[bytes] = []

    def greet_then_listen(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)
        got.append(read_all(conn))

    server = Server(greet_then_listen)
    proxy = run_proxy(f"127.0.0.1:{server.port}")
    with proxy.connect() as client:
        assert read_all(client) == b"hello"  # the destination's EOF arrives as ours
        client.sendall(b"still flowing" * 1000)
    (line,) = proxy.connections()
    assert got == [b"still flowing" * 1000]
    assert line["end"] == "dest_closed"
    assert line["bytes_to_dest"] == 13_000
    server.close()


def test_log_line_fields(run_proxy: Callable[..., Running]) -> None:
    server = Server(echo)
    proxy = run_proxy(f"127.0.0.1:{server.port}")
    with proxy.connect() as client:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
    (line,) = proxy.connections()
    assert set(line) == {
        "conn",
        "peer",
        "destination",
        "dest_address",
        "bytes_to_dest",
        "bytes_to_client",
        "duration_s",
        "end",
    }
    assert line["peer"] == f"unix:pid={os.getpid()},uid={os.getuid()}"
    assert line["destination"] == line["dest_address"] == f"127.0.0.1:{server.port}"
    assert (line["bytes_to_dest"], line["bytes_to_client"], line["end"]) == (4, 4, "client_closed")
    assert 0 <= line["duration_s"] < 10
    level, event, start = proxy.lines[0]
    assert (level, event) == ("info", "listening")
    assert start["to"] == f"127.0.0.1:{server.port}"
    assert start["allowlist"] == [f"127.0.0.1:{server.port}"]
    server.close()


def test_tcp_listener_ipv4_and_ipv6(run_proxy: Callable[..., Running]) -> None:
    server = Server(echo)
    for host in ("127.0.0.1", "[::1]"):
        listen = f"tcp://{host}:{free_port()}"
        try:
            proxy = run_proxy(f"127.0.0.1:{server.port}", listen=listen)
        except ListenError as e:  # a host without IPv6 on loopback
            assert host == "[::1]" and "Cannot assign" in str(e)
            continue
        assert proxy.proxy.bound == listen
        with proxy.connect() as client:
            client.sendall(b"abc")
            assert client.recv(3) == b"abc"
        (line,) = proxy.connections()
        assert line["peer"].startswith(f"{host}:")
    server.close()


def test_ipv6_destination(run_proxy: Callable[..., Running]) -> None:
    try:
        server = Server(echo, host="::1")
    except OSError:
        pytest.skip("no IPv6 on loopback here")
    proxy = run_proxy(f"[::1]:{server.port}")
    with proxy.connect() as client:
        client.sendall(b"six")
        assert client.recv(3) == b"six"
    (line,) = proxy.connections()
    assert line["dest_address"] == f"[::1]:{server.port}"
    server.close()


def test_connection_limit(run_proxy: Callable[..., Running]) -> None:
    server = Server(echo)
    proxy = run_proxy(f"127.0.0.1:{server.port}", max_connections=2)
    held = [proxy.connect(), proxy.connect()]
    for sock in held:  # both forwarding
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    with proxy.connect() as third:
        assert third.recv(1) == b""  # accepted and closed at once
    (line,) = proxy.connections()
    assert line["end"] == "over_limit"
    assert line["error"] == "2 connections open"
    assert line["bytes_to_dest"] == line["bytes_to_client"] == 0
    held.pop().close()
    proxy.connections(2)
    with proxy.connect() as again:  # a slot is free again
        again.sendall(b"y")
        assert again.recv(1) == b"y"
    held[0].close()
    server.close()


def test_idle_timeout_closes_both_sides(run_proxy: Callable[..., Running]) -> None:
    dest_saw_eof = threading.Event()

    def echo_then_note(conn: socket.socket) -> None:
        echo(conn)
        dest_saw_eof.set()

    server = Server(echo_then_note)
    proxy = run_proxy(f"127.0.0.1:{server.port}", idle_timeout=0.3)
    with proxy.connect() as client:
        started = time.monotonic()
        client.sendall(b"a")
        assert client.recv(1) == b"a"
        assert client.recv(1) == b""
        waited = time.monotonic() - started
    assert dest_saw_eof.wait(5)
    (line,) = proxy.connections()
    assert line["end"] == "idle_timeout"
    assert 0.3 <= waited < 3
    server.close()


def test_traffic_keeps_a_connection_past_the_idle_timeout(
    run_proxy: Callable[..., Running],
) -> None:
    server = Server(echo)
    proxy = run_proxy(f"127.0.0.1:{server.port}", idle_timeout=0.4)
    with proxy.connect() as client:
        end = time.monotonic() + 1.2  # three idle timeouts, never idle for one
        while time.monotonic() < end:
            client.sendall(b"k")
            assert client.recv(1) == b"k"
            time.sleep(0.1)
    (line,) = proxy.connections()
    assert line["end"] == "client_closed"
    assert line["duration_s"] >= 1.2


def test_destination_refusing_connections(run_proxy: Callable[..., Running]) -> None:
    proxy = run_proxy(f"127.0.0.1:{free_port()}")
    with proxy.connect() as client:
        assert client.recv(1) == b""
    (line,) = proxy.connections()
    assert line["end"] == "destination_unreachable"
    assert "Connection refused" in line["error"]
    assert line["dest_address"] is None


def test_destination_not_answering_hits_the_connect_timeout(
    run_proxy: Callable[..., Running],
) -> None:
    # A listener that never accepts, its queue full: further SYNs are dropped, so a connect
    # waits (all on loopback).
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.1)
    proxy = run_proxy(f"127.0.0.1:{port}", connect_timeout=0.5)
    with proxy.connect() as client:
        started = time.monotonic()
        assert client.recv(1) == b""
        waited = time.monotonic() - started
    (line,) = proxy.connections()
    assert line["end"] == "destination_unreachable"
    assert "timed out" in line["error"]
    assert 0.3 < waited < 3
    for s in [*fillers, blackhole]:
        s.close()


def test_name_resolved_afresh_for_every_connection(run_proxy: Callable[..., Running]) -> None:
    first = Server(lambda c: c.sendall(b"first"))
    try:
        second = Server(lambda c: c.sendall(b"second"), host="127.0.0.2", port=first.port)
    except OSError:
        pytest.skip("127.0.0.2 is not on loopback here, or the port is taken there")
    answers = iter(["127.0.0.1", "127.0.0.2"])
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int, timeout: float) -> list[tuple[int, Any]]:
        asked.append((host, port))
        return [(socket.AF_INET, (next(answers), port))]

    proxy = run_proxy(f"kms.test:{first.port}", resolve=resolve)
    replies = []
    for _ in range(2):
        with proxy.connect() as client:
            replies.append(read_all(client))
    assert replies == [b"first", b"second"]
    assert asked == [("kms.test", first.port)] * 2
    lines = proxy.connections(2)
    # One line per connection, each to the address its own resolution gave (the lines are
    # written as connections end, which need not be the order they began in).
    assert sorted(x["dest_address"] for x in lines) == [
        f"127.0.0.1:{first.port}",
        f"127.0.0.2:{first.port}",
    ]
    assert {x["destination"] for x in lines} == {f"kms.test:{first.port}"}
    first.close()
    second.close()


def test_name_that_does_not_resolve(run_proxy: Callable[..., Running]) -> None:
    def resolve(host: str, port: int, timeout: float) -> list[tuple[int, Any]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    proxy = run_proxy("kms.test:443", resolve=resolve)
    with proxy.connect() as client:
        assert client.recv(1) == b""
    (line,) = proxy.connections()
    assert line["end"] == "destination_unreachable"
    assert line["error"] == "resolving kms.test: Name or service not known"


def test_each_connection_is_checked_against_the_allowlist(
    run_proxy: Callable[..., Running],
) -> None:
    server = Server(echo)
    # A proxy built around the start-up check: every connection is still refused.
    other = Allowlist((HostPort("127.0.0.1", 1),), "--allow")
    proxy = run_proxy(f"127.0.0.1:{server.port}", allowlist=other)
    with proxy.connect() as client:
        assert client.recv(1) == b""
    (line,) = proxy.connections()
    assert line["end"] == "refused"
    assert "127.0.0.1 is allowed on port 1 only" in line["error"]
    assert server.accepted == 0
    server.close()


def test_accept_failure_is_logged_and_serving_goes_on(run_proxy: Callable[..., Running]) -> None:
    class OutOfFiles(Proxy):
        failed = False

        def _accept(self, listener: socket.socket) -> tuple[socket.socket, Any]:
            if not self.failed:
                self.failed = True
                listener.accept()[0].close()
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return super()._accept(listener)

    server = Server(echo)
    proxy = run_proxy(f"127.0.0.1:{server.port}", proxy_class=OutOfFiles)
    with proxy.connect() as client:
        assert client.recv(1) == b""
    with proxy.connect() as client:
        client.sendall(b"z")
        assert client.recv(1) == b"z"
    proxy.connections()
    assert ("error", "accept_failed", {"error": "Too many open files"}) in proxy.lines
    server.close()


def test_stop_lets_open_connections_finish_within_the_grace(
    run_proxy: Callable[..., Running], sockdir: Path
) -> None:
    server = Server(echo)
    proxy = run_proxy(f"127.0.0.1:{server.port}", grace=5)
    path = Path(proxy.proxy.config.listen.address)
    client = proxy.connect()
    client.sendall(b"1")
    assert client.recv(1) == b"1"
    stopper = threading.Thread(target=proxy.stop)
    stopper.start()
    end = time.monotonic() + 5
    while path.exists() and time.monotonic() < end:
        time.sleep(0.01)
    assert not path.exists()  # no longer accepting
    client.sendall(b"2")  # the open connection still flows
    assert client.recv(1) == b"2"
    client.close()
    stopper.join(10)
    (line,) = proxy.connections()
    assert line["end"] == "client_closed"
    assert proxy.lines[-1][1:] == (
        "stopped",
        {"connections": 1, "open_at_stop": 1, "closed_by_shutdown": 0},
    )
    server.close()


def test_stop_closes_connections_still_open_after_the_grace(
    run_proxy: Callable[..., Running],
) -> None:
    server = Server(echo)
    proxy = run_proxy(f"127.0.0.1:{server.port}", grace=0.2)
    with proxy.connect() as client:
        client.sendall(b"1")
        assert client.recv(1) == b"1"
        started = time.monotonic()
        proxy.stop()
        assert client.recv(1) == b""
        assert time.monotonic() - started < 5
    (line,) = proxy.connections()
    assert line["end"] == "shutdown"
    assert proxy.lines[-1][2] == {"connections": 1, "open_at_stop": 1, "closed_by_shutdown": 1}
    server.close()


# -- Listening: unix socket files, and vsock's family ---------------------------------------


def config_for(listen: str) -> ProxyConfig:
    to = HostPort("127.0.0.1", 9)
    return ProxyConfig(parse_listen(listen), to, Allowlist((to,), "destination"))


def test_stale_unix_socket_file_is_replaced(sockdir: Path) -> None:
    path = sockdir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    proxy = Proxy(config_for(f"unix://{path}"), lambda *a: None)
    proxy.open()
    with socket.socket(socket.AF_UNIX) as probe:
        probe.connect(str(path))
    proxy.stop()
    proxy.serve()
    assert not path.exists()


def test_live_unix_socket_or_other_file_is_not_taken_over(sockdir: Path) -> None:
    live = sockdir / "live.sock"
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(live))
    holder.listen()
    with pytest.raises(ListenError, match="another process is listening"):
        Proxy(config_for(f"unix://{live}"), lambda *a: None).open()
    holder.close()
    plain = sockdir / "plain"
    plain.write_text("not a socket")
    with pytest.raises(ListenError, match="exists and is not a socket"):
        Proxy(config_for(f"unix://{plain}"), lambda *a: None).open()
    assert plain.read_text() == "not a socket"
    with pytest.raises(ListenError, match="No such file or directory"):
        Proxy(config_for(f"unix://{sockdir}/missing/p.sock"), lambda *a: None).open()


def test_only_the_socket_file_it_created_is_removed(sockdir: Path) -> None:
    path = sockdir / "p.sock"
    proxy = Proxy(config_for(f"unix://{path}"), lambda *a: None)
    proxy.open()
    path.unlink()  # someone else's file now takes the name
    path.write_text("theirs")
    proxy.stop()
    proxy.serve()
    assert path.read_text() == "theirs"


# -- The command: exit codes, signals, log lines -----------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KEYUTIL, "proxy", *args], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_and_removes_the_socket(sockdir: Path, signum: int) -> None:
    server = Server(echo)
    path = sockdir / "p.sock"
    proc = ProxyProcess(
        "--listen", f"unix://{path}", "--to", f"127.0.0.1:{server.port}", "--log-format", "json"
    )
    proc.wait_listening(path)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        client.sendall(b"hello")
        assert client.recv(5) == b"hello"
    code, err = proc.stop(signum)
    assert code == (130 if signum == signal.SIGINT else 0), err  # Ctrl-C exits 130 everywhere
    assert not path.exists()
    lines = json_lines(err)
    assert [x["event"] for x in lines] == ["listening", "connection", "connection", "stopped"]
    assert lines[0]["listen"] == f"unix://{path}"
    probe, ours = sorted(lines[1:3], key=lambda x: x["bytes_to_dest"])  # wait_listening's probe
    assert (probe["bytes_to_dest"], probe["bytes_to_client"]) == (0, 0)
    assert (ours["bytes_to_dest"], ours["bytes_to_client"], ours["end"]) == (5, 5, "client_closed")
    assert "Traceback" not in err
    server.close()


def test_text_log_line(sockdir: Path) -> None:
    server = Server(digest_after_eof)
    path = sockdir / "p.sock"
    proc = ProxyProcess("--listen", f"unix://{path}", "--to", f"127.0.0.1:{server.port}")
    proc.wait_listening(path)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(path))
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        reply = read_all(client)
    code, err = proc.stop()
    assert code == 0
    (ours,) = [x for x in err.splitlines() if "conn=2 " in x]  # conn=1: the readiness probe
    assert ours.startswith('keyutil: info: connection conn=2 peer="unix:pid=')
    assert f"bytes_to_dest=7 bytes_to_client={len(reply)} " in ours
    assert 'end="client_closed"' in ours
    assert err.splitlines()[-1].startswith("keyutil: info: stopped connections=2")
    server.close()


def test_options_from_the_environment(sockdir: Path) -> None:
    server = Server(echo)
    path = sockdir / "env.sock"
    env = {
        "KEYUTIL_PROXY_LISTEN": f"unix://{path}",
        "KEYUTIL_PROXY_TO": f"127.0.0.1:{server.port}",
        "KEYUTIL_PROXY_MAX_CONNECTIONS": "3",
        "KEYUTIL_PROXY_IDLE_TIMEOUT": "7",
        "KEYUTIL_PROXY_ALLOW": f"kms.example:443 127.0.0.1:{server.port}",
    }
    proc = ProxyProcess("--log-format", "json", env=env)
    proc.wait_listening(path)
    code, err = proc.stop()
    assert code == 0
    start = json_lines(err)[0]
    assert (start["max_connections"], start["idle_timeout_s"]) == (3, 7.0)
    assert start["allowlist"] == ["kms.example:443", f"127.0.0.1:{server.port}"]
    server.close()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ["--listen", "vsock://x:1", "--to", "127.0.0.1:1"],
            "Invalid value for --listen: expected vsock://:PORT or vsock://CID:PORT",
        ),
        (["--listen", "tcp://kms:1", "--to", "127.0.0.1:1"], "an address, not a name"),
        (
            ["--listen", "unix:///tmp/kp.sock", "--to", "kms"],
            "Invalid value for --to: expected HOST:PORT; found 'kms'",
        ),
        (["--listen", "unix:///tmp/kp.sock", "--to", "::1:80"], "IPv6 address in brackets"),
        (["--listen", "unix:///tmp/kp.sock"], "Missing option '--to'"),
        (["--to", "kms:1"], "Missing option '--listen'"),
        (["--listen", "unix:///k.sock", "--to", "k:1", "--max-connections", "0"], "x>=1"),
        (["--listen", "unix:///k.sock", "--to", "k:1", "--idle-timeout", "0"], "x>0"),
    ],
)
def test_bad_arguments_are_usage_errors(args: list[str], says: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_destination_outside_the_allowlist_is_refused_and_nothing_listens(
    sockdir: Path,
) -> None:
    path = sockdir / "p.sock"
    result = run_cli(
        *("--listen", f"unix://{path}", "--to", "127.0.0.1:8443"),
        *("--allow", "kms.example.com:443", "--allow", "127.0.0.1:443", "--log-format", "json"),
    )
    assert result.returncode == 2
    (line,) = json_lines(result.stderr)
    assert (line["level"], line["event"], line["exit"]) == ("error", "refused", 2)
    assert line["destination"] == "127.0.0.1:8443"
    assert "127.0.0.1 is allowed on port 443 only" in line["reason"]
    assert not path.exists()


def test_yaml_allowlist_admits_and_refuses(sockdir: Path) -> None:
    server = Server(echo)
    config = sockdir / "vsock-proxy.yaml"
    config.write_text(f"allowlist:\n- {{address: 127.0.0.1, port: {server.port}}}\n")
    path = sockdir / "p.sock"
    proc = ProxyProcess(
        *("--listen", f"unix://{path}", "--to", f"127.0.0.1:{server.port}"),
        *("--allowlist", str(config), "--log-format", "json"),
    )
    proc.wait_listening(path)
    code, err = proc.stop()
    assert code == 0
    assert json_lines(err)[0]["allowlist_source"] == str(config)
    refused = run_cli(
        *("--listen", f"unix://{path}", "--to", "localhost:" + str(server.port)),
        *("--allowlist", str(config)),
    )
    assert refused.returncode == 2
    assert "keyutil: error: refused" in refused.stderr
    assert "names and addresses are compared as written" in refused.stderr
    server.close()


def test_invalid_allowlist_file_is_a_usage_error(sockdir: Path) -> None:
    config = sockdir / "bad.yaml"
    config.write_text("allowlist:\n- {adress: kms, port: 443}\n")
    result = run_cli(
        "--listen", f"unix://{sockdir}/p.sock", "--to", "kms:443", "--allowlist", str(config)
    )
    assert result.returncode == 2
    assert "keyutil: error: allowlist_invalid exit=2" in result.stderr
    assert "entry 1: expected {address: HOST, port: PORT}" in result.stderr
    result = run_cli("--listen", f"unix://{sockdir}/p.sock", "--to", "kms:443", "--allow", "x")
    assert result.returncode == 2
    assert "--allow: expected HOST:PORT" in result.stderr


def test_cannot_listen_exits_3(sockdir: Path) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    result = run_cli("--listen", f"tcp://127.0.0.1:{port}", "--to", "127.0.0.1:1")
    assert result.returncode == 3
    assert "listen_failed" in result.stderr and "Address already in use" in result.stderr
    holder.close()
    result = run_cli("--listen", f"unix://{sockdir}/none/p.sock", "--to", "127.0.0.1:1")
    assert result.returncode == 3
    assert "No such file or directory" in result.stderr


def test_vsock_listener_binds_or_says_vsock() -> None:
    # AF_VSOCK has no loopback: the family either binds here (a vsock driver is loaded) or
    # fails with a message naming vsock, never with a traceback.
    port = 20000 + os.getpid() % 20000
    proc = ProxyProcess(
        "--listen", f"vsock://:{port}", "--to", "127.0.0.1:1", "--log-format", "json"
    )
    assert proc.proc.stderr is not None
    first = json.loads(proc.proc.stderr.readline())  # the process says one or the other at once
    code, rest = proc.stop()
    assert "Traceback" not in rest
    if first["event"] == "listening":
        assert first["listen"] == f"vsock://:{port}"
        assert code == 0
        assert [x["event"] for x in json_lines(rest)] == ["stopped"]
    else:
        assert first["event"] == "listen_failed" and "vsock" in first["message"]
        assert code == 3


def test_vsock_listener_on_a_cid_that_is_not_ours_says_vsock() -> None:
    result = run_cli("--listen", "vsock://4000000000:8000", "--to", "127.0.0.1:1")
    assert result.returncode == 3
    assert "keyutil: error: listen_failed" in result.stderr
    assert "on vsock://4000000000:8000" in result.stderr and "AF_VSOCK" in result.stderr
    assert "Traceback" not in result.stderr
