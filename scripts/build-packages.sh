#!/usr/bin/env bash
# Packages the static release binaries of scripts/build-release.sh (dist/derpd-<triple>):
# - OpenWrt .ipk files (derpd per architecture, and luci-app-derpd for all), without the SDK,
#   in the format of OpenWrt's scripts/ipkg-build and
#   include/package-pack.mk (control fields, conffiles, the default postinst/prerm, keep.d),
#   with the fields of openwrt/Makefile and the files of openwrt/files/;
# - OpenWrt 25.12 .apk files (apk-tools v3, ADB), the same files and fields, laid out as
#   include/package-pack.mk lays them out for `apk mkpkg` (/lib/apk/packages/<pkg>.list,
#   .conffiles, .conffiles_static, .rusers; the post-install, post-upgrade and pre-deinstall
#   scripts), written by scripts/apk-pack.py (no apk-tools needed), one per architecture in
#   apk/<arch>/derpd-<version>.apk;
# - Debian .deb files (Raspberry Pi OS, Debian, Ubuntu) with dpkg-deb, from debian/.
# Then it runs the package tests on them (tests/packages/init_ipk_deb/: structure, and as root
# `dpkg -i`; tests/packages/apk/: the .apk files read back, every field and hash).
#
#   scripts/build-packages.sh                    # dist/derpd-* → dist/*.ipk, dist/apk/*/*.apk, dist/*.deb
#   scripts/build-packages.sh --bin-dir D --out O [--no-test]
#   APK=/path/to/apk scripts/build-packages.sh   # also: each .apk must equal `fakeroot apk mkpkg`'s bytes
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=dist out=dist run_tests=1
while (($#)); do
  case "$1" in
  --bin-dir) bin_dir=$2 && shift 2 ;;
  --out) out=$2 && shift 2 ;;
  --no-test) run_tests=0 && shift ;;
  *) echo "usage: $0 [--bin-dir DIR] [--out DIR] [--no-test]" >&2 && exit 2 ;;
  esac
done

# OpenWrt architecture → the Rust target whose static binary runs there.
ipk_arches=(
  aarch64_cortex-a53:aarch64-unknown-linux-musl
  aarch64_cortex-a72:aarch64-unknown-linux-musl
  aarch64_cortex-a76:aarch64-unknown-linux-musl
  aarch64_generic:aarch64-unknown-linux-musl
  arm_cortex-a7_neon-vfpv4:armv7-unknown-linux-musleabihf
  mipsel_24kc:mipsel-unknown-linux-musl
  mips_24kc:mips-unknown-linux-musl
  x86_64:x86_64-unknown-linux-musl
)
# Debian architecture → Rust target.
deb_arches=(
  arm64:aarch64-unknown-linux-musl
  armhf:armv7-unknown-linux-musleabihf
  amd64:x86_64-unknown-linux-musl
)
# What `readelf -h` must say of each target's binary: class, byte order, machine.
declare -A elf=(
  [aarch64-unknown-linux-musl]="ELF64 little AArch64"
  [armv7-unknown-linux-musleabihf]="ELF32 little ARM"
  [mipsel-unknown-linux-musl]="ELF32 little MIPS"
  [mips-unknown-linux-musl]="ELF32 big MIPS"
  [x86_64-unknown-linux-musl]="ELF64 little X86-64"
)

for tool in dpkg-deb tar gzip readelf md5sum sha256sum python3; do
  command -v "$tool" >/dev/null || {
    echo "build-packages: $tool is missing (apt-get install dpkg binutils python3)" >&2
    exit 1
  }
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
# Reproducible: every timestamp is the last commit's (ipkg-build's SOURCE_DATE_EPOCH).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
mtime="@$SOURCE_DATE_EPOCH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
out=$(cd "$out" && pwd) bin_dir=$(cd "$bin_dir" && pwd)
umask 022

# shellcheck source=scripts/stage-luci-app.sh
source scripts/stage-luci-app.sh

