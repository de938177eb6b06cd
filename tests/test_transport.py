"""The HTTP transport over real sockets: TCP, unix, TLS with a generated CA, and vsock's family."""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from test_client import TcpServer, UnixServer, serve  # noqa: F401 (fixture)

from keyutil import transport as tr
from keyutil.transport import HttpTransport, TransportError, parse_url


def echo(method: str, path: str, body: Any) -> tuple[int, Any]:
    if path == "/big":
        return 200, b'"' + b"x" * (tr.MAX_RESPONSE_BYTES + 10) + b'"'
    if path == "/text":
        return 502, b"<html>bad gateway</html>"
    if path == "/denied":
        return 403, {"error": "image_not_allowed", "message": "no"}
    return 200, {"method": method, "path": path, "body": body}


# -- URLs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "family", "address", "host"),
    [
        ("http://127.0.0.1:8000", socket.AF_INET, ("127.0.0.1", 8000), "127.0.0.1"),
        ("http://[::1]:8000", socket.AF_INET6, ("::1", 8000), "::1"),
        ("https://kms.example:443", socket.AF_UNSPEC, ("kms.example", 443), "kms.example"),
        ("unix:///run/kms.sock", socket.AF_UNIX, "/run/kms.sock", "localhost"),
        ("vsock://3:8000", socket.AF_VSOCK, (3, 8000), "localhost"),
    ],
)
def test_parse_url(url: str, family: int, address: Any, host: str) -> None:
    endpoint = parse_url(url)
    assert (endpoint.family, endpoint.address, endpoint.host) == (family, address, host)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://x:1",
        "http://x",
        "http://x:0",
        "http://x:99999",
        "http://x:1/path",
        "http://u:p@x:1",
        "vsock://parent:8000",
        "unix://relative.sock",
        "http://x:1?q",
    ],
)
def test_parse_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


def test_ca_file_only_for_https(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        HttpTransport.from_url("http://127.0.0.1:1", ca_file=str(tmp_path / "ca.pem"))


# -- TCP and unix -----------------------------------------------------------------------------


@pytest.fixture(params=["tcp", "unix"])
def url(request: pytest.FixtureRequest, serve: Callable[[Any], str], tmp_path: Path) -> str:  # noqa: F811
    if request.param == "tcp":
        return serve(TcpServer(echo))
    return serve(UnixServer(tmp_path / "kms.sock", echo))


def test_get_and_post_json(url: str) -> None:
    kms = HttpTransport.from_url(url)
    assert kms.request("GET", "/v1/health", timeout=5).json["method"] == "GET"
    response = kms.request("POST", "/v1/release", {"a": [1]}, timeout=5)
    assert response.status == 200
    assert response.json == {"method": "POST", "path": "/v1/release", "body": {"a": [1]}}


def test_error_statuses_are_responses_not_exceptions(url: str) -> None:
    kms = HttpTransport.from_url(url)
    denied = kms.request("GET", "/denied", timeout=5)
    assert (denied.status, denied.json["error"]) == (403, "image_not_allowed")
    text = kms.request("GET", "/text", timeout=5)
    assert (text.status, text.json) == (502, None)


def test_response_size_is_bounded(url: str) -> None:
    with pytest.raises(TransportError) as info:
        HttpTransport.from_url(url).request("GET", "/big", timeout=5)
    assert info.value.code == "bad_response"


def test_connection_refused_is_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError) as info:
        HttpTransport.from_url(f"http://127.0.0.1:{port}").request("GET", "/", timeout=2)
    assert info.value.code == "unreachable"


def test_missing_unix_socket_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(TransportError) as info:
        HttpTransport.from_url(f"unix://{tmp_path}/none.sock").request("GET", "/", timeout=2)
    assert info.value.code == "unreachable"


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """Accepts connections (the kernel does) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s


def test_silent_server_times_out_on_time(silent_listener: socket.socket) -> None:
    port = silent_listener.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        HttpTransport.from_url(f"http://127.0.0.1:{port}").request("GET", "/", timeout=0.5)
    assert info.value.code == "timeout"
    assert time.monotonic() - start < 0.7


def test_trickling_server_cannot_stretch_a_request() -> None:
    # One byte every 0.1 s: each recv succeeds, but the whole request is bounded.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        stop = threading.Event()

        def trickle() -> None:
            conn, _ = s.accept()
            with conn:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                    if stop.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(0.1)

        worker = threading.Thread(target=trickle, daemon=True)
        worker.start()
        start = time.monotonic()
        with pytest.raises(TransportError) as info:
            HttpTransport.from_url(f"http://127.0.0.1:{s.getsockname()[1]}").request(
                "GET", "/", timeout=0.6
            )
        stop.set()
        assert info.value.code == "timeout"
        assert time.monotonic() - start < 0.8


def one_reply(end_of_request: bytes, reply: bytes) -> TransportError:
    """What the transport raises against a peer that reads the request up to
    ``end_of_request``, sends ``reply`` and hangs up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)

        def answer() -> None:
            conn, _ = s.accept()
            with conn:
                request = b""
                while not request.endswith(end_of_request):  # all of it: no reset on close
                    request += conn.recv(65536)
                conn.sendall(reply)

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(TransportError) as info:
            HttpTransport.from_url(f"http://127.0.0.1:{s.getsockname()[1]}").request(
                "POST", "/v1/release", {}, timeout=5
            )
        return info.value


