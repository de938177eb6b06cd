"""Counting executions and keeping findings, each with its input, on disk.

    >>> from fuzz.record import Recorder
    >>> recorder = Recorder(None)       # count only; Recorder(Path("findings")) keeps inputs

A finding (``crash``, ``accepted_mutant``, ``refused_valid``; ``harness_error`` too, so the
fuzzer's own faults are seen) is written as ``DIR/<target>-<kind>-<sha256 prefix>.bin``, the
exact input (a document, or a release request body), and a ``.json`` beside it: the
mutation classes that made it, the seed, the error code or exception, the detail (a
traceback for a crash, the oracle's reason otherwise). Findings with one signature (target,
kind, code, first line of the detail) are counted in full but kept only a few times.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from fuzz.targets import FINDINGS, Execution

KEPT_PER_SIGNATURE = 3


@dataclasses.dataclass
class Recorder:
    directory: Path | None
    execs: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    kinds: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    codes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    ops: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    signatures: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter)
    saved: list[str] = dataclasses.field(default_factory=list)

    def add(self, ex: Execution) -> None:
        self.execs += 1
        self.kinds[ex.kind] += 1
        self.codes[f"{ex.kind}:{ex.code}"] += 1
        for op in set(ex.ops):
            self.ops[op] += 1
        if ex.kind in (*FINDINGS, "harness_error"):
            self.keep(ex)

    @staticmethod
    def signature(ex: Execution) -> str:
        first = ex.detail.strip().splitlines()[-1] if ex.kind in ("crash", "harness_error") and (
            ex.detail.strip()) else ex.detail.split(";")[0]
        return f"{ex.target}|{ex.kind}|{ex.code}|{first[:160]}"

    def keep(self, ex: Execution) -> None:
        signature = self.signature(ex)
        self.signatures[signature] += 1
        if self.directory is None or self.signatures[signature] > KEPT_PER_SIGNATURE:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(ex.data).hexdigest()[:16]
        stem = self.directory / f"{ex.target}-{ex.kind}-{digest}"
        stem.with_suffix(".bin").write_bytes(ex.data)
        stem.with_suffix(".json").write_text(json.dumps({
            "target": ex.target,
            "kind": ex.kind,
            "code": ex.code,
            "seed": ex.seed,
            "ops": ex.ops,
            "detail": ex.detail,
            "extra": ex.extra,
            "signature": signature,
            "input": stem.with_suffix(".bin").name,
            "sha256": hashlib.sha256(ex.data).hexdigest(),
        }, indent=2) + "\n")
        self.saved.append(str(stem.with_suffix(".bin")))

    @property
    def findings(self) -> int:
        return sum(self.kinds[k] for k in FINDINGS)

    def report(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "execs": self.execs,
            "seconds": round(seconds, 1),
            "execs_per_second": round(self.execs / seconds, 1) if seconds else None,
            "crashes": self.kinds["crash"],
            "accepted_mutants": self.kinds["accepted_mutant"],
            "refused_valid": self.kinds["refused_valid"],
            "harness_errors": self.kinds["harness_error"],
            "kinds": dict(self.kinds.most_common()),
            "codes": dict(self.codes.most_common()),
            "ops": dict(sorted(self.ops.items())),
            "finding_signatures": dict(self.signatures.most_common()),
            "saved": self.saved[-50:],
        }