# A field of openwrt/Makefile's `define Package/derpd` (or a top-level PKG_ variable).
mk_field() { sed -n "s/^ *$1:=//p" openwrt/Makefile | head -1; }
ipk_release=$(mk_field PKG_RELEASE)
ipk_version="$version-r$ipk_release"
license=$(mk_field PKG_LICENSE)
license_files=$(mk_field PKG_LICENSE_FILES)
maintainer=$(mk_field PKG_MAINTAINER)
section=$(mk_field SECTION)
userid=$(mk_field USERID)
# DEPENDS without the @conditions and $(…) variables, '+' dropped: what the SDK writes.
# package-pack.mk writes the package's directory under the build tree as the .ipk's Source and
# the .apk's origin; these are not built in a tree, so it names the Makefile they follow. For
# opkg it must be at least as long as the values it reads into Source after it
# ("ateEpoch: 1796197046", see build_ipk).
source=derpd/openwrt/Makefile
depends=$(mk_field DEPENDS | tr ' ' '\n' | { grep '^+' || true; } | sed 's/^+//' | paste -sd, | sed 's/,/, /g')
description=$(sed -n '/^define Package\/derpd\/description/,/^endef/p' openwrt/Makefile |
  sed '1d;$d')
# /etc/derpd/ (key and certificates) is a conffiles entry that is not a file of the package:
# package-pack.mk keeps it across sysupgrade through /lib/upgrade/keep.d instead.
conffiles_mk=$(sed -n '/^define Package\/derpd\/conffiles/,/^endef/p' openwrt/Makefile | sed '1d;$d')

check_binary() { # file target
  local f=$1 t=$2 want got
  [[ -f "$f" ]] || {
    echo "build-packages: $f is missing: run scripts/build-release.sh first" >&2
    exit 1
  }
  read -r -a want <<<"${elf[$t]}"
  got=$(readelf -h "$f")
  if ! grep -q "Class: *${want[0]}" <<<"$got" || ! grep -q "Data: .*${want[1]} endian" <<<"$got" ||
    ! grep -q "Machine: .*${want[2]}" <<<"$got"; then
    echo "build-packages: $f is not a ${elf[$t]} binary:" >&2
    echo "$got" >&2
    exit 1
  fi
  if readelf -lW "$f" | grep -q INTERP; then
    echo "build-packages: $f is dynamically linked; packages ship static binaries" >&2
    exit 1
  fi
}

# tar as ipkg-build runs it under fakeroot: GNU format, root-owned, sorted, one mtime.
ipk_tar() { tar --format=gnu --numeric-owner --owner=0 --group=0 --sort=name --mtime="$mtime" "$@"; }

# The postinst and prerm package-pack.mk writes into every .ipk (they run lib/functions.sh's
# default_postinst and default_prerm, which run the package's own postinst-pkg, prerm-pkg),
# then the archives as ipkg-build makes them: data.tar.gz, Installed-Size in the control
# file, control.tar.gz, and the outer tar.gz.
ipk_pack() { # root tmp package-file
  local root=$1 tmp=$2 pkg=$3 script
  for script in postinst:default_postinst prerm:default_prerm; do
    {
      echo "#!/bin/sh"
      [[ $script == postinst:* ]] && echo '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0'
      echo '[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0'
      echo '. ${IPKG_INSTROOT}/lib/functions.sh'
      echo "${script#*:} \$0 \$@"
    } >"$root/CONTROL/${script%%:*}"
    chmod 0755 "$root/CONTROL/${script%%:*}"
  done
  chmod 0755 "$root"
  (cd "$root" && ipk_tar --exclude=./CONTROL -cpf - . | gzip -n - >"$tmp/data.tar.gz")
  sed -i "s/^Installed-Size: .*/Installed-Size: $(zcat <"$tmp/data.tar.gz" | wc -c)/" \
    "$root/CONTROL/control"
  (cd "$root/CONTROL" && ipk_tar -cf - . | gzip -n - >"$tmp/control.tar.gz")
  echo "2.0" >"$tmp/debian-binary"
  (cd "$tmp" && ipk_tar -cf - ./debian-binary ./data.tar.gz ./control.tar.gz | gzip -n - >"$pkg")
  echo "build-packages: $pkg"
}

