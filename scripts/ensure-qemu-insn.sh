#!/usr/bin/env bash
# The guest-instruction counter for router builds under QEMU (issue 21): prints the path of
# the TCG plugin bench/qemu-insn.c, built into target/qemu-insn/ (cached), after making sure
# Debian's dynamic qemu-user is installed (qemu-{mipsel,mips,arm,aarch64}; the -static ones the
# tests run under are built without plugin support).
#
# Debian ships no qemu-plugin.h: it is taken from Debian's QEMU source package, the version of
# the installed qemu-user (fetched with apt-get source through a private source list, as
# scripts/build-musl-sysroot.sh fetches musl; /etc/apt is not touched), and only that header is
# unpacked.
#
#   scripts/ensure-qemu-insn.sh    # -> .../target/qemu-insn/libqemu-insn.so
set -euo pipefail
cd "$(dirname "$0")/.."
out=$PWD/target/qemu-insn
so=$out/libqemu-insn.so
say() { echo "ensure-qemu-insn: $*" >&2; }

if [[ ! -x /usr/bin/qemu-mipsel ]]; then
  say "installing Debian's qemu-user (dynamic, with TCG plugin support)"
  # Without recommends: qemu-user-binfmt would conflict with qemu-user-static's.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user >&2
fi

header=$out/include/qemu-plugin.h
if [[ ! -f $header ]]; then
  version=$(dpkg-query -W -f='${source:Version}' qemu-user)
  say "fetching qemu-plugin.h from Debian's qemu $version source package"
  work=$out/src
  rm -rf "$work"
  mkdir -p "$work/apt/lists/partial" "$out/include"
  mirror=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  {
    echo "deb-src ${mirror%/} bookworm main"
    echo "deb-src ${mirror%/} bookworm-updates main"
  } >"$work/apt/sources.list"
  apt=(-o "Dir::Etc::SourceList=$work/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::State::Lists=$work/apt/lists" -o Debug::NoLocking=1)
  apt-get "${apt[@]}" update -qq
  # The installed version if the mirror still has it, else bookworm's (7.2.x alike: the plugin
  # API of the 7.2 series did not change).
  (cd "$work" && { apt-get "${apt[@]}" source -qq --download-only "qemu=$version" 2>/dev/null ||
    apt-get "${apt[@]}" source -qq --download-only qemu; } >/dev/null)
  orig=$(ls "$work"/qemu_*.orig.tar.* | head -1)
  tar -xf "$orig" -C "$work" --wildcards '*/include/qemu/qemu-plugin.h'
  cp "$(ls "$work"/*/include/qemu/qemu-plugin.h | head -1)" "$header"
  rm -rf "$work"
fi

if [[ ! -f $so || bench/qemu-insn.c -nt $so || $header -nt $so ]]; then
  say "building $so"
  cc -shared -fPIC -O2 -Wall -Wextra -Werror -I"$out/include" -o "$so" bench/qemu-insn.c -lpthread
fi
echo "$so"
