"""The public Python API: `load(path, **options) -> Model`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hybrid_runtime.config import ModelConfig, RuntimeOptions
from hybrid_runtime.engine.generate import Sequence, Stats, generate
from hybrid_runtime.engine.sampling import SamplingParams
from hybrid_runtime.errors import HybridError, InvalidRequestError
from hybrid_runtime.layers import Rope
from hybrid_runtime.loader import build_network, configure_threads
from hybrid_runtime.tokenizer import Tokenizer
from hybrid_runtime.weights.gguf_file import GGUFModelFile
from hybrid_runtime.weights.model_file import open_model_file

_DEFAULT_CTX = 8192


class Model:
    """A loaded model: tokenizer, network and options. Not thread-safe: one caller at a time."""

    def __init__(self, gf: GGUFModelFile, config: ModelConfig, net, tokenizer: Tokenizer, options: RuntimeOptions,
                 net_weights=None, yarn_betas: tuple[float, float] | None = None):
        self.file, self.config, self.net, self.tokenizer, self.options = gf, config, net, tokenizer, options
        self.net_weights = net_weights  # the weight provider (placement, NUMA executor)
        self.yarn_betas = yarn_betas or config.default_yarn_betas
        self.n_ctx = min(options.n_ctx or min(config.n_ctx_train, _DEFAULT_CTX), config.n_ctx_train)
        self.last_stats: Stats | None = None
        self._closed = False

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    def memory_report(self) -> list[str]:
        """Routed-expert bytes per NUMA node (planned and resident) when a NUMA config is in use."""
        numa = getattr(self.net_weights, "numa", None)
        return numa.memory_report().lines() if numa is not None else []

    def placement_summary(self) -> str:
        """One line: where the weights and the routed experts run."""
        describe = getattr(self.net_weights, "describe", None)
        desc = describe() if describe is not None else "all weights on the CPU"
        return f"{desc}; routed experts: {self.expert_backend_name()}"

    def expert_backend_name(self) -> str:
        if hasattr(self.net, "describe_experts"):
            return self.net.describe_experts()
        for ffn in self.net.ffn:
            experts = getattr(ffn, "experts", None)
            if experts is not None:
                return getattr(experts, "describe", lambda: type(experts).__name__)()
        return "none (dense model)"

    def inert_options(self) -> dict[str, str]:
        """GPU-path options that were given but do nothing with this placement: {option: why}."""
        o, w = self.options, self.net_weights
        if not hasattr(w, "cache"):  # a CPU-only provider: no expert cache, no routing recorder, no GPU
            given = ("expert_profile", "record_routing", "speculative_prefetch", "cuda_graphs")
            return {k: "the model runs without the GPU path" for k in given if getattr(o, k)}
        inert = {}
        if o.expert_profile and w.cache is None:  # --cpu-moe, or no GPU memory left for cache slots
            inert["expert_profile"] = "there is no GPU expert cache"
        if o.cuda_graphs and getattr(getattr(w, "device", None), "type", None) != "cuda":
            inert["cuda_graphs"] = "the model does not run on a CUDA device"
        return inert

    # -- shutdown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Write the routing profile (options.expert_profile) and close the routing record. Idempotent.

        Raises HybridError (one sentence) when the profile cannot be written; the record is closed anyway.
        """
        if self._closed:
            return
        self._closed = True
        cache = getattr(self.net_weights, "cache", None)
        recorder = getattr(self.net_weights, "recorder", None)
        try:
            path = self.options.expert_profile
            if path and cache is not None:
                try:
                    cache.stats.save_profile(path)
                except OSError as e:
                    raise HybridError(f"could not write the expert profile {path}: {e.strerror or e}") from None
        finally:
            if recorder is not None:
                recorder.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.close()
        except HybridError as e:
            if exc is None:
                raise
            exc.add_note(str(e))  # keep the error that is already propagating

    # -- low level ------------------------------------------------------------------------------
    def new_cache(self):
        return self.net.new_cache(self.n_ctx)

    def forward(self, token_ids: list[int], cache, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the cache in prefill chunks; float32 logits [n, vocab] (n = 1 unless all_logits)."""
        ids = self._check_ids(token_ids)
        chunk = self.options.prefill_chunk
        fast = getattr(self.net, "forward_last_logits", None)
        if fast is not None and not all_logits and len(ids) <= chunk:  # decode: one compiled call
            return fast(ids, cache)
        out = []
        for start in range(0, len(ids), chunk):
            hidden = self.net.forward(torch.as_tensor(ids[start : start + chunk]), cache)
            if all_logits:
                out.append(self.net.logits(hidden))
            elif start + chunk >= len(ids):
                out.append(self.net.logits(hidden[-1:]))
        return torch.cat(out).float().cpu().numpy()

    def forward_batch(self, token_ids: list[int], caches: list) -> np.ndarray:
        """One new token for each of B sequences, each with its own cache and position -> float32
        logits [B, vocab]. Where the network batches (the compiled step) the B tokens share one
        call, every weight (and every expert chosen by several of them) read once; each row is
        the same bits as `forward([token], cache)` alone."""
        ids = self._check_ids(token_ids)
        if len(ids) != len(caches):
            raise InvalidRequestError(f"{len(ids)} tokens for {len(caches)} sequences")
        batch = getattr(self.net, "forward_batch", None)
        if batch is None or len(ids) == 1:
            return np.concatenate([self.forward([t], c) for t, c in zip(ids, caches)])
        out = []
        for i in range(0, len(ids), self.options.prefill_chunk):  # the step's scratch holds a chunk
            hidden = batch(torch.as_tensor(ids[i: i + self.options.prefill_chunk]), caches[i: i + self.options.prefill_chunk])
            out.append(self.net.logits(hidden))
        return torch.cat(out).float().cpu().numpy()

    @property
    def prompt_mix_limit(self) -> int:
        """Prompt chunks shorter than this may share a step with other sequences' tokens
        (`forward_segments`) and give the bits they give alone; 0 where the network cannot."""
        if not hasattr(self.net, "forward_segments"):
            return 0
        return min(getattr(self.net, "prefill_min_tokens", 1 << 30), self.options.prefill_chunk)

    def forward_segments(self, segments: list[list[int]], caches: list) -> np.ndarray:
        """One step for several sequences: each segment (a decode token, or a prompt chunk shorter
        than prompt_mix_limit) at its own cache's next positions -> float32 logits [S, vocab] of
        every segment's last token; all the tokens share the weight reads (at most prefill_chunk
        of them). Each row is the same bits as `forward(segment, cache)`."""
        segs = [self._check_ids(seg) for seg in segments]
        if len(segs) != len(caches):
            raise InvalidRequestError(f"{len(segs)} segments for {len(caches)} sequences")
        limit = self.prompt_mix_limit
        if not limit or max(len(s) for s in segs) >= max(limit, 2) or sum(map(len, segs)) > self.options.prefill_chunk:
            return np.concatenate([self.forward(s, c) for s, c in zip(segs, caches)])
        return self.net.logits(self.net.forward_segments(segs, caches)).float().cpu().numpy()

    @property
    def exact_reuse_unit(self) -> int:
        """A cached prefix computed by another sequence (or an earlier request) gives the same bits
        as computing it anew when it spans whole prefill chunks of this many tokens that were
        computed as prompt chunks; 1 where every token's arithmetic is independent of its chunk
        (the compiled step with no torch prefill: any prefix, decoded tokens too)."""
        if hasattr(self.net, "forward_batch") and getattr(self.net, "prefill_net", None) is None:
            return 1
        return self.options.prefill_chunk

    def expert_reads(self) -> tuple[int, int] | None:
        """(routed experts read, bytes) so far where the network counts them (the compiled step)."""
        reads = getattr(self.net, "expert_reads", None)
        return reads() if reads is not None else None

    def _check_ids(self, token_ids) -> list[int]:
        ids = [int(t) for t in token_ids]
        if not ids:
            raise InvalidRequestError("no tokens given")
        bad = [t for t in ids if not 0 <= t < self.config.n_vocab]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary of {self.config.n_vocab}")
        return ids

    # -- high level -----------------------------------------------------------------------------
    def logits(self, token_ids) -> np.ndarray:
        """Logits at every position of a fresh sequence: float32 [n_tokens, n_vocab]."""
        return self.forward(token_ids, self.new_cache(), all_logits=True)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self.tokenizer.tokenize(text, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.detokenize(list(ids))

    def generate(self, prompt: str | list[int], max_tokens: int = 128, temperature: float = 0.8,
                 top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0, seed: int | None = None,
                 stop: list[str] | str | None = None, constraint=None, **more) -> Iterator[str]:
        """Yield text pieces as they are produced; `last_stats` holds the timings afterwards.
        `constraint`: a fresh engine.grammar.GrammarConstraint (e.g. from `json_constraint`)."""
        ids = self.tokenize(prompt, special=False) if isinstance(prompt, str) else list(prompt)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed,
                                max_tokens=max_tokens, stop=stop, **more)
        for step in generate(self, self.tokenizer, self._check_ids(ids), params, Sequence(self.new_cache()),
                             constraint=constraint):
            if step.text:
                yield step.text
            if step.stats is not None:
                self.last_stats = step.stats


def load(path: str | Path, **options) -> Model:
    """Open a GGUF model (single or split) and make it ready to run.

    Options (see RuntimeOptions): compute="fast"|"reference", threads, n_ctx, yarn_beta_fast,
    yarn_beta_slow, device, gpu_mem, cpu_moe, n_cpu_moe, override, numa_config, prefill_chunk,
    expert_profile, record_routing, speculative_prefetch, cuda_graphs, compiled (False: the torch model
    instead of the compiled CPU step). Call `close()` (or use the
    model as a context manager) when done: it writes the expert profile and the routing record.
    """
    known = {f.name for f in fields(RuntimeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InvalidRequestError(f"unknown load option {unknown[0]!r} (known: {', '.join(sorted(known))})")
    opts = RuntimeOptions(**options).validate()
    gf, arch, cfg = open_model_file(path)  # the same validation as `inspect`
    tokenizer = Tokenizer(gf)
    configure_threads(opts.threads)
    beta_fast, beta_slow = cfg.default_yarn_betas
    betas = (opts.yarn_beta_fast if opts.yarn_beta_fast is not None else beta_fast,
             opts.yarn_beta_slow if opts.yarn_beta_slow is not None else beta_slow)
    rope = Rope(cfg.qk_rope, cfg.rope_base, cfg.rope_scaling, cfg.rope_factor, cfg.rope_orig_ctx, *betas)
    net, weights = build_network(gf, cfg, opts, rope, lambda w: arch.DeepSeek2(cfg, w, rope))
    return Model(gf, cfg, net, tokenizer, opts, net_weights=weights, yarn_betas=betas)
