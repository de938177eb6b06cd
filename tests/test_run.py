"""`keyutil run`: the enclave's supervisor, run for real in namespaces the tests create.

Each enclave is `unshare -n -m` (a fresh loopback, its own mounts), and with `-p -f` the
supervisor is PID 1. Unix sockets stand in for vsock: the host's forwarders and the
enclave's forwarders meet at socket files, as they would meet at vsock ports.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from e2e_support import KEYUTIL, MOCK_KMS, LoopbackServer, ProxyProcess, Setup, free_port, sim_init
from plumbing_support import (
    NEEDS_ROOT_NAMESPACES,
    EnclaveRun,
    echo,
    events,
    exchange,
    sockdir,
    wait_until,
    write_app,
)

__all__ = ["sockdir"]
pytestmark = NEEDS_ROOT_NAMESPACES

# The app: a TCP server on 127.0.0.1:4000 that answers "app:" + the request; a request
# starting with "egress:" is sent on through 127.0.0.1:8443 (the egress forwarder) and what
# comes back is the answer. It records its working directory and environment first.
SERVER_APP = """
import json, os, socket, sys
json.dump({"cwd": os.getcwd(), "env": dict(os.environ)}, open(sys.argv[1], "w"))
print("app: listening", flush=True)

def read_all(sock):
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)

with socket.socket() as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 4000))
    server.listen(8)
    while True:
        conn, _ = server.accept()
        with conn:
            request = read_all(conn)
            if request.startswith(b"egress:"):
                with socket.create_connection(("127.0.0.1", 8443), timeout=10) as out:
                    out.sendall(request[7:])
                    out.shutdown(socket.SHUT_WR)
                    answer = read_all(out)
            else:
                answer = b"app:" + request
            conn.sendall(answer)
"""


def base_config(sockdir: Path, app: list[str], *, extra: str = "", workdir: str = "/") -> str:
    return f"""
[supervisor]
log_format = "json"

[app]
command = {json.dumps(app)}
workdir = "{workdir}"
env = {{ APP_MODE = "test" }}
{extra}
"""


def test_host_tcp_to_the_app_and_the_app_to_a_host_server(sockdir: Path) -> None:
    """host TCP -> host proxy -> "vsock" -> run's inbound forwarder -> app on 127.0.0.1,
    byte-exact; and app -> 127.0.0.1:8443 -> egress forwarder -> host proxy -> host TCP."""
    record = sockdir / "record.json"
    app = write_app(sockdir / "app.py", SERVER_APP)
    outside = LoopbackServer(echo)  # the "internet" server the app reaches through egress
    egress = ProxyProcess(
        "--listen", f"unix://{sockdir}/egress.sock", "--to", f"tcp://127.0.0.1:{outside.port}"
    ).wait_listening(sockdir / "egress.sock")
    workdir = sockdir / "work"
    workdir.mkdir()
    enclave = EnclaveRun(
        sockdir,
        base_config(
            sockdir,
            [str(app), str(record)],
            workdir=str(workdir),
            extra=f"""
[[forward]]
listen = "unix://{sockdir}/enclave-5001.sock"
to = "tcp://127.0.0.1:4000"

[[forward]]
listen = "tcp://127.0.0.1:8443"
to = "unix://{sockdir}/egress.sock"
""",
        ),
        env={"KEYUTIL_SECRET_LOOKING": "not for the app"},
    ).start()
    port = free_port()
    inbound = subprocess.Popen(
        [KEYUTIL, "proxy", "--listen", f"tcp://127.0.0.1:{port}",
         "--to", f"unix://{sockdir}/enclave-5001.sock"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        ready = subprocess.run(
            [KEYUTIL, "wait-ready", "--target", f"tcp://127.0.0.1:{port}", "--deadline", "30"],
            capture_output=True, text=True, timeout=60,
        )
        assert ready.returncode == 0, ready.stderr + enclave.stderr()
        assert json.loads(ready.stdout)["status"] == "ready"
        payload = os.urandom(1 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            assert exchange(client, payload) == b"app:" + payload
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            assert exchange(client, b"egress:" + payload) == payload
        # the app listens in the enclave's own loopback only
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", 4000), timeout=2):
            pass
        seen = json.loads(record.read_text())
        assert seen["cwd"] == str(workdir)
        assert seen["env"]["APP_MODE"] == "test"
        assert not any(name.startswith("KEYUTIL_") for name in seen["env"])
        assert "app: listening" in enclave.stdout()
    finally:
        inbound.terminate()
        inbound.wait(10)
        enclave.stop()
        egress.stop()
        outside.close()
    steps = [e["step"] for e in events(enclave.stderr()) if e["event"] == "step"]
    assert steps == [
        "log", "net_up", "tmpfs", "keys", "sealed", "forward", "host_settings", "workdir", "app",
    ]


# -- PID 1 ------------------------------------------------------------------------------------

# Forks N children that each fork a grandchild and exit at once: the grandchildren are
# orphans, re-parented to the supervisor (PID 1, or a subreaper), and exit too. The app then
# counts zombies left under its parent, records it, and waits for SIGTERM, which it answers
# with exit status 42.
ORPHANS_APP = """
import json, os, signal, sys, time
N = int(sys.argv[2])
def term(signum, frame):
    print("app: got SIGTERM", flush=True)
    sys.exit(42)
