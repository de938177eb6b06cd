"""What the benchmark scripts share: a local KMS, machine facts, timing helpers.

    >>> from benchlib import LocalKms                                # doctest: +SKIP
    >>> kms = LocalKms(Path("/tmp/work"), app="app"); kms.start()    # doctest: +SKIP

Imported by path: the scripts run as ``.venv/bin/python bench/NAME.py``, which puts this
folder first on ``sys.path``.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cryptography
from cryptography import x509
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families

VENV_BIN = Path(sys.executable).parent
PYTHON = str(VENV_BIN / "python")
KEYUTIL = str(VENV_BIN / "keyutil")
MOCK_KMS = str(VENV_BIN / "mock-kms")

Op = Callable[[], object]
CLK_TCK = os.sysconf("SC_CLK_TCK")


def environment() -> dict[str, Any]:
    """The date and the machine, for every report."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "python_executable": PYTHON,
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
        "platform": platform.platform(),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def run_batch(op: Op, n: int) -> float:
    """Seconds per operation over one batch of ``n`` calls, gc off."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(n):
            op()
        return (time.perf_counter() - start) / n
    finally:
        if gc_was_enabled:
            gc.enable()


def p384_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp384r1"
    return key


def children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (a KMS's workers, socat's connections)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def proc_memory_kib(pid: int, *, with_children: bool = False) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the resident peak so far) of a live process, in KiB;
    with ``with_children``, summed with its live children's (shared pages counted in each)."""
    values = {"VmRSS": 0, "VmHWM": 0}
    for p in [pid, *(children(pid) if with_children else [])]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name in values:
                        values[name] += int(rest.split()[0])  # "  12345 kB"
        except OSError:
            if p == pid:
                raise
    return values


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server on a free loopback port, its files in ``work``: (process, URL)."""
    port = free_port()
    (work / "redis").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--dir", str(work / "redis")],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """utime + stime of a live process, from /proc; with ``with_children``, plus those of its
    live children (socat forks one per connection). A child gone meanwhile counts 0."""
    pids = [pid, *(children(pid) if with_children else [])]
    total = 0.0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            if p == pid:
                raise
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {'name{label="value",...}': value}, read by
    prometheus_client's own parser; labels in the order the exposition gives them."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={json.dumps(v)}" for k, v in sample.labels.items())
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


class LocalKms:
    """A simulator directory, a KMS state directory and one ``mock-kms serve`` on loopback,
    with the simulator's image registered for ``app`` on the embedded chain (with
    ``embedded=False`` nothing is registered: ``serve_args`` name an external chain)."""

    def __init__(
        self, work: Path, *, app: str, serve_args: Sequence[str] = (), embedded: bool = True
    ) -> None:
        self.work = work
        self.app = app
        self.serve_args = list(serve_args)
        self.embedded = embedded
        self.sim_dir = work / "sim"
        self.state_dir = work / "state"
        self.log_path = work / "kms.log"
        info = json.loads(
            subprocess.run(
                [KEYUTIL, "sim", "init", str(self.sim_dir), "--json"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
        )
        self.os_image_hash: str = info["os_image_hash"]
        self.identity = subprocess.run(
            [MOCK_KMS, "identity", "--state-dir", str(self.state_dir)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_code: int | None = None
        # What runs ``serve``: mock-kms itself, or a launcher taking the same arguments.
        self.command = [MOCK_KMS]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        argv = [
            *self.command,
            "serve",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            "--trust-root",
            str(self.sim_dir / "root.pem"),
            *(["--allow-image", f"{self.os_image_hash}={self.app}"] if self.embedded else []),
            *self.serve_args,
        ]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mock-kms exited early:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"mock-kms not healthy after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.exit_code = self.proc.returncode
        self.proc = None

    def log_has_traceback(self) -> bool:
        return "Traceback" in self.log_path.read_text(errors="replace")


def server_metrics(kms: LocalKms) -> dict[str, float]:
    """The KMS's ``/metrics`` now, parsed."""
    with urllib.request.urlopen(kms.url + "/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def crossed_ca_document(
    root: x509.Certificate, attackers: int, at: datetime.datetime
) -> bytes:
    """The review's CPU attack on the chain builder (issue 14.4), made at ``at``: a document
    whose cabundle is a trusted ``root`` (its exact bytes) followed by ``attackers`` CA
    certificates of one attacker key, all named alike so that each could issue each other
    (the first one naming ``root`` as its issuer), and a leaf under them that signs the
    document. No enclave, no AWS key: anyone can send it."""
    from cryptography.hazmat.primitives import hashes

    from keyutil.simulator import der, encode_map, make_leaf, new_key, payload_fields, sign1

    key = new_key()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Attacker CA")])
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )
    cas = [
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(root.subject if i == 0 else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - datetime.timedelta(days=1))
        .not_valid_after(at + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA384())
        for i in range(attackers)
    ]
    leaf_key = new_key()
    module_id = "i-0123456789abcdef0-enc0123456789abcdef"
    leaf = make_leaf(
        module_id=module_id, key=leaf_key, issuer=cas[-1], issuer_key=key,
        not_before=at - datetime.timedelta(seconds=3), not_after=at + datetime.timedelta(hours=3),
    )
    fields = payload_fields(
        module_id=module_id, timestamp_ms=int(at.timestamp() * 1000),
        pcrs={i: bytes([i + 1]) * 48 for i in range(16)}, certificate=der(leaf),
        cabundle=[der(root)] + [der(c) for c in cas], public_key=None, user_data=None, nonce=None,
    )
    return sign1(encode_map(fields), leaf_key)
class Flood:
    """``connections`` sockets from ``source`` that trickle a request one byte at a time and
    reconnect when cut; plus ``dribblers`` keep-alive connections that finish one request
    and then send a byte every few seconds. One thread, non-blocking sockets, bounded."""

    HEAD = b"POST /v1/release HTTP/1.1\r\nHost: kms\r\nContent-Length: 100\r\n\r\n" + b"x" * 99

    def __init__(self, url: str, source: str, connections: int, dribblers: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        self.source, self.connections, self.dribblers = source, connections, dribblers
        self.open_peak = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _connect(self, source: str) -> socket.socket | None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        try:
            sock.connect(self.address)
        except BlockingIOError:
            pass
        except OSError:
            sock.close()
            return None
        return sock

    def _run(self) -> None:
        socks: dict[socket.socket, int] = {}  # socket: bytes of HEAD sent
        dribble: dict[socket.socket, int] = {}
        get = b"GET /v1/identity HTTP/1.1\r\nHost: kms\r\n\r\n"
        while not self._stop.is_set():
            budget = 200  # reconnects per round (a round is about 0.5 s): bounded
            while len(socks) < self.connections and budget > 0:
                s = self._connect(self.source)
                budget -= 1
                if s is None:
                    break
                socks[s] = 0
                self.reconnects += 1
            while len(dribble) < self.dribblers:
                s = self._connect("127.0.0.3")
                if s is None:
                    break
                dribble[s] = -1  # first a whole request, then a byte at a time
            self.open_peak = max(self.open_peak, len(socks))
            for s, sent in list(socks.items()) + list(dribble.items()):
                book = socks if s in socks else dribble
                try:
                    if sent == -1:
                        s.send(get)
                        book[s] = 0
                    else:
                        s.send(self.HEAD[sent % len(self.HEAD) : sent % len(self.HEAD) + 1])
                        book[s] = sent + 1
                    if s.recv(65536) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:
                    s.close()
                    del book[s]
            self._stop.wait(0.5)
        for s in [*socks, *dribble]:
            s.close()

    def __enter__(self) -> Flood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
