"""The panel GEMM kernels (AVX-512 VNNI): a vector lane is an output row.

16 rows of a matrix form a *panel* whose 64-byte groups hold 4 consecutive values of each of the
16 rows, so one `vpdpbusd` against a token's 4 activation bytes (broadcast) advances 16 rows at
once, the sub-block scales are one `vpmulld` per 32 (or 16) values for all 16 rows, and nothing
is summed horizontally. Two families of records:

- *work panels* (formats 1-3), repacked from the raw GGUF blocks at run time by quant/gemm.py
  into a per-thread buffer (i32 scales, f32 D and C: fast to read, 1.4-1.7x the raw bytes);
- *stored panels* (P_Q4_K, P_Q6_K, P_Q8_0), built once at load and kept instead of the raw
  blocks: the same integers and the same floats in compact form, so that a matrix costs what its
  raw blocks cost (Q6_K, Q8_0) or 3 % more (Q4_K), and every reader (decode's GEMV, the batched
  step, prefill) runs these kernels without a repack.

Work panel layout, per block b of 256 values (one record of `record_bytes(NS)` bytes):
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
taken back with the Q8_0 activation sums.

Stored (compact) records, per block of 256 values and 16 rows:
    P_Q4_K (2368 B): q as the packed Q4_K panel (2048) | sc u8 [8][16] | m u8 [8][16] | D f16 [16] | C f16 [16]
    P_Q6_K (3360 B): per sub-block s of 16 values (groups 4s..4s+3): lo u8 [16][4] holding the low
                     nibbles of groups 4s (low) and 4s+1 (high), the same for 4s+2 / 4s+3, hi u8
                     [16][4] holding the top 2 bits of the four groups (bits 0-1, 2-3, 4-5, 6-7)
                     (192 bytes a sub-block) | sc i8 [16][16] | D f16 [16]   (C = -32 D)
    P_Q8_0 (4352 B): q as the Q8_0 work panel (4096) | D f16 [8][16]
The kernels widen them as they load; the integer sums and the float operations are those of the
work panels, so the results are bit for bit the same. The float order is fixed per (row, token):
a token's result does not depend on the others in the call (batch invariance).

Numba's on-disk cache keys a compiled function on its own source file only; numba_cache.py keys
the cache directory on this file too.
"""

from __future__ import annotations

import numba
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from hybrid_runtime.quant.numba_cache import use_versioned_cache_dir

use_versioned_cache_dir()

from hybrid_runtime.quant.vnni import F16, F32, I8, I32, _byte_ptr, _dpbusd, _dpwssd, _fma, _load, _pick, _vec  # noqa: E402

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


def _q80_gemm_codegen(n: int, first: bool, compact: bool = False):
    """Q8_0 panel x N Q8_0 activation rows: per 32-value block and token, the dot of the unsigned
    weights less 128 times the block's activation sum, times d_w * d_x, added to the row's sum
    (compact: the stored record, D as halves)."""
    v16i, v16f = _vec(I32, 16), _vec(F32, 16)
    rec = REC_P8 if compact else REC_Q80

    def codegen(context, builder, signature, args):
        (ap, ab0, anb, ax, as_, axd), (sp, sx, ss, sxd), (xos, sos, xdos), pys, accs = \
            _tile_args(context, builder, signature, args, n, first)
        zero_i = ir.Constant(v16i, [0] * 16)
        with cgutils.for_range(builder, anb) as loop:
            b = builder.add(loop.index, ab0)
            pb = _byte_ptr(context, builder, sp, ap, builder.mul(b, ir.Constant(b.type, rec)))
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
                dv = _f16x16(builder, pb, Q_BYTES + 32 * blk) if compact else _load(builder, pb, v16f, Q_BYTES + 64 * blk)
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
# Stored (compact) panels: the work panels' arithmetic on records of the raw blocks' size
# ---------------------------------------------------------------------------------------------

P_Q4_K, P_Q6_K, P_Q8_0 = 7, 8, 9  # formats of the stored panels (also their kinds in cpu/table.py)
REC_P4 = Q_BYTES // 2 + 128 + 128 + 32 + 32
REC_P6 = 3 * 64 * 16 + 256 + 32
REC_P8 = Q_BYTES + 256


def _widen(builder, pb, off, signed=False):  # 16 bytes at pb + off -> <16 x i32>
    v = _load(builder, pb, _vec(I8, 16), off)
    return builder.sext(v, _vec(I32, 16)) if signed else builder.zext(v, _vec(I32, 16))


def _f16x16(builder, pb, off):  # 16 halves at pb + off -> <16 x float>
    return builder.fpext(_load(builder, pb, _vec(F16, 16), off), _vec(F32, 16))


