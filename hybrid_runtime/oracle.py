"""llama.cpp (through llama-cpp-python) on the same GGUF file: the correctness oracle and speed baseline.

Oracle runs use an F32 KV cache (llama.cpp's default F16 also rounds q and the softmax) and pass
the YaRN betas explicitly (they are not in the file; llama-cpp-python's defaults are 32/1).

llama.cpp's extra CPU buffer types (weight repacking, and the AMX kernels on CPUs with AMX) are
off unless asked for: on a Sapphire Rapids development machine a native build crashed in
`decode` on any batch of more than one token of a Q4_K_M file with them on, and ran with them off.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from hybrid_runtime.errors import ModelFormatError
from hybrid_runtime.util import quiet_stderr


@contextmanager
def _model_params(extra_bufts: bool):
    """llama-cpp-python exposes no switch for use_extra_bufts: patch its default model params."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = extra_bufts
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def open_llama(path: str | Path, n_ctx: int, n_ubatch: int = 512, threads: int | None = None,
               yarn_betas: tuple[float, float] = (32.0, 1.0), f32_kv: bool = True, logits_all: bool = True,
               extra_bufts: bool = False):
    import llama_cpp

    kw = dict(n_ctx=n_ctx, n_batch=max(n_ubatch, 1), n_ubatch=max(n_ubatch, 1), logits_all=logits_all,
              n_threads=threads or len(os.sched_getaffinity(0)), yarn_beta_fast=yarn_betas[0],
              yarn_beta_slow=yarn_betas[1], verbose=False, n_gpu_layers=0)
    if threads:
        kw["n_threads_batch"] = threads
    if f32_kv:
        kw.update(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                  flash_attn=False)
    try:
        with quiet_stderr(), _model_params(extra_bufts):
            return llama_cpp.Llama(model_path=str(path), **kw)
    except (ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{path}: llama.cpp could not load the model ({e})") from None


def llama_cpp_logits(path: str | Path, tokens: list[int], n_ubatch: int = 512, threads: int | None = None,
                     yarn_betas: tuple[float, float] = (32.0, 1.0), f32_kv: bool = True) -> np.ndarray:
    """Logits at every position of `tokens` from llama.cpp: float32 [n, vocab]."""
    llm = open_llama(path, n_ctx=max(64, len(tokens) + 8), n_ubatch=n_ubatch, threads=threads,
                     yarn_betas=yarn_betas, f32_kv=f32_kv)
    try:
        with quiet_stderr():
            llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_greedy(path: str | Path, prompt: list[int], n: int, threads: int | None = None,
                     yarn_betas: tuple[float, float] = (32.0, 1.0)) -> list[int]:
    """Greedy continuation of `prompt` by llama.cpp (F32 KV)."""
    llm = open_llama(path, n_ctx=max(64, len(prompt) + n + 8), threads=threads, yarn_betas=yarn_betas)
    out: list[int] = []
    try:
        with quiet_stderr():
            llm.eval(list(prompt))
            for _ in range(n):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(tok)
                llm.eval([tok])
        return out
    finally:
        llm.close()


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.argmax(a, -1) == np.argmax(b, -1)))


@contextmanager
def llama_cpp_scorer(path: str | Path, n_ctx: int, threads: int | None = None,
                     yarn_betas: tuple[float, float] = (32.0, 1.0), f32_kv: bool = True):
    """One llama.cpp context for many windows: yields score(tokens) -> logits float32 [n, vocab],
    each window from an empty cache."""
    llm = open_llama(path, n_ctx=n_ctx, threads=threads, yarn_betas=yarn_betas, f32_kv=f32_kv)

    def score(tokens: list[int]) -> np.ndarray:
        llm.reset()                                  # eval() drops the cache past n_tokens
        with quiet_stderr():
            llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)

    try:
        yield score
    finally:
        llm.close()
