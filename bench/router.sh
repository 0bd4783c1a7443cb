#!/usr/bin/env bash
# Guest instructions per relayed packet and per login of the router builds, under QEMU
# (issue 21): wall-clock time under QEMU means nothing, the instructions a guest executes are
# stable and comparable across architectures and commits.
#
#   bench/router.sh                      every router target, 3 repetitions
#   bench/router.sh --quick              one short repetition (a smoke run; no thresholds)
#   options: --targets "mipsel-unknown-linux-musl ...", --reps N, --seconds S,
#            --ciphers "auto aes chacha" (derpd's --tls-ciphers; each one measured; default auto),
#            --cert-key p256|ed25519 (the certificate's key; default p256, as bench/compare.sh)
#   env: DERPD_BIN_DIR (take DIR/derpd-<target> instead of building; e.g. dist after
#        scripts/build-release.sh)
#
# For each target: the release binary (built as scripts/build-release.sh builds it, or taken
# from DERPD_BIN_DIR) runs under Debian's dynamic qemu-<arch> with the counter plugin
# (bench/qemu-insn.c, scripts/ensure-qemu-insn.sh), one worker thread, manual certificate mode
# with one self-signed certificate for 127.0.0.1 (ECDSA P-256 as bench/compare.sh, or Ed25519).
# The load generator (bench/load.rs, on the host) reads the counter at the edges of its measured
# window (`--insn-counter`):
#   - packets: one sender and one receiver, 1,400-byte packets over TLS, at most 32 in flight;
#   - logins: 4 loops of TCP connect, TLS 1.3 handshake, DERP login, reset.
# Before them, two readings S seconds apart with no load give the idle baseline, which is
# subtracted (instructions per second times the window, per packet or login). Results:
# target/bench/router.jsonl (one line per measurement) and a table with median and the spread
# of the repetitions ((max - min) / median).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

# shellcheck source=scripts/cross-env.sh
source scripts/cross-env.sh
targets="mipsel-unknown-linux-musl mips-unknown-linux-musl armv7-unknown-linux-musleabihf aarch64-unknown-linux-musl"
reps=3 seconds=5 warmup=1 ciphers=auto cert_key=p256 quick=0
args=("$@")
while (($#)); do
  case $1 in
    --quick) reps=1 seconds=1 warmup=0.3 quick=1 ;;
    --targets) targets=$2; shift ;;
    --reps) reps=$2; shift ;;
    --seconds) seconds=$2; shift ;;
    --ciphers) ciphers=$2; shift ;;
    --cert-key) cert_key=$2; shift ;;
    *) echo "usage: bench/router.sh [--quick] [--targets LIST] [--reps N] [--seconds S] [--ciphers LIST] [--cert-key p256|ed25519]" >&2
      exit 2 ;;
  esac
  shift
done
say() { echo "router: $*" >&2; }

plugin=$(scripts/ensure-qemu-insn.sh)
say "building the load generator"
cargo build --profile loadgen --features bench --locked --quiet --bin derpd-load
load=$root/target/loadgen/derpd-load

# A full run's results are committed (bench/results/router.{jsonl,md}), so a change that costs
# instructions shows in its diff; a quick run's stay in target/bench.
out=$root/bench/results
((quick)) && out=$root/target/bench
mkdir -p "$out"
# shellcheck source=bench/lib.sh
source bench/lib.sh
bench_setup "$cert_key"
results=$out/router.jsonl
: >"$results"
ctl=$work/insn.ctl insns=$work/insn.out
mkfifo "$ctl"

# reading: the counter's total now (a newline to its FIFO, then the line it appends).
reading() {
  local n i
  n=$(grep -vc '^exit' "$insns" 2>/dev/null || true)
  echo >"$ctl"
  for ((i = 0; i < 10000; i++)); do
    if (($(grep -vc '^exit' "$insns" 2>/dev/null || true) > n)); then
      grep -v '^exit' "$insns" | tail -1
      return 0
    fi
    sleep 0.001
  done
  say "no reading from the counter"; return 1
}

# last_two: the two records just written, in a line.
last_two() {
  python3 -c '
import json, sys
for l in sys.stdin:
    r = json.loads(l)
    k = "insns_per_packet" if r["scenario"] == "packets" else "insns_per_login"
    print(r["scenario"], r[k], end="; ")'
}

