#!/usr/bin/env bash
# Builds stripped, static release binaries as dist/derpd-<target-triple>, writes dist/SHA256SUMS
# and prints a size report. Each binary is checked: static (no ELF interpreter); run under QEMU,
# `--version` reports the Cargo version and the expected architecture and byte order; and the Go
# interop tests (Tailscale's client on the host) pass against it under QEMU.
# Fails when the mipsel binary is larger than the budget: the 2.0 MiB goal plus 64 KiB.
#
#   scripts/build-release.sh                              # all five targets
#   scripts/build-release.sh mipsel-unknown-linux-musl    # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cross-env.sh
source scripts/cross-env.sh
targets=("$@")
((${#targets[@]})) || targets=("${DERPD_TARGETS[@]}")
goal=$((2 * 1024 * 1024)) budget=$((2 * 1024 * 1024 + 64 * 1024))
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
mkdir -p dist
PATH="$(scripts/ensure-go.sh):$PATH" # for the interop tests

for t in "${targets[@]}"; do
  start=$(date +%s)
  cross_setup "$t"
  echo "build-release: ${CARGO_CMD[*]} build --release --locked ${TARGET_ARGS[*]} ${RELEASE_ARGS[*]}"
  "${CARGO_CMD[@]}" build --release --locked "${TARGET_ARGS[@]}" "${RELEASE_ARGS[@]}"
  out="dist/derpd-$t"
  cp "target/$t/release/derpd" "$out"
  if readelf -lW "$out" | grep -q "INTERP"; then
    echo "build-release: $out is dynamically linked" >&2
    exit 1
  fi
  got=$(${QEMU:+"$QEMU"} "$out" --version)
  want="derpd $version ($ARCH_DESC)"
  if [[ "$got" != "$want" ]]; then
    echo "build-release: $out --version said '$got', want '$want'" >&2
    exit 1
  fi
  # The shipped binary itself, under QEMU, against Tailscale's client: the Go interop and mesh tests
  # (built for the host) run this file instead of the debug build.
  echo "build-release: interop tests against $out${QEMU:+ under $QEMU}"
  DERPD_TEST_BIN="$PWD/$out" cargo test --locked --test interop -q
  echo "build-release: $out ok in $(($(date +%s) - start)) s: $got"
done

(cd dist && sha256sum derpd-*-linux-* >SHA256SUMS)

echo
echo "| target | stripped size | gzip -9 | xz -9e |"
echo "|---|---:|---:|---:|"
fail=0
for t in "${targets[@]}"; do
  f=dist/derpd-$t
  size=$(stat -c %s "$f")
  gz=$(gzip -9c "$f" | wc -c)
  xz=$(xz -9e -c "$f" | wc -c)
  printf '| %s | %s B (%s MiB) | %s B | %s B |\n' "$t" "$size" \
    "$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')" "$gz" "$xz"
  if [[ "$t" == mipsel-* ]]; then
    mipsel=$size
    ((size <= budget)) || fail=1
  fi
done
echo
if [[ -n "${mipsel:-}" ]]; then
  echo "size check: mipsel $mipsel B; budget $budget B (goal + 64 KiB), goal $goal B (2.0 MiB):" \
    "$( ((mipsel <= goal)) && echo "within the goal" || echo "over the goal by $((mipsel - goal)) B")"
  if ((fail)); then
    echo "size check: FAILED, mipsel is over the budget (2.0 MiB + 64 KiB)" >&2
    exit 1
  fi
fi
