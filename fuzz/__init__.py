"""Fuzzing of the attestation parser, the verifier and the KMS release endpoint.

A structure-aware mutator (:mod:`fuzz.mutate`) over a CBOR tree with its own writer and
reader (:mod:`fuzz.cbor`), seeded with real AWS documents and simulator documents
(:mod:`fuzz.seeds`); an independent reference of the format (:mod:`fuzz.spec`); three targets
and their oracle (:mod:`fuzz.targets`); findings kept with their inputs (:mod:`fuzz.record`);
a driver for atheris or a seeded plain loop (:mod:`fuzz.run`)::

    .venv/bin/python -m fuzz.run parser --engine plain --runs 10000 --findings /tmp/findings

It sits at the top of the repository, beside ``bench/``: it is a tool that drives the
product's code, and the test suite imports it for its smoke run (``tests/test_fuzz_smoke.py``),
so it is a package, not a folder of scripts; it is not part of the installed product.
"""
