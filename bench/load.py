"""Load test: many concurrent enclaves doing whole releases against one ``mock-kms serve``.

    nice .venv/bin/python bench/load.py [--seconds 60] [--warmup 10] [--processes 4]
        [--threads 2] [--audit-log | --no-audit-log] [--rpc-url URL --chain-id N | --anvil]
        [--workers N] [--redis]

Set-up: an NSM simulator (``keyutil sim init``), a KMS state directory and one
``mock-kms serve`` process on a free loopback port (``benchlib.LocalKms``), its image allowed
for application ``app``: on the embedded chain (default); or on a JSON-RPC chain, where a
fresh allowlist contract is deployed and the image registered with ``kms-gov`` (``--rpc-url``
with ``KMS_GOV_PRIVATE_KEY`` set to a funded key; ``--anvil`` starts a local anvil from
``node_modules`` and funds a throwaway key itself). Audit log on by default. ``--workers``
is passed to ``mock-kms serve``; ``--redis`` starts a ``redis-server`` on loopback as its
``--replay-store``. CPU and memory are the KMS's, its workers' included.

Clients: ``--processes`` worker processes (real parallelism, whatever the GIL does), each
running ``--threads`` threads; each thread is one enclave in a closed loop, doing what
``keyutil get-key`` does once per attempt, through the client library
(:func:`keyutil.client.exchange`): ``GET /v1/health``, ``POST /v1/challenge``, a fresh HPKE key
pair and a fresh attestation document from the simulator, ``POST /v1/release``, the answer's
signature checked against the pinned KMS identity, nonce and binding compared, the sealed key
opened; then the opened key is compared with the key derived from the state directory. Every
failure counts as an error, by its code (a ``keyutil`` release error code, or
``key_mismatch``); nothing is retried.

Phases: ``--warmup`` seconds (errors count, figures do not), then ``--seconds`` measured.
Reported over the measured window: releases begun and finished inside it, throughput, latency
p50/p95/p99 of the whole release (health to key opened) and of the ``/v1/release`` round trip;
the server's own release time (``kms_release_seconds`` from ``/metrics``: mean, and p50/p95/p99
interpolated within its histogram buckets); the server's CPU; its memory (VmRSS and VmHWM from
``/proc/PID/status``) at the end of the warm-up and at the end, with the growth in between.

Exit status: 0 when there was no error, the RSS grew by at most ``--max-growth`` percent
(default 10) after the warm-up, and the KMS stopped cleanly without a traceback; 1 otherwise.
The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchlib import (
    VENV_BIN,
    LocalKms,
    cpu_seconds,
    environment,
    free_port,
    metric_delta,
    percentile,
    proc_memory_kib,
    server_metrics,
    start_redis,
)

from keyutil import protocol
from keyutil.client import ReleaseError, ReleaseRequest, exchange
from keyutil.simulator import SimulatedNSM
from keyutil.transport import HttpResponse, HttpTransport
from mock_kms.state import KmsState

APP = "app"
KEY_NAME = "disk"
ROOT = Path(__file__).resolve().parent.parent
ANVIL = ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
KMS_GOV = str(VENV_BIN / "kms-gov")
ATTEMPT_TIME = 30.0  # seconds one whole release may take before it counts as a timeout

# (started, ended, release round trip in s or None, error code or None), time.monotonic
Attempt = tuple[float, float, float | None, str | None]


# -- Clients --------------------------------------------------------------------------------


class TimedTransport:
    """An :class:`HttpTransport` that remembers how long its last ``/v1/release`` took."""

    def __init__(self, inner: HttpTransport) -> None:
        self.inner = inner
        self.release_rtt: float | None = None

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, *, timeout: float
    ) -> HttpResponse:
        started = time.perf_counter()
        try:
            return self.inner.request(method, path, body, timeout=timeout)
        finally:
            if path == "/v1/release":
                self.release_rtt = time.perf_counter() - started


def client_loop(
    kms: Mapping[str, str], expected: bytes, begin_at: float, stop_at: float, out: list[Attempt]
) -> None:
    """One enclave: whole releases from ``begin_at`` until ``stop_at``, into ``out``."""
    transport = TimedTransport(HttpTransport.from_url(kms["url"]))
    nsm = SimulatedNSM.load(Path(kms["sim_dir"]))
    request = ReleaseRequest.build([KEY_NAME], identity=kms["identity"])
    while time.monotonic() < begin_at:
        time.sleep(0.005)
    while (start := time.monotonic()) < stop_at:
        transport.release_rtt = None
        code: str | None = None
        try:
            release = exchange(transport, nsm, request, time_left_s=ATTEMPT_TIME)
            if bytes(release.keys[0].value) != expected:
                code = "key_mismatch"
            release.wipe()
        except ReleaseError as e:
            code = e.code
        except Exception as e:  # a bug in the client or the simulator: counted, not fatal
            code = f"exception_{type(e).__name__}"
        out.append((start, time.monotonic(), transport.release_rtt, code))


def client_process(
    conn: multiprocessing.connection.Connection,
    kms: Mapping[str, str],
    threads: int,
    begin_at: float,
    stop_at: float,
) -> None:
    """``threads`` enclaves in one process; sends back every attempt (or a traceback)."""
    try:
        state = KmsState.load_or_create(Path(kms["state_dir"]))
        application = APP.encode().ljust(32, b"\0")
        expected = state.derive_key(application, protocol.KeyRequest(KEY_NAME, 32))
        results: list[list[Attempt]] = [[] for _ in range(threads)]
        workers = [
            threading.Thread(target=client_loop, args=(kms, expected, begin_at, stop_at, out))
            for out in results
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        conn.send(("ok", [a for out in results for a in out]))
    except Exception:
        conn.send(("crash", traceback.format_exc()[-2000:]))
    finally:
        conn.close()


# -- The chain, when it is not the embedded one ---------------------------------------------


def rpc(url: str, method: str, params: list[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        answer = json.loads(r.read())
    if "error" in answer:
        raise RuntimeError(f"{method}: {answer['error']}")
    return answer["result"]


def start_anvil(work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """A local anvil node and a funded throwaway signer: (process, url, private key)."""
    from eth_account import Account

    if not ANVIL.exists():
        raise SystemExit(f"{ANVIL} is missing: run `npm ci` at the repository root")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(work / "anvil.log", "wb") as log:
        node = subprocess.Popen(
            [str(ANVIL), "--host", "127.0.0.1", "--port", str(port), "--accounts", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            rpc(url, "eth_chainId", [])
            break
        except OSError:
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"anvil did not start: see {work / 'anvil.log'}") from None
            time.sleep(0.1)
    signer = Account.create()
    rpc(url, "anvil_setBalance", [signer.address, hex(10**19)])
    return node, url, "0x" + bytes(signer.key).hex()


def register_on_chain(kms: LocalKms, url: str, chain_id: int, private_key: str) -> str:
    """Deploy an allowlist contract with kms-gov and allow the simulator's image on it."""
    env = {
        **os.environ,
        "KMS_GOV_RPC_URL": url,
        "KMS_GOV_CHAIN_ID": str(chain_id),
        "KMS_GOV_PRIVATE_KEY": private_key,
    }
    deployed = subprocess.run(
        [KMS_GOV, "deploy", "--json"], env=env, capture_output=True, text=True, check=False
    )
    if deployed.returncode != 0:
        raise RuntimeError(f"kms-gov deploy: {deployed.stderr.strip()}")
    contract = str(json.loads(deployed.stdout)["address"])
    added = subprocess.run(
        [KMS_GOV, "add-image", kms.os_image_hash, "--app", APP, "--contract", contract],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if added.returncode != 0:
        raise RuntimeError(f"kms-gov add-image: {added.stderr.strip()}")
    return contract


# -- Server figures -------------------------------------------------------------------------


def histogram_quantile(
    before: Mapping[str, float], after: Mapping[str, float], name: str, q: float
) -> float:
    """The ``q`` quantile of the observations between two scrapes of histogram ``name``,
    interpolated linearly inside its bucket (as Prometheus's ``histogram_quantile``)."""
    buckets = []
    for key, value in after.items():
        if key.startswith(name + "_bucket{") and 'le="' in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(le), value - before.get(key, 0.0)))
    buckets.sort()
    if not buckets or buckets[-1][1] <= 0:
        return float("nan")
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count) if count > lower_count else 0
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return float("nan")


