"""Weight providers: how the model code obtains its tensors, independent of where they live.

`FloatWeights` dequantizes every non-expert tensor once into float32 torch tensors (CPU); the
routed experts come from an expert backend chosen by the loader (exact float or quantized CPU
kernels). The GPU provider of the placement plan implements the same methods.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from hybrid_runtime.quant.act_quant import round_activations
from hybrid_runtime.quant.registry import get_format
from hybrid_runtime.weights.gguf_file import GGUFModelFile

ExpertsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (h [T,D], ids [T,K], w [T,K]) -> [T,D]


class Linear:
    """y = x @ W.T with W [out, in]."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class HeadLinear:
    """Per-head matrices: x [T, H, in] -> [T, H, out] with W [H, out, in]."""

    __slots__ = ("weight",)

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("thi,hoi->tho", x, self.weight)


class RoundedLinear(Linear):
    """A quantized weight as llama.cpp runs it: activations rounded to the weight's vec_dot_type."""

    __slots__ = ("ggml_type",)

    def __init__(self, weight: torch.Tensor, ggml_type):
        super().__init__(weight)
        self.ggml_type = ggml_type

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return round_activations(x, self.ggml_type) @ self.weight.T


class RoundedHeadLinear(HeadLinear):
    __slots__ = ("ggml_type",)

    def __init__(self, weight: torch.Tensor, ggml_type):
        super().__init__(weight)
        self.ggml_type = ggml_type

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(round_activations(x, self.ggml_type))


