"""Benchmark ``keyutil get-key`` from process start to key written, against a local KMS.

    .venv/bin/python bench/bench_getkey.py [--runs N] [--json] [--warmup W]

Set-up (not timed): ``keyutil sim init`` makes an NSM simulator, ``mock-kms identity`` a KMS
state directory, and one ``mock-kms serve`` (embedded chain, the simulator's root trusted,
its image allowed) is started on a free loopback port and polled until ``GET /v1/health``
answers 200. Keys go to a fresh directory on tmpfs (``/dev/shm``), removed at the end; the
server is stopped with SIGTERM at the end.

Measured, ``--runs`` times each and interleaved (the order alternates every round, so
background load on a shared machine hits both alike):

- ``get-key``: ``.venv/bin/keyutil get-key --nsm simulator --key app --out /dev/shm/...``,
  the whole exchange (health, challenge, attestation, release, open, write);
- ``python -c pass``: the same interpreter starting and exiting, the floor of any Python CLI.

Per run: wall time is ``time.perf_counter`` from just before ``subprocess.Popen`` to the
return of ``os.wait4`` on the child; peak RSS is the child's own ``ru_maxrss``, taken with
``/usr/bin/time -f %M`` (see :func:`timed_child` for why not ``os.wait4`` directly).
A get-key run counts only if it exits 0 and the key file holds 32 bytes. Reported: median,
p90 and min wall time, median and max peak RSS, and the ratio of the get-key median to the
python-pass median. Targets: median at most 0.5 s, peak RSS at
most 60 MB (MiB here, 1 MB = 2**20 bytes).

Bytecode: this environment may set ``PYTHONDONTWRITEBYTECODE=1``, which makes every run
compile the project's modules from source (about 20 ms for get-key). By default
(``--bytecode cached``) the children write and reuse ``.pyc`` files under the work directory
(``PYTHONPYCACHEPREFIX``), as an image with compiled bytecode would; ``--bytecode inherit``
runs them in this environment as it is. The repository tree is never written.

Start-up breakdown: ``python -X importtime -c 'import keyutil.cli'`` (median over 3 runs per
module), top cumulative entries; and the same for a whole ``get-key`` run, which also shows
the modules that the command imports lazily.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchlib import KEYUTIL, PYTHON, LocalKms, environment, percentile

ROOT = Path(__file__).resolve().parent.parent
KEY_NAME = "app"
TARGET_MEDIAN_S = 0.5
TARGET_RSS_MB = 60.0
TOP_IMPORTS = 8


TIME_BIN = shutil.which("time", path="/usr/bin:/bin")


def rss_method() -> str:
    if TIME_BIN:
        return f"{TIME_BIN} -f %M (the child's own ru_maxrss)"
    return "os.wait4 ru_maxrss: UPPER BOUND, includes this process's RSS at spawn"


def timed_child(
    argv: Sequence[str], stderr_path: Path, env: dict[str, str]
) -> tuple[float, int, int]:
    """(wall seconds, peak RSS KiB, exit status) of one child process.

    Peak RSS: on Linux a child started with vfork (what subprocess does) takes over the
    parent's RSS high-water mark at exec, so ``os.wait4``'s ``ru_maxrss`` of a direct child is
    at least this benchmark's own RSS (about 30 MB with cryptography imported, more than a
    whole ``python -c pass``). The child is therefore run under ``/usr/bin/time -f %M``,
    which forks from its own small image and reports the grandchild's figure; the wall time
    then includes one exec of ``time`` (about 1 ms), for both commands alike.
    """
    rss_path = stderr_path.with_suffix(".rss")
    full = [TIME_BIN, "-f", "%M", "-o", str(rss_path), *argv] if TIME_BIN else list(argv)
    with open(stderr_path, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code  # reaped by os.wait4; keep Popen from waiting again
    rss = int(usage.ru_maxrss)
    if TIME_BIN:
        # time writes "Command exited with non-zero status N" before %M on failure.
        rss = int(rss_path.read_text().split()[-1])
    return wall, rss, code


BYTECODE_NOTES = {
    "cached": "children cache .pyc in the work directory (PYTHONPYCACHEPREFIX, "
    "PYTHONDONTWRITEBYTECODE unset), filled by the warm-up runs",
    "inherit": "children inherit this environment (with PYTHONDONTWRITEBYTECODE=1 every "
    "project module is compiled from source on every run)",
}


def child_environment(mode: str, work: Path) -> dict[str, str]:
    """The children's environment. The repository tree is never written: with ``cached``,
    bytecode goes to a directory under ``work`` (removed at the end)."""
    env = dict(os.environ)
    if mode == "cached":
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")
    return env


def summarize(walls: Sequence[float], rss_kib: Sequence[int]) -> dict[str, Any]:
    return {
        "runs": len(walls),
        "wall_median_s": statistics.median(walls),
        "wall_p90_s": percentile(walls, 0.9),
        "wall_min_s": min(walls),
        "wall_max_s": max(walls),
        "rss_median_mb": statistics.median(rss_kib) / 1024,
        "rss_max_mb": max(rss_kib) / 1024,
    }


IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def parse_importtime(stderr: str) -> list[tuple[str, int, int, int]]:
    """(module, self us, cumulative us, nesting depth) for each line of -X importtime."""
    rows = []
    for line in stderr.splitlines():
        m = IMPORTTIME_LINE.match(line)
        if m:
            depth = (len(m.group(3)) - 1) // 2
            rows.append((m.group(4), int(m.group(1)), int(m.group(2)), depth))
    return rows


def importtime_top(
    argv: Sequence[str], env: dict[str, str], repeat: int = 3, top: int = TOP_IMPORTS
) -> dict[str, Any]:
    """Median per module over ``repeat`` runs of ``python -X importtime ...``; top cumulative."""
    per_module: dict[str, list[tuple[int, int, int]]] = {}
    totals = []
    for _ in range(repeat):
        proc = subprocess.run(
            [PYTHON, "-X", "importtime", *argv],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        rows = parse_importtime(proc.stderr)
        totals.append(sum(cum for _, _, cum, depth in rows if depth == 0))
        for name, self_us, cum_us, depth in rows:
            per_module.setdefault(name, []).append((self_us, cum_us, depth))
    entries = []
    for name, samples in per_module.items():
        entries.append(
            {
                "module": name,
                "cumulative_ms": statistics.median(s[1] for s in samples) / 1000,
                "self_ms": statistics.median(s[0] for s in samples) / 1000,
                "depth": samples[0][2],
            }
        )
    entries.sort(key=lambda e: e["cumulative_ms"], reverse=True)
    return {
        "command": ["python", "-X", "importtime", *argv],
        "total_top_level_ms": statistics.median(totals) / 1000,
        "modules": len(per_module),
        "top": entries[:top],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-getkey-"))
    env = child_environment(args.bytecode, work)
    out_dir = Path(tempfile.mkdtemp(prefix="bench-getkey-", dir="/dev/shm"))
    kms = LocalKms(work, app=KEY_NAME)
    failures: list[dict[str, Any]] = []
    try:
        kms.start()
        key_path = out_dir / f"{KEY_NAME}.key"
        getkey_argv = [
            KEYUTIL,
            "get-key",
            "--kms",
            kms.url,
            "--kms-pubkey",
            kms.identity,
            "--nsm",
            "simulator",
            "--sim-dir",
            str(kms.sim_dir),
            "--key",
            KEY_NAME,
            "--out",
            str(key_path),
            "--deadline",
            "30",
        ]
        pass_argv = [PYTHON, "-c", "pass"]
        stderr_path = work / "child.stderr"

        def one_getkey() -> tuple[float, int] | None:
            key_path.unlink(missing_ok=True)
            wall, rss, code = timed_child(getkey_argv, stderr_path, env)
            size = key_path.stat().st_size if key_path.exists() else None
            if code != 0 or size != 32:
                failures.append(
                    {
                        "exit_code": code,
                        "key_bytes": size,
                        "stderr": stderr_path.read_text(errors="replace")[-2000:],
                    }
                )
                return None
            return wall, rss

        def one_pass() -> tuple[float, int] | None:
            wall, rss, code = timed_child(pass_argv, stderr_path, env)
            if code != 0:
                failures.append({"exit_code": code, "command": "python -c pass"})
                return None
            return wall, rss

        for _ in range(args.warmup):  # page cache, .pyc cache, the server's first-use paths
            one_getkey()
            one_pass()
        failures.clear()

        results: dict[str, list[tuple[float, int]]] = {"getkey": [], "python_pass": []}
        for i in range(args.runs):
            order = [("getkey", one_getkey), ("python_pass", one_pass)]
            if i % 2:
                order.reverse()
            for name, fn in order:
                sample = fn()
                if sample is not None:
                    results[name].append(sample)
        key_path.unlink(missing_ok=True)

        importtime_cli = importtime_top(["-c", "import keyutil.cli"], env)
        # --stdout: three runs in a row must not trip over an existing key file.
        stdout_argv = [*getkey_argv[1:-4], "--stdout", "--format", "hex", *getkey_argv[-2:]]
        importtime_getkey = importtime_top([KEYUTIL, *stdout_argv], env)
    finally:
        kms.stop()
        server_traceback = kms.log_has_traceback()
        shutil.rmtree(out_dir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    summary = {
        name: summarize([w for w, _ in samples], [r for _, r in samples])
        for name, samples in results.items()
        if samples
    }
    report: dict[str, Any] = {
        "benchmark": "bench_getkey",
        **environment(),
        "runs_requested": args.runs,
        "warmup": args.warmup,
        "rss_method": rss_method(),
        "bytecode": BYTECODE_NOTES[args.bytecode],
        "env_PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "getkey_command": "keyutil get-key --nsm simulator --key app --out /dev/shm/... "
        "(one 32-byte key, x25519 suite)",
        "results": summary,
        "errors": len(failures),
        "error_samples": failures[:5],
        "targets": {"median_s": TARGET_MEDIAN_S, "rss_mb": TARGET_RSS_MB},
        "server_exit_code": kms.exit_code,
        "server_log_has_traceback": server_traceback,
        "importtime_keyutil_cli": importtime_cli,
        "importtime_getkey": importtime_getkey,
    }
    if "getkey" in summary and "python_pass" in summary:
        g, p = summary["getkey"], summary["python_pass"]
        report["ratio_median_getkey_over_python_pass"] = g["wall_median_s"] / p["wall_median_s"]
        report["ratio_min_getkey_over_python_pass"] = g["wall_min_s"] / p["wall_min_s"]
        report["getkey_minus_python_pass_median_s"] = g["wall_median_s"] - p["wall_median_s"]
        report["meets_median_target"] = g["wall_median_s"] <= TARGET_MEDIAN_S
        report["meets_rss_target"] = g["rss_max_mb"] <= TARGET_RSS_MB
    return report


def print_table(report: dict[str, Any]) -> None:
    print(
        f"bench_getkey  {report['date']}  nproc {report['nproc']}  load {report['loadavg_1m']}  "
        f"python {report['python']}  cryptography {report['cryptography']}  "
        f"{report['openssl']}"
    )
    print(f"{report['runs_requested']} runs each, interleaved, after {report['warmup']} warm-up")
    print(f"peak RSS via {report['rss_method']}")
    print(f"bytecode: {report['bytecode']}")
    print()
    header = (
        f"{'command':<16} {'n':>3} {'median s':>9} {'p90 s':>8} {'min s':>8} {'max s':>8} "
        f"{'RSS med MB':>11} {'RSS max MB':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, label in (("getkey", "keyutil get-key"), ("python_pass", "python -c pass")):
        s = report["results"].get(name)
        if s is None:
            print(f"{label:<16} no successful runs")
            continue
        print(
            f"{label:<16} {s['runs']:>3} {s['wall_median_s']:>9.3f} {s['wall_p90_s']:>8.3f} "
            f"{s['wall_min_s']:>8.3f} {s['wall_max_s']:>8.3f} {s['rss_median_mb']:>11.1f} "
            f"{s['rss_max_mb']:>11.1f}"
        )
    print()
    if "ratio_median_getkey_over_python_pass" in report:
        g = report["results"]["getkey"]
        print(
            f"get-key / python -c pass: {report['ratio_median_getkey_over_python_pass']:.2f}x "
            f"(medians), {report['ratio_min_getkey_over_python_pass']:.2f}x (mins); "
            f"get-key beyond interpreter start: {report['getkey_minus_python_pass_median_s']:.3f} s"
        )
        ok = "meets" if report["meets_median_target"] else "MISSES"
        print(f"target median <= {TARGET_MEDIAN_S} s: {g['wall_median_s']:.3f} s, {ok}")
        ok = "meets" if report["meets_rss_target"] else "MISSES"
        print(f"target peak RSS <= {TARGET_RSS_MB:.0f} MB: max {g['rss_max_mb']:.1f} MB, {ok}")
    print(f"errors: {report['errors']}")
    for sample in report["error_samples"]:
        print(f"  {json.dumps(sample)}")
    if report["server_exit_code"] not in (0, -signal.SIGTERM) or report["server_log_has_traceback"]:
        print(
            f"note: mock-kms exit code on SIGTERM {report['server_exit_code']}, traceback in "
            f"its log: {report['server_log_has_traceback']}"
        )
    for key in ("importtime_keyutil_cli", "importtime_getkey"):
        imp = report[key]
        cmd = " ".join(imp["command"][-2:]) if key.endswith("cli") else "keyutil get-key ..."
        print()
        print(
            f"-X importtime, {cmd}: {imp['total_top_level_ms']:.1f} ms in imports, "
            f"{imp['modules']} modules; top {TOP_IMPORTS} by cumulative (median of 3):"
        )
        print(f"  {'cumulative ms':>13} {'self ms':>8}  module")
        for e in imp["top"]:
            indent = "  " * e["depth"]
            print(f"  {e['cumulative_ms']:>13.1f} {e['self_ms']:>8.1f}  {indent}{e['module']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="runs of each command (30)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs of each first (2)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--bytecode",
        choices=sorted(BYTECODE_NOTES),
        default="cached",
        help="cached: children cache .pyc under the work directory (PYTHONPYCACHEPREFIX), "
        "as an image with compiled bytecode would; inherit: the environment as it is",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.bytecode == "cached" and args.warmup < 1:
        parser.error("--bytecode cached needs at least one --warmup run to fill the cache")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
