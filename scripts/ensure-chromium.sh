#!/usr/bin/env bash
# Makes sure a headless Chromium is installed for tests/packages/luci/ (the LuCI page in a real
# browser): Debian's `chromium` package, installed with apt-get when missing. Prints the path
# of the binary. Idempotent; prints what it does on stderr.
set -euo pipefail
for cand in chromium chromium-browser; do
  if p=$(command -v "$cand"); then
    echo "ensure-chromium: using $p ($("$p" --version 2>/dev/null || echo '?'))" >&2
    echo "$p"
    exit 0
  fi
done
echo "ensure-chromium: installing Debian's chromium package" >&2
apt-get -o DPkg::Lock::Timeout=600 update -qq
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends chromium >/dev/null
p=$(command -v chromium)
echo "ensure-chromium: installed $p ($("$p" --version 2>/dev/null || echo '?'))" >&2
echo "$p"
