"""Benchmark opening a sealed (age) file: ``keyutil unseal`` next to the stock ``age -d``.

    .venv/bin/python bench/bench_unseal.py [--sizes 1,4] [--rounds 2] [--json]

Set-up (not timed): an age identity (``keyutil``'s own format, which ``age`` reads) and, per
size (GiB), a sealed file of that much plaintext made by the stock ``age`` from /dev/zero
(the cipher's speed does not depend on the bytes). The sealed input lives in a temporary
directory on the disk under the system temp dir (read through the page cache, warmed by one
untimed read), not on tmpfs, so that a 4 GiB run holds only its output in memory. Each
output file is deleted right after its run; the inputs at the end of their size.

Measured, per size, ``--rounds`` times each, interleaved (the order rotates every round):

- ``keyutil unseal --identity ID IN /dev/shm/...``: to a file on tmpfs (published by rename
  once the whole input authenticated);
- ``keyutil unseal --identity ID IN -``: to a pipe this script drains (1 MiB reads, discarded);
- ``age -d -i ID -o /dev/shm/... IN`` and ``age -d -i ID IN`` to a pipe: the same, by the
  stock age CLI (Go);
- and once per size, in this process, the raw ChaCha20-Poly1305 decryption of the same number
  of 64 KiB chunks by ``cryptography`` (no I/O, no parsing): the ceiling for any Python
  opener built on it.

Per run: wall time from just before the child starts to its exit, throughput in plaintext
GB/s (10**9 bytes), the child's peak RSS and CPU time, user + system (``/usr/bin/time -f
"%M %U %S"``, as bench_getkey.py does, so that the figures are the child's own). Reported:
the best and median throughput of each command, its largest peak RSS, its median CPU
seconds per GB, the keyutil / age throughput ratios (medians) and the age / keyutil CPU per
GB ratios (on a loaded machine wall time also measures the wait for a CPU; CPU time does
not).
Targets: keyutil at least 0.9x age's throughput, peak RSS under 64 MB (MiB here) at 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import KEYUTIL, environment
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from keyutil import keytypes

GIB = 1 << 30
CHUNK = 64 * 1024
TIME_BIN = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
TMPFS = Path("/dev/shm")


def run_child(
    argv: Sequence[str], work: Path, *, pipe: bool
) -> tuple[float, int, float, int]:
    """(wall seconds, peak RSS KiB, CPU seconds (user + system), exit code); with ``pipe``
    stdout is drained here."""
    rss_path = work / "rss"
    full = [TIME_BIN, "-f", "%M %U %S", "-o", str(rss_path), *argv] if TIME_BIN else list(argv)
    buffer = bytearray(1 << 20)
    start = time.perf_counter()
    proc = subprocess.Popen(
        full,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if pipe:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        view = memoryview(buffer)
        while os.readv(fd, [view]):
            pass
        proc.stdout.close()
    code = proc.wait()
    wall = time.perf_counter() - start
    # time writes "Command exited with non-zero status N" first on failure.
    rss, user, system = rss_path.read_text().split()[-3:] if TIME_BIN else ("0", "0", "0")
    return wall, int(rss), float(user) + float(system), code


def raw_chacha_seconds(size: int) -> float:
    """Seconds for cryptography to decrypt ``size`` bytes as 64 KiB ChaCha20-Poly1305 chunks."""
    aead = ChaCha20Poly1305(bytes(32))
    sealed = aead.encrypt(bytes(12), bytes(CHUNK), None)
    start = time.perf_counter()
    for _ in range(size // CHUNK):
        aead.decrypt(bytes(12), sealed, None)
    return time.perf_counter() - start


def make_sealed(path: Path, size: int, recipient: str) -> None:
    with open(path, "wb") as out:
        producer = subprocess.Popen(
            ["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE
        )
        subprocess.run(["age", "-r", recipient], stdin=producer.stdout, stdout=out, check=True)
        assert producer.stdout is not None
        producer.stdout.close()
        producer.wait()


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(1 << 20)
        while f.readinto(buffer):
            pass


def bench_size(gib: int, rounds: int, identity: Path, recipient: str, work: Path,
               out_dir: Path) -> dict[str, Any]:
    size = gib * GIB
    sealed = work / f"sealed-{gib}g.age"
    make_sealed(sealed, size, recipient)
    warm(sealed)
    out = out_dir / "plain.bin"
    commands = {
        "keyutil -> tmpfs": ([KEYUTIL, "unseal", "--identity", str(identity), str(sealed),
                              str(out)], False),
        "keyutil -> pipe": ([KEYUTIL, "unseal", "--identity", str(identity), str(sealed), "-"],
                            True),
        "age -> tmpfs": (["age", "-d", "-i", str(identity), "-o", str(out), str(sealed)], False),
        "age -> pipe": (["age", "-d", "-i", str(identity), str(sealed)], True),
    }
    names = list(commands)
    results: dict[str, dict[str, list[float]]] = {
        n: {"gbps": [], "rss_mib": [], "cpu_s_per_gb": []} for n in names
    }
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            argv, pipe = commands[name]
            wall, rss, cpu, code = run_child(argv, work, pipe=pipe)
            if code != 0:
                raise SystemExit(f"{name} exited {code}")
            if not pipe:
                if out.stat().st_size != size:
                    raise SystemExit(f"{name} wrote {out.stat().st_size} bytes, not {size}")
                out.unlink()
            results[name]["gbps"].append(size / wall / 1e9)
            results[name]["rss_mib"].append(rss / 1024)
            results[name]["cpu_s_per_gb"].append(cpu / (size / 1e9))
    raw = size / raw_chacha_seconds(size) / 1e9
    sealed.unlink()
    summary: dict[str, Any] = {"gib": gib, "rounds": rounds, "raw_chacha20poly1305_gbps": raw}
    for name in names:
        summary[name] = {
            "median_gbps": statistics.median(results[name]["gbps"]),
            "best_gbps": max(results[name]["gbps"]),
            "peak_rss_mib": max(results[name]["rss_mib"]),
            "median_cpu_s_per_gb": statistics.median(results[name]["cpu_s_per_gb"]),
        }
    for sink in ("tmpfs", "pipe"):
        ours, theirs = summary[f"keyutil -> {sink}"], summary[f"age -> {sink}"]
        summary[f"keyutil/age {sink}"] = ours["median_gbps"] / theirs["median_gbps"]
        # CPU per byte, age / keyutil: above 1 when keyutil does the work with less CPU. On
        # a shared machine it is steadier than wall time, which waits for the CPU too.
        summary[f"cpu age/keyutil {sink}"] = (
            theirs["median_cpu_s_per_gb"] / ours["median_cpu_s_per_gb"]
        )
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,4", help="Plaintext sizes in GiB, comma-separated.")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("age") is None:
        raise SystemExit("the stock age CLI is missing (Debian package age)")
    work = Path(tempfile.mkdtemp(prefix="bench-unseal-"))
    out_dir = Path(tempfile.mkdtemp(prefix="bench-unseal-", dir=TMPFS))
    try:
        seed = os.urandom(32)
        identity = out_dir / "id.key"
        identity.write_bytes(keytypes.get("age").private_file(seed, "age"))
        recipient = str(keytypes.get("age").public(seed))
        report = {
            "environment": environment(),
            "sizes": [
                bench_size(int(g), args.rounds, identity, recipient, work, out_dir)
                for g in args.sizes.split(",")
            ],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    env = report["environment"]
    print(f"{env['date']}  nproc {env['nproc']}  load {env['loadavg_1m']}  "
          f"python {env['python']}  cryptography {env['cryptography']}  {env['openssl']}")
    for s in report["sizes"]:
        print(f"\n{s['gib']} GiB, {s['rounds']} rounds   raw ChaCha20-Poly1305 (cryptography): "
              f"{s['raw_chacha20poly1305_gbps']:.2f} GB/s")
        print(f"{'command':<18} {'median GB/s':>12} {'best GB/s':>10} {'peak RSS MiB':>13} "
              f"{'CPU s/GB':>9}")
        for name in ("keyutil -> tmpfs", "age -> tmpfs", "keyutil -> pipe", "age -> pipe"):
            r = s[name]
            print(f"{name:<18} {r['median_gbps']:>12.2f} {r['best_gbps']:>10.2f} "
                  f"{r['peak_rss_mib']:>13.1f} {r['median_cpu_s_per_gb']:>9.2f}")
        print(f"keyutil/age throughput: tmpfs {s['keyutil/age tmpfs']:.2f}x, "
              f"pipe {s['keyutil/age pipe']:.2f}x; CPU per GB age/keyutil: "
              f"tmpfs {s['cpu age/keyutil tmpfs']:.2f}x, pipe {s['cpu age/keyutil pipe']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
