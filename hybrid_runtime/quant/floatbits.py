"""Float bit tricks as Numba intrinsics: bit casts, and rounding to fp16 / bf16 values."""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def bits_f32(typingctx, v):  # float32 -> its int32 bit pattern
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def f32_bits(typingctx, b):  # int32 bit pattern -> float32
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@numba.njit(cache=True, inline="always")
def f16_round(v):
    """The float32 nearest to v among fp16 values (round half to even), as F16C converts."""
    if abs(v) < np.float32(6.103515625e-05):  # subnormal fp16: multiples of 2**-24
        return np.float32(np.rint(v * np.float32(16777216.0)) * np.float32(5.9604644775390625e-08))
    b = np.int32(bits_f32(np.float32(v)))
    b = np.int32(b + np.int32(0xFFF) + ((b >> 13) & 1)) & np.int32(-8192)
    return f32_bits(b)


@numba.njit(cache=True, inline="always")
def bf16_bits(v):
    """The bf16 nearest to float32 v (round half to even) as its 16-bit pattern (no NaNs expected)."""
    b = bits_f32(np.float32(v))
    return np.uint16((b + np.int32(0x7FFF) + ((b >> 16) & 1)) >> 16)
