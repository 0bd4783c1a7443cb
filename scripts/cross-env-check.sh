#!/usr/bin/env bash
# The cross scripts' installation on a machine that has never seen it. In a fresh Debian 12 root
# (debootstrap --variant=minbase, nothing more), for every router target, scripts/cross-env.sh's
# `cross_setup TARGET` runs as cross-test.sh and build-release.sh run it: it installs the Debian
# packages `cross_pkgs TARGET` names (--no-install-recommends) and, for armv7 and MIPS, builds
# the musl sysroot with build-musl-sysroot.sh. Then, with the CC_/AR_/CFLAGS_ settings it
# exported, ring's own build script runs as cargo runs it for `cargo build --release --target
# TARGET` (ring at opt-level 2): the cc crate compiles ring's C and assembly with the target's
# compiler into libring_core_*.a. For the musl-gcc targets a static C program is also linked
# against the sysroot and run under the target's QEMU; the tools the other scripts call (QEMU,
# readelf, xz, curl, python3's zipfile for ensure-go.sh) must be there.
#
# rustup is no Debian package: the host's toolchains (the targets, the pinned nightly with
# rust-src, installed here first if missing) are bind-mounted read-only. ring's build script is
# the one cargo built for the host (Debian 12 too, so it runs in the root). Every target is tried;
# the check fails if one failed, with the compiler's error. Run as root (debootstrap,
# systemd-nspawn); needs the network for apt (about 300 MB of packages). The untouched debootstrap
# result is kept in target/cross-env-check/base and copied to target/cross-env-check/root for
# each run; that copy is removed when the check passes.
#
#   scripts/cross-env-check.sh [TARGET...]     # default: the five targets of cross-env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || {
  echo "cross-env-check: needs root (debootstrap, systemd-nspawn)" >&2
  exit 1
}
# shellcheck source=scripts/cross-env.sh
source scripts/cross-env.sh
# shellcheck source=scripts/debian-root.sh
source scripts/debian-root.sh
say() { echo "cross-env-check: $*"; }
start=$(date +%s)
targets=("$@")
((${#targets[@]})) || targets=("${DERPD_TARGETS[@]}")
work=$PWD/target/cross-env-check

debian_host_tools
for t in "${targets[@]}"; do cross_rust "$t"; done

# ring's source and its build script, built for the host by cargo (a no-op after `cargo test`).
ring=$(sed -n '/^name = "ring"$/{n;s/^version = "\(.*\)"/\1/p}' Cargo.lock)
build_script=$(cargo build --locked -p "ring@$ring" --message-format=json 2>/dev/null |
  grep -F "#ring@$ring\"" | grep -o '"filenames":\["[^"]*/build-script-build"' |
  sed 's/.*\["//;s/"$//' | head -1)
[[ -x "$build_script" ]] || {
  echo "cross-env-check: cargo built no build script for ring $ring" >&2
  exit 1
}
ring_srcs=("${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"ring-$ring")
ring_src=${ring_srcs[0]}
links=$(sed -n 's/^links = "\(.*\)"/\1/p' "$ring_src/Cargo.toml")
host=$(rustc -vV | sed -n 's/^host: //p')

mkdir -p "$work"
debian_root "$work/base" "$work/debootstrap.log"
root=$work/root
rm -rf "$root"
cp -a "$work/base" "$root" # about 1.9 GB once installed; kept if the check fails
mkdir -p "$root/derpd"
cp -r scripts "$root/derpd/"
cp -r "$ring_src" "$root/ring"
cp "$build_script" "$root/ring-build-script"

# Runs in the root: one target per subshell, so that nothing one cross_setup exported leaks.
cat >"$root/derpd/check.sh" <<'EOF'
set -uo pipefail
source /derpd/scripts/cross-env.sh
ring_ver=$1 links=$2 host=$3
shift 3

check() {
  local t=$1 up low rustc=(rustc) line key val cfg=() rustflags encoded var
  up=$(tr 'a-z-' 'A-Z_' <<<"$t") low=${t//-/_}
  SECONDS=0
  cross_setup "$t" || return
  echo "cross_setup $t: $SECONDS s"
  SECONDS=0
  var=CARGO_TARGET_${up}_RUSTFLAGS
  rustflags=${!var:-}
  [[ "${CARGO_CMD[1]:-}" == +* ]] && rustc+=("${CARGO_CMD[1]}")
  # cargo's CARGO_CFG_* for the build script: rustc's cfg for the target, values comma-joined.
  declare -A cfgs=()
  # shellcheck disable=SC2086 # the rustflags are words
  while read -r line; do
    key=CARGO_CFG_$(tr 'a-z' 'A-Z' <<<"${line%%=*}") val=
    [[ "$line" == *=* ]] && val=${line#*=} && val=${val#\"} && val=${val%\"}
    cfgs[$key]=${cfgs[$key]:+${cfgs[$key]},}$val
  done < <("${rustc[@]}" --print cfg --target "$t" -C opt-level=2 $rustflags)
  for key in "${!cfgs[@]}"; do cfg+=("$key=${cfgs[$key]}"); done
  encoded=$(tr ' ' '\037' <<<"$rustflags")
  local out=/tmp/ring-$t
  rm -rf "$out" && mkdir -p "$out"
  IFS=. read -r major minor patch <<<"$ring_ver"
  echo "ring's build script for $t: CC=$(var=CC_$low && echo "${!var}") CFLAGS=$(var=CFLAGS_$low && echo "${!var:-}")"
  if ! env "${cfg[@]}" TARGET="$t" HOST="$host" OUT_DIR="$out" CARGO_MANIFEST_DIR=/ring \
    CARGO_PKG_NAME=ring CARGO_PKG_VERSION_MAJOR="$major" CARGO_PKG_VERSION_MINOR="$minor" \
    CARGO_PKG_VERSION_PATCH="$patch" CARGO_PKG_VERSION_PRE= CARGO_MANIFEST_LINKS="$links" \
    OPT_LEVEL=2 DEBUG=false PROFILE=release NUM_JOBS="$(nproc)" CARGO_ENCODED_RUSTFLAGS="$encoded" \
    /ring-build-script >"$out.log" 2>&1; then
    grep -m5 -E 'error|No such file|not found' "$out.log" || tail -20 "$out.log"
    return 1
  fi
  local lib=$out/lib$links.a
  [[ -s "$lib" ]] || { echo "no $lib"; return 1; }
  var=AR_$low
  echo "ring for $t: $("${!var}" t "$lib" | wc -l) objects in $(basename "$lib"), $SECONDS s"

  for var in readelf xz curl; do
    command -v "$var" >/dev/null || { echo "$var is missing"; return 1; }
  done
  python3 -c 'import zipfile, zlib' || return 1
  [[ -s /etc/ssl/certs/ca-certificates.crt ]] || { echo "no CA certificates"; return 1; }
  if [[ -n "$QEMU" ]]; then
    "$QEMU" --version | head -1 || return 1
  fi
  var=CARGO_TARGET_${up}_LINKER
  local linker=${!var:-}
  if [[ "$linker" == */musl-gcc ]]; then
    # The sysroot links a static program, and it runs under QEMU.
    printf '#include <stdio.h>\nint main(void) { puts("hello from musl"); return 0; }\n' >"$out/hello.c"
    var=CFLAGS_$low
    # shellcheck disable=SC2086 # the flags are words
    "$linker" ${!var} -static "$out/hello.c" -o "$out/hello" || return 1
    "$QEMU" "$out/hello" || return 1
  fi
}

failed=()
for t in "$@"; do
  echo "=== $t"
  if (check "$t"); then echo "=== $t: ok"; else echo "=== $t: FAILED"; failed+=("$t"); fi
done
echo "CPU time (user, system) of this shell, then of the commands it ran:"
times
((${#failed[@]} == 0)) || { echo "failed: ${failed[*]}"; exit 1; }
EOF

rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_bin=$(dirname "$(command -v rustup)")
say "fresh root ready after $(($(date +%s) - start)) s"
say "cross_setup and ring's C (ring $ring) for ${targets[*]} in a fresh Debian 12 root"
set +e
"${DEBIAN_NSPAWN[@]}" -D "$root" --bind-ro="$rustup_home" --bind-ro="$cargo_bin" \
  --setenv=RUSTUP_HOME="$rustup_home" --setenv=CARGO_HOME="$(dirname "$cargo_bin")" \
  --setenv=RUSTUP_AUTO_INSTALL=0 --setenv=PATH="$cargo_bin:/usr/sbin:/usr/bin:/sbin:/bin" \
  bash /derpd/check.sh "$ring" "$links" "$host" "${targets[@]}"
rc=$?
set -e
if ((rc)); then
  say "FAILED (exit $rc) after $(($(date +%s) - start)) s"
  exit "$rc"
fi
rm -rf "$root"
say "ok: ${targets[*]} in $(($(date +%s) - start)) s"
