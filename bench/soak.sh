#!/usr/bin/env bash
# Soak: a release derpd on loopback under churning Tailscale clients, watched for drift in
# memory and descriptors. Long; not run in CI.
#
#   bench/soak.sh [--minutes 30] [--clients 200] [--interval-ms 500] [--sample 10] [--fresh-keys]
#
# derpd runs in TLS mode (a self-signed certificate for 127.0.0.1, pinned by the clients,
# STUN off, no port-80 listener, log level info). The load is `derp-interop churn`
# (tests/interop/churn.go), made of Tailscale's own derphttp client: N client slots, each
# with a fixed node key, logging in, sending a 64-1400 byte packet to a random other slot
# every ~interval, living 5-60 s, closing, pausing up to 2 s, and logging in again. With
# --fresh-keys every login is a new node key (every departure is a key gone for good, whose
# PeerGone interests must not pile up); results go to ...-fresh.{csv,txt}.
#
# Every --sample seconds: derpd's VmRSS, VmHWM, open fds, threads and CPU seconds, to
#   bench/results/soak-<minutes>m-<clients>c.csv
# At the end, to the terminal and bench/results/soak-<minutes>m-<clients>c.txt: the averages
# of the first and the last window (5 min, or a third of the run if shorter), max RSS, the
# clients' counters (logins, packets sent and received, connections the server closed), what
# derpd logged at WARN/ERROR, and its exit status on SIGTERM.
#
# DRIFT is reported when the last window's average RSS exceeds the first window's by more
# than 10 %, or its average fd count by more than 10 % (the number of connected clients
# fluctuates by a few percent). Exit status 1 on DRIFT, a derpd crash or an unclean exit.
# env: DERPD_BIN (soak this binary instead of the host release build), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

minutes=30 clients=200 interval_ms=500 sample=10 fresh=()
while (($#)); do
  case $1 in
    --minutes) minutes=$2; shift ;;
    --clients) clients=$2; shift ;;
    --interval-ms) interval_ms=$2; shift ;;
    --sample) sample=$2; shift ;;
    --fresh-keys) fresh=(-fresh-keys) ;;
    *) echo "usage: bench/soak.sh [--minutes M] [--clients N] [--interval-ms MS] [--sample S] [--fresh-keys]" >&2; exit 2 ;;
  esac
  shift
done
say() { echo "soak: $*" >&2; }

target=${CARGO_TARGET_DIR:-$root/target}
if [[ -z ${DERPD_BIN:-} ]]; then
  say "building derpd (release)"
  cargo build --release --locked --quiet --bin derpd