signal.signal(signal.SIGTERM, term)
for _ in range(N):
    pid = os.fork()
    if pid == 0:
        if os.fork() == 0:
            time.sleep(0.05)
            os._exit(0)
        os._exit(0)
    os.waitpid(pid, 0)
parent = os.getppid()
def zombies():
    found = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] == "Z" and int(fields[1]) == parent:
                found += 1
    return found
deadline = time.monotonic() + 10
while (count := zombies()) and time.monotonic() < deadline:
    time.sleep(0.05)
json.dump({"zombies": count, "forked": N, "parent": parent, "cwd": os.getcwd()},
          open(sys.argv[1], "w"))
while True:
    time.sleep(1)
"""


@pytest.mark.parametrize("pid_ns", [True, False], ids=["pid1", "subreaper"])
def test_orphans_are_reaped_and_sigterm_reaches_the_app(sockdir: Path, pid_ns: bool) -> None:
    record = sockdir / "record.json"
    app = write_app(sockdir / "app.py", ORPHANS_APP)
    enclave = EnclaveRun(
        sockdir,
        base_config(sockdir, [str(app), str(record), "40"], workdir=str(sockdir)),
        pid_ns=pid_ns,
    ).start()
    try:
        wait_until(record.exists, 60, "the app's record")
        time.sleep(0.1)
        seen = json.loads(record.read_text())
        assert seen["zombies"] == 0
        assert seen["cwd"] == str(sockdir)
        if pid_ns:
            assert seen["parent"] == 1
        os.kill(enclave.supervisor_pid(), signal.SIGTERM)
        assert enclave.wait(30) == 42
    finally:
        enclave.stop()
    assert "app: got SIGTERM" in enclave.stdout()
    (exited,) = [e for e in events(enclave.stderr()) if e["event"] == "app_exited"]
    assert exited["status"] == 42
    assert exited["orphans_reaped"] >= 40


def test_app_killed_by_a_signal_gives_128_plus_n(sockdir: Path) -> None:
    enclave = EnclaveRun(sockdir, base_config(sockdir, ["/bin/sh", "-c", "kill -KILL $$"]))
    assert enclave.run() == 128 + signal.SIGKILL
    (exited,) = [e for e in events(enclave.stderr()) if e["event"] == "app_exited"]
    assert exited["signal"] == "SIGKILL"


# -- every step's failure ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sim") / "sim"
    sim_init(directory)
    return directory


MARKER_APP = "import sys; open(sys.argv[1], 'w').write('started')\n"

NO_CAP = ("capsh", "--drop={cap}", "--", "-c", 'exec "$0" "$@"')


def _drop(cap: str) -> tuple[str, ...]:
    return tuple(part.format(cap=cap) for part in NO_CAP)


@pytest.mark.parametrize(
    ("step", "code", "extra", "inside", "message"),
    [
        ("net_up", 8, "", _drop("cap_net_admin"), "CAP_NET_ADMIN"),
        ("tmpfs", 7, '[tmpfs]\npaths = ["{d}/keys"]', _drop("cap_sys_admin"), "on tmpfs"),
        (
            "keys", 3,
            '[kms]\nurls = ["unix://{d}/nokms.sock"]\npubkey = "ed25519:{pk}"\ndeadline = 1\n'
            '[[keys]]\nnames = ["app"]\ndir = "/dev/shm"',
            (), "exited 3",
        ),
        (
            "sealed", 3,
            '[kms]\nurls = ["unix://{d}/nokms.sock"]\npubkey = "ed25519:{pk}"\ndeadline = 1\n'
            '[[sealed]]\nkey = "weights"\nsource = "/opt/model.age"\ndest = "/dev/shm/model"',
            (), "exited 3",
        ),
        ("forward", 3, '[[forward]]\nlisten = "unix://{d}/no/such/dir.sock"\nto = "tcp://127.0.0.1:1"',
         (), "cannot listen"),
        ("workdir", 10, "", (), "cannot change to"),
        ("app", 10, "", (), "cannot start"),
    ],
)
def test_each_step_failure_names_the_step_exits_with_its_code_and_the_app_never_starts(
    sockdir: Path,
    sim: Path,
    step: str,
    code: int,
    extra: str,
    inside: tuple[str, ...],
    message: str,
) -> None:
    marker = sockdir / "started"
    app = write_app(sockdir / "app.py", MARKER_APP)
    command = [str(app), str(marker)] if step != "app" else [str(sockdir / "missing"), "x"]
    workdir = str(sockdir / "missing-dir") if step == "workdir" else "/"
    config = base_config(
        sockdir,
        command,
        workdir=workdir,
        extra=extra.format(d=sockdir, pk="A" * 43 + "="),
    )
    env = {"KEYUTIL_NSM": "simulator", "KEYUTIL_SIM_DIR": str(sim)}
    enclave = EnclaveRun(sockdir, config, inside=inside, env=env)
    assert enclave.run() == code, enclave.stderr()
    assert not marker.exists()
    found = events(enclave.stderr())
    (failed,) = [e for e in found if e["event"] == "step_failed"]
    assert failed["step"] == step
    assert failed["exit"] == code
    assert message in failed["message"]
    assert [e["step"] for e in found if e["event"] == "app_not_started"] == [step]
    assert not any(e["event"] == "app_started" for e in found)


def test_a_config_error_exits_2_before_anything(sockdir: Path) -> None:
    enclave = EnclaveRun(sockdir, '[app]\ncomand = ["/bin/true"]\n')
    assert enclave.run() == 2
    assert "step_failed" in enclave.stderr()
    assert "app.command: required" in enclave.stderr()


# -- keys, for real: mock-kms, the NSM simulator, failover -------------------------------------


def test_keys_released_with_failover_before_the_app_starts(setup: Setup, sockdir: Path) -> None:
    """Two KMS addresses: the first has nothing behind it, the second is a real mock-kms.
    The keys land on the tmpfs the supervisor mounted, before the app starts, and no key
    material reaches the console."""
    kms = setup.kms(unix=sockdir / "kms.sock").start().wait_listening()
    record = sockdir / "record.json"
    keys_dir = sockdir / "keys"
    app = write_app(
        sockdir / "app.py",
        "import hashlib, json, os, sys\n"
        f"keys = {{n: hashlib.sha256(open(os.path.join({str(keys_dir)!r}, n), 'rb').read())"
        ".hexdigest() for n in sorted(os.listdir("
        f"{str(keys_dir)!r}))}}\n"
        "json.dump(keys, open(sys.argv[1], 'w'))\n",
    )
    config = base_config(
        sockdir,
        [str(app), str(record)],
        extra=f"""