for t in $targets; do
  cross_setup "$t" >&2
  qemu=${QEMU%-static}
  [[ -n $qemu ]] || { say "$t is the host's architecture: nothing to emulate"; continue; }
  if [[ -n ${DERPD_BIN_DIR:-} ]]; then
    bin=$DERPD_BIN_DIR/derpd-$t
  else
    say "building the $t release binary"
    "${CARGO_CMD[@]}" build --release --locked --quiet "${TARGET_ARGS[@]}" "${RELEASE_ARGS[@]}" \
      --bin derpd
    bin=$root/target/$t/release/derpd
  fi
  for ((rep = 1; rep <= reps; rep++)); do
    for c in $ciphers; do
      port=$(free_port)
      addr=127.0.0.1:$port
      : >"$insns"
      "$qemu" -plugin "$plugin,ctl=$ctl,out=$insns" "$bin" -a "$addr" -hostname 127.0.0.1 \
        -certmode manual -certdir "$work" -stun=false -http-port=-1 -c "$work/derpd.key" \
        --threads=1 --tls-ciphers="$c" >"$work/server.log" 2>&1 &
      server_pid=$!
      for ((i = 0; i < 600; i++)); do
        kill -0 "$server_pid" 2>/dev/null || { say "derpd exited:"; cat "$work/server.log" >&2; exit 1; }
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.05
      done
      # derpd goes on starting after it listens (the meta-certificate, the first scrape of
      # its own state): wait until two readings half a second apart agree (bounded).
      prev=$(reading)
      for ((i = 0; i < 60; i++)); do
        sleep 0.5
        now=$(reading)
        [[ $now == "$prev" ]] && break
        prev=$now
      done
      # The idle baseline: no load for the length of a measured window.
      i0=$(reading) s0=$(date +%s.%N)
      sleep "$seconds"
      i1=$(reading) s1=$(date +%s.%N)
      idle_rate=$(python3 -c "print(($i1 - $i0) / ($s1 - $s0))")
      common=(--addr "$addr" --cert "$cert" --insn-counter "$ctl,$insns" --seconds "$seconds"
        --warmup "$warmup")
      label="{\"target\":\"$t\",\"ciphers\":\"$c\",\"cert_key\":\"$cert_key\",\"rep\":$rep,\"idle_insns_per_s\":$idle_rate}"
      "$load" throughput --pairs 1 --size 1400 --window 32 "${common[@]}" \
        --label "${label%\}},\"scenario\":\"packets\"}" >>"$results"
      "$load" logins --concurrency 4 "${common[@]}" \
        --label "${label%\}},\"scenario\":\"logins\"}" >>"$results"
      kill "$server_pid"
      wait "$server_pid" 2>/dev/null || true
      server_pid=
      say "$t --tls-ciphers $c rep $rep: $(tail -2 "$results" | last_two)"
    done
  done
done

python3 - "$results" "bench/router.sh ${args[*]}" <<'EOF' | tee "$out/router.md"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"Guest instructions under qemu-user, {__import__('datetime').date.today()}, `{sys.argv[2].strip()}`:")
print()
print("| target | `--tls-ciphers` | certificate key | guest instructions per relayed packet | per login | repetitions |")
print("|---|---|---|---:|---:|---:|")
targets = []
for r in rows:
    if (r["target"], r["ciphers"]) not in targets:
        targets.append((r["target"], r["ciphers"]))
def corrected(r, units_key, per_key):
    units = r[units_key]
    # The idle baseline over the window, spread over its packets or logins.
    return r[per_key] - r["idle_insns_per_s"] * r["seconds"] / units if units else 0
def cell(xs):
    if not xs:
        return "—"
    m = statistics.median(xs)
    spread = (max(xs) - min(xs)) / m * 100 if m else 0
    return f"{m:,.0f} (±{spread / 2:.1f} %)" if len(xs) > 1 else f"{m:,.0f}"
for t, c in targets:
    mine = [r for r in rows if r["target"] == t and r["ciphers"] == c]
    p = [corrected(r, "received", "insns_per_packet") for r in mine if r["scenario"] == "packets"]
    l = [corrected(r, "logins", "insns_per_login") for r in mine if r["scenario"] == "logins"]
    key = mine[0].get("cert_key", "p256") if mine else ""
    print(f"| `{t}` | {c} | {key} | {cell(p)} | {cell(l)} | {len(p)} |")
EOF
