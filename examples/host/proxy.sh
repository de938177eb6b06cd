#!/usr/bin/env bash
# proxy.sh: the parent instance's vsock-to-TCP proxy that carries the enclave's requests to
# the KMS, with one of three programs. The enclave connects to vsock://3:VSOCK_PORT (CID 3
# is the parent); the proxy forwards each connection to KMS_HOST:KMS_PORT and nowhere else.
# The proxy is untrusted by design: the release protocol is end-to-end authenticated and
# the keys cross it sealed to the enclave.
#
# Usage: proxy.sh vsock-proxy|socat|keyutil
#   vsock-proxy  AWS's proxy from the aws-nitro-enclaves-cli package; it refuses to start
#                unless KMS_HOST:KMS_PORT is in the ALLOWLIST file
#   socat        socat 1.7.4 or later (VSOCK-LISTEN); forwards to its one target
#   keyutil      'keyutil proxy' from this project, with the same allowlist file
#
# Environment, with defaults (systemd reads them from /etc/keyrelease/proxy.env):
#   VSOCK_PORT       vsock port the enclave connects to (KEYUTIL_KMS=vsock://3:PORT) [8000]
#   KMS_HOST         the KMS's address, as the parent instance reaches it [127.0.0.1]
#   KMS_PORT         the KMS's TCP port (mock-kms serve --port) [8420]
#   ALLOWLIST        vsock-proxy YAML allowlist [/etc/keyrelease/vsock-proxy.yaml]
#   MAX_CONNECTIONS  connections served at once [16]
#   IDLE_TIMEOUT     seconds a connection may stay silent before it is closed [60]
#
# Exit codes: 2 usage error; otherwise the proxy's own (it replaces this script).
set -euo pipefail

VSOCK_PORT=${VSOCK_PORT:-8000}
KMS_HOST=${KMS_HOST:-127.0.0.1}
KMS_PORT=${KMS_PORT:-8420}
ALLOWLIST=${ALLOWLIST:-/etc/keyrelease/vsock-proxy.yaml}
MAX_CONNECTIONS=${MAX_CONNECTIONS:-16}
IDLE_TIMEOUT=${IDLE_TIMEOUT:-60}

usage() {
  printf 'proxy.sh: %s\nUsage: proxy.sh vsock-proxy|socat|keyutil\n' "$1" >&2
  exit 2
}

for setting in VSOCK_PORT KMS_PORT MAX_CONNECTIONS IDLE_TIMEOUT; do
  [[ ${!setting} =~ ^[1-9][0-9]{0,9}$ ]] || usage "$setting must be a positive integer; found '${!setting}'"
done
[[ $# -eq 1 ]] || usage "expected one argument, the proxy program"

case $1 in
  vsock-proxy)
    exec vsock-proxy --config "$ALLOWLIST" --num_workers "$MAX_CONNECTIONS" \
      "$VSOCK_PORT" "$KMS_HOST" "$KMS_PORT"
    ;;
  socat)
    exec socat -T "$IDLE_TIMEOUT" \
      "VSOCK-LISTEN:$VSOCK_PORT,fork,reuseaddr,max-children=$MAX_CONNECTIONS" \
      "TCP:$KMS_HOST:$KMS_PORT,connect-timeout=5"
    ;;
  keyutil)
    exec keyutil proxy --listen "vsock://:$VSOCK_PORT" --to "$KMS_HOST:$KMS_PORT" \
      --allowlist "$ALLOWLIST" --max-connections "$MAX_CONNECTIONS" \
      --idle-timeout "$IDLE_TIMEOUT"
    ;;
  *) usage "unknown proxy program '$1'" ;;
esac
