# shellcheck shell=bash
# Sourced by cross-test.sh and build-release.sh: `cross_setup TARGET` installs what TARGET needs
# (the Debian packages `cross_pkgs TARGET` prints, rustup target or the pinned nightly with
# rust-src, the musl sysroot for the tier-3 and armv7 targets) and exports the cargo environment
# for it. scripts/cross-env-check.sh runs it in a fresh Debian 12 root. It sets:
#   CARGO_CMD      cargo with its toolchain, e.g. (cargo +nightly-2026-05-19)
#   TARGET_ARGS    (--target T [-Z build-std=std,panic_abort])
#   QEMU           the qemu-user runner ("" for x86_64)
#   ARCH_DESC      what `derpd --version` says of the target, e.g. "linux/mips, 32-bit, big-endian"
#   RELEASE_ARGS   extra `cargo build --release` arguments: for build-std targets, std without
#                  backtrace symbolization and with optimize_for_size (-15 % on mipsel)
# and exports CARGO_TARGET_<T>_{LINKER,RUNNER,RUSTFLAGS}, CC_/AR_/CFLAGS_<t> for ring's C code, and
# DERPD_TEST_RUNNER (tests/support/derpd.rs runs the derpd binary through it).
#
# Targets: x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf
#          mipsel-unknown-linux-musl mips-unknown-linux-musl
# aarch64 and x86_64 use stable and rustup's musl std. armv7 (its musl std is not on this
# machine's rustup mirror) and the tier-3 MIPS targets use the pinned nightly with build-std
# against a musl sysroot built once into target/cross/<arch> (scripts/build-musl-sysroot.sh).

DERPD_NIGHTLY=nightly-2026-05-19
DERPD_TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf
  mipsel-unknown-linux-musl mips-unknown-linux-musl)
_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

_say() { echo "cross-env: $*" >&2; }

_as_root() {
  if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi
}

# Installs the Debian packages that are missing (one apt-get update per shell).
_need_pkgs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  _say "installing ${missing[*]}"
  if [[ -z "${_apt_updated:-}" ]]; then
    _as_root apt-get update -qq
    _apt_updated=1
  fi
  _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
}

# The Debian packages the scripts need for TARGET, one per line, on top of a minimal Debian 12
# (debootstrap --variant=minbase) with rustup. apt-get runs with --no-install-recommends, so a
# package that another one only recommends must be named here. scripts/cross-env-check.sh
# proves the lists in a fresh root.
cross_pkgs() {
  # Every target: the host's C compiler and glibc headers (cargo links build scripts with cc;
  # ring's C for x86_64 is built with gcc), readelf (build-release.sh's static check), xz
  # (its size report), and what scripts/ensure-go.sh uses to fetch Go: curl with the CA
  # certificates, python3's zipfile to unpack it.
  printf '%s\n' gcc libc6-dev binutils xz-utils curl ca-certificates python3
  case "$1" in
    x86_64-unknown-linux-musl) ;;
    aarch64-unknown-linux-musl)
      # ring's C is built against the glibc cross headers (gcc-aarch64-linux-gnu only
      # recommends them).
      printf '%s\n' gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu libc6-dev-arm64-cross \
        qemu-user-static
      ;;
    armv7-unknown-linux-musleabihf | mipsel-unknown-linux-musl | mips-unknown-linux-musl)
      local gcc
      case "$1" in
        armv7-*) gcc=arm-linux-gnueabihf ;;
        mipsel-*) gcc=mipsel-linux-gnu ;;
        mips-*) gcc=mips-linux-gnu ;;
      esac
      # build-musl-sysroot.sh: gcc and g++ (libunwind) for the arch, `apt-get source` (dpkg-dev)
      # and make for musl. ring's C then uses the sysroot's headers, not glibc's.
      printf '%s\n' "gcc-$gcc" "g++-$gcc" "binutils-$gcc" qemu-user-static dpkg-dev make
      ;;
    *)
      _say "unknown target '$1'; known: ${DERPD_TARGETS[*]}"
      return 2
      ;;
  esac
}

_need_stable_target() {
  if ! rustup target list --installed | grep -qx "$1"; then
    _say "rustup target add $1"
    rustup target add "$1"
  fi
}

_need_nightly() {
  if ! rustup run "$DERPD_NIGHTLY" rustc --version >/dev/null 2>&1 ||
    [[ ! -d "$(rustup run "$DERPD_NIGHTLY" rustc --print sysroot)/lib/rustlib/src/rust/library" ]]; then
    _say "installing $DERPD_NIGHTLY with rust-src"
    rustup toolchain install "$DERPD_NIGHTLY" --profile minimal --component rust-src
  fi
}

# The rustup side of TARGET (not Debian packages): rustup's target for stable, or the pinned
# nightly with rust-src for build-std.
cross_rust() {
  case "$1" in
    x86_64-unknown-linux-musl | aarch64-unknown-linux-musl) _need_stable_target "$1" ;;
    *) _need_nightly ;;
  esac
}