class Embedding:
    __slots__ = ("table",)

    def __init__(self, table: torch.Tensor):
        self.table = table

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A float32 torch tensor that owns its memory (F32 tensors arrive as read-only file views)."""
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a, dtype=np.float32, order="C")
    return torch.from_numpy(a)


def dequantize_tensor(gf: GGUFModelFile, name: str) -> np.ndarray:
    ref = gf.tensor(name)
    return get_format(ref.ggml_type).dequantize(ref.data)


class FloatWeights:
    """Non-expert tensors dequantized to float32 once; experts from `experts_factory(layer)`."""

    def __init__(self, gf: GGUFModelFile, experts_factory: Callable[[int], ExpertsFn]):
        self.gf = gf
        self._experts_factory = experts_factory
        self._cache: dict[str, torch.Tensor] = {}

    def has(self, name: str) -> bool:
        return self.gf.has(name)

    def matrix(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            self._cache[name] = to_torch(dequantize_tensor(self.gf, name))
        return self._cache[name]

    def vector(self, name: str) -> torch.Tensor:
        return self.matrix(name).reshape(-1)

    def linear(self, name: str) -> Linear:
        return Linear(self.matrix(name))

    def head_linear(self, name: str) -> HeadLinear:
        return HeadLinear(self.matrix(name))

    def head_linear_from(self, weight: torch.Tensor) -> HeadLinear:
        return HeadLinear(weight)

    def embedding(self, name: str) -> Embedding:
        return Embedding(self.matrix(name))

    def experts(self, layer: int) -> ExpertsFn:
        return self._experts_factory(layer)


class KernelLinear:
    """A quantized matrix read in place from the mapped file (raw blocks [out, row_bytes]).

    Few tokens (decode): the VNNI integer kernels on the raw blocks, activations quantized to
    Q8_K/Q8_0 as llama.cpp does. Many tokens (prefill, >= TORCH_MIN_TOKENS): the matrix is
    dequantized for the call into a reused buffer and multiplied by torch, in bf16 by default
    (`bf16_prefill`; closer to the F32 model than llama.cpp, benchmarks.md) or in float32 with the
    activations rounded as llama.cpp does. With `int8_prefill`, Q4_K, Q6_K and Q8_0 matrices of a
    long chunk go through the integer panel GEMM instead (quant/gemm.py, activations quantized as
    llama.cpp does), the other types in bf16. No float copy of the weights is kept. Where the store
    made stored panels of the matrix (`panels`), those serve few tokens and the int8 route.
    """

    __slots__ = ("raw", "ggml_type", "_k", "_min_tokens", "bf16_prefill", "int8_prefill", "panels")

    def __init__(self, raw: np.ndarray, ggml_type, bf16_prefill: bool = False, int8_prefill: bool = False,
                 panels=None):
        from hybrid_runtime.experts.prefill import TORCH_MIN_TOKENS  # the measured crossover
        from hybrid_runtime.quant import gemm, kernels

        self.raw, self.ggml_type, self._k, self._min_tokens = raw, ggml_type, kernels, TORCH_MIN_TOKENS
        self.bf16_prefill = bf16_prefill or int8_prefill  # many tokens: bf16 weights and activations instead
        self.int8_prefill = int8_prefill and raw.flags.c_contiguous and gemm.supports(ggml_type, *self._shape())
        self.panels = panels  # quant/gemm.StoredPanels of this matrix (the store made them): read instead of raw

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels is not None and (self.int8_prefill or x.shape[0] < self._min_tokens):
            from hybrid_runtime.quant import gemm

            xs = np.ascontiguousarray(x.detach().float().numpy(), dtype=np.float32)
            out = np.empty((xs.shape[0], self.panels.rows), np.float32)
            gemm.matmul_stored(self.panels, 0, gemm.quantize_acts(self.ggml_type, xs),
                               np.arange(xs.shape[0], dtype=np.int64), out)
            return torch.from_numpy(out)
        if x.shape[0] < self._min_tokens:
            xs = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)
            return torch.from_numpy(self._k.matmul(self.ggml_type, self.raw, xs))
        if self.int8_prefill:
            from hybrid_runtime.quant import gemm

            xs = np.ascontiguousarray(x.detach().float().numpy(), dtype=np.float32)
            rows, cols = self._shape()
            out = np.empty((xs.shape[0], rows), np.float32)
            gemm.matmul(self.ggml_type, self.raw.reshape(-1), 0, self.raw.shape[1], rows, cols,
                        gemm.quantize_acts(self.ggml_type, xs), np.arange(xs.shape[0], dtype=np.int64), out)
            return torch.from_numpy(out)
        if self.bf16_prefill:
            from hybrid_runtime.quant.bf16 import as_bf16, bf16_buffer, dequantize_bf16

            w = as_bf16(dequantize_bf16(self.ggml_type, self.raw, bf16_buffer("linear", *self._shape())))
            return (x.to(torch.bfloat16) @ w.T).float()
        w = torch.from_numpy(self._k.dequantize_rows(self.ggml_type, self.raw))  # [out, in]
        return round_activations(x, self.ggml_type) @ w.T

    def _shape(self) -> tuple[int, int]:
        from gguf import GGML_QUANT_SIZES

        values, nbytes = GGML_QUANT_SIZES[self.ggml_type]
        return self.raw.shape[0], self.raw.shape[1] // nbytes * values


class KernelHeadLinear:
    """Per-head quantized matrices W [H, out, row_bytes] (MLA's attn_k_b / attn_v_b) through the
    grouped kernel: each head is a group, each (token, head) row of x one pair."""

    __slots__ = ("raw", "ggml_type", "spec", "dense", "_k", "_min_tokens", "bf16_prefill")

    def __init__(self, raw: np.ndarray, ggml_type, dense, bf16_prefill: bool = False):
        from hybrid_runtime.experts.prefill import TORCH_MIN_TOKENS
        from hybrid_runtime.quant import kernels

        self.raw, self.ggml_type, self.spec, self.dense, self._k = raw, ggml_type, kernels.CPU_KERNELS[ggml_type], dense, kernels
        self._min_tokens, self.bf16_prefill = TORCH_MIN_TOKENS, bf16_prefill

    def chunk_dtype(self, n_tokens: int) -> torch.dtype | None:
        """The dtype the attention around this matrix may compute a chunk of n_tokens in (None:
        float32): bf16 where this matrix itself runs in bf16, and then it returns bf16 too."""
        return torch.bfloat16 if self.bf16_prefill and n_tokens >= self._min_tokens else None

    def dense_weight(self, name: str) -> torch.Tensor:
        """The weights dequantized to bf16 [H, out, in], in the reused buffer `name` (valid until
        the next call with that name)."""
        from gguf import GGML_QUANT_SIZES

        from hybrid_runtime.quant.bf16 import as_bf16, bf16_buffer, dequantize_bf16

        n_h, n_out, rb = self.raw.shape
        values, nbytes = GGML_QUANT_SIZES[self.ggml_type]
        cols = rb // nbytes * values
        bits = dequantize_bf16(self.ggml_type, self.raw.reshape(n_h * n_out, rb), bf16_buffer(name, n_h * n_out, cols))
        return as_bf16(bits).view(n_h, n_out, cols)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        T, H, _ = x.shape  # [T, H, in]
        if self.chunk_dtype(T) is not None:  # dequantized to a reused bf16 buffer, as KernelLinear
            return torch.einsum("thi,hoi->tho", x.to(torch.bfloat16), self.dense_weight("head"))
        if T >= self._min_tokens:
            return self.dense()(x)
        acts = self._k.quantize_acts(self.spec.act, np.ascontiguousarray(x.detach().numpy().reshape(T * H, -1)))
        pair_token = (np.arange(T)[None, :] * H + np.arange(H)[:, None]).reshape(-1)  # head-major pairs
        offsets = np.arange(0, H * T + 1, T, dtype=np.int64)
        out = np.empty((H * T, self.raw.shape[1]), np.float32)
        self._k.grouped_matmul(self.spec, self.raw, np.arange(H, dtype=np.int64), offsets, pair_token, acts, out)
        return torch.from_numpy(out.reshape(H, T, -1).transpose(1, 0, 2).copy())  # [T, H, out]


class RowEmbedding:
    """Embedding rows dequantized on lookup (the table stays quantized in the mapped file)."""

    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.ref.data[ids.numpy()]  # [T, row_bytes] (or [T, D] for float tables)
        return to_torch(get_format(self.ref.ggml_type).dequantize(rows))


class RoundedWeights(FloatWeights):
    """The default CPU path: quantized matrices through the CPU kernels (KernelLinear) where a
    kernel exists, else dequantized weights with activations rounded exactly as llama.cpp does."""

    def __init__(self, gf: GGUFModelFile, experts_factory: Callable[[int], ExpertsFn], kernels: bool = True,
                 bf16_prefill: bool = False, int8_prefill: bool = False):
        super().__init__(gf, experts_factory)
        self.kernels, self.bf16_prefill, self.int8_prefill = kernels, bf16_prefill or int8_prefill, int8_prefill

    def linear(self, name: str):
        from hybrid_runtime.quant.kernels import CPU_KERNELS

        ref = self.gf.tensor(name)
        if self.kernels and ref.ggml_type in CPU_KERNELS and ref.data.ndim == 2:
            return KernelLinear(ref.data, ref.ggml_type, self.bf16_prefill, self.int8_prefill, self.gf.panels.get(name))
        return RoundedLinear(self.matrix(name), ref.ggml_type)

    def head_linear(self, name: str):
        from hybrid_runtime.quant.kernels import CPU_KERNELS

        ref = self.gf.tensor(name)
        dense = lambda: RoundedHeadLinear(self.matrix(name), ref.ggml_type)  # noqa: E731
        if self.kernels and ref.ggml_type in CPU_KERNELS and ref.data.ndim == 3:
            return KernelHeadLinear(ref.data, ref.ggml_type, dense, self.bf16_prefill)
        return dense()

    def embedding(self, name: str) -> RowEmbedding:
        return RowEmbedding(self.gf.tensor(name))
