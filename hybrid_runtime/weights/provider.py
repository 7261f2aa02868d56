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


class RoundedWeights(FloatWeights):
    """The default CPU path: dequantized weights, activations rounded exactly as llama.cpp does."""

    def linear(self, name: str) -> Linear:
        return RoundedLinear(self.matrix(name), self.gf.tensor(name).ggml_type)

    def head_linear(self, name: str) -> HeadLinear:
        return RoundedHeadLinear(self.matrix(name), self.gf.tensor(name).ggml_type)