def test_garbage_is_a_bad_response() -> None:
    error = one_reply(b"\r\n\r\n{}", b"SSH-2.0-OpenSSH\r\n\r\n")
    assert error.code in ("bad_response", "unreachable")


@pytest.mark.parametrize("status", [200, 403])
def test_response_cut_short_is_a_bad_response_not_an_answer(status: int) -> None:
    # A KMS killed (or a host hanging up) in the middle of the body: neither a truncated
    # answer nor a truncated denial may be taken for what the KMS said.
    error = one_reply(
        b"\r\n\r\n{}",
        f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n".encode()
        + b'Content-Length: 100\r\n\r\n{"error":"image_not_allowed"}',
    )
    assert error.code == "bad_response" and "cut short at 29 of 100" in error.message


def test_no_time_left_means_no_request() -> None:
    with pytest.raises(TransportError):
        HttpTransport.from_url("http://127.0.0.1:1").request("GET", "/", timeout=0)


# -- vsock ------------------------------------------------------------------------------------
# This machine has /dev/vsock but no vsock loopback, so AF_VSOCK cannot be driven end to end
# here. The vsock path shares everything with TCP and unix except the (family, address) pair
# handed to connect(), which is what these tests pin down; a failed connect must be a clean
# "unreachable", never a crash.


def test_vsock_connects_with_family_and_cid_port(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, Any]] = []

    class Spy(tr._DeadlineSocket):
        def connect(self, address: Any) -> None:
            seen.append((self.family, address))
            raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(tr, "_DeadlineSocket", Spy)
    with pytest.raises(TransportError) as info:
        HttpTransport.from_url("vsock://3:8000").request("GET", "/v1/health", timeout=1)
    assert info.value.code == "unreachable"
    assert seen == [(socket.AF_VSOCK, (3, 8000))]


@pytest.mark.parametrize("cid", [1, 2, 4_000_000_000])
def test_vsock_to_an_absent_peer_is_unreachable(cid: int) -> None:
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        HttpTransport.from_url(f"vsock://{cid}:9").request("GET", "/v1/health", timeout=0.3)
    assert info.value.code in ("unreachable", "timeout")
    assert time.monotonic() - start < 0.5


# -- TLS --------------------------------------------------------------------------------------


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, ca_key: Any
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    return builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("pki")
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _cert("keyutil test CA", ca_key, None, ca_key)
    server = _cert("localhost", server_key, ca, ca_key)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(server.public_bytes(pem))
    (directory / "server.key").write_bytes(
        server_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    (directory / "other-ca.pem").write_bytes(
        _cert("other CA", other_key, None, other_key).public_bytes(pem)
    )
    return {p.stem: p for p in directory.iterdir()}


@pytest.fixture
def https_url(pki: dict[str, Path], serve: Callable[[Any], str]) -> str:  # noqa: F811
    server = TcpServer(echo)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["server"], pki["server"].with_suffix(".key"))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return serve(server).replace("http://127.0.0.1", "https://localhost")


def test_https_with_the_kms_ca(https_url: str, pki: dict[str, Path]) -> None:
    kms = HttpTransport.from_url(https_url, ca_file=str(pki["ca"]))
    assert kms.request("POST", "/v1/challenge", timeout=5).json["path"] == "/v1/challenge"


@pytest.mark.parametrize("ca", [None, "other-ca"])
def test_https_with_an_untrusted_certificate_is_unreachable(
    https_url: str, pki: dict[str, Path], ca: str | None
) -> None:
    kms = HttpTransport.from_url(https_url, ca_file=str(pki[ca]) if ca else None)
    with pytest.raises(TransportError) as info:
        kms.request("GET", "/v1/health", timeout=5)
    assert info.value.code == "unreachable" and "TLS" in info.value.message


def test_https_checks_the_host_name(https_url: str, pki: dict[str, Path]) -> None:
    # The certificate names localhost and 127.0.0.1; reach it under another name.
    port = https_url.rsplit(":", 1)[1]
    kms = HttpTransport(
        tr.Endpoint("https", socket.AF_INET, ("127.0.0.1", int(port)), "kms.example"),
        ca_file=str(pki["ca"]),
    )
    with pytest.raises(TransportError):
        kms.request("GET", "/v1/health", timeout=5)
