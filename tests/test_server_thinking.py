"""Thinking on a running server, driven by the real `openai` client: a K2.5-style model whose chat
template reads `thinking` (the generation prompt opens <think>, or with thinking=false writes an empty
<think></think>). chat_template_kwargs must reach the template (the prompt token count in `usage`
says which prompt was rendered), reasoning_content must be the text before </think> and absent with
thinking off, and constrained replies (JSON, tool calls) must still validate after a think block."""

import json
import random
import re
import types

import jsonschema
import openai
import pytest

from hybrid_runtime.chat_format import parse_assistant
from hybrid_runtime.synth.chat_template import kimi_k2_template
from test_server_constraints import random_schema
from test_server_tools import MARKERS, check_calls, random_tools

USER = [{"role": "user", "content": "What is 2 + 2?"}]
OFF = {"chat_template_kwargs": {"thinking": False}}
ON = {"chat_template_kwargs": {"thinking": True}}


@pytest.fixture(scope="module")
def k25(model_cache):
    """A `serve` process on a tiny model with the K2.5-style template: (client, tokenizer, base url)."""
    from serve_process import serve_process

    from hybrid_runtime.synth import cached_model
    from hybrid_runtime.tokenizer import Tokenizer
    from hybrid_runtime.weights.gguf_file import GGUFModelFile

    path = cached_model("kimi-k2-tiny", "Q4_K_M", model_cache, thinking="k2.5")[0]
    tok = Tokenizer(GGUFModelFile(path))
    with serve_process(path, "--n-ctx", "1024", "--model-name", "k25", "--threads", "1") as (base, _, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60), tok, base


def chat(client, stream: bool, **kw):
    """(reasoning_content, content, tool calls, finish_reason, usage) of one reply, streamed or not."""
    kw = {"model": "k25", "messages": USER, "temperature": 1.0, "max_tokens": 12, **kw}
    if not stream:
        r = client.chat.completions.create(**kw)
        m = r.choices[0].message
        calls = [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or []]
        return getattr(m, "reasoning_content", None), m.content, calls, r.choices[0].finish_reason, r.usage
    reasoning, content, calls, finish, usage = None, "", {}, None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        r = getattr(d, "reasoning_content", None)
        if r is not None:
            reasoning = (reasoning or "") + r
        content += d.content or ""
        for tc in d.tool_calls or []:
            c = calls.setdefault(tc.index, [tc.id, tc.function.name, ""])
            c[2] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return reasoning, content, [tuple(calls[i]) for i in sorted(calls)], finish, usage


def fitted(client, stream: bool, **kw):
    """chat() of a constrained request; a max_tokens below the shortest valid reply is first answered
    with a 400 that says what it takes, then asked again with that much room."""
    try:
        return chat(client, stream, **kw)
    except openai.BadRequestError as e:
        need = int(re.search(r"takes (\d+) tokens", e.message).group(1))
        assert need > kw["max_tokens"]
        return chat(client, stream, **{**kw, "max_tokens": need + 16})


