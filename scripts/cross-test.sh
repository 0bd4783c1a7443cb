#!/usr/bin/env bash
# Runs the whole test suite (`cargo test --locked`: unit, integration and Go interop tests) for
# TARGET under qemu-user, on a Debian/Ubuntu host without Docker. Installs what is missing the
# first time (see scripts/cross-env.sh); later runs reuse target/. Extra arguments go to
# `cargo test`. The interop tests run the cross-built derpd under QEMU and Tailscale's client
# natively on the host, over TLS with the pinned certificate.
#
#   scripts/cross-test.sh mipsel-unknown-linux-musl
#   scripts/cross-test.sh aarch64-unknown-linux-musl -- --test-threads=1
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 TARGET [cargo test args]" >&2; exit 2; }
target=$1; shift
# shellcheck source=scripts/cross-env.sh
source scripts/cross-env.sh
cross_setup "$target"
PATH="$(scripts/ensure-go.sh):$PATH" # for the interop tests
# Each test binary runs under a watchdog (a time limit, a report and one rerun if it hangs).
if [[ -n "$QEMU" ]]; then
  up=$(echo "$target" | tr 'a-z-' 'A-Z_')
  export "CARGO_TARGET_${up}_RUNNER=$PWD/scripts/qemu-watchdog.sh $QEMU"
fi

# Property tests run 256 cases each on the host; under QEMU 32 each, with the same code paths
# (they are about endianness and word size here, which 32 cases exercise), to keep CI short.
export PROPTEST_CASES=${PROPTEST_CASES:-32}
start=$(date +%s)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "cross-test: ${CARGO_CMD[*]} test --locked ${TARGET_ARGS[*]} $* (runner: ${QEMU:-native})"
set +e
"${CARGO_CMD[@]}" test --locked "${TARGET_ARGS[@]}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# Sum libtest's "test result:" lines.
read -r passed failed ignored suites < <(awk '/^test result:/ {
  for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i;
  if ($(i+1) ~ /^ignored/) g += $i } n++ } END { print p+0, f+0, g+0, n+0 }' "$log")
echo "cross-test: $target: $passed passed, $failed failed, $ignored ignored in $suites test binaries;" \
  "$(($(date +%s) - start)) s; exit $rc"
hangs=$(grep -c "^HANG: .* still running" "$log" || true)
if ((hangs > 0)); then
  echo "cross-test: $hangs test binary runs HUNG and were killed, then run once more (see HANG above)"
fi
if grep -q "^SKIPPED" "$log"; then
  echo "cross-test: some tests were SKIPPED (see above)"
fi
exit "$rc"
