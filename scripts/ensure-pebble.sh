#!/usr/bin/env bash
# Makes sure Pebble (Let's Encrypt's test CA, for tests/interop_tests/acme.rs) is installed and prints the
# path of its binary. Installs github.com/letsencrypt/pebble/v2/cmd/pebble@v2.10.3 with
# `go install` (Go from scripts/ensure-go.sh) into target/pebble-v2.10.3/bin when missing, and
# copies Pebble's test certificates from its module source (test/certs: pebble.minica.pem, the
# root its listener's certificate chains to, and localhost/{cert,key}.pem, that certificate)
# into target/pebble-v2.10.3/certs. Idempotent; says what it does on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
version=v2.10.3
module=github.com/letsencrypt/pebble/v2
dest="$PWD/target/pebble-$version"
if [[ -x "$dest/bin/pebble" && -f "$dest/certs/pebble.minica.pem" && -f "$dest/certs/localhost/key.pem" ]]; then
  echo "$dest/bin/pebble"
  exit 0
fi
go="$(scripts/ensure-go.sh)/go"
if [[ ! -x "$dest/bin/pebble" ]]; then
  echo "ensure-pebble: go install $module/cmd/pebble@$version into $dest/bin" >&2
  GOBIN="$dest/bin.tmp" GOFLAGS=-mod=mod "$go" install "$module/cmd/pebble@$version" >&2
  rm -rf "$dest/bin" && mv "$dest/bin.tmp" "$dest/bin"
fi
src="$("$go" env GOMODCACHE)/$module@$version/test/certs"
if [[ ! -f "$src/pebble.minica.pem" ]]; then
  echo "ensure-pebble: go mod download $module@$version" >&2
  "$go" mod download "$module@$version" >&2
fi
rm -rf "$dest/certs.tmp" && mkdir -p "$dest/certs.tmp/localhost"
cp "$src/pebble.minica.pem" "$dest/certs.tmp/"
cp "$src/localhost/cert.pem" "$src/localhost/key.pem" "$dest/certs.tmp/localhost/"
rm -rf "$dest/certs" && mv "$dest/certs.tmp" "$dest/certs"
echo "$dest/bin/pebble"
