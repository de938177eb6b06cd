"""``keyutil run``: the enclave's entrypoint and PID 1, from boot to the app's exit.

    $ keyutil run --config /etc/keyutil/run.toml

The steps, in order; a step that fails logs ``step_failed`` with its name, its exit code and
why, and the supervisor exits with that code without starting the app (1 when the step
failed in a way it did not foresee, a bug, logged and flushed the same way):

=============== ===== ====================================================================
step            exit  what it does
=============== ===== ====================================================================
log             2     starts the log bridge to the host (``[log] to``): lines are buffered
                      from here on, so the host sees the boot even when it listens late
net_up          8     gives the enclave its loopback (:mod:`keyutil.netup`)
tmpfs           7     mounts a tmpfs (mode 0700, nosuid, nodev, noexec) on every
                      ``[tmpfs] paths`` entry that is not on tmpfs or ramfs already
keys            3..7  ``keyutil get-key`` for each ``[[keys]]`` set, with its own exit code
                      (3 unreachable, 4 denied, 5 NSM, 6 unauthenticated, 7 output); with
                      several ``[kms] urls`` it fails over to the next on "unreachable"
sealed          3..9  opens ``[[sealed]]`` files (:mod:`keyutil.sealing`): get-key's codes,
                      9 when the sealed input is refused (altered, truncated, not for
                      this key, a malformed dotenv)
forward         3     starts every ``[[forward]]`` (a :class:`keyutil.proxy.Proxy` thread)
host_settings   \\-    asks the host for optional settings; only names the image allows
workdir         10    changes to ``[app] workdir``
app             10    starts the app (not found, not executable)
=============== ===== ====================================================================

Then, as PID 1 (or a child subreaper, ``PR_SET_CHILD_SUBREAPER``, when it is not), it reaps
every child that ends, orphans included, passes SIGTERM and SIGINT on to the app, and when the
app exits, logs its status, gives the log bridge ``flush_timeout`` seconds, and exits with the
app's status (128+N when a signal N ended it; 1 if that status was lost), which stops the
enclave. SIGCHLD is set back to its default first: inherited as ignored, it would make the
kernel reap children itself and every exit status (get-key's, the app's) read as 0.

The app's stdout and stderr are read line by line and go to the console (unless ``[log]
console = false``) and to the host over the log bridge: the host sees them. The supervisor's
own lines never hold key material; get-key's log lines (no key material either) are passed on.

The actions that touch the system (loopback, mount, running get-key) are passed in, so that
the order and the error mapping are tested apart from the kernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from keyutil.enclave.config import RESERVED_ENV_PREFIX, Forward, KeySet, RunConfig, Sealed
from keyutil.enclave.logsend import LogSender
from keyutil.events import format_event
from keyutil.exitcodes import (
    EXIT_APP_START,
    EXIT_DENIED,
    EXIT_NETWORK,
    EXIT_NSM,
    EXIT_OUTPUT,
    EXIT_SEALED,
    EXIT_UNAUTHENTICATED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from keyutil.logwire import MAX_LINE, printable
from keyutil.proxy import (
    Allowlist,
    Destination,
    HostPort,
    ListenError,
    Proxy,
    ProxyConfig,
    connect_destination,
)

EXIT_INTERNAL = 1  # a step failed in a way it did not foresee (a bug): logged like the others

PR_SET_CHILD_SUBREAPER = 36
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MAX_HOST_SETTINGS_BYTES = 64 * 1024
MAX_SETTING_BYTES = 4096
STATUS_LOST = 1  # the app's exit status could not be read: never taken for a success
OUTPUT_DRAIN = 1.0  # after the app exits, how long its output readers get to finish

Mount = Callable[[str, str], None]
"""``mount(path, size)``: a tmpfs on ``path``; OSError if it cannot."""
RunCommand = Callable[[Sequence[str], Callable[[str], None]], int]
"""``run(argv, line)``: run a command, each stderr line to ``line``; its exit code."""


class StepFailed(Exception):
    def __init__(self, step: str, code: int, message: str) -> None:
        super().__init__(message)
        self.step, self.code, self.message = step, code, message


# -- the real actions -------------------------------------------------------------------------


def mount_tmpfs(path: str, size: str) -> None:
    """mount(2) a tmpfs on ``path`` (no mount binary needed in the image)."""
    libc = ctypes.CDLL(None, use_errno=True)
    options = f"mode=0700,size={size}".encode()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", flags, options) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def is_volatile(path: str) -> bool:
    from keyutil.output import VOLATILE_FILESYSTEMS, filesystem_magic

    return filesystem_magic(path) in VOLATILE_FILESYSTEMS


def become_subreaper() -> bool:
    """Orphans of our children are re-parented to us (as to PID 1); False if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


