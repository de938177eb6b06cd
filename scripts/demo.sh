#!/usr/bin/env bash
# The main job on the embedded defaults, from a fresh clone: installs the package in a
# virtualenv, creates a simulated enclave (NSM simulator), starts mock-kms with its
# in-process chain and the enclave's image registered, releases a key to the enclave with
# `keyutil get-key`, and shows where the key went (its SHA-256 fingerprint, never the key).
# Then, briefly: a file sealed with age to the application's recipient and opened in the
# enclave, and `keyutil run` (the enclave's entrypoint) releasing keys and a sealed dotenv
# before it starts an app.
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
# Keys belong on tmpfs (never on a persistent disk): /dev/shm is tmpfs on Linux.
keys="$(mktemp -d /dev/shm/keyutil-demo.XXXXXX)"
kms_pid=""
cleanup() { [ -n "$kms_pid" ] && kill "$kms_pid" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "== 1. a simulated enclave: keyutil sim init"
keyutil sim init "$work/sim" --json >"$work/sim.json"
image_hash=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["os_image_hash"])' "$work/sim.json")
echo "   OS_IMAGE_HASH $image_hash"

echo "== 2. the KMS identity that the enclave image pins: mock-kms identity"
identity=$(mock-kms identity --state-dir "$work/state")
echo "   $identity"

echo "== 3. mock-kms serve: embedded chain, the image registered for application 'demo-app'"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mock-kms serve --port "$port" --state-dir "$work/state" \
  --trust-root "$work/sim/root.pem" --allow-image "$image_hash=demo-app" \
  --audit-log "$work/audit.log" 2>"$work/kms.log" &
kms_pid=$!
echo "   listening on http://127.0.0.1:$port (log: $work/kms.log)"

echo "== 4. keyutil get-key, as the enclave's entrypoint runs it"
keyutil get-key --kms "http://127.0.0.1:$port" --kms-pubkey "$identity" --expect-app demo-app \
  --nsm simulator --sim-dir "$work/sim" --key app --out "$keys/app.key" --deadline 60

echo "== 5. where the key went"
echo "   file        $keys/app.key (tmpfs, mode $(stat -c %a "$keys/app.key"), $(stat -c %s "$keys/app.key") bytes)"
echo "   sha256      $(sha256sum "$keys/app.key" | cut -d' ' -f1)"
echo "   audit line  $(tail -n 1 "$work/audit.log")"


echo "== 6. sealed data: seal on the build host to the app's recipient, open in the enclave"
# The recipient is public and signed by the KMS identity: keyutil recipient checks it first.
recipient=$(keyutil recipient --kms "http://127.0.0.1:$port" --kms-pubkey "$identity" \
  --app demo-app --key weights)
echo "   recipient   $recipient"
head -c 1048576 /dev/urandom >"$work/weights.bin"
if command -v age >/dev/null 2>&1; then
  age -r "$recipient" -o "$work/weights.age" "$work/weights.bin"   # the stock age tool
else
  keyutil seal -r "$recipient" "$work/weights.bin" "$work/weights.age"
fi
# In the enclave: the age identity is released and used at once, never written anywhere.
keyutil get-key --kms "http://127.0.0.1:$port" --kms-pubkey "$identity" --expect-app demo-app \
  --nsm simulator --sim-dir "$work/sim" --key weights --type age \
  --unseal "$work/weights.age" --unseal-to "$keys/weights.bin" --deadline 60
echo "   sealed      $work/weights.age ($(stat -c %s "$work/weights.age") bytes)"
echo "   opened      $keys/weights.bin, same bytes: $(cmp -s "$work/weights.bin" "$keys/weights.bin" && echo yes || echo NO)"

echo "== 7. keyutil run: the enclave's entrypoint (PID 1) releases keys, then starts the app"
# A sealed dotenv becomes the app's environment in memory; the app sees the variable, the
# file system and the logs never do.
printf 'DB_PASSWORD=%s\n' "$(head -c 12 /dev/urandom | base64)" |
  keyutil seal -r "$(keyutil recipient --kms "http://127.0.0.1:$port" \
    --kms-pubkey "$identity" --app demo-app --key env)" - "$work/secrets.env.age"
cat >"$work/run.toml" <<TOML
[network]
loopback = false               # a real enclave: true (lo up, as keyutil net-up)

[kms]
urls = ["http://127.0.0.1:$port"]
pubkey = "$identity"

[[keys]]
names = ["app"]
dir = "$keys/run"
expect_app = "demo-app"

[[sealed]]
key = "env"
source = "$work/secrets.env.age"
format = "dotenv"

[app]
command = ["python3", "-c", "import os; print('app: key file', os.path.getsize(os.environ['KEY_FILE']), 'bytes; DB_PASSWORD set:', 'DB_PASSWORD' in os.environ)"]
workdir = "$work"
env = { KEY_FILE = "$keys/run/app" }
TOML
mkdir -m 0700 "$keys/run"
KEYUTIL_NSM=simulator KEYUTIL_SIM_DIR="$work/sim" keyutil run --config "$work/run.toml" \
  2>"$work/run.log"
echo "   app exited 0; the supervisor's log: $work/run.log (names, never values)"
echo "   (remove the keys with: rm -r $keys)"
