#!/usr/bin/env bash
# The official SDK tests: the OpenAI and Anthropic Python SDKs (pinned in requirements.txt)
# against the release build of tollgate and its built-in mock upstream, offline but for PyPI.
#
#   tests/sdk/run.sh            builds target/release/tollgate if needed, makes the virtualenv
#                               (target/sdk-venv) if needed, runs every tests/sdk/test_*.py
#   TOLLGATE_BIN=path run.sh    uses that binary instead of building one
#
# Each test script is plain Python (no pytest): it prints one `ok NAME` or `FAIL NAME: why`
# line per test and exits non-zero when any failed. This script ends with
# `sdk: N passed, M failed` and exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"

bin="${TOLLGATE_BIN:-}"
if [ -z "$bin" ]; then
  echo "== cargo build --release"
  cargo build --release --quiet --bin tollgate
  # Where cargo put it: CARGO_TARGET_DIR when set (relative to the root, as cargo takes it).
  target_dir="${CARGO_TARGET_DIR:-target}"
  case "$target_dir" in /*) ;; *) target_dir="$root/$target_dir" ;; esac
  bin="$target_dir/release/tollgate"
fi

venv="$root/target/sdk-venv"
if ! "$venv/bin/python" -c 'import openai, anthropic' 2>/dev/null \
   || ! cmp -s tests/sdk/requirements.txt "$venv/requirements.txt"; then
  echo "== python virtualenv with the pinned SDKs"
  if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    # Debian's python3 keeps venv and pip in packages of their own.
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null) || true
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
  cp tests/sdk/requirements.txt "$venv/requirements.txt"
fi
py="$venv/bin/python"

work="$(mktemp -d)"
gateway_pid=""
cleanup() {
  if [ -n "$gateway_pid" ]; then
    kill "$gateway_pid" 2>/dev/null || true
    wait "$gateway_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Free loopback ports for the client API, the admin API and the mock upstreams.
read -r client_port admin_port mock_port anthropic_port < <("$py" - <<'PY'
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
)

export SDK_ADMIN_TOKEN="tg-sdk-admin"
export SDK_KEY="tg-sdk-key-0123456789"
sed -e "s/@CLIENT_PORT@/$client_port/" -e "s/@ADMIN_PORT@/$admin_port/" \
    -e "s/@MOCK_PORT@/$mock_port/" -e "s/@ANTHROPIC_PORT@/$anthropic_port/" \
    -e "s|@DATA_DIR@|$work/data|" -e "s/@ADMIN_TOKEN@/$SDK_ADMIN_TOKEN/" -e "s/@KEY@/$SDK_KEY/" \
    tests/sdk/tollgate.toml > "$work/tollgate.toml"
"$bin" check-config "$work/tollgate.toml"

echo "== tollgate serve (log: $work/gateway.log)"
"$bin" serve --config "$work/tollgate.toml" > "$work/gateway.log" 2>&1 &
gateway_pid=$!
export SDK_CLIENT_URL="http://127.0.0.1:$client_port"
export SDK_ADMIN_URL="http://127.0.0.1:$admin_port"
for _ in $(seq 1 100); do
  if "$py" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$SDK_ADMIN_URL/readyz" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$gateway_pid" 2>/dev/null; then
    cat "$work/gateway.log"; echo "tollgate exited before it was ready"; exit 1
  fi
  sleep 0.1
done

passed=0
failed=0
for script in tests/sdk/test_*.py; do
  echo "== $script"
  set +e
  timeout 120 "$py" "$script" | tee "$work/out.txt"
  status=${PIPESTATUS[0]}
  set -e
  passed=$((passed + $(grep -c '^ok ' "$work/out.txt" || true)))
  failed=$((failed + $(grep -c '^FAIL ' "$work/out.txt" || true)))
  if [ "$status" -ne 0 ] && ! grep -q '^FAIL ' "$work/out.txt"; then
    failed=$((failed + 1)); echo "FAIL $script: exited $status"
  fi
done
if [ "$failed" -ne 0 ]; then
  echo "== gateway log (last 40 lines)"; tail -n 40 "$work/gateway.log"
fi
echo "sdk: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
