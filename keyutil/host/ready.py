"""``keyutil wait-ready``: has the app inside the enclave really come up?

    >>> from keyutil.host.ready import backoff_delays
    >>> [round(d, 2) for d in backoff_delays(0.1, 1.0)][:6]
    [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]

A vsock connect that succeeds says nothing about the app: a forwarder in the enclave accepts
the connection whether or not the app behind it is alive. So each attempt asks for an answer:

- ``--http PATH``: ``GET PATH`` over the connection, ready on a 2xx status;
- otherwise a connect check that also waits :data:`SETTLE` seconds: a peer that closes the
  connection at once (a forwarder that could not reach the app) is not ready; one that keeps
  it open, or sends something, is.

Attempts repeat with exponential backoff until one succeeds or the deadline passes; the
error of the last attempt is what the caller reports. The target is looked up again at each
attempt (an enclave by name: :mod:`keyutil.host.nitro`).
"""

from __future__ import annotations

import dataclasses
import http.client
import socket
import time
from collections.abc import Callable, Iterator

from keyutil.proxy import Destination, EnclaveFinder, connect_destination, find_enclave_cid

SETTLE = 1.0  # a forwarder that looks its target up (nitro-cli) needs a moment to fail
ATTEMPT_TIMEOUT = 3.0


class NotReady(Exception):
    """One attempt failed; the message says how."""


@dataclasses.dataclass(frozen=True)
class Ready:
    attempts: int
    elapsed_s: float
    detail: str


@dataclasses.dataclass(frozen=True)
class GaveUp:
    attempts: int
    elapsed_s: float
    last_error: str


def backoff_delays(initial: float, maximum: float) -> Iterator[float]:
    delay = initial
    while True:
        yield delay
        delay = min(maximum, delay * 2)


class _Http(http.client.HTTPConnection):
    """http.client over an already connected socket of any family."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._given = sock

    def connect(self) -> None:
        self.sock = self._given
        self.sock.settimeout(self.timeout)


def check_once(
    target: Destination,
    http_path: str | None,
    timeout: float,
    find_enclave: EnclaveFinder = find_enclave_cid,
) -> str:
    """One attempt: a description of the answer, or NotReady naming what failed."""
    try:
        sock = connect_destination(target, timeout, find_enclave=find_enclave)
    except LookupError as e:
        raise NotReady(f"cannot find {target}: {e}") from None
    except OSError as e:
        raise NotReady(f"cannot connect to {target}: {e.strerror or e}") from None
    with sock:
        if http_path is None:
            sock.settimeout(min(SETTLE, timeout))
            try:
                data = sock.recv(1)
            except TimeoutError:
                return "connected, and the connection stays open"
            except OSError as e:
                raise NotReady(f"{target}: connection reset after connecting: {e}") from None
            if not data:
                raise NotReady(
                    f"{target}: the peer closed the connection at once (nothing serves "
                    "behind it yet?)"
                )
            return "connected, and the peer spoke first"
        conn = _Http(sock, timeout)
        try:
            conn.request("GET", http_path, headers={"Connection": "close"})
            response = conn.getresponse()
            response.read(64 * 1024)
        except (OSError, http.client.HTTPException) as e:
            raise NotReady(f"GET {http_path} on {target}: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        if not 200 <= response.status < 300:
            raise NotReady(f"GET {http_path} on {target}: status {response.status}")
        return f"GET {http_path}: {response.status}"


def wait_ready(
    check: Callable[[float], str],
    deadline_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    on_attempt: Callable[[int, str | None], None] = lambda n, error: None,
    initial: float = 0.1,
    maximum: float = 2.0,
) -> Ready | GaveUp:
    """Call ``check(timeout)`` until it returns or ``deadline_s`` passes."""
    start = clock()
    end = start + deadline_s
    delays = backoff_delays(initial, maximum)
    attempts = 0
    last = "no attempt made"
    while True:
        left = end - clock()
        if left <= 0:
            return GaveUp(attempts, round(clock() - start, 3), last)
        attempts += 1
        try:
            detail = check(min(ATTEMPT_TIMEOUT, left))
        except NotReady as e:
            last = str(e)
            on_attempt(attempts, last)
        else:
            on_attempt(attempts, None)
            return Ready(attempts, round(clock() - start, 3), detail)
        left = end - clock()
        if left <= 0:
            return GaveUp(attempts, round(clock() - start, 3), last)
        sleep(min(next(delays), left))