build_ipk() { # openwrt-arch target
  local arch=$1 t=$2 root=$work/ipk-$1 tmp=$work/ipk-$1.out conf
  rm -rf "$root" "$tmp" && mkdir -p "$root" "$tmp"
  install -d -m 0755 "$root/usr/sbin" "$root/etc/init.d" "$root/etc/config" \
    "$root/etc/capabilities" "$root/CONTROL"
  install -m 0755 "$bin_dir/derpd-$t" "$root/usr/sbin/derpd"
  install -m 0755 openwrt/files/derpd.init "$root/etc/init.d/derpd"
  install -m 0600 openwrt/files/derpd.config "$root/etc/config/derpd"
  install -m 0600 openwrt/files/derpd.json "$root/etc/capabilities/derpd.json"
  # conffiles: the entries that are files of the package; the rest go to keep.d.
  : >"$root/CONTROL/conffiles"
  for conf in $conffiles_mk; do
    if [[ -f "$root$conf" ]]; then
      echo "$conf" >>"$root/CONTROL/conffiles"
    else
      install -d -m 0755 "$root/lib/upgrade/keep.d"
      echo "$conf" >>"$root/lib/upgrade/keep.d/derpd"
    fi
  done
  LC_ALL=C sort -o "$root/CONTROL/conffiles" "$root/CONTROL/conffiles"
  chmod 0644 "$root/CONTROL/conffiles" "$root/lib/upgrade/keep.d/derpd"
  {
    echo "Package: derpd"
    echo "Version: $ipk_version"
    [[ -n "$depends" ]] && echo "Depends: $depends"
    # Source: before SourceName: and SourceDateEpoch:, as package-pack.mk writes them: opkg
    # takes a field by the prefix of its name, so those two are stored as Source too, and
    # only a first Source: at least as long as their values keeps `opkg info` from printing
    # "ERROR: truncating field".
    echo "Source: $source"
    echo "SourceName: derpd"
    echo "License: $license"
    echo "LicenseFiles: $license_files"
    echo "Section: $section"
    echo "Require-User: $userid"
    echo "SourceDateEpoch: $SOURCE_DATE_EPOCH"
    echo "Maintainer: $maintainer"
    echo "Architecture: $arch"
    echo "Installed-Size: 0"
    printf "Description: "
    sed -e 's,^[[:space:]]*, ,g' <<<"$description"
  } >"$root/CONTROL/control"
  chmod 0644 "$root/CONTROL/control"
  ipk_pack "$root" "$tmp" "$out/derpd_${ipk_version}_${arch}.ipk"
}

# luci-app-derpd: architecture-independent, the files of scripts/stage-luci-app.sh, its own
# postinst and postrm (LuCI's caches, rpcd) as package-pack.mk stores them: postinst-pkg, run
# by default_postinst, and postrm.
build_luci_ipk() {
  local root=$work/ipk-luci tmp=$work/ipk-luci.out
  rm -rf "$root" "$tmp" && mkdir -p "$root/CONTROL" "$tmp"
  stage_luci_app "$root"
  {
    echo "Package: $luci_app_name"
    echo "Version: $ipk_version"
    echo "Depends: $luci_app_depends"
    echo "Source: $source"
    echo "SourceName: derpd"
    echo "License: $license"
    echo "LicenseFiles: $license_files"
    echo "Section: $luci_app_section"
    echo "SourceDateEpoch: $SOURCE_DATE_EPOCH"
    echo "Maintainer: $maintainer"
    echo "Architecture: $luci_app_arch"
    echo "Installed-Size: 0"
    printf "Description: "
    sed -e 's,^[[:space:]]*, ,g' <<<"$luci_app_description"
  } >"$root/CONTROL/control"
  echo "$luci_app_postinst" >"$root/CONTROL/postinst-pkg"
  echo "$luci_app_postrm" >"$root/CONTROL/postrm"
  chmod 0644 "$root/CONTROL/control"
  chmod 0755 "$root/CONTROL/postinst-pkg" "$root/CONTROL/postrm"
  ipk_pack "$root" "$tmp" "$out/${luci_app_name}_${ipk_version}_${luci_app_arch}.ipk"
}

