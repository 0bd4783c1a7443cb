#!/usr/bin/env bash
# Writes tests/packaging/fw4-derpd.nft: the nftables ruleset that OpenWrt's own firewall (fw4)
# makes of the firewall data the init script gives procd for the shipped /etc/config/derpd, on
# the router that init_beside_uhttpd_relays_on_the_public_ports builds (zone wan: wan0,
# 203.0.113.1/24, masquerading; zone lan: br-lan, 192.168.1.1/24; stock zone policies). The
# test loads this file with nft and checks that the init script still asks for the data in its
# `# data:` line; after a change to the init script's firewall data it fails until this script
# is run again.
#
# fw4 runs here as in its own test suite (run_tests.sh): ucode with fw4's mock library, which
# serves uci and ubus from JSON files. Neither is in a package registry; build them by hand:
#   ucode:     github.com/jow-/ucode, cmake -DUBUS_SUPPORT=OFF -DUCI_SUPPORT=OFF
#              -DULOOP_SUPPORT=OFF -DRTNL_SUPPORT=OFF -DNL80211_SUPPORT=OFF .. && make
#              (needs libjson-c-dev)
#   firewall4: github.com/openwrt/firewall4, a checkout
#   tests/packaging/fw4-ruleset.sh UCODE_BUILD_DIR FIREWALL4_DIR DATA_JSON
# DATA_JSON is the data line the test prints when it fails (or `# data:` below).
set -euo pipefail
[[ $# -eq 3 ]] || { echo "usage: $0 UCODE_BUILD_DIR FIREWALL4_DIR DATA_JSON" >&2; exit 2; }
ucode_dir=$(realpath "$1")
fw4_dir=$(realpath "$2")
data=$3
out=$(realpath "$(dirname "$0")")/fw4-derpd.nft
case=$(mktemp -d)
trap 'rm -rf "$case"' EXIT
mkdir -p "$case/files/uci" "$case/files/ubus"

# /etc/config/firewall as OpenWrt ships it (its zones, defaults and forwarding).
cat >"$case/files/uci/firewall.json" <<'EOF'
{
	"defaults": [ { "syn_flood": "1", "input": "REJECT", "output": "ACCEPT", "forward": "REJECT" } ],
	"zone": [
		{ "name": "lan", "network": [ "lan" ], "input": "ACCEPT", "output": "ACCEPT",
		  "forward": "ACCEPT" },
		{ "name": "wan", "network": [ "wan", "wan6" ], "input": "REJECT", "output": "ACCEPT",
		  "forward": "REJECT", "masq": "1", "mtu_fix": "1" }
	],
	"forwarding": [ { "src": "lan", "dest": "wan" } ]
}
EOF
echo '{}' >"$case/files/uci/helpers.json"
cat >"$case/files/ubus/network.interface~dump.json" <<'EOF'
{
	"interface": [
		{ "interface": "lan", "up": true, "l3_device": "br-lan", "device": "br-lan",
		  "ipv4-address": [ { "address": "192.168.1.1", "mask": 24 } ], "data": {} },
		{ "interface": "wan", "up": true, "l3_device": "wan0", "device": "wan0",
		  "ipv4-address": [ { "address": "203.0.113.1", "mask": 24 } ], "data": {} },
		{ "interface": "wan6", "up": true, "l3_device": "wan0", "device": "wan0", "data": {} }
	]
}
EOF
printf '%s\n' "$data" >"$case/files/ubus/service~get_data~type-firewall.json"
cat >"$case/in.uc" <<'EOF'
{%
	include("./root/usr/share/firewall4/main.uc", {
		getenv: function(varname) {
			switch (varname) {
			case 'ACTION':
				return 'print';
			}
		}
	})
%}
EOF
ruleset=$(cd "$fw4_dir" && LD_LIBRARY_PATH="$ucode_dir" "$ucode_dir/ucode" -L"$ucode_dir" -S -T, \
  -L./tests/lib -L./root/usr/share/ucode \
  -D MOCK_SEARCH_PATH='["'"$case"'/files", "./tests/mocks"]' -l mocklib -l fw4 - <"$case/in.uc")
{
  echo "# Made by tests/packaging/fw4-ruleset.sh with fw4 $(git -C "$fw4_dir" rev-parse --short HEAD 2>/dev/null || echo '(unknown commit)'); do not edit."
  echo "# data: $data"
  printf '%s\n' "$ruleset"
} >"$out"
echo "wrote $out"
