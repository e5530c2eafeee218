#!/usr/bin/env bash
# Instructions per non-stream request, counted by callgrind: deterministic for a given binary
# and input, so a change of a few percent shows where wall-clock timings on a shared machine
# cannot. The gateway runs under callgrind (instrumentation off at start), a standalone mock
# answers on loopback, wrk warms up, then instrumentation is switched on for a fixed number of
# seconds of wrk at concurrency C. Prints user-space instructions (all threads) per request, and
# that figure split by thread: the HTTP workers, the wallet and route actors' threads, the ledger
# writer and sled's own threads. The writer's and sled's share per request depends on how many
# requests each group-committed batch holds, so on the request rate in the window (which moves
# with the machine's other load); the other threads' shares do not, so compare those between
# binaries whose runs differ in request count.
#
# usage: loadtest/callgrind.sh [BINARY] [SECONDS] [CONCURRENCY]
#   BINARY defaults to target/release/tollgate (build it with `cargo build --release`).
#   CG_STREAM=N streams N tokens per request instead (64-token bursts: `CG_STREAM=64`; the mock
#   sends them without delay, include_usage on); divide by N for instructions per chunk.
#   CG_KEEP=DIR keeps the dumps (one per thread: DIR/load.out-NN and DIR/idle.out-NN) and wrk's
#   report, for `callgrind_annotate --inclusive=yes DIR/load.out-*`.
# Needs valgrind (callgrind_control) and wrk (Debian packages `valgrind`, `wrk`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/tollgate}
secs=${2:-10}
conc=${3:-8}
tokens=${CG_STREAM:-16}
. loadtest/one-route.sh
"$bin" mock-upstream --listen "127.0.0.1:$mock" --ttft-ms 0 --tokens "$tokens" --interval-ms 0 >"$tmp/mock.log" 2>&1 &
pids+=($!)
one_route_config "$tmp/gw.toml" "$gw" "$admin" "$mock" "$tmp/data" 2
valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no --callgrind-out-file="$tmp/cg.out" \
  "$bin" serve --config "$tmp/gw.toml" >"$tmp/gw.log" 2>&1 &
vg=$!
pids+=($vg)
wait_ready 600
one_route_wrk "$tokens" "$([ -n "${CG_STREAM:-}" ] && echo 1 || echo 0)"
wrk -t1 -c"$conc" -d3s -s "$tmp/post.lua" "$url" >/dev/null
callgrind_control -z "$vg" >/dev/null 2>&1
callgrind_control -i on "$vg" >/dev/null 2>&1
wrk -t1 -c"$conc" -d"${secs}s" -s "$tmp/post.lua" "$url" >"$tmp/wrk.txt"
callgrind_control -i off "$vg" >/dev/null 2>&1
callgrind_control -d "$vg" >/dev/null 2>&1
# The same time idle: timers, flushes and probes cost instructions whatever the load, and on a
# shared machine the number of requests in the window varies; subtracting the idle window makes
# runs with different request counts comparable.
callgrind_control -i on "$vg" >/dev/null 2>&1
sleep "$secs"
callgrind_control -i off "$vg" >/dev/null 2>&1
callgrind_control -d "$vg" >/dev/null 2>&1
sleep 2
requests=$(awk '/requests in/ {print $1}' "$tmp/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$tmp/wrk.txt")
# One dump per thread: cg.out.1-NN under load, cg.out.2-NN idle. A thread is known by the code
# it ran (the same thread number in both dumps is the same thread).
kind() {
  if grep -q 'tollgate::ledger::writer::run' "$1"; then echo writer
  elif grep -q 'actix_http::h1::dispatcher' "$1"; then echo http
  elif grep -q 'WalletActor' "$1"; then echo wallet
  elif grep -q 'RouteActor' "$1"; then echo route
  elif grep -q 'sled::' "$1"; then echo sled
  else echo other
  fi
}
: >"$tmp/threads.txt"
for f in "$tmp"/cg.out.1-*; do
  idle_f=${f/cg.out.1-/cg.out.2-}
  i=0
  [ -f "$idle_f" ] && i=$(awk '/^totals:/ {print $2}' "$idle_f")
  echo "$(kind "$f") $(awk '/^totals:/ {print $2}' "$f") ${i:-0}" >>"$tmp/threads.txt"
done
if [ -n "${CG_KEEP:-}" ]; then
  mkdir -p "$CG_KEEP"
  for f in "$tmp"/cg.out.1-*; do cp "$f" "$CG_KEEP/load.out-${f##*-}"; done
  for f in "$tmp"/cg.out.2-*; do cp "$f" "$CG_KEEP/idle.out-${f##*-}"; done
  cp "$tmp/wrk.txt" "$tmp/threads.txt" "$CG_KEEP/"
fi
load=$(awk '{ s += $2 } END { printf "%d", s }' "$tmp/threads.txt")
idle=$(awk '{ s += $3 } END { printf "%d", s }' "$tmp/threads.txt")
echo "binary: $bin"
echo "requests: $requests (non-2xx: ${non2xx:-0}) in ${secs}s at c=$conc"
echo "instructions: $load under load, $idle idle"
awk -v l="$load" -v i="$idle" -v r="$requests" 'BEGIN { printf "instructions per request: %.0f (%.0f with the idle background)\n", (l - i) / r, l / r }'
awk -v r="$requests" '{ l[$1] += $2; i[$1] += $3 }
  END {
    printf "per request, by thread (idle subtracted):"
    n = split("http wallet route writer sled other", k, " ")
    for (j = 1; j <= n; j++) printf " %s %.0f", k[j], (l[k[j]] - i[k[j]]) / r
    printf "\n"
  }' "$tmp/threads.txt"
if [ -n "${CG_STREAM:-}" ]; then
  awk -v l="$load" -v i="$idle" -v r="$requests" -v n="$CG_STREAM" \
    'BEGIN { printf "instructions per streamed chunk: %.0f (%d chunks per request)\n", (l - i) / r / n, n }'
fi
