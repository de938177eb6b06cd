"""Real processes for end-to-end tests: `mock-kms serve`, `keyutil get-key`, simulators.

Each test starts the servers it needs and stops them (``Setup.close``); nothing is left running.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
KEYUTIL = str(BIN / "keyutil")
MOCK_KMS = str(BIN / "mock-kms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sim_init(directory: Path) -> str:
    out = subprocess.run(
        [KEYUTIL, "sim", "init", str(directory), "--json"], check=True, capture_output=True
    )
    return str(json.loads(out.stdout)["os_image_hash"])


def identity_of(state: Path) -> str:
    out = subprocess.run(
        [MOCK_KMS, "identity", "--state-dir", str(state)], check=True, capture_output=True
    )
    return out.stdout.decode().strip()


class LoopbackServer:
    """A server on loopback TCP (or on the unix socket ``unix``) that runs ``handle(conn)``
    for each connection in a thread, closing the connection after; ``errors`` keeps what the
    handlers raised."""

    def __init__(
        self,
        handle: Callable[[socket.socket], None],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        unix: Path | None = None,
    ) -> None:
        self.handle = handle
        if unix is not None:
            self.listener = socket.socket(socket.AF_UNIX)
        else:
            self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            self.listener.bind(str(unix) if unix is not None else (host, port))
            self.listener.listen(16)
        except OSError:
            self.listener.close()
            raise
        self.address = self.listener.getsockname()
        self.port = 0 if unix is not None else int(self.address[1])
        self.accepted = 0
        self.errors: list[BaseException] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handle(conn)
            except Exception as e:
                self.errors.append(e)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accepting thread (Linux)
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def wait_unix_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Until ``proc`` accepts on the unix socket ``path``; fails early if it exits."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args!r} exited {proc.returncode} before listening")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{proc.args!r} did not listen on {path}")


class ProxyProcess:
    """A `keyutil proxy` process; its stderr (the log lines) is kept for the test."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [KEYUTIL, "proxy", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )

    def wait_listening(self, path: Path) -> ProxyProcess:
        try:
            wait_unix_socket(path, self.proc)
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        """(exit code, stderr) after ``signum``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err.decode()


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON log lines (``--log-format json``) of a process's stderr."""
    return [json.loads(line) for line in text.splitlines()]


class Kms:
    """A `mock-kms serve` process, stopped by the test that started it."""

    def __init__(self, args: list[str], log: Path, url: str, unix: Path | None = None) -> None:
        self.args, self.log, self.url, self.unix = args, log, url, unix
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, stack_limit: int | None = None) -> Kms:
        """``stack_limit``: the stack rlimit in bytes, which is also the stack size glibc
        gives each of the server's threads (as under ``ulimit -s``)."""

        def limit_stack() -> None:
            if stack_limit is not None:
                _, hard = resource.getrlimit(resource.RLIMIT_STACK)
                resource.setrlimit(resource.RLIMIT_STACK, (stack_limit, hard))

        self.proc = subprocess.Popen(
            [MOCK_KMS, "serve", *self.args],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
            preexec_fn=limit_stack if stack_limit is not None else None,
        )
        return self

    def wait_listening(self, timeout: float = 60) -> Kms:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            try:
                if self.unix is not None:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.unix))
                else:
                    urllib.request.urlopen(self.url + "/v1/identity", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError("mock-kms did not start:\n" + self.log.read_text())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Setup:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sim = root / "sim"
        self.image = sim_init(self.sim)
        self.state = root / "state"
        self.identity = identity_of(self.state)
        self.audit = root / "audit.log"
        self.kms_log = root / "kms.log"
        self.keys = (
            Path(os.environ.get("KEYUTIL_TEST_TMPFS", "/dev/shm"))
            / f"keyutil-test-{os.getpid()}-{id(self)}"
        )
        self.keys.mkdir()
        self.servers: list[Kms] = []

    def kms(
        self,
        *extra: str,
        port: int | None = None,
        unix: Path | None = None,
        images: tuple[str, ...] | None = None,
        audit: Path | None = None,
    ) -> Kms:
        port = port or free_port()
        args = ["--state-dir", str(self.state), "--trust-root", str(self.sim / "root.pem")]
        args += ["--audit-log", str(audit or self.audit)]
        for image in images if images is not None else (f"{self.image}=app-a",):
            args += ["--allow-image", image]
        if unix is not None:
            args += ["--unix-socket", str(unix)]
        else:
            args += ["--port", str(port)]
        url = f"unix://{unix}" if unix is not None else f"http://127.0.0.1:{port}"
        server = Kms([*args, *extra], self.kms_log, url, unix)
        self.servers.append(server)
        return server

    def get_key(
        self,
        url: str,
        *extra: str,
        sim: Path | None = None,
        deadline: float = 60,
        identity: str | None = None,
        **kw: Any,
    ) -> subprocess.CompletedProcess[bytes]:
        args = [KEYUTIL, "get-key", "--kms", url, "--kms-pubkey", identity or self.identity]
        args += ["--nsm", "simulator", "--sim-dir", str(sim or self.sim)]
        args += ["--deadline", str(deadline), "--log-format", "json", *extra]
        return subprocess.run(args, capture_output=True, timeout=deadline + 30, **kw)

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.keys, ignore_errors=True)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Setup, Kms]]:
    """One KMS for the tests that only need a running one."""
    s = Setup(tmp_path_factory.mktemp("shared"))
    kms = s.kms().start().wait_listening()
    yield s, kms
    s.close()


def assert_key_absent(key: bytes, *blobs: bytes) -> None:
    forms = [key, key.hex().encode(), key.hex().upper().encode(), base64.b64encode(key)]
    forms.append(base64.b64encode(key).rstrip(b"="))
    forms.append(base64.urlsafe_b64encode(key).rstrip(b"="))
    for blob in blobs:
        for form in forms:
            assert form not in blob
