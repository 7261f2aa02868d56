"""Dequantize raw GGUF blocks with torch ops on any device (the GPU weights stay quantized).

Each format is a function from blocks (uint8 [B, block_bytes]) to float32 [B, block_size],
registered by GGML type. The arithmetic follows ggml (ggml-common.h) in the same float32
order as gguf-py's numpy reference, so results agree bit for bit on the CPU.
Block layouts (bytes; f16 = one IEEE half, little-endian):

    Q4_0  (18): d f16 | qs[16]              q = nibble - 8;  lo nibbles = elems 0..15, hi = 16..31
    Q4_1  (20): d f16 | m f16 | qs[16]      x = d*q + m
    Q5_0  (22): d f16 | qh[4] | qs[16]      q = (nibble | bit_i(qh) << 4) - 16
    Q5_1  (24): d f16 | m f16 | qh[4] | qs[16]
    Q8_0  (34): d f16 | qs[32] int8
    Q2_K  (84): scales[16] (lo 4: scale, hi 4: min) | qs[64] (2-bit) | d f16 | dmin f16
    Q3_K (110): hmask[32] | qs[64] (2-bit) | scales[12] (16 x 6-bit, signed - 32) | d f16
    Q4_K (144): d f16 | dmin f16 | scales[12] (8 x 6-bit scale, 8 x 6-bit min) | qs[128]
    Q5_K (176): d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
    Q6_K (210): ql[128] | qh[64] | scales[16] int8 | d f16        q = 6-bit - 32
"""

from __future__ import annotations

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from hybrid_runtime.errors import UnsupportedModelError

QK_K = 256
BlockFn = Callable[[torch.Tensor], torch.Tensor]
_DEQUANT: dict[Q, BlockFn] = {}


def _register(qtype: Q):
    def deco(fn: BlockFn) -> BlockFn:
        _DEQUANT[qtype] = fn
        return fn
    return deco


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[B, 2] uint8 -> [B, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, group: int) -> torch.Tensor:
    """[B, n] uint8 -> [B, n/group, 2, group]: per run of `group` bytes its low then high nibbles."""
    q = qs.reshape(qs.shape[0], -1, 1, group)
    return torch.cat([q & 0x0F, q >> 4], dim=2)


def _bits(b: torch.Tensor, n_shifts: int, width: int) -> torch.Tensor:
    """[B, n, m] uint8 -> [B, n, n_shifts, m]: fields of `width` bits, lowest first."""
    mask = (1 << width) - 1
    return torch.stack([(b >> (width * i)) & mask for i in range(n_shifts)], dim=2)


def _qh_bits32(qh: torch.Tensor) -> torch.Tensor:
    """[B, 4] uint8 (a little-endian uint32) -> [B, 32] uint8 bits, bit i of the word at i."""
    return _bits(qh.reshape(qh.shape[0], 4, 1), 8, 1).reshape(qh.shape[0], 32)


@_register(Q.Q4_0)
def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:], 16).reshape(blocks.shape[0], 32).to(torch.int8) - 8
    return d * q.float()


@_register(Q.Q4_1)
def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], 16).reshape(blocks.shape[0], 32).float()
    return d * q + m


def _q5(blocks: torch.Tensor, head: int) -> torch.Tensor:
    qh = _qh_bits32(blocks[:, head : head + 4])
    ql = _nibbles(blocks[:, head + 4 :], 16).reshape(blocks.shape[0], 32)
    return ql | (qh << 4)


@_register(Q.Q5_0)
def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    return d * (_q5(blocks, 2).to(torch.int8) - 16).float()


@_register(Q.Q5_1)
def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return d * _q5(blocks, 4).float() + m


@_register(Q.Q8_0)
def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


