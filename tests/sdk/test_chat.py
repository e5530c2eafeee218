"""The official OpenAI Python SDK on /v1/chat/completions, stream and not: the answer's text,
the `tollgate` object, usage with cached tokens, and the ledger record. The mock reports 64
cache reads on top of the prompt's 100 tokens: billed 100 at the input price, 64 at the
route's cache-read price, exactly."""

import openai

from common import (KEY, CLIENT_URL, PROMPT, PROMPT_TOKENS, check, check_record,
                    check_tollgate, cost, equal, extra, mock_text, record, run)

CACHED = 64
TOKENS = 7
INPUT = PROMPT_TOKENS + CACHED
HEADERS = {"x-mock-tokens": str(TOKENS), "x-mock-cache-read-tokens": str(CACHED)}
EXPECTED = cost(uncached=PROMPT_TOKENS, cache_read=CACHED, output=TOKENS)

client = openai.OpenAI(base_url=CLIENT_URL + "/v1", api_key=KEY, max_retries=0, timeout=30)
MESSAGES = [{"role": "user", "content": PROMPT}]


def billed(tollgate, stream):
    check_tollgate(tollgate, expected_cost=EXPECTED, output=TOKENS, cached_read=CACHED,
                   input_tokens=INPUT)
    check_record(record(tollgate["request_id"]), request_id=tollgate["request_id"],
                 endpoint="chat.completions", stream=stream, cached_read=CACHED,
                 cached_write=0, output=TOKENS, expected_cost=EXPECTED, input_tokens=INPUT)


def chat_non_stream():
    r = client.chat.completions.create(model="sdk-chat", messages=MESSAGES,
                                       extra_headers=HEADERS)
    equal(r.choices[0].message.content, mock_text(TOKENS), "answer text")
    equal(r.usage.prompt_tokens, INPUT, "usage.prompt_tokens")
    equal(r.usage.prompt_tokens_details.cached_tokens, CACHED, "cached_tokens")
    billed(extra(r, "tollgate"), stream=False)


def chat_stream():
    stream = client.chat.completions.create(model="sdk-chat", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_headers=HEADERS)
    text, last = "", None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
        last = chunk
    equal(text, mock_text(TOKENS), "streamed text")
    check(last is not None and last.usage is not None, "a usage chunk at the end")
    equal(last.usage.prompt_tokens, INPUT, "streamed usage.prompt_tokens")
    equal(last.usage.prompt_tokens_details.cached_tokens, CACHED, "streamed cached_tokens")
    billed(extra(last, "tollgate"), stream=True)


def chat_stream_without_usage_is_billed_the_same():
    raw = client.chat.completions.with_raw_response.create(
        model="sdk-chat", messages=MESSAGES, stream=True, extra_headers=HEADERS)
    request_id = raw.headers["x-tollgate-request-id"]
    equal(raw.headers["x-tollgate-bucket"], "credit", "x-tollgate-bucket")
    text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    equal(text, mock_text(TOKENS), "streamed text without usage")
    # No usage asked for, yet the upstream's usage (forced on upstream) bills the cache reads.
    check_record(record(request_id), request_id=request_id, endpoint="chat.completions",
                 stream=True, cached_read=CACHED, cached_write=0, output=TOKENS,
                 expected_cost=EXPECTED, input_tokens=INPUT)


if __name__ == "__main__":
    run([chat_non_stream, chat_stream, chat_stream_without_usage_is_billed_the_same])
