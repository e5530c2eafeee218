#!/usr/bin/env bash
# One sled instance, two builds, one run: the gateway CPU per non-stream request (the
# `nonstream` scenario) and per streamed token (`steady-streams`) of an earlier build
# (OLD_BIN, e.g. the last commit before the fleet's store seams, built in its own worktree) and
# of this tree's release build, alternating old, new, old, new so that the machine's load
# falls on both alike. Both run the same config (OLD_CONFIG if given, so that the earlier build
# understands it; else loadtest/gateway.toml), the same mocks and the same load generator
# (this tree's). Writes loadtest/results/sled-before-after.md; each run's own report goes
# to a temporary folder.
#
#   OLD_BIN=/path/to/old/tollgate loadtest/sled-before-after.sh
#   OLD_BIN=... OLD_CONFIG=/path/to/old/loadtest/gateway.toml SCALE=0.5 loadtest/sled-before-after.sh
set -euo pipefail
cd "$(dirname "$0")/.."

: "${OLD_BIN:?set OLD_BIN to the tollgate binary of the earlier build}"
CONFIG=${OLD_CONFIG:-loadtest/gateway.toml}
SCALE=${SCALE:-1}
ROUNDS=${ROUNDS:-2}
SCENARIOS=${SCENARIOS:-"nonstream steady-streams"}
OUT=${OUT:-loadtest/results}
BASE_PORT=${BASE_PORT:-18280}
GATEWAY_PORT=$BASE_PORT
ADMIN_PORT=$((BASE_PORT + 1))
PRIMARY_PORT=$((BASE_PORT + 11))
BACKUP_PORT=$((BASE_PORT + 12))
KEY="tg-loadtest-0123456789"
ADMIN_TOKEN="lt-admin-token"

. loadtest/lib.sh

"$BIN/tollgate" mock-upstream --listen "127.0.0.1:$PRIMARY_PORT" --ttft-ms 0 --tokens 64 --interval-ms 20 \
  >"$TMP/primary.log" 2>&1 &
PIDS+=($!)
"$BIN/tollgate" mock-upstream --listen "127.0.0.1:$BACKUP_PORT" --ttft-ms 0 --tokens 64 --interval-ms 20 \
  >"$TMP/backup.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$PRIMARY_PORT/stats"
wait_http "http://127.0.0.1:$BACKUP_PORT/stats"

run_one() { # LABEL BINARY SCENARIO ROUND
  local label=$1 bin=$2 scenario=$3 round=$4
  local data="$TMP/data-$label-$scenario-$round" out="$TMP/out-$label-$round"
  mkdir -p "$out"
  sed -e "s#@GATEWAY_PORT@#$GATEWAY_PORT#; s#@ADMIN_PORT@#$ADMIN_PORT#; s#@PRIMARY_PORT@#$PRIMARY_PORT#; s#@BACKUP_PORT@#$BACKUP_PORT#; s#@DATA_DIR@#$data#" \
    "$CONFIG" >"$TMP/gateway.toml"
  RUST_LOG=warn "$bin" serve --config "$TMP/gateway.toml" >"$TMP/gateway-$label.log" 2>&1 &
  local gw=$!
  PIDS+=($gw)
  wait_http "http://127.0.0.1:$ADMIN_PORT/readyz"
  echo "== $scenario, $label, round $round (gateway pid $gw)" >&2
  timeout 900 "$BIN/tollgate-loadtest" \
    --scenario "loadtest/scenarios/$scenario.toml" \
    --base-url "http://127.0.0.1:$GATEWAY_PORT/v1" --key "$KEY" \
    --direct-url "http://127.0.0.1:$PRIMARY_PORT/v1" \
    --mock "primary=http://127.0.0.1:$PRIMARY_PORT" --mock "backup=http://127.0.0.1:$BACKUP_PORT" \
    --admin-url "http://127.0.0.1:$ADMIN_PORT" --admin-token "$ADMIN_TOKEN" --verify-ledger \
    --gateway-pid "$gw" --scale "$SCALE" --out "$out" >/dev/null
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
  # One line per phase: label round scenario phase cpu_us/request cpu_us/token requests
  python3 - "$out/$scenario.json" "$label" "$round" "$scenario" >>"$TMP/figures" <<'PY'
import json, sys
path, label, rnd, scenario = sys.argv[1:]
for p in json.load(open(path))["phases"]:
    c = p.get("gateway_cost") or {}
    print(label, rnd, scenario, p["name"], "%.1f" % c.get("cpu_us_per_request", 0),
          "%.2f" % c.get("cpu_us_per_token", 0), c.get("requests", 0))
PY
}

for scenario in $SCENARIOS; do
  for round in $(seq 1 "$ROUNDS"); do
    run_one before "$OLD_BIN" "$scenario" "$round"
    run_one now "$BIN/tollgate" "$scenario" "$round"
  done
done

mkdir -p "$OUT"
old_version=$("$OLD_BIN" --version 2>/dev/null || echo "$OLD_BIN")
new_commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "# One sled instance: an earlier build and this one, in one run"
  echo
  echo "- when: $(date -u +%Y-%m-%dT%H:%M:%SZ); scale $SCALE; $ROUNDS rounds, alternating before, now"
  echo "- before: $old_version (OLD_BIN); now: this tree at $new_commit"
  echo "- conditions: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
  echo "- gateway CPU (user + system, from /proc) divided by the requests, or tokens, it served in the phase"
  echo
  echo "| scenario | phase | build | round | CPU µs per request | CPU µs per token | requests |"
  echo "|---|---|---|---|---|---|---|"
  sort -k3,3 -k4,4 -k1,1r -k2,2n "$TMP/figures" |
    awk '{ printf "| %s | %s | %s | %s | %s | %s | %s |\n", $3, $4, $1, $2, $5, $6, $7 }'
} >"$OUT/sled-before-after.md"
cat "$OUT/sled-before-after.md"
