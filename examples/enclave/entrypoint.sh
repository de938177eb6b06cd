#!/bin/sh
# entrypoint.sh: the enclave's entrypoint. It gives the enclave a loopback, puts the keys
# directory on tmpfs, has keyutil release the application's keys from the KMS, and only then
# replaces itself with the application. When a step fails it says which, why and what the
# exit code means on stderr (the enclave console) and exits non-zero: the application never
# starts without its keys.
#
# Usage: entrypoint.sh [APPLICATION [ARGUMENT...]]
#        (without arguments: the command line in ENCLAVE_APP, run by /bin/sh -c)
#
# Environment, with defaults:
#   KEYUTIL_KMS              where the KMS is, as seen from the enclave [vsock://3:8000]
#                            (CID 3 is the parent instance, where the proxy listens)
#   KEYUTIL_KMS_PUBKEY       the pinned KMS identity, ed25519:... or @FILE
#                            [@/etc/keyutil/kms.pub, baked into the image, so measured]
#   ENCLAVE_KEYS             names of the keys to release, separated by spaces [app]
#   ENCLAVE_KEY_LENGTH       length of each key in bytes [32]
#   ENCLAVE_KEYS_DIR         directory the keys are written to, one file per key
#                            (DIR/NAME, mode 0400) [/run/keys]
#   ENCLAVE_KEYS_TMPFS_SIZE  size of the tmpfs mounted on ENCLAVE_KEYS_DIR when that is not
#                            on tmpfs or ramfs already [1m]
#   ENCLAVE_DEADLINE         seconds keyutil get-key may spend waiting for the KMS and
#                            retrying, in all [60]
#   ENCLAVE_NET_UP           1: run 'keyutil net-up' first; 0: skip it [1]
#   ENCLAVE_LOG_FORMAT       keyutil's log lines: text or json [text]
#   ENCLAVE_APP              the application's command line, when no arguments are given
#   KEYUTIL                  the keyutil command [keyutil]
#   KEYUTIL_NSM, KEYUTIL_SIM_DIR, KEYUTIL_GET_KEY_EXPECT_APP are read by keyutil itself ([auto]: /dev/nsm in an enclave).
#
# The application starts with ENCLAVE_KEYS_DIR in its environment and finds each key in
# $ENCLAVE_KEYS_DIR/NAME. No key material is ever printed.
#
# Exit codes: 0 is never returned by this script itself (the application replaces it);
#   2 usage (no application given, a bad setting), and keyutil's: 3 KMS unreachable by
#   the deadline, 4 denied by the KMS, 5 NSM error, 6 the KMS answer failed authentication,
#   7 output error (also: the keys directory cannot be put on tmpfs), 8 network set-up
#   error; 127 keyutil or the application (given as arguments) cannot be found.
set -eu

KEYUTIL=${KEYUTIL:-keyutil}
KEYUTIL_KMS=${KEYUTIL_KMS:-vsock://3:8000}
KEYUTIL_KMS_PUBKEY=${KEYUTIL_KMS_PUBKEY:-@/etc/keyutil/kms.pub}
ENCLAVE_KEYS=${ENCLAVE_KEYS:-app}
ENCLAVE_KEY_LENGTH=${ENCLAVE_KEY_LENGTH:-32}
ENCLAVE_KEYS_DIR=${ENCLAVE_KEYS_DIR:-/run/keys}
ENCLAVE_KEYS_TMPFS_SIZE=${ENCLAVE_KEYS_TMPFS_SIZE:-1m}
ENCLAVE_DEADLINE=${ENCLAVE_DEADLINE:-60}
ENCLAVE_NET_UP=${ENCLAVE_NET_UP:-1}
ENCLAVE_LOG_FORMAT=${ENCLAVE_LOG_FORMAT:-text}
export KEYUTIL_KMS KEYUTIL_KMS_PUBKEY ENCLAVE_KEYS_DIR

say() {
  printf 'entrypoint: %s\n' "$*" >&2
}

meaning() { # EXIT_CODE -> what it means
  case $1 in
    2) echo "usage error" ;;
    3) echo "the KMS was unreachable or unavailable until the deadline: check the proxy on the parent instance and the KMS behind it" ;;
    4) echo "the KMS denied the release: its error code is logged above (image_not_allowed: register this image's OS_IMAGE_HASH)" ;;
    5) echo "the NSM could not attest (is this an enclave with /dev/nsm?)" ;;
    6) echo "the KMS answer failed authentication: the pinned KMS identity does not match the KMS that answered" ;;
    7) echo "output error: the keys directory" ;;
    8) echo "network set-up error: the loopback could not be brought up" ;;
    127) echo "a command cannot be found" ;;
    *) echo "unexpected failure" ;;
  esac
}

