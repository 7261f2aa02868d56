"""Sampling: `SamplingParams` (validated) and `make_sampler` composing penalties and filters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from hybrid_runtime.errors import InvalidRequestError


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top logprobs to report per token
    ignore_eos: bool = False  # never end at an end-of-generation token (benchmarks; llama.cpp's ignore_eos)

    def validate(self) -> "SamplingParams":
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "top_logprobs must be in [0, 20]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidRequestError(msg)
        return self


Sampler = Callable[[np.ndarray, list[int]], int]


def apply_penalties(logits: np.ndarray, history: list[int], p: SamplingParams) -> np.ndarray:
    if not history or (p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1):
        return logits
    ids, counts = np.unique(np.asarray(history, dtype=np.int64), return_counts=True)
    ids_ok = ids < logits.shape[0]
    ids, counts = ids[ids_ok], counts[ids_ok]
    out = logits.copy()
    if p.repetition_penalty != 1:
        v = out[ids]
        out[ids] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
    out[ids] -= p.presence_penalty + p.frequency_penalty * counts
    return out


# Below this temperature sampling is greedy (dividing by 1e-308 would overflow to inf - inf = NaN).
MIN_TEMPERATURE = 1e-6


def filter_logits(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, top-p and min-p as masks (-inf) on the scaled logits."""
    x = logits.astype(np.float64) / max(p.temperature, MIN_TEMPERATURE)
    if p.top_k and p.top_k < x.shape[0]:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    if p.min_p > 0:
        x = np.where(probs < p.min_p * probs.max(), -np.inf, x)
    if p.top_p < 1:
        order = np.argsort(-probs)
        cum = np.cumsum(probs[order])
        cut = order[np.searchsorted(cum, p.top_p) + 1 :]  # keep the smallest set reaching top_p
        x[cut] = -np.inf
    return x


def make_sampler(p: SamplingParams) -> Sampler:
    rng = np.random.default_rng(None if p.seed is None else p.seed % (1 << 64))  # any integer: negative, huge

    def sample(logits: np.ndarray, history: list[int]) -> int:
        logits = apply_penalties(logits, history, p)
        if p.temperature < MIN_TEMPERATURE:
            return int(np.argmax(logits))
        x = filter_logits(logits, p)
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        return int(rng.choice(probs.shape[0], p=probs))

    return sample


def top_logprobs(logits: np.ndarray, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    x = logits.astype(np.float64)
    logz = x.max() + np.log(np.exp(x - x.max()).sum())
    lp = x - logz
    top = np.argsort(-lp)[:n] if n else []
    return float(lp[token]), [(int(i), float(lp[i])) for i in top]
