"""The official Anthropic Python SDK on /v1/messages, `client.messages.create(...)` and
`client.messages.stream(...)`: the text, the `tollgate` object (on the message, or on the last
`message_delta` event), the cache counts, and the ledger record. The mock reports 64 cache
reads and 32 cache writes besides the prompt's 100 input tokens: billed 100 at the input price,
64 at the cache-read price and 32 at the cache-write price, exactly."""

import anthropic

from common import (KEY, CLIENT_URL, PROMPT, PROMPT_TOKENS, check, check_record,
                    check_tollgate, cost, equal, extra, mock_text, record, run)

READ, WRITE, TOKENS = 64, 32, 6
INPUT = PROMPT_TOKENS + READ + WRITE
HEADERS = {"x-mock-tokens": str(TOKENS), "x-mock-cache-read-tokens": str(READ),
           "x-mock-cache-write-tokens": str(WRITE)}
EXPECTED = cost(uncached=PROMPT_TOKENS, cache_read=READ, cache_write=WRITE, output=TOKENS)

# The SDK sends the key as `x-api-key` and its own `anthropic-version`.
client = anthropic.Anthropic(base_url=CLIENT_URL, api_key=KEY, max_retries=0, timeout=30)
MESSAGES = [{"role": "user", "content": PROMPT}]


def billed(tollgate, stream):
    check_tollgate(tollgate, expected_cost=EXPECTED, output=TOKENS, cached_read=READ,
                   cached_write=WRITE, input_tokens=INPUT)
    check_record(record(tollgate["request_id"]), request_id=tollgate["request_id"],
                 endpoint="messages", stream=stream, cached_read=READ, cached_write=WRITE,
                 output=TOKENS, expected_cost=EXPECTED, input_tokens=INPUT)


def messages_create():
    m = client.messages.create(model="sdk-messages", max_tokens=256, messages=MESSAGES,
                               extra_headers=HEADERS)
    equal("".join(b.text for b in m.content if b.type == "text"), mock_text(TOKENS), "text")
    equal((m.usage.input_tokens, m.usage.cache_read_input_tokens,
           m.usage.cache_creation_input_tokens), (PROMPT_TOKENS, READ, WRITE), "usage")
    billed(extra(m, "tollgate"), stream=False)


def messages_stream():
    tollgate = None
    with client.messages.stream(model="sdk-messages", max_tokens=256, messages=MESSAGES,
                                extra_headers=HEADERS) as stream:
        for event in stream:
            if event.type == "message_delta":
                tollgate = extra(event, "tollgate") or tollgate
        final = stream.get_final_message()
    equal("".join(b.text for b in final.content if b.type == "text"), mock_text(TOKENS),
          "streamed text")
    equal((final.usage.cache_read_input_tokens, final.usage.cache_creation_input_tokens),
          (READ, WRITE), "streamed cache usage")
    equal(final.usage.output_tokens, TOKENS, "streamed output_tokens")
    check(tollgate is not None, "a tollgate object on the last message_delta")
    billed(tollgate, stream=True)


if __name__ == "__main__":
    run([messages_create, messages_stream])
