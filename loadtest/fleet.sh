#!/usr/bin/env bash
# Fleet load test: a throwaway PostgreSQL cluster (initdb in a temp dir, a loopback port, run as
# the `postgres` user when root), two standalone mocks, and three tollgate instances with
# `[store] kind = "postgres"` on that cluster (loadtest/gateway.toml plus a [store] table, each
# with its own ports and data dir). Runs loadtest/scenarios/fleet.toml round robin over the
# three, with --verify-ledger over the whole fleet and the database's transactions per request
# (--pg-url); then the same scenario on one sled instance, for the figures side by side.
# Writes loadtest/results/fleet.* and fleet-single.*. Everything it starts is stopped on exit;
# every run is bounded in count and time.
#
#   loadtest/fleet.sh
#   SCALE=0.25 loadtest/fleet.sh          # quick: a quarter of every count and duration
#   SINGLE=0 loadtest/fleet.sh            # the fleet only
#   FLUSH_MS=100 loadtest/fleet.sh        # another [settlement] flush_interval_ms (default 50);
#                                         # the results are named fleet-flush100 and so on
#   STATEMENTS=1 loadtest/fleet.sh        # also count the fleet's statements with
#                                         # pg_stat_statements (whole run, warm-up included) into
#                                         # loadtest/results/fleet-statements.txt
set -euo pipefail
cd "$(dirname "$0")/.."

SCALE=${SCALE:-1}
SINGLE=${SINGLE:-1}
FLUSH_MS=${FLUSH_MS:-}
STATEMENTS=${STATEMENTS:-0}
SUFFIX=${FLUSH_MS:+-flush$FLUSH_MS}
OUT=${OUT:-loadtest/results}
BASE_PORT=${BASE_PORT:-18180}
PRIMARY_PORT=$((BASE_PORT + 11))
BACKUP_PORT=$((BASE_PORT + 12))
PG_PORT=$((BASE_PORT + 20))
KEY="tg-loadtest-0123456789"
ADMIN_TOKEN="lt-admin-token"
INSTANCES=(gw-a gw-b gw-c)

BINDIR=$(pg_config --bindir 2>/dev/null || true)
if [ ! -x "$BINDIR/initdb" ]; then
  BINDIR=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
fi
if [ ! -x "$BINDIR/initdb" ]; then
  echo "PostgreSQL not found: install Debian's postgresql package" >&2
  exit 1
fi
PATH="$BINDIR:$PATH"

. loadtest/lib.sh
chmod 755 "$TMP"
AS_PG=()
if [ "$(id -u)" = 0 ]; then
  AS_PG=(runuser -u postgres --)
  mkdir "$TMP/pg" && chown postgres: "$TMP/pg"
else
  mkdir "$TMP/pg"
fi
on_exit() {
  "${AS_PG[@]}" pg_ctl -D "$TMP/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
}

echo "== PostgreSQL on 127.0.0.1:$PG_PORT ($BINDIR)" >&2
"${AS_PG[@]}" initdb -D "$TMP/pg/data" -U tollgate --auth=trust --encoding=UTF8 --locale=C --no-sync >/dev/null
cat >>"$TMP/pg/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP/pg'
max_connections = 200
CONF
if [ "$STATEMENTS" = 1 ]; then
  printf "shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track_utility = on\n" \
    >>"$TMP/pg/data/postgresql.conf"
fi
"${AS_PG[@]}" pg_ctl -D "$TMP/pg/data" -l "$TMP/pg/postgres.log" -w start >/dev/null
createdb -h 127.0.0.1 -p "$PG_PORT" -U tollgate tollgate
export TOLLGATE_DATABASE_URL="postgres://tollgate@127.0.0.1:$PG_PORT/tollgate"
if [ "$STATEMENTS" = 1 ]; then
  psql -X -q -d "$TOLLGATE_DATABASE_URL" -c "CREATE EXTENSION pg_stat_statements" >/dev/null
fi

"$BIN/tollgate" mock-upstream --listen "127.0.0.1:$PRIMARY_PORT" --ttft-ms 0 --tokens 64 --interval-ms 20 \
  >"$TMP/primary.log" 2>&1 &
PIDS+=($!)
"$BIN/tollgate" mock-upstream --listen "127.0.0.1:$BACKUP_PORT" --ttft-ms 0 --tokens 64 --interval-ms 20 \
  >"$TMP/backup.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$PRIMARY_PORT/stats"
