# Sourced by the load-test scripts (from the repository's root): builds the release binaries,
# makes a temp dir, and when the script ends stops every process whose pid is in PIDS, runs the
# script's `on_exit` if it defines one, and removes the temp dir.

cargo build --release -p tollgate -p tollgate-loadtest
BIN=target/release

TMP=$(mktemp -d -p /tmp tollgate-lt-XXXXXX)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
  if declare -F on_exit >/dev/null; then on_exit; fi
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

wait_http() { # URL: waits up to 20 s for it to answer 2xx
  for _ in $(seq 1 200); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "not ready: $1" >&2
  return 1
}
