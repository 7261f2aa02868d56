"""Constrained decoding: a grammar matcher per sequence that masks the logits before sampling.

The grammar library is llguidance (Lark grammars with inline `%json {schema}` and special tokens
written `<|name|>`), run over the model's own GGUF vocabulary through llama.cpp's tokenizer.

`GrammarConstraint` is what `engine.generate` asks, once per token:

    masked = c.mask(logits, remaining)   # logits [V] with the banned tokens at -inf
    token = c.commit(sampled, remaining) # the token to emit; the matcher advances by it

The budget guarantee: after each token the constraint plans the shortest way it knows to finish
the document (forced tokens first, then closers such as `"`, `}`, `]`, `0`, `</think>`; greedy,
checked by the matcher). A sampled token whose plan would not fit the tokens left is replaced by
the first token of the current plan, so a document always closes before `max_tokens` (when the
minimal document itself fits: `min_tokens()` tells). The next mask is computed on a worker
thread while the model runs the next forward pass (llguidance drops the GIL).
"""

from __future__ import annotations

import json
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from hybrid_runtime.errors import InvalidRequestError

# JSON output shape: compact but readable, as json.dumps writes it; no free whitespace, so a
# random model cannot pad a document with blanks until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# closers in order of preference: the markers that end a free-text region first (else text would
# absorb `"` forever), then the JSON closers
_CLOSERS = ("</think>", "<|tool_calls_section_end|>", "<|tool_call_end|>", "<|tool_call_argument_begin|>",
            '"', "}", "]", "0", ":", ",", "a", " ")
_MAX_PLAN = 512
_POOL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hybrid-grammar")


class GrammarError(InvalidRequestError):
    """A grammar or JSON schema the constraint library cannot compile (HTTP 400)."""


def json_schema_rule(schema: dict | bool, name: str = "json") -> str:
    """A Lark rule `name: %json {...}` holding `schema` with the house JSON options."""
    if schema is True or schema == {}:
        schema = {}
    if not isinstance(schema, dict):
        raise GrammarError("a JSON schema must be an object")
    body = {**schema, "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}
    _check_schema(body)
    return f"{name}: %json {json.dumps(body, ensure_ascii=False)}\n"


def _check_schema(schema: dict) -> None:
    import llguidance

    try:
        error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(schema))
    except (ValueError, RuntimeError, TypeError) as e:
        error = str(e) or type(e).__name__
    if error:
        raise GrammarError(f"the JSON schema does not compile: {' '.join(error.split())[:300]}")


def _ll_tokenizer(tokenizer):
    """The llguidance view of the vocabulary (built once per Tokenizer, ~10 ms for 2k tokens)."""
    cached = getattr(tokenizer, "_llg_tokenizer", None)
    if cached is None:
        from llguidance.llamacpp import lltokenizer_from_vocab

        with warnings.catch_warnings():  # llama-cpp-python deprecates llama_token_get_attr, once per token
            warnings.simplefilter("ignore", DeprecationWarning)
            cached = lltokenizer_from_vocab(tokenizer.llama_vocab(), eos_token=sorted(tokenizer.eog_ids))
        tokenizer._llg_tokenizer = cached
    return cached


def _closer_ids(tokenizer) -> list[int]:
    cached = getattr(tokenizer, "_llg_closers", None)
    if cached is None:
        cached = []
        for text in _CLOSERS:
            ids = tokenizer.tokenize(text, special=True, add_bos=False)
            if len(ids) == 1:
                cached.append(ids[0])
        tokenizer._llg_closers = cached
    return cached


def compile_grammar(tokenizer, lark: str):
    """A fresh matcher source: returns a factory of GrammarConstraint; raises GrammarError."""
    import llguidance

    llt = _ll_tokenizer(tokenizer)
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        error = llguidance.LLMatcher.validate_grammar(grammar, llt)
    except (ValueError, RuntimeError, TypeError) as e:
        error = str(e) or type(e).__name__
    if error:
        raise GrammarError(f"the grammar does not compile: {' '.join(error.split())[:300]}")
    return lambda: GrammarConstraint(llguidance.LLMatcher(llt, grammar, log_level=0), tokenizer)