wait_http "http://127.0.0.1:$BACKUP_PORT/stats"

# gateway.toml for instance $1 (0, 1, 2) on its ports; $2 = postgres | sled.
gateway_config() {
  local n=$1 store=$2
  local port=$((BASE_PORT + 2 * n)) admin=$((BASE_PORT + 2 * n + 1))
  sed -e "s#@GATEWAY_PORT@#$port#; s#@ADMIN_PORT@#$admin#; s#@PRIMARY_PORT@#$PRIMARY_PORT#; s#@BACKUP_PORT@#$BACKUP_PORT#; s#@DATA_DIR@#$TMP/data-$store-$n#" \
    -e "${FLUSH_MS:+s#^flush_interval_ms = .*#flush_interval_ms = $FLUSH_MS#}" \
    loadtest/gateway.toml
  if [ "$store" = postgres ]; then
    printf '\n[store]\nkind = "postgres"\nurl_env = "TOLLGATE_DATABASE_URL"\ninstance_id = "%s"\n' "${INSTANCES[$n]}"
  fi
}

run_loadtest() { # NAME PG_URL_OR_EMPTY then per instance: client_port admin_port pid
  local name=$1 pg=$2
  shift 2
  local args=()
  while [ $# -gt 0 ]; do
    args+=(--base-url "http://127.0.0.1:$1/v1" --admin-url "http://127.0.0.1:$2" --gateway-pid "$3")
    shift 3
  done
  [ -n "$pg" ] && args+=(--pg-url "$pg")
  echo "== $name" >&2
  timeout 900 "$BIN/tollgate-loadtest" --scenario loadtest/scenarios/fleet.toml --name "$name$SUFFIX" \
    --key "$KEY" --direct-url "http://127.0.0.1:$PRIMARY_PORT/v1" \
    --mock "primary=http://127.0.0.1:$PRIMARY_PORT" --mock "backup=http://127.0.0.1:$BACKUP_PORT" \
    --admin-token "$ADMIN_TOKEN" --verify-ledger --scale "$SCALE" --out "$OUT" \
    "${args[@]}" ${LOADTEST_FLAGS:-} >/dev/null
}

status=0
fleet=()
for n in 0 1 2; do
  gateway_config "$n" postgres >"$TMP/gateway-$n.toml"
  RUST_LOG=warn "$BIN/tollgate" serve --config "$TMP/gateway-$n.toml" >"$TMP/gateway-$n.log" 2>&1 &
  pid=$!
  PIDS+=($pid)
  fleet+=($((BASE_PORT + 2 * n)) $((BASE_PORT + 2 * n + 1)) "$pid")
done
for n in 0 1 2; do
  wait_http "http://127.0.0.1:$((BASE_PORT + 2 * n + 1))/readyz"
done
if ! run_loadtest fleet "$TOLLGATE_DATABASE_URL" "${fleet[@]}"; then
  echo "!! fleet: failed (see $OUT/fleet.md; gateway logs below)" >&2
  tail -n 20 "$TMP"/gateway-?.log >&2 || true
  status=1
fi
if [ "$STATEMENTS" = 1 ]; then
  # Before the instances stop (their stops return leases): what ran during the load.
  psql -X -d "$TOLLGATE_DATABASE_URL" -c "SELECT calls, rows, round(total_exec_time::numeric, 1) AS ms,
      left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS statement
    FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
    WHERE d.datname = current_database() ORDER BY calls DESC LIMIT 30" \
    >"$OUT/fleet$SUFFIX-statements.txt"
fi
for n in 0 1 2; do
  kill "${fleet[$((3 * n + 2))]}" 2>/dev/null || true
  wait "${fleet[$((3 * n + 2))]}" 2>/dev/null || true
done

if [ "$SINGLE" = 1 ]; then
  gateway_config 0 sled >"$TMP/gateway-single.toml"
  RUST_LOG=warn "$BIN/tollgate" serve --config "$TMP/gateway-single.toml" >"$TMP/gateway-single.log" 2>&1 &
  pid=$!
  PIDS+=($pid)
  wait_http "http://127.0.0.1:$((BASE_PORT + 1))/readyz"
  if ! run_loadtest fleet-single "" "$BASE_PORT" "$((BASE_PORT + 1))" "$pid"; then
    echo "!! fleet-single: failed (see $OUT/fleet-single.md)" >&2
    tail -n 20 "$TMP/gateway-single.log" >&2 || true
    status=1
  fi
fi
exit $status
