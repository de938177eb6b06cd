"""The log bridge: its wire format, the enclave's sender, the host's `keyutil logs`, and
`keyutil run` sending through it while the host listens late, stalls, or sees a crash."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from e2e_support import KEYUTIL, LoopbackServer, free_port
from plumbing_support import (
    NEEDS_ROOT_NAMESPACES,
    EnclaveRun,
    sockdir,
    wait_until,
    write_app,
)

from keyutil.enclave.logsend import LogSender
from keyutil.host.logsink import LogServer, Printer
from keyutil.logwire import (
    HEADER,
    HELLO,
    MAX_LINE,
    MAX_PAYLOAD,
    Dropped,
    LogLine,
    LogReader,
    WireError,
    encode_dropped,
    encode_line,
    printable,
)
from keyutil.proxy import parse_listen

__all__ = ["sockdir"]

# -- the wire format -----------------------------------------------------------------------------


def test_records_round_trip_fed_one_byte_at_a_time() -> None:
    data = HELLO + encode_line("stdout", 12.5, "héllo") + encode_dropped(7)
    data += encode_line("supervisor", 13.0, b"") + encode_line("stderr", 14.25, b"\xff\xfeoops")
    reader = LogReader()
    records = []
    for i in range(len(data)):
        records += reader.feed(data[i : i + 1])
    assert records == [
        LogLine("stdout", 12.5, "héllo"),
        Dropped(7),
        LogLine("supervisor", 13.0, ""),
        LogLine("stderr", 14.25, "\ufffd\ufffdoops"),
    ]
    assert reader.pending == 0


def test_a_long_line_travels_as_several_frames() -> None:
    text = "x" * (2 * MAX_LINE + 5)
    records = LogReader().feed(HELLO + encode_line("stdout", 1.0, text))
    assert [len(r.text) for r in records if isinstance(r, LogLine)] == [MAX_LINE, MAX_LINE, 5]


def frame(kind: int, stream: int, reserved: int, length: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, stream, reserved, length) + payload


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\n", "bad_magic"),
        (b"KLOG2\n", "bad_magic"),
        (HELLO + frame(9, 0, 0, 8, bytes(8)), "bad_kind"),
        (HELLO + frame(1, 3, 0, 8, bytes(8)), "bad_stream"),
        (HELLO + frame(2, 1, 0, 8, bytes(8)), "bad_stream"),
        (HELLO + frame(1, 0, 1, 8, bytes(8)), "bad_reserved"),
        (HELLO + frame(1, 0, 0, MAX_PAYLOAD + 1), "too_long"),
        (HELLO + frame(1, 0, 0, 0xFFFFFFFF), "too_long"),
        (HELLO + frame(1, 0, 0, 7, bytes(7)), "bad_length"),
        (HELLO + frame(2, 0, 0, 9, bytes(9)), "bad_length"),
        (HELLO + frame(1, 0, 0, 8, (253402300800000).to_bytes(8, "big")), "bad_time"),
    ],
)
def test_hostile_bytes_are_refused_with_a_code_and_the_reader_stays_refusing(
    data: bytes, code: str
) -> None:
    reader = LogReader()
    with pytest.raises(WireError) as e:
        reader.feed(data)
    assert e.value.code == code
    with pytest.raises(WireError):
        reader.feed(HELLO)
    assert reader.pending == 0  # nothing is kept from a bad connection


def test_a_huge_length_is_refused_before_its_bytes_arrive() -> None:
    reader = LogReader()
    with pytest.raises(WireError, match="at most"):
        reader.feed(HELLO + HEADER.pack(1, 0, 0, 1 << 30))


def test_printable_escapes_what_could_drive_a_terminal_or_forge_a_line() -> None:
    assert printable("a\tb") == "a\tb"
    assert printable("\x1b[2Jcleared\r\nfake line") == "\\x1b[2Jcleared\\x0d\\x0afake line"
    assert printable("\x9b31m\u2028") == "\\u009b31m\\u2028"


# -- the sender: bounded, never blocking -----------------------------------------------------------


def test_the_buffer_keeps_the_newest_lines_and_counts_the_rest() -> None:
    sender = LogSender(lambda: None, max_lines=3)
    for n in range(10):
        sender.emit("stdout", f"line {n}")
    assert (sender.buffered, sender.dropped_pending, sender.dropped_total) == (3, 7, 7)
    big = LogSender(lambda: None, max_lines=100, max_bytes=100)
    for _ in range(10):
        big.emit("stderr", "y" * 40)
    assert big.buffered == 1 and big.dropped_total == 9  # one line always fits


def sink(listen: str, out: io.StringIO) -> LogServer:
    server = LogServer(parse_listen(listen), Printer(out, "json"))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


def sink_records(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_host_that_comes_back_gets_the_dropped_count_first_then_the_kept_lines(
    sockdir: Path,
) -> None:
    path = sockdir / "log.sock"

    def connect() -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        return sock

    sender = LogSender(connect, max_lines=5, retry_initial=0.01, retry_max=0.05)
    sender.start()
    for n in range(20):
        sender.emit("stdout", f"line {n}")
    out = io.StringIO()
    server = sink(f"unix://{path}", out)
    try:
        assert sender.flush(10)
        wait_until(lambda: len(sink_records(out)) >= 7, what="the sink's lines")
    finally:
        sender.close()
        server.shutdown()
        server.server_close()
    records = sink_records(out)
    assert records[0]["event"] == "connected"
    assert records[1]["event"] == "dropped" and records[1]["count"] == 15
    assert [r["line"] for r in records[2:7]] == [f"line {n}" for n in range(15, 20)]
    assert {r["stream"] for r in records[2:7]} == {"stdout"}
    assert sender.sent_lines == 5


def test_the_sink_survives_a_hostile_connection_and_serves_the_next(sockdir: Path) -> None:
    out = io.StringIO()
    server = sink(f"unix://{sockdir}/log.sock", out)
    try:
        with socket.socket(socket.AF_UNIX) as bad:
            bad.connect(str(sockdir / "log.sock"))
            bad.sendall(HELLO + encode_line("stdout", 1.0, "before") + frame(7, 0, 0, 8))
            bad.settimeout(10)
            assert bad.recv(1) == b""  # closed by the sink
        with socket.socket(socket.AF_UNIX) as good:
            good.connect(str(sockdir / "log.sock"))
            good.sendall(HELLO + encode_line("stderr", 2.0, "\x1b]0;owned\x07after"))
            good.sendall(encode_line("stdout", 3.0, "cut")[:-1])
        wait_until(lambda: len(sink_records(out)) >= 6, what="both connections")
    finally:
        server.shutdown()
        server.server_close()
    records = sink_records(out)
    assert records[1]["line"] == "before"
    assert records[2]["event"] == "disconnected" and records[2]["error"] == "bad_kind"
    assert records[4]["line"] == "\x1b]0;owned\x07after"  # JSON escapes it
    assert records[5]["event"] == "disconnected" and records[5]["incomplete_bytes"] > 0
    text = Printer(io.StringIO()).format(16, "vsock:16:1", LogLine("stderr", 2.0, "\x1b]0;x"))
    assert text == "1970-01-01T00:00:02.000Z cid=16 stderr: \\x1b]0;x"


# -- keyutil run through the bridge, with a real `keyutil logs` ----------------------------------


class LogsProcess:
    """A `keyutil logs` process writing to files."""

    def __init__(self, root: Path, listen: str, *extra: str) -> None:
        self.out = root / "sink.out"
        with self.out.open("wb") as out, (root / "sink.err").open("wb") as err:
            self.proc = subprocess.Popen(
                [KEYUTIL, "logs", "--listen", listen, *extra], stdout=out, stderr=err
            )

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.terminate()
        return int(self.proc.wait(20))


CRASH_APP = """
import sys
for n in range(5):
    print(f"booting {n}", flush=True)
