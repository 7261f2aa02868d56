"""The one generation loop, shared by the Python API, the CLI, the chat and the server.

A `Sequence` owns a latent cache and the tokens whose KV it holds; a new prompt reuses the
longest common prefix of those tokens (multi-turn chat, repeated system prompts). The loop is
written per sequence; batching several sequences in one step is the scheduler's job on top.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np

from hybrid_runtime.engine.detok import StreamDecoder
from hybrid_runtime.engine.sampling import SamplingParams, make_sampler, top_logprobs
from hybrid_runtime.errors import ContextOverflowError


class CausalLM(Protocol):
    n_ctx: int

    def new_cache(self): ...
    def forward(self, token_ids: list[int], cache, all_logits: bool = False) -> np.ndarray: ...


class Constraint(Protocol):
    def mask(self, logits: np.ndarray, remaining: int) -> np.ndarray: ...  # [V] with banned tokens at -inf
    def commit(self, token: int, remaining: int) -> int: ...  # the token to emit; advances the state


@dataclass(slots=True)
class Sequence:
    cache: object
    tokens: list[int] = field(default_factory=list)  # tokens whose KV is in the cache


@dataclass(slots=True)
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the cache
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return (self.generated_tokens - 1) / self.decode_s if self.decode_s > 0 and self.generated_tokens > 1 else 0.0


@dataclass(slots=True)
class Step:
    text: str  # newly released text
    token: int | None
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" on the last step
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    stats: Stats | None = None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefill(model: CausalLM, seq: Sequence, prompt: list[int]) -> tuple[np.ndarray, int]:
    """Bring the sequence to `prompt`; returns the last position's logits and how many tokens were reused."""
    if not prompt:
        raise ValueError("empty prompt")
    if len(prompt) > model.n_ctx:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; the context holds {model.n_ctx}")
    reuse = min(common_prefix(seq.tokens, prompt), len(prompt) - 1)
    seq.cache.truncate(reuse)
    seq.tokens = prompt[:reuse]
    logits = model.forward(prompt[reuse:], seq.cache)
    seq.tokens = list(prompt)
    return logits[-1], reuse


def generate(model: CausalLM, tokenizer, prompt: list[int], params: SamplingParams,
             seq: Sequence | None = None, should_stop: Callable[[], bool] | None = None,
             constraint: Constraint | None = None) -> Iterator[Step]:
    """Stream Steps for one sequence; the last Step has finish_reason and stats.
    `constraint` (e.g. engine.grammar.GrammarConstraint) masks the logits and may replace the token."""
    params.validate()
    seq = seq or Sequence(model.new_cache())
    stats = Stats(prompt_tokens=len(prompt))
    t0 = time.perf_counter()
    logits, stats.cached_tokens = prefill(model, seq, prompt)
    stats.prefill_s = time.perf_counter() - t0
    sample = make_sampler(params)
    decoder = StreamDecoder(tokenizer.token_bytes, params.stop)
    generated: list[int] = []
    finish = "length"
    t1 = time.perf_counter()
    while len(generated) < params.max_tokens:
        if should_stop is not None and should_stop():
            finish = "cancelled"
            break
        if constraint is None:
            token = sample(logits, prompt + generated)
        else:
            remaining = min(params.max_tokens - len(generated), model.n_ctx - len(seq.tokens) + 1)
            token = constraint.commit(sample(constraint.mask(logits, remaining), prompt + generated), remaining)
        generated.append(token)
        stats.generated_tokens = len(generated)
        lp = top_logprobs(logits, token, params.logprobs) if params.logprobs is not None else (None, None)
        if token in tokenizer.eog_ids:  # counted in the usage, so listed with its logprob (no text)
            finish = "stop"
            yield Step("", token, logprob=lp[0], top_logprobs=lp[1])
            break
        text = decoder.push(token)
        if decoder.stopped:
            finish = "stop"
            yield Step(text, token, logprob=lp[0], top_logprobs=lp[1])
            break
        yield Step(text, token, logprob=lp[0], top_logprobs=lp[1])
        if len(generated) >= params.max_tokens or len(seq.tokens) >= model.n_ctx:
            finish = "length"
            break
        logits = model.forward([token], seq.cache)[-1]
        seq.tokens.append(token)
    stats.decode_s = time.perf_counter() - t1
    yield Step(decoder.flush(), None, finish_reason=finish, stats=stats)