def run_command(
    argv: Sequence[str],
    line: Callable[[str], None],
    started: Callable[[subprocess.Popen[bytes] | None], None] = lambda child: None,
) -> int:
    """Run a boot step's command, each stderr line to ``line``; ``started(child)`` lets the
    supervisor pass a SIGTERM on to it (and ``started(None)`` when it is gone)."""
    with subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as child:
        started(child)
        try:
            stderr = child.stderr
            assert stderr is not None
            for raw in iter(lambda: stderr.readline(MAX_LINE), b""):
                line(raw.rstrip(b"\n").decode("utf-8", "replace"))
            return child.wait()
        finally:
            started(None)


def keyutil_command() -> list[str]:
    return [sys.executable, "-m", "keyutil"]


def get_key_features() -> tuple[bool, bool]:
    """(several --kms accepted, --expect-app exists) in this keyutil's get-key."""
    from keyutil.cli import get_key

    multi = any("--kms" in p.opts and getattr(p, "multiple", False) for p in get_key.params)
    expect = any("--expect-app" in p.opts for p in get_key.params)
    return multi, expect


def _connector(to: Destination) -> Callable[[], socket.socket]:
    return lambda: connect_destination(to, 2.0)


# -- the supervisor ---------------------------------------------------------------------------


class Supervisor:
    def __init__(
        self,
        config: RunConfig,
        *,
        console_out: IO[bytes] | None = None,
        console_err: IO[bytes] | None = None,
        net_up: Callable[[], Mapping[str, Any]] | None = None,
        mount: Mount = mount_tmpfs,
        volatile: Callable[[str], bool] = is_volatile,
        run: RunCommand | None = None,
        keyutil: Sequence[str] | None = None,
        features: Callable[[], tuple[bool, bool]] = get_key_features,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.console_out = console_out or sys.stdout.buffer
        self.console_err = console_err or sys.stderr.buffer
        self._net_up = net_up
        self.mount, self.volatile = mount, volatile
        self.run_command: RunCommand = run or self._run_boot_command
        self._boot_child: subprocess.Popen[bytes] | None = None
        self.keyutil = list(keyutil) if keyutil is not None else keyutil_command()
        self.features = features
        self.environ = dict(os.environ if environ is None else environ)
        self.sender: LogSender | None = None
        self.proxies: list[Proxy] = []
        self.settings: dict[str, str] = {}
        self.sealed_env: dict[str, str] = {}
        self.app: subprocess.Popen[bytes] | None = None
        self._console_lock = threading.Lock()
        self._stop_signal: int | None = None

    def _run_boot_command(self, argv: Sequence[str], line: Callable[[str], None]) -> int:
        def started(child: subprocess.Popen[bytes] | None) -> None:
            self._boot_child = child
            stop = self._stop_signal
            if child is not None and stop is not None:  # came before the handler knew it
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(stop)

        return run_command(argv, line, started)

    # -- logging: the console and the bridge --
    def _console(self, stream: IO[bytes], data: bytes) -> None:
        with self._console_lock, contextlib.suppress(OSError, ValueError):
            stream.write(data)
            stream.flush()

    def line(self, text: str) -> None:
        """One of the supervisor's own lines (or get-key's): console stderr and the host."""
        self._console(self.console_err, text.encode("utf-8", "replace") + b"\n")
        if self.sender is not None:
            self.sender.emit("supervisor", text)

    def log(self, level: str, event: str, fields: Mapping[str, Any]) -> None:
        self.line(format_event(self.config.log_format, level, event, fields))

    # -- the steps --
    def run(self) -> int:
        """Boot, then supervise the app; the exit code to leave with."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        # An ignored SIGCHLD survives exec; the kernel would then reap every child itself,
        # and each exit status (a refused get-key's, the app's) would read as 0.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("log", self.step_log),
            ("net_up", self.step_net_up),
            ("tmpfs", self.step_tmpfs),
            ("keys", self.step_keys),
            ("sealed", self.step_sealed),
            ("forward", self.step_forward),
            ("host_settings", self.step_host_settings),
            ("workdir", self.step_workdir),
            ("app", self.step_app),
        ]
        try:
            for name, step in steps:
                if self._stop_signal is not None:
                    raise StepFailed(
                        name,
                        128 + self._stop_signal,
                        f"stopped by {signal.Signals(self._stop_signal).name} before the app",
                    )
                self.log("info", "step", {"step": name})
                try:
                    step()
                except StepFailed:
                    raise
                except Exception as e:  # unforeseen: still a logged, flushed step failure
                    raise StepFailed(
                        name, EXIT_INTERNAL, f"internal error: {type(e).__name__}: {str(e)[:200]}"
                    ) from None
        except StepFailed as e:
            self.log("error", "step_failed", {"step": e.step, "exit": e.code, "message": e.message})
            self.log("error", "app_not_started", {"step": e.step})
            self._finish()
            return e.code
        if self._stop_signal is not None and self.app is not None:
            # The signal came while the app was being started (no app to pass it to yet).
            with contextlib.suppress(ProcessLookupError):
                self.app.send_signal(self._stop_signal)
        return self.supervise()

    def step_log(self) -> None:
        bridge = self.config.log
        if bridge.to is None:
            self.log("info", "log_bridge_off", {"reason": "no [log] to"})
            return
        self.sender = LogSender(
            _connector(bridge.to), max_lines=bridge.buffer_lines, max_bytes=bridge.buffer_bytes
        )
        self.sender.start()
        self.log("info", "log_bridge", {"to": str(bridge.to), "buffer_lines": bridge.buffer_lines})

    def step_net_up(self) -> None:
        if not self.config.network.loopback:
            return
        from keyutil.netup import NetUpError, loopback_up

        try:
            report = self._net_up() if self._net_up else loopback_up().to_json()
        except NetUpError as e:
            raise StepFailed("net_up", EXIT_NETWORK, f"{e.code}: {e.message}") from None
        self.log("info", "net_up", dict(report))

    def step_tmpfs(self) -> None:
        tmpfs = self.config.tmpfs
        for path in tmpfs.paths:
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
                if self.volatile(path):
                    self.log("info", "tmpfs", {"path": path, "mounted": False})
                    continue
                self.mount(path, tmpfs.size)
                if not self.volatile(path):
                    raise OSError(0, "still not on tmpfs after mounting one")
            except OSError as e:
                raise StepFailed(
                    "tmpfs",
                    EXIT_OUTPUT,
                    f"cannot put {path} on tmpfs: {e.strerror or e} (mounting needs CAP_SYS_ADMIN)",
                ) from None
            self.log("info", "tmpfs", {"path": path, "mounted": True, "size": tmpfs.size})

    def _kms_args(self, urls: Iterable[str], deadline: float) -> list[str]:
        """get-key's options naming the KMS, its identity and the deadline."""
        kms = self.config.kms
        assert kms is not None
        args = [*self.keyutil, "get-key"]
        for url in urls:
            args += ["--kms", url]
        if kms.pubkey is not None:
            args += ["--kms-pubkey", kms.pubkey]
        else:
            args.append("--insecure-skip-kms-auth")
        if kms.ca is not None:
            args += ["--kms-ca", kms.ca]
        return [*args, "--deadline", f"{deadline:g}", "--log-format", self.config.log_format]

    def _key_args(self, keyset: KeySet) -> list[str]:
        args: list[str] = []
        for name in keyset.names:
            args += ["--key", name]
        args += ["--length", str(keyset.length), "--out-dir", keyset.dir]
        if keyset.expect_app is not None:
            args += ["--expect-app", keyset.expect_app]
        return args

    def step_keys(self) -> None:
        kms = self.config.kms
        if kms is None or not self.config.keys:
            return
        multi, expect = self.features()
        if not expect and any(k.expect_app for k in self.config.keys):
            raise StepFailed(
                "keys",
                EXIT_USAGE,
                "the config sets expect_app but this keyutil's get-key has no --expect-app",
            )
        for keyset in self.config.keys:
            try:
                os.makedirs(keyset.dir, mode=0o700, exist_ok=True)
            except OSError as e:
                raise StepFailed(
                    "keys", EXIT_OUTPUT, f"cannot create {keyset.dir}: {e.strerror}"
                ) from None
            self._get_key("keys", ", ".join(keyset.names), self._key_args(keyset), multi)
            self.log("info", "keys_released", {"names": list(keyset.names), "dir": keyset.dir})

    def _get_key(self, step: str, what: str, extra: list[str], multi: bool) -> None:
        """One get-key with every URL when it fails over itself; else one URL after the
        other, on "unreachable" (exit 3) only, sharing the deadline."""
        kms = self.config.kms
        assert kms is not None
        end = time.monotonic() + kms.deadline
        groups = [list(kms.urls)] if multi else [[u] for u in kms.urls]
        code = EXIT_UNAVAILABLE
        for n, group in enumerate(groups):
            left = (end - time.monotonic()) / (len(groups) - n)
            if left <= 0:
                break
            code = self.run_command([*self._kms_args(group, left), *extra], self.line)
            if self._stop_signal is not None:
                raise StepFailed(
                    step,
                    128 + self._stop_signal,
                    f"stopped by {signal.Signals(self._stop_signal).name} during {what}",
                )
            if code == 0:
                return
            if code != EXIT_UNAVAILABLE:
                break
            if n + 1 < len(groups):
                self.log("warning", "kms_failover", {"from": group[0], "to": groups[n + 1][0]})
        raise StepFailed(step, code, f"keyutil get-key for {what} exited {code}")

    def step_sealed(self) -> None:
        """Files: ``get-key --type age --unseal`` (the identity never leaves that process;
        the plaintext appears at dest only once all of it authenticated). Dotenv files:
        opened here, in memory, into the app's environment (names logged, never values)."""
        multi, _ = self.features()
        for sealed in self.config.sealed:
            if sealed.format == "dotenv":
                variables = self.open_sealed_env(sealed)
                self.sealed_env.update(variables)
                self.log(
                    "info",
                    "sealed_env",
                    {"source": sealed.source, "key": sealed.key, "names": sorted(variables)},
                )
                continue
            assert sealed.dest is not None
            args = ["--key", sealed.key, "--type", "age", "--unseal", sealed.source]
            args += ["--unseal-to", sealed.dest]
            if sealed.via is not None:
                args += ["--via", sealed.via]
            if sealed.source_ca is not None:
                args += ["--source-ca", sealed.source_ca]
            if sealed.expect_sha256 is not None:
                args += ["--expect-sha256", sealed.expect_sha256]
            self._get_key("sealed", sealed.source, args, multi)
            self.log("info", "sealed_opened", {"source": sealed.source, "dest": sealed.dest})

    def open_sealed_env(self, sealed: Sealed) -> dict[str, str]:
        """Release the age identity ``sealed.key`` (failing over on unavailable), open the
        dotenv file with it and parse it; StepFailed("sealed", code) on any refusal."""
        from keyutil.sealing import parse_sha256
        from keyutil.sealing.age import SealedError, unseal
        from keyutil.sealing.dotenv import DotenvError, parse_dotenv
        from keyutil.sealing.streams import SourceError, open_source

        pinned = parse_sha256(sealed.expect_sha256) if sealed.expect_sha256 else None
        identity = self._release_age_identity(sealed.key)
        plaintext = bytearray()
        try:
            timeout = self.config.kms.deadline if self.config.kms else 60.0
            with open_source(
                sealed.source, via=sealed.via, ca_file=sealed.source_ca, timeout=timeout
            ) as source:
                unseal(source, plaintext.extend, identity, expect_sha256=pinned)
            return parse_dotenv(plaintext)
        except (SourceError, SealedError, DotenvError) as e:
            code = getattr(e, "code", "dotenv_invalid")
            raise StepFailed("sealed", EXIT_SEALED, f"{code}: {sealed.source}: {e}") from None
        finally:
            plaintext[:] = bytes(len(plaintext))
            del identity

    def _release_age_identity(self, name: str) -> Any:
        from keyutil.client import (
            AnswerRejected,
            KmsDenied,
            KmsUnavailable,
            ReleaseRequest,
            release_keys,
        )
        from keyutil.nsm import NsmError, open_nsm
        from keyutil.sealing.age import Identity
        from keyutil.transport import HttpTransport

        kms = self.config.kms
        assert kms is not None
        pubkey = kms.pubkey
        try:
            if pubkey is not None and pubkey.startswith("@"):
                pubkey = Path(pubkey[1:]).read_text().strip()
            request = ReleaseRequest.build([name], types=["age"], identity=pubkey)
            # Built before the NSM is opened, as get-key does: a bad URL or CA file (an
            # OSError, ssl.SSLError included) is a usage error, not a crash of PID 1.
            try:
                transports = [HttpTransport.from_url(url, ca_file=kms.ca) for url in kms.urls]
            except OSError as e:
                raise OSError(f"[kms] ca {kms.ca}: {e.strerror or e}") from None
            nsm_kind: Any = self.environ.get("KEYUTIL_NSM", "auto")
            sim_dir = self.environ.get("KEYUTIL_SIM_DIR")
            nsm = open_nsm(nsm_kind, sim_dir=Path(sim_dir) if sim_dir else None)
        except (OSError, ValueError) as e:
            raise StepFailed("sealed", EXIT_USAGE, f"cannot release {name}: {e}") from None
        except NsmError as e:
            raise StepFailed("sealed", EXIT_NSM, f"{e.code}: {e.message}") from None
        end = time.monotonic() + kms.deadline
        error: Exception = KmsUnavailable("unreachable", "no KMS tried")
        for n, transport in enumerate(transports):
            left = (end - time.monotonic()) / (len(transports) - n)
            try:
                release = release_keys(transport, nsm, request, deadline_s=left, log=self.log)
            except KmsUnavailable as e:
                error = e
                continue
            except (KmsDenied, AnswerRejected, NsmError, ValueError) as e:
                error = e
                break
            try:
                return Identity(bytes(release.keys[0].value))
            finally:
                release.wipe()
        code = {KmsDenied: EXIT_DENIED, AnswerRejected: EXIT_UNAUTHENTICATED, NsmError: EXIT_NSM}
        raise StepFailed(
            "sealed",
            code.get(type(error), EXIT_UNAVAILABLE if isinstance(error, KmsUnavailable) else 2),
            f"releasing the age identity {name}: {getattr(error, 'code', '')}: {error}",
        )

    def step_forward(self) -> None:
        for forward in self.config.forwards:
            proxy = Proxy(self._proxy_config(forward), self.log)
            try:
                proxy.open()
            except ListenError as e:
                raise StepFailed("forward", EXIT_UNAVAILABLE, str(e)) from None
            self.proxies.append(proxy)
            threading.Thread(
                target=proxy.serve, name=f"forward-{forward.listen}", daemon=True
            ).start()

    @staticmethod
    def _proxy_config(forward: Forward) -> ProxyConfig:
        to = forward.to
        allowlist = Allowlist((to,), "destination") if isinstance(to, HostPort) else None
        return ProxyConfig(listen=forward.listen, to=to, allowlist=allowlist)

    def step_host_settings(self) -> None:
        wanted = self.config.host_settings
        if wanted is None:
            return
        try:
            with connect_destination(wanted.source, wanted.timeout) as sock:
                data = _read_all(sock, wanted.timeout, MAX_HOST_SETTINGS_BYTES)
            accepted, refused = decide_host_settings(data, wanted.allow)
        except (OSError, LookupError) as e:
            self.log(
                "warning", "host_settings_absent", {"from": str(wanted.source), "error": str(e)}
            )
            return
        except ValueError as e:
            self.log("warning", "host_settings_invalid", {"error": str(e)[:200]})
            return
        for name, value in accepted.items():
            self.settings[name] = value
            self.log("info", "host_setting", {"name": name, "value": printable(value[:200])})
        for name, reason in refused:
            self.log("warning", "host_setting_refused", {"name": name, "reason": reason})

    def step_workdir(self) -> None:
        try:
            os.chdir(self.config.app.workdir)
        except OSError as e:
            raise StepFailed(
                "workdir",
                EXIT_APP_START,
                f"cannot change to {self.config.app.workdir}: {e.strerror}",
            ) from None
        self.log("info", "workdir", {"path": os.getcwd()})

    def app_environment(self) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if not k.startswith(RESERVED_ENV_PREFIX)}
        env.update(self.settings)
        env.update(self.config.app.env)
        env.update(self.sealed_env)  # the image author's sealed secrets win
        return env

    def step_app(self) -> None:
        command = self.config.app.command
        try:
            self.app = subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.app_environment(),
            )
        except OSError as e:
            raise StepFailed(
                "app", EXIT_APP_START, f"cannot start {command[0]}: {e.strerror}"
            ) from None
        self.log("info", "app_started", {"pid": self.app.pid, "command": command[0]})

    # -- PID 1 --
    def _on_signal(self, signum: int, frame: Any) -> None:
        app = self.app
        if app is None or app.returncode is not None:
            self._stop_signal = signum  # the boot stops before its next step
            child = self._boot_child
            if child is not None:  # and a get-key waiting for its deadline stops now
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signum)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(app.pid, signum)

    def supervise(self) -> int:
        app = self.app
        assert app is not None and app.stdout is not None and app.stderr is not None
        readers = [
            threading.Thread(
                target=self._relay, args=(app.stdout, "stdout", self.console_out), daemon=True
            ),
            threading.Thread(
                target=self._relay, args=(app.stderr, "stderr", self.console_err), daemon=True
            ),
        ]
        for reader in readers:
            reader.start()
        reaped = 0
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:  # the status is lost (reaped elsewhere): not a success
                self.log("error", "app_status_lost", {"pid": app.pid})
                status, pid = None, app.pid
            if pid == app.pid:
                break
            reaped += 1
        code = STATUS_LOST if status is None else os.waitstatus_to_exitcode(status)
        app.returncode = code
        exit_code = 128 - code if code < 0 else code
        for reader in readers:
            reader.join(OUTPUT_DRAIN)
        fields: dict[str, Any] = {"status": exit_code, "orphans_reaped": reaped}
        if code < 0:
            fields["signal"] = signal.Signals(-code).name
        self.log("info" if code == 0 else "error", "app_exited", fields)
        self._finish()
        return exit_code

    def _relay(self, pipe: IO[bytes], stream: str, console: IO[bytes]) -> None:
        echo = self.config.log.console
        for raw in iter(lambda: pipe.readline(MAX_LINE), b""):
            if echo:
                self._console(console, raw if raw.endswith(b"\n") else raw + b"\n")
            if self.sender is not None:
                self.sender.emit(stream, raw.removesuffix(b"\n"))

    def _finish(self) -> None:
        """Give the bridge its flush time, reap what is left, stop the forwarders."""
        if self.sender is not None:
            self.sender.flush(self.config.log.flush_timeout)
            self.sender.close()
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        for proxy in self.proxies:
            proxy.stop()


