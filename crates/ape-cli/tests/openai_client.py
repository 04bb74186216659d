"""Drive a running `ape serve` with the official `openai` Python client.

Usage: python openai_client.py BASE_URL MODEL_ID
Prints one JSON object with what the checks saw; exits non-zero if a check fails.
"""

import json
import sys
import urllib.request

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)

DOCUMENTS = [
    "Alice keeps her bicycle in the green shed behind the school.",
    "Bob's car is parked in the underground garage on Elm Street.",
    "The school library opens at eight in the morning.",
]
QUESTION = [{"role": "user", "content": "Where does Alice keep her bicycle?"}]
GREEDY = {"model": model, "max_tokens": 16, "temperature": 0}

seen = {}

assert [m.id for m in client.models.list().data] == [model]

answer = client.chat.completions.create(
    messages=QUESTION, extra_body={"documents": DOCUMENTS}, **GREEDY
)
seen["answer"] = answer.choices[0].message.content
assert seen["answer"], "empty answer"
assert answer.usage.completion_tokens > 0
assert answer.usage.prompt_tokens > 20, answer.usage
assert answer.choices[0].finish_reason in ("stop", "length")

stream = client.chat.completions.create(
    messages=QUESTION,
    extra_body={"documents": DOCUMENTS},
    stream=True,
    stream_options={"include_usage": True},
    **GREEDY,
)
pieces, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        pieces.append(choice.delta.content or "")
        finish = choice.finish_reason or finish
seen["streamed"] = "".join(pieces)
assert seen["streamed"] == seen["answer"], (seen["streamed"], seen["answer"])
assert finish == answer.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == answer.usage.completion_tokens

sequential = client.chat.completions.create(
    messages=QUESTION,
    extra_body={"documents": DOCUMENTS, "ape": {"mode": "sequential"}},
    **GREEDY,
)
seen["sequential"] = sequential.choices[0].message.content

# Documents registered once and named by id answer exactly as their text does.
request = urllib.request.Request(
    f"{base_url}/v1/contexts",
    data=json.dumps({"documents": DOCUMENTS}).encode(),
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(request) as response:
    ids = [c["id"] for c in json.load(response)["data"]]
by_id = client.chat.completions.create(
    messages=QUESTION, extra_body={"documents": [{"id": i} for i in ids]}, **GREEDY
)
assert by_id.choices[0].message.content == seen["answer"]

plain = client.chat.completions.create(
    messages=[{"role": "user", "content": "What is the capital of Japan?"}], **GREEDY
)
seen["plain"] = plain.choices[0].message.content
assert plain.usage.completion_tokens > 0

# The next turn of that conversation reuses the keys and values of the turns before it.
follow_up = client.chat.completions.create(
    messages=[
        {"role": "user", "content": "What is the capital of Japan?"},
        {"role": "assistant", "content": seen["plain"]},
        {"role": "user", "content": "And of France?"},
    ],
    **GREEDY,
)
seen["cached_tokens"] = follow_up.usage.prompt_tokens_details.cached_tokens
assert seen["cached_tokens"] >= plain.usage.prompt_tokens, (seen, plain.usage)

completion = client.completions.create(prompt="One, two, three,", **GREEDY)
seen["completion"] = completion.choices[0].text
assert completion.usage.completion_tokens > 0

def raises(exception, **request):
    try:
        client.chat.completions.create(**request)
    except exception as error:
        return error
    raise AssertionError(f"{request} did not raise {exception.__name__}")

error = raises(
    openai.BadRequestError,
    messages=QUESTION,
    extra_body={"documents": DOCUMENTS, "ape": {"temperature": 0}},
    **GREEDY,
)
assert "temperature" in error.message, error.message
error = raises(openai.BadRequestError, messages=QUESTION, model=model, max_tokens=100000)
assert error.code == "context_length_exceeded", error
error = raises(
    openai.NotFoundError,
    messages=QUESTION,
    extra_body={"documents": [{"id": "0" * 64}]},
    **GREEDY,
)
assert error.code == "context_not_found", error
raises(openai.NotFoundError, messages=QUESTION, model="no-such-model", max_tokens=4)
raises(openai.BadRequestError, messages=[], model=model, max_tokens=4)
raises(openai.BadRequestError, messages=QUESTION, model=model, temperature=-1)

print(json.dumps(seen))
