#!/bin/sh
# OpenWrt packages CI: the installed binary must report the package version.
derpd --version | grep -F "derpd $PKG_VERSION "
