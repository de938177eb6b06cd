"""`keyutil proxy` in every direction: tcp, unix and vsock destinations, and an enclave by name.

Real `keyutil proxy` processes; unix sockets stand in for vsock. The one AF_VSOCK case here
(an enclave by name) cannot connect on a machine without vsock loopback, so it checks what
the proxy tried: the CID looked up for that very connection.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
from e2e_support import KEYUTIL, LoopbackServer, ProxyProcess, json_lines
from plumbing_support import NitroCliStandIn, echo, enclave, exchange, sockdir

from keyutil import proxy as p
from keyutil.host.nitro import EnclaveNotFound, NitroCli, pick_cid

__all__ = ["sockdir"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kms.example.com:443", p.HostPort("kms.example.com", 443)),
        ("tcp://127.0.0.1:4000", p.HostPort("127.0.0.1", 4000)),
        ("tcp://[::1]:4000/", p.HostPort("::1", 4000)),
        ("unix:///run/app.sock", p.UnixDest("/run/app.sock")),
        ("vsock://3:8443", p.VsockDest(3, 8443)),
        ("VSOCK://16:5001", p.VsockDest(16, 5001)),
        ("vsock://enclave:my-app.v2:5001", p.EnclaveDest("my-app.v2", 5001)),
    ],
)
def test_destinations_parse(text: str, expected: p.Destination) -> None:
    assert p.parse_destination(text) == expected
    assert p.parse_destination(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://kms:80", "expected tcp://HOST:PORT"),
        ("unix://relative.sock", "expected unix:///absolute/path.sock"),
        ("unix:///" + "x" * 120, "at most 107 bytes"),
        ("vsock://parent:8000", "numeric CID"),
        ("vsock://3", "expected vsock://CID:PORT"),
        ("vsock://3:0", "expected a port from 1 to 65535"),
        ("vsock://enclave::5001", "a name of letters"),
        ("vsock://enclave:a b:5001", "a name of letters"),
        ("tcp://kms", "expected HOST:PORT"),
    ],
)
def test_bad_destinations_say_why(text: str, message: str) -> None:
    with pytest.raises(p.ProxyConfigError, match=message):
        p.parse_destination(text, what="--to")


def test_unix_to_unix_is_byte_exact(sockdir: Path) -> None:
    app = LoopbackServer(echo, unix=sockdir / "app.sock")
    proxy = ProxyProcess(
        "--listen", f"unix://{sockdir}/in.sock", "--to", f"unix://{sockdir}/app.sock",
        "--log-format", "json",
    ).wait_listening(sockdir / "in.sock")
    payload = os.urandom(3 << 20)
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sockdir / "in.sock"))
        assert exchange(client, payload) == payload
    code, err = proxy.stop()
    app.close()
    assert code == 0
    line = [x for x in json_lines(err) if x["event"] == "connection"][-1]  # [0]: the probe
    assert line["destination"] == f"unix://{sockdir}/app.sock"
    assert line["dest_address"] == f"unix:{sockdir}/app.sock"
    assert line["bytes_to_dest"] == line["bytes_to_client"] == len(payload)
    assert line["end"] == "client_closed"


def test_an_unreachable_unix_destination_closes_the_client(sockdir: Path) -> None:
    proxy = ProxyProcess(
        "--listen", f"unix://{sockdir}/in.sock", "--to", f"unix://{sockdir}/none.sock",
        "--log-format", "json",
    ).wait_listening(sockdir / "in.sock")
    with socket.socket(socket.AF_UNIX) as client:
        client.connect(str(sockdir / "in.sock"))
        assert client.recv(1) == b""
    _, err = proxy.stop()
    line = [x for x in json_lines(err) if x["event"] == "connection"][-1]
    assert line["end"] == "destination_unreachable"
    assert line["error"].startswith(f"unix:{sockdir}/none.sock: ")


def test_the_allowlist_is_for_tcp_destinations_only(sockdir: Path) -> None:
    done = subprocess.run(
        [KEYUTIL, "proxy", "--listen", f"unix://{sockdir}/in.sock",
         "--to", "vsock://3:8000", "--allow", "kms:443"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert "apply to TCP destinations only" in done.stderr
    assert not (sockdir / "in.sock").exists()


def test_a_tcp_destination_still_needs_the_allowlist(sockdir: Path) -> None:
    done = subprocess.run(
        [KEYUTIL, "proxy", "--listen", f"unix://{sockdir}/in.sock",
         "--to", "tcp://127.0.0.1:4000", "--allow", "127.0.0.1:4001"],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == 2
    assert "not on the allowlist" in done.stderr


def test_an_enclave_by_name_is_looked_up_at_every_connection(sockdir: Path) -> None:
    """The enclave is "restarted" with a new CID between two connections: the running
    forwarder reaches for the new CID without a restart of its own."""
    nitro = NitroCliStandIn(sockdir)
    nitro.set([enclave("app", 16), enclave("other", 20)])
    proxy = ProxyProcess(
        "--listen", f"unix://{sockdir}/in.sock", "--to", "vsock://enclave:app:5001",
        "--connect-timeout", "0.3", "--nitro-cli", str(nitro.path), "--log-format", "json",
    ).wait_listening(sockdir / "in.sock")

    def one_connection() -> None:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(sockdir / "in.sock"))
            assert client.recv(1) == b""

    one_connection()
    nitro.set([enclave("app", 16, state="TERMINATING")])
    one_connection()
    nitro.set([enclave("app", 16, state="TERMINATING"), enclave("app", 17)])
    one_connection()
    _, err = proxy.stop()
    lines = [x for x in json_lines(err) if x["event"] == "connection"][-3:]  # not the probe
    assert [x["destination"] for x in lines] == ["vsock://enclave:app:5001"] * 3
    assert lines[0]["error"].startswith("vsock:16:5001: ")
    assert lines[1]["error"] == (
        "finding vsock://enclave:app:5001: no running enclave named 'app' (found: TERMINATING)"
    )
    assert lines[2]["error"].startswith("vsock:17:5001: ")
    assert nitro.call_count() == 4  # the probe, then the three


@pytest.mark.parametrize(
    ("listing", "message"),
    [
        ([], "no running enclave named 'app' (found: none listed)"),
        ([enclave("app", 16), enclave("app", 17)], "2 running enclaves named 'app'"),
        ([{**enclave("app", 16), "EnclaveCID": 3}], "EnclaveCID 3 is not an enclave's CID"),
        ([{**enclave("app", 16), "EnclaveCID": "16"}], "EnclaveCID '16' is not"),
        ({"EnclaveCID": 16}, "expected a JSON array"),
    ],
)
def test_enclave_lookup_refuses_what_is_not_one_running_enclave(
    listing: object, message: str
) -> None:
    import json

    with pytest.raises(EnclaveNotFound, match=message.replace("(", r"\(").replace(")", r"\)")):
        pick_cid(json.dumps(listing), "app")


def test_enclave_lookup_by_id_and_nitro_cli_failures(sockdir: Path) -> None:
    nitro = NitroCliStandIn(sockdir)
    entry = enclave("app", 21)
    nitro.set([entry])
    assert NitroCli(str(nitro.path)).find_cid(entry["EnclaveID"], 5) == 21
    with pytest.raises(EnclaveNotFound, match="did not print JSON"):
        pick_cid(b"\xff not json", "app")
    with pytest.raises(EnclaveNotFound, match="cannot run /nonexistent/nitro-cli"):
        NitroCli("/nonexistent/nitro-cli").find_cid("app", 5)
    failing = sockdir / "failing"
    failing.write_text("#!/bin/sh\nexit 4\n")
    failing.chmod(0o755)
    with pytest.raises(EnclaveNotFound, match="describe-enclaves exited 4"):
        NitroCli(str(failing)).find_cid("app", 5)
