"""What ``GET /v1/provenance`` costs the KMS: anyone may call it, no attestation needed.

    .venv/bin/python bench/bench_provenance.py [--seconds 3] [--rounds 2] [--clients 2] [--json]

One ``mock-kms serve`` on a free loopback port (embedded chain, its signer registered at
start), ``--clients`` threads each on one keep-alive connection in a closed loop, for
``--seconds`` per phase; phases interleaved, ``--rounds`` times:

- ``identity``: ``GET /v1/identity``, the cheapest public request: the baseline;
- ``ed25519``: a statement of an ed25519 key, a new key name on every request (no cache hit);
- ``secp256k1 new``: a secp256k1 statement, a new key name each time: derivation, public key,
  account, the EIP-712 signature of the KMS signer and the Ed25519 one, what an attacker
  asking for ever new names makes the KMS do;
- ``secp256k1 again``: the same statement over and over (the statement cache).

Reported per phase: requests per second and the KMS's CPU time per request (utime + stime
from ``/proc``), each as a ratio to the identity baseline of the same round.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import LocalKms, cpu_seconds, environment

APP = "0x" + b"app".ljust(32, b"\0").hex()
PathOf = Callable[[int, int], str]


def phase(kms: LocalKms, path_of: PathOf, seconds: float, clients: int) -> dict[str, float]:
    stop = time.monotonic() + seconds
    done = [0] * clients
    errors = [0] * clients

    def client(t: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", kms.port, timeout=30)
        i = 0
        try:
            while time.monotonic() < stop:
                conn.request("GET", path_of(t, i))
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    done[t] += 1
                else:
                    errors[t] += 1
                i += 1
        finally:
            conn.close()

    cpu0, t0 = cpu_seconds(kms.pid), time.monotonic()
    threads = [threading.Thread(target=client, args=(t,)) for t in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, cpu = time.monotonic() - t0, cpu_seconds(kms.pid) - cpu0
    n = sum(done)
    return {"requests_per_s": n / elapsed, "cpu_ms_per_request": 1000 * cpu / max(n, 1),
            "errors": float(sum(errors))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    def statement(key_type: str, name: Callable[[int, int, int], str]) -> Callable[[int], PathOf]:
        return lambda r: lambda t, i: (
            f"/v1/provenance?application={APP}&name={name(r, t, i)}&type={key_type}")

    phases: dict[str, Callable[[int], PathOf]] = {
        "identity": lambda r: lambda t, i: "/v1/identity",
        "ed25519": statement("ed25519", lambda r, t, i: f"e{r}-{t}-{i}"),
        "secp256k1 new": statement("secp256k1", lambda r, t, i: f"w{r}-{t}-{i}"),
        "secp256k1 again": statement("secp256k1", lambda r, t, i: "wallet"),
    }
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in phases}
    with tempfile.TemporaryDirectory() as work:
        kms = LocalKms(Path(work), app="app")
        kms.start()
        try:
            for r in range(args.rounds):
                for name, make in phases.items():
                    rows[name].append(phase(kms, make(r), args.seconds, args.clients))
        finally:
            kms.stop()
    report: dict[str, Any] = {"environment": environment(), "seconds": args.seconds,
                              "rounds": args.rounds, "clients": args.clients, "phases": {}}
    base = rows["identity"]
    for name, results in rows.items():
        report["phases"][name] = {
            "requests_per_s": round(statistics.median(x["requests_per_s"] for x in results), 1),
            "cpu_ms_per_request": round(
                statistics.median(x["cpu_ms_per_request"] for x in results), 3),
            "cpu_ratio_to_identity": round(statistics.median(
                x["cpu_ms_per_request"] / b["cpu_ms_per_request"]
                for x, b in zip(results, base, strict=True)), 1),
            "errors": int(sum(x["errors"] for x in results)),
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(json.dumps(report["environment"]))
        print(f"{'phase':<16} {'req/s':>9} {'CPU ms/req':>11} {'CPU / identity':>15}")
        for name, row in report["phases"].items():
            print(f"{name:<16} {row['requests_per_s']:>9} {row['cpu_ms_per_request']:>11} "
                  f"{row['cpu_ratio_to_identity']:>15}")
    errors = sum(row["errors"] for row in report["phases"].values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
