#!/usr/bin/env bash
# compute_os_image_hash.sh: OS_IMAGE_HASH = sha256(PCR0 || PCR1 || PCR2) of an enclave image.
#
# The bash/coreutils twin of keyutil.measurements (os_image_hash, pcr_from_hex,
# pcrs_from_nitro_cli): same output for valid input, and it rejects what those reject.
# The hash is over the raw PCR bytes, never over their hex text. Needs only bash and
# coreutils (sha256sum, tr, fold): no jq, xxd, python or openssl. Run with --help for usage.
set -euo pipefail
shopt -s lastpipe # the last command of a pipeline runs in this shell (read_input)
export LC_ALL=C   # byte-wise string handling; the JSON reader below relies on it

readonly EXIT_USAGE=2 EXIT_INVALID=3 EXIT_UNREADABLE=4 EXIT_INTERNAL=1
readonly MAX_DEPTH=512
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
line. The hash is over the raw PCR bytes (48 bytes each for SHA-384 measurements; 32, 48
or 64 bytes are accepted, all three of one length), not over the hex text: the value of
  sha256sum <<< "\${PCR0}\${PCR1}\${PCR2}"
hashes ASCII and a newline, and is wrong.

PCR values: hex digits, upper or lower case, with an optional '0x' prefix; surrounding
whitespace is ignored.

JSON input: an object with a "Measurements" object holding "PCR0", "PCR1" and "PCR2" as
hex strings (a bare Measurements object is accepted too). Other keys (HashAlgorithm,
PCR8, EifVersion, Metadata, ...) are ignored; pretty-printed or one-line JSON both work.
nitro-cli prints its progress lines on stderr and the JSON on stdout: redirect stdout only.

Examples:
  $PROG 0x1f2e...(96 hex digits) 3d4c...(96) 5b6a...(96)
  nitro-cli build-enclave --docker-uri app:latest --output-file app.eif > build.json
  $PROG --json build.json
  nitro-cli describe-eif --eif-path app.eif | $PROG
  $PROG - < build.json

Exit codes:
  0  success: the hash is on stdout
  1  internal failure (e.g. sha256sum missing or misbehaving)
  2  usage error: wrong number of arguments, unknown option, stdin is a terminal
  3  invalid input: a PCR is not hex, has an odd number of digits or a wrong length,
     the three lengths differ, or the JSON does not parse or lacks Measurements.PCR0..2
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

# --- PCR hex -> bytes -> hash ----------------------------------------------------------

# One character Python's str.strip() removes: ASCII whitespace, \x1c-\x1f, and the UTF-8
# forms of U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
RE_PYSPACE=$'([\t\n\v\f\r\x1c-\x1f ]|\xc2[\x85\xa0]|\xe1\x9a\x80'
RE_PYSPACE+=$'|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]|\xe2\x81\x9f|\xe3\x80\x80)'
readonly RE_PYSPACE
readonly RE_HEX='^(0x)?([0-9a-fA-F]*)$'

