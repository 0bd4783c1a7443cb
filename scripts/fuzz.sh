#!/usr/bin/env bash
# Fuzzes the protocol core and what reads the network: builds every target in fuzz/
# (libFuzzer, AddressSanitizer, debug assertions) and runs each for SECONDS_PER_TARGET (default
# 20: CI's smoke run, about 2 minutes for the 9 targets). Exits non-zero if a target does not
# build, or finds a crash, a leak, a timeout or a failed assertion; the failing input is saved
# under <target dir>/artifacts/<target>/ and its log is printed.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Environment:
#   FUZZ_TARGETS     targets to run (default: all of `fuzz/fuzz_targets/*.rs`)
#   FUZZ_JOBS        how many targets run at once (default: the number of CPUs, at most 2)
#   FUZZ_TARGET_DIR  build directory (default: target/fuzz, apart from the normal build); each
#                    target's corpus (kept between runs) is in corpus/<target> under it
#   FUZZ_ARGS        extra libFuzzer arguments, e.g. "-max_len=8192 -dict=FILE"
#   FUZZ_PROFILE     `fuzz` (default, quicker to build) or `release` (cargo-fuzz's build)
#
# This builds with plain `cargo +nightly` and the RUSTFLAGS cargo-fuzz passes, so CI needs no
# cargo-fuzz. The `fuzz` profile (fuzz/Cargo.toml) optimises only what the targets run: it builds
# in ~60 % of the time of cargo-fuzz's release profile, which runs 2-4 times more executions per
# second (FUZZ_PROFILE=release, for long runs).
#
# A developer with cargo-fuzz (`cargo install cargo-fuzz`) runs one target from the repository
# root (`cargo fuzz list`: frame, frame_len, http_head, stun, client_info, session, websocket,
# admission_response, acme_objects), new inputs going to the first corpus directory (fuzz/corpus/, ignored by
# git), never to the seeds:
#   cargo +nightly-2026-05-19 fuzz run frame                 # from fuzz/corpus/frame alone
#   mkdir -p fuzz/corpus/frame
#   cargo +nightly-2026-05-19 fuzz run frame fuzz/corpus/frame fuzz/seeds/frame \
#     -- -max_total_time=300
# and replays a saved crash with `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...`; with
# this script's build: target/fuzz/<host triple>/fuzz/TARGET target/fuzz/artifacts/TARGET/crash-...
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
# shellcheck source=scripts/cross-env.sh
source scripts/cross-env.sh # DERPD_NIGHTLY, _need_pkgs

secs=${1:-20}
[[ $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || {
  echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
  exit 2
}
say() { echo "fuzz: $*" >&2; }

# The pinned nightly (-Z sanitizer) and a C++ compiler (libfuzzer-sys builds libFuzzer).
if ! rustup run "$DERPD_NIGHTLY" rustc --version >/dev/null 2>&1; then
  say "installing $DERPD_NIGHTLY"
  rustup toolchain install "$DERPD_NIGHTLY" --profile minimal
fi
command -v c++ >/dev/null || _need_pkgs g++

out=$(realpath -m "${FUZZ_TARGET_DIR:-$root/target/fuzz}")
host=$(rustup run "$DERPD_NIGHTLY" rustc -vV | sed -n 's/^host: //p')
if [[ -n "${FUZZ_TARGETS:-}" ]]; then
  read -ra targets <<<"$FUZZ_TARGETS"
else
  targets=()
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
jobs=${FUZZ_JOBS:-$(nproc)}
((jobs > 2)) && jobs=2
((jobs < 1)) && jobs=1

# cargo-fuzz's flags (src/project.rs), less -Clink-dead-code and one codegen unit. --target keeps
# them off build scripts and proc macros.
flags=(-Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  --cfg fuzzing
  -Zsanitizer=address)
profile=${FUZZ_PROFILE:-fuzz}
case "$profile" in
  fuzz) ;; # debug assertions and overflow checks come with the profile
  release) flags+=(-Cdebug-assertions -Coverflow-checks -Ccodegen-units=1) ;;
  *) say "FUZZ_PROFILE must be fuzz or release"; exit 2 ;;
esac
# fuzz/Cargo.lock pins derpd's dependencies too: a dependency added to derpd needs it updated.
if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
  say "fuzz/Cargo.lock is out of date with Cargo.toml: run" \
    "'cargo metadata --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null' and commit it"
  exit 1
fi
build_start=$(date +%s)
say "building ${targets[*]} ($DERPD_NIGHTLY, $host, profile $profile) in $out"
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
RUSTFLAGS="${flags[*]} ${RUSTFLAGS:-}" CARGO_TARGET_DIR="$out" \
  cargo "+$DERPD_NIGHTLY" build --locked --manifest-path fuzz/Cargo.toml --profile "$profile" \
  --target "$host" "${bins[@]}"
say "built in $(($(date +%s) - build_start)) s"

export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"
mkdir -p "$out/logs"

# Runs one target; its output goes to logs/<target>.log.
run_one() {
  local t=$1 corpus="$out/corpus/$1" art="$out/artifacts/$1/" max_len=4096
  mkdir -p "$corpus" "$art"
  # A request head may be up to http::MAX_HEAD_LEN (16 KiB); let inputs grow past it.
  [[ $t == http_head ]] && max_len=20000
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of arguments
  "$out/$host/$profile/$t" -max_total_time="$secs" -timeout=10 -max_len="$max_len" \
    -print_final_stats=1 -artifact_prefix="$art" ${FUZZ_ARGS:-} \
    "$corpus" "fuzz/seeds/$t" >"$out/logs/$t.log" 2>&1
}

# Prints a target's result line: executions, coverage, corpus; the log's end if it failed.
report() {
  local t=$1 rc=$2 log="$out/logs/$1.log" last done
  last=$(grep -E '^#[0-9]+' "$log" | tail -n1 || true)
  if ((rc == 0)); then
    done=$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$log" || true)
    say "$t: ok: ${last:-no status line} ($done)"
  else
    say "$t: FAILED (exit $rc); the end of $log:"
    tail -n 60 "$log" >&2
    ls "$out/artifacts/$t/" >&2
  fi
}

failed=()
pids=() names=()
for t in "${targets[@]}"; do
  [[ -x "$out/$host/$profile/$t" ]] || { say "$t: no binary"; failed+=("$t"); continue; }
  say "$t: running for $secs s"
  run_one "$t" & pids+=($!) names+=("$t")
  if ((${#pids[@]} >= jobs)); then
    rc=0; wait "${pids[0]}" || rc=$?
    report "${names[0]}" "$rc"; ((rc == 0)) || failed+=("${names[0]}")
    pids=("${pids[@]:1}") names=("${names[@]:1}")
  fi
done
for i in "${!pids[@]}"; do
  rc=0; wait "${pids[$i]}" || rc=$?
  report "${names[$i]}" "$rc"; ((rc == 0)) || failed+=("${names[$i]}")
done

if ((${#failed[@]})); then
  say "FAILED: ${failed[*]} ($(($(date +%s) - build_start)) s)"
  exit 1
fi
say "all ${#targets[@]} targets passed ${secs} s each ($(($(date +%s) - build_start)) s in all)"
