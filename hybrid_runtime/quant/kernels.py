"""CPU GEMV / small-GEMM kernels on raw GGUF quant blocks (Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, Q8_0).

y[T, rows] = W[rows, cols] . x[T, cols] with W the raw block bytes of a GGUF tensor (a zero-copy
uint8 view [rows, row_bytes] of the mmapped file, or [E, rows, row_bytes] for experts) and x
quantized to Q8_K (Q8_0 for Q8_0 weights), as llama.cpp does. Two implementations share one
driver shape: AVX-512 VNNI row intrinsics (`vnni.py`) where the CPU has them, else portable
integer loops (below). No repacking: the kernels read the mmapped bytes as they are (a repack
would double the RAM of a 500 GB model and the VNNI kernels do not need one).

Work split: the (matrix, group, row) items of a call are cut into CHUNKS_PER_THREAD contiguous
ranges per thread, handed out dynamically, so each thread streams contiguous stretches of weight
bytes; the tokens of a group reuse each weight row from L1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numba.np.ufunc.parallel  # noqa: F401  (numba.np.ufunc.parallel._set_parallel_chunksize)
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from numba import prange, types
from numba.extending import overload

from hybrid_runtime.quant.numba_cache import use_versioned_cache_dir

use_versioned_cache_dir()  # before any cached function below (and q8k's) is decorated

from hybrid_runtime.quant import vnni  # noqa: E402
from hybrid_runtime.quant.cpu_features import has_avx512_vnni  # noqa: E402
from hybrid_runtime.quant.floatbits import bf16_bits  # noqa: E402
from hybrid_runtime.quant.q8k import quantize_q8_0, quantize_q8_k  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Portable block dot products: (w, wo, x, xo, bs, bo, dx) -> float32, see vnni.py for the
# argument convention and the block layouts.
# ---------------------------------------------------------------------------------------------

# 2**(e - 25) for fp16 exponent e (e = 0 is subnormal: use 2**-24 with no implicit bit)
_POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], np.float32)


@numba.njit(cache=True, inline="always")
def f16(w, o):
    """Decode the little-endian fp16 at byte o of w (infinities and NaNs are not expected)."""
    h = np.int32(w[o]) | (np.int32(w[o + 1]) << 8)
    e = (h >> 10) & 31
    m = (h & 1023) | (1024 if e else 0)
    v = np.float32(m) * _POW2[e]
    return -v if h & 0x8000 else v


@numba.njit(cache=True, inline="always")
def scale_min_k4(w, o, j):  # 6-bit (scale, min) of sub-block j from the 12 bytes at w[o:]
    if j < 4:
        return np.int32(w[o + j] & 63), np.int32(w[o + j + 4] & 63)
    sc = (w[o + j + 4] & 15) | ((w[o + j - 4] >> 6) << 4)
    mn = (w[o + j + 4] >> 4) | ((w[o + j] >> 6) << 4)
    return np.int32(sc), np.int32(mn)


@numba.njit(cache=True, nogil=True)
def q4k_block_dot(w, wo, x, xo, bs, bo, dx):
    isum = 0
    imin = 0
    for c in range(4):  # 32 qs bytes -> sub-blocks 2c (low nibbles), 2c + 1 (high nibbles)
        s_lo = 0
        s_hi = 0
        for l in range(32):
            q = np.int32(w[wo + 16 + 32 * c + l])
            s_lo += (q & 15) * np.int32(x[xo + 64 * c + l])
            s_hi += (q >> 4) * np.int32(x[xo + 64 * c + 32 + l])
        sc1, m1 = scale_min_k4(w, wo + 4, 2 * c)
        sc2, m2 = scale_min_k4(w, wo + 4, 2 * c + 1)
        isum += sc1 * s_lo + sc2 * s_hi
        imin += m1 * (bs[bo + 4 * c] + bs[bo + 4 * c + 1]) + m2 * (bs[bo + 4 * c + 2] + bs[bo + 4 * c + 3])
    return dx * (f16(w, wo) * np.float32(isum) - f16(w, wo + 2) * np.float32(imin))


@numba.njit(cache=True, nogil=True)
def q5k_block_dot(w, wo, x, xo, bs, bo, dx):
    isum = 0
    imin = 0
    for c in range(4):  # qh bit 2c -> low nibble value, bit 2c + 1 -> high nibble value
        s_lo = 0
        s_hi = 0
        for l in range(32):
            q = np.int32(w[wo + 48 + 32 * c + l])
            h = np.int32(w[wo + 16 + l]) >> (2 * c)
            s_lo += ((q & 15) | ((h & 1) << 4)) * np.int32(x[xo + 64 * c + l])
            s_hi += ((q >> 4) | ((h & 2) << 3)) * np.int32(x[xo + 64 * c + 32 + l])
        sc1, m1 = scale_min_k4(w, wo + 4, 2 * c)
        sc2, m2 = scale_min_k4(w, wo + 4, 2 * c + 1)
        isum += sc1 * s_lo + sc2 * s_hi
        imin += m1 * (bs[bo + 4 * c] + bs[bo + 4 * c + 1]) + m2 * (bs[bo + 4 * c + 2] + bs[bo + 4 * c + 3])
    return dx * (f16(w, wo) * np.float32(isum) - f16(w, wo + 2) * np.float32(imin))


@numba.njit(cache=True, nogil=True)
def q6k_block_dot(w, wo, x, xo, bs, bo, dx):
    isum = 0
    for n in range(2):
        for k in range(4):  # quarter k of half n: values 128n + 32k + l
            lo_src = wo + 64 * n + 32 * (k & 1)
            shift_ql = 4 * (k >> 1)
            for g in range(2):
                s = 0
                for l in range(16 * g, 16 * g + 16):
                    ql = (np.int32(w[lo_src + l]) >> shift_ql) & 15
                    qh = (np.int32(w[wo + 128 + 32 * n + l]) >> (2 * k)) & 3
                    s += (ql | (qh << 4)) * np.int32(x[xo + 128 * n + 32 * k + l])
                sc = np.int32(np.int8(w[wo + 192 + 8 * n + 2 * k + g]))
                isum += sc * (s - 32 * np.int32(bs[bo + 8 * n + 2 * k + g]))
    return dx * f16(w, wo + 208) * np.float32(isum)


@numba.njit(cache=True, nogil=True)
def q2k_block_dot(w, wo, x, xo, bs, bo, dx):
    isum = 0
    imin = 0
    for g in range(16):  # 16-value group g = 8n + 2j + h: bytes 32n + 16h + l, shift 2j
        n, j, h = g >> 3, (g >> 1) & 3, g & 1
        s = 0
        for l in range(16):
            q = (np.int32(w[wo + 16 + 32 * n + 16 * h + l]) >> (2 * j)) & 3
            s += q * np.int32(x[xo + 16 * g + l])
        sc = np.int32(w[wo + g])
        isum += (sc & 15) * s
        imin += (sc >> 4) * np.int32(bs[bo + g])
    return dx * (f16(w, wo + 80) * np.float32(isum) - f16(w, wo + 82) * np.float32(imin))


@numba.njit(cache=True, inline="always")
def q3k_scale(w, o, g):  # 6-bit scale of group g from the 12 bytes at w[o:] (before the -32)
    low = (np.int32(w[o + (g & 7)]) >> (4 * (g >> 3))) & 15
    high = (np.int32(w[o + 8 + (g & 3)]) >> (2 * (g >> 2))) & 3
    return low | (high << 4)


@numba.njit(cache=True, nogil=True)
def q3k_block_dot(w, wo, x, xo, bs, bo, dx):
    isum = 0
    for g in range(16):  # group g = 8n + 2j + h: qs bytes 32n + 16h + l (shift 2j), hmask bit 4n + j
        n, j, h = g >> 3, (g >> 1) & 3, g & 1
        s = 0
        for l in range(16):
            q = (np.int32(w[wo + 32 + 32 * n + 16 * h + l]) >> (2 * j)) & 3
            hb = (np.int32(w[wo + 16 * h + l]) >> (4 * n + j)) & 1
            s += (q | (hb << 2)) * np.int32(x[xo + 16 * g + l])
        isum += (q3k_scale(w, wo + 96, g) - 32) * (s - 4 * np.int32(bs[bo + g]))
    return dx * f16(w, wo + 108) * np.float32(isum)


@numba.njit(cache=True, nogil=True)
def q80_block_dot(w, wo, x, xo, xd, xs, bo):
    s = 0
    for l in range(32):
        s += np.int32(np.int8(w[wo + 2 + l])) * np.int32(x[xo + l])
    return f16(w, wo) * xd[bo] * np.float32(s)


# ---------------------------------------------------------------------------------------------
# Row dot products and the grouped driver
# ---------------------------------------------------------------------------------------------

K_Q4_K, K_Q5_K, K_Q6_K, K_Q2_K, K_Q3_K, K_Q8_0 = range(6)
CHUNKS_PER_THREAD = 4


@numba.njit(cache=True, nogil=True)
def _row_dot_portable(kind, w, x, xd, xs):  # w [row_bytes] u8, x [cols] i8, xd/xs per act block
    acc = np.float32(0.0)
    if kind == K_Q8_0:
        for b in range(xd.shape[0]):
            acc += q80_block_dot(w, 34 * b, x, 32 * b, xd, xs, b)
        return acc
    for b in range(xd.shape[0]):
        if kind == K_Q4_K:
            acc += q4k_block_dot(w, 144 * b, x, 256 * b, xs, 16 * b, xd[b])
        elif kind == K_Q5_K:
            acc += q5k_block_dot(w, 176 * b, x, 256 * b, xs, 16 * b, xd[b])
        elif kind == K_Q6_K:
            acc += q6k_block_dot(w, 210 * b, x, 256 * b, xs, 16 * b, xd[b])
        elif kind == K_Q2_K:
            acc += q2k_block_dot(w, 84 * b, x, 256 * b, xs, 16 * b, xd[b])
        else:
            acc += q3k_block_dot(w, 110 * b, x, 256 * b, xs, 16 * b, xd[b])
    return acc


@numba.njit(cache=True, nogil=True, inline="always")
def q80_pairs_dot(w, wo, x, xo, s, so, d, do, n_pairs):
    """The first 2 * n_pairs Q8_0 blocks of a row: four at a time, then a last pair (VNNI)."""
    nq = n_pairs // 2
    v = vnni.q80_quad_row_dot(w, wo, x, xo, s, so, d, do, nq)
    if n_pairs % 2:
        v += vnni.q80_row_dot(w, wo + 136 * nq, x, xo + 128 * nq, s, so + 4 * nq, d, do + 4 * nq, 1)
    return v


@numba.njit(cache=True, nogil=True, inline="always")
def _row_dot_vnni(kind, w, wo, xq, xd, xs, t):  # w: whole weight array, wo: byte offset of the row
    nb = xd.shape[1]
    xo, so, do = t * xq.shape[1], t * xs.shape[1], t * nb
    if kind == K_Q4_K:
        return vnni.q4k_row_dot(w, wo, xq, xo, xs, so, xd, do, nb)
    if kind == K_Q6_K:
        return vnni.q6k_row_dot(w, wo, xq, xo, xs, so, xd, do, nb)
    if kind == K_Q5_K:
        return vnni.q5k_row_dot(w, wo, xq, xo, xs, so, xd, do, nb)
    if kind == K_Q2_K:
        return vnni.q2k_row_dot(w, wo, xq, xo, xs, so, xd, do, nb)
    if kind == K_Q3_K:
        return vnni.q3k_row_dot(w, wo, xq, xo, xs, so, xd, do, nb)
    return q80_pairs_dot(w, wo, xq, xo, xs, so, xd, do, nb // 2)  # an odd last block: see caller


@numba.njit(cache=True, nogil=True, parallel=True)
def _grouped_vnni(kind, w_a, w_b, n_mats, g_exp, g_off, p_tok, xq, xd, xs, y_a, y_b, n_chunks):
    # w_a, w_b [E, R, RB] u8 (last axis contiguous; w_b used when n_mats == 2, e.g. gate and up);
    # g_exp [G] expert of group g; g_off [G+1] its pairs; p_tok [P] activation row of pair p;
    # xq [Tx, C] i8; xd, xs [Tx, C/block]; y_a, y_b [P, R] f32. Work items: (matrix, group, row).
    n_rows = w_a.shape[1]
    per_mat = g_exp.shape[0] * n_rows
    total = n_mats * per_mat
    last = xd.shape[1] - 1
    odd = xd.shape[1] % 2 == 1
    n_groups = g_exp.shape[0]
    for c in prange(n_chunks):
        start, stop = total * c // n_chunks, total * (c + 1) // n_chunks
        # (matrix, group, row) of the chunk's first item, then stepped without divisions: short
        # rows (3 blocks) made two integer divisions per row a visible share of the time
        m = start // per_mat
        g = (start - m * per_mat) // n_rows
        r = start - m * per_mat - g * n_rows
        for _ in range(start, stop):
            w = w_a if m == 0 else w_b
            y = y_a if m == 0 else y_b
            wo = g_exp[g] * w.strides[0] + r * w.strides[1]
            for p in range(g_off[g], g_off[g + 1]):
                t = p_tok[p]
                v = _row_dot_vnni(kind, w, wo, xq, xd, xs, t)
                if kind == K_Q8_0 and odd:
                    v += q80_block_dot(w[g_exp[g], r], 34 * last, xq[t], 32 * last, xd[t], xs[t], last)
                y[p, r] = v
            r += 1
            if r == n_rows:
                r = 0
                g += 1
                if g == n_groups:
                    g = 0
                    m += 1


@numba.njit(cache=True, nogil=True, parallel=True)
def _grouped_portable(kind, w_a, w_b, n_mats, g_exp, g_off, p_tok, xq, xd, xs, y_a, y_b, n_chunks):
    n_rows = w_a.shape[1]
    per_mat = g_exp.shape[0] * n_rows
    total = n_mats * per_mat
    for c in prange(n_chunks):
        for item in range(total * c // n_chunks, total * (c + 1) // n_chunks):
            m = item // per_mat
            g = (item - m * per_mat) // n_rows
            r = item - m * per_mat - g * n_rows
            row = w_a[g_exp[g], r] if m == 0 else w_b[g_exp[g], r]
            y = y_a if m == 0 else y_b
            for p in range(g_off[g], g_off[g + 1]):
                t = p_tok[p]
                y[p, r] = _row_dot_portable(kind, row, xq[t], xd[t], xs[t])


# ---------------------------------------------------------------------------------------------
# Dequantization to float32 (the prefill path feeds these to torch.matmul)
# ---------------------------------------------------------------------------------------------

def put(out, i, v):
    """out[i] = v for a float32 out, v's bf16 bits for a uint16 out (chosen when Numba types the
    call, so each dequantizer below compiles once per output type with the store inlined)."""


@overload(put, inline="always")
def _put_impl(out, i, v):
    if out.dtype == types.uint16:
        def store_bf16(out, i, v):
            out[i] = bf16_bits(v)
        return store_bf16

    def store(out, i, v):
        out[i] = v
    return store


@numba.njit(cache=True, nogil=True, inline="always")
def _deq_q4k_block(w, wo, out, oo):
    d, dmin = f16(w, wo), f16(w, wo + 2)
    for c in range(4):
        sc1, m1 = scale_min_k4(w, wo + 4, 2 * c)
        sc2, m2 = scale_min_k4(w, wo + 4, 2 * c + 1)
        d1, mn1, d2, mn2 = d * np.float32(sc1), dmin * np.float32(m1), d * np.float32(sc2), dmin * np.float32(m2)
        for l in range(32):
            q = w[wo + 16 + 32 * c + l]
            put(out, oo + 64 * c + l, d1 * np.float32(q & 15) - mn1)
            put(out, oo + 64 * c + 32 + l, d2 * np.float32(q >> 4) - mn2)


@numba.njit(cache=True, nogil=True, inline="always")
def _deq_q5k_block(w, wo, out, oo):
    d, dmin = f16(w, wo), f16(w, wo + 2)
    for c in range(4):
        sc1, m1 = scale_min_k4(w, wo + 4, 2 * c)
        sc2, m2 = scale_min_k4(w, wo + 4, 2 * c + 1)
        d1, mn1, d2, mn2 = d * np.float32(sc1), dmin * np.float32(m1), d * np.float32(sc2), dmin * np.float32(m2)
        for l in range(32):
            q = np.int32(w[wo + 48 + 32 * c + l])
            h = np.int32(w[wo + 16 + l]) >> (2 * c)
            put(out, oo + 64 * c + l, d1 * np.float32((q & 15) | ((h & 1) << 4)) - mn1)
            put(out, oo + 64 * c + 32 + l, d2 * np.float32((q >> 4) | ((h & 2) << 3)) - mn2)


@numba.njit(cache=True, nogil=True, inline="always")
def _deq_q6k_block(w, wo, out, oo):
    # 210 bytes: ql[128] | qh[64] | scales int8[16] | d f16. Per half n of 128 values and l < 32:
    # value 128n + 32k + l = (4 low bits of ql, 2 bits of qh at 2k) - 32, scale 8n + 2k + l // 16
    d = f16(w, wo + 208)
    for n in range(2):
        for hh in range(2):
            s = wo + 192 + 8 * n + hh
            d0 = d * np.float32(np.int8(w[s]))
            d1 = d * np.float32(np.int8(w[s + 2]))
            d2 = d * np.float32(np.int8(w[s + 4]))
            d3 = d * np.float32(np.int8(w[s + 6]))
            o = oo + 128 * n + 16 * hh
            for i in range(16):
                l = 16 * hh + i
                ql0 = np.int32(w[wo + 64 * n + l])
                ql1 = np.int32(w[wo + 64 * n + 32 + l])
                qh = np.int32(w[wo + 128 + 32 * n + l])
                put(out, o + i, d0 * np.float32(((ql0 & 15) | ((qh & 3) << 4)) - 32))
                put(out, o + 32 + i, d1 * np.float32(((ql1 & 15) | (((qh >> 2) & 3) << 4)) - 32))
                put(out, o + 64 + i, d2 * np.float32(((ql0 >> 4) | (((qh >> 4) & 3) << 4)) - 32))
                put(out, o + 96 + i, d3 * np.float32(((ql1 >> 4) | (((qh >> 6) & 3) << 4)) - 32))


@numba.njit(cache=True, nogil=True, inline="always")
def _deq_q80_block(w, wo, out, oo):
    d = f16(w, wo)
    for l in range(32):
        put(out, oo + l, d * np.float32(np.int8(w[wo + 2 + l])))


@numba.njit(cache=True, nogil=True)
def _dequantize_row(kind, row, dst):  # one row of raw blocks -> dst float32 (or uint16 bf16 bits)
    if kind == K_Q8_0:
        for b in range(dst.shape[0] // 32):
            _deq_q80_block(row, 34 * b, dst, 32 * b)
    elif kind == K_Q4_K:
        for b in range(dst.shape[0] // 256):
            _deq_q4k_block(row, 144 * b, dst, 256 * b)
    elif kind == K_Q5_K:
        for b in range(dst.shape[0] // 256):
            _deq_q5k_block(row, 176 * b, dst, 256 * b)
    else:
        for b in range(dst.shape[0] // 256):
            _deq_q6k_block(row, 210 * b, dst, 256 * b)


@numba.njit(cache=True, nogil=True, parallel=True)
def dequantize_rows_into(kind, w, out):  # w [R, RB] u8 -> out [R, C] float32, or uint16 bf16 bits
    for r in prange(w.shape[0]):
        _dequantize_row(kind, w[r], out[r])


@numba.njit(cache=True, nogil=True)
def dequantize_rows_serial(kind, w, out):  # the same on the calling thread (a decode step's embedding)
    for r in range(w.shape[0]):
        _dequantize_row(kind, w[r], out[r])


SERIAL_DEQUANT = 1 << 14  # values below which no parallel region is worth its fork and join


_FAST_DEQUANT = {QT.Q4_K: K_Q4_K, QT.Q5_K: K_Q5_K, QT.Q6_K: K_Q6_K, QT.Q8_0: K_Q8_0}


def dequantize_rows(qtype: QT, w: np.ndarray) -> np.ndarray:
    """float32 [R, C] values of raw blocks w uint8 [R, row_bytes] (numba for Q4_K/Q5_K/Q6_K/Q8_0)."""
    if qtype not in _FAST_DEQUANT:
        from gguf.quants import dequantize

        return dequantize(np.ascontiguousarray(w), qtype).astype(np.float32, copy=False)
    values, nbytes = GGML_QUANT_SIZES[qtype]
    out = np.empty((w.shape[0], w.shape[1] // nbytes * values), np.float32)
    (dequantize_rows_serial if out.size < SERIAL_DEQUANT else dequantize_rows_into)(_FAST_DEQUANT[qtype], w, out)
    return out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class KernelSpec:
    qtype: QT
    kind: int            # dispatch code for the numba drivers
    act: str             # "q8_k" or "q8_0": how x is quantized for this weight type
    block_values: int    # weights per block
    block_bytes: int
    vnni: bool           # an AVX-512 VNNI version exists (else the portable loop runs)


@dataclass(slots=True)
class QuantActs:
    """Quantized activations: qs int8 [T, C], d f32 [T, C/block], sums int16 (bsums or block sums)."""
    kind: str
    qs: np.ndarray
    d: np.ndarray
    sums: np.ndarray
    qs_nib: np.ndarray | None = None  # qs in nibble order, made on first use by Q4_K/Q5_K

    def nibble_qs(self) -> np.ndarray:
        if self.qs_nib is None:
            self.qs_nib = nibble_order(self.qs)
        return self.qs_nib


def nibble_order(qs: np.ndarray) -> np.ndarray:
    """Reorder each 128 activations as [0:32, 64:96, 32:64, 96:128] (the Q4_K/Q5_K VNNI layout)."""
    n_tok, cols = qs.shape
    return np.ascontiguousarray(qs.reshape(n_tok, cols // 128, 4, 32)[:, :, [0, 2, 1, 3]]).reshape(n_tok, cols)


def _spec(qtype: QT, kind: int, act: str, vnni_ok: bool) -> KernelSpec:
    values, nbytes = GGML_QUANT_SIZES[qtype]
    return KernelSpec(qtype, kind, act, values, nbytes, vnni_ok)


CPU_KERNELS: dict[QT, KernelSpec] = {
    QT.Q4_K: _spec(QT.Q4_K, K_Q4_K, "q8_k", True),
    QT.Q5_K: _spec(QT.Q5_K, K_Q5_K, "q8_k", True),
    QT.Q6_K: _spec(QT.Q6_K, K_Q6_K, "q8_k", True),
    QT.Q2_K: _spec(QT.Q2_K, K_Q2_K, "q8_k", True),
    QT.Q3_K: _spec(QT.Q3_K, K_Q3_K, "q8_k", True),
    QT.Q8_0: _spec(QT.Q8_0, K_Q8_0, "q8_0", True),
}


def quantize_acts(act: str, x: np.ndarray) -> QuantActs:
    """Quantize float32 [T, C] activations the way the weight type's kernel expects."""
    qs, d, sums = quantize_q8_k(x) if act == "q8_k" else quantize_q8_0(x)
    return QuantActs(act, qs, d, sums)


