# A stand-in for what OpenWrt gives an init script (/etc/rc.common with USE_PROCD, the UCI
# config functions of /lib/functions.sh, procd.sh and jshn), written for tests/packages/init_ipk_deb/.
# It records what the script asks procd for instead of sending it over ubus:
#   $STUB_OUT/procd   one line per call: "command <arg>" per argv element, "set <param> <value>",
#                     "jail <name> <flags>", "mount_ro <path>", "mount_rw <path>",
#                     "json <call> <args>", "trigger <config>",
#                     "reload_interface_trigger <interface>"
#   $STUB_OUT/log     logger calls; mkdir/chown/chmod are recorded in procd, not run.
# The UCI file is read from $UCI_DIR/<package>: its `config`, `option` and `list` lines are
# shell words, as uci writes them. A network's IPv4 address (network.sh) is $STUB_NET_<name>.
# shellcheck shell=sh disable=SC2034

: "${STUB_OUT:?}" "${UCI_DIR:?}"

stub_record() {
	printf '%s\n' "$*" >>"$STUB_OUT/procd"
}

# --- UCI (functions.sh) -------------------------------------------------------------------
stub_var() { # section option → the variable holding it
	printf 'STUB_UCI_%s__%s' "$1" "$2"
}

config() {
	STUB_SECTION=${2:-anon}
}

option() {
	local stub_name=$1
	shift
	eval "$(stub_var "$STUB_SECTION" "$stub_name")=\$*"
}

list() {
	local stub_name=$1 stub_v stub_old
	shift
	stub_v=$(stub_var "$STUB_SECTION" "$stub_name")
	eval "stub_old=\${$stub_v}"
	eval "$stub_v=\${stub_old:+\$stub_old }\$*"
}

config_load() {
	[ -f "$UCI_DIR/$1" ] || return 1
	. "$UCI_DIR/$1"
}

# Locals here carry a stub_ prefix: the caller's variable (in $1) must not be shadowed.
config_get() { # variable section option [default]
	local stub_value
	eval "stub_value=\${$(stub_var "$2" "$3")}"
	eval "$1=\${stub_value:-\$4}"
}

get_bool() {
	case "$1" in
	1 | on | true | yes | enabled) echo 1 ;;
	0 | off | false | no | disabled) echo 0 ;;
	*) echo "$2" ;;
	esac
}

config_get_bool() { # variable section option [default]
	local stub_raw
	config_get stub_raw "$2" "$3" "$4"
	eval "$1=\$(get_bool \"\$stub_raw\" \"\$4\")"
}

# --- network.sh ---------------------------------------------------------------------------
network_get_ipaddr() { # variable network
	eval "$1=\${STUB_NET_$2:-}"
	eval "[ -n \"\${$1}\" ]"
}

# --- procd.sh -----------------------------------------------------------------------------
procd_open_instance() { stub_record "instance ${1:-instance1}"; }
procd_close_instance() { stub_record "close_instance"; }

procd_set_param() {
	local name=$1
	shift
	case "$name" in
	command)
		sed -i '/^command /d' "$STUB_OUT/procd"
		procd_append_param command "$@"
		;;
	*) stub_record "set $name $*" ;;
	esac
}

procd_append_param() {
	local name=$1 arg
	shift
	case "$name" in
	command) for arg in "$@"; do stub_record "command $arg"; done ;;
	*) stub_record "set $name $*" ;;
	esac
}

procd_add_jail() {
	local name=$1
	shift
	stub_record "jail $name $*"
}

procd_add_jail_mount() {
	local p
	for p in "$@"; do stub_record "mount_ro $p"; done
}

procd_add_jail_mount_rw() {
	local p
	for p in "$@"; do stub_record "mount_rw $p"; done
}

procd_open_data() { stub_record "json open_data"; }
procd_close_data() { stub_record "json close_data"; }
procd_add_reload_trigger() { stub_record "trigger $*"; }
procd_add_reload_interface_trigger() { stub_record "reload_interface_trigger $*"; }

# --- jshn ---------------------------------------------------------------------------------
json_add_array() { stub_record "json add_array $*"; }
json_close_array() { stub_record "json close_array"; }
json_add_object() { stub_record "json add_object $*"; }
json_close_object() { stub_record "json close_object"; }
json_add_string() { stub_record "json add_string $*"; }

# --- the system ---------------------------------------------------------------------------
logger() { printf '%s\n' "$*" >>"$STUB_OUT/log"; }
mkdir() { stub_record "mkdir $*"; }
chown() { stub_record "chown $*"; }
chmod() { stub_record "chmod $*"; }

# --- rc.common ----------------------------------------------------------------------------
# `/etc/init.d/derpd start` with USE_PROCD: start_service inside a service, then its triggers.
rc_procd_start() {
	: >"$STUB_OUT/procd"
	: >"$STUB_OUT/log"
	start_service
	STUB_STATUS=$?
	service_triggers
	return $STUB_STATUS
}
