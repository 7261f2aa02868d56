"""Perplexity, bits per byte and KL-divergence over a text file, as llama-perplexity measures them.

The text is tokenized once and cut into consecutive windows of n_ctx tokens; each window runs
from an empty cache and only its second half is scored (the logits at positions n_ctx/2 ..
n_ctx-2 predict the next token), so every scored token sees at least n_ctx/2 tokens of context.
Bits per byte = the scored tokens' total negative log-likelihood in bits over their bytes, a
figure that does not depend on the tokenizer.

Saved logits (`save_logits`) are the scored positions' log-probabilities with the tokens and
n_ctx, so a later run on another quantization (`kl_divergence`) compares distributions position
by position: KL(base || this), top-1 agreement.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybrid_runtime.errors import InvalidRequestError

LOGITS_FORMAT = "hybrid-runtime-logprobs-v1"
Scorer = Callable[[list[int]], np.ndarray]          # window tokens [n] -> logits float32 [n, V]


@dataclass(frozen=True, slots=True)
class Windows:
    tokens: np.ndarray          # int32 [n_windows * n_ctx], the evaluated tokens
    n_ctx: int

    @property
    def n_windows(self) -> int:
        return len(self.tokens) // self.n_ctx

    @property
    def first(self) -> int:     # first scored logit position in a window
        return self.n_ctx // 2

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.n_windows):
            yield self.tokens[k * self.n_ctx: (k + 1) * self.n_ctx].tolist()

    def targets(self) -> np.ndarray:
        """The scored tokens, window after window: int [n_windows, n_ctx - 1 - first]."""
        w = self.tokens.reshape(self.n_windows, self.n_ctx)
        return w[:, self.first + 1:]


def make_windows(tokens: list[int], n_ctx: int, max_windows: int | None = None) -> Windows:
    if n_ctx < 4 or n_ctx % 2:
        raise InvalidRequestError(f"--n-ctx must be an even number of at least 4, not {n_ctx}")
    n = len(tokens) // n_ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise InvalidRequestError(f"the text has {len(tokens)} tokens: at least n_ctx = {n_ctx} are needed "
                                  "(use a longer text or a smaller --n-ctx)")
    return Windows(np.asarray(tokens[: n * n_ctx], dtype=np.int32), n_ctx)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)


def scored_log_probs(scorer: Scorer, windows: Windows, progress: Callable[[], None] | None = None) -> np.ndarray:
    """Log-probabilities at every scored position: float32 [n_windows, n_ctx - 1 - first, V]."""
    out = []
    for window in windows:
        logits = scorer(window)
        out.append(log_softmax(logits[windows.first: windows.n_ctx - 1]))
        if progress:
            progress()
    return np.stack(out)


@dataclass(frozen=True, slots=True)
class Perplexity:
    n_windows: int
    n_scored: int
    nll: float                  # total, nats
    n_bytes: int
    nll_stderr: float           # standard error of the mean NLL per token

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll / self.n_scored))

    @property
    def ppl_stderr(self) -> float:
        return self.ppl * self.nll_stderr

    @property
    def bits_per_byte(self) -> float:
        return self.nll / np.log(2.0) / self.n_bytes

    def as_dict(self) -> dict:
        return {"windows": self.n_windows, "scored_tokens": self.n_scored, "bytes": self.n_bytes,
                "perplexity": self.ppl, "perplexity_stderr": self.ppl_stderr, "bits_per_byte": self.bits_per_byte}


def perplexity(log_probs: np.ndarray, windows: Windows, token_bytes: Callable[[int], bytes]) -> Perplexity:
    targets = windows.targets()
    picked = np.take_along_axis(log_probs, targets[..., None].astype(np.int64), -1)[..., 0]
    nll = -picked.astype(np.float64).ravel()
    lengths = {t: len(token_bytes(int(t))) for t in np.unique(targets)}
    n_bytes = sum(lengths[t] for t in targets.ravel().tolist())
    stderr = float(nll.std(ddof=1) / np.sqrt(len(nll))) if len(nll) > 1 else 0.0
    return Perplexity(windows.n_windows, len(nll), float(nll.sum()), max(n_bytes, 1), stderr)


@dataclass(frozen=True, slots=True)
class Divergence:
    mean: float                 # KL(base || this), nats per position
    stderr: float
    median: float
    p99: float
    max: float
    top1: float                 # fraction of positions where both pick the same token

    def as_dict(self) -> dict:
        return {"kld_mean": self.mean, "kld_stderr": self.stderr, "kld_median": self.median,
                "kld_p99": self.p99, "kld_max": self.max, "top1_agreement": self.top1}


def kl_per_position(base: np.ndarray, this: np.ndarray) -> np.ndarray:
    """KL(base || this) at each scored position (float64 [N]), from two log-probability arrays."""
    b = base.reshape(-1, base.shape[-1]).astype(np.float64)
    t = this.reshape(-1, this.shape[-1]).astype(np.float64)
    return np.maximum((np.exp(b) * (b - t)).sum(-1), 0.0)


def kl_divergence(base: np.ndarray, this: np.ndarray) -> Divergence:
    """KL(base || this) over the scored positions, from two log-probability arrays of the same shape."""
    kld = kl_per_position(base, this)
    top1 = float(np.mean(base.reshape(-1, base.shape[-1]).argmax(-1) == this.reshape(-1, this.shape[-1]).argmax(-1)))
    stderr = float(kld.std(ddof=1) / np.sqrt(len(kld))) if len(kld) > 1 else 0.0
    return Divergence(float(kld.mean()), stderr, float(np.median(kld)), float(np.percentile(kld, 99)),
                      float(kld.max()), top1)


def save_log_probs(path: Path, log_probs: np.ndarray, windows: Windows) -> None:
    with open(path, "wb") as f:
        np.savez(f, format=np.array(LOGITS_FORMAT), n_ctx=np.array(windows.n_ctx),
                 tokens=windows.tokens, log_probs=log_probs.astype(np.float32))


def load_log_probs(path: Path, windows: Windows, n_vocab: int) -> np.ndarray:
    """Base log-probabilities saved by `save_log_probs` for the same tokens and n_ctx."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["format"]) != LOGITS_FORMAT:
                raise ValueError("unknown format")
            n_ctx, tokens, log_probs = int(z["n_ctx"]), z["tokens"], z["log_probs"]
    except FileNotFoundError:
        raise InvalidRequestError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise InvalidRequestError(f"{path}: not a logits file saved by `perplexity --save-logits` ({e})") from None
    if n_ctx != windows.n_ctx or not np.array_equal(tokens, windows.tokens):
        raise InvalidRequestError(f"{path}: the base logits were computed on other tokens or another --n-ctx "
                                  f"(base n_ctx {n_ctx}, {len(tokens)} tokens; here {windows.n_ctx}, "
                                  f"{len(windows.tokens)}): use the same text, n_ctx and tokenizer")
    expected = (windows.n_windows, windows.n_ctx - 1 - windows.first, n_vocab)
    if log_probs.shape != expected:
        raise InvalidRequestError(f"{path}: log-probabilities of shape {log_probs.shape}, expected {expected} "
                                  "(a model with another vocabulary?)")
    return log_probs