def _pair16(builder, lo, hi):  # lanes (lo & 0xFFFF) | hi << 16: the i16 pairs vpdpwssd reads
    v16i = _vec(I32, 16)
    return builder.or_(builder.and_(lo, ir.Constant(v16i, [0xFFFF] * 16)), builder.shl(hi, ir.Constant(v16i, [16] * 16)))


def _p6_groups(builder, pb, s):
    """The four work groups 4s .. 4s + 3 (<16 x i32> of 6-bit values) of a P_Q6_K record."""
    v16i = _vec(I32, 16)

    def k(v):
        return ir.Constant(v16i, [v] * 16)

    pa, pq, h = (_load(builder, pb, v16i, 192 * s + 64 * j) for j in range(3))
    hs = [builder.and_(builder.shl(h, k(4)), k(0x30303030)), builder.and_(builder.shl(h, k(2)), k(0x30303030)),
          builder.and_(h, k(0x30303030)), builder.and_(builder.lshr(h, k(2)), k(0x30303030))]
    lows = [builder.and_(pa, k(0x0F0F0F0F)), builder.and_(builder.lshr(pa, k(4)), k(0x0F0F0F0F)),
            builder.and_(pq, k(0x0F0F0F0F)), builder.and_(builder.lshr(pq, k(4)), k(0x0F0F0F0F))]
    return [builder.or_(lo, hi) for lo, hi in zip(lows, hs)]


def _store_vec(builder, pb, byte_off, vec):
    dst = builder.gep(pb, [ir.Constant(I32, byte_off)])
    builder.store(vec, builder.bitcast(dst, vec.type.as_pointer()), align=4)


@intrinsic
def expand_p6(typingctx, pc, b0, nb, pw):
    """Records b0 .. b0 + nb - 1 of a P_Q6_K panel pc -> the same records of the Q6_K work format
    (format 1) in pw: the unpacking done once for all tokens of a pass instead of once per tile
    (64 tokens: 93 -> 135 GMAC/s a thread)."""
    def codegen(context, builder, signature, args):
        apc, ab0, anb, apw = args
        spc, _, _, spw = signature.args
        v16f = _vec(F32, 16)
        with cgutils.for_range(builder, anb) as loop:
            b = builder.add(loop.index, ab0)
            src = _byte_ptr(context, builder, spc, apc, builder.mul(b, ir.Constant(b.type, REC_P6)))
            dst = _byte_ptr(context, builder, spw, apw, builder.mul(b, ir.Constant(b.type, REC16)))
            for s in range(16):
                for gi, g in enumerate(_p6_groups(builder, src, s)):
                    _store_vec(builder, dst, 64 * (4 * s + gi), g)
            sc = [_widen(builder, src, 3072 + 16 * s, True) for s in range(16)]
            for s in range(16):
                _store_vec(builder, dst, Q_BYTES + 64 * s, sc[s])
            for q in range(8):
                _store_vec(builder, dst, Q_BYTES + 1024 + 64 * q, _pair16(builder, sc[2 * q], sc[2 * q + 1]))
            d = _f16x16(builder, src, 3328)
            _store_vec(builder, dst, Q_BYTES + 1536, d)
            _store_vec(builder, dst, Q_BYTES + 1600, builder.fmul(d, ir.Constant(v16f, [-32.0] * 16)))
        return context.get_dummy_value()

    return types.void(pc, b0, nb, pw), codegen