def test_the_template_reads_thinking():
    """The K2.5-style template: an open <think> by default, an empty closed one with thinking=false."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    t = ImmutableSandboxedEnvironment().from_string(kimi_k2_template("k2.5"))
    history = USER + [{"role": "assistant", "content": "4", "reasoning_content": "two and two"},
                      {"role": "user", "content": "and 3 + 3?"}, {"role": "assistant", "content": "6", "reasoning_content": "three and three"}]
    on, off = t.render(messages=history, add_generation_prompt=True), t.render(messages=history, add_generation_prompt=True, thinking=False)
    assert on.endswith("<|im_middle|><think>") and off.endswith("<|im_middle|><think></think>")
    assert "<think>three and three</think>6" in on and "three and three" not in off
    assert "two and two" not in on  # reasoning before the last user turn is dropped either way


@pytest.mark.parametrize("stream", [False, True])
def test_chat_template_kwargs_reach_the_template(k25, stream):
    """usage.prompt_tokens is the length of the prompt rendered with the request's kwargs."""
    client, tok, _ = k25
    n_on = len(tok.encode_chat(USER))
    n_off = len(tok.encode_chat(USER, template_kwargs={"thinking": False}))
    assert n_off == n_on + 1  # the closing </think>, one special token
    for extra, want in ((None, n_on), (ON, n_on), (OFF, n_off)):
        usage = chat(client, stream, max_tokens=2, extra_body=extra)[4]
        assert usage.prompt_tokens == want, (extra, usage)


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_is_the_text_before_think_end(k25, stream):
    """Thinking on: the prompt opened <think>, so the reply splits at </think> exactly as its raw tokens
    say (the logprobs list every token, special ones included, streamed or not)."""
    client, _, _ = k25
    rng = random.Random()
    for _ in range(4):
        kw = dict(model="k25", messages=USER, temperature=1.0, max_tokens=16, seed=rng.randrange(1 << 30), logprobs=True)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
            lps = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
            reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            n = chunks[-1].usage.completion_tokens
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            r = client.chat.completions.create(**kw)
            lps = r.choices[0].logprobs.content
            reasoning, content = getattr(r.choices[0].message, "reasoning_content", None) or "", r.choices[0].message.content or ""
            n = r.usage.completion_tokens
            finish = r.choices[0].finish_reason
        assert len(lps) == n
        if finish == "stop":  # the random model sampled end-of-generation: its token is no text of the reply
            lps = lps[:-1]
        # the tokens' bytes, decoded together: a character split over two byte tokens is one
        # character of the reply, while each token's own text shows a replacement mark
        tokens = [t.token for t in lps]
        if any("tool_call" in t for t in tokens):
            continue  # a random model's tool-call marker: without tools in the request it stays text (tested apart)
        want = parse_assistant(b"".join(bytes(t.bytes) for t in lps).decode("utf-8", errors="replace"), in_think=True)
        assert (reasoning, content) == (want.reasoning_content or "", want.content or ""), tokens


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_false_gives_no_reasoning(k25, stream):
    """With thinking off no <think> block can open: no reasoning_content, no marker in content."""
    client, _, _ = k25
    rng = random.Random()
    for _ in range(6):
        reasoning, content, calls, finish, usage = chat(client, stream, max_tokens=rng.randint(4, 24),
                                                         seed=rng.randrange(1 << 30), extra_body=OFF)
        assert not reasoning and not calls, (reasoning, content)
        assert not MARKERS.search(content or "") and finish in ("stop", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_json_after_an_open_think_block(k25, stream):
    """response_format on a prompt that opened <think>: reasoning first, then the JSON in content;
    with thinking off, only the JSON."""
    client, _, _ = k25
    rng = random.Random()
    for thinking in (ON, OFF):
        for _ in range(4):
            schema = random_schema(rng)
            rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
            reasoning, content, _, _, _ = fitted(client, stream, max_tokens=48, seed=rng.randrange(1 << 30),
                                               response_format=rf, extra_body=thinking)
            jsonschema.validate(json.loads(content), schema)
            assert not MARKERS.search((reasoning or "") + content)
            if thinking is OFF:
                assert not reasoning


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_after_reasoning(k25, stream):
    """tool_choice required on a thinking model: reasoning, then valid calls; thinking off: calls only."""
    client, _, _ = k25
    rng = random.Random()
    for thinking in (ON, OFF):
        for _ in range(4):
            tools = random_tools(rng)
            reasoning, content, calls, finish, _ = fitted(client, stream, max_tokens=64, seed=rng.randrange(1 << 30),
                                                        tools=tools, tool_choice="required", extra_body=thinking)
            assert calls and finish == "tool_calls" and not content
            check_calls(calls, tools, {t["function"]["name"] for t in tools})
            assert not MARKERS.search(reasoning or "")
            if thinking is OFF:
                assert not reasoning


def test_kwargs_a_template_does_not_read_change_nothing(structured_server, k25):
    """The K2 Instruct template reads no `thinking`: the same prompt, no error. Kwargs never replace the
    template's globals (namespace, used by the K2.5 template) nor the reserved variables."""
    plain = openai.OpenAI(base_url=structured_server[0] + "/v1", api_key="none", max_retries=0, timeout=60)
    kw = dict(model="tiny", messages=USER, max_tokens=2)
    base = plain.chat.completions.create(**kw).usage.prompt_tokens
    assert plain.chat.completions.create(**kw, extra_body=OFF).usage.prompt_tokens == base
    client, tok, _ = k25
    odd = {"chat_template_kwargs": {"namespace": 1, "messages": [], "add_generation_prompt": False, "range": "x"}}
    assert chat(client, False, max_tokens=2, extra_body=odd)[4].prompt_tokens == len(tok.encode_chat(USER))


def test_thinking_false_on_a_template_without_the_switch_is_ignored():
    """K2-Thinking's template writes <think> blocks but reads no `thinking`: the grammar keeps the
    optional think block (the template decides, as it does for the prompt)."""
    from jinja2 import meta
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from hybrid_runtime.server.constraints import thinking_enabled

    env = ImmutableSandboxedEnvironment()
    for style, honoured in (("k2-thinking", False), ("k2.5", True)):
        text = kimi_k2_template(style)
        tok = types.SimpleNamespace(chat_template=text, template_vars=meta.find_undeclared_variables(env.parse(text)))
        assert thinking_enabled({}, tok) and thinking_enabled(ON, tok)
        assert thinking_enabled(OFF, tok) is not honoured


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kwargs", [[1], "thinking", {"thinking": "no"}, {"thinking": 0}])
def test_bad_chat_template_kwargs_are_400(k25, stream, kwargs):
    client, _, base = k25
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, stream, extra_body={"chat_template_kwargs": kwargs})
    assert e.value.status_code == 400 and e.value.body["param"] == "chat_template_kwargs"
    import httpx

    assert httpx.get(base + "/health", timeout=5).status_code == 200
