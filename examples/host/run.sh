#!/usr/bin/env bash
# run.sh: on the parent instance, start the enclave, wait until its app answers, and carry
# its traffic and its logs.
#
# Usage:
#   run.sh [start]        nitro-cli run-enclave with the settings below; prints the enclave's
#                         CID (and writes it to CID_FILE); then, with WAIT_READY=1, waits
#                         until the app answers (run.sh ready) and fails if it does not;
#                         with DEBUG_MODE=1 it attaches the console instead of waiting
#   run.sh ready [NAME]   keyutil wait-ready on the app's vsock port, by enclave name
#   run.sh inbound        keyutil proxy: INBOUND_LISTEN (TCP) -> the enclave's APP_VSOCK_PORT,
#                         the enclave found by name at every connection (a restarted
#                         enclave with a new CID needs no restart of this forwarder)
#   run.sh egress         keyutil proxy: vsock EGRESS_VSOCK_PORT -> EGRESS_TO (TCP), checked
#                         against EGRESS_ALLOWLIST: what the app reaches via 127.0.0.1:8443
#   run.sh logs           keyutil logs: prints what the enclave sends on LOG_VSOCK_PORT (its
#                         supervisor's log, the app's stdout and stderr), appends to LOG_FILE
#   run.sh cid [NAME|ID]  print the CID of the running enclave NAME (or enclave id)
#   run.sh console [NAME|ID]   nitro-cli console (debug-mode enclaves only)
#   run.sh stop [NAME|ID]      nitro-cli terminate-enclave
#
# Environment, with defaults:
#   EIF_PATH      the enclave image [app.eif]
#   ENCLAVE_NAME  the name given to run-enclave, and the default NAME above [app]
#   CPU_COUNT     vCPUs for the enclave [2]
#   MEMORY_MIB    memory for the enclave, MiB [1024]
#   ENCLAVE_CID   a fixed CID (4 or more) for the enclave; unset: nitro-cli picks one, a new
#                 one at every start
#   DEBUG_MODE    1: --debug-mode (the console is readable, but PCR0..2 read all zero, so
#                 the KMS refuses to release keys: for diagnosing the boot only) [0]
#   CID_FILE      also write the CID to this file
#   WAIT_READY    1: start waits for the app (run.sh ready) [1]
#   APP_VSOCK_PORT   the enclave's inbound forwarder port (run.toml [[forward]]) [5001]
#   READY_PATH    the app's health path for wait-ready --http; empty: a connection check
#                 [/healthz]
#   READY_DEADLINE   seconds wait-ready waits [120]
#   INBOUND_LISTEN   IP:PORT the inbound forwarder listens on [0.0.0.0:8080]
#   LOG_VSOCK_PORT   where the enclave sends its logs (run.toml [log] to) [9000]
#   LOG_FILE      run.sh logs also appends every line to this file [none]
#   EGRESS_VSOCK_PORT  the enclave's egress port (run.toml [[forward]]) [8443]
#   EGRESS_TO     the one internet destination of the egress, HOST:PORT [none]
#   EGRESS_ALLOWLIST   vsock-proxy YAML allowlist for it [/etc/keyrelease/egress.yaml]
#   NITRO_CLI     the nitro-cli command [nitro-cli]
#   KEYUTIL       the keyutil command [keyutil]
#   PYTHON        the Python that parses nitro-cli's JSON (the standard library's json
#                 module; no jq needed) [python3]
#
# The CID is read from 'nitro-cli describe-enclaves', a JSON array of objects with
# EnclaveName, EnclaveID, ProcessID, EnclaveCID, NumberOfCPUs, CPUIDs, MemoryMiB, State
# (RUNNING or TERMINATING), Flags (NONE or DEBUG_MODE) and, in recent versions, Measurements.
#
# Exit codes: 0 success, 1 nitro-cli failed or the enclave is not running, 2 usage error,
# 3 the app did not answer by READY_DEADLINE (start, ready); inbound, egress and logs exit
# with keyutil's code.
set -euo pipefail

