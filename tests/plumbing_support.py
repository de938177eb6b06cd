"""Real peers for the enclave-plumbing tests: echo servers, a stand-in nitro-cli, a
namespace runner. Unix sockets stand in for vsock (no vsock loopback on these machines)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

NEEDS_ROOT_NAMESPACES = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and util-linux unshare to create namespaces",
)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (their paths have at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pl", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def echo(conn: socket.socket) -> None:
    """Echo until the client's end of stream, then end ours."""
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send ``payload`` (from a thread), end the stream, read everything back."""
    sender = threading.Thread(target=lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
    sender.start()
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    sender.join()
    return b"".join(chunks)


def enclave(name: str, cid: int, state: str = "RUNNING") -> dict[str, Any]:
    """One entry of `nitro-cli describe-enclaves`, in its real format."""
    return {
        "EnclaveName": name,
        "EnclaveID": f"i-0123456789abcdef0-enc{cid:016x}",
        "ProcessID": 4000 + cid,
        "EnclaveCID": cid,
        "NumberOfCPUs": 2,
        "CPUIDs": [1, 3],
        "MemoryMiB": 1024,
        "State": state,
        "Flags": "NONE",
        "Measurements": {
            "HashAlgorithm": "Sha384 { ... }",
            "PCR0": "aa" * 48,
            "PCR1": "bb" * 48,
            "PCR2": "cc" * 48,
        },
    }


class NitroCliStandIn:
    """An executable that prints describe-enclaves JSON from a file the test rewrites."""

    def __init__(self, directory: Path) -> None:
        self.state = directory / "enclaves.json"
        self.calls = directory / "nitro-cli.calls"
        self.path = directory / "nitro-cli"
        self.path.write_text(
            "#!/bin/sh\n"
            f'echo "$@" >> {self.calls}\n'
            '[ "$1" = describe-enclaves ] || exit 1\n'
            f"cat {self.state}\n"
        )
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        self.set([])

    def set(self, enclaves: list[dict[str, Any]]) -> None:
        tmp = self.state.with_suffix(".tmp")
        tmp.write_text(json.dumps(enclaves, indent=2))
        tmp.replace(self.state)

    def call_count(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0


def wait_until(predicate: Callable[[], Any], timeout: float = 20, what: str = "") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


class EnclaveRun:
    """`keyutil run --config FILE` in fresh network and mount namespaces (and, with
    ``pid_ns``, a PID namespace where it is PID 1), as an enclave boots it."""

    def __init__(
        self,
        root: Path,
        config: str,
        *,
        pid_ns: bool = False,
        inside: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        from e2e_support import KEYUTIL

        self.root = root
        self.config = root / "run.toml"
        self.config.write_text(config)
        self.out, self.err = root / "console.out", root / "console.err"
        self.pid_ns = pid_ns
        unshare = ["unshare", "-n", "-m", "--propagation", "private"]
        if pid_ns:
            unshare += ["-p", "-f", "--mount-proc"]
        self.argv = [*unshare, *inside, KEYUTIL, "run", "--config", str(self.config)]
        self.env = {**os.environ, **(env or {})}
        self.proc: Any = None

    def start(self) -> EnclaveRun:
        import subprocess

        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=self.env
            )
        return self

    def wait(self, timeout: float = 60) -> int:
        import subprocess

        try:
            return int(self.proc.wait(timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"keyutil run did not exit:\n{self.stderr()}") from None

    def run(self, timeout: float = 60) -> int:
        return self.start().wait(timeout)

    def supervisor_pid(self) -> int:
        """Its PID here (with ``pid_ns``, the child of unshare --fork)."""
        if not self.pid_ns:
            return int(self.proc.pid)
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        found = wait_until(lambda: children.read_text().split(), what="unshare's child")
        return int(found[0])

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def events(text: str) -> list[dict[str, Any]]:
    """The JSON event lines in a console or sink text (others skipped)."""
    found = []
    for line in text.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            found.append(record)
    return found


def write_app(path: Path, body: str) -> Path:
    """A Python app (the test's interpreter) at ``path``."""
    import sys

    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path
