#!/usr/bin/env bash
# Bad options of every `nsa` subcommand: each must exit 2 within seconds with exactly one non-empty
# line on stderr that names the option, and nothing that looks like a crash (an uncaught
# exception used to abort with exit 134). --help of every subcommand must still exit 0.
#
# usage: cli_bad_options.sh path/to/nsa
set -u
if [[ $# -ne 1 || ! -x $1 ]]; then
  echo "usage: $0 path/to/nsa" >&2
  exit 2
fi
NSA=$1
passed=0
failed=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

fail() {
  failed=$((failed + 1))
  echo "FAIL: nsa $1: $2"
  sed 's/^/  stderr: /' "$tmp/err"
}

# bad NAME ARGS...: `nsa ARGS` is rejected with one stderr line containing NAME ("" skips that).
bad() {
  local name=$1
  shift
  local rc=0
  timeout 20 "$NSA" "$@" >"$tmp/out" 2>"$tmp/err" </dev/null || rc=$?
  local lines
  lines=$(grep -c '' "$tmp/err")
  local shown="${*@Q}"
  if [[ $rc -eq 124 ]]; then
    fail "$shown" "timed out after 20 s"
  elif [[ $rc -ne 2 ]]; then
    fail "$shown" "exit $rc, want 2"
  elif [[ $lines -ne 1 ]]; then
    fail "$shown" "$lines lines on stderr, want 1"
  elif ! grep -q '[^[:space:]]' "$tmp/err"; then
    fail "$shown" "an empty stderr line"
  elif grep -qiE 'terminate|abort|what\(\)|exception' "$tmp/err" "$tmp/out"; then
    fail "$shown" "looks like a crash"
  elif [[ -n $name ]] && ! grep -qF -- "$name" "$tmp/err"; then
    fail "$shown" "the message does not name $name"
  else
    passed=$((passed + 1))
  fi
}

# help_ok ARGS...: `nsa ARGS --help` prints the help and exits 0.
help_ok() {
  local rc=0
  timeout 20 "$NSA" "$@" --help >"$tmp/out" 2>"$tmp/err" </dev/null || rc=$?
  if [[ $rc -ne 0 ]]; then
    fail "${*@Q} --help" "exit $rc, want 0"
  elif ! grep -q 'Usage' "$tmp/out"; then
    fail "${*@Q} --help" "no usage text on stdout"
  else
    passed=$((passed + 1))
  fi
}

HUGE=99999999999999999999  # past int64 and uint64
NOT_INTS=(abc "" 1.5 12abc 0x10 "$HUGE" "-$HUGE" " 7")

# int_option PREFIX... -- OPTION MIN: the bad values of an integer option whose least value is MIN.
int_option() {
  local prefix=()
  while [[ $1 != -- ]]; do prefix+=("$1"); shift; done
  local opt=$2 min=$3
  for v in "${NOT_INTS[@]}" $((min - 1)) -7; do bad "$opt" "${prefix[@]}" "$opt" "$v"; done
  bad "$opt" "${prefix[@]}" "$opt"  # no value
}

# list_option PREFIX... -- OPTION GOOD: the bad values of an integer list option.
list_option() {
  local prefix=()
  while [[ $1 != -- ]]; do prefix+=("$1"); shift; done
  local opt=$2 good=$3
  for v in abc "" , "$good," ",$good" "$good,,$good" "$good,abc" "$good;$good" "$good $good" \
           "$good,-1" "$good,$HUGE" "$good,16777217" "$good,1.5"; do
    bad "$opt" "${prefix[@]}" "$opt" "$v"
  done
  bad "$opt" "${prefix[@]}" "$opt"
}

# --- the tool itself and `nsa info`
bad ""
bad "--bogus" --bogus
bad frob frob
bad "--bogus" info --bogus
bad "extra" info extra

# --- nsa check
for opt in -b --batch -t --tokens --hq --hkv --dk --dv --mlp-hidden --cmp-block --cmp-stride \
           --slc-block --slc-count --window; do
  int_option check -- "$opt" 1
done
for opt in --slc-init --slc-local --threads; do int_option check -- "$opt" 0; done
for v in "${NOT_INTS[@]}" -1; do bad --seed check --seed "$v"; done
for v in abc "" -1 2 nan inf 1e999 0.5x; do bad --tolerance check --tolerance "$v"; done
for v in f16 F32 "" bf16,f32; do bad --dtype check --dtype "$v"; done
for v in max MEAN ""; do bad --compress check --compress "$v"; done
for v in gpu ref ""; do bad --backend check --backend "$v"; done
for v in NATIVE bf16 ""; do bad --bf16-math check --bf16-math "$v"; done
bad --no-backward check --no-backward=maybe
list_option check -- --seqlens 300
bad --seqlens check --seqlens 0,0
bad --seqlens check --seqlens 16777216,1
bad --tokens check --tokens 16777217
bad --hq check --hq 3 --hkv 2
bad --hq check --hq 1 --hkv 2
bad --cmp-stride check --cmp-stride 64
bad --cmp-stride check --cmp-block 8 --cmp-stride 16
bad --slc-count check --slc-init 10 --slc-local 10
bad --slc-count check --slc-count 1 --slc-init 1 --slc-local 1
bad --tokens check --tokens 16777216 --hq 4096 --dk 4096
bad --tokens check -b 65536 -t 16777216
bad --seqlens check --seqlens 16777216 --hq 4096 --dv 4096
bad --mlp-hidden check --compress mlp --cmp-block 16777216 --mlp-hidden 4096 --dk 4096
bad --bogus check --bogus
bad --tokens check --tokens 5 --tokens 6

# --- nsa bench, each pass
for pass in fwd bwd fwdbwd; do
  list_option bench --pass "$pass" -- --lengths 4096
  bad --lengths bench --pass "$pass" --lengths 0
  for opt in --repeats --hq --hkv --dk --dv; do int_option bench --pass "$pass" -- "$opt" 1; done
  int_option bench --pass "$pass" -- --threads 0
  bad --threads bench --pass "$pass" --threads 1025  # NSA_MAX_THREADS + 1
  bad --hq bench --pass "$pass" --hq 4097
  bad --dk bench --pass "$pass" --dk 4097
  bad --repeats bench --pass "$pass" --repeats 10001
  bad --hq bench --pass "$pass" --hq 3 --hkv 2
  bad --lengths bench --pass "$pass" --lengths 16777216 --hq 4096 --dk 4096
  bad --bf16-math bench --pass "$pass" --bf16-math fast
  bad --bogus bench --pass "$pass" --bogus
done
for v in zzz FWD "" bwd,fwd; do bad --pass bench --pass "$v"; done
for v in f16 "" bf16,f32; do bad --dtype bench --dtype "$v"; done
bad --json bench --json=maybe
bad --no-dense bench --no-dense=maybe

# --- nsa bench decode
list_option bench decode -- --lengths 8192
list_option bench decode -- --batch 1
bad --batch bench decode --batch 0
bad --batch bench decode --batch 1,0
bad --batch bench decode --batch 65537
for v in f16 "" , bf16, ,f32 bf16,,f32 bf16,x BF16 "bf16 f32"; do bad --dtype bench decode --dtype "$v"; done
for opt in --repeats --steps --hq --hkv --dk --dv; do int_option bench decode -- "$opt" 1; done
int_option bench decode -- --threads 0
bad --steps bench decode --steps 10001
bad --hq bench decode --hq 3 --hkv 2
bad --lengths bench decode --lengths 16777216 --batch 65536
bad --lengths bench decode --lengths 16777216 --batch 4096 --hq 4096 --hkv 4096 --dk 4096
bad --json bench decode --json=maybe
bad --bf16-math bench decode --bf16-math fast
bad --bogus bench decode --bogus
bad --pass bench decode --pass bwd

# --- --help still works everywhere
help_ok
help_ok info
help_ok check
help_ok bench
help_ok bench --pass bwd
help_ok bench decode

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