# pcr_hex NAME TEXT: sets PCR_HEX to the PCR's hex digits, or exits 3.
pcr_hex() {
  local name=$1 text=$2 shown
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
  case $((${#PCR_HEX} / 2)) in
    32 | 48 | 64) ;;
    *) die "$EXIT_INVALID" "$name must be 32, 48 or 64 bytes; found $((${#PCR_HEX} / 2)) bytes" ;;
  esac
}

# hash_pcrs HEX0 HEX1 HEX2: the three PCRs' hex digits (each already checked by pcr_hex)
# -> checks they have one length, prints 0x || sha256 of their raw bytes.
hash_pcrs() {
  local all esc="" i out digest
  if ! [[ ${#1} -eq ${#2} && ${#1} -eq ${#3} ]]; then
    die "$EXIT_INVALID" "PCR0, PCR1 and PCR2 must have one length; found" \
      "$((${#1} / 2)), $((${#2} / 2)) and $((${#3} / 2)) bytes"
  fi
  all=$1$2$3
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

# --- a small strict JSON reader -----------------------------------------------------------
# Accepts what Python's json.loads accepts (including NaN, Infinity and -Infinity) and keeps
# only what the Measurements lookup needs: the type and decoded string value of the top-level
# keys Measurements and PCR0..PCR2, and of PCR0..PCR2 inside the Measurements object.
# Duplicate keys: the last one wins, as in Python.
#
# The input arrives as CHUNKS, lines of at most 256 bytes (see read_input), in which a raw
# newline is \x02 and a NUL or raw \x02 is \x01. R holds the next unparsed bytes; refill()
# tops it up one chunk at a time so that every step copies a short string and the whole read
# stays linear in the input size (bash substrings of a long string are slow).

readonly RE_WS=$'^[ \t\x02\r]+' # JSON whitespace; \x02 stands for a raw newline
readonly RE_STR_CHUNK=$'^[^"\\\x01-\x1f]+'
readonly RE_ESC='^\\(["\\/bfnrt])'
readonly RE_ESC_U='^\\u([0-9a-fA-F]{4})'
readonly RE_ESC_LOW='^\\u([dD][c-fC-F][0-9a-fA-F]{2})'
readonly RE_NUM='^-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?'

CHUNKS=() CI=0 READ=0 R="" VT="" VS="" U8="" DEPTH=0 HAS_MEAS=0 MEAS_T=none
TOP_T=(none none none) TOP_V=("" "" "") M_T=(none none none) M_V=("" "" "")

json_fail() {
  die "$EXIT_INVALID" "not valid JSON (at byte $((READ - ${#R}))): $1"
}

refill() { # keeps at least 64 bytes in R while the input lasts
  while ((${#R} < 64 && CI < ${#CHUNKS[@]})); do
    R+=${CHUNKS[CI]}
    READ=$((READ + ${#CHUNKS[CI]}))
    CI=$((CI + 1))
  done
}

refill_all() {
  while ((CI < ${#CHUNKS[@]})); do
    R+=${CHUNKS[CI]}
    READ=$((READ + ${#CHUNKS[CI]}))
    CI=$((CI + 1))
  done
}

skip_ws() {
  refill
  while [[ $R =~ $RE_WS ]]; do
    R=${R:${#BASH_REMATCH[0]}}
    refill
  done
}

# utf8 CODEPOINT: sets U8 to its UTF-8 bytes (U+0000, which bash cannot hold, becomes \x01:
# like U+0000 it is neither hex nor whitespace).
utf8() {
  local cp=$1 fmt
  if ((cp == 0)); then
    U8=$'\x01'
    return 0
  elif ((cp < 0x80)); then
    printf -v fmt '\\x%02x' "$cp"
  elif ((cp < 0x800)); then
    printf -v fmt '\\x%02x\\x%02x' $((0xC0 | cp >> 6)) $((0x80 | (cp & 0x3F)))
  elif ((cp < 0x10000)); then
    printf -v fmt '\\x%02x\\x%02x\\x%02x' $((0xE0 | cp >> 12)) \
      $((0x80 | (cp >> 6 & 0x3F))) $((0x80 | (cp & 0x3F)))
  else
    printf -v fmt '\\x%02x\\x%02x\\x%02x\\x%02x' $((0xF0 | cp >> 18)) \
      $((0x80 | (cp >> 12 & 0x3F))) $((0x80 | (cp >> 6 & 0x3F))) $((0x80 | (cp & 0x3F)))
  fi
  printf -v U8 '%b' "$fmt"
}

# json_string KEEP: R starts with '"'. With KEEP=1, sets VS to the decoded string (the
# other strings are checked, not kept).
json_string() {
  local keep=$1 c cp lo
  R=${R:1}
  VS=""
  while :; do
    refill
    if [[ $R =~ $RE_STR_CHUNK ]]; then
      if ((keep)); then VS+=${BASH_REMATCH[0]}; fi
      R=${R:${#BASH_REMATCH[0]}}
      continue
    fi
    c=${R:0:1}
    if [[ $c == '"' ]]; then
      R=${R:1}
      return 0
    elif [[ $c == "\\" ]]; then
      if [[ $R =~ $RE_ESC ]]; then
        case ${BASH_REMATCH[1]} in
          b) U8=$'\b' ;;
          f) U8=$'\f' ;;
          n) U8=$'\n' ;;
          r) U8=$'\r' ;;
          t) U8=$'\t' ;;
          *) U8=${BASH_REMATCH[1]} ;;
        esac
        R=${R:2}
      elif [[ $R =~ $RE_ESC_U ]]; then
        cp=$((16#${BASH_REMATCH[1]}))
        R=${R:6}
        if ((cp >= 0xD800 && cp <= 0xDBFF)) && [[ $R =~ $RE_ESC_LOW ]]; then
          lo=$((16#${BASH_REMATCH[1]}))
          cp=$((0x10000 + ((cp - 0xD800) << 10) + lo - 0xDC00))
          R=${R:6}
        fi
        utf8 "$cp"
      else
        json_fail "invalid escape in a string"
      fi
      if ((keep)); then VS+=$U8; fi
    elif [[ -z $c ]]; then
      json_fail "unterminated string"
    else
      json_fail "control character in a string"
    fi
  done
}

json_literal() { # WORD
  if [[ $R == "$1"* ]]; then
    R=${R:${#1}}
    VT=$1
  else
    json_fail "expected a value"
  fi
}

# json_value ROLE: ROLE is top (the document), meas (the top-level Measurements value),
# keep (a PCR value whose string must be kept) or other. Sets VT, and VS for kept strings.
json_value() {
  refill
  case ${R:0:1} in
    '{') json_object "$1" ;;
    '[') json_array ;;
    '"')
      if [[ $1 == keep ]]; then json_string 1; else json_string 0; fi
      VT=string
      ;;
    t) json_literal true ;;
    f) json_literal false ;;
    n) json_literal null ;;
    N) json_literal NaN ;;
    I) json_literal Infinity ;;
    - | [0-9])
      if [[ $R =~ $RE_NUM ]] && ((${#BASH_REMATCH[0]} + 4 > ${#R})); then
        refill_all # a number hundreds of digits long: read it whole
      fi
      if [[ $R =~ $RE_NUM ]]; then
        R=${R:${#BASH_REMATCH[0]}}
        VT=number
      elif [[ $R == -Infinity* ]]; then
        R=${R:9}
        VT=number
      else
        json_fail "expected a value"
      fi
      ;;
    '') json_fail "unexpected end of input" ;;
    *) json_fail "expected a value" ;;
  esac
}

enter() { # consumes '{' or '['
  DEPTH=$((DEPTH + 1))
  if ((DEPTH > MAX_DEPTH)); then json_fail "nested deeper than $MAX_DEPTH levels"; fi
  R=${R:1}
  skip_ws
}

json_object() { # ROLE
  local role=$1 key child idx
  enter
  if [[ $role == meas ]]; then
    M_T=(none none none) M_V=("" "" "")
  fi
  if [[ ${R:0:1} == '}' ]]; then
    R=${R:1}
  else
    while :; do
      [[ ${R:0:1} == '"' ]] || json_fail "expected a key in double quotes"
      if [[ $role == top || $role == meas ]]; then json_string 1; else json_string 0; fi
      key=$VS
      skip_ws
      [[ ${R:0:1} == : ]] || json_fail "expected ':' after a key"
      R=${R:1}
      skip_ws
      case $role:$key in
        top:PCR0 | meas:PCR0) idx=0 ;;
        top:PCR1 | meas:PCR1) idx=1 ;;
        top:PCR2 | meas:PCR2) idx=2 ;;
        *) idx=-1 ;;
      esac
      child=other
      if [[ $role:$key == top:Measurements ]]; then
        child=meas
      elif ((idx >= 0)); then
        child=keep
      fi
      json_value "$child"
      if [[ $child == meas ]]; then
        HAS_MEAS=1 MEAS_T=$VT
      elif [[ $role == top ]] && ((idx >= 0)); then
        TOP_T[idx]=$VT TOP_V[idx]=$VS
      elif [[ $role == meas ]] && ((idx >= 0)); then
        M_T[idx]=$VT M_V[idx]=$VS
      fi
      skip_ws
      case ${R:0:1} in
        ,)
          R=${R:1}
          skip_ws
          ;;
        '}')
          R=${R:1}
          break
          ;;
        *) json_fail "expected ',' or '}' in an object" ;;
      esac
    done
  fi
  DEPTH=$((DEPTH - 1))
  VT=object
}

json_array() {
  enter
  if [[ ${R:0:1} == ']' ]]; then
    R=${R:1}
  else
    while :; do
      json_value other
      skip_ws
      case ${R:0:1} in
        ,)
          R=${R:1}
          skip_ws
          ;;
        ']')
          R=${R:1}
          break
          ;;
        *) json_fail "expected ',' or ']' in an array" ;;
      esac
    done
  fi
  DEPTH=$((DEPTH - 1))
  VT=array
}

# hash_from_json: the document in CHUNKS, read as keyutil.measurements.pcrs_from_nitro_cli
# reads it, then hash_pcrs.
hash_from_json() {
  local types=() values=() hex=() i
  skip_ws
  json_value top
  skip_ws
  [[ -z $R ]] || json_fail "extra data after the JSON value"
  [[ $VT == object ]] || die "$EXIT_INVALID" "expected a JSON object with a Measurements object"
  if ((HAS_MEAS)); then
    [[ $MEAS_T == object ]] || die "$EXIT_INVALID" "expected Measurements to be a JSON object"
    types=("${M_T[@]}") values=("${M_V[@]}")
  else
    types=("${TOP_T[@]}") values=("${TOP_V[@]}") # a bare Measurements object
  fi
  for i in 0 1 2; do
    if [[ ${types[i]} != string ]]; then
      die "$EXIT_INVALID" "expected Measurements.PCR$i as a hex string; not found"
    fi
    pcr_hex "PCR$i" "${values[i]}"
    hex[i]=$PCR_HEX
  done
  hash_pcrs "${hex[@]}"
}

# read_input SOURCE: file SOURCE, or stdin for '-', into CHUNKS (see above). NUL (which bash
# cannot hold) and raw \x02 become \x01, invalid anywhere in JSON as they are; a raw newline
# becomes \x02, which the reader treats as a newline. coreutils fold cuts 256-byte lines.
read_input() {
  local src=$1
  if [[ $src == - ]]; then
    src=/dev/stdin
  else
    [[ -n $src ]] || die "$EXIT_USAGE" "empty file name"
    [[ -e $src ]] || die "$EXIT_UNREADABLE" "cannot read '$src': no such file"
    [[ ! -d $src ]] || die "$EXIT_UNREADABLE" "cannot read '$src': it is a directory"
    [[ -r $src ]] || die "$EXIT_UNREADABLE" "cannot read '$src': permission denied"
  fi
  CHUNKS=()
  if ! tr '\0\2\n' '\1\1\2' 2>/dev/null <"$src" | fold -b -w 256 | mapfile -t CHUNKS; then
    die "$EXIT_UNREADABLE" "cannot read '${1/#-/stdin}'"
  fi
}

hash_from_source() { # FILE or -
  read_input "$1"
  hash_from_json
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
