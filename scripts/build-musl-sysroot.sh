#!/usr/bin/env bash
# Builds a musl sysroot and LLVM libunwind for one of the targets Debian has no musl for:
#   mipsel | mips  - o32, mips32r2, soft float (Rust's mips{,el}-unknown-linux-musl,
#                    OpenWrt's mipsel_24kc / mips_24kc)
#   armhf          - armv7-a, VFPv3-D16, hard float (Rust's armv7-unknown-linux-musleabihf)
# into OUT/sysroot and OUT/unwind (libunwind.a). musl is Debian bookworm's source package
# (1.2.3), fetched with apt-get source through a private source list (/etc/apt is not touched);
# libunwind is built from the nightly toolchain's rust-src, as Rust's own musl targets ship it
# (Debian's libgcc_eh.a is built for glibc and needs _dl_find_object).
#
# Usage: build-musl-sysroot.sh ARCH OUT NIGHTLY
# Needs gcc/g++ for the arch, dpkg-dev, and rust-src in NIGHTLY; scripts/cross-env.sh installs them.
# Writes OUT/.done last; when it exists the script does nothing.
set -euo pipefail
arch=$1 out=$2 nightly=$3
[[ -f "$out/.done" ]] && { echo "build-musl-sysroot: $out is ready"; exit 0; }

case "$arch" in
  mipsel) cc=mipsel-linux-gnu; flags="-msoft-float -march=mips32r2" ;;
  mips) cc=mips-linux-gnu; flags="-msoft-float -march=mips32r2" ;;
  armhf) cc=arm-linux-gnueabihf; flags="-march=armv7-a -mfpu=vfpv3-d16 -mfloat-abi=hard" ;;
  *) echo "build-musl-sysroot: unknown arch '$arch' (mipsel, mips, armhf)" >&2; exit 2 ;;
esac
jobs=$(nproc)
echo "build-musl-sysroot: building musl and libunwind for $arch into $out"
rm -rf "$out"
mkdir -p "$out/apt/lists/partial" "$out/src"
out=$(cd "$out" && pwd) # apt reads relative Dir:: paths against /var/lib/apt

# Debian's musl source, from the same mirror apt already uses.
mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
  /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}' || true)
mirror=${mirror:-http://deb.debian.org/debian}
echo "deb-src ${mirror%/} bookworm main" >"$out/apt/sources.list"
apt=(-o "Dir::Etc::SourceList=$out/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$out/apt/lists" -o Debug::NoLocking=1)
apt-get "${apt[@]}" update -qq
(cd "$out/src" && apt-get "${apt[@]}" source -qq musl=1.2.3-1 >/dev/null)
musl=$(ls -d "$out"/src/musl-*/ | head -1)

sysroot="$out/sysroot" build="$out/build-musl"
mkdir -p "$build"
(
  cd "$build"
  CROSS_COMPILE=$cc- CC=$cc-gcc CFLAGS="$flags -Os" \
    "$musl/configure" --prefix="$sysroot" --target="$cc" --syslibdir="$sysroot/lib" >configure.log
  make -j"$jobs" >make.log 2>&1
  make install >install.log 2>&1
)

# LLVM libunwind, as rust's own musl std is linked with it.
src=$(rustc +"$nightly" --print sysroot)/lib/rustlib/src/rust/src/llvm-project/libunwind
[[ -d "$src/src" ]] || { echo "build-musl-sysroot: no libunwind in $nightly's rust-src ($src)" >&2; exit 1; }
unwind="$out/unwind"
mkdir -p "$unwind"
uflags=($flags -Os -fstrict-aliasing -funwind-tables -fvisibility=hidden
  -D_LIBUNWIND_DISABLE_VISIBILITY_ANNOTATIONS -D_LIBUNWIND_IS_NATIVE_ONLY -I"$src/include")
for s in Unwind-sjlj.c UnwindLevel1-gcc-ext.c UnwindLevel1.c UnwindRegistersRestore.S UnwindRegistersSave.S; do
  REALGCC=$cc-gcc "$sysroot/bin/musl-gcc" -std=c99 "${uflags[@]}" -c "$src/src/$s" -o "$unwind/${s%.*}.o"
done
for s in Unwind-EHABI.cpp Unwind-seh.cpp libunwind.cpp; do
  REALGCC=$cc-g++ "$sysroot/bin/musl-gcc" -x c++ -std=c++11 -nostdinc++ -fno-exceptions -fno-rtti \
    "${uflags[@]}" -c "$src/src/$s" -o "$unwind/${s%.*}.o"
done
"$cc-ar" rcs "$unwind/libunwind.a" "$unwind"/*.o

rm -rf "$out/src" "$out/apt" "$build"
touch "$out/.done"
echo "build-musl-sysroot: $arch done"
