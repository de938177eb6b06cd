"""``keyutil logs``: the host's end of the log bridge, printing what enclaves send.

    $ keyutil logs --listen vsock://:9000 --append /var/log/enclave.log
    2026-12-01T12:00:01.123Z cid=16 supervisor: keyutil: info: step step="net_up"
    2026-12-01T12:00:02.004Z cid=16 stderr: Traceback (most recent call last):

Each enclave connection is read with :class:`keyutil.logwire.LogReader` on its own thread;
every record becomes one output line (text, or JSON with ``--log-format json``) naming the
enclave's CID (the peer's vsock address; ``-`` over a unix socket) and the stream. A
``dropped`` frame prints ``dropped N lines`` (the enclave's buffer overflowed while nobody
listened). The enclave's bytes are untrusted: control characters are escaped before they
reach a terminal or the file, and a connection that breaks the format is logged with the
wire error's code and closed; the sink goes on serving the others.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import socketserver
import threading
from typing import Any, TextIO

from keyutil.logwire import Dropped, LogLine, LogReader, Record, WireError, printable
from keyutil.proxy import ListenAddress, clear_stale_unix, describe_peer

READ_SIZE = 64 * 1024
IDLE_TIMEOUT = 3600.0  # a connection silent this long is closed (the sender reconnects)


def _iso(ts: float) -> str:
    moment = datetime.datetime.fromtimestamp(ts, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class Printer:
    """Formats records and writes each as one line to ``out`` and, if given, ``append``."""

    def __init__(self, out: TextIO, fmt: str = "text", append: TextIO | None = None) -> None:
        self.out, self.fmt, self.append = out, fmt, append
        self._lock = threading.Lock()

    def format(self, cid: int | None, peer: str, record: Record | dict[str, Any]) -> str:
        if isinstance(record, LogLine):
            fields: dict[str, Any] = {
                "ts": record.ts,
                "cid": cid,
                "stream": record.stream,
                "line": record.text,
            }
            text = f"{_iso(record.ts)} cid={cid if cid is not None else '-'} "
            text += f"{record.stream}: {printable(record.text)}"
        else:
            event = (
                {"event": "dropped", "count": record.count}
                if isinstance(record, Dropped)
                else record
            )
            fields = {"ts": round(datetime.datetime.now(datetime.UTC).timestamp(), 3)}
            fields.update({"cid": cid, "peer": peer, **event})
            details = " ".join(
                f"{k}={printable(json.dumps(v))}" for k, v in event.items() if k != "event"
            )
            if isinstance(record, Dropped):
                details = f"{record.count} lines (the enclave's buffer was full)"
            text = f"{_iso(fields['ts'])} cid={cid if cid is not None else '-'} "
            text += f"keyutil-logs: {event['event']} {details}".rstrip()
        if self.fmt == "json":
            return json.dumps(fields, ensure_ascii=True)
        return text

    def write(self, cid: int | None, peer: str, record: Record | dict[str, Any]) -> None:
        line = self.format(cid, peer, record) + "\n"
        with self._lock:
            self.out.write(line)
            self.out.flush()
            if self.append is not None:
                self.append.write(line)
                self.append.flush()


def serve_connection(
    sock: socket.socket, printer: Printer, *, idle_timeout: float = IDLE_TIMEOUT
) -> None:
    """Read one enclave's connection to its end, printing as records complete."""
    peer = describe_peer(sock)
    cid: int | None = None
    if sock.family == socket.AF_VSOCK:
        with contextlib.suppress(OSError):
            cid = int(sock.getpeername()[0])
    printer.write(cid, peer, {"event": "connected"})
    reader = LogReader()
    end: dict[str, Any] = {"event": "disconnected"}
    sock.settimeout(idle_timeout)
    try:
        while True:
            data = sock.recv(READ_SIZE)
            if not data:
                if reader.pending:
                    end["incomplete_bytes"] = reader.pending
                break
            for record in reader.feed(data):
                printer.write(cid, peer, record)
    except WireError as e:
        for record in e.records:
            printer.write(cid, peer, record)
        end.update(error=e.code, message=e.message)
    except TimeoutError:
        end["error"] = "idle_timeout"
    except OSError as e:
        end["error"] = e.strerror or type(e).__name__
    printer.write(cid, peer, end)


class _Handler(socketserver.BaseRequestHandler):
    server: LogServer

    def handle(self) -> None:
        serve_connection(self.request, self.server.printer)


class LogServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    """A threading stream server on a vsock, unix or TCP listen address."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, listen: ListenAddress, printer: Printer) -> None:
        self.address_family = listen.family
        self.printer = printer
        self.listen = listen
        if listen.family == socket.AF_UNIX:
            clear_stale_unix(listen.address)
        super().__init__(listen.address, _Handler)

    def server_bind(self) -> None:
        if self.address_family not in (socket.AF_INET, socket.AF_INET6):
            self.allow_reuse_address = False
        super().server_bind()

    def server_close(self) -> None:
        super().server_close()
        if self.listen.family == socket.AF_UNIX:
            with contextlib.suppress(OSError):
                os.unlink(self.listen.address)
