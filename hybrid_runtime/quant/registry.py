"""Quant formats keyed by GGML type: block geometry and a dequantizer (gguf-py, bit-exact with ggml).

CPU kernels for the routed experts register themselves per type in quant/kernels.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from hybrid_runtime.errors import UnsupportedModelError


@dataclass(frozen=True, slots=True)
class QuantFormat:
    ggml_type: Q
    block_size: int  # elements per block
    type_size: int  # bytes per block

    @property
    def name(self) -> str:
        return self.ggml_type.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    def row_bytes(self, n: int) -> int:
        return n // self.block_size * self.type_size

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Raw tensor data (as mapped from the file) -> float32 array of its element shape."""
        if self.ggml_type == Q.F32:
            return np.asarray(raw, dtype=np.float32)
        return np.asarray(gguf_quants.dequantize(raw, self.ggml_type), dtype=np.float32)


FORMATS: dict[Q, QuantFormat] = {
    t: QuantFormat(t, *GGML_QUANT_SIZES[t])
    for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
}


def get_format(ggml_type: Q) -> QuantFormat:
    try:
        return FORMATS[ggml_type]
    except KeyError:
        names = ", ".join(f.name for f in FORMATS.values())
        raise UnsupportedModelError(f"quant type {Q(ggml_type).name} is not supported yet (supported: {names})") from None
