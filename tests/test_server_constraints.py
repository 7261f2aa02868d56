"""response_format / grammar on a running server, driven by the real `openai` client: at temperature
1.0 on a random model every reply must parse and validate (jsonschema), streaming and not."""

import json
import random
import re

import httpx
import jsonschema
import openai
import pytest

N_PER_MODE = 28  # x2 kinds (json_object, json_schema) = 56 replies per mode (streaming, not)


@pytest.fixture(scope="module")
def client(structured_server):
    return openai.OpenAI(base_url=structured_server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A small random object schema: scalars, enums, arrays, one level of nesting."""
    kinds = ["string", "integer", "number", "boolean", "enum", "array"] + (["object"] if depth == 0 else [])
    props = {}
    for i in range(rng.randint(1, 3)):
        k = rng.choice(kinds)
        name = f"{rng.choice('abcdefgh')}{i}"
        if k == "enum":
            props[name] = {"enum": rng.sample(["red", "green", "blue", 1, None], rng.randint(1, 3))}
        elif k == "array":
            props[name] = {"type": "array", "items": {"type": rng.choice(["integer", "string"])}, "maxItems": 3}
        elif k == "object":
            props[name] = random_schema(rng, depth + 1)
        else:
            props[name] = {"type": k}
    required = rng.sample(sorted(props), rng.randint(0, len(props)))
    schema = {"type": "object", "properties": props, "required": required}
    if rng.random() < 0.5:
        schema["additionalProperties"] = False
    return schema


def ask(client, rng: random.Random, response_format: dict, stream: bool) -> str:
    """One reply's content; a max_tokens below the format's minimum is first answered with a 400."""
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Describe a cat as JSON."}],
              temperature=1.0, seed=rng.randrange(1 << 30), response_format=response_format)
    max_tokens = rng.randint(4, 24)
    try:
        return _content(client, kw, max_tokens, stream)
    except openai.BadRequestError as e:
        need = int(re.search(r"takes (\d+) tokens", e.message).group(1))
        assert need > max_tokens
        return _content(client, kw, need + rng.randint(0, 8), stream)


def _content(client, kw: dict, max_tokens: int, stream: bool) -> str:
    if not stream:
        r = client.chat.completions.create(max_tokens=max_tokens, **kw)
        assert r.usage.completion_tokens <= max_tokens
        return r.choices[0].message.content
    chunks = list(client.chat.completions.create(max_tokens=max_tokens, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_replies_always_validate(client, stream):
    rng = random.Random()
    for _ in range(N_PER_MODE):
        schema = random_schema(rng)
        rf = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": True}}
        text = ask(client, rng, rf, stream)
        jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_replies_are_objects(client, stream):
    rng = random.Random()
    for _ in range(N_PER_MODE):
        assert isinstance(json.loads(ask(client, rng, {"type": "json_object"}, stream)), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_completions_grammar_and_response_format(client, stream):
    """/v1/completions through the openai client: a Lark `grammar` and a `response_format` (extra_body)."""
    rng = random.Random()
    words = [f"w{rng.randrange(1000)}" for _ in range(3)]
    lark = "start: WORD (\" \" WORD)*\nWORD: " + " | ".join(json.dumps(w) for w in words) + "\n"

    def text(prompt: str, max_tokens: int, extra: dict) -> str:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=1.0,
                                      seed=rng.randrange(1 << 30), stream=stream, extra_body=extra)
        return "".join(c.choices[0].text for c in r if c.choices) if stream else r.choices[0].text

    for _ in range(4):
        assert set(text("Say:", 12, {"grammar": lark}).split(" ")) <= set(words)
        schema = random_schema(rng)
        rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        jsonschema.validate(json.loads(text("JSON:", 96, {"response_format": rf})), schema)
        assert isinstance(json.loads(text("JSON:", 24, {"response_format": {"type": "json_object"}})), dict)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "format": "nope"}}}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format"),
    ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
])
def test_bad_formats_are_400_and_the_server_stays_healthy(structured_server, body, param):
    base = structured_server[0]
    full = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **body}
    r = httpx.post(base + "/v1/chat/completions", json=full, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    bad_grammar = httpx.post(base + "/v1/completions", json={"prompt": "x", "grammar": "start: <|nosuch|>"}, timeout=30)
    assert bad_grammar.status_code == 400 and bad_grammar.json()["error"]["param"] == "grammar"
    assert httpx.get(base + "/health", timeout=5).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kw, param", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}), "response_format"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "nope"}}}), "response_format"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}}}}],
          tool_choice="required"), "tools"),
    (dict(response_format={"type": "json_object"}, max_tokens=1), "max_tokens"),
])
def test_bad_input_is_a_400_through_the_openai_client(client, structured_server, stream, kw, param):
    """Item 6 as a client meets it: BadRequestError (400, OpenAI error body) before any stream starts,
    streaming or not, and the server then answers a good constrained request."""
    args = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=stream) | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=8, stream=stream, extra_body={"grammar": "start: <|nosuch|>"})
    assert e.value.body["param"] == "grammar"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