fi
derpd=${DERPD_BIN:-$target/release/derpd}
gobin=$(scripts/ensure-go.sh)
work=$(mktemp -d)
derpd_pid= churn_pid=
cleanup() {
  [[ -n $churn_pid ]] && kill "$churn_pid" 2>/dev/null
  [[ -n $derpd_pid ]] && kill "$derpd_pid" 2>/dev/null
  wait 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
say "building the churn client (tests/interop)"
(cd tests/interop && GOTOOLCHAIN=local "$gobin/go" build -buildvcs=false -o "$work/derp-interop" .)

# Each client is one connection on derpd's side and one on the harness's.
ulimit -n "$(ulimit -Hn)"

"$derpd" -a 127.0.0.1:0 --certmode manual --hostname 127.0.0.1 --certdir "$work/certs" \
  -c "$work/derpd.key" --http-port -1 --stun=false --max-handshakes-per-ip 256 \
  >"$work/derpd.log" 2>&1 &
derpd_pid=$!
for _ in $(seq 100); do
  grep -q '"CertName":"sha256-raw:' "$work/derpd.log" && grep -q 'serving on ' "$work/derpd.log" && break
  kill -0 "$derpd_pid" 2>/dev/null || { cat "$work/derpd.log" >&2; say "derpd exited"; exit 1; }
  sleep 0.1
done
port=$(sed -n 's/.*serving on 127\.0\.0\.1:\([0-9]*\) (TLS).*/\1/p' "$work/derpd.log" | head -1)
pin=$(grep -o '"CertName":"sha256-raw:[0-9a-f]*"' "$work/derpd.log" | head -1 | cut -d'"' -f4)
[[ -n $port && -n $pin ]] || { cat "$work/derpd.log" >&2; say "no port or pin in derpd's log"; exit 1; }
say "$("$derpd" --version), pid $derpd_pid, on 127.0.0.1:$port; $clients clients for $minutes min"

mkdir -p bench/results
name=bench/results/soak-${minutes}m-${clients}c${fresh:+-fresh}
csv=$name.csv
tick=$(getconf CLK_TCK)
t0=$(date +%s)
# One sample: elapsed_s,rss_kib,hwm_kib,fds,threads,cpu_s.
sample_now() {
  local st stat rss hwm threads fds cpu
  st=$(cat "/proc/$derpd_pid/status" 2>/dev/null) || return 1
  stat=$(cat "/proc/$derpd_pid/stat" 2>/dev/null) || return 1
  rss=$(awk '/^VmRSS:/ { print $2 }' <<<"$st")
  hwm=$(awk '/^VmHWM:/ { print $2 }' <<<"$st")
  threads=$(awk '/^Threads:/ { print $2 }' <<<"$st")
  fds=$(find "/proc/$derpd_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  # utime and stime are fields 14 and 15, counted after the ")" that ends the command name.
  cpu=$(awk -v t="$tick" '{ sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / t }' <<<"$stat")
  echo "$(($(date +%s) - t0)),$rss,$hwm,$fds,$threads,$cpu"
}
idle_before=$(sample_now)

"$work/derp-interop" churn "${fresh[@]}" -clients "$clients" -duration "${minutes}m" \
  -interval "${interval_ms}ms" -host 127.0.0.1 -port "$port" -pin "$pin" \
  >"$work/churn.out" 2>"$work/churn.err" &
churn_pid=$!

# Samples while the clients run (one taken as they stop would skew the last window).
echo "elapsed_s,rss_kib,hwm_kib,fds,threads,cpu_s" >"$csv"
while sleep "$sample" && kill -0 "$churn_pid" 2>/dev/null && (($(date +%s) - t0 < minutes * 60)); do
  line=$(sample_now) || { say "derpd is gone"; break; }
  echo "$line" >>"$csv"
  if ((($(date +%s) - t0) % 60 < sample)); then
    say "$line  $(grep PROGRESS "$work/churn.out" | tail -1 | cut -d' ' -f3-)"
  fi
done
churn_status=0
wait "$churn_pid" || churn_status=$?
churn_pid=
alive=yes
kill -0 "$derpd_pid" 2>/dev/null || alive=no
derpd_status=none
idle_after=none
if [[ $alive == yes ]]; then
  # The clients are gone: what derpd keeps once idle again.
  idle_after=$(sample_now)
  kill -TERM "$derpd_pid"
  derpd_status=0
  wait "$derpd_pid" || derpd_status=$?
fi
derpd_pid=

summary=$(grep '^SUMMARY' "$work/churn.out" | tail -1 || true)
get() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$summary"; }
window=$((minutes * 60 / 3))
((window > 300)) && window=300
report=$(awk -F, -v w="$window" '
  NR == 1 { next }
  { t[NR] = $1; r[NR] = $2; f[NR] = $4; n = NR; if ($2 > maxr) maxr = $2; if ($3 > maxh) maxh = $3 }
  END {
    T = t[n]
    for (i = 2; i <= n; i++) {
      if (t[i] <= w) { fr += r[i]; ff += f[i]; fn++ }
      if (t[i] > T - w) { lr += r[i]; lf += f[i]; ln++ }
    }
    fr /= fn; ff /= fn; lr /= ln; lf /= ln
    drift = (lr > fr * 1.10 || lf > ff * 1.10) ? "DRIFT" : "no drift"
    printf "window: first and last %d s (%d and %d samples)\n", w, fn, ln
    printf "RSS KiB: first %.0f, last %.0f (%+.1f %%); max VmRSS %d, VmHWM %d\n", fr, lr, (lr / fr - 1) * 100, maxr, maxh
    printf "fds: first %.1f, last %.1f (%+.1f %%)\n", ff, lf, (lf / ff - 1) * 100
    printf "verdict: %s (threshold: last window > first window + 10 %% in RSS or fds)\n", drift
  }' "$csv")
warns=$(grep -c -E '^(WARN|ERROR)' "$work/derpd.log" || true)
panics=$(grep -c -i 'panicked' "$work/derpd.log" || true)
text="soak: $("$derpd" --version), $clients churning Tailscale derphttp clients${fresh:+ (a fresh key per connection)}, $minutes min, \
packets every ${interval_ms} ms per client, sampled every ${sample} s ($csv)
$report
clients: logins $(get logins), login errors $(get login_errors), packets sent $(get sends) \
(send errors $(get send_errors)), packets received $(get received) ($(get bytes_received) bytes), \
PeerGone $(get peer_gone), connections closed by the server $(get server_closed), \
reconnects inside a life $(get reconnects), corrupt packets $(get corrupt)
derpd idle (elapsed_s,rss_kib,hwm_kib,fds,threads,cpu_s): before the clients $idle_before; after they left $idle_after
derpd: WARN/ERROR lines $warns, panics $panics, still running at the end: $alive, exit status on SIGTERM: $derpd_status
churn harness exit status: $churn_status"
echo "$text" | tee "$name.txt"
if [[ $warns != 0 ]]; then
  echo "--- derpd WARN/ERROR lines (first 20)" | tee -a "$name.txt"
  grep -E '^(WARN|ERROR)' "$work/derpd.log" | head -20 | tee -a "$name.txt"
fi
[[ $alive == yes && $derpd_status == 0 && $churn_status == 0 && $panics == 0 ]] || exit 1
grep -q 'verdict: no drift' <<<"$report" || exit 1
