# Sourced by loadtest/callgrind.sh and loadtest/threads.sh: a temp dir ($tmp) and the processes
# started ($pids), both cleaned up on exit; free loopback ports for the mock ($mock), the
# gateway ($gw) and its admin API ($admin); and the one-route gateway both measure (one mock
# provider, one model on the `chunks` tokenizer, one funded key whose secret is $ONE_ROUTE_KEY;
# FLUSH_MS=N sets its `flush_interval_ms`, default 50 as in the load tests).

ONE_ROUTE_KEY=tg-one-route-key

tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mock=$(free_port)
gw=$(free_port)
admin=$(free_port)

# one_route_config FILE GATEWAY_PORT ADMIN_PORT MOCK_PORT DATA_DIR WORKERS
one_route_config() {
  cat >"$1" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
admin_token = "one-route-admin"
data_dir = "$5"
workers = $6

[settlement]
flush_interval_ms = ${FLUSH_MS:-50}

[buckets.credit]
currency = "USD"
kind = "official"

[[providers]]
id = "mock"
base_url = "http://127.0.0.1:$4/v1"

[[models]]
name = "m"
tokenizer = "chunks"
routes = [
  { provider = "mock", upstream_model = "m", bucket = "credit", input_per_mtok = "0.5", output_per_mtok = "2" },
]

[[keys]]
name = "one-route"
secret = "$ONE_ROUTE_KEY"
topup = { credit = "1000000" }
TOML
}

# wait_ready TRIES: waits for the gateway's /readyz, 0.2 s a try.
wait_ready() {
  for _ in $(seq 1 "$1"); do
    curl -fsS -o /dev/null "http://127.0.0.1:$admin/readyz" 2>/dev/null && return 0
    sleep 0.2
  done
}

# one_route_wrk TOKENS STREAMED: writes $tmp/post.lua, wrk's chat request to the gateway for
# TOKENS tokens (a stream with include_usage when STREAMED is 1), and sets $url.
one_route_wrk() {
  local fields=
  [ "$2" = 1 ] && fields=',"stream":true,"stream_options":{"include_usage":true}'
  cat >"$tmp/post.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"hello there, how are you"}],"max_tokens":$1$fields}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $ONE_ROUTE_KEY"
LUA
  url="http://127.0.0.1:$gw/v1/chat/completions"
}
