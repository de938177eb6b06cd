"""Compare HTTP servers for the KMS in one run: ``mock-kms serve``'s own (mock_kms/httpd.py,
one event loop per worker), pre-forked waitress, granian (Rust, WSGI interface) and gunicorn
(gthread workers), all serving the same WSGI app (``mock_kms.server.KmsApp``) over the same
release service.

    .venv/bin/python bench/bench_servers.py [--servers mock-kms,waitress,granian,gunicorn]
        [--workers 1,2] [--rounds 2] [--clients 4] [--docs 2500] [--seconds 8]
        [--flood-runs 5] [--json]

waitress, granian and gunicorn are not dependencies of the project: install them into .venv
for this benchmark (``.venv/bin/pip install waitress granian gunicorn``); a server that is
missing is skipped.

How each server is started: ``mock-kms serve`` itself for mock-kms; for the others this
script's launcher mode (``bench_servers.py --as-server NAME serve ARGS``), which runs the real
``mock-kms serve`` command line (same options parsed, same socket bound first, same service
built: state, embedded chain with the image registered, verifier, SQLite replay store) and
replaces only its last step, the serving: waitress workers (:func:`mock_kms.workers.
run_workers`) accept on the bound socket; for granian and gunicorn it is closed and they bind
the same address; each worker builds its ``KmsApp`` after the fork (multiprocess metrics with
N > 1), as ``mock-kms serve``'s workers do. The candidates' settings: 8 threads per worker
(``mock-kms serve`` runs each request in its loop); waitress's own limits only (none for slow
clients beyond its idle timeout); granian's request-head deadline 5 s
(``http1_header_read_timeout``, its only slow-client limit: it has no per-peer cap and no
idle keep-alive limit, but the head deadline also bounds a kept-alive connection's wait);
gunicorn's keep-alive 5 s (it has no request-head deadline: a gthread worker reads a new
connection's request in one of its threads).

Measured, interleaved (round 1 of every server and worker count, then round 2, ...):

- ``bench_release.run_load`` with ``--clients`` closed-loop client processes whose
  ``--docs`` documents and requests are built before the window, each sent on a new
  connection as keyutil does (so that the KMS, not the clients, is the
  bottleneck): releases/s, server CPU per release (``/proc`` utime + stime of the launched
  process and its children, i.e. every worker), floor / server CPU, with the crypto floor
  measured in this process between phases (``bench_release.FloorBench``);
- 2 workers / 1 worker throughput per server and round;
- with ``--flood-runs`` > 0, once per server at the largest worker count: ``keyutil
  get-key`` median unloaded and under the flood of ``bench_flood.py`` (1,000 trickling
  connections from 127.0.0.2, 50 keep-alive dribblers from 127.0.0.3), and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SERVERS = ("mock-kms", "waitress", "granian", "gunicorn")
CANDIDATE_THREADS = 8


# -- Launcher: ``mock-kms serve`` with another server doing the serving ----------------------


def _worker_app(service: Any, settings: Any, metrics_dir: str | None) -> Any:
    from mock_kms.server import KmsApp

    service.nonces.store.close()  # a forked worker opens its own connections
    return KmsApp(service, max_body=settings.max_body, metrics_dir=metrics_dir)


def _serve_waitress(
    service: Any, settings: Any, workers: int, metrics_dir: str | None, sock: Any
) -> None:
    from waitress.server import create_server

    from mock_kms.workers import run_workers

    def one(index: int) -> None:
        create_server(
            _worker_app(service, settings, metrics_dir),
            sockets=[sock],
            threads=CANDIDATE_THREADS,
            max_request_body_size=settings.max_body,
            connection_limit=settings.connection_limit,
            channel_timeout=settings.channel_timeout,
            asyncore_use_poll=True,
        ).run()

    if workers == 1:
        one(0)
    else:
        run_workers(workers, one)


def _serve_granian(
    service: Any, settings: Any, workers: int, metrics_dir: str | None, sock: Any
) -> None:
    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server import Server

    sock.close()  # granian binds the same address itself
    Server(
        "mock_kms.server:KmsApp",  # unused: the loader below gives the app
        address=settings.host,
        port=settings.port,
        interface=Interfaces.WSGI,
        workers=workers,
        blocking_threads=CANDIDATE_THREADS,
        backlog=settings.backlog,
        http=HTTPModes.http1,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_timeout * 1000)),
        log_access=False,
        workers_kill_timeout=10,
    ).serve(target_loader=lambda: _worker_app(service, settings, metrics_dir), wrap_loader=False)


def _serve_gunicorn(
    service: Any, settings: Any, workers: int, metrics_dir: str | None, sock: Any
) -> None:
    from gunicorn.app.base import BaseApplication

    sock.close()  # gunicorn binds the same address itself

    class Kms(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in {
                "bind": [f"{settings.host}:{settings.port}"],
                "workers": workers,
                "worker_class": "gthread",
                "threads": CANDIDATE_THREADS,
                "keepalive": int(settings.keepalive_timeout),
                "backlog": settings.backlog,
                "graceful_timeout": 10,
                "loglevel": "warning",
            }.items():
                self.cfg.set(key, value)

        def load(self) -> Any:  # in each worker, after the fork
            return _worker_app(service, settings, metrics_dir)

    with contextlib.suppress(SystemExit):  # the arbiter exits when stopped
        Kms().run()


def launch(name: str, argv: Sequence[str]) -> int:
    """Run ``mock-kms`` with ``argv``, serving with ``name`` instead of its own server."""
    import mock_kms.cli as cli

    serve = {
        "waitress": _serve_waitress, "granian": _serve_granian, "gunicorn": _serve_gunicorn
    }[name]

    def serve_workers(service: Any, settings: Any, sock: Any, workers: int) -> int | None:
        metrics_dir = tempfile.mkdtemp(prefix="mock-kms-metrics-") if workers > 1 else None
        try:
            serve(service, settings, workers, metrics_dir, sock)
        finally:
            if metrics_dir:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return signal.SIGTERM

    cli._serve_workers = serve_workers  # type: ignore[assignment]
    return cli.main(list(argv))


# -- The comparison -------------------------------------------------------------------------


def available(name: str) -> bool:
    return name == "mock-kms" or importlib.util.find_spec(name) is not None


def make_kms(work: Path, server: str, workers: int, serve_args: Sequence[str]) -> Any:
    from benchlib import LocalKms

    kms = LocalKms(work, app="app", serve_args=[*serve_args, "--workers", str(workers)])
    if server != "mock-kms":
        kms.command = [sys.executable, str(Path(__file__).resolve()), "--as-server", server]
    return kms


def flood_ratio(work: Path, server: str, workers: int, runs: int) -> dict[str, Any]:
    from bench_flood import flood_run

    kms = make_kms(work, server, workers, [])
    return {"server": server, "workers": workers, **flood_run(kms, runs, 1000, 50, 6.0)}


def in_process_cost(work: Path, releases: int) -> dict[str, Any]:
    """CPU per release of the WSGI app called directly (no HTTP server, no socket), with the
    service that ``mock-kms serve`` builds for the same options: what any server adds is
    the server CPU per release minus this."""
    from bench_release import app_cost, in_process_app
    from benchlib import LocalKms

    client, service = in_process_app(LocalKms(work, app="app"))
    try:
        return app_cost(client, releases)
    finally:
        service.nonces.store.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench_release import FloorBench, add_ratios, run_load
    from benchlib import environment

    servers = [s for s in args.servers if available(s)]
    work = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    # Documents are built before the window: they must still be fresh when sent.
    serve_args = ["--nonce-lifetime", "600", "--max-age", "600"]
    loads: list[dict[str, Any]] = []
    floors: list[float] = []
    floor_bench: Any = None
    try:
        for rnd in range(args.rounds):
            for server in servers:
                for workers in args.workers:
                    kms = make_kms(work / f"{server}-w{workers}-r{rnd}", server, workers,
                                   serve_args)
                    try:
                        kms.start()
                        if floor_bench is None:
                            floor_bench = FloorBench(kms)
                            floors.append(floor_bench.rounds(2.0, rounds=3))
                        load = run_load(kms, args.clients, args.seconds, args.warmup,
                                        workers=workers, precomputed=args.docs)
                    finally:
                        kms.stop()
                    load.update(server=server, round=rnd, exit_code=kms.exit_code,
                                loadavg_1m=os.getloadavg()[0])
                    loads.append(load)
                    floors.append(floor_bench.rounds(1.0, rounds=3))
        direct = [in_process_cost(work / f"direct-{i}", 500) for i in range(args.rounds)]
        floor_ms = floor_bench.summary()["floor"]["median_ms"]
        for load in loads:
            add_ratios(load, floor_ms / 1000, len(os.sched_getaffinity(0)))
        floods = (
            [flood_ratio(work / f"{s}-flood", s, max(args.workers), args.flood_runs)
             for s in servers]
            if args.flood_runs
            else []
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "bench_servers",
        **environment(),
        "versions": {s: _version(s) for s in servers},
        "clients": args.clients,
        "docs": args.docs,
        "seconds": args.seconds,
        "floor_ms": floor_ms,
        "floor_ms_by_segment": floors,
        "in_process_app": direct,
        "loads": [_brief(r) for r in loads],
        "summary": summarize(loads, servers, args.workers),
        "floods": floods,
    }


def _version(name: str) -> str:
    from importlib.metadata import version

    return version("nitro-keyrelease" if name == "mock-kms" else name)


def _brief(load: dict[str, Any]) -> dict[str, Any]:
    keys = ("server", "workers", "round", "releases_per_s", "server_cpu_ms_per_release",
            "server_cpu_utilization", "client_cpu_utilization", "errors", "server_refusals",
            "exit_code", "loadavg_1m", "release_rtt_p50_ms")
    return {**{k: load[k] for k in keys},
            "floor_over_server_cpu": load["ratios"]["floor_over_server_cpu"],
            "error_samples": load["error_samples"][:2]}


def summarize(
    loads: Sequence[dict[str, Any]], servers: Sequence[str], workers: Sequence[int]
) -> dict[str, Any]:
    """Per server: the range over rounds of each figure, the N-worker / 1-worker throughput
    per round, and the figures' medians as ratios against mock-kms's own server's."""
    out: dict[str, Any] = {}
    low, high = min(workers), max(workers)
    for server in servers:
        mine = [r for r in loads if r["server"] == server]
        entry: dict[str, Any] = {}
        for w in workers:
            rows = [r for r in mine if r["workers"] == w]
            entry[f"w{w}"] = {
                "releases_per_s": [round(r["releases_per_s"], 1) for r in rows],
                "cpu_ms_per_release": [round(r["server_cpu_ms_per_release"], 3) for r in rows],
                "floor_over_server_cpu": [round(r["ratios"]["floor_over_server_cpu"], 3)
                                          for r in rows],
            }
        if low != high:
            by_round = {r["round"]: r for r in mine if r["workers"] == low}
            entry[f"scaling_{high}w_{low}w"] = [
                round(r["releases_per_s"] / by_round[r["round"]]["releases_per_s"], 3)
                for r in mine
                if r["workers"] == high and by_round.get(r["round"], {}).get("releases_per_s")
            ]
        out[server] = entry
    if "mock-kms" in out:
        base = out["mock-kms"]
        for entry in out.values():
            entry["vs_mock_kms"] = {
                f"w{w}_{k}": round(
                    statistics.median(entry[f"w{w}"][k]) / statistics.median(base[f"w{w}"][k]), 3
                )
                for w in workers
                for k in ("releases_per_s", "cpu_ms_per_release")
                if base[f"w{w}"][k] and statistics.median(base[f"w{w}"][k])
            }
    return out


