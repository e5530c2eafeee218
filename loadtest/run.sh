#!/usr/bin/env bash
# Standard load-test runs: builds release, and for each scenario starts two standalone mock
# upstreams, nginx as a plain reverse proxy in front of the primary mock (the yardstick), and a
# fresh gateway (loadtest/gateway.toml, temp data dir) on free 127.0.0.1 ports, runs the scenario
# side by side (direct mock, nginx, gateway), verifies the ledger, and writes loadtest/results/.
# With two or more cores the gateway and nginx are pinned to the last core, the mocks and the
# load client to the others. Everything it starts is killed on exit. Every run is bounded in
# count and time.
#
#   loadtest/run.sh                       # all standard scenarios
#   SCENARIOS="steady-streams nonstream" loadtest/run.sh
#   SCENARIOS="nonstream paced-streams burst" loadtest/run.sh   # the yardstick table
#   SCALE=0.25 loadtest/run.sh            # quick: a quarter of every count and duration
#   NGINX=0 loadtest/run.sh               # without the nginx column
#   PIN=0 loadtest/run.sh                 # no CPU pinning
set -euo pipefail
cd "$(dirname "$0")/.."

SCENARIOS=${SCENARIOS:-"nonstream steady-streams paced-streams steady-responses steady-messages burst ramp mixed fallback-storm drain-to-zero slow-streams"}
SCALE=${SCALE:-1}
OUT=${OUT:-loadtest/results}
BASE_PORT=${BASE_PORT:-18080}
NGINX=${NGINX:-1}
PIN=${PIN:-1}
KEY="tg-loadtest-0123456789"
ADMIN_TOKEN="lt-admin-token"

# A port nobody listens on, from $1 upwards (and not one handed out before in this run).
TAKEN=" "
free_port() {
  local p=$1
  while ss -Htln "sport = :$p" | grep -q . || [[ $TAKEN == *" $p "* ]]; do
    p=$((p + 1))
  done
  echo "$p"
}
take_port() { # VAR FROM
  local p
  p=$(free_port "$2")
  TAKEN="$TAKEN$p "
  printf -v "$1" '%s' "$p"
}
take_port GATEWAY_PORT "$BASE_PORT"
take_port ADMIN_PORT $((GATEWAY_PORT + 1))
take_port PRIMARY_PORT $((ADMIN_PORT + 1))
take_port BACKUP_PORT $((PRIMARY_PORT + 1))
take_port NGINX_PORT $((BACKUP_PORT + 1))

# Pinning: the system under test (gateway, nginx) on the last core, the rest on the others.
CORES=$(nproc)
SUT_PIN=()
LOAD_PIN=()
if [ "$PIN" = 1 ] && [ "$CORES" -ge 2 ] && command -v taskset >/dev/null; then
  SUT_PIN=(taskset -c $((CORES - 1)))
  LOAD_PIN=(taskset -c "0-$((CORES - 2))")
fi

. loadtest/lib.sh

${LOAD_PIN[@]+"${LOAD_PIN[@]}"} "$BIN/tollgate" mock-upstream --listen "127.0.0.1:$PRIMARY_PORT" --ttft-ms 0 --tokens 64 --interval-ms 20 \
  >"$TMP/primary.log" 2>&1 &
PIDS+=($!)
${LOAD_PIN[@]+"${LOAD_PIN[@]}"} "$BIN/tollgate" mock-upstream --listen "127.0.0.1:$BACKUP_PORT" --ttft-ms 0 --tokens 64 --interval-ms 20 \
  >"$TMP/backup.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$PRIMARY_PORT/stats"
wait_http "http://127.0.0.1:$BACKUP_PORT/stats"

# The yardstick: nginx as a plain reverse proxy (proxy_pass, no response buffering, upstream
# keep-alive, one worker), its config generated into the temp dir, run in the foreground as a
# child of this script.
PROXY_FLAGS=()
NGINX_BIN=$(command -v nginx || true)
if [ -z "$NGINX_BIN" ] && [ -x /usr/sbin/nginx ]; then NGINX_BIN=/usr/sbin/nginx; fi
if [ "$NGINX" != 1 ]; then
  echo "(NGINX=$NGINX: no nginx column)" >&2
elif [ -z "$NGINX_BIN" ]; then
  echo "nginx not found: the reports will have no nginx column." >&2
  echo "  install it with: sudo apt-get install nginx-light   (Debian/Ubuntu)" >&2
else
  mkdir -p "$TMP/nginx"
  cat >"$TMP/nginx/nginx.conf" <<NGINX_CONF
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
worker_rlimit_nofile 65536;
events {
  worker_connections 16384;
}
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  upstream mock {
    server 127.0.0.1:$PRIMARY_PORT;
    keepalive 512;
    keepalive_requests 1000000;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 120s;
    }
  }
}
NGINX_CONF
  ${SUT_PIN[@]+"${SUT_PIN[@]}"} "$NGINX_BIN" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" \
    -g "daemon off;" >"$TMP/nginx/stdout.log" 2>&1 &
  nginx_master=$!
  PIDS+=($nginx_master)
  wait_http "http://127.0.0.1:$NGINX_PORT/stats"
  nginx_pids=("$nginx_master")
  for child in $(cat /proc/"$nginx_master"/task/*/children 2>/dev/null); do
    nginx_pids+=("$child")
  done
  PROXY_FLAGS=(--proxy-url "http://127.0.0.1:$NGINX_PORT/v1")
  for pid in "${nginx_pids[@]}"; do
    PROXY_FLAGS+=(--proxy-pid "$pid")
  done
  echo "nginx $("$NGINX_BIN" -v 2>&1 | sed 's#.*/##') on 127.0.0.1:$NGINX_PORT (pids ${nginx_pids[*]})" >&2
fi

mkdir -p "$OUT"
status=0
for scenario in $SCENARIOS; do
  data="$TMP/data-$scenario"
  sed -e "s#@GATEWAY_PORT@#$GATEWAY_PORT#; s#@ADMIN_PORT@#$ADMIN_PORT#; s#@PRIMARY_PORT@#$PRIMARY_PORT#; s#@BACKUP_PORT@#$BACKUP_PORT#; s#@DATA_DIR@#$data#" \
    loadtest/gateway.toml >"$TMP/gateway.toml"
  RUST_LOG=warn ${SUT_PIN[@]+"${SUT_PIN[@]}"} "$BIN/tollgate" serve --config "$TMP/gateway.toml" >"$TMP/gateway-$scenario.log" 2>&1 &
  gw=$!
  PIDS+=($gw)
  wait_http "http://127.0.0.1:$ADMIN_PORT/readyz"
  echo "== $scenario (gateway pid $gw)" >&2
  if ! ${LOAD_PIN[@]+"${LOAD_PIN[@]}"} timeout 900 "$BIN/tollgate-loadtest" \
      --scenario "loadtest/scenarios/$scenario.toml" \
      --base-url "http://127.0.0.1:$GATEWAY_PORT/v1" --key "$KEY" \
      --direct-url "http://127.0.0.1:$PRIMARY_PORT/v1" ${PROXY_FLAGS[@]+"${PROXY_FLAGS[@]}"} \
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
