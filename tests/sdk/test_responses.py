"""The official OpenAI Python SDK on /v1/responses, `client.responses.create(...)` stream and
not: the output text, the `tollgate` object (top level, or in `response.completed`'s
response), usage with cached tokens, and the ledger record, billed exactly at the route's
cache-read price for the 64 cached input tokens."""

import openai

from common import (KEY, CLIENT_URL, PROMPT, PROMPT_TOKENS, check, check_record,
                    check_tollgate, cost, equal, extra, mock_text, record, run)

CACHED = 64
TOKENS = 5
INPUT = PROMPT_TOKENS + CACHED
HEADERS = {"x-mock-tokens": str(TOKENS), "x-mock-cache-read-tokens": str(CACHED)}
EXPECTED = cost(uncached=PROMPT_TOKENS, cache_read=CACHED, output=TOKENS)

client = openai.OpenAI(base_url=CLIENT_URL + "/v1", api_key=KEY, max_retries=0, timeout=30)


def billed(tollgate, stream):
    check_tollgate(tollgate, expected_cost=EXPECTED, output=TOKENS, cached_read=CACHED,
                   input_tokens=INPUT)
    check_record(record(tollgate["request_id"]), request_id=tollgate["request_id"],
                 endpoint="responses", stream=stream, cached_read=CACHED, cached_write=0,
                 output=TOKENS, expected_cost=EXPECTED, input_tokens=INPUT)


def responses_non_stream():
    r = client.responses.create(model="sdk-responses", input=PROMPT, extra_headers=HEADERS)
    equal(r.output_text, mock_text(TOKENS), "output_text")
    equal(r.usage.input_tokens, INPUT, "usage.input_tokens")
    equal(r.usage.input_tokens_details.cached_tokens, CACHED, "cached_tokens")
    billed(extra(r, "tollgate"), stream=False)


def responses_stream():
    stream = client.responses.create(model="sdk-responses", input=PROMPT, stream=True,
                                     extra_headers=HEADERS)
    text, completed = "", None
    for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            completed = event.response
    equal(text, mock_text(TOKENS), "streamed text")
    check(completed is not None, "a response.completed event")
    equal(completed.usage.input_tokens_details.cached_tokens, CACHED, "cached_tokens")
    billed(extra(completed, "tollgate"), stream=True)


if __name__ == "__main__":
    run([responses_non_stream, responses_stream])