EIF_PATH=${EIF_PATH:-app.eif}
ENCLAVE_NAME=${ENCLAVE_NAME:-app}
CPU_COUNT=${CPU_COUNT:-2}
MEMORY_MIB=${MEMORY_MIB:-1024}
DEBUG_MODE=${DEBUG_MODE:-0}
NITRO_CLI=${NITRO_CLI:-nitro-cli}
KEYUTIL=${KEYUTIL:-keyutil}
PYTHON=${PYTHON:-python3}
WAIT_READY=${WAIT_READY:-1}
APP_VSOCK_PORT=${APP_VSOCK_PORT:-5001}
READY_PATH=${READY_PATH-/healthz}
READY_DEADLINE=${READY_DEADLINE:-120}
INBOUND_LISTEN=${INBOUND_LISTEN:-0.0.0.0:8080}
LOG_VSOCK_PORT=${LOG_VSOCK_PORT:-9000}
EGRESS_VSOCK_PORT=${EGRESS_VSOCK_PORT:-8443}
EGRESS_ALLOWLIST=${EGRESS_ALLOWLIST:-/etc/keyrelease/egress.yaml}
PROG=${0##*/}

die() { # CODE MESSAGE
  printf '%s: %s\n' "$PROG" "$2" >&2
  exit "$1"
}

# find_enclave NAME_OR_ID: sets FOUND_ID and FOUND_CID from the one RUNNING enclave with that
# EnclaveName or EnclaveID in 'nitro-cli describe-enclaves'; exit 1 with a reason if none.
find_enclave() {
  local description found
  description=$("$NITRO_CLI" describe-enclaves) || die 1 "nitro-cli describe-enclaves failed"
  found=$(printf '%s' "$description" | "$PYTHON" -c '
import json, sys

wanted = sys.argv[1]
try:
    enclaves = json.load(sys.stdin)
except ValueError as e:
    sys.exit(f"describe-enclaves did not print JSON: {e}")
if not isinstance(enclaves, list):
    sys.exit("describe-enclaves: expected a JSON array of enclaves")
named = [
    e for e in enclaves
    if isinstance(e, dict) and wanted in (e.get("EnclaveName"), e.get("EnclaveID"))
]
running = [e for e in named if str(e.get("State", "")).upper() == "RUNNING"]
if not running:
    states = ", ".join(str(e.get("State")) for e in named) or "none listed"
    sys.exit(f"no running enclave named {wanted!r} (found: {states})")
if len(running) > 1:
    sys.exit(f"{len(running)} running enclaves named {wanted!r}: give the EnclaveID")
enclave_id, cid = running[0].get("EnclaveID"), running[0].get("EnclaveCID")
if type(cid) is not int or not 4 <= cid < 2**32:
    sys.exit(f"enclave {wanted!r}: EnclaveCID {cid!r} is not a CID an enclave can have")
if not isinstance(enclave_id, str) or not enclave_id or " " in enclave_id:
    sys.exit(f"enclave {wanted!r}: EnclaveID {enclave_id!r} is not an enclave id")
print(enclave_id, cid)
' "$1") || die 1 "cannot find enclave '$1'"
  FOUND_ID=${found% *}
  FOUND_CID=${found#* }
}

start() {
  local args run_json enclave_id
  [[ -r $EIF_PATH ]] || die 2 "cannot read the enclave image EIF_PATH=$EIF_PATH"
  args=(run-enclave --eif-path "$EIF_PATH" --enclave-name "$ENCLAVE_NAME"
    --cpu-count "$CPU_COUNT" --memory "$MEMORY_MIB")
  if [[ -n ${ENCLAVE_CID:-} ]]; then args+=(--enclave-cid "$ENCLAVE_CID"); fi
  case $WAIT_READY in
    0 | 1) ;;
    *) die 2 "WAIT_READY must be 0 or 1; found '$WAIT_READY'" ;;
  esac
  case $DEBUG_MODE in
    0) ;;
    1) args+=(--debug-mode) ;;
    *) die 2 "DEBUG_MODE must be 0 or 1; found '$DEBUG_MODE'" ;;
  esac
  run_json=$("$NITRO_CLI" "${args[@]}") || die 1 "nitro-cli run-enclave failed"
  enclave_id=$(printf '%s' "$run_json" | "$PYTHON" -c '
import json, sys
try:
    print(json.load(sys.stdin)["EnclaveID"])
except (ValueError, KeyError, TypeError) as e:
    sys.exit(f"run-enclave did not print an EnclaveID: {e!r}")
') || die 1 "cannot read run-enclave's answer"
  find_enclave "$enclave_id"
  printf 'enclave %s (%s) is running with CID %s\n' "$ENCLAVE_NAME" "$enclave_id" "$FOUND_CID" >&2
  printf '%s\n' "$FOUND_CID"
  if [[ -n ${CID_FILE:-} ]]; then printf '%s\n' "$FOUND_CID" >"$CID_FILE"; fi
  if [[ $WAIT_READY == 1 && $DEBUG_MODE == 0 ]]; then # a debug enclave gets no keys
    ready "$ENCLAVE_NAME" >&2 || die 3 "the app in enclave $ENCLAVE_NAME did not answer within ${READY_DEADLINE}s: see its log lines (run.sh logs, or the enclave-logs service)"
  fi
  if [[ $DEBUG_MODE == 1 ]]; then
    exec "$NITRO_CLI" console --enclave-id "$enclave_id"
  fi
  printf '%s\n' "no console: the enclave runs in production mode; its supervisor's log and" \
    "the app's output reach this host through 'run.sh logs' (LOG_VSOCK_PORT)." >&2
}

