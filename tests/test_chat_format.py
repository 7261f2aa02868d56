"""Kimi K2 output parsing: reasoning, content, tool calls, malformed text, streaming in pieces."""

import json
import random

import pytest

from hybrid_runtime.chat_format import (StreamParser, parse_assistant, parse_tool_call, prompt_opens_think)

B, E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"


def call(name, idx, args):
    body = args if isinstance(args, str) else json.dumps(args)
    return f"<|tool_call_begin|>functions.{name}:{idx}<|tool_call_argument_begin|>{body}<|tool_call_end|>"


TWO_CALLS = ("Let me check." + B + call("get_weather", 0, {"city": "Paris"})
             + call("get_time", 1, {"tz": "Europe/Paris"}) + E + "<|im_end|>")


def test_plain_text_is_content():
    m = parse_assistant("Hello, world!")
    assert (m.content, m.reasoning_content, m.tool_calls) == ("Hello, world!", "", [])


def test_two_tool_calls():
    m = parse_assistant(TWO_CALLS)
    assert m.content == "Let me check."
    assert [(c.id, c.name, json.loads(c.arguments)) for c in m.tool_calls] == [
        ("functions.get_weather:0", "get_weather", {"city": "Paris"}),
        ("functions.get_time:1", "get_time", {"tz": "Europe/Paris"}),
    ]
    assert m.tool_calls[0].to_openai()["type"] == "function"


def test_think_block_goes_to_reasoning():
    m = parse_assistant("<think>step 1, step 2</think>The answer is 4.")
    assert m.reasoning_content == "step 1, step 2"
    assert m.content == "The answer is 4."


def test_prompt_opened_think():
    m = parse_assistant("hmm</think>done", in_think=True)
    assert (m.reasoning_content, m.content) == ("hmm", "done")
    assert prompt_opens_think("<|im_middle|><think>")
    assert not prompt_opens_think("<think></think>")


@pytest.mark.parametrize("text", [
    B + call("f", 0, "{not json") + E,
    B + "<|tool_call_begin|>functions.f:0<|tool_call_end|>" + E,
    B + call("f", 0, "[1, 2]") + E,
])
def test_malformed_call_becomes_content(text):
    m = parse_assistant(text)
    assert m.tool_calls == []
    assert m.content  # nothing is lost


def test_unclosed_section_salvages_complete_calls():
    m = parse_assistant("ok" + B + call("f", 0, {"a": 1}) + "<|tool_call_begin|>functions.g:1<|tool_call_arg")
    assert [c.name for c in m.tool_calls] == ["f"]
    assert m.content.startswith("ok")


def test_markup_hidden_and_weird_input_never_raises():
    assert parse_assistant("hi<|im_end|>").content == "hi"
    for text in ["", "<", "<think>", "</think>", E, B, "<|tool_call_begin|>", "\x00\ud800", B * 3 + E * 2]:
        parse_assistant(text)  # must not raise


def test_call_without_index_or_prefix():
    c = parse_tool_call("<|tool_call_begin|>search<|tool_call_argument_begin|>{}<|tool_call_end|>", 3)
    assert (c.id, c.name) == ("functions.search:3", "search")


def test_duplicate_ids_are_made_unique():
    m = parse_assistant(B + call("f", 0, {}) + E + B + call("f", 0, {}) + E)
    assert len({c.id for c in m.tool_calls}) == 2


@pytest.mark.parametrize("seed", range(5))
def test_streaming_in_random_pieces_matches_whole(seed):
    text = "<think>plan <b> things</think>Answer < 5 and <|x|>" + TWO_CALLS
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    pieces = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    p = StreamParser()
    events = []
    for piece in pieces:
        events += p.feed(piece)
    events += p.finish()
    whole = parse_assistant(text)
    assert "".join(t for k, t in events if k == "content") == whole.content
    assert "".join(t for k, t in events if k == "reasoning") == whole.reasoning_content == "plan <b> things"
    assert [c.id for c in p.tool_calls] == [c.id for c in whole.tool_calls]
    assert "<|tool_call" not in whole.content and "<think>" not in whole.content


def test_streaming_holds_back_partial_marker():
    p = StreamParser()
    assert p.feed("abc<thi") == [("content", "abc")]
    assert p.feed("nk>r") == [("reasoning", "r")]
    assert p.in_think


def test_tools_off_keeps_section_text():
    p = StreamParser(parse_tools=False)
    events = p.feed(B + "x") + p.finish()
    assert "".join(t for _, t in events) == B + "x"
    assert p.tool_calls == []


def test_tool_call_section_ends_an_open_think_block():
    m = parse_assistant("<think>let me call" + B + call("f", 3, {"a": 1}) + E + "done")
    assert (m.reasoning_content, m.content) == ("let me call", "done")
    assert [(c.id, c.arguments) for c in m.tool_calls] == [("functions.f:3", '{"a": 1}')]