def print_report(report: dict[str, Any]) -> None:
    print(f"bench_servers  {report['date']}  nproc {report['nproc']}  load "
          f"{report['loadavg_1m']}  {report['versions']}  clients {report['clients']}  docs "
          f"{report['docs']}  floor {report['floor_ms']:.3f} ms")
    print(f"{'server':<9} {'w':>2} {'rnd':>3} {'rel/s':>7} {'cpu ms':>7} {'util':>5} "
          f"{'floor/cpu':>9} {'err':>4} {'load':>5}")
    for r in report["loads"]:
        print(f"{r['server']:<9} {r['workers']:>2} {r['round']:>3} {r['releases_per_s']:>7.1f} "
              f"{r['server_cpu_ms_per_release']:>7.3f} {r['server_cpu_utilization']:>5.2f} "
              f"{r['floor_over_server_cpu']:>9.3f} {r['errors']:>4} {r['loadavg_1m']:>5.1f}")
    for d in report["in_process_app"]:
        print(f"the app called in-process (no server): {d['cpu_ms_per_release']:.3f} ms CPU "
              f"per release")
    print(json.dumps(report["summary"], indent=1))
    for f in report["floods"]:
        print(f"flood {f['server']:<9} {f['workers']}w: get-key {f['unloaded_median_s']:.3f} s "
              f"-> {f['flooded_median_s']:.3f} s (max {f['flooded_max_s']:.3f}) = "
              f"{f['ratio']:.2f}x, {f['failures']} failed")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--as-server"]:
        return launch(argv[1], argv[2:])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=lambda s: s.split(","), default=list(SERVERS))
    parser.add_argument("--workers", type=ints, default=[1, 2], help="worker counts (1,2)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, interleaved (2)")
    parser.add_argument("--clients", type=int, default=4, help="client processes (4)")
    parser.add_argument("--docs", type=int, default=2500, help="documents per client (2500)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured window (8)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured (1)")
    parser.add_argument("--flood-runs", type=int, default=5, help="get-key runs (5; 0: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if unknown := set(args.servers) - set(SERVERS):
        parser.error(f"unknown servers: {sorted(unknown)}")
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 1 if any(r["errors"] for r in report["loads"]) else 0


if __name__ == "__main__":
    sys.exit(main())