def _stored_kquant_codegen(q6: bool, n: int, first: bool):
    """P_Q4_K or P_Q6_K panel x N Q8_K rows (see the module docstring for the records)."""
    v16i, v16f = _vec(I32, 16), _vec(F32, 16)
    rec = REC_P6 if q6 else REC_P4
    o_sc = 3072 if q6 else Q_BYTES // 2
    o_m = o_sc + 128  # P_Q4_K only
    o_d = 3328 if q6 else o_sc + 256

    def k(v):
        return ir.Constant(v16i, [v] * 16)

    def codegen(context, builder, signature, args):
        (ap, ab0, anb, ax, abs_, axd), (sp, sx, sbs, sxd), (xos, bsos, xdos), pys, accs = \
            _tile_args(context, builder, signature, args, n, first)
        zero_i = ir.Constant(v16i, [0] * 16)
        with cgutils.for_range(builder, anb) as loop:
            b = builder.add(loop.index, ab0)
            pb = _byte_ptr(context, builder, sp, ap, builder.mul(b, ir.Constant(b.type, rec)))
            px = _token_ptrs(context, builder, sx, ax, xos, b, 256, 1)
            pbs = _token_ptrs(context, builder, sbs, abs_, bsos, b, 16, 2)

            def dot(acc, t, wv, g):
                return _dpbusd(builder, acc, wv, _splat32(builder, _load(builder, px[t], I32, 4 * g), I32))

            isum = [zero_i] * n
            if q6:
                for s in range(16):
                    gs = _p6_groups(builder, pb, s)
                    a = [zero_i] * n
                    for gi in range(4):
                        a = [dot(a[t], t, gs[gi], 4 * s + gi) for t in range(n)]
                    scv = _widen(builder, pb, o_sc + 16 * s, signed=True)
                    isum = [builder.add(isum[t], builder.mul(a[t], scv)) for t in range(n)]
            else:
                nib = k(0x0F0F0F0F)
                for c in range(4):  # sub-blocks 2c (low nibbles) and 2c + 1 (high)
                    a_lo, a_hi = [zero_i] * n, [zero_i] * n
                    for i in range(8):
                        pv = _load(builder, pb, v16i, 64 * (8 * c + i))
                        lo = builder.and_(pv, nib)
                        hi = builder.and_(builder.lshr(pv, k(4)), nib)
                        a_lo = [dot(a_lo[t], t, lo, 16 * c + i) for t in range(n)]
                        a_hi = [dot(a_hi[t], t, hi, 16 * c + 8 + i) for t in range(n)]
                    sc_lo, sc_hi = _widen(builder, pb, o_sc + 32 * c), _widen(builder, pb, o_sc + 32 * c + 16)
                    isum = [builder.add(builder.add(isum[t], builder.mul(a_lo[t], sc_lo)), builder.mul(a_hi[t], sc_hi))
                            for t in range(n)]
            msum = [zero_i] * n
            for p in range(8):
                if q6:
                    mv = _pair16(builder, _widen(builder, pb, o_sc + 32 * p, True), _widen(builder, pb, o_sc + 32 * p + 16, True))
                else:
                    m1 = _widen(builder, pb, o_m + 16 * p)
                    mv = builder.or_(m1, builder.shl(m1, k(16)))
                for t in range(n):
                    msum[t] = _dpwssd(builder, msum[t], mv, _splat32(builder, _load(builder, pbs[t], I32, 4 * p), I32))
            dv = _f16x16(builder, pb, o_d)
            cv = builder.fmul(dv, ir.Constant(v16f, [-32.0] * 16)) if q6 else _f16x16(builder, pb, o_d + 32)
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


_P4 = "Stored Q4_K panel x N Q8_K rows"
stored_gemm_p4 = _gemm_intrinsic(lambda n: _stored_kquant_codegen(False, n, True), _P4 + " (the first blocks).")
stored_gemm_p4_acc = _gemm_intrinsic(lambda n: _stored_kquant_codegen(False, n, False), _P4 + " (further blocks).")
_P6 = "Stored Q6_K panel x N Q8_K rows"
stored_gemm_p6 = _gemm_intrinsic(lambda n: _stored_kquant_codegen(True, n, True), _P6 + " (the first blocks).")
stored_gemm_p6_acc = _gemm_intrinsic(lambda n: _stored_kquant_codegen(True, n, False), _P6 + " (further blocks).")
_P8 = "Stored Q8_0 panel x N Q8_0 rows"
stored_gemm_p8 = _gemm_intrinsic(lambda n: _q80_gemm_codegen(n, True, True), _P8 + " (the first blocks).")
stored_gemm_p8_acc = _gemm_intrinsic(lambda n: _q80_gemm_codegen(n, False, True), _P8 + " (further blocks).")

@numba.njit(nogil=True, inline="always")
def _gemm_work(fmt, pu, b0, nb, x, xo, s, so, d, do, Y, yy):
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


