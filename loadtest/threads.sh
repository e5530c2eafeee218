#!/usr/bin/env bash
# Where the gateway's CPU goes, thread by thread: a standalone mock upstream and wrk on one core,
# the gateway pinned to the other, wrk at concurrency C for a fixed time; then, for each gateway
# thread, user and system CPU per request and context switches per request, read from
# /proc/PID/task/*/stat and status before and after the window. Quicker than callgrind and it
# counts the kernel's share (sockets, wake-ups), which instruction counts leave out; but it is a
# timing, so compare binaries in alternating runs on a quiet machine.
#
# usage: loadtest/threads.sh [BINARY] [SECONDS] [CONCURRENCY]
#   BINARY defaults to target/release/tollgate (build it with `cargo build --release`).
#   STREAM=N       N-token streams (include_usage) instead of non-stream requests of 16 tokens;
#                  INTERVAL=MS paces them (default 0: bursts).
#   WORKERS=N      the gateway's HTTP workers (default 2).
#   PRELOAD=LIB    runs the gateway with LD_PRELOAD=LIB (to compare allocators).
#   PERF=FILE      also records `perf record -g` of the gateway over the window into FILE
#                  (PERF_CALLGRAPH="--call-graph dwarf" for stacks through code without frame
#                  pointers; PERF_FREQ=HZ, default 2000).
# Needs wrk and taskset; two or more cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/tollgate}
secs=${2:-10}
conc=${3:-64}
tokens=${STREAM:-16}
. loadtest/one-route.sh
taskset -c 1 "$bin" mock-upstream --listen "127.0.0.1:$mock" --ttft-ms 0 --tokens "$tokens" \
  --interval-ms "${INTERVAL:-0}" >"$tmp/mock.log" 2>&1 &
pids+=($!)
one_route_config "$tmp/gw.toml" "$gw" "$admin" "$mock" "$tmp/data" "${WORKERS:-2}"
taskset -c 0 env ${PRELOAD:+LD_PRELOAD=$PRELOAD} "$bin" serve --config "$tmp/gw.toml" >"$tmp/gw.log" 2>&1 &
gwpid=$!
pids+=($gwpid)
wait_ready 100
one_route_wrk "$tokens" "$([ -n "${STREAM:-}" ] && echo 1 || echo 0)"
taskset -c 1 wrk -t1 -c"$conc" -d2s -s "$tmp/post.lua" "$url" >/dev/null
# One line per thread: name, utime, stime (clock ticks), voluntary and involuntary switches.
snapshot() {
  for t in /proc/"$gwpid"/task/*; do
    echo "$(tr ' ' _ <"$t/comm")#${t##*/} $(awk '{print $14, $15}' "$t/stat") $(awk '/^(voluntary|nonvoluntary)_ctxt_switches/ {printf "%s ", $2}' "$t/status")"
  done | sort
}
snapshot >"$tmp/before"
if [ -n "${PERF:-}" ]; then
  perf record -F "${PERF_FREQ:-2000}" ${PERF_CALLGRAPH:--g} -p "$gwpid" -o "$PERF" -- sleep "$secs" >/dev/null 2>&1 &
  pids+=($!)
fi
taskset -c 1 wrk -t1 -c"$conc" -d"${secs}s" --latency -s "$tmp/post.lua" "$url" >"$tmp/wrk.txt"
snapshot >"$tmp/after"
requests=$(awk '/requests in/ {print $1}' "$tmp/wrk.txt")
grep -E 'requests in|Requests/sec|Non-2xx|timeout' "$tmp/wrk.txt" || true
grep -A4 'Latency Distribution' "$tmp/wrk.txt" || true
grep VmHWM "/proc/$gwpid/status"
ticks=$(getconf CLK_TCK)
join "$tmp/before" "$tmp/after" | awk -v n="$requests" -v hz="$ticks" '
  { u = ($6 - $2) * 1e6 / hz / n; s = ($7 - $3) * 1e6 / hz / n; c = ($8 - $4 + $9 - $5) / n
    tu += u; ts += s; tc += c
    if (u + s > 0.05) printf "%-24s user %6.2f  sys %6.2f µs/request  switches %.3f/request\n", $1, u, s, c }
  END { printf "%-24s user %6.2f  sys %6.2f µs/request (%.2f)  switches %.3f/request\n", "all threads", tu, ts, tu + ts, tc }'
