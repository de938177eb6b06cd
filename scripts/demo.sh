#!/usr/bin/env bash
# The main job on the embedded defaults, from a fresh clone: installs the package in a
# virtualenv, creates an NSM simulator, takes an attestation document from it as an enclave
# would, and verifies it the way the KMS does; then verifies a real AWS-signed document.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[kms]'
export PATH="$PWD/.venv/bin:$PATH"

work="${DEMO_DIR:-$(mktemp -d)}"
echo "== working in $work"

echo "== keyutil sim init: a simulated enclave and the CA that signs its documents"
keyutil sim init "$work/sim"

echo "== keyutil attest: an attestation document with a fresh nonce"
nonce=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
keyutil attest --nsm simulator --sim-dir "$work/sim" --nonce "$nonce" --out "$work/doc.cose"
echo "wrote $work/doc.cose ($(wc -c <"$work/doc.cose") bytes)"

echo "== mock-kms verify-attestation: signature, chain to the simulator's root, age, debug"
mock-kms verify-attestation "$work/doc.cose" --root "$work/sim/root.pem"

echo "== the same document under the AWS root only: refused"
if mock-kms verify-attestation "$work/doc.cose"; then
  echo "unexpected: a simulator document verified under the AWS root" >&2
  exit 1
fi

echo "== a real AWS-signed document, verified at the time it was made"
mock-kms verify-attestation tests/vectors/aws-nondebug-2022-10-13.cose --at 2022-10-13T08:58:03Z
