#!/usr/bin/env bash
# Where the bytes of a release binary go, by crate: builds TARGET's release binary (as
# build-release.sh does) without
# stripping (into target/size-by-crate, so dist/ and the normal release build are untouched) and
# sums the sizes of its code and data symbols by the crate their demangled name starts with.
# Symbol attribution after LTO is approximate (inlined code counts where it landed); use it to
# price a new dependency by comparing the table before and after adding it.
#
#   scripts/size-by-crate.sh mipsel-unknown-linux-musl [N rows, default 25]
set -euo pipefail
cd "$(dirname "$0")/.."
t=${1:-mipsel-unknown-linux-musl} rows=${2:-25}
# shellcheck source=scripts/cross-env.sh
source scripts/cross-env.sh
cross_setup "$t"
dir=target/size-by-crate
CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=false CARGO_TARGET_DIR=$dir \
  "${CARGO_CMD[@]}" build --release --locked "${TARGET_ARGS[@]}" "${RELEASE_ARGS[@]}" >&2
bin=$dir/$t/release/derpd
total=$(stat -c %s "$bin")
text=$(size -A "$bin" | awk '$1 == ".text" { print $2 }')
echo "$t: unstripped $total B, .text $text B; symbol bytes by crate (top $rows):"
nm -S -t d -C --size-sort "$bin" | awk '
  NF >= 4 && $3 ~ /^[tTrRdDbB]$/ {
    size = $2 + 0
    name = $4; for (i = 5; i <= NF; i++) name = name " " $i
    sub(/^<+/, "", name); sub(/^&/, "", name); sub(/^(dyn |impl |mut )+/, "", name)
    crate = "[C, or no crate path]"
    if (index(name, "::") > 0) {
      crate = substr(name, 1, index(name, "::") - 1)
      sub(/ .*/, "", crate)
      # <bool as core::fmt::Debug>::fmt and the like: impls on primitives live in core
      if (crate ~ /^(bool|char|str|[iu](8|16|32|64|128|size)|f32|f64|\[.*|\(.*)$/) crate = "core"
    }
    sum[crate] += size; all += size
  }
  END {
    for (c in sum) printf "%10d  %5.1f%%  %s\n", sum[c], 100 * sum[c] / all, c
    printf "%10d  100.0%%  (all sized symbols)\n", all > "/dev/stderr"
  }' | sort -rn | head -n "$rows"
