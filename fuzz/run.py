"""Run one fuzz target for a number of executions or seconds, and report.

    .venv/bin/python -m fuzz.run parser --engine atheris --runs 1000000 \\
        --findings fuzz-out/findings --report fuzz-out/parser.json -- -max_len=512
    .venv/bin/python -m fuzz.run verifier --engine plain --seconds 600 --seed 1

``--engine atheris`` (``pip install -e '.[fuzz]'``): libFuzzer, coverage-guided over the
instrumented ``mock_kms`` and ``keyutil`` code; its input is the stream of decisions the
mutator makes (:class:`fuzz.mutate.Chooser`), so coverage feedback steers which mutations
are made where. Arguments after ``--`` go to libFuzzer (``-max_len``, ``-artifact_prefix``,
a corpus dir, ...). ``--engine plain``: a seeded ``random.Random`` makes the decisions
(reproducible with ``--seed``). Either way the report (JSON) is printed at the end and, with
``--report``, rewritten every few seconds while the run goes; findings and their inputs go
to ``--findings`` (see :mod:`fuzz.record`); ``DIR/<target>-inflight.bin`` is the input being
run, so a crash that kills the process (a C stack overflow) leaves its input there; give
atheris ``-artifact_prefix=DIR/`` for its own copy. Exit status: 0 when no finding, 1
otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPORT_EVERY = 5.0
# What atheris instruments for coverage: the product, not the fuzzer or the libraries.
INSTRUMENTED = ("mock_kms", "keyutil")
PRODUCT_MODULES = ("mock_kms.attestation", "mock_kms.verifier", "mock_kms.service",
                   "mock_kms.server", "mock_kms.allowlist", "keyutil.protocol",
                   "keyutil.simulator", "keyutil.sealing.age", "keyutil.sealing.dotenv",
                   "keyutil.logwire", "keyutil.host.logsink", "keyutil.sealing.recipient",
                   "keyutil.provenance", "keyutil.enclave.supervisor", "mock_kms.httpd")


def environment() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from benchlib import environment as bench_environment  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    facts: dict[str, Any] = bench_environment()
    return facts


class Session:
    def __init__(self, args: argparse.Namespace, engine_facts: dict[str, Any]) -> None:
        from fuzz.record import Recorder
        from fuzz.targets import make_target

        self.args = args
        self.target = make_target(args.target)
        self.recorder = Recorder(args.findings)
        if args.findings is not None:
            args.findings.mkdir(parents=True, exist_ok=True)
            self.target.inflight = args.findings / f"{args.target}-inflight.bin"
        self.engine_facts = engine_facts
        self.last_report = time.monotonic()
        self.command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "fuzz.run",
                                                         *sys.argv[1:]])
        self.env = environment()

    def step(self, chooser: Any) -> None:
        self.recorder.add(self.target.one(chooser))
        now = time.monotonic()
        if now - self.last_report >= REPORT_EVERY:
            self.last_report = now
            self.write_report()
            print(f"#{self.recorder.execs} {self.summary()}", file=sys.stderr, flush=True)

    def summary(self) -> str:
        r = self.recorder.report()
        return (f"execs/s {r['execs_per_second']} crashes {r['crashes']} accepted "
                f"{r['accepted_mutants']} refused_valid {r['refused_valid']} "
                f"harness {r['harness_errors']}")

    def report(self) -> dict[str, Any]:
        return {
            "target": self.args.target,
            "engine": self.args.engine,
            "command": self.command,
            "environment": self.env,
            **self.engine_facts,
            **self.recorder.report(),
        }

    def write_report(self) -> None:
        if self.args.report is not None:
            self.args.report.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.args.report.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.report(), indent=2) + "\n")
            os.replace(tmp, self.args.report)

    def finish(self) -> int:
        self.write_report()
        print(json.dumps(self.report(), indent=2))
        return 1 if self.recorder.findings or self.recorder.kinds["harness_error"] else 0


def run_plain(args: argparse.Namespace) -> int:
    from fuzz.mutate import RandomChooser

    session = Session(args, {"seed": args.seed})
    chooser = RandomChooser(args.seed)
    deadline = time.monotonic() + args.seconds if args.seconds else None
    try:
        while (args.runs is None or session.recorder.execs < args.runs) and (
                deadline is None or time.monotonic() < deadline):
            session.step(chooser)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    return session.finish()


def run_atheris(args: argparse.Namespace, libfuzzer_args: list[str]) -> int:
    import atheris

    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        for name in PRODUCT_MODULES:
            __import__(name)
    from fuzz.mutate import RandomChooser  # after: it imports product modules too

    class FdpChooser:
        """Decisions from libFuzzer's input; past its end, from a PRNG seeded with the input
        (not all zeros, which would make every late decision the first option)."""

        def __init__(self, data: bytes) -> None:
            self.fdp = atheris.FuzzedDataProvider(data)
            self.rest = RandomChooser(random.Random(data))

        def below(self, n: int) -> int:
            if n <= 1:
                return 0
            if self.fdp.remaining_bytes() == 0:
                return self.rest.below(n)
            return int(self.fdp.ConsumeIntInRange(0, n - 1))

        def data(self, n: int) -> bytes:
            got = bytes(self.fdp.ConsumeBytes(n))
            return got + self.rest.data(n - len(got))

    session = Session(args, {"libfuzzer_args": libfuzzer_args,
                             "atheris": getattr(atheris, "__version__", "3")})
    limit = args.runs
    deadline = time.monotonic() + args.seconds if args.seconds else None

    def test_one(data: bytes) -> None:
        session.step(FdpChooser(data))
        if (limit is not None and session.recorder.execs >= limit) or (
                deadline is not None and time.monotonic() >= deadline):
            code = session.finish()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # libFuzzer would exit without the final report otherwise

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one)
    atheris.Fuzz()
    return session.finish()  # not reached


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    libfuzzer_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, libfuzzer_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=("parser", "verifier", "release", "answer",
                                           "provenance", "sealed", "dotenv", "recipient",
                                           "logwire", "host_settings", "http"))
    parser.add_argument("--engine", choices=("plain", "atheris"), default="plain")
    parser.add_argument("--runs", type=int, default=None, help="stop after N executions")
    parser.add_argument("--seconds", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--seed", type=int, default=0, help="plain engine: the random seed")
    parser.add_argument("--findings", type=Path, default=None,
                        help="directory for findings and their inputs")
    parser.add_argument("--report", type=Path, default=None, help="JSON report file")
    args = parser.parse_args(argv)
    if args.runs is None and args.seconds is None:
        parser.error("give --runs or --seconds")
    if args.engine == "atheris":
        return run_atheris(args, libfuzzer_args)
    return run_plain(args)


if __name__ == "__main__":
    sys.exit(main())