ready() { # NAME: keyutil wait-ready on the app's inbound port, by enclave name
  local args=(wait-ready --target "vsock://enclave:$1:$APP_VSOCK_PORT"
    --deadline "$READY_DEADLINE" --nitro-cli "$NITRO_CLI")
  if [[ -n $READY_PATH ]]; then args+=(--http "$READY_PATH"); fi
  "$KEYUTIL" "${args[@]}"
}

command=${1:-start}
if [[ $# -gt 2 || ($command =~ ^(start|inbound|egress|logs)$ && $# -gt 1) ]]; then
  die 2 "too many arguments (try --help)"
fi
case $command in
  start) start ;;
  ready) ready "${2:-$ENCLAVE_NAME}" || exit 3 ;;
  inbound)
    exec "$KEYUTIL" proxy --listen "tcp://$INBOUND_LISTEN" \
      --to "vsock://enclave:$ENCLAVE_NAME:$APP_VSOCK_PORT" --nitro-cli "$NITRO_CLI"
    ;;
  egress)
    [[ -n ${EGRESS_TO:-} ]] || die 2 "EGRESS_TO (HOST:PORT) is not set"
    exec "$KEYUTIL" proxy --listen "vsock://:$EGRESS_VSOCK_PORT" --to "$EGRESS_TO" \
      --allowlist "$EGRESS_ALLOWLIST"
    ;;
  logs)
    if [[ -n ${LOG_FILE:-} ]]; then
      exec "$KEYUTIL" logs --listen "vsock://:$LOG_VSOCK_PORT" --append "$LOG_FILE"
    fi
    exec "$KEYUTIL" logs --listen "vsock://:$LOG_VSOCK_PORT"
    ;;
  cid)
    find_enclave "${2:-$ENCLAVE_NAME}"
    printf '%s\n' "$FOUND_CID"
    ;;
  console)
    find_enclave "${2:-$ENCLAVE_NAME}"
    exec "$NITRO_CLI" console --enclave-id "$FOUND_ID"
    ;;
  stop)
    find_enclave "${2:-$ENCLAVE_NAME}"
    exec "$NITRO_CLI" terminate-enclave --enclave-id "$FOUND_ID"
    ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
  *) die 2 "unknown command '$1' (start, ready, inbound, egress, logs, cid, console, stop)" ;;
esac
