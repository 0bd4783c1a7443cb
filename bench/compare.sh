#!/usr/bin/env bash
# derpd and Tailscale's derper side by side, in one run on one machine.
#
#   bench/compare.sh            full run (3 repetitions) -> bench/results/latest.{json,md,svg}
#   bench/compare.sh --quick    one short repetition (CI: proves the harness works, no
#                               thresholds) -> target/bench/quick.{json,md,svg}
#   options: --reps N, --seconds S, --clients "1000 5000 10000",
#            --glibc (the host's glibc release build instead of the static musl one),
#            --server-cpus N (the server on CPUs 0..N-1, derpd with --threads N; the load
#            generator on CPU N; default 1)
#   env: DERPD_BIN (benchmark this derpd binary instead)
#
# By default derpd is the static x86_64 musl release build: what every package ships (the
# host's glibc build is faster, with glibc's allocator and memcpy; --glibc measures that one).
# The results name the binary's Rust target.
#
# Both servers get the same setup: manual certificate mode with one self-signed ECDSA P-256
# certificate for 127.0.0.1 (made here with openssl), STUN off, no port-80 listener, and a
# fresh process for every measurement. The server is pinned to CPU 0 and the load generator
# (bench/load.rs, one thread) to CPU 1 with taskset. Server CPU time comes from
# /proc/<pid>/stat and memory from /proc/<pid>/status, read by the load generator at the
# edges of each measured window.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

quick=0 reps=3 seconds=5 clients="1000 5000 10000" loads="25 50 75" glibc=0 server_cpus=1
args=("$@")
while (($#)); do
  case $1 in
    --quick) quick=1 ;;
    --reps) reps=$2; shift ;;
    --seconds) seconds=$2; shift ;;
    --clients) clients=$2; shift ;;
    --glibc) glibc=1 ;;
    --server-cpus) server_cpus=$2; shift ;;
    *) echo "usage: bench/compare.sh [--quick] [--reps N] [--seconds S] [--clients LIST] [--glibc] [--server-cpus N]" >&2
      exit 2 ;;
  esac
  shift
done
command="bench/compare.sh${args[*]:+ ${args[*]}}"
warmup=1 idle_settle=1 login_conc=16
# Frames per second of the duplicate-key fight scenario (two connections of one key).
fight=20000
if ((quick)); then
  # Small, but every scenario, and more idle clients than derpd's default --max-clients: a
  # limit the full run must lift is caught here.
  reps=1 seconds=1 warmup=0.3 idle_settle=0.3 clients=2100 loads=50
fi
out=bench/results
((quick)) && out=target/bench

say() { echo "compare: $*" >&2; }

# ---- tools: derper at the version the interop tests pin, derpd, the load generator ----
version=$(awk '$1 == "tailscale.com" { print $2 }' tests/interop/go.mod)
[[ -n $version ]] || { say "no tailscale.com version in tests/interop/go.mod"; exit 1; }
bindir=$root/target/bench/bin
derper=$bindir/derper
if [[ ! -x $derper || $(cat "$bindir/derper.version" 2>/dev/null) != "$version" ]]; then
  gobin=$(scripts/ensure-go.sh)
  say "installing derper $version"
  GOBIN=$bindir "$gobin/go" install "tailscale.com/cmd/derper@$version"
  echo "$version" >"$bindir/derper.version"
fi
if [[ -n ${DERPD_BIN:-} ]]; then
  derpd=$DERPD_BIN derpd_target="given by DERPD_BIN"
elif ((glibc)); then
  say "building derpd (release, the host's glibc build)"
  cargo build --release --locked --quiet --bin derpd
  derpd=$root/target/release/derpd derpd_target=$(rustc -vV | sed -n 's/^host: //p')
else
  derpd_target=x86_64-unknown-linux-musl
  say "building derpd (release, static $derpd_target: what the packages ship)"
  (
    # shellcheck source=scripts/cross-env.sh
    source scripts/cross-env.sh
    cross_setup "$derpd_target" >&2
    "${CARGO_CMD[@]}" build --release --locked --quiet "${TARGET_ARGS[@]}" --bin derpd
  )
  derpd=$root/target/$derpd_target/release/derpd