class Sampler:
    """The KMS's memory every ``every`` seconds, in a thread of this (mostly idle) process."""

    def __init__(self, pid: int, every: float = 5.0) -> None:
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, VmRSS, VmHWM) in KiB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict[str, int]:
        memory = proc_memory_kib(self.pid, with_children=True)
        self.samples.append((time.monotonic(), memory["VmRSS"], memory["VmHWM"]))
        return memory

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# -- The run --------------------------------------------------------------------------------


def ms(values: Sequence[float], q: float) -> float:
    return round(1000 * percentile(values, q), 2)


def serve_args(
    args: argparse.Namespace, work: Path, chain: Mapping[str, Any], redis_url: str | None = None
) -> list[str]:
    argv = ["--threads", str(args.kms_threads)]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    if redis_url is not None:
        argv += ["--replay-store", redis_url]
    if args.audit_log:
        argv += ["--audit-log", str(work / "audit.log")]
    if chain:
        argv += ["--rpc-url", chain["url"], "--contract", chain["contract"]]
        argv += ["--chain-id", str(chain["chain_id"])]
    return argv


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    anvil: subprocess.Popen[bytes] | None = None
    chain: dict[str, Any] = {}
    kms: LocalKms | None = None
    redis: subprocess.Popen[bytes] | None = None
    try:
        if args.anvil or args.rpc_url:
            if args.anvil:
                anvil, url, key = start_anvil(work)
            else:
                url, key = args.rpc_url, os.environ.get("KMS_GOV_PRIVATE_KEY", "")
                if not key:
                    raise SystemExit("--rpc-url needs KMS_GOV_PRIVATE_KEY (a funded key)")
            chain = {"url": url, "chain_id": args.chain_id or int(rpc(url, "eth_chainId", []), 16)}
        kms = LocalKms(work, app=APP, embedded=not chain)
        if chain:
            chain["contract"] = register_on_chain(kms, chain["url"], chain["chain_id"], key)
        redis_url = None
        if args.redis:
            redis, redis_url = start_redis(work)
        kms.serve_args = serve_args(args, work, chain, redis_url)
        kms.start()
        return measure(args, kms, chain)
    finally:
        if kms is not None:
            kms.stop()
        for proc in (anvil, redis):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, kms: LocalKms, chain: Mapping[str, Any]) -> dict[str, Any]:
    config = {
        "url": kms.url,
        "sim_dir": str(kms.sim_dir),
        "state_dir": str(kms.state_dir),
        "identity": kms.identity,
    }
    context = multiprocessing.get_context("fork")
    begin_at = time.monotonic() + 2.0  # time for every process to load its simulator
    measure_at = begin_at + args.warmup
    stop_at = measure_at + args.seconds
    pipes, procs = [], []
    for _ in range(args.processes):
        parent, child = context.Pipe(duplex=False)
        proc = context.Process(
            target=client_process, args=(child, config, args.threads, begin_at, stop_at)
        )
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    sampler = Sampler(kms.pid)
    sampler.start()

    time.sleep(max(0.0, measure_at - time.monotonic()))
    metrics_start = server_metrics(kms)
    cpu_start = cpu_seconds(kms.pid, with_children=True)
    memory_warm = sampler.sample()
    print(
        f"warm-up done: RSS {memory_warm['VmRSS'] / 1024:.1f} MiB, "
        f"HWM {memory_warm['VmHWM'] / 1024:.1f} MiB; measuring {args.seconds:g} s",
        file=sys.stderr,
    )
    time.sleep(max(0.0, stop_at - time.monotonic()))
    metrics_end = server_metrics(kms)
    cpu_end = cpu_seconds(kms.pid, with_children=True)
    memory_end = sampler.sample()

    attempts: list[Attempt] = []
    crashes: list[str] = []
    for pipe, proc in zip(pipes, procs, strict=True):
        status, payload = pipe.recv()
        if status == "ok":
            attempts.extend(payload)
        else:
            crashes.append(payload)
        proc.join()
    sampler.stop()
    kms.stop()

    window = [a for a in attempts if a[0] >= measure_at and a[1] <= stop_at]
    released = [a for a in window if a[3] is None]
    errors = collections.Counter(a[3] for a in attempts if a[3] is not None)
    errors.update({"client_process_crashed": len(crashes)} if crashes else {})
    count = metric_delta(metrics_start, metrics_end, "kms_release_seconds_count")
    total = metric_delta(metrics_start, metrics_end, "kms_release_seconds_sum")
    growth = 100 * (memory_end["VmRSS"] - memory_warm["VmRSS"]) / memory_warm["VmRSS"]
    hwm_growth = 100 * (memory_end["VmHWM"] - memory_warm["VmHWM"]) / memory_warm["VmHWM"]
    server_ok = kms.exit_code in (0, -15) and not kms.log_has_traceback()
    e2e = [a[1] - a[0] for a in released]
    rtt = [a[2] for a in released if a[2] is not None]
    return {
        "benchmark": "load",
        **environment(),
        "chain": "rpc" if chain else "embedded",
        "workers": args.workers,
        "replay_store": "redis" if args.redis else "sqlite",
        "rpc_url": chain.get("url"),
        "audit_log": args.audit_log,
        "kms_threads": args.kms_threads,
        "processes": args.processes,
        "threads_per_process": args.threads,
        "clients": args.processes * args.threads,
        "warmup_s": args.warmup,
        "seconds": args.seconds,
        "releases": len(released),
        "releases_total": sum(1 for a in attempts if a[3] is None),
        "attempts_total": len(attempts),
        "errors": sum(errors.values()),
        "errors_by_code": dict(errors),
        "client_crashes": crashes,
        "releases_per_s": round(len(released) / args.seconds, 2),
        "e2e_ms": {"p50": ms(e2e, 0.5), "p95": ms(e2e, 0.95), "p99": ms(e2e, 0.99)},
        "release_rtt_ms": {"p50": ms(rtt, 0.5), "p95": ms(rtt, 0.95), "p99": ms(rtt, 0.99)},
        "server_release_ms": {
            "mean": round(1000 * total / count, 2) if count else float("nan"),
            **{
                f"p{round(100 * q)}": round(
                    1000 * histogram_quantile(metrics_start, metrics_end, "kms_release_seconds", q),
                    2,
                )
                for q in (0.5, 0.95, 0.99)
            },
            "count": int(count),
        },
        "server_cpu_percent": round(100 * (cpu_end - cpu_start) / args.seconds, 1),
        "memory_kib": {"warm": memory_warm, "end": memory_end},
        "rss_growth_percent": round(growth, 2),
        "hwm_growth_percent": round(hwm_growth, 2),
        "max_growth_percent": args.max_growth,
        "memory_timeline_kib": [
            (round(t - measure_at, 1), rss, hwm) for t, rss, hwm in sampler.samples
        ],
        "server_exit_code": kms.exit_code,
        "server_log_has_traceback": kms.log_has_traceback(),
        "ok": not errors and growth <= args.max_growth and server_ok,
    }