[tmpfs]
paths = ["{keys_dir}"]

[kms]
urls = ["unix://{sockdir}/dead.sock", "unix://{sockdir}/kms.sock"]
pubkey = "{setup.identity}"
deadline = 20

[[keys]]
names = ["app", "db"]
length = 32
dir = "{keys_dir}"
""",
    )
    enclave = EnclaveRun(
        sockdir, config, env={"KEYUTIL_NSM": "simulator", "KEYUTIL_SIM_DIR": str(setup.sim)}
    )
    try:
        assert enclave.run(120) == 0, enclave.stderr()
    finally:
        kms.stop()
    digests = json.loads(record.read_text())
    assert sorted(digests) == ["app", "db"]
    found = events(enclave.stderr())
    # This keyutil's get-key takes every URL and fails over itself (its own log line, passed
    # on); the supervisor moves between URLs only for a get-key that takes one.
    failover = [e for e in found if e["event"] in ("replica_unavailable", "kms_failover")]
    assert failover and "dead.sock" in json.dumps(failover[0])
    (released,) = [e for e in found if e["event"] == "keys_released"]
    assert released["names"] == ["app", "db"]
    assert any(e["event"] == "written" for e in found)  # get-key's own line, passed on
    assert not keys_dir.exists() or not os.listdir(keys_dir)  # the tmpfs went with the ns


# -- sealed files, for real: stock age on the "build host", opened before the app starts ----


def test_sealed_file_and_dotenv_are_opened_before_the_app(setup: Setup, sockdir: Path) -> None:
    kms = setup.kms(unix=sockdir / "kms.sock").start().wait_listening()

    def recipient(key: str) -> str:
        out = subprocess.run(
            [MOCK_KMS, "recipient", "--state-dir", str(setup.state), "--app", "app-a",
             "--key", key], check=True, capture_output=True, text=True,
        )
        return out.stdout.strip()

    weights = os.urandom(300_000)
    subprocess.run(["age", "-r", recipient("weights"), "-o", str(sockdir / "weights.age")],
                   input=weights, check=True)
    secrets_env = b"DB_PASS='s3cr3t-never-logged'\nMODE=from-sealed\n"
    subprocess.run(["age", "-r", recipient("env"), "-o", str(sockdir / "secrets.env.age")],
                   input=secrets_env, check=True)
    record = sockdir / "record.json"
    app = write_app(
        sockdir / "app.py",
        "import hashlib, json, os, sys\n"
        f"data = open({str(sockdir / 'run' / 'weights.bin')!r}, 'rb').read()\n"
        "json.dump({'sha256': hashlib.sha256(data).hexdigest(), 'db_pass_sha256': "
        "hashlib.sha256(os.environ['DB_PASS'].encode()).hexdigest(), "
        "'mode': os.environ['MODE']}, open(sys.argv[1], 'w'))\n",
    )
    config = base_config(
        sockdir,
        [str(app), str(record)],
        extra=f"""
