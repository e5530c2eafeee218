#!/usr/bin/env bash
# Standard load-test runs: builds release, and for each scenario starts two standalone mock
# upstreams and a fresh gateway (loadtest/gateway.toml, temp data dir) on 127.0.0.1, runs the
# scenario side by side with the mock, verifies the ledger, and writes loadtest/results/.
# Everything it starts is killed on exit. Every run is bounded in count and time.
#
#   loadtest/run.sh                       # all standard scenarios
#   SCENARIOS="steady-streams nonstream" loadtest/run.sh
#   SCALE=0.25 loadtest/run.sh            # quick: a quarter of every count and duration
set -euo pipefail
cd "$(dirname "$0")/.."

SCENARIOS=${SCENARIOS:-"nonstream steady-streams steady-responses steady-messages burst ramp mixed fallback-storm drain-to-zero slow-streams"}
SCALE=${SCALE:-1}
OUT=${OUT:-loadtest/results}
BASE_PORT=${BASE_PORT:-18080}
GATEWAY_PORT=$BASE_PORT
ADMIN_PORT=$((BASE_PORT + 1))
PRIMARY_PORT=$((BASE_PORT + 11))
BACKUP_PORT=$((BASE_PORT + 12))
KEY="tg-loadtest-0123456789"
ADMIN_TOKEN="lt-admin-token"

cargo build --release -p tollgate -p tollgate-loadtest
BIN=target/release

TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

wait_http() { # URL
  for _ in $(seq 1 100); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "not ready: $1" >&2
  return 1
}

"$BIN/tollgate" mock-upstream --listen "127.0.0.1:$PRIMARY_PORT" --ttft-ms 0 --tokens 64 --interval-ms 20 \
  >"$TMP/primary.log" 2>&1 &
PIDS+=($!)
"$BIN/tollgate" mock-upstream --listen "127.0.0.1:$BACKUP_PORT" --ttft-ms 0 --tokens 64 --interval-ms 20 \
  >"$TMP/backup.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$PRIMARY_PORT/stats"
wait_http "http://127.0.0.1:$BACKUP_PORT/stats"

mkdir -p "$OUT"
status=0
for scenario in $SCENARIOS; do
  data="$TMP/data-$scenario"
  sed -e "s#@GATEWAY_PORT@#$GATEWAY_PORT#; s#@ADMIN_PORT@#$ADMIN_PORT#; s#@PRIMARY_PORT@#$PRIMARY_PORT#; s#@BACKUP_PORT@#$BACKUP_PORT#; s#@DATA_DIR@#$data#" \
    loadtest/gateway.toml >"$TMP/gateway.toml"
  RUST_LOG=warn "$BIN/tollgate" serve --config "$TMP/gateway.toml" >"$TMP/gateway-$scenario.log" 2>&1 &
  gw=$!
  PIDS+=($gw)
  wait_http "http://127.0.0.1:$ADMIN_PORT/readyz"
  echo "== $scenario (gateway pid $gw)" >&2
  if ! timeout 900 "$BIN/tollgate-loadtest" \
      --scenario "loadtest/scenarios/$scenario.toml" \
      --base-url "http://127.0.0.1:$GATEWAY_PORT/v1" --key "$KEY" \
      --direct-url "http://127.0.0.1:$PRIMARY_PORT/v1" \
      --mock "primary=http://127.0.0.1:$PRIMARY_PORT" --mock "backup=http://127.0.0.1:$BACKUP_PORT" \
      --admin-url "http://127.0.0.1:$ADMIN_PORT" --admin-token "$ADMIN_TOKEN" --verify-ledger \
      --gateway-pid "$gw" --scale "$SCALE" --out "$OUT" ${LOADTEST_FLAGS:-} >/dev/null; then
    echo "!! $scenario: failed (see $OUT/$scenario.md; gateway log below)" >&2
    tail -n 20 "$TMP/gateway-$scenario.log" >&2 || true
    status=1
  fi
  kill "$gw" 2>/dev/null || true
  wait "$gw" 2>/dev/null || true
done
exit $status