fi
say "building the load generator"
cargo build --profile loadgen --features bench --locked --quiet --bin derpd-load
# Heap allocations are counted in the glibc build (bench/alloc-count.c, preloaded; a static
# binary cannot be), the same code as the musl build's.
if [[ ${derpd_target:-} == *-gnu ]]; then
  derpd_glibc=$derpd
else
  say "building derpd (release, glibc) for the allocation counts"
  cargo build --release --locked --quiet --bin derpd
  derpd_glibc=$root/target/release/derpd
fi
load=$root/target/loadgen/derpd-load

# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup p256
cc -O2 -shared -fPIC -o "$work/alloc-count.so" bench/alloc-count.c
allocs=$work/allocs.bin

# Idle runs hold thousands of connections on each side.
ulimit -n "$(ulimit -Hn)"
maxfd=$(ulimit -n)

if (($(nproc) > server_cpus)); then
  pin_server=(taskset -c "0-$((server_cpus - 1))") pin_load=(taskset -c "$server_cpus")
elif ((server_cpus > 1)); then
  say "--server-cpus $server_cpus needs $((server_cpus + 1)) CPUs; this machine has $(nproc)"
  exit 2
else
  say "fewer than 2 CPUs: server and load generator are not pinned apart"
  pin_server=() pin_load=()
fi

# derpd's limits that a benchmark would hit, lifted to what it needs (derper has none): every
# idle client logged in at once, every load from 127.0.0.1 (64 logins at once for idle).
max_clients=2048
for n in $clients; do ((n + 16 > max_clients)) && max_clients=$((n + 16)); done
derpd_limits=(--max-clients="$max_clients" --max-handshakes-per-ip=256 --threads="$server_cpus")
say "derpd runs with ${derpd_limits[*]} (its defaults: 2048, 16 and one thread per CPU)"

# start_server NAME: starts a fresh server, sets server_pid and addr, waits until it listens.
start_server() {
  local port
  port=$(free_port)
  addr=127.0.0.1:$port
  local common=(-a "$addr" -hostname 127.0.0.1 -certmode manual -certdir "$work" -stun=false
    -http-port=-1 -c "$work/$1.key")
  case $1 in
    derpd) "${pin_server[@]}" "$derpd" "${common[@]}" "${derpd_limits[@]}" \
      >"$work/$1.log" 2>&1 & ;;
    derper) "${pin_server[@]}" "$derper" "${common[@]}" >"$work/$1.log" 2>&1 & ;;
    derpd-counted) rm -f "$allocs"
      LD_PRELOAD=$work/alloc-count.so DERPD_ALLOC_COUNT_FILE=$allocs "${pin_server[@]}" \
        "$derpd_glibc" "${common[@]}" "${derpd_limits[@]}" >"$work/$1.log" 2>&1 & ;;
  esac
  server_pid=$!
  local i
  for ((i = 0; i < 200; i++)); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      say "$1 exited at startup:"; cat "$work/$1.log" >&2; exit 1
    fi
    # A bare TCP connect that closes at once: the listener is up.
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.05
  done
  say "$1 did not listen on $addr"; cat "$work/$1.log" >&2; exit 1
}

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

raw=$work/raw.jsonl
# run NAME SCENARIO REP [label fields] -- load generator args: one fresh server, one record.
run() {
  local name=$1 scenario=$2 rep=$3 extra=$4
  shift 5
  start_server "$name"
  local label="{\"server\":\"${name%-counted}\",\"scenario\":\"$scenario\",\"rep\":$rep$extra}"
  if ! "${pin_load[@]}" "$load" "$@" --addr "$addr" --cert "$cert" --pid "$server_pid" \
    --label "$label" >>"$raw"; then
    say "load generator failed ($name $scenario); server log:"; tail -20 "$work/$name.log" >&2
    exit 1
  fi
  stop_server
  say "$(tail -1 "$raw")"
}

