#!/usr/bin/env bash
# Makes sure a Go toolchain new enough for tests/interop (tailscale.com v1.102.5 needs
# go >= 1.26.6) is on PATH. If `go` is missing or too old, installs Go from the Go module
# proxy's toolchain module (golang.org/toolchain) into target/go-toolchain and prints the
# bin directory to add to PATH. Idempotent; prints what it does.
set -euo pipefail
cd "$(dirname "$0")/.."
want="1.26.8"
need_major=1 need_minor=26 need_patch=6

have_ok() {
  local v
  v=$("$1" env GOVERSION 2>/dev/null | sed 's/^go//') || return 1
  IFS=. read -r ma mi pa <<<"$v"
  pa=${pa:-0}
  (( ma > need_major || (ma == need_major && (mi > need_minor || (mi == need_minor && pa >= need_patch))) ))
}

cands=("$(command -v go || true)" /usr/local/go/bin/go "$PWD/target/go-toolchain/go/bin/go")
# DERPD_FORCE_GO_INSTALL=1 tests the install path on a machine that has Go.
[[ "${DERPD_FORCE_GO_INSTALL:-}" == 1 ]] && cands=()
for cand in "${cands[@]}"; do
  if [[ -n "$cand" && -x "$cand" ]] && have_ok "$cand"; then
    echo "ensure-go: using $cand ($("$cand" env GOVERSION))" >&2
    dirname "$cand"
    exit 0
  fi
done

dest="$PWD/target/go-toolchain"
arch=$(uname -m)
case "$arch" in x86_64) garch=amd64 ;; aarch64) garch=arm64 ;; *) echo "ensure-go: unsupported arch $arch" >&2; exit 1 ;; esac
proxy="${GOPROXY:-https://proxy.golang.org}"; proxy="${proxy%%,*}"
url="$proxy/golang.org/toolchain/@v/v0.0.1-go${want}.linux-${garch}.zip"
echo "ensure-go: installing go${want} from the module proxy into $dest" >&2
rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
curl -fsSL "$url" -o "$dest.tmp/go.zip"
(cd "$dest.tmp" && python3 -c 'import zipfile,sys; zipfile.ZipFile("go.zip").extractall(".")')
# The module zip holds golang.org/toolchain@<version>/... ; lay it out as go/.
mv "$dest.tmp"/golang.org/toolchain@* "$dest.tmp/go"
rm -rf "$dest.tmp/golang.org" "$dest.tmp/go.zip"
chmod +x "$dest.tmp/go/bin/"* "$dest.tmp/go/pkg/tool/"*/* 2>/dev/null || true
rm -rf "$dest" && mv "$dest.tmp" "$dest"
have_ok "$dest/go/bin/go" || { echo "ensure-go: installed toolchain does not run" >&2; exit 1; }
echo "$dest/go/bin"
