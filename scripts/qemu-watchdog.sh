#!/usr/bin/env bash
# cargo's test runner in scripts/cross-test.sh: `qemu-watchdog.sh QEMU TEST_BINARY ARGS...` runs
# one test binary under qemu-user with a time limit (CROSS_TEST_BINARY_LIMIT seconds, 1,200 by
# default: the tests are grouped into one binary per tier, and the whole mips suite took about
# 450 s under QEMU on 2 cores, the attacks, now in tests/process.rs, about 190 s of it).
#
# Why: a test binary once stopped for good under qemu-mips in CI (the lifecycle tests, in a test
# that passes in 2 s; every wait in it has a deadline, so the suspect is qemu-user itself, e.g. a
# fork from a multi-threaded guest that never reaches its exec; the report below will tell). Without a limit such a hang eats the whole CI budget and
# says nothing. With it, the hang is reported (HANG, with every stuck process's threads and the
# system call each is in), the process group is killed, and the binary runs once more; a second
# hang, or a failure in the rerun, fails. scripts/cross-test.sh counts the HANG lines in its
# summary, so a rerun is never silent.
set -uo pipefail
[[ $# -ge 2 ]] || { echo "usage: $0 QEMU TEST_BINARY [ARGS...]" >&2; exit 2; }
limit=${CROSS_TEST_BINARY_LIMIT:-1200}

# The processes of process group $1: pid, parent, state, age, kernel wait channel, command;
# then, per thread, the system call it is blocked in (number and arguments, /proc/*/syscall).
diagnose() {
  local pgid=$1 p t
  ps -o pid,ppid,stat,etime,wchan:24,args -g "$pgid" >&2 || true
  for p in $(ps -o pid= -g "$pgid"); do
    for t in /proc/"$p"/task/*; do
      echo "  pid $p thread ${t##*/}: syscall $(cat "$t"/syscall 2>/dev/null)" \
        "wchan $(cat "$t"/wchan 2>/dev/null)" >&2
    done
  done
}

# 0 while process $1 runs (a zombie is not running).
running() {
  local stat
  stat=$(cat /proc/"$1"/stat 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# Runs the command in a process group of its own; 124 if it outlived the limit.
run_once() {
  setsid "$@" &
  local pid=$! deadline=$((SECONDS + limit))
  while running "$pid"; do
    if ((SECONDS >= deadline)); then
      echo "HANG: ${2##*/} still running after ${limit} s under $1; its processes:" >&2
      diagnose "$pid"
      kill -KILL -- "-$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 124
    fi
    sleep 0.1
  done
  wait "$pid"
}

run_once "$@"
rc=$?
if ((rc == 124)); then
  echo "HANG: running ${2##*/} once more" >&2
  run_once "$@"
  rc=$?
fi
exit "$rc"
