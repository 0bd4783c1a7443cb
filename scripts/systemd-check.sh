#!/usr/bin/env bash
# The amd64 .deb under a real systemd: a Debian 12 container (debootstrap, then systemd-nspawn
# --boot with a private network namespace, so nothing outside it is touched) gets the package
# installed and derpd enabled as README.Debian says; then, inside it:
#   the unit starts derpd as the derpd user with only CAP_NET_BIND_SERVICE, under the unit's
#   sandbox, on ports 443 and 3478; Tailscale's client (tests/interop) relays through it and
#   uses its STUN; `systemctl reload` reaches derpd as SIGHUP; `systemctl stop` ends it with
#   success; reinstalling (an upgrade) restarts it and keeps /etc/default/derpd; `dpkg --purge`
#   removes its state. `systemd-analyze security` is printed.
# Run as root after scripts/build-packages.sh (CI does). The container's root file system is
# cached in target/systemd-check/ (about 280 MB, a minute to make).
#
#   scripts/systemd-check.sh [path/to/derpd_<version>-1_amd64.deb]
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb=$(realpath "${1:-dist/derpd_$version-1_amd64.deb}")
work=$PWD/target/systemd-check
root=$work/root
machine=derpd-check
[[ -f "$deb" ]] || {
  echo "systemd-check: $deb is missing: run scripts/build-packages.sh first" >&2
  exit 1
}
[[ $(id -u) == 0 ]] || {
  echo "systemd-check: needs root (debootstrap, systemd-nspawn)" >&2
  exit 1
}
say() { echo "systemd-check: $*"; }
fail() {
  echo "systemd-check: FAILED: $*" >&2
  exit 1
}

# shellcheck source=scripts/debian-root.sh
source scripts/debian-root.sh
debian_host_tools

# Tailscale's client, built for the host; it runs inside the container's network namespace.
PATH="$(scripts/ensure-go.sh):$PATH"
mkdir -p "$work"
(cd tests/interop && go build -tags ts_debug_websockets -o "$work/derp-interop" .)

debian_root "$root" "$work/debootstrap.log" --include=systemd,systemd-sysv,dbus,adduser,iproute2

nspawn=("${DEBIAN_NSPAWN[@]}" -D "$root")
in_root() { "${nspawn[@]}" "$@"; }
cp "$deb" "$root/derpd.deb"
in_root dpkg --purge derpd >/dev/null 2>&1 || true
in_root dpkg -i /derpd.deb
in_root getent passwd derpd || fail "dpkg -i made no derpd user"
# /etc/default/derpd's first example: a self-signed certificate for an IP address.
sed -i 's|^DERPD_FLAGS=.*|DERPD_FLAGS="--certmode=manual --hostname=127.0.0.1"|' "$root/etc/default/derpd"
in_root systemctl enable derpd

say "booting the container"
setsid "${nspawn[@]}" --boot --private-network --machine="$machine" --console=passive \
  >"$work/boot.log" 2>&1 &
nspawn_pid=$!
init_pid=
stop_container() {
  if kill -0 "$nspawn_pid" 2>/dev/null; then
    kill -TERM "$nspawn_pid" 2>/dev/null || true # nspawn powers the container off
    timeout 30 tail --pid="$nspawn_pid" -f /dev/null || kill -KILL "$nspawn_pid" 2>/dev/null || true
  fi
  # A container whose boot had not finished can outlive nspawn: end its PID namespace.
  if [[ -n "$init_pid" ]] && kill -0 "$init_pid" 2>/dev/null; then
    kill -KILL "$init_pid" 2>/dev/null || true
  fi
}
trap stop_container EXIT
# The container's PID 1: the process named systemd among nspawn's descendants.
container_init() {
  local p=$1 depth c
  for depth in 1 2 3; do
    for c in $(pgrep -P "$p" || true); do
      [[ $(cat "/proc/$c/comm" 2>/dev/null) == systemd ]] && echo "$c" && return 0
    done
    p=$(pgrep -P "$p" | head -1 || true)
    [[ -n "$p" ]] || return 1
  done
  return 1
}
for _ in $(seq 100); do
  init_pid=$(container_init "$nspawn_pid" || true)
  [[ -n "$init_pid" ]] && break
  kill -0 "$nspawn_pid" 2>/dev/null || fail "systemd-nspawn exited: $(cat "$work/boot.log")"
  sleep 0.1
