"""Register-tiled integer GEMM for many tokens against K-quant weights (AVX-512 VNNI).

The row kernels (vnni.py) give each output ROW its own accumulators, so every (row, token)
product ends in sub-block scaling and a horizontal sum. Here a vector lane is an output row:
16 rows of a matrix are repacked into a *panel* whose 64-byte groups hold 4 consecutive values
of each of the 16 rows, so one `vpdpbusd` against a token's 4 activation bytes (broadcast)
advances 16 rows at once, the sub-block scales are one `vpmulld` per 32 (or 16) values for all
16 rows, and nothing is summed horizontally. A panel is repacked once and serves every token of
the call (prefill: the tokens one expert got), N tokens at a time held in registers.

Panel layout, per block b of 256 values (one record of `record_bytes(NS)` bytes; Q4_K and Q8_0 below):
    q   u8    [64 groups][16 rows][4]   values 4g..4g+3 of each row, unsigned
    sc  i32   [NS][16 rows]             sub-block scales (NS = 8 sub-blocks of 32, or 16 of 16)
    m   i16x2 [8][16 rows]              per row the multipliers of the Q8_K bsums 2p, 2p+1
    D   f32   [16 rows], C f32 [16 rows]
and per (row, token), with the activations as Q8_K (int8 x, bsums per 16, scale dx per block):
    isum = sum_s sc[s] * (q . x over sub-block s)   (int32, exact)
    msum = sum_h m[h] * bsum[h]                       (int32, exact)
    acc  = fma(float(msum), C * dx, fma(float(isum), D * dx, acc))   block after block
Q6_K: q = 6-bit value (0..63), m = the 16 scales, D = d, C = -32 d (the -32 offset taken back
through the bsums). Q4_K keeps its nibbles packed: q is u8 [32 words][16 rows][4], word 8c + i of
a row being its qs bytes 32c + 4i .. 32c + 4i + 3 as stored (low nibbles: group 16c + i, high:
group 16c + 8 + i), unpacked in the kernel (and / shift per word and tile); m = the sub-block
min, D = d, C = -dmin. Q8_0 records hold q = weight + 128 and D per 32-block (8 of them), the +128
taken back with the Q8_0 activation sums. The float order is fixed per (row, token): a token's
result does not depend on the others in the call.

Numba's on-disk cache keys a compiled function on its own source file only; numba_cache.py keys
the cache directory on this file too.
"""

from __future__ import annotations

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
from hybrid_runtime.quant.vnni import F16, F32, I8, I32, _q4k_scale_bytes, _byte_ptr, _dpbusd, _dpwssd, _fma, _load, _pick, _vec  # noqa: E402

ROWS = 16  # rows per panel: one 512-bit vector of int32 / float32 lanes
PASS_BLOCKS = 2  # blocks of a panel that every token goes through before the next ones
Q_BYTES = 64 * 64  # q of one block record


def record_bytes(ns: int, q_bytes: int = Q_BYTES) -> int:
    """Bytes of a K-quant panel record: q, NS sub-block scales, the bsum multipliers, D and C."""
    return q_bytes + 64 * ns + 512 + 128


REC16 = record_bytes(16)


def _splat32(builder, v, ty):
    vec = builder.insert_element(ir.Constant(_vec(ty, 16), None), v, ir.Constant(I32, 0))
    return _pick(builder, vec, [0] * 16)


def _acc_init(context, builder, sy, ay, yos, first):
    """Per token a float accumulator <16 x float>: zero on a call's first block, else the partial
    sums the previous call stored at y (a row's blocks may come in several calls, in order)."""
    v16f = _vec(F32, 16)
    pys = [builder.bitcast(_byte_ptr(context, builder, sy, ay, yo, 4), v16f.as_pointer()) for yo in yos]
    init = [ir.Constant(v16f, [0.0] * 16) if first else builder.load(py, align=4) for py in pys]
    return pys, [cgutils.alloca_once_value(builder, v) for v in init]