print("fatal: cannot open /data/model", file=sys.stderr, flush=True)
sys.exit(3)
"""


@NEEDS_ROOT_NAMESPACES
def test_an_app_that_crashes_at_boot(sockdir: Path) -> None:
    """wait-ready gives up within its deadline naming why; the host's sink shows the app's
    last lines and its exit status."""
    app = write_app(sockdir / "app.py", CRASH_APP)
    logs = LogsProcess(sockdir, f"unix://{sockdir}/log.sock", "--append", str(sockdir / "all.log"))
    wait_until((sockdir / "log.sock").exists, what="the sink")
    port = free_port()
    inbound = subprocess.Popen(
        [KEYUTIL, "proxy", "--listen", f"tcp://127.0.0.1:{port}",
         "--to", f"unix://{sockdir}/enclave-5001.sock"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    enclave = EnclaveRun(
        sockdir,
        f"""
[log]
to = "unix://{sockdir}/log.sock"
[[forward]]
listen = "unix://{sockdir}/enclave-5001.sock"
to = "tcp://127.0.0.1:4000"
[app]
command = ["{app}"]
""",
    )
    try:
        assert enclave.run() == 3
        started = time.monotonic()
        ready = subprocess.run(
            [KEYUTIL, "wait-ready", "--target", f"tcp://127.0.0.1:{port}", "--deadline", "2"],
            capture_output=True, text=True, timeout=30,
        )
        elapsed = time.monotonic() - started
        wait_until(lambda: "app_exited" in logs.text(), what="the exit in the sink")
    finally:
        inbound.terminate()
        inbound.wait(10)
        assert logs.stop() == 0
    assert ready.returncode == 3
    answer = json.loads(ready.stdout)
    assert answer["status"] == "not_ready"
    assert "closed the connection at once" in answer["error"]
    assert elapsed < 2 + 3  # the deadline, plus the start of a Python process
    text = logs.text()
    assert "cid=- stdout: booting 4" in text
    assert "cid=- stderr: fatal: cannot open /data/model" in text
    assert "cid=- supervisor: keyutil: error: app_exited status=3" in text
    assert (sockdir / "all.log").read_text() == text


LATE_APP = """
import json, sys, time
started = time.monotonic()
for n in range(int(sys.argv[2])):
    print(f"line {n} " + "z" * 200, flush=True)
