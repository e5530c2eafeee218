#!/usr/bin/env bash
# Instructions per non-stream request, counted by callgrind: deterministic for a given binary
# and input, so a change of a few percent shows where wall-clock timings on a shared machine
# cannot. The gateway runs under callgrind (instrumentation off at start), a standalone mock
# answers on loopback, wrk warms up, then instrumentation is switched on for a fixed number of
# seconds of wrk at concurrency C. Prints user-space instructions (all threads) per request.
#
# usage: loadtest/callgrind.sh [BINARY] [SECONDS] [CONCURRENCY]
#   BINARY defaults to target/release/tollgate (build it with `cargo build --release`).
#   CG_KEEP=DIR keeps the two dumps (DIR/load.out, DIR/idle.out) and wrk's report for
#   `callgrind_annotate --inclusive=yes DIR/load.out`.
# Needs valgrind (callgrind_control) and wrk (Debian packages `valgrind`, `wrk`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/tollgate}
secs=${2:-10}
conc=${3:-8}
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock=$(free_port); gw=$(free_port); admin=$(free_port)
"$bin" mock-upstream --listen "127.0.0.1:$mock" --ttft-ms 0 --tokens 16 --interval-ms 0 >"$tmp/mock.log" 2>&1 &
pids+=($!)
cat >"$tmp/gw.toml" <<TOML
[server]
listen = "127.0.0.1:$gw"
admin_listen = "127.0.0.1:$admin"
admin_token = "cg-admin"
data_dir = "$tmp/data"
workers = 2

[buckets.credit]
currency = "USD"
kind = "official"

[[providers]]
id = "mock"
base_url = "http://127.0.0.1:$mock/v1"

[[models]]
name = "m"
tokenizer = "chunks"
routes = [
  { provider = "mock", upstream_model = "m", bucket = "credit", input_per_mtok = "0.5", output_per_mtok = "2" },
]

[[keys]]
name = "cg"
secret = "tg-callgrind-key"
topup = { credit = "1000000" }
TOML
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$tmp/cg.out" \
  "$bin" serve --config "$tmp/gw.toml" >"$tmp/gw.log" 2>&1 &
vg=$!
pids+=($vg)
for _ in $(seq 1 600); do
  curl -fsS -o /dev/null "http://127.0.0.1:$admin/readyz" 2>/dev/null && break
  sleep 0.2
done
cat >"$tmp/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hello there, how are you"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer tg-callgrind-key"
LUA
url="http://127.0.0.1:$gw/v1/chat/completions"
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
if [ -n "${CG_KEEP:-}" ]; then
  mkdir -p "$CG_KEEP"
  cp "$tmp/cg.out.1" "$CG_KEEP/load.out"
  cp "$tmp/cg.out.2" "$CG_KEEP/idle.out"
  cp "$tmp/wrk.txt" "$CG_KEEP/wrk.txt"
fi
requests=$(awk '/requests in/ {print $1}' "$tmp/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$tmp/wrk.txt")
load=$(awk '/^totals:/ {print $2}' "$tmp/cg.out.1")
idle=$(awk '/^totals:/ {print $2}' "$tmp/cg.out.2")
echo "binary: $bin"
echo "requests: $requests (non-2xx: ${non2xx:-0}) in ${secs}s at c=$conc"
echo "instructions: $load under load, $idle idle"
awk -v l="$load" -v i="$idle" -v r="$requests" 'BEGIN { printf "instructions per request: %.0f (%.0f with the idle background)\n", (l - i) / r, l / r }'
