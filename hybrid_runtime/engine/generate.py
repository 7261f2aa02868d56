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
    exact: int = 0  # leading tokens whose KV is the same bits a fresh sequence computes (scheduler)


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


def start_prompt(model: CausalLM, seq: Sequence, prompt: list[int], limit: int | None = None) -> int:
    """Keep the cached prefix the prompt shares, at most `limit` tokens (at least the prompt's
    last token is recomputed, for its logits); returns how many tokens were reused."""
    if not prompt:
        raise ValueError("empty prompt")
    if len(prompt) > model.n_ctx:
        raise ContextOverflowError(f"the prompt has {len(prompt)} tokens; the context holds {model.n_ctx}")
    reuse = min(common_prefix(seq.tokens, prompt), len(prompt) - 1, len(prompt) if limit is None else limit)
    seq.cache.truncate(reuse)
    seq.tokens = prompt[:reuse]
    return reuse


def prefill(model: CausalLM, seq: Sequence, prompt: list[int]) -> tuple[np.ndarray, int]:
    """Bring the sequence to `prompt`; returns the last position's logits and how many tokens were reused."""
    reuse = start_prompt(model, seq, prompt)
    logits = model.forward(prompt[reuse:], seq.cache)
    seq.tokens = list(prompt)
    return logits[-1], reuse


class Decoding:
    """One sequence's generation as a state machine, so that one loop serves a lone sequence
    (`generate`) and a batch of them (the scheduler runs one forward for every running sequence).

    The driver feeds the prompt (`pending` tokens, in chunks of its choosing, then `prompt_done`),
    and after each forward calls `accept(logits)` with the last position's logits: it samples,
    applies the constraint, stop strings and limits, and returns the Steps to emit. While not
    `done`, `next_token` is the token the next forward must append."""

    def __init__(self, model: CausalLM, tokenizer, prompt: list[int], params: SamplingParams, seq: Sequence,
                 should_stop: Callable[[], bool] | None = None, constraint: Constraint | None = None):
        params.validate()
        if not prompt:
            raise ValueError("empty prompt")
        self.model, self.tokenizer, self.prompt, self.params, self.seq = model, tokenizer, prompt, params, seq
        self.should_stop, self.constraint = should_stop, constraint
        self.stats = Stats(prompt_tokens=len(prompt))
        self.sample = make_sampler(params)
        self.decoder = StreamDecoder(tokenizer.token_bytes, params.stop)
        self.generated: list[int] = []
        self.next_token: int | None = None
        self.done = False
        self.started = False
        self._t0 = self._t1 = 0.0

    # -- the prompt ------------------------------------------------------------------------------
    def begin(self, limit: int | None = None) -> None:
        """Reuse what the sequence's cache shares with the prompt, at most `limit` tokens (call
        right before the first chunk)."""
        self._t0 = time.perf_counter()
        self.stats.cached_tokens = start_prompt(self.model, self.seq, self.prompt, limit)
        self.started = True

    @property
    def pending(self) -> list[int]:
        """Prompt tokens not yet in the cache."""
        return self.prompt[len(self.seq.tokens):] if self.started else list(self.prompt)

    def fed(self, tokens: list[int]) -> None:
        """The driver appended these tokens (a prompt chunk or next_token) to the cache."""
        self.seq.tokens.extend(tokens)

    # -- the reply -------------------------------------------------------------------------------
    def accept(self, logits: np.ndarray) -> list[Step]:
        """Logits after the prompt or after next_token -> the Steps to emit (the last one carries
        finish_reason and stats when the sequence ends)."""
        now = time.perf_counter()
        if not self.generated:
            self.stats.prefill_s = now - self._t0
            self._t1 = now
        p, model, seq = self.params, self.model, self.seq
        if self.should_stop is not None and self.should_stop():
            return self._finish("cancelled", [])
        generated = self.generated
        if len(generated) >= p.max_tokens:  # max_tokens 0: the prompt only
            return self._finish("length", [])
        if p.ignore_eos and self.tokenizer.eog_ids:
            logits = logits.copy()
            logits[list(self.tokenizer.eog_ids)] = -np.inf
        if self.constraint is None:
            token = self.sample(logits, self.prompt + generated)
        else:
            remaining = min(p.max_tokens - len(generated), model.n_ctx - len(seq.tokens) + 1)
            token = self.constraint.commit(self.sample(self.constraint.mask(logits, remaining), self.prompt + generated),
                                           remaining)
        generated.append(token)
        self.stats.generated_tokens = len(generated)
        lp = top_logprobs(logits, token, p.logprobs) if p.logprobs is not None else (None, None)
        if token in self.tokenizer.eog_ids:  # counted in the usage, so listed with its logprob (no text)
            return self._finish("stop", [Step("", token, logprob=lp[0], top_logprobs=lp[1])])
        text = self.decoder.push(token)
        out = [Step(text, token, logprob=lp[0], top_logprobs=lp[1])]
        if self.decoder.stopped:
            return self._finish("stop", out)
        if len(generated) >= p.max_tokens or len(seq.tokens) >= model.n_ctx:
            return self._finish("length", out)
        self.next_token = token
        return out

    def cancel(self) -> list[Step]:
        return self._finish("cancelled", [])

    def _finish(self, reason: str, out: list[Step]) -> list[Step]:
        self.done, self.next_token = True, None
        self.stats.decode_s = time.perf_counter() - self._t1 if self.generated else 0.0
        out.append(Step(self.decoder.flush(), None, finish_reason=reason, stats=self.stats))
        return out


def generate(model: CausalLM, tokenizer, prompt: list[int], params: SamplingParams,
             seq: Sequence | None = None, should_stop: Callable[[], bool] | None = None,
             constraint: Constraint | None = None) -> Iterator[Step]:
    """Stream Steps for one sequence; the last Step has finish_reason and stats.
    `constraint` (e.g. engine.grammar.GrammarConstraint) masks the logits and may replace the token."""
    d = Decoding(model, tokenizer, prompt, params, seq or Sequence(model.new_cache()), should_stop, constraint)
    d.begin()
    rest = d.pending
    logits = model.forward(rest, d.seq.cache)[-1]
    d.fed(rest)
    while True:
        yield from d.accept(logits)
        if d.done:
            return
        token = d.next_token
        logits = model.forward([token], d.seq.cache)[-1]
        d.fed([token])
