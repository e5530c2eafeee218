#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time. Usage: fuzz/run.sh [SECONDS] [TARGET...]
#   SECONDS   time per target (default 60, or $FUZZ_SECONDS)
#   TARGET    sse_parser, request_body (default: all)
# Env: FUZZ_SANITIZER (address | none, default address), FUZZ_JOBS (parallel jobs, default 1).
# Crashes land in fuzz/artifacts/<target>/, the growing corpus in fuzz/corpus/<target>/.
# cargo-fuzz needs nightly-only flags (-Z sanitizer, sancov passes); on a stable toolchain this
# script sets RUSTC_BOOTSTRAP=1 so that stable rustc accepts them.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-${FUZZ_SECONDS:-60}}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(sse_parser request_body)
fi
sanitizer="${FUZZ_SANITIZER:-address}"
jobs="${FUZZ_JOBS:-1}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

status=0
for t in "${targets[@]}"; do
    echo "== $t: ${secs}s (sanitizer $sanitizer)" >&2
    mkdir -p "corpus/$t"
    if ! cargo fuzz run --sanitizer "$sanitizer" --jobs "$jobs" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=4096; then
        echo "== $t: FAILED (see fuzz/artifacts/$t/)" >&2
        status=1
    fi
done
exit $status
