"""Allowlist decision latency: cache hit, cache miss against anvil (one eth_call), embedded chain.

    .venv/bin/python bench/bench_allowlist.py            # needs `npm ci` (anvil)
    .venv/bin/python bench/bench_allowlist.py --json

Each figure is one ``require_allowed(allowlist, image_hash)``: lookup plus decision, as the
KMS runs it per key-release request. anvil is started on a free loopback port and stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from eth_account import Account
from web3 import Web3
from web3.providers.rpc import HTTPProvider

from mock_kms import chain
from mock_kms.allowlist import EmbeddedAllowlist, ReaderSettings, RpcAllowlist, require_allowed

ROOT = Path(__file__).resolve().parent.parent
ANVIL = ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
IMAGE = bytes.fromhex("be" * 32)
APP = chain.parse_application("bench")


def measure(fn: Callable[[], object], n: int, warmup: int = 20) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1000)
    samples.sort()
    return {
        "n": n,
        "median_us": round(statistics.median(samples), 1),
        "p99_us": round(samples[min(n - 1, int(n * 0.99))], 1),
        "mean_us": round(statistics.fmean(samples), 1),
    }


def start_anvil() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([str(ANVIL), "--host", "127.0.0.1", "--port", "0", "--accounts",
                             "0", "--chain-id", "31337"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("Listening on "):
            # anvil logs every request: keep reading so a full pipe never stalls it.
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()],
                             daemon=True).start()
            return proc, "http://" + line.split()[-1]
    proc.kill()
    raise SystemExit("anvil did not start; run `npm ci` first")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-n", type=int, default=1000, help="samples per chain-backed case")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}

    embedded = EmbeddedAllowlist.create([(IMAGE, APP)])
    results["embedded chain, cached (the serve default)"] = measure(
        lambda: require_allowed(embedded, IMAGE), args.n * 50)
    uncached = EmbeddedAllowlist.create([(IMAGE, APP)], settings=ReaderSettings(cache_size=0))
    results["embedded chain, no cache (one eth_call in py-evm)"] = measure(
        lambda: require_allowed(uncached, IMAGE), args.n)

    # The cache on its own: the JSON-RPC reader over the embedded chain, always hit.
    cached = RpcAllowlist(embedded.w3, embedded.contract_address,
                          expected_chain_id=embedded.chain_id,
                          settings=ReaderSettings(max_staleness=60), clock=lambda: 0.0)
    require_allowed(cached, IMAGE)
    results["cache hit"] = measure(lambda: require_allowed(cached, IMAGE), args.n * 50)

    proc, url = start_anvil()
    try:
        owner = Account.create()
        w3 = Web3(HTTPProvider(url))
        w3.provider.make_request("anvil_setBalance", [owner.address, hex(10**19)])
        deployed = chain.send(w3, chain.deploy_request(owner.address), sender=owner.address,
                              sign=owner)
        assert deployed.contract_address is not None
        address = deployed.contract_address
        chain.send(w3, chain.add_request(address, IMAGE, APP), sender=owner.address,
                   sign=owner)
        w3.provider.make_request("evm_mine", [])  # one block deep, for confirmations=1
        miss = RpcAllowlist.from_url(url, address, expected_chain_id=31337,
                                     settings=ReaderSettings(max_staleness=0))
        miss.check_ready()
        results["cache miss, anvil (1 eth_call)"] = measure(
            lambda: require_allowed(miss, IMAGE), args.n)
        deep = RpcAllowlist.from_url(url, address, expected_chain_id=31337,
                                     settings=ReaderSettings(max_staleness=0, confirmations=1))
        deep.check_ready()
        results["cache miss, anvil, confirmations=1 (2 RPCs)"] = measure(
            lambda: require_allowed(deep, IMAGE), args.n)
        # The read alone, two ways (docs/adr/0003): the KMS's path (selector and types from
        # the ABI, eth_abi, one w3.eth.call) and web3's contract.functions.imageStatus().call().
        bound = chain.contract(Web3(HTTPProvider(url), middleware=[]), address)
        results["imageStatus read, KMS path"] = measure(
            lambda: chain.read_image_status(bound, IMAGE), args.n)
        results["imageStatus read, contract.functions...call()"] = measure(
            lambda: bound.functions.imageStatus(IMAGE).call(), args.n)
    finally:
        proc.terminate()
        proc.wait(10)

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{'case':46} {'n':>7} {'median':>10} {'p99':>10} {'mean':>10}  (microseconds)")
        for name, r in results.items():
            print(f"{name:46} {int(r['n']):>7} {r['median_us']:>10} {r['p99_us']:>10} "
                  f"{r['mean_us']:>10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
