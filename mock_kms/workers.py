"""Pre-forked workers on one listening socket: ``mock-kms serve --workers N``.

    >>> from mock_kms.workers import run_workers, usable_cpus      # doctest: +SKIP
    >>> run_workers(usable_cpus(), serve_one)                        # doctest: +SKIP

The parent binds the socket and builds everything that must be the same in every worker
(the state, the verifier, the allowlist reader and, with the embedded chain, the chain
itself), then forks N workers. Each worker runs its own server loop (:mod:`mock_kms.httpd`;
threads, if any, are started after the fork) and accepts on the shared socket; the kernel
hands each connection to one waiting worker. The parent
serves nothing: it restarts a worker that dies, forwards SIGTERM/SIGINT to all of them and
waits for them to finish. A worker whose parent dies is sent SIGTERM by the kernel
(``PR_SET_PDEATHSIG``), so a killed KMS leaves no worker behind holding its port.

Why fork after building (docs/adr/0011-kms-workers.md): the embedded chain lives in the
memory of one process; forked from one built chain, every worker holds the identical
allowlist, with no chain process to ask and no second deployment to keep in step.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
# A worker that dies sooner than this after its start is restarted only after a pause.
RESTART_PAUSE_S = 1.0
# After SIGTERM, workers get this long to finish what they serve; then SIGKILL.
STOP_GRACE_S = 10.0


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _start(index: int, serve_one: Callable[[int], None]) -> int:
    """Fork a worker; called with SIGTERM and SIGINT blocked (see :func:`run_workers`)."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # The worker: default signals (serve_one installs its own), never returns.
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops it cleanly
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        _die_with_parent(parent)
        serve_one(index)
        code = 0
    except KeyboardInterrupt:
        code = 0
    except BaseException:
        logger.exception("worker %d failed", index)
    finally:
        logging.shutdown()
        os._exit(code)


def run_workers(count: int, serve_one: Callable[[int], None]) -> int | None:
    """Fork ``count`` workers running ``serve_one(index)``; once all have stopped after
    SIGTERM or SIGINT (those still running ``STOP_GRACE_S`` later are killed), return that
    signal's number. A worker that exits otherwise is replaced."""
    stop_by: float | None = None  # set by the first SIGTERM/SIGINT
    stopped_by: int | None = None
    workers: dict[int, tuple[int, float]] = {}  # pid: (index, started)

    def stop(signum: int, frame: object) -> None:
        nonlocal stop_by, stopped_by
        if stop_by is None:
            stop_by = time.monotonic() + STOP_GRACE_S
            stopped_by = signum
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def start(index: int) -> None:
        # A stop signal is held from the fork until the new pid is in ``workers``: one that
        # landed in between was lost to the new worker (which then ran until SIGKILL), or
        # ran the parent's handler in the worker itself. Holding it in this thread is not
        # enough when the process has others: one of them takes the signal and the handler
        # runs here at once, before the pid is in the table; so a stop already under way
        # is sent on to the new worker once it is.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            if stop_by is None:
                pid = _start(index, serve_one)
                workers[pid] = (index, time.monotonic())
                if stop_by is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            start(index)
        while workers:
            pid, status = _reap()
            if pid == 0:  # none has exited
                if stop_by is not None and time.monotonic() > stop_by:
                    for late in list(workers):
                        logger.error("worker pid %d did not stop; killing it", late)
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(late, signal.SIGKILL)
                    stop_by = float("inf")
                time.sleep(0.1)
                continue
            if pid not in workers:
                continue
            index, started = workers.pop(pid)
            if stop_by is not None:
                continue
            logger.error(
                "worker %d (pid %d) exited (%s); starting another",
                index,
                pid,
                _describe(status),
            )
            if time.monotonic() - started < RESTART_PAUSE_S:
                time.sleep(RESTART_PAUSE_S)
            start(index)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return stopped_by


def _reap() -> tuple[int, int]:
    """(pid, status) of an exited child, or (0, 0). Polled (ten times a second), never
    blocking, so that the stop grace is kept even if a worker ignores SIGTERM."""
    try:
        return os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:  # pragma: no cover - none left
        return 0, 0


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"status {os.waitstatus_to_exitcode(status)}"