def decide_host_settings(
    data: bytes, allow: Iterable[str]
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Parse the host's settings (hostile bytes) and decide: the accepted ``{name: value}``
    (names in ``allow``, values short strings an environment can hold) and the refused
    ``(name, reason)``, names made printable and cut to 64 characters. ValueError when
    ``data`` is not one JSON object (fuzzed: fuzz/host_settings.py)."""
    if len(data) > MAX_HOST_SETTINGS_BYTES:
        raise ValueError(f"more than {MAX_HOST_SETTINGS_BYTES} bytes of settings")
    try:
        offered = json.loads(data)
    except RecursionError:  # not a ValueError: nesting deeper than the stack
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(offered, dict):
        raise ValueError("expected a JSON object")
    allowed = set(allow)
    accepted: dict[str, str] = {}
    refused: list[tuple[str, str]] = []
    for name, value in offered.items():
        if name not in allowed:
            refused.append((printable(name[:64]), "not allowed by the image"))
        elif not _short_text(value):
            refused.append((name, "not a short string"))
        else:
            accepted[name] = value
    return accepted, refused


def _short_text(value: object) -> bool:
    """A string an environment can hold: UTF-8 (a lone surrogate, which JSON's \\u escapes
    allow, is not), no NUL, at most MAX_SETTING_BYTES."""
    if not isinstance(value, str) or "\0" in value:
        return False
    try:
        return len(value.encode("utf-8")) <= MAX_SETTING_BYTES
    except UnicodeEncodeError:
        return False


def _read_all(sock: socket.socket, timeout: float, limit: int) -> bytes:
    end = time.monotonic() + timeout
    data = bytearray()
    while len(data) <= limit:
        left = end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the host did not finish its settings in time")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk
    raise ValueError(f"more than {limit} bytes of settings")