@_register(Q.Q2_K)
def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    B = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).float()).reshape(B, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(B, 16, 1)
    q = _bits(qs.reshape(B, 2, 32), 4, 2).reshape(B, 16, 16).float()  # [B, 16 sub-blocks, 16]
    return (dl * q - ml).reshape(B, QK_K)


def _q3_scales(sc: torch.Tensor) -> torch.Tensor:
    """12 bytes -> 16 signed 6-bit scales: low 4 bits from bytes 0..7, high 2 from bytes 8..11."""
    B = sc.shape[0]
    lo = torch.cat([sc[:, :8] & 0x0F, sc[:, :8] >> 4], dim=1)  # [B, 16]
    hi = _bits(sc[:, 8:12].reshape(B, 1, 4), 4, 2).reshape(B, 16)
    return ((lo | (hi << 4)).to(torch.int8) - 32).float()


@_register(Q.Q3_K)
def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    B = blocks.shape[0]
    hmask, qs, sc = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    dl = (d * _q3_scales(sc)).reshape(B, 16, 1)
    ql = _bits(qs.reshape(B, 2, 32), 4, 2).reshape(B, 16, 16)
    qh = _bits(hmask.reshape(B, 1, 32), 8, 1).reshape(B, 16, 16) ^ 1  # high bit clear: subtract 4
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(B, QK_K)


def _k_scale_min(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K 12 scale bytes -> 8 six-bit scales and 8 six-bit mins (uint8 [B, 8] each)."""
    d, m, md = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scale, mins


def _k_affine(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B = blocks.shape[0]
    d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    scale, mins = _k_scale_min(blocks[:, 4:16])
    return (d * scale.float()).reshape(B, 8, 1), (dmin * mins.float()).reshape(B, 8, 1)


@_register(Q.Q4_K)
def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    B = blocks.shape[0]
    d, dm = _k_affine(blocks)
    q = _nibbles(blocks[:, 16:], 32).reshape(B, 8, 32).float()
    return (d * q - dm).reshape(B, QK_K)


@_register(Q.Q5_K)
def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    B = blocks.shape[0]
    d, dm = _k_affine(blocks)
    qh = _bits(blocks[:, 16:48].reshape(B, 1, 32), 8, 1).reshape(B, 8, 32)
    ql = _nibbles(blocks[:, 48:], 32).reshape(B, 8, 32)
    return (d * (ql | (qh << 4)).float() - dm).reshape(B, QK_K)


@_register(Q.Q6_K)
def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    B = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(blocks[:, 208:210]) * scales).reshape(B, 16, 1)
    lo = _nibbles(ql, 64).reshape(B, 8, 32)  # per 64 bytes: 64 low nibbles then 64 high
    hi = _bits(qh.reshape(B, 2, 32), 4, 2).reshape(B, 8, 32)
    q = ((lo | (hi << 4)).to(torch.int8) - 32).float().reshape(B, 16, 16)
    return (d * q).reshape(B, QK_K)


_FLOAT_VIEW = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
SUPPORTED = tuple(_FLOAT_VIEW) + tuple(_DEQUANT)


def dequantize(raw: torch.Tensor, ggml_type: Q, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw tensor data on any device -> `dtype` tensor [..., n] on the same device.

    `raw` is uint8 [..., row_bytes] for block types (as GGUFModelFile maps them), or already
    of the element type for F32/F16 (uint8 bytes of a float type are viewed, not converted).
    """
    ggml_type = Q(ggml_type)
    if ggml_type in _FLOAT_VIEW:
        want = _FLOAT_VIEW[ggml_type]
        x = raw.contiguous().view(want) if raw.dtype == torch.uint8 else raw
        return x.to(dtype)
    fn = _DEQUANT.get(ggml_type)
    if fn is None:
        raise UnsupportedModelError(f"quant type {ggml_type.name} has no GPU dequantizer")
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    row_bytes = raw.shape[-1]
    if row_bytes % type_size:
        raise UnsupportedModelError(f"row of {row_bytes} bytes is not whole {ggml_type.name} blocks")
    out = fn(raw.reshape(-1, type_size))  # [B, block]
    return out.reshape(*raw.shape[:-1], row_bytes // type_size * block).to(dtype)