[tmpfs]
paths = ["{sockdir}/run"]

[kms]
urls = ["unix://{sockdir}/kms.sock"]
pubkey = "{setup.identity}"
deadline = 30

[[sealed]]
key = "weights"
source = "{sockdir}/weights.age"
dest = "{sockdir}/run/weights.bin"

[[sealed]]
key = "env"
source = "{sockdir}/secrets.env.age"
format = "dotenv"
""",
    ).replace('env = { APP_MODE = "test" }', 'env = { MODE = "image" }')
    env = {"KEYUTIL_NSM": "simulator", "KEYUTIL_SIM_DIR": str(setup.sim)}
    try:
        assert EnclaveRun(sockdir, config, env=env).run(120) == 0, (sockdir / "console.err").read_text()
        seen = json.loads(record.read_text())
        assert seen["sha256"] == hashlib.sha256(weights).hexdigest()
        assert seen["db_pass_sha256"] == hashlib.sha256(b"s3cr3t-never-logged").hexdigest()
        assert seen["mode"] == "from-sealed"  # the sealed secret wins over the image's env
        console = (sockdir / "console.err").read_bytes() + (sockdir / "console.out").read_bytes()
        assert b"s3cr3t" not in console
        (opened,) = [e for e in events(console.decode()) if e["event"] == "sealed_env"]
        assert opened["names"] == ["DB_PASS", "MODE"]

        # the same file cut short: refused (exit 9), the app never starts
        data = (sockdir / "weights.age").read_bytes()
        (sockdir / "weights.age").write_bytes(data[: len(data) // 2])
        record.unlink()
        enclave = EnclaveRun(sockdir, config, env=env)
        assert enclave.run(120) == 9
        assert not record.exists()
        (failed,) = [e for e in events(enclave.stderr()) if e["event"] == "step_failed"]
        assert failed["step"] == "sealed"
        (refused,) = [e for e in events(enclave.stderr()) if e["event"] == "sealed_refused"]
        assert refused["code"] in ("sealed_altered", "sealed_truncated")  # get-key's own line

        # a dotenv sealed to another key (the weights' one): refused in the supervisor itself
        (sockdir / "weights.age").write_bytes(data)
        subprocess.run(["age", "-r", recipient("weights"), "-o",
                        str(sockdir / "secrets.env.age")], input=secrets_env, check=True)
        enclave = EnclaveRun(sockdir, config, env=env)
        assert enclave.run(120) == 9
        assert not record.exists()
        (failed,) = [e for e in events(enclave.stderr()) if e["event"] == "step_failed"]
        assert failed["step"] == "sealed"
        assert failed["message"].startswith("sealed_not_for_key: ")
        assert b"s3cr3t" not in enclave.err.read_bytes()
    finally:
        kms.stop()
