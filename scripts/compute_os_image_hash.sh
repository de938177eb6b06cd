#!/usr/bin/env bash
# compute_os_image_hash.sh: OS_IMAGE_HASH = sha256(PCR0 || PCR1 || PCR2) of an enclave image.
#
# The shell twin of keyutil.measurements (os_image_hash, pcr_from_hex, pcrs_from_nitro_cli):
# same output for valid input, and it rejects what those reject. The hash is over the raw
# PCR bytes, never over their hex text. PCR arguments need only bash and coreutils
# (sha256sum). JSON is read by python3 when the host has it (the parser keyutil uses, so
# both accept the same documents), else by jq (optional; jq's grammar differs from
# Python's on NaN/Infinity and nests at most 256 deep, neither of which nitro-cli prints).
# The reader only extracts values; this script checks them, whichever reader ran.
set -euo pipefail
export LC_ALL=C # byte-wise string handling in the PCR checks

readonly EXIT_USAGE=2 EXIT_INVALID=3 EXIT_UNREADABLE=4 EXIT_INTERNAL=1
PROG=${0##*/}
readonly PROG

usage() {
  cat <<EOF
Usage:
  $PROG PCR0 PCR1 PCR2        three PCR values as hex (an optional 0x prefix is allowed)
  $PROG --json FILE           the JSON that nitro-cli build-enclave / describe-eif print
  $PROG FILE                  the same, when FILE is a readable file
  $PROG [-]                   the same JSON read from stdin ('-', or no argument with
                              stdin not a terminal)
  $PROG --help

Prints OS_IMAGE_HASH = sha256(PCR0 || PCR1 || PCR2) as 0x-prefixed lowercase hex on one
line. The hash is over the raw PCR bytes, not over the hex text: the value of
  sha256sum <<< "\${PCR0}\${PCR1}\${PCR2}"
hashes ASCII and a newline, and is wrong.

PCR values: 48 bytes (96 hex digits) each, as Nitro Enclaves measure with SHA-384; 32- or
64-byte values (SHA-256, SHA-512) are refused, since no Nitro enclave can match them. Upper
or lower case, an optional '0x' prefix; surrounding whitespace is ignored.

JSON input: an object with a "Measurements" object holding "PCR0", "PCR1" and "PCR2" as
hex strings (a bare Measurements object is accepted too), and, if present,
"HashAlgorithm": "Sha384 { ... }". Other keys (PCR8, EifVersion, Metadata, ...) are ignored.
nitro-cli prints its progress lines on stderr and the JSON on stdout: redirect stdout only
(not 2>&1). The output of 'nitro-cli describe-enclaves' (running enclaves) is refused:
take the measurements from the image. Reading JSON needs python3 or, failing that, jq.

Examples:
  $PROG 0x1f2e...(96 hex digits) 3d4c...(96) 5b6a...(96)
  nitro-cli build-enclave --docker-uri app:latest --output-file app.eif > build.json
  $PROG --json build.json
  nitro-cli describe-eif --eif-path app.eif | $PROG
  $PROG - < build.json

Exit codes:
  0  success: the hash is on stdout
  1  internal failure: sha256sum missing or misbehaving, or JSON input and neither
     python3 nor jq on PATH
  2  usage error: wrong number of arguments, unknown option, stdin is a terminal
  3  invalid input: a PCR is not hex, has an odd number of digits or is not 48 bytes,
     HashAlgorithm is not Sha384, or the JSON does not parse or lacks Measurements.PCR0..2
  4  the input file cannot be read (missing, a directory, no permission)
EOF
}

die() { # die CODE MESSAGE...
  local code=$1
  shift
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  if [[ $code == "$EXIT_USAGE" ]]; then
    printf "Try '%s --help'.\n" "$PROG" >&2
  fi
  exit "$code"
}

# --- PCR hex -> bytes -> hash (plain bash and coreutils) ----------------------------------

# One character Python's str.strip() removes: ASCII whitespace, \x1c-\x1f, and the UTF-8
# forms of U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
RE_PYSPACE=$'([\t\n\v\f\r\x1c-\x1f ]|\xc2[\x85\xa0]|\xe1\x9a\x80'
RE_PYSPACE+=$'|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]|\xe2\x81\x9f|\xe3\x80\x80)'
readonly RE_PYSPACE
readonly RE_HEX='^(0x)?([0-9a-fA-F]*)$'

# pcr_hex NAME TEXT: sets PCR_HEX to the PCR's 96 hex digits, or exits 3.
pcr_hex() {
  local name=$1 text=$2 shown bytes what="not a digest size Nitro uses"
  if [[ $text =~ ^$RE_PYSPACE+ ]]; then text=${text:${#BASH_REMATCH[0]}}; fi
  if [[ $text =~ $RE_PYSPACE+$ ]]; then text=${text:0:${#text}-${#BASH_REMATCH[0]}}; fi
  shown=${text:0:24}
  shown=${shown//[^[:print:]]/?}
  [[ ${#text} -le 24 ]] || shown+="..."
  [[ $text =~ $RE_HEX ]] || die "$EXIT_INVALID" "$name must be hex digits (optional 0x prefix); found '$shown'"
  PCR_HEX=${BASH_REMATCH[2]}
  if ((${#PCR_HEX} % 2)); then
    die "$EXIT_INVALID" "$name has an odd number of hex digits (${#PCR_HEX})"
  fi
  bytes=$((${#PCR_HEX} / 2))
  case $bytes in
    48) return 0 ;;
    32) what="a SHA-256 value" ;;
    64) what="a SHA-512 value" ;;
  esac
  die "$EXIT_INVALID" "$name must be 48 bytes (96 hex digits): Nitro Enclaves measure" \
    "with SHA-384; found $bytes bytes ($what)"
}

# hash_pcrs HEX0 HEX1 HEX2: the three PCRs' hex digits (each checked by pcr_hex)
# -> prints 0x || sha256 of their raw bytes.
hash_pcrs() {
  local all=$1$2$3 esc="" i out digest
  for ((i = 0; i < ${#all}; i += 2)); do
    esc+="\\x${all:i:2}"
  done
  command -v sha256sum >/dev/null 2>&1 || die "$EXIT_INTERNAL" "sha256sum (coreutils) not found"
  # printf %b turns each \xHH into one raw byte: the hash is over bytes, not hex text.
  out=$(printf '%b' "$esc" | sha256sum) || die "$EXIT_INTERNAL" "sha256sum failed"
  digest=${out%% *}
  [[ $digest =~ ^[0-9a-f]{64}$ ]] || die "$EXIT_INTERNAL" "unexpected sha256sum output: $out"
  printf '0x%s\n' "$digest"
}

hash_from_args() { # TEXT0 TEXT1 TEXT2
  local texts=("$@") hex=() i
  for i in 0 1 2; do
    pcr_hex "PCR$i" "${texts[i]}"
    hex[i]=$PCR_HEX
  done
  hash_pcrs "${hex[@]}"
}

# --- JSON: python3 or jq extracts, bash checks -----------------------------------------------
# Each reader prints either one line "E<TAB>message" (the document is refused), or four lines
# "A|P<TAB>type<TAB>value": Measurements.HashAlgorithm, then PCR0..PCR2, with type a JSON
# type name (null when absent), and for strings the value on one line (PCRs stripped as
# Python's str.strip() does; control characters shown as '?', which is never hex).

readonly HINT_DESCRIBE="this is \`nitro-cli describe-enclaves\` output (the running \
enclaves), not an image's measurements: use the JSON of \`nitro-cli build-enclave\` or \
\`nitro-cli describe-eif --eif-path IMAGE.eif\`"
readonly HINT_MIXED="nitro-cli prints progress on stderr and the JSON on stdout: capture \
stdout only (\`> build.json\`, not \`2>&1\`)"
readonly MAX_DEPTH=512

read -r -d '' PY_READER <<'PY' || true
import json, re, sys
src, hint_describe, hint_mixed, max_depth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def emit(*lines):
    sys.stdout.buffer.write("".join(l + "\n" for l in lines).encode("utf-8", "backslashreplace"))
    sys.exit(0)
def oneline(v):
    return "".join("?" if ord(c) < 32 or c == "\x7f" else c for c in v)
def row(tag, v, strip):
    kind = {type(None): "null", bool: "boolean", int: "number", float: "number",
            str: "string", list: "array", dict: "object"}[type(v)]
    return "%s\t%s\t%s" % (tag, kind, oneline(v.strip() if strip else v) if kind == "string" else "")
data = sys.stdin.buffer.read() if src == "-" else open(src, "rb").read()
try:
    text = data.decode(json.detect_encoding(data), "surrogatepass")
except UnicodeDecodeError:
    emit("E\tnot valid JSON: not UTF-8 text")
if not text.strip():
    emit("E\tnot valid JSON: unexpected end of input (the input is empty)")
depth = deepest = 0  # bounded before parsing: json.loads recurses per level
for m in re.finditer(r"[\[\]{}]", re.sub(r'"(?:[^"\\]|\\.)*"', "", text, flags=re.S)):
    depth += 1 if m.group() in "[{" else -1
    deepest = max(deepest, depth)
if deepest > max_depth:
    emit("E\tnot valid JSON: nested deeper than %d levels" % max_depth)
try:
    doc = json.loads(text)
except ValueError as e:
    first = re.search(r"^[ \t]*[{\[]", text, re.M)
    mixed = getattr(e, "msg", "") == "Extra data" or (first is not None and first.start() > 0)
    emit("E\tnot valid JSON: %s%s" % (oneline(str(e)), "; " + hint_mixed if mixed else ""))
if isinstance(doc, list) and any(
        isinstance(e, dict) and ("EnclaveID" in e or "EnclaveCID" in e) for e in doc):
    emit("E\t" + hint_describe)
if not isinstance(doc, dict):
    emit("E\texpected a JSON object with a Measurements object")
m = doc.get("Measurements", doc)
if not isinstance(m, dict):
    emit("E\texpected Measurements to be a JSON object")
emit(row("A", m.get("HashAlgorithm"), False), *[row("P", m.get("PCR%d" % i), True) for i in range(3)])
PY
readonly PY_READER

read -r -d '' JQ_READER <<'JQ' || true
def pyspace: (. >= 9 and . <= 13) or (. >= 28 and . <= 32) or . == 133 or . == 160
  or . == 5760 or (. >= 8192 and . <= 8202) or . == 8232 or . == 8233 or . == 8239
  or . == 8287 or . == 12288;
def strip: explode | until(length == 0 or (.[0] | pyspace | not); .[1:])
  | until(length == 0 or (.[-1] | pyspace | not); .[:-1]) | implode;
def oneline: explode | map(if . < 32 or . == 127 then 63 else . end) | implode;
def row($tag; $trim): "\($tag)\t\(type)\t"
  + (if type == "string" then (if $trim then strip else . end | oneline) else "" end);
. as $text
| if test("^\\s*$") then "E\tnot valid JSON: unexpected end of input (the input is empty)"
  else (try {doc: fromjson} catch {error: sub(" \\(while parsing [\\s\\S]*$"; "")})
  | if has("error") then
      "E\tnot valid JSON: \(.error | oneline)"
      + (if (.error | startswith("Unexpected extra JSON values"))
            or (($text | test("^[ \\t\\r\\n]*[{\\[]") | not) and ($text | test("\\n[ \\t]*[{\\[]")))
            or ($text | test("(^|\\n)[ \\t]*[A-Z][a-z]+ "))
         then "; " + $mixed else "" end)
    else .doc
    | if type == "array" and any(.[]; type == "object" and (has("EnclaveID") or has("EnclaveCID")))
      then "E\t" + $describe
      elif type != "object" then "E\texpected a JSON object with a Measurements object"
      elif has("Measurements") and (.Measurements | type) != "object"
      then "E\texpected Measurements to be a JSON object"
      else (if has("Measurements") then .Measurements else . end)
      | (.HashAlgorithm | row("A"; false)), (.PCR0, .PCR1, .PCR2 | row("P"; true))
      end
    end
  end
JQ
readonly JQ_READER

# read_json SOURCE: the reader's lines for file SOURCE, or stdin for '-'.
read_json() {
  local src=$1
  if command -v python3 >/dev/null 2>&1; then
    python3 -I -S -c "$PY_READER" "$src" "$HINT_DESCRIBE" "$HINT_MIXED" "$MAX_DEPTH" ||
      die "$EXIT_INTERNAL" "python3 failed to read the JSON"
  elif command -v jq >/dev/null 2>&1; then
    [[ $src != - ]] || src=/dev/stdin
    jq -R -s -r --arg describe "$HINT_DESCRIBE" --arg mixed "$HINT_MIXED" "$JQ_READER" "$src" ||
      die "$EXIT_INTERNAL" "jq failed to read the JSON"
  else
    die "$EXIT_INTERNAL" "reading JSON needs python3 or jq, and neither is on PATH;" \
      "install one, or give the three PCR values as arguments"
  fi
}

# hash_from_source FILE|-: the document read as keyutil.measurements.pcrs_from_nitro_cli
# reads it, then hash_pcrs.
hash_from_source() {
  local src=$1 out lines=() line rest type value hex=() i
  if [[ $src != - ]]; then
    [[ -n $src ]] || die "$EXIT_USAGE" "empty file name"
    [[ -e $src ]] || die "$EXIT_UNREADABLE" "cannot read '$src': no such file"
    [[ ! -d $src ]] || die "$EXIT_UNREADABLE" "cannot read '$src': it is a directory"
    [[ -r $src ]] || die "$EXIT_UNREADABLE" "cannot read '$src': permission denied"
  fi
  out=$(read_json "$src")
  mapfile -t lines <<<"$out"
  if [[ ${lines[0]} == E$'\t'* ]]; then die "$EXIT_INVALID" "${lines[0]#E$'\t'}"; fi
  ((${#lines[@]} == 4)) || die "$EXIT_INTERNAL" "unexpected output from the JSON reader"
  for i in 0 1 2 3; do
    line=${lines[i]}
    rest=${line#*$'\t'}
    type=${rest%%$'\t'*}
    value=${rest#*$'\t'}
    if ((i == 0)); then
      if [[ $type == string && $value == Sha384* ]] || [[ $type == null ]]; then continue; fi
      [[ $type != string ]] || value="\"${value:0:38}\""
      die "$EXIT_INVALID" "Measurements.HashAlgorithm is $value: Nitro Enclaves measure" \
        "with SHA-384 (\"Sha384 { ... }\", 48-byte PCRs), so no Nitro enclave can match" \
        "these values"
    fi
    if [[ $type != string ]]; then
      die "$EXIT_INVALID" "expected Measurements.PCR$((i - 1)) as a hex string; not found"
    fi
    pcr_hex "PCR$((i - 1))" "$value"
    hex[i - 1]=$PCR_HEX
  done
  hash_pcrs "${hex[@]}"
}

main() {
  local arg
  for arg in "$@"; do
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
    esac
  done
  case $# in
    0)
      if [[ -t 0 ]]; then
        die "$EXIT_USAGE" "no input: give PCR0 PCR1 PCR2, --json FILE, or the JSON on stdin"
      fi
      hash_from_source -
      ;;
    1)
      case $1 in
        -) hash_from_source - ;;
        --json) die "$EXIT_USAGE" "--json needs a FILE ('-' for stdin)" ;;
        --json=*) hash_from_source "${1#--json=}" ;;
        -?*) die "$EXIT_USAGE" "unknown option '$1'" ;;
        '') die "$EXIT_USAGE" "empty argument: give PCR0 PCR1 PCR2 or a JSON file" ;;
        *)
          if [[ -e $1 ]]; then
            hash_from_source "$1"
          elif [[ $1 =~ ^[[:space:]]*(0x)?[0-9a-fA-F]+[[:space:]]*$ ]]; then
            die "$EXIT_USAGE" "one PCR value given; need three (PCR0 PCR1 PCR2) or a JSON file"
          else
            die "$EXIT_UNREADABLE" "cannot read '$1': no such file (nor is it three PCR values)"
          fi
          ;;
      esac
      ;;
    2)
      case $1 in
        --json) hash_from_source "$2" ;;
        -?*) die "$EXIT_USAGE" "unknown option '$1' or wrong use" ;;
        *) die "$EXIT_USAGE" "expected three PCR values (PCR0 PCR1 PCR2); got 2 arguments" ;;
      esac
      ;;
    3)
      for arg in "$@"; do
        case $arg in
          --json | --json=*) die "$EXIT_USAGE" "--json takes one FILE and no PCR values" ;;
        esac
      done
      hash_from_args "$@"
      ;;
    *) die "$EXIT_USAGE" "expected three PCR values or one JSON file; got $# arguments" ;;
  esac
}

main "$@"