# One OpenWrt 25.12 .apk from a staged root (the files as installed, root-owned), made as
# include/package-pack.mk makes it: keep.d for conffiles entries that are not files, then in
# /lib/apk/packages/ <name>.rusers (Require-User), <name>.list (every file and symlink, made
# before the conffiles lists), <name>.conffiles (the Makefile's conffiles, verbatim) and
# <name>.conffiles_static (each conffile that is a file, with its sha256); the post-install,
# post-upgrade and pre-deinstall scripts (and pre-install/pre-upgrade/post-deinstall when the
# package has preinst/postrm); then the ADB package (scripts/apk-pack.py; with APK set, also
# `$APK mkpkg`, and the two must be equal). Generic: luci-app-derpd uses it too.
#   build_apk name=N version=V arch=A|noarch root=DIR out=FILE description=… [depends="a b"]
#     [provides="x"] [userid=U] [conffiles=$'/etc/a\n/etc/b/'] [postinst=F] [prerm=F]
#     [preinst=F] [postrm=F] [license=L] [maintainer=M] [origin=O] [url=U]
build_apk() {
  local name='' version='' arch='' root='' pkg='' description='' depends='' provides=''
  local userid='' conffiles='' postinst='' prerm='' preinst='' postrm='' url=''
  local license=$license maintainer=$maintainer origin=$source kv f
  for kv in "$@"; do
    case "${kv%%=*}" in
    name | version | arch | root | description | depends | provides | userid | conffiles | \
      postinst | prerm | preinst | postrm | license | maintainer | origin | url)
      printf -v "${kv%%=*}" '%s' "${kv#*=}" ;;
    out) pkg=${kv#*=} ;;
    *) echo "build_apk: unknown argument $kv" >&2 && exit 2 ;;
    esac
  done
  local meta=$root/lib/apk/packages scripts=$work/apk-scripts-$name-$arch
  rm -rf "$scripts" && mkdir -p "$scripts" "$meta"
  for f in $conffiles; do
    if [[ ! -f "$root$f" ]]; then
      install -d -m 0755 "$root/lib/upgrade/keep.d"
      echo "$f" >>"$root/lib/upgrade/keep.d/$name"
    fi
  done
  [[ -z "$userid" ]] || echo "$userid" >"$meta/$name.rusers"
  (cd "$root" && find . -type f,l -printf "/%P\n" | LC_ALL=C sort) >"$scripts/list"
  mv "$scripts/list" "$meta/$name.list"
  if [[ -n "$conffiles" ]]; then
    printf '%s\n' "$conffiles" >"$meta/$name.conffiles"
    for f in $conffiles; do
      [[ -f "$root$f" ]] || continue
      echo "$f $(sha256sum <"$root$f" | cut -d' ' -f1)" >>"$meta/$name.conffiles_static"
    done
  fi
  # The scripts, line for line as package-pack.mk writes them.
  {
    echo '#!/bin/sh'
    echo '[ "${IPKG_NO_SCRIPT}" = "1" ] && exit 0'
    echo '[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0'
    echo '. ${IPKG_INSTROOT}/lib/functions.sh'
    echo 'export root="${IPKG_INSTROOT}"'
    echo "export pkgname=\"$name\""
    echo 'add_group_and_user'
    echo 'default_postinst'
    [[ -z "$postinst" ]] || sed '/^\s*#!/d' "$postinst"
  } >"$scripts/post-install"
  {
    echo '#!/bin/sh'
    echo 'export PKG_UPGRADE=1'
    sed '/^\s*#!/d' "$scripts/post-install"
  } >"$scripts/post-upgrade"
  {
    echo '#!/bin/sh'
    echo '[ -s ${IPKG_INSTROOT}/lib/functions.sh ] || exit 0'
    echo '. ${IPKG_INSTROOT}/lib/functions.sh'
    echo 'export root="${IPKG_INSTROOT}"'
    echo "export pkgname=\"$name\""
    echo 'default_prerm'
    [[ -z "$prerm" ]] || sed '/^\s*#!/d' "$prerm"
  } >"$scripts/pre-deinstall"
  local args=(
    --info "name:$name" --info "version:$version"
    --info "description:$(tr -s ' \t\n' '   ' <<<"$description" | sed 's/^ //;s/ $//')"
    --info "arch:$arch" --info "license:$license" --info "origin:$origin" --info "url:$url"
    --info "maintainer:$maintainer"
  )
  [[ -z "$provides" ]] || args+=(--info "provides:$provides")
  if [[ -n "$preinst" ]]; then
    args+=(--script "pre-install:$preinst")
    { echo '#!/bin/sh' && echo 'export PKG_UPGRADE=1' && sed '/^\s*#!/d' "$preinst"; } >"$scripts/pre-upgrade"
  fi
  args+=(--script "post-install:$scripts/post-install")
  [[ -z "$preinst" ]] || args+=(--script "pre-upgrade:$scripts/pre-upgrade")
  args+=(--script "post-upgrade:$scripts/post-upgrade" --script "pre-deinstall:$scripts/pre-deinstall")
  if [[ -n "$postrm" ]]; then
    sed -z 's/^\s*#!/#!/' "$postrm" >"$scripts/post-deinstall"
    args+=(--script "post-deinstall:$scripts/post-deinstall")
  fi
  args+=(--info "depends:$depends" --files "$root")
  mkdir -p "$(dirname "$pkg")"
  python3 scripts/apk-pack.py "${args[@]}" --output "$pkg"
  if [[ -n "${APK:-}" ]]; then
    # Under fakeroot as the SDK runs it: every file root-owned whoever runs this.
    fakeroot "$APK" mkpkg "${args[@]}" --output "$scripts/mkpkg.apk"
    cmp "$pkg" "$scripts/mkpkg.apk" || {
      echo "build-packages: $pkg differs from what $APK mkpkg writes" >&2
      exit 1
    }
  fi
  echo "build-packages: $pkg"
}

