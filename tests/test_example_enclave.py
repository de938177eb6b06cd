"""examples/enclave, booted for real: its run.toml and app.py under `keyutil run`, with the
NSM simulator and a real `mock-kms serve`, and examples/host's pieces on the "host" side
(`keyutil logs`, the inbound `keyutil proxy`, `keyutil wait-ready --http /healthz`).

Only the addresses change: every vsock address of run.toml becomes a unix socket (these
machines have no vsock loopback), /run/keys a directory of the test, and the pinned KMS
identity the test KMS's. The enclave gets fresh network and mount namespaces.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from e2e_support import KEYUTIL, Setup, assert_key_absent, free_port
from plumbing_support import NEEDS_ROOT_NAMESPACES, EnclaveRun, sockdir, wait_until

__all__ = ["sockdir"]
pytestmark = NEEDS_ROOT_NAMESPACES

EXAMPLE = Path(__file__).parent.parent / "examples" / "enclave"


def example_config(d: Path, identity: str) -> str:
    text = (EXAMPLE / "run.toml").read_text()
    for old, new in [
        ("vsock://:5001", f"unix://{d}/enclave-5001.sock"),
        ("vsock://3:8000", f"unix://{d}/kms.sock"),
        ("vsock://3:8443", f"unix://{d}/egress.sock"),
        ("vsock://3:9000", f"unix://{d}/log.sock"),
        ("/run/keys", f"{d}/keys"),
        ("/srv/app", str(EXAMPLE)),
        ("@/etc/keyutil/kms.pub", identity),
        ('"python3"', json.dumps(sys.executable)),
    ]:
        assert old in text, old
        text = text.replace(old, new)
    return text


def test_the_example_image_boots_releases_its_key_and_answers_healthz(
    setup: Setup, sockdir: Path
) -> None:
    # The image expects its keys to be demo-app's (run.toml's expect_app).
    kms = setup.kms(
        unix=sockdir / "kms.sock", images=(f"{setup.image}=demo-app",)
    ).start().wait_listening()
    logs = subprocess.Popen(
        [KEYUTIL, "logs", "--listen", f"unix://{sockdir}/log.sock", "--log-format", "json"],
        stdout=(sockdir / "sink.out").open("wb"), stderr=subprocess.DEVNULL,
    )
    port = free_port()
    inbound = subprocess.Popen(
        [KEYUTIL, "proxy", "--listen", f"tcp://127.0.0.1:{port}",
         "--to", f"unix://{sockdir}/enclave-5001.sock"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    enclave = EnclaveRun(
        sockdir,
        example_config(sockdir, setup.identity),
        env={"KEYUTIL_NSM": "simulator", "KEYUTIL_SIM_DIR": str(setup.sim)},
    )
    try:
        wait_until((sockdir / "log.sock").exists, what="the sink")
        enclave.start()
        ready = subprocess.run(
            [KEYUTIL, "wait-ready", "--target", f"tcp://127.0.0.1:{port}",
             "--http", "/healthz", "--deadline", "90"],
            capture_output=True, text=True, timeout=120,
        )
        assert ready.returncode == 0, ready.stdout + enclave.stderr()
        assert json.loads(ready.stdout)["detail"] == "GET /healthz: 200"
        released = setup.get_key(f"unix://{sockdir}/kms.sock", "--key", "app", "--stdout")
        assert released.returncode == 0 and len(released.stdout) == 32
        os.kill(enclave.supervisor_pid(), signal.SIGTERM)
        status = enclave.wait(30)
        wait_until(lambda: "app_exited" in (sockdir / "sink.out").read_text(), what="exit")
    finally:
        inbound.terminate()
        logs.terminate()
        inbound.wait(10)
        logs.wait(10)
        enclave.stop()
        kms.stop()
    assert status == 128 + signal.SIGTERM  # http.server does not catch SIGTERM
    records = [json.loads(x) for x in (sockdir / "sink.out").read_text().splitlines()]
    app_lines = [r["line"] for r in records if r.get("stream") == "stdout"]
    assert app_lines[0] == "app: key loaded (32 bytes); serving on 127.0.0.1:4000"
    supervisor = [json.loads(r["line"]) for r in records if r.get("stream") == "supervisor"]
    events = [e["event"] for e in supervisor]
    for expected in ("net_up", "tmpfs", "keys_released", "app_started", "app_exited"):
        assert expected in events
    assert events.index("keys_released") < events.index("app_started")
    # the app's key, as the same image gets it, is nowhere in what reached the host
    assert_key_absent(
        released.stdout, (sockdir / "sink.out").read_bytes(), enclave.err.read_bytes(),
        enclave.out.read_bytes(),
    )
