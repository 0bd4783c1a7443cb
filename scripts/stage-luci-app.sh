#!/usr/bin/env bash
# luci-app-derpd's files for the packers (scripts/build-packages.sh: .ipk and .apk), laid out
# as openwrt/Makefile's Package/luci-app-derpd/install (and the luci feed's luci.mk) installs
# them: htdocs/ under /www, root/ under /, directories 0755, files 0644, the rpcd plugin 0755.
#
#   scripts/stage-luci-app.sh DIR        # installs the files into the package root DIR
#   scripts/stage-luci-app.sh --list     # prints "MODE PATH" per file, PATH as installed
#
# Sourced, it defines the same as functions (stage_luci_app DIR, luci_app_files) and the
# package's fields: luci_app_name, luci_app_depends (OpenWrt's form, libc first as the
# SDK writes it), luci_app_arch, luci_app_section, luci_app_description, and
# luci_app_postinst / luci_app_postrm (the maintainer scripts' bodies, as in openwrt/Makefile).
# shellcheck disable=SC2034,SC2016  # the fields are for the scripts that source this one

luci_app_src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/openwrt/luci-app-derpd"
luci_app_name=luci-app-derpd
luci_app_depends="libc, derpd, luci-base"
luci_app_arch=all
luci_app_section=luci
luci_app_description="LuCI page for derpd (Services → DERP relay): every derpd option, whether
it runs, its clients and traffic now, and the DERPMap entry with the certificate pin to paste
into a tailnet policy file or headscale's derp.paths."
luci_app_postinst='#!/bin/sh
[ -n "${IPKG_INSTROOT}" ] || {
	rm -f /tmp/luci-indexcache*
	rm -rf /tmp/luci-modulecache/
	killall -HUP rpcd 2>/dev/null
}
exit 0'
luci_app_postrm=$luci_app_postinst

# "MODE SOURCE PATH" per file, sorted by installed path.
luci_app_entries() {
  local f rel dest mode
  (cd "$luci_app_src" && find htdocs root -type f | LC_ALL=C sort) | while read -r rel; do
    case "$rel" in
    htdocs/*) dest=/www/${rel#htdocs/} ;;
    root/*) dest=/${rel#root/} ;;
    esac
    case "$dest" in
    /usr/libexec/rpcd/*) mode=0755 ;;
    *) mode=0644 ;;
    esac
    f=$luci_app_src/$rel
    echo "$mode $f $dest"
  done | LC_ALL=C sort -k3
}

luci_app_files() {
  luci_app_entries | while read -r mode _ dest; do echo "$mode $dest"; done
}

stage_luci_app() { # DIR
  local root=$1 mode src dest
  [[ -n "$root" ]] || { echo "stage-luci-app: no directory given" >&2; return 2; }
  while read -r mode src dest; do
    install -d -m 0755 "$root$(dirname "$dest")"
    install -m "$mode" "$src" "$root$dest"
  done < <(luci_app_entries)
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  case "${1:-}" in
  --list) luci_app_files ;;
  "" | -*) echo "usage: $0 DIR | --list" >&2; exit 2 ;;
  *) stage_luci_app "$1" ;;
  esac
fi