# derpd's .apk: the files of build_ipk's data.tar.gz, from the same sources.
build_apk_derpd() { # openwrt-arch target
  local arch=$1 t=$2 root=$work/apk-$1
  rm -rf "$root" && mkdir -p "$root"
  install -d -m 0755 "$root/usr/sbin" "$root/etc/init.d" "$root/etc/config" "$root/etc/capabilities"
  install -m 0755 "$bin_dir/derpd-$t" "$root/usr/sbin/derpd"
  install -m 0755 openwrt/files/derpd.init "$root/etc/init.d/derpd"
  install -m 0600 openwrt/files/derpd.config "$root/etc/config/derpd"
  install -m 0600 openwrt/files/derpd.json "$root/etc/capabilities/derpd.json"
  chmod 0755 "$root"
  # depends: the .ipk's Depends (none: procd-ujail is optional, see the README); provides:
  # the virtual <name>-any that OpenWrt 25.12 gives every package.
  build_apk name=derpd version="$ipk_version" arch="$arch" root="$root" \
    out="$out/apk/$arch/derpd-$ipk_version.apk" description="$description" \
    depends="${depends//, / }" provides=derpd-any userid="$userid" conffiles="$conffiles_mk"
}

# luci-app-derpd's .apk: noarch (package-pack.mk's arch for PKGARCH all), the staged files,
# and its postinst and postrm bodies as the post-install and post-deinstall scripts.
build_apk_luci() {
  local root=$work/apk-luci
  rm -rf "$root" && mkdir -p "$root"
  stage_luci_app "$root"
  chmod 0755 "$root"
  echo "$luci_app_postinst" >"$work/luci-postinst"
  echo "$luci_app_postrm" >"$work/luci-postrm"
  build_apk name="$luci_app_name" version="$ipk_version" arch=noarch root="$root" \
    out="$out/apk/noarch/$luci_app_name-$ipk_version.apk" \
    description="$luci_app_description" depends="${luci_app_depends//, / }" \
    provides="$luci_app_name-any" postinst="$work/luci-postinst" postrm="$work/luci-postrm"
}

copyright() {
  cat <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: derpd
Source: the derpd repository

Files: *
Copyright: 2026 the derpd developers
License: BSD-3-Clause

License: BSD-3-Clause
EOF
  # The license text, as a copyright-format paragraph: indented, blank lines as " .".
  sed -n '/^Redistribution/,$p' LICENSE | sed -e 's/^$/./' -e 's/^/ /'
}

# derpd(8), from `derpd --help` of the x86_64 binary (the host's): the flags are the same on
# every architecture. Backslashes escaped, lines that troff would take for requests guarded.
manpage() {
  local help
  help=$("$bin_dir/derpd-x86_64-unknown-linux-musl" --help | sed '1,/^Options:/d' |
    sed -e 's/\\/\\e/g' -e "s/^\([.']\)/\\\\\&\1/")
  cat <<EOF
.TH DERPD 8 "$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)" "derpd $version" "System Administration"
.SH NAME
derpd \- DERP relay and STUN server for Tailscale
.SH SYNOPSIS
.B derpd
[\fIflags\fR]
.SH DESCRIPTION
A small, wire-compatible replacement for Tailscale's DERP relay (derper) and its STUN server.
Flags take derper's names; \fB-flag=value\fR, \fB--flag=value\fR and \fB-flag value\fR all work.
The systemd unit derpd.service runs it with the flags of \fI/etc/default/derpd\fR.
.SH OPTIONS
.nf
$help
.fi
.SH SIGNALS
SIGHUP reloads the certificates, \fB--allow-keys-file\fR and \fB--rate-config\fR.
SIGTERM and SIGINT tell every client to reconnect elsewhere, then exit.
.SH FILES
.TP
.I /etc/default/derpd
DERPD_FLAGS for the service.
.TP
.I /var/lib/derpd/derper.key
The relay's private key, made on first start.
.TP
.I /var/lib/derpd/certs
\fIhostname\fR.crt and \fIhostname\fR.key, or the self-signed certificate for an IP address.
.SH SEE ALSO
.I /usr/share/doc/derpd/README.Debian
EOF
}

