"""tool_choice on a running server with the real `openai` client: required and named choices always
give valid calls of allowed tools (arguments validate against the tool's schema), streamed as vLLM
streams them; ids continue the history's count; bad choices are 400."""

import json
import random
import re

import httpx
import jsonschema
import openai
import pytest

from hybrid_runtime.server.tools import history_call_ids
from test_server_constraints import random_schema

N_PER_MODE = 25  # x2 choices (required, named) = 50 replies per mode (streaming, not)
MARKERS = re.compile(r"<\|[a-z_]+\|>|</?think>")
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(structured_server):
    return openai.OpenAI(base_url=structured_server[0] + "/v1", api_key="none", max_retries=0, timeout=60)


def random_tools(rng: random.Random) -> list[dict]:
    names = rng.sample(["get_weather", "get_time", "lookup", "send-mail", "x1"], rng.randint(1, 3))
    return [{"type": "function", "function": {"name": n, "parameters": random_schema(rng)}} for n in names]


def call_reply(client, tools, stream: bool, rng: random.Random, messages=USER, **kw):
    """(content, [(id, name, arguments)], finish_reason) of one reply, streamed or not; a max_tokens
    below the shortest valid call is first answered with a 400 that says what it takes."""
    args = dict(model="tiny", messages=messages, tools=tools, temperature=1.0, max_tokens=rng.randint(24, 48),
                seed=rng.randrange(1 << 30), **kw)
    try:
        return _reply(client, args, stream)
    except openai.BadRequestError as e:
        need = int(re.search(r"takes (\d+) tokens", e.message).group(1))
        assert need > args["max_tokens"]
        return _reply(client, {**args, "max_tokens": need + rng.randint(0, 16)}, stream)


def _reply(client, args: dict, stream: bool):
    if not stream:
        r = client.chat.completions.create(**args)
        m = r.choices[0]
        calls = [(c.id, c.function.name, c.function.arguments) for c in m.message.tool_calls or []]
        return m.message.content or "", calls, m.finish_reason
    calls, content, finish = {}, "", None
    for chunk in client.chat.completions.create(stream=True, **args):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        assert not getattr(d, "reasoning_content", None)
        for tc in d.tool_calls or []:
            if tc.index not in calls:  # the first delta of a call: id, type and name
                assert tc.id and tc.type == "function" and tc.function.name
                calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
            else:
                assert tc.id is None and tc.function.name is None
                calls[tc.index][2] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return content, [tuple(calls[i]) for i in sorted(calls)], finish


def check_calls(calls, tools, allowed: set[str], first_idx: int = 0) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for k, (call_id, name, arguments) in enumerate(calls):
        assert name in allowed
        assert call_id == f"functions.{name}:{first_idx + k}"
        jsonschema.validate(json.loads(arguments), schemas[name])


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_always_give_valid_calls(client, stream):
    rng = random.Random()
    for _ in range(N_PER_MODE):
        tools = random_tools(rng)
        for choice in ("required", "named"):
            only = rng.choice(tools)["function"]["name"]
            tc = {"type": "function", "function": {"name": only}} if choice == "named" else "required"
            content, calls, finish = call_reply(client, tools, stream, rng, tool_choice=tc,
                                                parallel_tool_calls=rng.random() < 0.5)
            assert calls and finish == "tool_calls" and not content
            check_calls(calls, tools, {only} if choice == "named" else {t["function"]["name"] for t in tools})


def test_parallel_tool_calls_false_gives_one_call(client):
    rng = random.Random()
    tools = random_tools(rng)
    for stream in (False, True):
        for _ in range(4):
            _, calls, _ = call_reply(client, tools, stream, rng, tool_choice="required", parallel_tool_calls=False)
            assert len(calls) == 1


@pytest.mark.parametrize("choice", ["auto", "none"])
def test_auto_and_none_never_leak_markers(client, choice):
    rng = random.Random()
    for stream in (False, True):
        for _ in range(4):
            tools = random_tools(rng)
            content, calls, finish = call_reply(client, tools, stream, rng, tool_choice=choice)
            assert not MARKERS.search(content)
            if choice == "none":
                assert not calls and finish in ("stop", "length")
            check_calls(calls, tools, {t["function"]["name"] for t in tools})


def test_history_ids_are_rewritten_and_the_count_continues(client):
    rng = random.Random()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "functions.get_weather:1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "content": "rain"}]
    for stream in (False, True):
        _, calls, _ = call_reply(client, tools, stream, rng, messages=history, tool_choice="required")
        check_calls(calls, tools, {"get_weather"}, first_idx=2)


def test_history_call_ids_rename_consistently():
    msgs, n = history_call_ids([
        {"role": "assistant", "tool_calls": [{"id": "x", "function": {"name": "f"}}, {"id": "functions.g:7", "function": {"name": "g"}}]},
        {"role": "tool", "tool_call_id": "x", "content": "1"},
        {"role": "assistant", "tool_calls": [{"id": "y", "function": {"name": "f"}}]},
        {"role": "tool", "tool_call_id": "y", "content": "2"}])
    assert n == 3
    assert [c["id"] for c in msgs[0]["tool_calls"]] == ["functions.f:0", "functions.g:7"]
    assert msgs[1]["tool_call_id"] == "functions.f:0"
    assert msgs[2]["tool_calls"][0]["id"] == msgs[3]["tool_call_id"] == "functions.f:2"


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_choices_are_400(structured_server, body, param):
    base = structured_server[0]
    r = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "messages": USER, "max_tokens": 8, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(base + "/health", timeout=5).status_code == 200
