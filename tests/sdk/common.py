"""Helpers shared by the SDK test scripts: the gateway's addresses, the expected prices, the
ledger record through the admin API, and a tiny runner (no pytest)."""

import json
import os
import sys
import time
import traceback
import urllib.request
from decimal import Decimal

CLIENT_URL = os.environ["SDK_CLIENT_URL"]
ADMIN_URL = os.environ["SDK_ADMIN_URL"]
ADMIN_TOKEN = os.environ["SDK_ADMIN_TOKEN"]
KEY = os.environ["SDK_KEY"]

# The route prices of tests/sdk/tollgate.toml, per million tokens.
INPUT, CACHE_READ, CACHE_WRITE, OUTPUT = (Decimal(p) for p in ("3", "0.3", "3.75", "15"))

# The mock's deterministic answer: token i is WORDS[i % 16] and a space.
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then",
         "runs", "far", "into", "green", "hills"]


def mock_text(tokens):
    return "".join(WORDS[i % len(WORDS)] + " " for i in range(tokens))


# 400 bytes: the mock and the `chunks` tokenizer both count ceil(400 / 4) = 100 input tokens.
# The mock reports the cache reads and writes it is asked for on top of them.
PROMPT = "abcd" * 100
PROMPT_TOKENS = 100


def cost(uncached=0, cache_read=0, cache_write=0, output=0):
    """The exact charge for these tokens at the route's prices."""
    million = Decimal(1_000_000)
    return (uncached * INPUT + cache_read * CACHE_READ + cache_write * CACHE_WRITE
            + output * OUTPUT) / million


def admin_get(path):
    req = urllib.request.Request(ADMIN_URL + path,
                                 headers={"Authorization": "Bearer " + ADMIN_TOKEN})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def record(request_id):
    """The ledger record of a request, waiting for the ledger writer to commit it."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return admin_get("/admin/ledger/" + request_id)
        except urllib.error.HTTPError as e:
            if e.code != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def extra(model, name):
    """A field the SDK's typed object does not declare (such as `tollgate`), as a dict."""
    value = (model.model_extra or {}).get(name)
    if value is None:
        value = getattr(model, name, None)
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    return value


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def equal(got, want, what):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


def check_record(rec, *, request_id, endpoint, stream, cached_read, cached_write, output,
                 expected_cost, input_tokens=PROMPT_TOKENS):
    equal(rec["request_id"], request_id, "record request_id")
    equal(rec["endpoint"], endpoint, "record endpoint")
    equal(rec["stream"], stream, "record stream")
    equal(rec["status"], "completed", "record status")
    equal(rec["usage_source"], "upstream", "record usage_source")
    equal(rec["input_tokens"], input_tokens, "record input_tokens")
    equal(rec["cache_read_tokens"], cached_read, "record cache_read_tokens")
    equal(rec["cache_write_tokens"], cached_write, "record cache_write_tokens")
    equal(rec["output_tokens"], output, "record output_tokens")
    equal(Decimal(rec["cost"]), expected_cost, "record cost")
    equal(Decimal(rec["shortfall"]), Decimal(0), "record shortfall")


def check_tollgate(obj, *, expected_cost, output, cached_read, cached_write=0,
                   input_tokens=PROMPT_TOKENS):
    check(isinstance(obj, dict), f"a tollgate object: {obj!r}")
    equal(obj["status"], "completed", "tollgate.status")
    equal(obj["bucket"], "credit", "tollgate.bucket")
    equal(obj["currency"], "USD", "tollgate.currency")
    equal(Decimal(obj["cost"]), expected_cost, "tollgate.cost")
    equal(obj["input_tokens"], input_tokens, "tollgate.input_tokens")
    equal(obj["cache_read_tokens"], cached_read, "tollgate.cache_read_tokens")
    equal(obj["cache_write_tokens"], cached_write, "tollgate.cache_write_tokens")
    equal(obj["output_tokens"], output, "tollgate.output_tokens")
    equal((obj["fallbacks"], obj["retries"]), (0, 0), "tollgate fallbacks and retries")
    check(obj["request_id"], "tollgate.request_id")


def run(tests):
    """Runs each test function; one `ok` or `FAIL` line each; exits 1 if any failed."""
    failed = 0
    for test in tests:
        try:
            test()
            print(f"ok {test.__name__}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported, then the next runs
            failed += 1
            print(f"FAIL {test.__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stdout)
    sys.exit(1 if failed else 0)