build_deb() { # debian-arch target
  local arch=$1 t=$2 root=$work/deb-$1 size
  rm -rf "$root" && mkdir -p "$root"
  install -d -m 0755 "$root/DEBIAN" "$root/usr/sbin" "$root/usr/lib/systemd/system" \
    "$root/etc/default" "$root/usr/share/doc/derpd"
  install -m 0755 "$bin_dir/derpd-$t" "$root/usr/sbin/derpd"
  install -m 0644 debian/derpd.service "$root/usr/lib/systemd/system/derpd.service"
  install -m 0644 debian/derpd.default "$root/etc/default/derpd"
  install -m 0644 debian/README.Debian "$root/usr/share/doc/derpd/README.Debian"
  install -d -m 0755 "$root/usr/share/man/man8"
  manpage | gzip -9 -n >"$root/usr/share/man/man8/derpd.8.gz"
  chmod 0644 "$root/usr/share/man/man8/derpd.8.gz"
  install -d -m 0755 "$root/usr/share/lintian/overrides"
  install -m 0644 debian/lintian-overrides "$root/usr/share/lintian/overrides/derpd"
  {
    echo "derpd ($version-1) unstable; urgency=medium"
    echo
    echo "  * derpd $version, packaged by scripts/build-packages.sh."
    echo
    echo " -- $maintainer  $(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")"
  } | gzip -9 -n >"$root/usr/share/doc/derpd/changelog.Debian.gz"
  chmod 0644 "$root/usr/share/doc/derpd/changelog.Debian.gz"
  copyright >"$root/usr/share/doc/derpd/copyright"
  chmod 0644 "$root/usr/share/doc/derpd/copyright"
  install -m 0755 debian/postinst debian/prerm debian/postrm "$root/DEBIAN/"
  echo /etc/default/derpd >"$root/DEBIAN/conffiles"
  (cd "$root" && find usr -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"
  size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
  cat >"$root/DEBIAN/control" <<EOF
Package: derpd
Version: $version-1
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: adduser
Section: net
Priority: optional
Description: DERP relay and STUN server for Tailscale
EOF
  sed -e 's,^[[:space:]]*, ,' <<<"$description" >>"$root/DEBIAN/control"
  cat >>"$root/DEBIAN/control" <<EOF
 .
 The systemd unit runs it as the derpd user with only CAP_NET_BIND_SERVICE;
 flags go in /etc/default/derpd.
EOF
  chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"
  local pkg="$out/derpd_${version}-1_${arch}.deb"
  dpkg-deb --root-owner-group -Zxz --build "$root" "$pkg" >/dev/null
  echo "build-packages: $pkg"
}

for pair in "${ipk_arches[@]}" "${deb_arches[@]}"; do
  check_binary "$bin_dir/derpd-${pair#*:}" "${pair#*:}"
done
for pair in "${ipk_arches[@]}"; do build_ipk "${pair%%:*}" "${pair#*:}"; done
build_luci_ipk
for pair in "${ipk_arches[@]}"; do build_apk_derpd "${pair%%:*}" "${pair#*:}"; done
build_apk_luci
for pair in "${deb_arches[@]}"; do build_deb "${pair%%:*}" "${pair#*:}"; done

echo
echo "| package | bytes |"
echo "|---|---:|"
for f in "$out"/derpd_"$version"-*.ipk "$out/${luci_app_name}_$ipk_version"_*.ipk \
  "$out"/apk/*/*-"$version"-*.apk "$out"/derpd_"$version"-*.deb; do
  printf '| %s | %s |\n' "${f#"$out"/}" "$(stat -c %s "$f")"
done

if ((run_tests)); then
  echo
  echo "build-packages: tests/packages/init_ipk_deb/ and tests/packages/apk/ on $out"
  # The packages tier without its LuCI page test (Chromium), as before the tiers.
  DERPD_PACKAGES_DIR="$out" cargo test --locked --test packages -- --include-ignored \
    init_ipk_deb:: apk::
fi
