"""Chain fixtures (a pytest plugin, registered from conftest.py): a real anvil node on a free
loopback port for the session, funded throwaway accounts, the embedded chain, and a gas
report printed at the end of the run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from web3.providers.rpc import HTTPProvider

from mock_kms import chain
from mock_kms.allowlist import EmbeddedAllowlist

ROOT = Path(__file__).resolve().parent.parent
NODE_BIN = ROOT / "node_modules" / "@foundry-rs"
ANVIL = NODE_BIN / "anvil-linux-amd64" / "bin" / "anvil"
CAST = NODE_BIN / "cast-linux-amd64" / "bin" / "cast"
ANVIL_CHAIN_ID = 31337

# Gas figures recorded by the contract tests: (backend, call) -> gas used.
GAS: dict[tuple[str, str], int] = {}


def record_gas(backend: str, call: str, gas_used: int) -> None:
    GAS[(backend, call)] = gas_used


@dataclasses.dataclass
class Anvil:
    url: str
    chain_id: int
    process: subprocess.Popen[str]

    def w3(self, timeout: float = 5.0) -> Web3:
        return Web3(HTTPProvider(self.url, request_kwargs={"timeout": timeout},
                                 exception_retry_configuration=None))

    def new_account(self, ether: int = 10) -> LocalAccount:
        """A fresh random key, funded through anvil's own RPC (no well-known dev keys)."""
        account: LocalAccount = Account.create()
        w3 = self.w3()
        w3.provider.make_request("anvil_setBalance", [account.address, hex(ether * 10**18)])
        return account

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def deploy(self, owner: LocalAccount) -> str:
        w3 = self.w3()
        receipt = chain.send(w3, chain.deploy_request(owner.address), sender=owner.address,
                             sign=owner)
        assert receipt.contract_address is not None
        return receipt.contract_address


def _drain(process: subprocess.Popen[str]) -> None:
    for _ in process.stdout or ():
        pass


def start_anvil(*extra: str, port: int = 0) -> Anvil:
    """An anvil node on loopback (``port`` 0: one it picks), started with ``extra`` options."""
    if not ANVIL.exists():
        raise RuntimeError(f"{ANVIL} is missing: run `npm ci` at the repository root")
    process = subprocess.Popen(
        [str(ANVIL), "--host", "127.0.0.1", "--port", str(port), "--accounts", "0",
         "--chain-id", str(ANVIL_CHAIN_ID), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    port = None
    seen: list[str] = []
    # anvil picks the port (--port 0) and prints "Listening on 127.0.0.1:PORT".
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("Listening on "):
            port = int(line.rsplit(":", 1)[1])
            break
    if port is None:
        process.kill()
        process.wait()
        raise RuntimeError("anvil did not start:\n" + "".join(seen[-20:]))
    # Keep draining its output so a full pipe never blocks it.
    threading.Thread(target=_drain, args=(process,), daemon=True).start()
    return Anvil(url=f"http://127.0.0.1:{port}", chain_id=ANVIL_CHAIN_ID, process=process)


@pytest.fixture(scope="session")
def anvil() -> Iterator[Anvil]:
    node = start_anvil()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="session")
def cast_bin() -> Path:
    if not CAST.exists():
        raise RuntimeError(f"{CAST} is missing: run `npm ci` at the repository root")
    return CAST


@pytest.fixture
def embedded() -> EmbeddedAllowlist:
    return EmbeddedAllowlist.create()


@pytest.fixture
def gov_env(anvil: Anvil, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A funded signer and the anvil endpoint in kms-gov's environment variables."""
    for name in list(os.environ):
        if name.startswith("KMS_GOV_"):
            monkeypatch.delenv(name)
    signer = anvil.new_account()
    env = {
        "KMS_GOV_RPC_URL": anvil.url,
        "KMS_GOV_CHAIN_ID": str(anvil.chain_id),
        "KMS_GOV_PRIVATE_KEY": "0x" + bytes(signer.key).hex(),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    env["_ADDRESS"] = signer.address
    return env


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not GAS:
        return
    terminalreporter.section("allowlist contract: gas used per call")
    for (backend, call), gas in sorted(GAS.items()):
        terminalreporter.write_line(f"{backend:10} {call:40} {gas:>8}")
    out = os.environ.get("ALLOWLIST_GAS_REPORT")
    if out:
        Path(out).write_text(json.dumps({f"{b}:{c}": g for (b, c), g in GAS.items()},
                                        indent=2, sort_keys=True) + "\n")
