# Sourced by loadtest/callgrind.sh and loadtest/threads.sh: free loopback ports, and the
# one-route gateway both measure (one mock provider, one model on the `chunks` tokenizer, one
# funded key whose secret is $ONE_ROUTE_KEY).

ONE_ROUTE_KEY=tg-one-route-key

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

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
flush_interval_ms = 50

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