def _token_ptrs(context, builder, ty, arr, offs, b, per_block, elem):
    """Per token a pointer to block b of its activation row: element offs[t] + b * per_block."""
    return [_byte_ptr(context, builder, ty, arr, builder.add(o, builder.mul(b, ir.Constant(b.type, per_block))), elem)
            for o in offs]


def _tile_args(context, builder, signature, args, n, first):
    """The arguments of a tile intrinsic: arrays and their types, the per-token element offsets
    (x, sums, scales), the output pointers and the accumulators."""
    ap, ab0, anb, ax, axo, as_, aso, axd, axdo, ay, ayo = args
    sp, _, _, sx, _, ss, _, sxd, _, sy, _ = signature.args
    xos, sos, dos, yos = ([builder.extract_value(tup, t) for t in range(n)] for tup in (axo, aso, axdo, ayo))
    pys, accs = _acc_init(context, builder, sy, ay, yos, first)
    return (ap, ab0, anb, ax, as_, axd), (sp, sx, ss, sxd), (xos, sos, dos), pys, accs


def _gemm_codegen(ns: int, n: int, first: bool, packed: bool = False):
    """packed (Q4_K only): the panel keeps the raw nibbles, word j of a row holding groups
    16c + i (low nibbles) and 16c + 8 + i (high), j = 8c + i; unpacked here, once per tile."""
    per_sub = 64 // ns  # groups of 4 values in one sub-block
    q_bytes = Q_BYTES // 2 if packed else Q_BYTES
    rec = record_bytes(ns, q_bytes)
    v16i, v16f = _vec(I32, 16), _vec(F32, 16)
    o_sc, o_m = q_bytes, q_bytes + 64 * ns
    o_d, o_c = o_m + 512, o_m + 576

    def codegen(context, builder, signature, args):
        (ap, ab0, anb, ax, abs_, axd), (sp, sx, sbs, sxd), (xos, bsos, xdos), pys, accs = \
            _tile_args(context, builder, signature, args, n, first)
        zero_i = ir.Constant(v16i, [0] * 16)
        with cgutils.for_range(builder, anb) as loop:
            b = builder.add(loop.index, ab0)
            pb = _byte_ptr(context, builder, sp, ap, builder.mul(b, ir.Constant(b.type, rec)))
            px = _token_ptrs(context, builder, sx, ax, xos, b, 256, 1)
            pbs = _token_ptrs(context, builder, sbs, abs_, bsos, b, 16, 2)
            isum = [zero_i] * n
            if packed:
                nib = ir.Constant(v16i, [0x0F0F0F0F] * 16)
                for c in range(4):  # sub-blocks 2c (low nibbles) and 2c + 1 (high)
                    a_lo, a_hi = [zero_i] * n, [zero_i] * n
                    for i in range(8):
                        pv = _load(builder, pb, v16i, 64 * (8 * c + i))
                        lo = builder.and_(pv, nib)
                        hi = builder.and_(builder.lshr(pv, ir.Constant(v16i, [4] * 16)), nib)
                        g_lo, g_hi = 16 * c + i, 16 * c + 8 + i
                        for t in range(n):
                            a_lo[t] = _dpbusd(builder, a_lo[t], lo, _splat32(builder, _load(builder, px[t], I32, 4 * g_lo), I32))
                            a_hi[t] = _dpbusd(builder, a_hi[t], hi, _splat32(builder, _load(builder, px[t], I32, 4 * g_hi), I32))
                    sc_lo, sc_hi = _load(builder, pb, v16i, o_sc + 128 * c), _load(builder, pb, v16i, o_sc + 128 * c + 64)
                    isum = [builder.add(builder.add(isum[t], builder.mul(a_lo[t], sc_lo)), builder.mul(a_hi[t], sc_hi))
                            for t in range(n)]
            for s in range(0 if packed else ns):
                a = [zero_i] * n
                for gi in range(per_sub):
                    g = s * per_sub + gi
                    wv = _load(builder, pb, v16i, 64 * g)
                    for t in range(n):
                        a[t] = _dpbusd(builder, a[t], wv, _splat32(builder, _load(builder, px[t], I32, 4 * g), I32))
                scv = _load(builder, pb, v16i, o_sc + 64 * s)
                isum = [builder.add(isum[t], builder.mul(a[t], scv)) for t in range(n)]
            msum = [zero_i] * n
            for p in range(8):
                mv = _load(builder, pb, v16i, o_m + 64 * p)
                for t in range(n):
                    msum[t] = _dpwssd(builder, msum[t], mv, _splat32(builder, _load(builder, pbs[t], I32, 4 * p), I32))
            dv = _load(builder, pb, v16f, o_d)
            cv = _load(builder, pb, v16f, o_c)
            for t in range(n):
                pd = _byte_ptr(context, builder, sxd, axd, builder.add(xdos[t], b), 4)
                dx = _splat32(builder, _load(builder, pd, F32), F32)
                acc = builder.load(accs[t])
                acc = _fma(builder, builder.sitofp(isum[t], v16f), builder.fmul(dv, dx), acc)
                acc = _fma(builder, builder.sitofp(msum[t], v16f), builder.fmul(cv, dx), acc)
                builder.store(acc, accs[t])
        for t in range(n):
            builder.store(builder.load(accs[t]), pys[t], align=4)
        return context.get_dummy_value()

    return codegen