@numba.njit(nogil=True, inline="always")
def _gemm_stored(fmt, pu, b0, nb, x, xo, s, so, d, do, Y, yy):
    if fmt == P_Q4_K:
        if b0 == 0:
            stored_gemm_p4(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
        else:
            stored_gemm_p4_acc(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
    elif fmt == P_Q6_K:
        if b0 == 0:
            stored_gemm_p6(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
        else:
            stored_gemm_p6_acc(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
    elif b0 == 0:
        stored_gemm_p8(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
    else:
        stored_gemm_p8_acc(pu, b0, nb, x, xo, s, so, d, do, Y, yy)


@numba.njit(nogil=True, inline="always")
def _gemm_q6_work(fmt, pu, b0, nb, x, xo, s, so, d, do, Y, yy):  # expanded P_Q6_K records (format 1)
    if b0 == 0:
        panel_gemm16(pu, b0, nb, x, xo, s, so, d, do, Y, yy)
    else:
        panel_gemm16_acc(pu, b0, nb, x, xo, s, so, d, do, Y, yy)


def _make_tile(gemm):
    """The tile driver over one family of formats (each call site compiles only its own kernels)."""
    @numba.njit(nogil=True, inline="always")
    def tile(fmt, pu, b0, nb, x, s, d, tok, p, n, Y, yo):
        """Tokens tok[p: p + n] (n = 8, 4, 2 or 1) through the panel pu (format fmt) into Y at the
        flat element offsets yo + (p + i) * Y.shape[1]; x, s, d the quantized activation rows."""
        K, S, B, W = x.shape[1], s.shape[1], d.shape[1], Y.shape[1]
        if n == 8:
            t = (tok[p], tok[p + 1], tok[p + 2], tok[p + 3], tok[p + 4], tok[p + 5], tok[p + 6], tok[p + 7])
            yy = (yo + p * W, yo + (p + 1) * W, yo + (p + 2) * W, yo + (p + 3) * W, yo + (p + 4) * W,
                  yo + (p + 5) * W, yo + (p + 6) * W, yo + (p + 7) * W)
            xo = (t[0] * K, t[1] * K, t[2] * K, t[3] * K, t[4] * K, t[5] * K, t[6] * K, t[7] * K)
            so = (t[0] * S, t[1] * S, t[2] * S, t[3] * S, t[4] * S, t[5] * S, t[6] * S, t[7] * S)
            do = (t[0] * B, t[1] * B, t[2] * B, t[3] * B, t[4] * B, t[5] * B, t[6] * B, t[7] * B)
            gemm(fmt, pu, b0, nb, x, xo, s, so, d, do, Y, yy)
        elif n == 4:
            t4 = (tok[p], tok[p + 1], tok[p + 2], tok[p + 3])
            yy4 = (yo + p * W, yo + (p + 1) * W, yo + (p + 2) * W, yo + (p + 3) * W)
            gemm(fmt, pu, b0, nb, x, (t4[0] * K, t4[1] * K, t4[2] * K, t4[3] * K), s,
                 (t4[0] * S, t4[1] * S, t4[2] * S, t4[3] * S), d, (t4[0] * B, t4[1] * B, t4[2] * B, t4[3] * B), Y, yy4)
        elif n == 2:
            t2 = (tok[p], tok[p + 1])
            gemm(fmt, pu, b0, nb, x, (t2[0] * K, t2[1] * K), s, (t2[0] * S, t2[1] * S), d, (t2[0] * B, t2[1] * B), Y,
                 (yo + p * W, yo + (p + 1) * W))
        else:
            t1 = tok[p]
            gemm(fmt, pu, b0, nb, x, (t1 * K,), s, (t1 * S,), d, (t1 * B,), Y, (yo + p * W,))

    return tile


def _make_through(tile, q6_tile):
    """The driver of one panel for a run of tokens. A stored P_Q6_K panel
    whose tokens need more than one tile is expanded pass by pass into the work format in wbuf
    (per thread, >= nb * REC16 bytes: quant/gemm.scratch_panels) and read there: same bits, the unpacking paid once a pass."""
    @numba.njit(nogil=True, inline="always")
    def through(fmt, pu, nb, x, s, d, tok, p0, p1, Y, yo, wbuf):
        """Tokens tok[p0: p1] through one panel (nb records from byte 0 of pu, format fmt) into the
        16 floats at flat element offset yo + p * Y.shape[1] for each p: PASS_BLOCKS blocks for all
        tokens at a time (they stay in L1), or every block in one pass when the tokens fit one tile."""
        wide = 8 if fmt == 2 or fmt == P_Q8_0 else 4  # the K-quant tiles hold 3 vectors a token: 4 fit in registers
        step = nb if p1 - p0 <= wide else PASS_BLOCKS
        expand = fmt == P_Q6_K and p1 - p0 > wide
        for b0 in range(0, nb, step):
            k = min(step, nb - b0)
            p = p0
            if expand:
                expand_p6(pu, b0, k, wbuf)
                while p + 4 <= p1:
                    q6_tile(1, wbuf, b0, k, x, s, d, tok, p, 4, Y, yo)
                    p += 4
                for n in (2, 1):
                    if p + n <= p1:
                        q6_tile(1, wbuf, b0, k, x, s, d, tok, p, n, Y, yo)
                        p += n
                continue
            while p + 8 <= p1 and wide == 8:
                tile(fmt, pu, b0, k, x, s, d, tok, p, 8, Y, yo)
                p += 8
            while p + 4 <= p1:
                tile(fmt, pu, b0, k, x, s, d, tok, p, 4, Y, yo)
                p += 4
            for n in (2, 1):
                if p + n <= p1:
                    tile(fmt, pu, b0, k, x, s, d, tok, p, n, Y, yo)
                    p += n

    return through


# work panels (formats 1-3, quant/gemm.py's repack) and stored panels (P_*): the same drivers
_q6_tile = _make_tile(_gemm_q6_work)
work_through = _make_through(_make_tile(_gemm_work), _q6_tile)
stored_through = _make_through(_make_tile(_gemm_stored), _q6_tile)

