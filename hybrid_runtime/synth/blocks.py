"""Random but valid GGML quant blocks (Q4_K, Q6_K, Q8_0), written without a float original.

Every bit pattern of the packed fields is a legal block, so random bytes are used for them;
only the fp16 super-block scales are set, chosen so the decoded weights have a given std.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

# Byte offsets of the fp16 scale fields inside one block.
#   Q4_K (144 B): d f16 | dmin f16 | scales[12] (8 x 6-bit scale, 8 x 6-bit min) | qs[128]
#   Q6_K (210 B): ql[128] | qh[64] | scales[16] int8 | d f16
#   Q8_0 ( 34 B): d f16 | qs[32] int8
_D_OFFSET = {Q.Q4_K: 0, Q.Q6_K: 208, Q.Q8_0: 0}
_DMIN_OFFSET = {Q.Q4_K: 2}
# Q4_K: w = d*sc*q - dmin*m with q in 0..15, so dmin = 7.5*d centres the weights near 0.
_DMIN_PER_D = 7.5
_CALIBRATION_BLOCKS = 4096


def block_bytes(qtype: Q) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][1]


def random_blocks(rng: np.random.Generator, qtype: Q, n_blocks: int, std: float) -> np.ndarray:
    """`n_blocks` random blocks of `qtype` (uint8 [n_blocks, block_bytes]) decoding to ~`std`."""
    return _raw_blocks(rng, qtype, n_blocks, std / _unit_std(qtype))


def random_tensor_chunks(rng: np.random.Generator, qtype: Q, shape: tuple[int, ...], std: float,
                         chunk_blocks: int = 1 << 16) -> Iterator[np.ndarray]:
    """The bytes of one random tensor of numpy `shape`, in chunks of at most `chunk_blocks`."""
    n_blocks = int(np.prod(shape)) // gguf.GGML_QUANT_SIZES[qtype][0]
    for start in range(0, n_blocks, chunk_blocks):
        yield random_blocks(rng, qtype, min(chunk_blocks, n_blocks - start), std)


def _raw_blocks(rng: np.random.Generator, qtype: Q, n_blocks: int, d: float) -> np.ndarray:
    size = block_bytes(qtype)
    raw = np.frombuffer(rng.bytes(n_blocks * size), dtype=np.uint8).reshape(n_blocks, size).copy()
    _set_f16(raw, _D_OFFSET[qtype], d)
    if qtype in _DMIN_OFFSET:
        _set_f16(raw, _DMIN_OFFSET[qtype], d * _DMIN_PER_D)
    return raw


def _set_f16(raw: np.ndarray, offset: int, value: float) -> None:
    raw[:, offset:offset + 2] = np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)


@functools.cache
def _unit_std(qtype: Q) -> float:
    """Std of the decoded weights of random blocks whose scale d is 1 (measured once)."""
    raw = _raw_blocks(np.random.default_rng(0), qtype, _CALIBRATION_BLOCKS, 1.0)
    return float(gguf.quants.dequantize(raw, qtype).std())
