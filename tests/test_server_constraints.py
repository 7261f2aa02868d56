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


def test_completions_grammar_and_response_format(structured_server):
    base = structured_server[0]
    rng = random.Random()
    words = [f"w{rng.randrange(1000)}" for _ in range(3)]
    lark = "start: WORD (\" \" WORD)*\nWORD: " + " | ".join(json.dumps(w) for w in words) + "\n"
    for stream in (False, True):
        body = {"model": "tiny", "prompt": "Say:", "max_tokens": 12, "temperature": 1.0, "grammar": lark,
                "seed": rng.randrange(1 << 30), "stream": stream}
        r = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if stream:
            lines = [l[6:] for l in r.text.splitlines() if l.startswith("data: ") and l != "data: [DONE]"]
            text = "".join(json.loads(l)["choices"][0]["text"] for l in lines)
        else:
            text = r.json()["choices"][0]["text"]
        assert set(text.split(" ")) <= set(words), text
    body = {"model": "tiny", "prompt": "JSON:", "max_tokens": 16, "temperature": 1.0,
            "response_format": {"type": "json_object"}}
    assert isinstance(json.loads(httpx.post(base + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]), dict)


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


def test_thinking_template_reasoning_then_call_and_thinking_false(tiny):
    """In process: a template whose generation prompt opens <think> → reasoning_content, then a valid call;
    chat_template_kwargs {"thinking": false} → no think block in the grammar at all."""
    import hybrid_runtime as hr
    from hybrid_runtime.engine.generate import Sequence, generate
    from hybrid_runtime.server.protocol import parse_chat
    from hybrid_runtime.server.responses import Output

    rng = random.Random()
    tools = [{"type": "function", "function": {"name": "f", "parameters": random_schema(rng)}}]
    with hr.load(tiny("kimi-k2-tiny", "Q4_K_M")[0], threads=1) as m:
        tok = m.tokenizer
        tok.chat_template += "<think>"
        tok._template = tok._env.from_string(tok.chat_template)
        for thinking in (True, False):
            body = {"messages": [{"role": "user", "content": "hi"}], "tools": tools, "tool_choice": "required",
                    "max_tokens": 160, "temperature": 1.0, "seed": rng.randrange(1000),
                    "chat_template_kwargs": {"thinking": thinking}}
            req = parse_chat(body, tok, 2048)
            out = Output(req, tok, "tiny")
            for step in generate(m, tok, req.prompt, req.params, Sequence(m.new_cache()), constraint=req.constraint):
                out.on_step(step)
            msg = out.response(step.finish_reason, step.stats)["choices"][0]
            assert msg["finish_reason"] == "tool_calls", (thinking, msg, req.params.max_tokens, req.constraint.plan)
            jsonschema.validate(json.loads(msg["message"]["tool_calls"][0]["function"]["arguments"]), tools[0]["function"]["parameters"])
            text = (msg["message"].get("reasoning_content") or "") + (msg["message"]["content"] or "")
            # no marker leaks (a random model may well write a plain "<", as it did once in CI)
            assert "<|" not in text and "<think>" not in text and "</think>" not in text
            assert req.constraint is not None and (req.in_think is True)
