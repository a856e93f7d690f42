"""The official `openai` Python package against a running `kiln serve`.

Usage: check_openai_client.py BASE_URL API_KEY

Checks the parsed objects the SDK returns (not just status codes): the model list, a completion,
a chat completion, a streamed chat completion with usage, and the SDK's typed errors for a wrong
key, an unknown model and a bad parameter.
"""

import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)

models = client.models.list()
ids = [m.id for m in models.data]
assert len(ids) == 1, ids
model = ids[0]
assert models.data[0].object == "model"

# A plain completion, greedy: SmolLM2 knows this one.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0)
assert c.object == "text_completion", c
assert c.model == model
assert c.id.startswith("cmpl-")
assert c.choices[0].text.startswith(" Paris"), c.choices[0].text
assert c.choices[0].finish_reason == "length"
assert c.usage.prompt_tokens == 5 and c.usage.completion_tokens == 4 and c.usage.total_tokens == 9, c.usage

# Token-id prompts and stop strings.
c2 = client.completions.create(model=model, prompt=[504, 3575, 282, 4649, 314], max_tokens=8, temperature=0, stop=["."])
assert c2.choices[0].text == " Paris", repr(c2.choices[0].text)
assert c2.choices[0].finish_reason == "stop"

# A chat completion through the model's ChatML template; stops at the end of the turn. The question
# asks for a sentence: asked plainly, SmolLM2's first answer token is a 0.09-logit tie between "The"
# and "La" in llama.cpp's own logits, which any engine's rounding decides; asked this way, every
# token up to "Paris" leads by at least 1.6.
QUESTION = "What is the capital of France? Answer in one sentence."
chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": QUESTION}],
    max_tokens=40,
    temperature=0,
)
assert chat.object == "chat.completion"
msg = chat.choices[0].message
assert msg.role == "assistant"
assert "Paris" in msg.content, msg.content
assert "<|im_end|>" not in msg.content
assert chat.choices[0].finish_reason in ("stop", "length")
assert chat.usage.completion_tokens > 0
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

# The same chat, streamed, with usage: same text, same counts.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You are a helpful assistant."},
              {"role": "user", "content": QUESTION}],
    max_tokens=40,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
text, roles, finish, usage, chunks = "", [], None, None, 0
for chunk in stream:
    assert chunk.object == "chat.completion.chunk"
    assert chunk.id.startswith("chatcmpl-")
    if chunk.usage is not None:
        usage = chunk.usage
        assert chunk.choices == []
        continue
    choice = chunk.choices[0]
    if choice.delta.role:
        roles.append(choice.delta.role)
    if choice.delta.content is not None:
        text += choice.delta.content
        chunks += 1
    if choice.finish_reason:
        finish = choice.finish_reason
assert roles == ["assistant"], roles
assert text == msg.content, (text, msg.content)
assert finish == chat.choices[0].finish_reason
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
assert usage.prompt_tokens == chat.usage.prompt_tokens

# Typed errors.
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401
try:
    client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404
    assert e.body["code"] == "model_not_found", e.body
try:
    client.completions.create(model=model, prompt="hi", max_tokens=2, temperature=7)
    raise AssertionError("temperature 7 was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body

print("openai client checks passed")
