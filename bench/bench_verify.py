"""Benchmark attestation verification against its crypto floor, single process.

    .venv/bin/python bench/bench_verify.py [--seconds N] [--rounds R] [--json] [--profile]

On the real document ``tests/vectors/aws-nondebug-2022-10-13.cose``, verified at its own
timestamp (the leaf certificate is valid for 3 hours only, so ``at=`` is always passed),
this measures:

- ``verify_cached``: ``AttestationVerifier.aws()`` warmed up once, then ``verify()`` of the
  same bytes again and again (the cabundle is a chain-cache hit every time);
- ``verify_uncached``: ``AttestationVerifier(trusted_roots=[aws_nitro_root()], cache_size=0)``,
  which validates the whole cabundle on every call;
- ``floor_cached`` and ``floor_uncached``: the P-384 ECDSA work that no verifier can skip
  (see :func:`make_floors` for exactly what each contains);
- ``crafted_5ca`` and ``crafted_7ca``: the cached verifier refusing a document whose cabundle is
  the AWS root followed by 5 or 7 attacker CAs cross-signing each other (issue 14.4; see
  ``benchlib.crossed_ca_document``), reported against ``verify_cached`` and ``verify_uncached``
  (target: at most 2x);
- ``parse``: ``parse_attestation`` alone, for context;
- ``leaf_load_key`` and ``p384_verify``: the two building blocks of the floor, for context.

Every round runs each measurement once, as a batch of N iterations, in an order rotated
from round to round, so background load on a shared machine hits all of them alike. N is
calibrated per measurement so that every batch takes about the same wall time and the
whole run about ``--seconds``. The figure per measurement is the per-operation time of each
batch (``time.perf_counter``), reported as the median and the minimum over the rounds. As
in ``timeit``, the garbage collector is off inside a batch. floor / verify is reported three
ways: ratio of the medians, ratio of the minimums, and the median of the per-round ratios
(floor and verify of one round run close together). On a loaded machine the minimums are the
best estimate of the intrinsic cost; a ratio of medians above 1 means the noise won.

The target is floor_time / verify_time >= 0.8 on the cached path.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import TypedDict

import cryptography
from benchlib import Op, crossed_ca_document, p384_key, run_batch
from cryptography import x509
from cryptography.hazmat.backends.openssl import backend as openssl_backend
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from mock_kms.attestation import AttestationDocument, parse_attestation
from mock_kms.errors import KmsError
from mock_kms.roots import aws_nitro_root
from mock_kms.verifier import AttestationVerifier

ROOT = Path(__file__).resolve().parent.parent
VECTOR = ROOT / "tests" / "vectors" / "aws-nondebug-2022-10-13.cose"
TIMESTAMP_MS = 1665651482136  # the document's own timestamp
AT = datetime.datetime.fromtimestamp(TIMESTAMP_MS / 1000, datetime.UTC)
TARGET_CACHED_RATIO = 0.8

ES384 = ec.ECDSA(hashes.SHA384())


def make_floors(doc: AttestationDocument) -> dict[str, Op]:
    """The crypto floor of each path, as callables to time.

    Inputs prepared once, outside the timed call (no crypto in them): the parsed document,
    its Sig_structure bytes, the DER of every certificate, and the root's public key (the
    trust anchor is configured once in any verifier).

    ``floor_cached`` contains exactly, per call:
      1. parse the leaf certificate DER and load its P-384 public key (the leaf is new with
         every document, so this cannot be cached);
      2. convert the raw 96-byte r||s COSE signature to DER and verify it, ES384, with the
         leaf key over the Sig_structure;
      3. verify the leaf certificate's signature (ECDSA SHA-384 over
         ``leaf.tbs_certificate_bytes``) with the public key of its issuer ``cabundle[-1]``.
    The issuer's key is loaded once, outside the call: with a chain cache the intermediates
    are known already, so their keys could be kept.

    ``floor_uncached`` is ``floor_cached`` plus, per call:
      4. parse ``cabundle[1:]`` (regional, zonal, instance) and load their public keys
         (without a cache nothing is remembered about them between documents), and use the
         freshly loaded instance key for step 3 instead of a pre-loaded one;
      5. verify the signature of each intermediate by its parent: instance by zonal, zonal
         by regional, regional by root.
    Assumption: the root's self-signature is not verified. A chain builder that has the
    root as its trust anchor does not check the anchor's signature (it is trusted by
    configuration; cabundle[0] is matched byte for byte against it), so that check is not
    part of any floor.

    Nothing else is in the floor: no validity periods, extension or name checks, path
    building, cache lookups, CBOR parsing or policy.
    """
    sig_structure = doc.sig_structure()
    signature = doc.signature
    leaf_der = doc.certificate
    bundle = [x509.load_der_x509_certificate(der) for der in doc.cabundle]
    for cert in [x509.load_der_x509_certificate(leaf_der), *bundle]:
        # The floor hard-codes ES384 / ECDSA-SHA384; make sure the document agrees.
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA384), cert.subject
        assert p384_key(cert).curve.name == "secp384r1", cert.subject
    issuer_key = p384_key(bundle[-1])  # cabundle[-1], loaded once (cached floor)
    root_key = p384_key(bundle[0])  # the trust anchor
    intermediate_ders = list(doc.cabundle[1:])  # regional, zonal, instance

    def verify_leaf(issuer: ec.EllipticCurvePublicKey) -> None:
        leaf = x509.load_der_x509_certificate(leaf_der)
        leaf_key = p384_key(leaf)
        r = int.from_bytes(signature[:48], "big")
        s = int.from_bytes(signature[48:], "big")
        leaf_key.verify(encode_dss_signature(r, s), sig_structure, ES384)
        issuer.verify(leaf.signature, leaf.tbs_certificate_bytes, ES384)

    def floor_cached() -> None:
        verify_leaf(issuer_key)

    def floor_uncached() -> None:
        certs = [x509.load_der_x509_certificate(der) for der in intermediate_ders]
        keys = [p384_key(c) for c in certs]
        # Each intermediate by its parent: regional by root, zonal by regional, instance
        # by zonal.
        parents = [root_key, *keys[:-1]]
        for cert, parent in zip(certs, parents, strict=True):
            parent.verify(cert.signature, cert.tbs_certificate_bytes, ES384)
        verify_leaf(keys[-1])

    return {"floor_cached": floor_cached, "floor_uncached": floor_uncached}


def make_ops(data: bytes) -> dict[str, Op]:
    doc = parse_attestation(data)
    cached = AttestationVerifier.aws()
    cached.verify(data, at=AT)  # warm-up: fills the chain cache
    uncached = AttestationVerifier(trusted_roots=[aws_nitro_root()], cache_size=0)

    leaf_der = doc.certificate
    sig_structure = doc.sig_structure()
    r = int.from_bytes(doc.signature[:48], "big")
    s = int.from_bytes(doc.signature[48:], "big")
    der_signature = encode_dss_signature(r, s)
    leaf_key = p384_key(x509.load_der_x509_certificate(leaf_der))

    def verify_cached() -> object:
        return cached.verify(data, at=AT)

    def verify_uncached() -> object:
        return uncached.verify(data, at=AT)

    def parse() -> object:
        return parse_attestation(data)

    def leaf_load_key() -> object:
        return x509.load_der_x509_certificate(leaf_der).public_key()

    def p384_verify() -> None:
        leaf_key.verify(der_signature, sig_structure, ES384)

    def refused(document: bytes) -> Op:
        def op() -> object:
            try:
                cached.verify(document, at=AT)
            except KmsError as e:
                return e.code
            raise AssertionError("a crafted cabundle verified")

        return op

    crafted = {
        f"crafted_{n}ca": refused(crossed_ca_document(aws_nitro_root(), n, AT)) for n in (5, 7)
    }
    return {
        "verify_cached": verify_cached,
        "verify_uncached": verify_uncached,
        **crafted,
        **make_floors(doc),
        "parse": parse,
        "leaf_load_key": leaf_load_key,
        "p384_verify": p384_verify,
    }


def calibrate(ops: dict[str, Op], batch_seconds: float) -> dict[str, int]:
    """Iterations per batch so that each batch lasts about ``batch_seconds``."""
    sizes = {}
    for name, op in ops.items():
        n = 1
        while True:
            per_op = run_batch(op, n)
            if per_op * n >= 0.02 or n >= 1 << 20:
                break
            n *= 2
        sizes[name] = max(1, round(batch_seconds / per_op))
    return sizes


class OpStats(TypedDict):
    iterations_per_round: int
    median_s: float
    min_s: float
    ops_per_s_median: float
    spread_max_over_min: float
    rounds_us: list[float]


def measure(ops: dict[str, Op], seconds: float, rounds: int) -> dict[str, OpStats]:
    """Per-operation statistics over ``rounds`` interleaved batches."""
    batch_seconds = seconds / (rounds * len(ops))
    sizes = calibrate(ops, batch_seconds)
    names = list(ops)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotate the order from round to round
            samples[name].append(run_batch(ops[name], sizes[name]))
    return {
        name: {
            "iterations_per_round": sizes[name],
            "median_s": statistics.median(xs),
            "min_s": min(xs),
            "ops_per_s_median": 1 / statistics.median(xs),
            "spread_max_over_min": max(xs) / min(xs),
            "rounds_us": [round(x * 1e6, 2) for x in xs],
        }
        for name, xs in samples.items()
    }


def machine_info() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "cryptography": cryptography.__version__,
        "openssl": openssl_backend.openssl_version_text(),
    }


def profile_cached(ops: dict[str, Op], seconds: float) -> str:
    """cProfile of the cached verify path for about ``seconds``; top calls by tottime."""
    op = ops["verify_cached"]
    n = max(1, round(seconds / run_batch(op, 50)))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        op()
    profiler.disable()
    out = io.StringIO()
    out.write(f"cProfile, verify_cached x {n}\n")
    st = pstats.Stats(profiler, stream=out).strip_dirs()
    st.sort_stats("tottime").print_stats(20)
    st.sort_stats("cumulative").print_stats(30)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=24.0, help="measuring time (~total)")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of N iterations each")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile the cached path (to stderr)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")

    data = VECTOR.read_bytes()
    ops = make_ops(data)
    for op in ops.values():  # every operation must succeed before it is timed
        op()

    started = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    wall = time.perf_counter()
    stats = measure(ops, args.seconds, args.rounds)
    wall = time.perf_counter() - wall
    load_after = os.getloadavg()

    machine = machine_info()
    ratios = {}
    for path in ("cached", "uncached"):
        floor, verify = stats[f"floor_{path}"], stats[f"verify_{path}"]
        ratios[path] = {
            "floor_over_verify_median": floor["median_s"] / verify["median_s"],
            "floor_over_verify_min": floor["min_s"] / verify["min_s"],
            # Median over rounds of the ratio within a round: floor and verify batches of
            # one round run close together, so this cancels slow drifts in the load.
            "floor_over_verify_paired_median": statistics.median(
                f / v for f, v in zip(floor["rounds_us"], verify["rounds_us"], strict=True)
            ),
        }

    # Issue 14.4: a trusted root and N attacker CAs cross-signing each other, against a
    # normal verification (target: at most 2x).
    crafted = {
        f"{name}_over_{path}": stats[name]["median_s"] / stats[f"verify_{path}"]["median_s"]
        for name in ("crafted_5ca", "crafted_7ca")
        for path in ("cached", "uncached")
    }
    result = {
        "benchmark": "bench/bench_verify.py",
        "date": started.isoformat().replace("+00:00", "Z"),
        "document": str(VECTOR.relative_to(ROOT)),
        "verified_at": AT.isoformat().replace("+00:00", "Z"),
        "machine": machine,
        "settings": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "wall_s": wall,
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "operations": stats,
        "ratios": ratios,
        "crafted_ratios": crafted,
        "target_cached_ratio": TARGET_CACHED_RATIO,
        "cached_target_met": ratios["cached"]["floor_over_verify_median"] >= TARGET_CACHED_RATIO,
    }

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        m = machine
        print(
            f"{result['date']}  nproc={m['nproc']}  Python {m['python']}  "
            f"cryptography {m['cryptography']}  {m['openssl']}"
        )
        print(
            f"{args.rounds} rounds in {wall:.1f} s; loadavg before {load_before[0]:.2f}, "
            f"after {load_after[0]:.2f}"
        )
        print(
            f"{'operation':<17}{'N/round':>9}{'median':>12}{'min':>12}{'ops/s':>10}{'max/min':>9}"
        )
        for name, st in stats.items():
            print(
                f"{name:<17}{st['iterations_per_round']:>9}"
                f"{st['median_s'] * 1e6:>10.1f}us{st['min_s'] * 1e6:>10.1f}us"
                f"{st['ops_per_s_median']:>10.0f}{st['spread_max_over_min']:>9.2f}"
            )
        for name, ratio in crafted.items():
            print(f"{name:<30} {ratio:.2f}x  (target <= 2)")
        for path, r in ratios.items():
            target = f"  (target >= {TARGET_CACHED_RATIO})" if path == "cached" else ""
            print(
                f"floor/verify {path:<9} median {r['floor_over_verify_median']:.3f}  "
                f"min {r['floor_over_verify_min']:.3f}  "
                f"paired median {r['floor_over_verify_paired_median']:.3f}{target}"
            )
    if args.profile:
        print(profile_cached(ops, 3.0), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