fail() { # EXIT_CODE STEP
  say "FATAL: $2 failed with exit $1: $(meaning "$1")"
  say "the application is not started"
  exit "$1"
}

# -- check the settings before doing anything ----------------------------------------------
if [ "$#" -eq 0 ] && [ -z "${ENCLAVE_APP:-}" ]; then
  say "no application given: pass it as arguments or set ENCLAVE_APP"
  fail 2 "reading the settings"
fi
case $ENCLAVE_NET_UP in
  0 | 1) ;;
  *)
    say "ENCLAVE_NET_UP must be 0 or 1; found '$ENCLAVE_NET_UP'"
    fail 2 "reading the settings"
    ;;
esac
case $ENCLAVE_KEYS_DIR in
  /*) ;;
  *)
    say "ENCLAVE_KEYS_DIR must be an absolute path; found '$ENCLAVE_KEYS_DIR'"
    fail 2 "reading the settings"
    ;;
esac
count() { echo "$#"; }
set -f # key names are split on blanks, never expanded as file patterns
# shellcheck disable=SC2086 # splitting ENCLAVE_KEYS into names is intended
key_count=$(count $ENCLAVE_KEYS)
set +f
if [ "$key_count" -eq 0 ]; then
  say "ENCLAVE_KEYS names no key"
  fail 2 "reading the settings"
fi
if ! command -v "$KEYUTIL" >/dev/null 2>&1; then
  say "keyutil not found (KEYUTIL=$KEYUTIL)"
  fail 127 "reading the settings"
fi
if [ "$#" -gt 0 ] && ! command -v "$1" >/dev/null 2>&1; then
  say "application '$1' not found"
  fail 127 "reading the settings"
fi

# -- 1. the loopback -----------------------------------------------------------------------
if [ "$ENCLAVE_NET_UP" = 1 ]; then
  code=0
  "$KEYUTIL" net-up --log-format "$ENCLAVE_LOG_FORMAT" || code=$?
  [ "$code" -eq 0 ] || fail "$code" "keyutil net-up"
fi

# -- 2. the keys directory on tmpfs --------------------------------------------------------
volatile() { # DIR: true when DIR is on tmpfs or ramfs
  case $(stat -f -c %T "$1" 2>/dev/null) in
    tmpfs | ramfs) return 0 ;;
    *) return 1 ;;
  esac
}
if ! mkdir -p "$ENCLAVE_KEYS_DIR"; then
  say "cannot create $ENCLAVE_KEYS_DIR"
  fail 7 "preparing the keys directory"
fi
if ! volatile "$ENCLAVE_KEYS_DIR"; then
  if ! mount -t tmpfs -o "mode=0700,size=$ENCLAVE_KEYS_TMPFS_SIZE,nosuid,nodev,noexec" \
    tmpfs "$ENCLAVE_KEYS_DIR"; then
    say "cannot mount a tmpfs on $ENCLAVE_KEYS_DIR (needs CAP_SYS_ADMIN), and it is not on tmpfs"
    fail 7 "preparing the keys directory"
  fi
  if ! volatile "$ENCLAVE_KEYS_DIR"; then
    say "$ENCLAVE_KEYS_DIR is still not on tmpfs after mounting one"
    fail 7 "preparing the keys directory"
  fi
  say "mounted a tmpfs on $ENCLAVE_KEYS_DIR"
fi

# -- 3. the keys ---------------------------------------------------------------------------
release_keys() { # NAME...: one keyutil get-key for all of them (its own "$@", not the app's)
  for name in "$@"; do
    shift
    set -- "$@" --key "$name"
  done
  "$KEYUTIL" get-key --kms "$KEYUTIL_KMS" --kms-pubkey "$KEYUTIL_KMS_PUBKEY" \
    --out-dir "$ENCLAVE_KEYS_DIR" --length "$ENCLAVE_KEY_LENGTH" \
    --deadline "$ENCLAVE_DEADLINE" --log-format "$ENCLAVE_LOG_FORMAT" "$@"
}
code=0
set -f
# shellcheck disable=SC2086 # as above
release_keys $ENCLAVE_KEYS || code=$?
set +f
[ "$code" -eq 0 ] || fail "$code" "keyutil get-key (KMS $KEYUTIL_KMS)"

# -- 4. the application --------------------------------------------------------------------
say "keys ready in $ENCLAVE_KEYS_DIR ($ENCLAVE_KEYS); starting the application"
if [ "$#" -gt 0 ]; then
  exec "$@"
fi
exec /bin/sh -c "$ENCLAVE_APP"