class GrammarConstraint:
    """One sequence's matcher, with its closing plan and the next mask in flight."""

    def __init__(self, matcher, tokenizer):
        if matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {matcher.get_error()}")
        self.matcher = matcher
        self.eos = min(tokenizer.eog_ids) if tokenizer.eog_ids else 0
        self._closers = _closer_ids(tokenizer)
        self.plan = closing_plan(matcher, self._closers)  # None: no way to close found
        self._tokenizer = tokenizer
        self._next: Future = self._submit()

    def _submit(self) -> Future:
        # The matcher's tokenizer view calls into llama.cpp's vocabulary, which the llama model owns:
        # the job holds the tokenizer (and so the model) until it has finished, even when the
        # constraint is dropped with its mask in flight (at an error, at exit: that segfaulted).
        matcher, tokenizer = self.matcher, self._tokenizer
        return _POOL.submit(lambda: (matcher.compute_bitmask(), tokenizer)[0])

    def close(self) -> None:
        """Wait for the mask in flight (call before dropping a constraint that will not be used)."""
        try:
            self._next.result()
        except Exception:  # noqa: BLE001 - a failed mask of a constraint nobody uses any more
            pass

    def min_tokens(self) -> int | None:
        """Tokens of the shortest document found from the start (None: no closing found)."""
        return None if self.plan is None else len(self.plan)

    def mask(self, logits: np.ndarray, remaining: int) -> np.ndarray:
        """logits [V] → a copy with every token the grammar (or the budget) rules out at -inf."""
        bits = np.frombuffer(self._next.result(), dtype=np.uint8)
        allowed = np.zeros(logits.shape[0], dtype=bool)
        n = min(logits.shape[0], bits.shape[0] * 8)
        allowed[:n] = np.unpackbits(bits, bitorder="little")[:n].astype(bool)
        if self.plan and len(self.plan) >= remaining:  # no slack left: follow the plan
            allowed[:] = False
            allowed[self.plan[0]] = True
        if not allowed.any() or self.matcher.is_error():
            allowed[:] = False
            allowed[self.eos] = True
        return np.where(allowed, logits, -np.inf).astype(logits.dtype, copy=False)

    def commit(self, token: int, remaining: int) -> int:
        """Advance by `token`, or by the plan's next token when `token` would overrun the budget."""
        trial = self.matcher.deep_copy()
        plan = closing_plan(trial, self._closers) if trial.consume_token(token) else None
        if self.plan is not None and (plan is None or len(plan) >= remaining):
            token = self.plan[0] if self.plan else self.eos
            self.matcher.consume_token(token)
            self.plan = self.plan[1:]
        else:
            self.matcher, self.plan = trial, plan
        self._next = self._submit()
        return token


def closing_plan(matcher, closers: list[int]) -> list[int] | None:
    """The greedy shortest continuation to an accepting state ([] when already there; None: not found)."""
    m = matcher.deep_copy()
    plan: list[int] = []
    while not m.is_accepting():
        if m.is_error() or len(plan) > _MAX_PLAN:
            return None
        forced = m.compute_ff_tokens()
        if forced:
            if not m.consume_tokens(forced):
                return None
            plan += forced
            continue
        token = next((t for t in closers if m.validate_tokens([t]) == 1), None)
        if token is None:  # e.g. a choice of names: the lowest allowed token still progresses
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            ids = np.flatnonzero(bits)
            if ids.size == 0:
                return None
            token = int(ids[0])
        if not m.consume_token(token):
            return None
        plan.append(token)
    return plan


def json_grammar(schema: dict | bool, think: bool | str = False) -> str:
    """Lark text for one JSON document matching `schema`, after an optional <think>…</think> block
    (`think=True`) or the rest of a block the prompt already opened (`think="open"`: text, </think>)."""
    if think == "open":
        head = "start: think json\nthink: THINK_TEXT? </think>\nTHINK_TEXT: /(?s:.+)/\n"
    elif think:
        head = "start: think? json\nthink: <think> THINK_TEXT </think>\nTHINK_TEXT: /(?s:.*)/\n"
    else:
        head = "start: json\n"
    return head + json_schema_rule(schema)


def json_constraint(tokenizer, schema: dict | bool = True, think: bool | str = False):
    """A factory of fresh constraints for JSON documents matching `schema` (True: any object)."""
    if schema is True:
        schema = {"type": "object"}
    return compile_grammar(tokenizer, json_grammar(schema, think))


def schema_from_file(path) -> dict:
    """A JSON schema read from a file (for `generate --json-schema`); one-line errors."""
    from pathlib import Path

    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise GrammarError(f"cannot read the schema {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise GrammarError(f"the schema {path} is not valid JSON ({e})") from None
    if not isinstance(schema, (dict, bool)):
        raise GrammarError(f"the schema {path} must hold a JSON object")
    return schema


def fitted_json_constraint(tokenizer, schema: dict | bool, max_tokens: int, opened: bool = False):
    """A fresh JSON constraint (with K2-Thinking's optional <think> block when the template has one;
    `opened`: the prompt already opened it, as K2.5's does, so the reply ends it first);
    raises GrammarError when the shortest valid document needs more than `max_tokens`."""
    think = "open" if opened else "<think>" in tokenizer.chat_template
    constraint = json_constraint(tokenizer, schema, think)()
    need = constraint.min_tokens()
    if need is not None and need > max_tokens:
        constraint.close()
        raise GrammarError(f"{max_tokens} tokens are too few for this format: the shortest valid reply takes {need}")
    return constraint
