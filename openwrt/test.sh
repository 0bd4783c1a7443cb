#!/bin/sh
# OpenWrt packages CI (run per package with PKG_NAME and PKG_VERSION set): the installed derpd
# must report the package version; luci-app-derpd's files must be in place and its rpcd
# plugin must name its method.
case "$PKG_NAME" in
luci-app-derpd)
	[ -f /www/luci-static/resources/view/derpd/config.js ] &&
		[ -f /usr/share/luci/menu.d/luci-app-derpd.json ] &&
		[ -f /usr/share/rpcd/acl.d/luci-app-derpd.json ] &&
		/usr/libexec/rpcd/luci.derpd list | grep -F '"status"'
	;;
*)
	derpd --version | grep -F "derpd $PKG_VERSION "
	;;
esac
