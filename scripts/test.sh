#!/usr/bin/env bash
# Installs everything the tests need (a virtualenv with the Python packages, the npm packages
# for anvil, cast and solc) and runs lint, type checks and the whole test suite.
# Usage: scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
if [ -f package.json ]; then
  npm ci --no-audit --no-fund --loglevel=error
fi
# Debian packages of the real peers the tests start, installed when missing (one apt-get
# update, then one install): socat, the other real vsock/unix-to-TCP proxy (end-to-end proxy
# tests); age, the stock age CLI (sealed data interop, both ways); time, /usr/bin/time, which
# measures a child's own peak RSS (constant-memory unseal test, benchmarks); systemd
# (systemd-analyze), which verifies the example unit (examples/kms).
missing=()
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v age >/dev/null 2>&1 || missing+=(age)
[ -x /usr/bin/time ] || missing+=(time)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: ${missing[*]} missing and cannot be installed here (needs root" \
      "and apt-get); install them, or the tests that use them fail or skip" >&2
  fi
fi

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy (strict)"
.venv/bin/mypy
mapfile -t shell_scripts < <(find scripts examples -name '*.sh' 2>/dev/null | sort)
if [ "${#shell_scripts[@]}" -gt 0 ]; then
  echo "== shellcheck"
  .venv/bin/shellcheck "${shell_scripts[@]}"
fi
echo "== pytest"
# pytest exits 5 when it collected no test: that is a failure here, as any non-zero exit.
exec .venv/bin/python -m pytest "$@"