strip -o "$work/derper.stripped" "$derper"
derper_size=$(stat -c %s "$work/derper.stripped")
derpd_size=$(stat -c %s "$derpd")
cpu_model=$(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1)
python3 - "$raw" <<EOF
import json, sys, datetime
rec = {"scenario": "machine", "cpu_model": "$cpu_model", "cores": $(nproc),
       "kernel": "$(uname -r)", "date": datetime.date.today().isoformat(),
       "derper_version": "$version", "derpd_version": "$("$derpd" --version)",
       "loadgen": "bench/load.rs, 1 thread on CPU $server_cpus; server on CPUs 0-$((server_cpus - 1)); fd limit $maxfd",
       "server_cpus": $server_cpus,
       "derpd_flags": "${derpd_limits[*]}", "derpd_target": "$derpd_target"}
open(sys.argv[1], "a").write(json.dumps(rec) + "\n")
EOF

for ((rep = 1; rep <= reps; rep++)); do
  # Alternate who goes first, so slow drift of the machine does not favour one side.
  if ((rep % 2)); then order="derpd derper"; else order="derper derpd"; fi
  for s in $order; do
    run "$s" throughput "$rep" "" -- throughput --seconds "$seconds" --warmup "$warmup"
    run "$s" flood "$rep" "" -- throughput --window 0 --seconds "$seconds" --warmup "$warmup"
    # The throughput run again while two connections of one key fight (send alternately):
    # the pairs' CPU per packet should not move (issue 17, point 8).
    run "$s" fight "$rep" "" -- throughput --fight "$fight" --seconds "$seconds" \
      --warmup "$warmup"
  done
  # The latency loads are fractions of derper's saturation rate in this repetition.
  sat=$(python3 -c "
import json,sys
r=[json.loads(l) for l in open('$raw')]
print(max(x['pps'] for x in r if x.get('server')=='derper' and x.get('scenario')=='throughput' and x.get('rep')==$rep))")
  for pct in $loads; do
    rate=$(python3 -c "print(round($sat * $pct / 100))")
    for s in $order; do
      run "$s" latency "$rep" ",\"load_pct\":$pct" -- latency --rate "$rate" \
        --seconds "$seconds" --warmup "$warmup"
    done
  done
  for s in $order; do
    run "$s" logins "$rep" "" -- logins --concurrency "$login_conc" --seconds "$seconds" \
      --warmup "$warmup"
  done
  # derpd's heap allocations per relayed packet and per login (derper's Go heap is not counted).
  run derpd-counted allocs "$rep" ',"kind":"packets"' -- throughput --seconds "$seconds" \
    --warmup "$warmup" --alloc-counter "$allocs"
  run derpd-counted allocs "$rep" ',"kind":"logins"' -- logins --concurrency "$login_conc" \
    --seconds "$seconds" --warmup "$warmup" --alloc-counter "$allocs"
  for n in $clients; do
    if ((n + 100 > maxfd)); then
      say "skipping $n idle clients: fd limit $maxfd"
      continue
    fi
    for s in $order; do
      run "$s" idle "$rep" "" -- idle --clients "$n" --concurrency 64 --warmup "$idle_settle"
    done
  done
  # Binary size and the memory of a server that has only just started.
  for s in $order; do
    start_server "$s"
    sleep "$idle_settle"
    size=$derpd_size
    [[ $s == derper ]] && size=$derper_size
    python3 - "$raw" "$s" "$rep" "$size" "$server_pid" <<'EOF'
import json, sys
raw, name, rep, size, pid = sys.argv[1:]
st = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status"))
kib = lambda k: int(st[k].split()[0])
rec = {"server": name, "scenario": "static", "rep": int(rep), "binary_bytes": int(size),
       "rss_idle_kib": kib("VmRSS"), "hwm_idle_kib": kib("VmHWM")}
open(raw, "a").write(json.dumps(rec) + "\n")
EOF
    stop_server
  done
done

mkdir -p "$out"
((quick)) || cp "$raw" "$out/raw.jsonl"
report_args=("$raw" "$out" --command "$command")
((quick)) && report_args+=(--quick)
python3 bench/report.py "${report_args[@]}"
say "results in $out"
