"""Register-tiled integer GEMM for many tokens against K-quant weights (AVX-512 VNNI): the
repackers and the drivers of the panel kernels (quant/panels.py, where the layouts are described).

Two ways in:
- `matmul` on raw GGUF blocks: every 16 rows repacked into a per-thread work panel, which then
  serves every token of the call (prefill of a matrix whose panels are not stored);
- `StoredPanels`: a matrix (or a stack of experts) repacked once at load into compact panels that
  replace its raw blocks in memory (`build_stored`), read by `matmul_stored` here and by the
  compiled CPU step's jobs (cpu/rows.py) for any number of tokens, decode included.

Numba's on-disk cache keys a compiled function on its own source file only; numba_cache.py keys
the cache directory on this file too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from hybrid_runtime.quant.numba_cache import use_versioned_cache_dir

use_versioned_cache_dir()

from hybrid_runtime.cpu.layers import silu_mul  # noqa: E402
from hybrid_runtime.cpu.rows import q8k_block, quantize_q8_0_row  # noqa: E402
from hybrid_runtime.quant.panels import (P_Q4_K, P_Q6_K, P_Q8_0, Q_BYTES, REC16, REC4P, REC_P4, REC_P6,  # noqa: E402
                                         REC_P8, REC_Q80, ROWS, _store_vec, stored_through,
                                         work_through)
from hybrid_runtime.quant.vnni import F16, F32, I8, I32, _q4k_scale_bytes, _byte_ptr, _load, _vec  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Repacking, all in vector code: per row and block of 256 the values as vectors of 16 words (four
# of unpacked bytes in natural order; for Q4_K two of its packed qs words), then per vector a
# 16 x 16 transpose of 32-bit words across the panel's 16 rows (row r at byte wo + r * rstride of
# w); the scales likewise, one transpose per block
# ---------------------------------------------------------------------------------------------

def _transpose16(builder, vs):
    """16 vectors <16 x i32> (row r, word j) -> 16 vectors (word j, row r): four rounds of
    swapping the off-diagonal s x s blocks (s = 8, 4, 2, 1), 16 two-input shuffles a round."""
    vs = list(vs)
    for s in (8, 4, 2, 1):
        lo_mask = [l if not (l & s) else 16 + l - s for l in range(16)]
        hi_mask = [l + s if not (l & s) else 16 + l for l in range(16)]
        for i in range(16):
            if i & s:
                continue
            a, b = vs[i], vs[i + s]
            vs[i] = builder.shuffle_vector(a, b, ir.Constant(_vec(I32, 16), lo_mask))
            vs[i + s] = builder.shuffle_vector(a, b, ir.Constant(_vec(I32, 16), hi_mask))
    return vs


def _and_splat(builder, v, k):
    return builder.and_(v, ir.Constant(v.type, [k] * v.type.count))


def _lshr_splat(builder, v, k):
    return builder.lshr(v, ir.Constant(v.type, [k] * v.type.count))


def _q6k_values(builder, pw):  # 210-byte block -> 4 x <16 x i32>
    out = []
    for n in range(2):
        ql = _load(builder, pw, _vec(I8, 64), 64 * n)
        qh32 = _load(builder, pw, _vec(I8, 32), 128 + 32 * n)
        qh = builder.shuffle_vector(qh32, _lshr_splat(builder, qh32, 2), ir.Constant(_vec(I32, 64), list(range(64))))
        lo = builder.or_(_and_splat(builder, ql, 0x0F), builder.shl(_and_splat(builder, qh, 3), ir.Constant(_vec(I8, 64), [4] * 64)))
        hi = builder.or_(_lshr_splat(builder, ql, 4), _and_splat(builder, qh, 0x30))
        out += [builder.bitcast(lo, _vec(I32, 16)), builder.bitcast(hi, _vec(I32, 16))]
    return out


def _q80_values(builder, pw):  # 8 Q8_0 blocks (272 bytes) -> 4 x <16 x i32> of weights + 128
    out = []
    for v in range(4):
        lo = _load(builder, pw, _vec(I8, 32), 68 * v + 2)
        hi = _load(builder, pw, _vec(I8, 32), 68 * v + 36)
        q = builder.shuffle_vector(lo, hi, ir.Constant(_vec(I32, 64), list(range(64))))
        q = builder.xor(q, ir.Constant(_vec(I8, 64), [-128] * 64))
        out.append(builder.bitcast(q, _vec(I32, 16)))
    return out


def _halves(builder, ptrs, byte_off):
    """The fp16 at byte_off of each of the 16 row pointers, as <16 x float>."""
    v = ir.Constant(_vec(ir.IntType(16), 16), None)
    for r, p in enumerate(ptrs):
        v = builder.insert_element(v, _load(builder, p, ir.IntType(16), byte_off), ir.Constant(I32, r))
    return builder.fpext(builder.bitcast(v, _vec(F16, 16)), _vec(F32, 16))


def _q4k_scales(builder, ptrs, pb, q_bytes=Q_BYTES):
    rows = [builder.zext(_q4k_scale_bytes(builder, p), _vec(I32, 16)) for p in ptrs]  # sc 0-7, mins 8-15
    cols = _transpose16(builder, rows)
    o_m = q_bytes + 64 * 8
    for j in range(8):
        _store_vec(builder, pb, q_bytes + 64 * j, cols[j])
        mn = cols[8 + j]
        _store_vec(builder, pb, o_m + 64 * j, builder.or_(mn, builder.shl(mn, ir.Constant(_vec(I32, 16), [16] * 16))))
    _store_vec(builder, pb, o_m + 512, _halves(builder, ptrs, 0))
    _store_vec(builder, pb, o_m + 576, builder.fneg(_halves(builder, ptrs, 2)))


def _q6k_scales(builder, ptrs, pb):
    rows = [builder.sext(_load(builder, p, _vec(I8, 16), 192), _vec(I32, 16)) for p in ptrs]
    cols = _transpose16(builder, rows)
    o_m = Q_BYTES + 64 * 16
    low16 = ir.Constant(_vec(I32, 16), [0xFFFF] * 16)
    for h in range(16):
        _store_vec(builder, pb, Q_BYTES + 64 * h, cols[h])
    for p in range(8):
        pair = builder.or_(builder.and_(cols[2 * p], low16), builder.shl(cols[2 * p + 1], ir.Constant(_vec(I32, 16), [16] * 16)))
        _store_vec(builder, pb, o_m + 64 * p, pair)
    d = _halves(builder, ptrs, 208)
    _store_vec(builder, pb, o_m + 512, d)
    _store_vec(builder, pb, o_m + 576, builder.fmul(d, ir.Constant(_vec(F32, 16), [-32.0] * 16)))


def _q80_scales(builder, ptrs, pb):
    for k in range(8):
        _store_vec(builder, pb, Q_BYTES + 64 * k, _halves(builder, ptrs, 34 * k))


def _q4k_packed_values(builder, pw):  # 144-byte block -> 2 x <16 x i32>: the raw qs words
    return [_load(builder, pw, _vec(I32, 16), 16 + 64 * j) for j in range(2)]


def _repack_codegen(values_fn, scales_fn, w_bytes, rec):
    def codegen(context, builder, signature, args):
        aw, awo, ars, anb, ap = args
        sw, _, _, _, sp = signature.args
        with cgutils.for_range(builder, anb) as loop:
            b = loop.index
            pb = _byte_ptr(context, builder, sp, ap, builder.mul(b, ir.Constant(b.type, rec)))
            ptrs = []
            for r in range(ROWS):
                off = builder.add(awo, builder.add(builder.mul(ars, ir.Constant(ars.type, r)),
                                                   builder.mul(b, ir.Constant(b.type, w_bytes))))
                ptrs.append(_byte_ptr(context, builder, sw, aw, off))
            rows = [values_fn(builder, p) for p in ptrs]
            for v in range(len(rows[0])):
                for gi, vec in enumerate(_transpose16(builder, [rows[r][v] for r in range(ROWS)])):
                    _store_vec(builder, pb, 64 * (16 * v + gi), vec)
            scales_fn(builder, ptrs, pb)
        return context.get_dummy_value()

    return codegen


@intrinsic
def repack_q4k_packed(typingctx, w, wo, rstride, nb, p):
    """A packed Q4_K panel (the nibbles as they are, transposed across the 16 rows)."""
    scales = lambda builder, ptrs, pb: _q4k_scales(builder, ptrs, pb, Q_BYTES // 2)  # noqa: E731
    return types.void(w, wo, rstride, nb, p), _repack_codegen(_q4k_packed_values, scales, 144, REC4P)


@intrinsic
def repack_q6k(typingctx, w, wo, rstride, nb, p):
    """A Q6_K panel."""
    return types.void(w, wo, rstride, nb, p), _repack_codegen(_q6k_values, _q6k_scales, 210, REC16)


@intrinsic
def repack_q80(typingctx, w, wo, rstride, nb, p):
    """A Q8_0 panel (nb records of 8 blocks)."""
    return types.void(w, wo, rstride, nb, p), _repack_codegen(_q80_values, _q80_scales, 272, REC_Q80)


# ---------------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------------

# the types with a repacker -> format code: Q4_K keeps its nibbles packed in the panel (half the
# transposes of unpacked bytes; unpacked per tile, two ops per two groups): 64 tokens 248 -> 324,
# 16 tokens 154 -> 261 GMAC/s on 2 threads, bit for bit the same results (integer sums)
GEMM_KINDS = {"Q4_K": 3, "Q6_K": 1, "Q8_0": 2}
ACTS = {1: "Q8_K", 2: "Q8_0", 3: "Q8_K"}  # the activation quantization each format reads


@numba.njit(cache=True, nogil=True, inline="always")
def _repack(fmt, w, wo, rstride, nb, pu):
    if fmt == 3:
        repack_q4k_packed(w, wo, rstride, nb, pu)
    elif fmt == 1:
        repack_q6k(w, wo, rstride, nb, pu)
    else:
        repack_q80(w, wo, rstride, nb, pu)


@numba.njit(cache=True, nogil=True, inline="always")
def panel_rows(fmt, w, wo, rstride, pan, nb, x, s, d, tok, P, Y, ycol, pu):
    """Rows 16 pan .. 16 pan + 15 of the matrix for all P tokens: one repack, then the tiles."""
    _repack(fmt, w, wo + 16 * pan * rstride, rstride, nb, pu)
    work_through(fmt, pu, nb, x, s, d, tok, 0, P, Y, ycol + 16 * pan, pu)


def scratch_panels(n_threads: int, max_nb: int) -> np.ndarray:
    """One panel buffer per thread (uint32 words, 64-byte aligned): a work panel of up to max_nb
    records, or the P_Q6_K expansion of a stored panel (panels.stored_through)."""
    words = REC16 * max_nb // 4
    buf = np.empty(n_threads * words + 16, np.uint32)
    off = (-buf.ctypes.data % 64) // 4
    return buf[off: off + n_threads * words].reshape(n_threads, words)


@numba.njit(cache=True, nogil=True, parallel=True)
def gemm_tokens(fmt, w, wo, rstride, M, nb, x, s, d, tok, Y, ycol, panels):
    """Y[i, ycol + r] = W[r] . act[tok[i]] for all rows r < M (M % 16 == 0) and i < len(tok):
    W's row r at byte wo + r * rstride of w (nb records of 256 values), act the quantized rows
    (x values in natural order, s sums, d scales: as ACTS[fmt] says)."""
    n_pan = M // ROWS
    nth = min(panels.shape[0], n_pan)
    P = tok.shape[0]
    for th in prange(nth):
        pu = panels[th]
        for pan in range(th * n_pan // nth, (th + 1) * n_pan // nth):
            panel_rows(fmt, w, wo, rstride, pan, nb, x, s, d, tok, P, Y, ycol, pu)


_PANELS: dict[tuple[int, int], np.ndarray] = {}


def panels_for(nb: int) -> np.ndarray:
    """The per-thread panel buffers for rows of up to nb blocks (kept for the next call)."""
    n_threads = numba.get_num_threads()
    key = (n_threads, max(nb, 8))
    if key not in _PANELS:
        _PANELS.clear()
        _PANELS[key] = scratch_panels(*key)
    return _PANELS[key]


def acts_of(qtype) -> str:
    """The activation quantization the panel GEMM of this type reads: "Q8_K" or "Q8_0"."""
    return ACTS[GEMM_KINDS[qtype.name]]


def supports(qtype, rows: int, cols: int) -> bool:
    """Whether matrices of this type and shape have the panel GEMM (and this CPU runs it)."""
    from hybrid_runtime.quant.cpu_features import has_avx512_vnni

    return getattr(qtype, "name", str(qtype)) in GEMM_KINDS and rows % ROWS == 0 and cols % 256 == 0 \
        and has_avx512_vnni()


@numba.njit(cache=True, nogil=True, inline="always")
def _q8k_row(x, qs, d, bs, t):
    """Row t of x into Q8_K, bit for bit as q8k.quantize_q8_k (ggml's quantize_row_q8_K)."""
    for b in range(x.shape[1] // 256):
        d[t, b] = q8k_block(x[t, 256 * b: 256 * b + 256], qs[t, 256 * b: 256 * b + 256], bs[t, 16 * b: 16 * b + 16])


@numba.njit(cache=True, nogil=True, parallel=True)
def _q8k_rows_par(x, qs, d, bs):
    for t in prange(x.shape[0]):
        _q8k_row(x, qs, d, bs, t)


@numba.njit(cache=True, nogil=True, parallel=True)
def _q80_rows_par(x, qs, d, sums):
    for t in prange(x.shape[0]):
        quantize_q8_0_row(x[t], x.shape[1], qs, d, sums, t)


@numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _silu_mul_q8k_par(gu, f, h, qs, d, bs):
    """h[t] = silu(gu[t, :f]) * gu[t, f:] (the compiled step's vectorized silu), then h[t] into Q8_K."""
    for t in prange(gu.shape[0]):
        silu_mul(gu[t: t + 1], 1, f, h[t: t + 1])
        _q8k_row(h, qs, d, bs, t)


def _q8k_buffers(n: int, k: int):
    return np.empty((n, k), np.int8), np.empty((n, k // 256), np.float32), np.empty((n, k // 16), np.int16)


def quantize_acts(qtype, x: np.ndarray):
    """x float32 [T, K] -> the activation rows the format of qtype reads: (values, sums, scales),
    bit for bit as quant/q8k.py, the rows in parallel."""
    x = np.ascontiguousarray(x, np.float32)
    n, k = x.shape
    if acts_of(qtype) == "Q8_0":
        qs, d, sums = np.empty((n, k), np.int8), np.empty((n, k // 32), np.float32), np.empty((n, k // 32), np.int16)
        _q80_rows_par(x, qs, d, sums)
        return qs, sums, d
    qs, d, bs = _q8k_buffers(n, k)
    _q8k_rows_par(x, qs, d, bs)
    return qs, bs, d


class SiluActs:
    """silu(gu[:, :f]) * gu[:, f:] quantized to Q8_K (the down projection's activations), into
    buffers kept for up to `rows` rows (one expert group after the other)."""

    def __init__(self, rows: int, f: int):
        self.f, self.h = f, np.empty((rows, f), np.float32)
        self.qs, self.d, self.bs = _q8k_buffers(rows, f)

    def __call__(self, gu: np.ndarray):
        n = gu.shape[0]
        qs, d, bs = self.qs[:n], self.d[:n], self.bs[:n]
        _silu_mul_q8k_par(gu, self.f, self.h[:n], qs, d, bs)
        return qs, bs, d


def matmul(qtype, w: np.ndarray, wo: int, rstride: int, rows: int, cols: int, acts, tok: np.ndarray,
           out: np.ndarray, col: int = 0) -> np.ndarray:
    """out[i, col: col + rows] = W . act[tok[i]] for the matrix W (rows x cols, row r at byte
    wo + r * rstride of the flat uint8 w) and activations acts = quantize_acts(qtype, x)."""
    x, s, d = acts
    gemm_tokens(GEMM_KINDS[qtype.name], w, wo, rstride, rows, cols // 256, x, s, d,
                np.ascontiguousarray(tok, np.int64), out, col, panels_for(cols // 256))
    return out



# ---------------------------------------------------------------------------------------------
# Stored panels: built once at load, read in place of the raw blocks
# ---------------------------------------------------------------------------------------------

# type -> (stored format, the work format it is compacted from, raw bytes per 256 values, record bytes)
STORED = {"Q4_K": (P_Q4_K, 3, 144, REC_P4), "Q6_K": (P_Q6_K, 1, 210, REC_P6), "Q8_0": (P_Q8_0, 2, 272, REC_P8)}


@numba.njit(cache=True, nogil=True)
def _compact(fmt, t, w, wo, rstride, nb, out):
    """nb work-panel records t -> nb stored records out (the halves read from the raw rows of w
    at byte wo, row stride rstride): the same integers and floats, narrower (panels.py)."""
    for b in range(nb):
        if fmt == P_Q4_K:
            t0, o0 = b * REC4P, b * REC_P4
            out[o0: o0 + 2048] = t[t0: t0 + 2048]
            for j in range(8):
                for r in range(16):
                    out[o0 + 2048 + 16 * j + r] = t[t0 + 2048 + 64 * j + 4 * r]  # the i32 scale's low byte
                    out[o0 + 2176 + 16 * j + r] = t[t0 + 2560 + 64 * j + 4 * r]  # the min's
            for r in range(16):
                src = wo + r * rstride + b * 144
                out[o0 + 2304 + 2 * r] = w[src]
                out[o0 + 2304 + 2 * r + 1] = w[src + 1]
                out[o0 + 2336 + 2 * r] = w[src + 2]
                out[o0 + 2336 + 2 * r + 1] = w[src + 3] ^ 0x80  # C = -dmin: the sign bit flipped
        elif fmt == P_Q6_K:
            t0, o0 = b * REC16, b * REC_P6
            for s in range(16):
                g, o = t0 + 256 * s, o0 + 192 * s  # work groups 4s .. 4s + 3, 64 bytes each
                for k in range(64):
                    g0, g1, g2, g3 = t[g + k], t[g + 64 + k], t[g + 128 + k], t[g + 192 + k]
                    out[o + k] = (g0 & 15) | ((g1 & 15) << 4)
                    out[o + 64 + k] = (g2 & 15) | ((g3 & 15) << 4)
                    out[o + 128 + k] = (g0 >> 4) | ((g1 >> 4) << 2) | ((g2 >> 4) << 4) | ((g3 >> 4) << 6)
                for r in range(16):
                    out[o0 + 3072 + 16 * s + r] = t[t0 + 4096 + 64 * s + 4 * r]
            for r in range(16):
                src = wo + r * rstride + b * 210 + 208
                out[o0 + 3328 + 2 * r] = w[src]
                out[o0 + 3328 + 2 * r + 1] = w[src + 1]
        else:
            t0, o0 = b * REC_Q80, b * REC_P8
            out[o0: o0 + 4096] = t[t0: t0 + 4096]
            for k in range(8):
                for r in range(16):
                    src = wo + r * rstride + b * 272 + 34 * k
                    out[o0 + 4096 + 32 * k + 2 * r] = w[src]
                    out[o0 + 4096 + 32 * k + 2 * r + 1] = w[src + 1]


@numba.njit(cache=True, nogil=True, parallel=True)
def _build(fmt, src_fmt, w, estride, rstride, n_items, n_pan, nb, rec, tmp, out):
    """Every panel (expert e, rows 16 pan ..) of the raw matrices in w into out, in that order."""
    nth = tmp.shape[0]
    for th in prange(nth):
        t = tmp[th]
        for i in range(th * n_items // nth, (th + 1) * n_items // nth):
            e, pan = i // n_pan, i % n_pan
            wo = e * estride + pan * 16 * rstride
            _repack(src_fmt, w, wo, rstride, nb, t)
            _compact(fmt, t, w, wo, rstride, nb, out[i * nb * rec: (i + 1) * nb * rec])


@dataclass(frozen=True, slots=True)
class StoredPanels:
    """A matrix [rows, cols] or a stack of n_expert of them as stored panels: panel q of expert e
    at byte e * estride + q * pstride of data, its nb records one after the other."""
    data: np.ndarray
    qtype: object
    fmt: int
    n_expert: int
    rows: int
    cols: int

    @property
    def nb(self) -> int:
        return self.cols // 256

    @property
    def pstride(self) -> int:
        return self.nb * STORED[self.qtype.name][3]

    @property
    def estride(self) -> int:
        return self.rows // ROWS * self.pstride

    @property
    def nbytes(self) -> int:
        return self.n_expert * self.estride


def stored_supported(qtype, shape) -> bool:
    """Whether raw blocks of this type and shape ([.., rows, row_bytes]) can be stored as panels."""
    name = getattr(qtype, "name", str(qtype))
    if name not in STORED or len(shape) not in (2, 3):
        return False
    rows, cols = shape[-2], shape[-1] // STORED[name][2] * 256
    return shape[-1] % STORED[name][2] == 0 and supports(qtype, rows, cols)


def stored_bytes(qtype, shape) -> int:
    """Bytes of the stored panels of raw blocks of this type and shape ([E,] rows, row_bytes)."""
    _, _, w_bytes, rec = STORED[qtype.name]
    E = shape[0] if len(shape) == 3 else 1
    return E * shape[-2] // ROWS * (shape[-1] // w_bytes) * rec


def build_stored(raw: np.ndarray, qtype, out: np.ndarray | None = None) -> StoredPanels:
    """Raw blocks uint8 [rows, row_bytes] or [E, rows, row_bytes] (stored_supported) -> their
    stored panels, written into out (uint8, at least the panels' bytes) or a new array."""
    fmt, src_fmt, w_bytes, rec = STORED[qtype.name]
    raw = np.ascontiguousarray(raw)
    E = raw.shape[0] if raw.ndim == 3 else 1
    rows, rb = raw.shape[-2], raw.shape[-1]
    nb = rb // w_bytes
    n_bytes = stored_bytes(qtype, raw.shape)
    out = np.empty(n_bytes, np.uint8) if out is None else out[:n_bytes]
    n_threads = numba.get_num_threads()
    tmp = np.empty((n_threads, REC16 * nb), np.uint8)
    _build(fmt, src_fmt, raw.reshape(-1), rows * rb, rb, E * (rows // ROWS), rows // ROWS, nb, rec, tmp, out)
    return StoredPanels(out, qtype, fmt, E, rows, nb * 256)


@numba.njit(cache=True, nogil=True, parallel=True)
def _stored_tokens(fmt, pan, base, pstride, n_pan, nb, x, s, d, tok, Y, ycol, wp):
    nth = min(wp.shape[0], n_pan)
    P = tok.shape[0]
    for th in prange(nth):
        for q in range(th * n_pan // nth, (th + 1) * n_pan // nth):
            stored_through(fmt, pan[base + q * pstride:], nb, x, s, d, tok, 0, P, Y, ycol + ROWS * q, wp[th])


def matmul_stored(sp: StoredPanels, e: int, acts, tok: np.ndarray, out: np.ndarray, col: int = 0) -> np.ndarray:
    """out[i, col: col + rows] = W_e . act[tok[i]] for expert e (0 for a plain matrix) of the
    stored panels sp, acts = quantize_acts(sp.qtype, x)."""
    x, s, d = acts
    _stored_tokens(sp.fmt, sp.data, e * sp.estride, sp.pstride, sp.rows // ROWS, sp.nb, x, s, d,
                   np.ascontiguousarray(tok, np.int64), out, col, panels_for(sp.nb))
    return out