done
[[ -n "$init_pid" ]] || fail "no container init process"
inside() { nsenter -t "$init_pid" -a "$@"; }
# systemctl answers once PID 1 has its control socket; then --wait waits for the boot to end.
state=
for _ in $(seq 150); do
  state=$(timeout 60 nsenter -t "$init_pid" -a systemctl is-system-running --wait 2>/dev/null || true)
  [[ -n "$state" ]] && break
  sleep 0.2
done
say "container booted: $state"
[[ "$state" == running ]] || {
  inside systemctl --failed --no-pager || true
  fail "system state $state"
}
inside systemctl is-active --quiet derpd || fail "derpd is not active: $(inside systemctl status derpd --no-pager)"
# This boot only: the cached root file system keeps the journals of earlier runs.
journal() { inside journalctl -b -u derpd --no-pager -o cat "$@"; }
# Polls derpd's journal until a line has appeared (at least $2 times), for up to 20 s.
wait_journal() {
  local _
  for _ in $(seq 100); do
    (($(journal | grep -c -- "$1") >= ${2:-1})) && return 0
    sleep 0.2
  done
  fail "no '$1' in derpd's journal: $(journal)"
}
# derpd is active once started; its log says when it serves.
wait_journal CertName
journal
pin=$(journal | grep -o 'sha256-raw:[0-9a-f]\{64\}' | head -1)

pid=$(inside systemctl show -p MainPID --value derpd)
status=$(inside cat "/proc/$pid/status")
grep -E '^(Uid|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' <<<"$status"
uid=$(inside id -u derpd)
grep -q "^Uid:[[:space:]]*$uid[[:space:]]" <<<"$status" || fail "derpd does not run as the derpd user"
grep -q '^CapEff:[[:space:]]*0000000000000400$' <<<"$status" || fail "capabilities beyond CAP_NET_BIND_SERVICE"

say "Tailscale's client through the unit's derpd (port 443, pin $pin)"
nsenter -t "$init_pid" -n "$work/derp-interop" relay -clients 3 -host 127.0.0.1 -port 443 -pin "$pin"
nsenter -t "$init_pid" -n "$work/derp-interop" stun -addr 127.0.0.1:3478

# An upgrade (the same package again): postinst restarts the running derpd; the edited
# /etc/default/derpd stays.
inside dpkg -i /derpd.deb >/dev/null
new_pid=$(inside systemctl show -p MainPID --value derpd)
[[ "$new_pid" != "$pid" && "$new_pid" != 0 ]] || fail "the upgrade did not restart derpd"
grep -q '^DERPD_FLAGS="--certmode' "$root/etc/default/derpd" || fail "the upgrade replaced /etc/default/derpd"
wait_journal "serving on" 2
say "upgrade: derpd restarted (pid $pid → $new_pid), /etc/default/derpd kept"

inside systemctl reload derpd
wait_journal 'received SIGHUP'
say "reload: derpd got SIGHUP"

inside systemd-analyze security derpd --no-pager | tail -1

inside systemctl stop derpd
result=$(inside systemctl show -p Result --value derpd)
[[ "$result" == success ]] || fail "systemctl stop: Result=$result"
say "stop: Result=$result; $(journal | grep 'shutdown:' | tail -1)"

inside dpkg --purge derpd >/dev/null
inside test ! -e /var/lib/derpd || fail "purge left /var/lib/derpd"
say "purge: /var/lib/derpd removed"
say "ok"
