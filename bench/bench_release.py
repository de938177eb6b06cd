"""Benchmark KMS release throughput with N concurrent clients, and the server's crypto floor.

    .venv/bin/python bench/bench_release.py [--clients 1,2,4,8] [--seconds 10] [--json]

Set-up (not timed): an NSM simulator (``keyutil sim init``), a KMS state directory
(``mock-kms identity``) and one ``mock-kms serve`` subprocess (embedded chain, the
simulator's root trusted, its image allowed for application ``app``, ``--threads`` and
``--workers`` as given, no audit log unless ``--audit-log``), polled until
``GET /v1/health`` is 200.

Clients: for each N, N client processes (``multiprocessing``, fork), one closed-loop client
each on its own keep-alive HTTP/1.1 connection. Every release is the whole protocol, nothing
pre-built: ``POST /v1/challenge``; a fresh X25519 HPKE key pair; the binding; a fresh
document from ``SimulatedNSM.attestation`` (a new P-384 leaf key and certificate and an ES384
signature per document, as the simulator does); ``POST /v1/release``; the answer's Ed25519
signature checked against the pinned identity, nonce and binding compared, the sealed key
opened and compared with the key derived from the KMS state directory. The machine's cores
are shared by the server and the clients, and the client side costs more CPU per release
than the server side (the table shows both), so the end-to-end rate is bounded by the
clients as much as by the server.

Each N runs for ``--warmup`` seconds (not counted), then ``--seconds`` measured. Reported:

(a) client-observed releases/s (releases begun and finished inside the window) and latency
    p50/p95/p99, end to end (challenge to key opened) and of the ``/v1/release`` round trip;
(b) the server's own time per release from its Prometheus ``/metrics`` (the deltas of
    ``kms_release_seconds_sum`` / ``_count`` across the window), its verification share
    (``kms_verification_seconds``), and the server process's CPU seconds per release
    (``/proc/PID/stat`` utime + stime deltas; includes challenges and HTTP).

Crypto floor, single-threaded in this process, the server idle, in rounds before, between
and after the load phases (pooled; the median per segment is shown to expose drift): the
operations that a KMS cannot avoid per release (see :func:`floor_ops`). floor = COSE ES384
verify (including loading the leaf's key) + leaf certificate signature verify (issuer key
cached) + one HPKE X25519 seal of a 32-byte key + one Ed25519 signature of a ~600-byte
answer. The uncached chain adds the three intermediate signature verifications (reported
separately). Ratios (target at least 0.6), each explained in the output.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import io
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from benchlib import (
    LocalKms,
    Op,
    cpu_seconds,
    environment,
    metric_delta,
    p384_key,
    percentile,
    run_batch,
    server_metrics,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keyutil import protocol as p
from keyutil.simulator import SimulatedNSM
from mock_kms.attestation import AttestationDocument, parse_attestation
from mock_kms.state import KmsState

APP = "app"
KEYS = (p.KeyRequest("disk", 32),)
SUITE = p.SUITE_X25519
TARGET_RATIO = 0.6
TARGET_SCALING = 1.7
ES384 = ec.ECDSA(hashes.SHA384())


# -- The clients ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prepared:
    nonce: bytes
    recipient: Any
    binding: bytes
    body: bytes
    request: bytes  # the whole HTTP request around ``body``, for :meth:`Client.send_raw`


class Client:
    """One enclave doing whole releases over one keep-alive connection."""

    # Sent with every request; bench_servers.py sets {"Connection": "close"} to make every
    # server open a connection per request, as keyutil does.
    extra_headers: ClassVar[dict[str, str]] = {}

    def __init__(self, host: str, port: int, sim_dir: Path, state_dir: Path, identity: str):
        self.host, self.port = host, port
        self.nsm = SimulatedNSM.load(sim_dir)
        self.identity = p.parse_identity(identity)
        self.state = KmsState.load_or_create(state_dir)  # to check the released key
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
            try:
                self.conn.request(
                    "POST", path, body=body,
                    headers={"Content-Type": "application/json", **self.extra_headers},
                )
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return resp.status, data
            except (http.client.HTTPException, ConnectionError):
                # A keep-alive connection the server closed: one new connection, then fail.
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def prepare(self) -> Prepared:
        """A challenge and the release body for it (a fresh key pair and document)."""
        status, data = self.post("/v1/challenge", b"")
        if status != 200:
            raise RuntimeError(f"challenge: HTTP {status} {data[:200]!r}")
        nonce = p.b64d(json.loads(data)["nonce"], "nonce")
        recipient = p.generate_recipient(SUITE)
        binding = p.request_binding(KEYS, SUITE, nonce)
        document = self.nsm.attestation(
            nonce=nonce, public_key=p.recipient_public_bytes(recipient), user_data=binding
        )
        body = json.dumps(
            {
                "version": p.PROTOCOL_VERSION,
                "suite": SUITE,
                "keys": [k.to_json() for k in KEYS],
                "attestation": p.b64e(document),
            }
        ).encode()
        return Prepared(nonce, recipient, binding, body, self.request_bytes(body))

    def send(self, prepared: Prepared) -> tuple[float, bytes]:
        """POST a prepared release: (round trip in seconds, the answer). Raises unless 200."""
        started = time.perf_counter()
        status, data = self.post("/v1/release", prepared.body)
        round_trip = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"release: HTTP {status} {data[:300]!r}")
        return round_trip, data

    def send_raw(self, prepared: Prepared) -> tuple[float, bytes]:
        """As :meth:`send`, on a new connection with the request's bytes built beforehand
        (the KMS closes the connection after a release, as it does for keyutil): a client
        that costs the machine as little as a client can, so that the KMS is what is
        measured. The answer is checked later, by :meth:`check`, like :meth:`send`'s."""
        started = time.perf_counter()
        with socket.create_connection((self.host, self.port), timeout=30) as sock:
            sock.sendall(prepared.request)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        round_trip = time.perf_counter() - started
        head, _, data = b"".join(chunks).partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"release: {head[:40]!r} {data[:300]!r}")
        return round_trip, data

    def request_bytes(self, body: bytes) -> bytes:
        return (
            f"POST /v1/release HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + body

    def release(self) -> float:
        """One whole release; the /v1/release round trip in seconds. Raises on any failure."""
        prepared = self.prepare()
        round_trip, data = self.send(prepared)
        self.check(prepared, data)
        return round_trip

    def check(self, prepared: Prepared, data: bytes) -> None:
        """The answer is the pinned KMS's, for this request, and opens to the derived key."""
        nonce, recipient, binding = prepared.nonce, prepared.recipient, prepared.binding
        answer = p.verify_answer(self.identity, json.loads(data))
        if answer["nonce"] != p.b64e(nonce) or answer["binding"] != binding.hex():
            raise RuntimeError("answer: nonce or binding is not this request's")
        application = bytes.fromhex(answer["application"][2:])
        listed = answer["keys"]
        if [(k["name"], k["length"]) for k in listed] != [(k.name, k.length) for k in KEYS]:
            raise RuntimeError(f"answer: keys {listed!r} are not the ones asked for")
        for key, item in zip(KEYS, listed, strict=True):
            opened = p.open_sealed(SUITE, recipient, key, nonce, p.b64d(item["sealed"], "sealed"))
            if opened != self.state.derive_key(application, key):
                raise RuntimeError(f"key {key.name}: opened, but not the derived key")


class DirectClient(Client):
    """A :class:`Client` that calls the WSGI app in this process: no HTTP server, no socket."""

    def __init__(self, app: Any, sim_dir: Path, state_dir: Path, identity: str) -> None:
        super().__init__("127.0.0.1", 0, sim_dir, state_dir, identity)
        self.app = app

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        status: list[str] = []
        environ = {
            "REQUEST_METHOD": "POST", "PATH_INFO": path, "QUERY_STRING": "",
            "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(body)),
            "wsgi.input": io.BytesIO(body), "REMOTE_ADDR": "127.0.0.1",
            "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "0", "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
        }
        data = b"".join(self.app(environ, lambda s, h, e=None: status.append(s)))
        return int(status[0].split()[0]), data


def in_process_app(kms: LocalKms, replay_store: str | None = None) -> tuple[DirectClient, Any]:
    """A client of the KMS app in this process, with the service that ``mock-kms serve``
    builds for ``kms``'s state and simulator (embedded chain with the image registered,
    ``--nonce-lifetime 600 --max-age 600``, the given ``--replay-store``), and the service."""
    import mock_kms.cli as cli
    from mock_kms.server import KmsApp

    service = cli._start_service(
        kms.state_dir, cli._allow_images([f"{kms.os_image_hash}={kms.app}"]), None, None, None,
        0, 2.0, 2.0, [kms.sim_dir / "root.pem"], False, 600.0, None, None, 600.0, replay_store,
    )
    return DirectClient(KmsApp(service), kms.sim_dir, kms.state_dir, kms.identity), service


def app_cost(
    client: Client, releases: int, between: Callable[[], None] | None = None
) -> dict[str, Any]:
    """``releases`` fresh releases sent one after the other by ``client`` (an
    :func:`in_process_app` one): the CPU time (of this thread) and the wall time of the calls
    per release, in ms, ``between`` run (and not counted) before each. Every answer is
    checked after."""
    ready = [client.prepare() for _ in range(releases)]
    cpu = wall = 0.0
    answers = []
    for prepared in ready:
        if between is not None:
            between()
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        answers.append(client.send(prepared)[1])
        cpu += time.thread_time() - cpu0
        wall += time.perf_counter() - wall0
    for prepared, data in zip(ready, answers, strict=True):
        client.check(prepared, data)
    return {"releases": releases, "cpu_ms_per_release": 1000 * cpu / releases,
            "wall_ms_per_release": 1000 * wall / releases}


def client_worker(
    conn: multiprocessing.connection.Connection,
    kms: tuple[str, int, str, str, str],
    precomputed: int,
) -> None:
    """Closed loop from ``begin_at`` until ``stop_at`` (time.monotonic, shared on Linux), both
    received on ``conn`` once this client has sent "ready".

    With ``precomputed`` > 0, first ask that many challenges and build their release bodies
    (documents, key pairs, the HTTP requests), then in the loop only send them, each on a new
    connection (:meth:`Client.send_raw`); every answer is checked after
    ``stop_at``, outside the window. Sends back ([(start, end, release round trip)],
    [(start, end, error text)]).
    """
    host, port, sim_dir, state_dir, identity = kms
    done: list[tuple[float, float, float]] = []
    errors: list[tuple[float, float, str]] = []
    try:
        client = Client(host, port, Path(sim_dir), Path(state_dir), identity)
        ready = [client.prepare() for _ in range(precomputed)]
        answers: list[tuple[Prepared, bytes]] = []
        conn.send("ready")
        begin_at, stop_at = conn.recv()
        while time.monotonic() < begin_at:
            time.sleep(0.005)
        while True:
            start = time.monotonic()
            if start >= stop_at:
                break
            try:
                if precomputed:
                    if not ready:
                        errors.append((start, start, "out of precomputed documents: raise --docs"))
                        break
                    prepared = ready.pop()
                    round_trip, data = client.send_raw(prepared)
                    answers.append((prepared, data))
                else:
                    round_trip = client.release()
                done.append((start, time.monotonic(), round_trip))
            except Exception as e:
                errors.append((start, time.monotonic(), f"{type(e).__name__}: {e}"[:500]))
                if len(errors) > 1000:
                    break
        for prepared, data in answers:
            try:
                client.check(prepared, data)
            except Exception as e:
                errors.append((0.0, 0.0, f"answer check: {type(e).__name__}: {e}"[:500]))
    except Exception:
        errors.append((0.0, 0.0, traceback.format_exc()[-1500:]))
    conn.send((done, errors))
    conn.close()


def run_load(
    kms: LocalKms, n: int, seconds: float, warmup: float, *, workers: int, precomputed: int = 0
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    kms_args = ("127.0.0.1", kms.port, str(kms.sim_dir), str(kms.state_dir), kms.identity)
    pipes, procs = [], []
    for _ in range(n):
        recv, send = ctx.Pipe()
        proc = ctx.Process(target=client_worker, args=(send, kms_args, precomputed))
        proc.start()
        send.close()
        pipes.append(recv)
        procs.append(proc)
    for pipe in pipes:
        if pipe.recv() != "ready":
            raise RuntimeError("a client failed to start")
    begin_at = time.monotonic() + 0.2
    t_start = begin_at + warmup
    t_end = t_start + seconds
    for pipe in pipes:
        pipe.send((begin_at, t_end))

    time.sleep(max(0.0, t_start - time.monotonic()))
    m0 = server_metrics(kms)
    w0 = time.monotonic()
    server_cpu0 = cpu_seconds(kms.pid, with_children=True)
    client_cpu0 = sum(cpu_seconds(pr.pid) for pr in procs if pr.pid is not None)
    time.sleep(max(0.0, t_end - time.monotonic()))
    m1 = server_metrics(kms)
    w1 = time.monotonic()
    server_cpu1 = cpu_seconds(kms.pid, with_children=True)
    client_cpu1 = sum(cpu_seconds(pr.pid) for pr in procs if pr.pid is not None)

    done: list[tuple[float, float, float]] = []
    errors: list[tuple[float, float, str]] = []
    for recv, proc in zip(pipes, procs, strict=True):
        d, e = recv.recv()
        done += d
        errors += e
        proc.join()
    window = w1 - w0
    inside = [r for r in done if r[0] >= t_start and r[1] <= t_end]
    e2e = [end - start for start, end, _ in inside]
    rtt = [r[2] for r in inside]
    released = metric_delta(m0, m1, "kms_release_seconds_count")
    server_outcomes = {
        k: metric_delta(m0, m1, k) for k in m1 if k.startswith("kms_releases_total{")
    }
    server_refusals = sum(v for k, v in server_outcomes.items() if 'outcome="released"' not in k)
    verif_count = metric_delta(m0, m1, "kms_verification_seconds_count")
    chain_count = metric_delta(m0, m1, "kms_chain_read_seconds_count")
    throughput = len(inside) / seconds
    server_cpu = server_cpu1 - server_cpu0
    client_cpu = client_cpu1 - client_cpu0
    return {
        "clients": n,
        "workers": workers,
        "precomputed": bool(precomputed),
        "client_mode": f"{n} processes (multiprocessing, fork), one keep-alive connection each",
        "seconds": seconds,
        "releases": len(inside),
        "releases_per_s": throughput,
        "e2e_p50_ms": 1000 * percentile(e2e, 0.5),
        "e2e_p95_ms": 1000 * percentile(e2e, 0.95),
        "e2e_p99_ms": 1000 * percentile(e2e, 0.99),
        "release_rtt_p50_ms": 1000 * percentile(rtt, 0.5),
        "release_rtt_p95_ms": 1000 * percentile(rtt, 0.95),
        "release_rtt_p99_ms": 1000 * percentile(rtt, 0.99),
        "server_releases_in_window": released,
        "server_ms_per_release": 1000
        * metric_delta(m0, m1, "kms_release_seconds_sum")
        / max(released, 1),
        "server_verify_ms_per_release": 1000
        * metric_delta(m0, m1, "kms_verification_seconds_sum")
        / max(verif_count, 1),
        "server_chain_read_ms_per_release": 1000
        * metric_delta(m0, m1, "kms_chain_read_seconds_sum")
        / max(chain_count, 1),
        "server_cpu_ms_per_release": 1000 * server_cpu / max(released, 1),
        "server_cpu_utilization": server_cpu / window,
        "client_cpu_ms_per_release": 1000 * client_cpu / max(len(inside), 1),
        "client_cpu_utilization": client_cpu / window,
        "server_refusals": server_refusals,
        "server_outcomes": server_outcomes,
        "errors": len(errors),
        "error_samples": [e[2] for e in errors[:5]],
    }


# -- The crypto floor -------------------------------------------------------------------------


def floor_ops(doc: AttestationDocument, state: KmsState) -> dict[str, Op]:
    """What a KMS must compute per release, as callables to time.

    Inputs prepared outside the timed calls, none of them crypto: the parsed document, its
    Sig_structure, the certificates' DER, the root's key (the trust anchor is configuration),
    the raw recipient key bytes, the derived 32-byte secret and a 600-byte answer.

    - ``cose_verify``: parse the leaf certificate, load its P-384 key (new on every document),
      convert the raw r||s to DER and verify ES384 over the Sig_structure;
    - ``leaf_cert_verify``: the leaf certificate's signature by ``cabundle[-1]``, whose key is
      loaded once (a cached chain knows it already);
    - ``intermediates_verify``: an uncached chain's extra work: parse ``cabundle[1:]``, load
      their keys and verify each by its parent (regional by root, zonal by regional, instance
      by zonal); the root's self-signature is not checked (it is the configured anchor);
    - ``hpke_seal``: load the attested X25519 key and seal 32 bytes (base mode, single shot);
    - ``ed25519_sign``: sign a 600-byte answer with the identity key.

    ``floor`` is cose_verify + leaf_cert_verify + hpke_seal + ed25519_sign in one call;
    ``floor_uncached`` adds intermediates_verify.
    """
    assert doc.public_key is not None and doc.nonce is not None
    sig_structure = doc.sig_structure()
    signature = doc.signature
    leaf_der = doc.certificate
    bundle = [x509.load_der_x509_certificate(d) for d in doc.cabundle]
    issuer_key = p384_key(bundle[-1])
    root_key = p384_key(bundle[0])
    intermediate_ders = list(doc.cabundle[1:])
    leaf = x509.load_der_x509_certificate(leaf_der)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA384)
    recipient_raw = doc.public_key
    nonce = doc.nonce
    secret = state.derive_key(b"app".ljust(32, b"\0"), KEYS[0])
    suite = p.hpke_suite(SUITE)
    answer = os.urandom(300).hex().encode()  # 600 bytes, about a one-key answer's size
    identity = state.identity

    def cose_verify() -> None:
        key = p384_key(x509.load_der_x509_certificate(leaf_der))
        r = int.from_bytes(signature[:48], "big")
        s = int.from_bytes(signature[48:], "big")
        key.verify(encode_dss_signature(r, s), sig_structure, ES384)

    def leaf_cert_verify(issuer: ec.EllipticCurvePublicKey = issuer_key) -> None:
        issuer.verify(leaf.signature, leaf.tbs_certificate_bytes, ES384)

    def intermediates_verify() -> ec.EllipticCurvePublicKey:
        certs = [x509.load_der_x509_certificate(d) for d in intermediate_ders]
        keys = [p384_key(c) for c in certs]
        for cert, parent in zip(certs, [root_key, *keys[:-1]], strict=True):
            parent.verify(cert.signature, cert.tbs_certificate_bytes, ES384)
        return keys[-1]

    def hpke_seal() -> bytes:
        recipient = p.load_recipient_public(SUITE, recipient_raw)
        return suite.encrypt(secret, recipient, info=p.seal_info(KEYS[0], nonce))

    def ed25519_sign() -> bytes:
        return identity.sign(answer)

    def floor() -> None:
        cose_verify()
        leaf_cert_verify()
        hpke_seal()
        ed25519_sign()

    def floor_uncached() -> None:
        cose_verify()
        leaf_cert_verify(intermediates_verify())
        hpke_seal()
        ed25519_sign()

    return {
        "floor": floor,
        "floor_uncached": floor_uncached,
        "cose_verify": cose_verify,
        "leaf_cert_verify": leaf_cert_verify,
        "intermediates_verify": intermediates_verify,
        "hpke_seal": hpke_seal,
        "ed25519_sign": ed25519_sign,
    }


class FloorBench:
    """Seconds per call of each floor op: rounds of batches in rotated order, gc off.

    :meth:`rounds` can be called several times (before and after the load phases, so that a
    change of background load on a shared machine shows in the spread); samples accumulate.
    """

    def __init__(self, kms: LocalKms) -> None:
        nsm = SimulatedNSM.load(kms.sim_dir)
        recipient = p.generate_recipient(SUITE)
        nonce = os.urandom(41)
        doc = parse_attestation(
            nsm.attestation(
                nonce=nonce,
                public_key=p.recipient_public_bytes(recipient),
                user_data=p.request_binding(KEYS, SUITE, nonce),
            )
        )
        self.ops = floor_ops(doc, KmsState.load_or_create(kms.state_dir))
        self.samples: dict[str, list[float]] = {name: [] for name in self.ops}
        self.sizes: dict[str, int] = {}

    def rounds(self, seconds: float, rounds: int) -> float:
        """Run ``rounds`` more rounds; the median ``floor`` of these rounds, in ms."""
        batch_seconds = seconds / rounds / len(self.ops)
        for name, op in self.ops.items():
            op()
            per_call = run_batch(op, 5)
            self.sizes[name] = max(5, int(batch_seconds / per_call))
        names = list(self.ops)
        for i in range(rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                self.samples[name].append(run_batch(self.ops[name], self.sizes[name]))
        return 1000 * statistics.median(self.samples["floor"][-rounds:])

    def summary(self) -> dict[str, Any]:
        return {
            name: {
                "median_ms": 1000 * statistics.median(v),
                "min_ms": 1000 * min(v),
                "max_ms": 1000 * max(v),
                "rounds": len(v),
            }
            for name, v in self.samples.items()
        }


# -- Report ---------------------------------------------------------------------------------

RATIO_NOTES = {
    "floor_over_server_time": "floor / server time per release (metrics): the share of the "
    "server's own in-handler wall time that is unavoidable crypto (with N>1, handler time "
    "also counts waiting for the GIL and the CPU, so N=1 is the fair one)",
    "floor_over_server_cpu": "floor / server CPU per release (/proc): the share of the "
    "server process's actual CPU per release (HTTP, challenge, JSON included) "
    "that is unavoidable crypto",
    "floor_over_machine_time": "floor / (cores / throughput), cores = all usable CPUs: the "
    "share of the whole machine's capacity per end-to-end release that is the KMS floor; "
    "clients (and any other load on the machine) share the cores, so it stays well below 1",
    "floor_over_busy_time": "floor / (busy cores / throughput), busy cores = measured CPU "
    "of server + clients: as above without idle time and other tenants' load, i.e. floor / "
    "(server + client CPU per release)",
}


def add_ratios(load: dict[str, Any], floor_s: float, cores: int) -> None:
    per_release = load["server_ms_per_release"] / 1000
    busy = load["server_cpu_utilization"] + load["client_cpu_utilization"]
    load["ratios"] = {
        "floor_over_server_time": floor_s / per_release if per_release else float("nan"),
        "floor_over_server_cpu": floor_s / (load["server_cpu_ms_per_release"] / 1000)
        if load["server_cpu_ms_per_release"]
        else float("nan"),
        "floor_over_machine_time": floor_s / (cores / load["releases_per_s"])
        if load["releases_per_s"]
        else float("nan"),
        "floor_over_busy_time": floor_s / (busy / load["releases_per_s"])
        if load["releases_per_s"] and busy
        else float("nan"),
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        f"bench_release  {report['date']}  nproc {report['nproc']}  load "
        f"{report['loadavg_1m']}  python {report['python']}  cryptography "
        f"{report['cryptography']}  {report['openssl']}"
    )
    print(
        f"server: mock-kms serve, workers {report['server_workers']}, "
        f"--threads {report['server_threads']} each, embedded chain, "
        f"audit log {'on' if report['audit_log'] else 'off'}"
        f"{', --quiet' if report['quiet'] else ''}; clients: N processes, one "
        f"closed-loop client and keep-alive connection each, on the same "
        f"{report['cpus_usable']} cores"
    )
    print(
        f"{report['seconds']:g} s measured per N after {report['warmup']:g} s warm-up; "
        f"latency end to end = challenge .. key opened; rtt = /v1/release round trip"
    )
    print()
    header = (
        f"{'w':>2} {'N':>2} {'rel/s':>7} {'e2e p50':>8} {'p95':>7} {'p99':>7} {'rtt p50':>8} "
        f"{'srv ms':>7} {'verify':>7} {'srv cpu':>8} {'srv%':>5} {'cli cpu':>8} {'cli%':>5} "
        f"{'err':>4} {'f/srv':>6} {'f/cpu':>6} {'f/mach':>6} {'f/busy':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in report["loads"]:
        ratios = r["ratios"]
        print(
            f"{r['workers']:>2} {r['clients']:>2} {r['releases_per_s']:>7.1f} "
            f"{r['e2e_p50_ms']:>8.1f} "
            f"{r['e2e_p95_ms']:>7.1f} {r['e2e_p99_ms']:>7.1f} {r['release_rtt_p50_ms']:>8.1f} "
            f"{r['server_ms_per_release']:>7.2f} {r['server_verify_ms_per_release']:>7.2f} "
            f"{r['server_cpu_ms_per_release']:>8.2f} {100 * r['server_cpu_utilization']:>5.0f} "
            f"{r['client_cpu_ms_per_release']:>8.2f} {100 * r['client_cpu_utilization']:>5.0f} "
            f"{r['errors']:>4} {ratios['floor_over_server_time']:>6.2f} "
            f"{ratios['floor_over_server_cpu']:>6.2f} {ratios['floor_over_machine_time']:>6.2f} "
            f"{ratios['floor_over_busy_time']:>6.2f}"
        )
    print(
        "(ms per release; srv ms and verify from /metrics; srv cpu / cli cpu from /proc; "
        "srv% / cli% = CPU use in % of one core)"
    )
    print()
    print(
        "crypto floor per release, single thread, this process, server idle (ms; rounds "
        "before, between and after the load phases):"
    )
    segments = ", ".join(f"{v:.2f}" for v in report["floor_ms_by_segment"])
    print(f"  floor median per segment (before N=1, after each N): {segments}")
    print(f"  {'operation':<22} {'median':>8} {'min':>8} {'max':>8}")
    for name, v in report["floor"].items():
        print(f"  {name:<22} {v['median_ms']:>8.3f} {v['min_ms']:>8.3f} {v['max_ms']:>8.3f}")
    print()
    print(
        f"ratios (target >= {TARGET_RATIO}), floor = {report['floor_ms']:.3f} ms (median), "
        f"f/srv, f/cpu, f/mach, f/busy in the table:"
    )
    for key, note in RATIO_NOTES.items():
        print(f"  {key}: {note}")
    for r in report["loads"]:
        verdicts = ", ".join(
            f"{key.removeprefix('floor_over_')} {value:.2f} "
            f"{'meets' if value >= TARGET_RATIO else 'MISSES'}"
            for key, value in r["ratios"].items()
        )
        print(f"  N={r['clients']}: {verdicts}")
    if report["worker_scaling"]:
        print()
        print(f"worker scaling, throughput ratio (target >= {TARGET_SCALING} for 2w/1w):")
        for key, value in report["worker_scaling"].items():
            print(f"  {key}: {value:.2f} {'meets' if value >= TARGET_SCALING else 'MISSES'}")
    total_errors = sum(r["errors"] for r in report["loads"])
    print()
    print(f"errors: {total_errors}")
    for r in report["loads"]:
        for sample in r["error_samples"]:
            print(f"  N={r['clients']}: {sample}")
        if r["server_refusals"]:
            print(f"  N={r['clients']}: server outcomes {r['server_outcomes']}")
    if report["server_exit_code"] not in (0, -signal.SIGTERM) or report["server_log_has_traceback"]:
        print(
            f"note: mock-kms exit code on SIGTERM {report['server_exit_code']}, traceback in "
            f"its log: {report['server_log_has_traceback']}"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-release-"))
    serve_args = ["--threads", str(args.threads)]
    if args.audit_log:
        serve_args += ["--audit-log", str(work / "audit.log")]
    if args.quiet:
        serve_args += ["--quiet"]
    if args.docs:
        # Documents are built before the window: they must still be fresh when sent.
        serve_args += ["--nonce-lifetime", "600", "--max-age", "600"]
    loads = []
    floor_bench: FloorBench | None = None
    floor_segments: list[float] = []
    exit_codes, tracebacks = [], False
    segment = args.floor_seconds / (len(args.clients) * len(args.workers) + 1)
    try:
        for workers in args.workers:
            kms = LocalKms(
                work / f"w{workers}", app=APP, serve_args=[*serve_args, "--workers", str(workers)]
            )
            try:
                kms.start()
                if floor_bench is None:
                    floor_bench = FloorBench(kms)
                    # Floor rounds (server idle) before, between and after the load phases, so
                    # that background load on a shared machine weighs on the floor as on loads.
                    floor_segments.append(floor_bench.rounds(segment, rounds=3))
                for n in args.clients:
                    loads.append(
                        run_load(
                            kms, n, args.seconds, args.warmup, workers=workers,
                            precomputed=args.docs,
                        )
                    )
                    floor_segments.append(floor_bench.rounds(segment, rounds=3))
            finally:
                kms.stop()
                exit_codes.append(kms.exit_code)
                tracebacks = tracebacks or kms.log_has_traceback()
        assert floor_bench is not None
        floor = floor_bench.summary()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    floor_s = floor["floor"]["median_ms"] / 1000
    cores = len(os.sched_getaffinity(0))
    for load in loads:
        add_ratios(load, floor_s, cores)
    return {
        "benchmark": "bench_release",
        **environment(),
        "seconds": args.seconds,
        "warmup": args.warmup,
        "server_threads": args.threads,
        "server_workers": args.workers,
        "precomputed_documents_per_client": args.docs,
        "audit_log": args.audit_log,
        "quiet": args.quiet,
        "client_mode": "N client processes (multiprocessing fork), closed loop, one keep-alive "
        "HTTP/1.1 connection each, on the same cores as the server"
        + (", documents built before the window" if args.docs else ""),
        "cores_used": cores,
        "loads": loads,
        "worker_scaling": worker_scaling(loads),
        "floor": floor,
        "floor_ms": floor["floor"]["median_ms"],
        "floor_uncached_ms": floor["floor_uncached"]["median_ms"],
        "floor_ms_by_segment": floor_segments,
        "target_ratio": TARGET_RATIO,
        "target_worker_scaling": TARGET_SCALING,
        "ratio_notes": RATIO_NOTES,
        "errors": sum(r["errors"] for r in loads),
        "server_exit_code": next((c for c in exit_codes if c not in (0, -signal.SIGTERM)), 0),
        "server_log_has_traceback": tracebacks,
    }


def worker_scaling(loads: Sequence[dict[str, Any]]) -> dict[str, float]:
    """For each client count measured with several worker counts: the throughput with the most
    workers over that with the fewest (target at least TARGET_SCALING for 2 over 1)."""
    out = {}
    for n in sorted({r["clients"] for r in loads}):
        by_workers = {r["workers"]: r["releases_per_s"] for r in loads if r["clients"] == n}
        if len(by_workers) > 1:
            low, high = min(by_workers), max(by_workers)
            if by_workers[low]:
                out[f"N={n}: {high}w/{low}w"] = by_workers[high] / by_workers[low]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4, 8],
        help="comma-separated client counts (1,2,4,8)",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per N (10)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured per N (1)")
    parser.add_argument("--floor-seconds", type=float, default=5.0, help="floor timing (5)")
    parser.add_argument("--threads", type=int, default=1, help="mock-kms --threads (1)")
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1],
        help="comma-separated mock-kms --workers counts, each a fresh server (1)",
    )
    parser.add_argument(
        "--docs",
        type=int,
        default=0,
        help="precompute this many documents per client before each window and only POST "
        "them in it, so that the KMS, not the clients, is the bottleneck (0: build each "
        "document in the loop)",
    )
    parser.add_argument("--audit-log", action="store_true", help="run mock-kms --audit-log")
    parser.add_argument(
        "--quiet", action="store_true", help="run mock-kms --quiet (no INFO line per release)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if not args.clients or min(args.clients) < 1 or args.seconds <= 0:
        parser.error("--clients needs positive counts and --seconds a positive time")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