def _gemm_intrinsic(codegen_of, doc: str):
    """An intrinsic f(p, b0, nb, x, xo, s, so, d, do, y, yo): blocks b0 .. b0 + nb - 1 of the
    panel p (its records from byte 0) against the N activation rows whose element offsets the
    tuples xo, so, do give, into 16 floats at each element offset of the tuple yo."""
    def typer(typingctx, p, b0, nb, x, xo, s, so, xd, xdo, y, yo):
        counts = {getattr(v, "count", -1) for v in (xo, so, xdo, yo)}
        if len(counts) != 1 or not all(isinstance(v, types.UniTuple) for v in (xo, so, xdo, yo)):
            return None
        return types.void(p, b0, nb, x, xo, s, so, xd, xdo, y, yo), codegen_of(xo.count)

    typer.__doc__ = doc
    return intrinsic(typer)


_K16 = "Panel (16 sub-blocks of 16) x N Q8_K rows"
panel_gemm16 = _gemm_intrinsic(lambda n: _gemm_codegen(16, n, True), _K16 + " (the first blocks).")
panel_gemm16_acc = _gemm_intrinsic(lambda n: _gemm_codegen(16, n, False), _K16 + " (further blocks).")
_K4P = "Packed Q4_K panel (raw nibbles) x N Q8_K rows"
panel_gemm4p = _gemm_intrinsic(lambda n: _gemm_codegen(8, n, True, True), _K4P + " (the first blocks).")
panel_gemm4p_acc = _gemm_intrinsic(lambda n: _gemm_codegen(8, n, False, True), _K4P + " (further blocks).")
REC4P = record_bytes(8, Q_BYTES // 2)


REC_Q80 = Q_BYTES + 512  # Q8_0 record: q (weights + 128 as u8), then D f32 [8 blocks][16 rows]


def _q80_gemm_codegen(n: int, first: bool):
    """Q8_0 panel x N Q8_0 activation rows: per 32-value block and token, the dot of the unsigned
    weights less 128 times the block's activation sum, times d_w * d_x, added to the row's sum."""
    v16i, v16f = _vec(I32, 16), _vec(F32, 16)

    def codegen(context, builder, signature, args):
        (ap, ab0, anb, ax, as_, axd), (sp, sx, ss, sxd), (xos, sos, xdos), pys, accs = \
            _tile_args(context, builder, signature, args, n, first)
        zero_i = ir.Constant(v16i, [0] * 16)
        with cgutils.for_range(builder, anb) as loop:
            b = builder.add(loop.index, ab0)
            pb = _byte_ptr(context, builder, sp, ap, builder.mul(b, ir.Constant(b.type, REC_Q80)))
            px = _token_ptrs(context, builder, sx, ax, xos, b, 256, 1)
            ps = _token_ptrs(context, builder, ss, as_, sos, b, 8, 2)
            pd = _token_ptrs(context, builder, sxd, axd, xdos, b, 8, 4)
            accv = [builder.load(accs[t]) for t in range(n)]
            for blk in range(8):
                a = [zero_i] * n
                for gi in range(8):
                    g = 8 * blk + gi
                    wv = _load(builder, pb, v16i, 64 * g)
                    for t in range(n):
                        a[t] = _dpbusd(builder, a[t], wv, _splat32(builder, _load(builder, px[t], I32, 4 * g), I32))
                dv = _load(builder, pb, v16f, Q_BYTES + 64 * blk)
                for t in range(n):
                    xs = builder.shl(builder.sext(_load(builder, ps[t], ir.IntType(16), 2 * blk), I32), ir.Constant(I32, 7))
                    dot = builder.sub(a[t], _splat32(builder, xs, I32))
                    dx = _splat32(builder, _load(builder, pd[t], F32, 4 * blk), F32)
                    accv[t] = _fma(builder, builder.sitofp(dot, v16f), builder.fmul(dv, dx), accv[t])
            for t in range(n):
                builder.store(accv[t], accs[t])
        for t in range(n):
            builder.store(builder.load(accs[t]), pys[t], align=4)
        return context.get_dummy_value()

    return codegen


_Q80 = "Q8_0 panel (records of 256 values) x N Q8_0 rows (values, int16 sums and float scales per 32)"
panel_gemm_q80 = _gemm_intrinsic(lambda n: _q80_gemm_codegen(n, True), _Q80 + " (the first blocks).")
panel_gemm_q80_acc = _gemm_intrinsic(lambda n: _q80_gemm_codegen(n, False), _Q80 + " (further blocks).")


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


def _store16(builder, pb, byte_off, vec):
    dst = builder.gep(pb, [ir.Constant(I32, byte_off)])
    builder.store(vec, builder.bitcast(dst, vec.type.as_pointer()), align=4)


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
        _store16(builder, pb, q_bytes + 64 * j, cols[j])
        mn = cols[8 + j]
        _store16(builder, pb, o_m + 64 * j, builder.or_(mn, builder.shl(mn, ir.Constant(_vec(I32, 16), [16] * 16))))
    _store16(builder, pb, o_m + 512, _halves(builder, ptrs, 0))
    _store16(builder, pb, o_m + 576, builder.fneg(_halves(builder, ptrs, 2)))


def _q6k_scales(builder, ptrs, pb):
    rows = [builder.sext(_load(builder, p, _vec(I8, 16), 192), _vec(I32, 16)) for p in ptrs]
    cols = _transpose16(builder, rows)
    o_m = Q_BYTES + 64 * 16
    low16 = ir.Constant(_vec(I32, 16), [0xFFFF] * 16)
    for h in range(16):
        _store16(builder, pb, Q_BYTES + 64 * h, cols[h])
    for p in range(8):
        pair = builder.or_(builder.and_(cols[2 * p], low16), builder.shl(cols[2 * p + 1], ir.Constant(_vec(I32, 16), [16] * 16)))
        _store16(builder, pb, o_m + 64 * p, pair)
    d = _halves(builder, ptrs, 208)
    _store16(builder, pb, o_m + 512, d)
    _store16(builder, pb, o_m + 576, builder.fmul(d, ir.Constant(_vec(F32, 16), [-32.0] * 16)))


def _q80_scales(builder, ptrs, pb):
    for k in range(8):
        _store16(builder, pb, Q_BYTES + 64 * k, _halves(builder, ptrs, 34 * k))


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
                    _store16(builder, pb, 64 * (16 * v + gi), vec)
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
def _gemm(fmt, pu, b0, nb, x, xo, s, so, d, do, Y, yy):
    if b0 == 0:
        if fmt == 3:
            panel_gemm4p(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
        elif fmt == 1:
            panel_gemm16(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
        else:
            panel_gemm_q80(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
    elif fmt == 3:
        panel_gemm4p_acc(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
    elif fmt == 1:
        panel_gemm16_acc(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
    else:
        panel_gemm_q80_acc(pu, b0, nb, x, xo, s, so, d, do, Y, yy)


@numba.njit(cache=True, nogil=True, inline="always")
def _tile(fmt, pu, b0, nb, x, s, d, tok, p, n, Y, yo):
    """Tokens tok[p: p + n] (n = 8, 4, 2 or 1) through the repacked panel into Y at the flat
    element offsets yo + (p + i) * Y.shape[1]; x, s, d the quantized activation rows."""
    K, S, B, W = x.shape[1], s.shape[1], d.shape[1], Y.shape[1]
    if n == 8:
        t = (tok[p], tok[p + 1], tok[p + 2], tok[p + 3], tok[p + 4], tok[p + 5], tok[p + 6], tok[p + 7])
        yy = (yo + p * W, yo + (p + 1) * W, yo + (p + 2) * W, yo + (p + 3) * W, yo + (p + 4) * W,
              yo + (p + 5) * W, yo + (p + 6) * W, yo + (p + 7) * W)
        xo = (t[0] * K, t[1] * K, t[2] * K, t[3] * K, t[4] * K, t[5] * K, t[6] * K, t[7] * K)
        so = (t[0] * S, t[1] * S, t[2] * S, t[3] * S, t[4] * S, t[5] * S, t[6] * S, t[7] * S)
        do = (t[0] * B, t[1] * B, t[2] * B, t[3] * B, t[4] * B, t[5] * B, t[6] * B, t[7] * B)
        _gemm(fmt, pu, b0, nb, x, xo, s, so, d, do, Y, yy)
    elif n == 4:
        t4 = (tok[p], tok[p + 1], tok[p + 2], tok[p + 3])
        yy4 = (yo + p * W, yo + (p + 1) * W, yo + (p + 2) * W, yo + (p + 3) * W)
        _gemm(fmt, pu, b0, nb, x, (t4[0] * K, t4[1] * K, t4[2] * K, t4[3] * K), s,
              (t4[0] * S, t4[1] * S, t4[2] * S, t4[3] * S), d, (t4[0] * B, t4[1] * B, t4[2] * B, t4[3] * B), Y, yy4)
    elif n == 2:
        t2 = (tok[p], tok[p + 1])
        _gemm(fmt, pu, b0, nb, x, (t2[0] * K, t2[1] * K), s, (t2[0] * S, t2[1] * S), d, (t2[0] * B, t2[1] * B), Y,
              (yo + p * W, yo + (p + 1) * W))
    else:
        t1 = tok[p]
        _gemm(fmt, pu, b0, nb, x, (t1 * K,), s, (t1 * S,), d, (t1 * B,), Y, (yo + p * W,))


@numba.njit(cache=True, nogil=True, inline="always")
def panel_rows(fmt, w, wo, rstride, pan, nb, x, s, d, tok, P, Y, ycol, pu):
    """Rows 16 pan .. 16 pan + 15 of the matrix for all P tokens: one repack, then 8 tokens a tile."""
    _repack(fmt, w, wo + 16 * pan * rstride, rstride, nb, pu)
    yo = ycol + 16 * pan
    for b0 in range(0, nb, PASS_BLOCKS):  # a few blocks for all tokens: they stay in L1
        k = min(PASS_BLOCKS, nb - b0)
        p = 0
        while p + 8 <= P and fmt == 2:  # the K-quant tiles hold 3 vectors a token: 4 fit in registers
            _tile(fmt, pu, b0, k, x, s, d, tok, p, 8, Y, yo)
            p += 8
        while p + 4 <= P:
            _tile(fmt, pu, b0, k, x, s, d, tok, p, 4, Y, yo)
            p += 4
        for n in (2, 1):
            if p + n <= P:
                _tile(fmt, pu, b0, k, x, s, d, tok, p, n, Y, yo)
                p += n


def scratch_panels(n_threads: int, max_nb: int) -> np.ndarray:
    """One panel buffer per thread (uint32 words, 64-byte aligned)."""
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