def print_report(r: dict[str, Any]) -> None:
    print(
        f"load  {r['date']}  nproc {r['nproc']} (usable {r['cpus_usable']})  loadavg "
        f"{r['loadavg_1m']}  python {r['python']}  cryptography {r['cryptography']}  "
        f"{r['openssl']}  {r['platform']}"
    )
    print(
        f"mock-kms serve: {r['kms_threads']} threads, {r['chain']} chain"
        f"{' ' + r['rpc_url'] if r['rpc_url'] else ''}, audit log "
        f"{'on' if r['audit_log'] else 'off'}; clients: {r['processes']} processes x "
        f"{r['threads_per_process']} threads = {r['clients']} enclaves, closed loop, "
        f"whole protocol per release (health, challenge, attest, release, verify, open)"
    )
    print(f"{r['warmup_s']:g} s warm-up, then {r['seconds']:g} s measured")
    print()
    print(f"releases (measured)      {r['releases']}  ({r['releases_total']} in all)")
    print(f"throughput               {r['releases_per_s']:.1f} releases/s")
    e2e, rtt, srv = r["e2e_ms"], r["release_rtt_ms"], r["server_release_ms"]
    print(f"release, end to end      p50 {e2e['p50']} ms  p95 {e2e['p95']} ms  p99 {e2e['p99']} ms")
    print(f"/v1/release round trip   p50 {rtt['p50']} ms  p95 {rtt['p95']} ms  p99 {rtt['p99']} ms")
    print(
        f"server, per release      mean {srv['mean']} ms  p50 {srv['p50']} ms  p95 {srv['p95']} "
        f"ms  p99 {srv['p99']} ms  (histogram estimate, {srv['count']} releases)"
    )
    print(f"server CPU               {r['server_cpu_percent']} % of one core")
    warm, end = r["memory_kib"]["warm"], r["memory_kib"]["end"]
    print(
        f"server memory            RSS {warm['VmRSS'] / 1024:.1f} -> {end['VmRSS'] / 1024:.1f} "
        f"MiB ({r['rss_growth_percent']:+.2f} %, limit {r['max_growth_percent']:g} %); "
        f"HWM {warm['VmHWM'] / 1024:.1f} -> {end['VmHWM'] / 1024:.1f} MiB "
        f"({r['hwm_growth_percent']:+.2f} %)"
    )
    print(f"errors                   {r['errors']}")
    for code, n in sorted(r["errors_by_code"].items()):
        print(f"  {code}: {n}")
    for crash in r["client_crashes"]:
        print(f"  client process crashed:\n{crash}")
    if r["server_exit_code"] not in (0, -15) or r["server_log_has_traceback"]:
        print(
            f"mock-kms exit code {r['server_exit_code']}, traceback in its log: "
            f"{r['server_log_has_traceback']}"
        )
    print("result                   " + ("ok" if r["ok"] else "FAILED"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time (60)")
    parser.add_argument("--warmup", type=float, default=10.0, help="warm-up before (10)")
    parser.add_argument("--processes", type=int, default=4, help="client processes (4)")
    parser.add_argument("--threads", type=int, default=2, help="clients per process (2)")
    parser.add_argument("--kms-threads", type=int, default=1, help="mock-kms --threads (1)")
    parser.add_argument("--workers", type=int, help="mock-kms --workers (its default: CPUs)")
    parser.add_argument(
        "--redis", action="store_true", help="start a redis-server as the --replay-store"
    )
    parser.add_argument(
        "--audit-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run mock-kms with --audit-log (default on)",
    )
    chain = parser.add_mutually_exclusive_group()
    chain.add_argument("--rpc-url", help="JSON-RPC chain (needs KMS_GOV_PRIVATE_KEY)")
    chain.add_argument("--anvil", action="store_true", help="start a local anvil as the chain")
    parser.add_argument("--chain-id", type=int, help="with --rpc-url (default: ask the node)")
    parser.add_argument(
        "--max-growth", type=float, default=10.0, help="RSS growth allowed after warm-up, %% (10)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.processes < 1 or args.threads < 1:
        parser.error("--seconds, --processes and --threads must be positive")
    report = run(args)
    print_report(report)
    print(json.dumps(report, separators=(",", ":")))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
