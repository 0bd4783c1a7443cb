# shellcheck shell=bash
# Shared by bench/compare.sh and bench/router.sh (sourced): a scratch directory with a
# self-signed certificate, removed at exit with the server still running, and free ports.

# bench_setup KEY: sets work (a new temporary directory, removed at exit, killing the server in
# server_pid first) and cert ($work/127.0.0.1.crt, beside its key: a self-signed certificate
# for 127.0.0.1 with a KEY key, p256 or ed25519, made with openssl).
bench_setup() {
  local newkey
  case $1 in
    p256) newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1) ;;
    ed25519) newkey=(-newkey ed25519) ;;
    *) echo "bench: certificate key $1: want p256 or ed25519" >&2; return 2 ;;
  esac
  work=$(mktemp -d)
  server_pid=
  trap bench_cleanup EXIT
  openssl req -x509 "${newkey[@]}" -nodes -days 30 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$work/127.0.0.1.key" -out "$work/127.0.0.1.crt" 2>/dev/null
  cert=$work/127.0.0.1.crt
}

bench_cleanup() {
  [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  rm -rf "$work"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
