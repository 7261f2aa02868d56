"""engine/grammar.py on the tiny model: masks hold, documents always close within max_tokens
(the budget plan), <think> blocks before JSON, bad grammars are one clear error."""

import json
import random

import jsonschema
import pytest

import hybrid_runtime as hr
from hybrid_runtime.engine.grammar import (GrammarError, compile_grammar, fitted_json_constraint, json_constraint,
                                           json_grammar)


@pytest.fixture(scope="module")
def model(tiny):
    with hr.load(tiny("kimi-k2-tiny", "Q4_K_M")[0], threads=1) as m:
        yield m


def test_documents_close_at_every_budget_from_the_minimum(model):
    rng = random.Random()
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "integer"}},
                                               "inner": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
              "required": rng.sample(["name", "tags", "inner"], 2)}
    make = json_constraint(model.tokenizer, schema)
    need = make().min_tokens()
    for n in range(need, need + 12):
        c = make()
        text = "".join(model.generate("Hi", max_tokens=n, temperature=1.0, seed=rng.randrange(1 << 30), constraint=c))
        assert model.last_stats.generated_tokens <= n
        jsonschema.validate(json.loads(text), schema)


def test_mask_admits_only_the_grammar(model):
    rng = random.Random()
    words = [f"{rng.choice('xyz')}{rng.randrange(100)}" for _ in range(3)]
    make = compile_grammar(model.tokenizer, "start: W (\",\" W)*\nW: " + " | ".join(json.dumps(w) for w in words))
    for _ in range(4):
        text = "".join(model.generate("List:", max_tokens=rng.randint(4, 16), temperature=1.0, constraint=make()))
        assert set(text.split(",")) <= set(words), text


def test_think_block_then_json(model):
    rng = random.Random()
    make = compile_grammar(model.tokenizer, json_grammar({"type": "object"}, think=True))
    for _ in range(3):
        ids = list(model.generate(model.tokenize("x"), max_tokens=24, temperature=1.0, seed=rng.randrange(1000), constraint=make()))
        text = "".join(ids)
        body = text.split("</think>", 1)[1] if "</think>" in text else text
        assert isinstance(json.loads(body), dict)


def test_an_opened_think_block_ends_before_the_json(model):
    """A prompt that opened <think> (K2.5's; the chat and `generate --chat` pass opened=True): the reply
    is reasoning, one </think>, then the document, parsed so by the chat's parser."""
    from hybrid_runtime.chat_format import parse_assistant

    rng = random.Random()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for _ in range(3):
        c = fitted_json_constraint(model.tokenizer, schema, 32, opened=True)
        text = "".join(model.generate(model.tokenize("x"), max_tokens=32, temperature=1.0, seed=rng.randrange(1000), constraint=c))
        assert text.count("</think>") == 1 and "<think>" not in text
        jsonschema.validate(json.loads(parse_assistant(text, in_think=True).content), schema)


@pytest.mark.parametrize("lark, message", [("start: <|nosuch|>", "unknown special token"), ("start: (", "does not compile")])
def test_bad_grammars_are_one_clear_error(model, lark, message):
    with pytest.raises(GrammarError, match=message):
        compile_grammar(model.tokenizer, lark)


def test_too_small_budget_is_refused(model):
    schema = {"type": "object", "properties": {"abcdef": {"type": "string"}}, "required": ["abcdef"]}
    with pytest.raises(GrammarError, match="too few"):
        fitted_json_constraint(model.tokenizer, schema, 2)
    with pytest.raises(GrammarError, match="JSON schema does not compile"):
        json_constraint(model.tokenizer, {"type": "object", "properties": {"a": {"type": 7}}})