json.dump({"elapsed": time.monotonic() - started}, open(sys.argv[1], "w"))
time.sleep(float(sys.argv[3]))
"""


def late_config(sockdir: Path, app: Path, lines: int, linger: float, log_to: str) -> str:
    return f"""
[log]
to = "{log_to}"
buffer_lines = 100
console = false
flush_timeout = 10
[app]
command = ["{app}", "{sockdir}/record.json", "{lines}", "{linger}"]
"""


@NEEDS_ROOT_NAMESPACES
def test_a_late_sink_gets_the_buffered_lines_and_the_dropped_count(sockdir: Path) -> None:
    app = write_app(sockdir / "app.py", LATE_APP)
    log_to = f"unix://{sockdir}/log.sock"
    enclave = EnclaveRun(sockdir, late_config(sockdir, app, 1000, 1.5, log_to)).start()
    try:
        wait_until((sockdir / "record.json").exists, 60, "the app's lines")
        logs = LogsProcess(sockdir, log_to, "--log-format", "json")
        assert enclave.wait(60) == 0
        wait_until(lambda: "app_exited" in logs.text(), what="the exit in the sink")
    finally:
        enclave.stop()
    assert logs.stop() == 0
    records = [json.loads(line) for line in logs.text().splitlines()]
    (dropped,) = [r for r in records if r.get("event") == "dropped"]
    kept = [r["line"].split()[1] for r in records if r.get("stream") == "stdout"]
    assert dropped["count"] + len(kept) >= 1000
    assert dropped["count"] >= 900
    assert kept[-1] == "999"  # the newest lines are the ones kept
    assert kept == [str(n) for n in range(int(kept[0]), 1000)]
    assert json.loads((sockdir / "record.json").read_text())["elapsed"] < 5


@NEEDS_ROOT_NAMESPACES
def test_a_host_that_stops_reading_never_blocks_the_app(sockdir: Path) -> None:
    """The host accepts the connection and never reads: the app's 3 MB of output take about
    as long as with no log bridge at all (timed against that baseline, same run)."""
    app = write_app(sockdir / "app.py", LATE_APP)
    stalled = threading.Event()

    def never_read(conn: socket.socket) -> None:
        stalled.wait(60)

    host = LoopbackServer(never_read, unix=sockdir / "stall.sock")
    timings = {}
    try:
        for case, log_to in (("baseline", ""), ("stalled", f"unix://{sockdir}/stall.sock")):
            config = late_config(sockdir, app, 15000, 0, log_to)
            if not log_to:
                config = config.replace('to = ""\n', "")
            run = EnclaveRun(sockdir, config.replace("flush_timeout = 10", "flush_timeout = 0.5"))
            assert run.run(120) == 0, run.stderr()
            timings[case] = json.loads((sockdir / "record.json").read_text())["elapsed"]
    finally:
        stalled.set()
        host.close()
    assert timings["stalled"] < max(2.0, 4 * timings["baseline"]), timings


def test_records_before_the_bad_bytes_are_kept() -> None:
    with pytest.raises(WireError) as e:
        LogReader().feed(HELLO + encode_line("stdout", 1.0, "kept") + b"\x09" * 8)
    assert e.value.records == [LogLine("stdout", 1.0, "kept")]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--listen", "udp://:9000"], 2, "expected vsock://[CID]:PORT"),
        (["--listen", "unix:///nonexistent-dir/log.sock"], 3, "listen_failed"),
        (["--listen", "unix:///tmp/x.sock", "--append", "/nonexistent-dir/all.log"], 7,
         "append_failed"),
    ],
)
def test_logs_usage_listen_and_append_errors(args: list[str], code: int, message: str) -> None:
    done = subprocess.run([KEYUTIL, "logs", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_logs_refuses_a_socket_another_sink_listens_on(sockdir: Path) -> None:
    first = LogsProcess(sockdir, f"unix://{sockdir}/log.sock")
    try:
        wait_until((sockdir / "log.sock").exists, what="the first sink")
        done = subprocess.run([KEYUTIL, "logs", "--listen", f"unix://{sockdir}/log.sock"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 3
        assert "another process is listening" in done.stderr
    finally:
        assert first.stop() == 0
    assert not (sockdir / "log.sock").exists()  # removed at stop
