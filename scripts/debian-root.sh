# shellcheck shell=bash
# Sourced by systemd-check.sh and cross-env-check.sh (run as root): a Debian 12 (bookworm) root
# file system made with debootstrap, and systemd-nspawn to run commands in it.
#   debian_host_tools            installs debootstrap and systemd-nspawn on the host if missing
#   debian_root DIR LOG [OPT...] makes DIR with `debootstrap --variant=minbase OPT... bookworm`
#                                from the mirror this machine's apt uses (its output in LOG),
#                                unless DIR exists: DIR appears only once debootstrap succeeded
#   DEBIAN_NSPAWN                systemd-nspawn as both scripts run it; add -D DIR and the rest

# Without systemd on the host, nspawn must not try to register with it.
# shellcheck disable=SC2034 # for the scripts that source this file
DEBIAN_NSPAWN=(systemd-nspawn --quiet --register=no --keep-unit)

debian_host_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

debian_root() {
  local dir=$1 log=$2 mirror
  shift 2
  [[ -d "$dir" ]] && return 0
  # The mirror this machine's apt already uses.
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -v security | head -1)
  mirror=${mirror:-$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)}
  echo "debian-root: debootstrap bookworm from ${mirror:?no Debian mirror in /etc/apt} into $dir"
  rm -rf "$dir.tmp"
  debootstrap --variant=minbase "$@" bookworm "$dir.tmp" "$mirror" >"$log"
  mv "$dir.tmp" "$dir"
}