cross_setup() {
  local t=$1 up low gcc arch cflags pkgs
  pkgs=$(cross_pkgs "$t") || return
  # shellcheck disable=SC2086 # one package per word
  _need_pkgs $pkgs
  cross_rust "$t"
  up=$(tr 'a-z-' 'A-Z_' <<<"$t")
  low=${t//-/_}
  TARGET_ARGS=(--target "$t")
  RELEASE_ARGS=()
  case "$t" in
    x86_64-unknown-linux-musl)
      CARGO_CMD=(cargo)
      QEMU="" ARCH_DESC="linux/x86_64, 64-bit, little-endian"
      # ring's C code against glibc headers is fine; rustup's musl std is self-contained.
      export "CC_$low=gcc" "AR_$low=ar"
      ;;
    aarch64-unknown-linux-musl)
      CARGO_CMD=(cargo)
      QEMU=qemu-aarch64-static ARCH_DESC="linux/aarch64, 64-bit, little-endian"
      export "CARGO_TARGET_${up}_LINKER=rust-lld"
      export "CC_$low=aarch64-linux-gnu-gcc" "AR_$low=aarch64-linux-gnu-ar"
      # As OpenWrt builds it: no calls into libgcc's outline atomics from C.
      export "CFLAGS_$low=-mno-outline-atomics"
      ;;
    armv7-unknown-linux-musleabihf | mipsel-unknown-linux-musl | mips-unknown-linux-musl)
      case "$t" in
        armv7-*) gcc=arm-linux-gnueabihf arch=armhf QEMU=qemu-arm-static
          ARCH_DESC="linux/arm, 32-bit, little-endian"
          cflags="-march=armv7-a -mfpu=vfpv3-d16 -mfloat-abi=hard" ;;
        mipsel-*) gcc=mipsel-linux-gnu arch=mipsel QEMU=qemu-mipsel-static
          ARCH_DESC="linux/mips, 32-bit, little-endian"
          cflags="-msoft-float -march=mips32r2" ;;
        mips-*) gcc=mips-linux-gnu arch=mips QEMU=qemu-mips-static
          ARCH_DESC="linux/mips, 32-bit, big-endian"
          cflags="-msoft-float -march=mips32r2" ;;
      esac
      local out="$_root/target/cross/$arch"
      "$_root/scripts/build-musl-sysroot.sh" "$arch" "$out" "$DERPD_NIGHTLY" >&2
      CARGO_CMD=(cargo "+$DERPD_NIGHTLY")
      TARGET_ARGS+=(-Z build-std=std,panic_abort)
      # Release std: no "backtrace" (gimli/addr2line/rustc-demangle, useless in a stripped
      # binary) and no "panic-unwind" (panic=abort); tests keep the default features.
      # No unwind tables in release builds (panic=abort: nothing unwinds, and std has no
      # backtrace symbolization): .eh_frame was 7 % of the mipsel binary. Tests keep them.
      RELEASE_ARGS=(-Z build-std-features=optimize_for_size -Z profile-rustflags
        --config 'profile.release.rustflags=["-Cforce-unwind-tables=no"]')
      export "CARGO_TARGET_${up}_LINKER=$out/sysroot/bin/musl-gcc"
      # Static, against our sysroot's crt files (build-std has no self-contained ones), with
      # LLVM libunwind for std's unwinder.
      local rustflags="-C target-feature=+crt-static -C link-self-contained=no -L $out/unwind"
      # MIPS: rustix has no linux_raw backend there (on stable, and none at all for big-endian
      # MIPS), so it calls musl through the libc crate, whose musl types have a 32-bit time_t,
      # and passed its own 64-bit timespec by pointer (timerfd_settime, ppoll). polling's
      # timerfd was armed with garbage (disarmed in release builds) and async-io's timers never
      # fired on a MIPS kernel unless other I/O woke the reactor. rustix's fix_y2038 path (the
      # one it takes on 32-bit glibc) converts field by field and is right on both byte orders;
      # a 64-bit libc time_t (--cfg=libc_unstable_musl_v1_2) fixed mipsel only, as musl puts
      # the padding before tv_nsec on big-endian. tests/in_process/platform.rs checks it.
      case "$t" in mips*) rustflags+=" --cfg=fix_y2038" ;; esac
      export "CARGO_TARGET_${up}_RUSTFLAGS=$rustflags"
      export "CC_$low=$out/sysroot/bin/musl-gcc" "AR_$low=$gcc-ar" "CFLAGS_$low=$cflags"
      ;;
    *)
      _say "unknown target '$t'; known: ${DERPD_TARGETS[*]}"
      return 2
      ;;
  esac
  if [[ -n "$QEMU" ]]; then
    export "CARGO_TARGET_${up}_RUNNER=$QEMU" "DERPD_TEST_RUNNER=$QEMU"
  else
    unset DERPD_TEST_RUNNER
  fi
}
