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
# Debian packages the tests start as real peers: socat (the other vsock/unix-to-TCP proxy)
# and redis-server (the replay store shared by KMS replicas). One apt-get for the missing ones.
missing=()
command -v socat >/dev/null 2>&1 || missing+=(socat)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: ${missing[*]} missing and cannot be installed here (needs root and" \
      "apt-get); install the Debian packages, or their end-to-end tests fail" >&2
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