def grouped_matmul(spec: KernelSpec, w: np.ndarray, group_expert: np.ndarray, group_offsets: np.ndarray,
                   pair_token: np.ndarray, acts: QuantActs, out: np.ndarray, *, portable: bool = False,
                   w2: np.ndarray | None = None, out2: np.ndarray | None = None) -> np.ndarray:
    """out[p, r] = W[group_expert[g], r] . x[pair_token[p]] for every pair p of every group g.

    w: uint8 [E, R, row_bytes] (the last axis contiguous); group_offsets [G+1] delimit the pairs of
    group g; out float32 [P, R]. With w2/out2 (same type and shape, e.g. gate and up) both
    products run in one parallel call. VNNI kernels run when the CPU has them unless `portable`.
    """
    if acts.kind != spec.act:
        raise ValueError(f"{spec.qtype.name} weights need {spec.act} activations, got {acts.kind}")
    if w.shape[2] * spec.block_values != acts.qs.shape[1] * spec.block_bytes:
        raise ValueError(f"row bytes {w.shape[2]} do not match {acts.qs.shape[1]} activation columns")
    if w2 is not None and (w2.shape != w.shape or w2.strides != w.strides):
        raise ValueError("w2 must have the shape and layout of w")
    fast = spec.vnni and not portable and has_avx512_vnni()
    if fast and w.strides[2] != 1:
        raise ValueError("the last axis of a weight view must be contiguous")
    n_mats = 1 if w2 is None else 2
    # a few contiguous chunks per thread, handed out dynamically: a thread slowed by a busy core
    # does not hold the whole call back
    work = n_mats * group_expert.shape[0] * w.shape[1]
    n_chunks = max(1, min(CHUNKS_PER_THREAD * numba.get_num_threads(), work))
    qs = acts.nibble_qs() if fast and spec.kind in (K_Q4_K, K_Q5_K) else acts.qs
    driver = _grouped_vnni if fast else _grouped_portable
    previous = _set_chunksize(1)  # chunks handed out one at a time (thread-local setting)
    try:
        driver(spec.kind, w, w if w2 is None else w2, n_mats, group_expert.astype(np.int64, copy=False),
               group_offsets.astype(np.int64, copy=False), pair_token.astype(np.int64, copy=False),
               qs, acts.d, acts.sums, out, out if out2 is None else out2, n_chunks)
    finally:
        _set_chunksize(previous)
    return out


# numba.set_parallel_chunksize without its per-call thread-launch check (a few µs on every one of
# ~130 kernel calls per decode step); the public call where the private one is absent. Callers
# have launched Numba's threads (numba.get_num_threads).
_set_chunksize = getattr(numba.np.ufunc.parallel, "_set_parallel_chunksize", None) or numba.set_parallel_chunksize


def matmul(qtype: QT, w: np.ndarray, x: np.ndarray, *, portable: bool = False) -> np.ndarray:
    """y[T, rows] = W . x[T, cols] for a raw GGUF weight w uint8 [rows, row_bytes] and float32 x."""
    spec = CPU_KERNELS[qtype]
    x = np.atleast_2d(np.asarray(x, np.float32))
    acts = quantize_acts(spec.act, x)
    n_tok = x.shape[0]
    out = np.empty((n_tok, w.shape[0]), np.float32)
    one = np.zeros(1, np.int64)
    return grouped_matmul(spec, w[None], one, np.array([0, n_tok]), np.arange(n_tok), acts, out, portable=portable)
