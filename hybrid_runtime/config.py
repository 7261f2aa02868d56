"""Typed configuration: `ModelConfig` from GGUF metadata, `RuntimeOptions` from the user."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hybrid_runtime.errors import InvalidRequestError, ModelFormatError

GATING_SOFTMAX, GATING_SIGMOID = 1, 2

# YaRN beta_fast / beta_slow are not stored in GGUF files; these are the published values.
# Kimi K2 (vocab 163,840) uses 1/1; DeepSeek V2/V3/R1 use 32/1.
KIMI_VOCAB = 163_840
_YARN_BETAS = {"kimi": (1.0, 1.0), "deepseek": (32.0, 1.0)}


PREFILL_PRECISIONS = ("bf16", "exact", "int8")

@dataclass(slots=True, frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_vocab: int
    n_ctx_train: int
    rms_eps: float
    # MLA attention
    q_lora_rank: int  # 0: plain attn_q
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head: int
    mla_split: bool  # attn_k_b/attn_v_b (True) or legacy combined attn_kv_b
    # feed-forward
    n_dense_lead: int
    n_ff_dense: int
    n_ff_expert: int
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_group: int
    n_group_used: int
    gating: int
    weights_norm: bool
    weights_scale: float
    # rope
    rope_base: float
    rope_scaling: str  # "none" | "yarn" | "linear"
    rope_factor: float
    rope_orig_ctx: int
    yarn_log_mul: float  # mscale_all_dim (the file stores 0.1 x this)
    tied_output: bool
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def head_dim_qk(self) -> int:
        return self.qk_nope + self.qk_rope

    @property
    def family(self) -> str:
        return "kimi" if self.n_vocab == KIMI_VOCAB or "kimi" in self.name.lower() else "deepseek"

    @property
    def default_yarn_betas(self) -> tuple[float, float]:
        return _YARN_BETAS[self.family]

    @property
    def attn_scale(self) -> float:
        """Softmax scale: mscale^2 / sqrt(nope + rope), mscale = 1 + 0.1 * mscale_all_dim * ln(factor)."""
        mscale = 1.0
        if self.rope_scaling == "yarn" and self.rope_factor > 1.0:
            mscale = 1.0 + 0.1 * self.yarn_log_mul * math.log(self.rope_factor)
        return mscale * mscale / math.sqrt(self.head_dim_qk)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_lead

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra")
        return d


def _require_positive(cfg: ModelConfig) -> None:
    for name in ("n_layer", "n_embd", "n_head", "n_vocab", "kv_lora_rank", "qk_rope", "qk_nope", "v_head"):
        if getattr(cfg, name) <= 0:
            raise ModelFormatError(f"model metadata has invalid {name} = {getattr(cfg, name)}")
    if cfg.n_layer > cfg.n_dense_lead:
        if not 0 < cfg.n_expert_used <= cfg.n_expert:
            raise ModelFormatError(f"model metadata: {cfg.n_expert_used} experts used of {cfg.n_expert}")
        if cfg.n_group > 1:
            if cfg.n_expert % cfg.n_group or not 0 < cfg.n_group_used < cfg.n_group:
                raise ModelFormatError(f"model metadata: invalid expert groups {cfg.n_group_used} of {cfg.n_group}")
    if cfg.qk_rope % 2:
        raise ModelFormatError(f"model metadata: rope dimension {cfg.qk_rope} is odd")


@dataclass(slots=True)
class RuntimeOptions:
    """What the user chooses at load time (not stored in the file)."""

    compute: str = "fast"  # "fast" (quantized CPU experts) | "reference" (exact float path)
    threads: int | None = None
    n_ctx: int | None = None  # None: min(training context, 8192)
    yarn_beta_fast: float | None = None
    yarn_beta_slow: float | None = None
    device: str = "auto"  # "auto" (cuda when present) | "cpu" | "cuda": where the non-expert weights go
    gpu_device: str | None = None  # torch device standing for "the GPU" (tests: "cpu" runs the GPU code path on CPU)
    gpu_mem: int | None = None
    cpu_moe: bool = False
    n_cpu_moe: int | None = None
    override: list[str] = field(default_factory=list)
    numa_config: str | None = None
    prefill_chunk: int = 512
    expert_profile: str | None = None  # JSON routing profile: warms the GPU expert cache at start, saved by close()
    record_routing: str | None = None  # append every token's expert ids per layer to this file
    speculative_prefetch: bool = False  # prefetch layer L+1's likely experts from layer L's hidden state
    cuda_graphs: bool = False  # replay one-token GPU matmuls as CUDA graphs (CUDA only; ignored elsewhere)
    # where the weights the CPU reads live (experts/store.py): "auto" (panels where the compiled step runs,
    # else hugepages where THP is granted and the copy fits, else mmap) | "panels" (matrices repacked into
    # the panel layout, 16 rows a vector) | "hugepages" (copied) | "mmap" (in place, faulted in at load) | "lazy"
    expert_store: str = "auto"
    progress: bool = False  # progress bars while loading (the CLI turns them on)
    cpu_kernels: bool = True  # False: quantized matmuls as float emulation of the same rounding (slow)
    compiled: bool = True  # the compiled CPU step (cpu/step.py) where it applies; False: the torch model
    # long prefill chunks (>= 96 tokens): "int8" = the Q4_K/Q6_K/Q8_0 matrices through the integer panel
    # GEMM (quant/gemm.py: activations quantized as llama.cpp does, the fastest), the other types and the
    # attention in bf16; "bf16" = every matrix dequantized to bf16 (on the trained model a little closer to
    # F32 than llama.cpp: benchmarks.md, fidelity); "exact" = float32 with llama.cpp's activation rounding
    prefill_precision: str = "int8"

    def validate(self) -> "RuntimeOptions":
        if self.prefill_precision not in PREFILL_PRECISIONS:
            raise InvalidRequestError(f"prefill_precision must be one of {', '.join(PREFILL_PRECISIONS)}, "
                                      f"not {self.prefill_precision!r}")
        if self.compute not in ("fast", "reference"):
            raise InvalidRequestError(f"compute must be 'fast' or 'reference', not {self.compute!r}")
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError(f"threads must be at least 1, not {self.threads}")
        if self.n_ctx is not None and self.n_ctx < 1:
            raise InvalidRequestError(f"n_ctx must be at least 1, not {self.n_ctx}")
        if self.prefill_chunk < 1:
            raise InvalidRequestError("prefill_chunk must be at least 1")
        if self.device not in ("auto", "cpu", "cuda", "hybrid"):
            raise InvalidRequestError(f"device must be auto, cpu, cuda or hybrid, not {self.device!r}")
        if self.expert_store not in ("auto", "panels", "mmap", "lazy", "hugepages"):
            raise InvalidRequestError(f"expert_store must be auto, panels, mmap, lazy or hugepages, not {self.expert_store!r}")
        for name in ("expert_profile", "record_routing"):
            _check_writable_path(name, getattr(self, name))
        if self.expert_profile and Path(self.expert_profile).exists():
            from hybrid_runtime.experts.gpu_cache import read_profile

            read_profile(self.expert_profile)  # the format; the model's shape is checked at load
        return self


def _check_writable_path(name: str, value: str | None) -> None:
    """A file the runtime writes: not a directory, and in a directory that exists."""
    if value is None:
        return
    path = Path(value)
    if not value or path.is_dir():
        raise InvalidRequestError(f"{name} must name a file, not {value!r}")
    if not path.parent.is_dir():
        raise InvalidRequestError(f"{name} {value}: the directory {path.parent} does not exist")
