"""AVX-512 VNNI row dot products as Numba intrinsics (LLVM IR emitted by hand).

Each intrinsic computes the dot product of one weight ROW (raw GGUF blocks) with one row of
quantized activations and returns a float32. The block loop is emitted in IR so that the
accumulators stay in vector registers and are reduced once per row. They call
`llvm.x86.avx512.vpdpbusd.512` (unsigned bytes x signed bytes, 4-way sums into 16 int32 lanes)
and `vpdpwssd` (int16 pairs) for the sub-block scales, so a function that uses them must only be
compiled on a CPU with AVX-512 VNNI: `cpu_features.has_avx512_vnni()` decides.

Arguments: `(w, wo, x, xo, s, so, xd, do, nb)`: `w` a uint8 array and `wo` the byte offset of
the row's first block; `x` int8 activations, `s` their int16 sums (Q8_K bsums per 16, or Q8_0 block
sums), `xd` their float32 block scales, each with the element offset of the row (`xo`, `so`, `do`);
`nb` the number of weight blocks (pairs of blocks for Q8_0). Only the addressed bytes need to be
contiguous, so a row of a strided view is fine.

Numba's on-disk cache keys a compiled function on its own source file only: after editing this
file, delete hybrid_runtime/quant/__pycache__/kernels.*.nbi/.nbc (or the kernels keep the old code).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from hybrid_runtime.quant.cpu_features import prefetch_bytes

I8, I16, I32, F32, F16 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType(), ir.HalfType()


def _vec(t, n):
    return ir.VectorType(t, n)


def _splat(t, n, v):
    return ir.Constant(_vec(t, n), [v] * n)


def _byte_ptr(context, builder, arrty, arr, off, elem_size=1):
    data = context.make_array(arrty)(context, builder, arr).data
    p = builder.bitcast(data, I8.as_pointer())
    return builder.gep(p, [builder.mul(off, ir.Constant(off.type, elem_size))])


def _load(builder, p, ty, byte_off=0):
    if byte_off:
        p = builder.gep(p, [ir.Constant(I32, byte_off)])
    return builder.load(builder.bitcast(p, ty.as_pointer()), align=1)


def _half(builder, p, byte_off):
    return builder.fpext(_load(builder, p, F16, byte_off), F32)


def _concat(builder, a, b):  # two <N x T> -> <2N x T>
    n = a.type.count
    return builder.shuffle_vector(a, b, ir.Constant(_vec(I32, 2 * n), list(range(2 * n))))


def _pick(builder, v, lanes):  # v[lanes] as a new vector
    return builder.shuffle_vector(v, ir.Constant(v.type, None), ir.Constant(_vec(I32, len(lanes)), lanes))


def _dpbusd(builder, acc, u8, s8):  # acc <16 x i32> += 4-way dot of u8 <64 x i8> and s8 <64 x i8>
    v16 = _vec(I32, 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                        "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [acc, builder.bitcast(u8, v16), builder.bitcast(s8, v16)])


def _dpwssd(builder, acc, a, b):  # acc <16 x i32> += a.lo16 * b.lo16 + a.hi16 * b.hi16 per lane
    v16 = _vec(I32, 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                        "llvm.x86.avx512.vpdpwssd.512")
    return builder.call(fn, [acc, a, b])


def _zero16(builder):
    return ir.Constant(_vec(I32, 16), [0] * 16)


def _lshr8(builder, v, k):
    return builder.lshr(v, _splat(I8, v.type.count, k))


def _and8(builder, v, k):
    return builder.and_(v, _splat(I8, v.type.count, k))


def _splat_f(builder, v, n):
    vec = builder.insert_element(ir.Constant(_vec(F32, n), None), v, ir.Constant(I32, 0))
    return _pick(builder, vec, [0] * n)


def _fma(builder, a, b, c):
    ty = a.type
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), f"llvm.fma.v{ty.count}f32")
    return builder.call(fn, [a, b, c])


def _reduce_fadd(builder, v):
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(_pick(builder, v, list(range(n))), _pick(builder, v, list(range(n, 2 * n))))
    return builder.extract_element(v, ir.Constant(I32, 0))


# Each block's bytes PREFETCH_BYTES ahead are prefetched into L2 (prefetcht2). On the Intel Xeon
# measured, the hardware prefetcher stops at every 4 KiB page and ramps up again on each new region
# (an expert is a few hundred KB), so with 2 threads random experts were read at 14.8 GB/s against
# 41 from cache; 2 KB ahead: 20.6 (mmap), 25.7 (huge pages); 1 KB or 4-8 KB ahead, or into L1,
# gained less. On AMD Zen 4 they cost speed instead: cpu_features.prefetch_bytes() decides.
PREFETCH_BYTES = prefetch_bytes()
_PREFETCH_L2 = 1  # llvm.prefetch locality 1 = prefetcht2


def _prefetch_ahead(builder, pw, w_bytes):  # every cache line of the block PREFETCH_BYTES ahead
    if not PREFETCH_BYTES:
        return
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
                                        "llvm.prefetch.p0i8")
    for k in range(0, w_bytes, 64):
        p = builder.gep(pw, [ir.Constant(I32, PREFETCH_BYTES + k)])
        builder.call(fn, [p, ir.Constant(I32, 0), ir.Constant(I32, _PREFETCH_L2), ir.Constant(I32, 1)])


def _row_codegen(block_fn, widths, w_bytes, x_vals, s_vals, d_vals):
    """IR for: for b < nb: for each (int vector, float scale) of block_fn: acc += float(vector) * scale."""

    def codegen(context, builder, signature, args):
        aw, awo, ax, axo, as_, aso, axd, ado, anb = args
        sw, _, sx, _, ss, _, sd, _, _ = signature.args
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_vec(F32, n), [0.0] * n)) for n in widths]
        with cgutils.for_range(builder, anb) as loop:
            b = loop.index
            pw = _byte_ptr(context, builder, sw, aw, builder.add(awo, builder.mul(b, ir.Constant(b.type, w_bytes))))
            _prefetch_ahead(builder, pw, w_bytes)
            px = _byte_ptr(context, builder, sx, ax, builder.add(axo, builder.mul(b, ir.Constant(b.type, x_vals))))
            ps = _byte_ptr(context, builder, ss, as_, builder.add(aso, builder.mul(b, ir.Constant(b.type, s_vals))), 2)
            pd = _byte_ptr(context, builder, sd, axd, builder.add(ado, builder.mul(b, ir.Constant(b.type, d_vals))), 4)
            for acc, (ivec, scale) in zip(accs, block_fn(builder, pw, px, ps, pd)):
                n = ivec.type.count
                if not isinstance(scale.type, ir.VectorType):
                    scale = _splat_f(builder, scale, n)
                fvec = builder.sitofp(ivec, _vec(F32, n))
                builder.store(_fma(builder, fvec, scale, builder.load(acc)), acc)
        by_width = {}  # accumulators of one width are added lane-wise first: one horizontal sum each
        for n, acc in zip(widths, accs):
            v = builder.load(acc)
            by_width[n] = builder.fadd(by_width[n], v) if n in by_width else v
        total = ir.Constant(F32, 0.0)
        for v in by_width.values():
            total = builder.fadd(total, _reduce_fadd(builder, v))
        return total

    return codegen


def _row_signature(w, wo, x, xo, s, so, xd, do, nb):
    return types.float32(w, wo, x, xo, s, so, xd, do, nb)


def _rows_codegen(block_fn, widths, w_bytes, x_vals, s_vals, d_vals, R):
    """IR for R activation rows against one weight row: `_row_codegen`'s loop with the body
    repeated per activation row. The weight loads and their unpacking are the same instructions
    on the same operands in each copy, so LLVM's value numbering keeps one of each: the block is
    read and unpacked once for all R rows. Each row's own chain (dot products, fma into its
    accumulators, the final reduction) is exactly the single-row one, without fast-math flags,
    so every result is bit-identical to `_row_codegen`'s for that row alone."""

    def codegen(context, builder, signature, args):
        aw, awo, ax, axo, as_, aso, axd, ado, anb = args
        sw, _, sx, _, ss, _, sd, _, _ = signature.args
        xos = [builder.extract_value(axo, r) for r in range(R)]
        sos = [builder.extract_value(aso, r) for r in range(R)]
        dos = [builder.extract_value(ado, r) for r in range(R)]
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_vec(F32, n), [0.0] * n)) for n in widths]
                for _ in range(R)]
        with cgutils.for_range(builder, anb) as loop:
            b = loop.index
            pw = _byte_ptr(context, builder, sw, aw, builder.add(awo, builder.mul(b, ir.Constant(b.type, w_bytes))))
            _prefetch_ahead(builder, pw, w_bytes)
            for r in range(R):
                px = _byte_ptr(context, builder, sx, ax, builder.add(xos[r], builder.mul(b, ir.Constant(b.type, x_vals))))
                ps = _byte_ptr(context, builder, ss, as_, builder.add(sos[r], builder.mul(b, ir.Constant(b.type, s_vals))), 2)
                pd = _byte_ptr(context, builder, sd, axd, builder.add(dos[r], builder.mul(b, ir.Constant(b.type, d_vals))), 4)
                for acc, (ivec, scale) in zip(accs[r], block_fn(builder, pw, px, ps, pd)):
                    n = ivec.type.count
                    if not isinstance(scale.type, ir.VectorType):
                        scale = _splat_f(builder, scale, n)
                    fvec = builder.sitofp(ivec, _vec(F32, n))
                    builder.store(_fma(builder, fvec, scale, builder.load(acc)), acc)
        totals = []
        for r in range(R):
            by_width = {}
            for n, acc in zip(widths, accs[r]):
                v = builder.load(acc)
                by_width[n] = builder.fadd(by_width[n], v) if n in by_width else v
            total = ir.Constant(F32, 0.0)
            for v in by_width.values():
                total = builder.fadd(total, _reduce_fadd(builder, v))
            totals.append(total)
        return context.make_tuple(builder, signature.return_type, totals)

    return codegen


def _rows_intrinsic(block_fn, widths, w_bytes, x_vals, s_vals, d_vals, doc):
    """An intrinsic f(w, wo, x, xo, s, so, xd, do, nb) whose xo, so, do are equal-length tuples of
    activation-row offsets; it returns the tuple of their dot products with the weight row."""

    def typer(typingctx, w, wo, x, xo, s, so, xd, do, nb):
        if not isinstance(xo, types.UniTuple) or not (xo.count == getattr(so, "count", -1) == getattr(do, "count", -1)):
            return None
        R = xo.count
        sig = types.UniTuple(types.float32, R)(w, wo, x, xo, s, so, xd, do, nb)
        return sig, _rows_codegen(block_fn, widths, w_bytes, x_vals, s_vals, d_vals, R)

    typer.__doc__ = doc
    return intrinsic(typer)


# ---------------------------------------------------------------------------------------------
# Q4_K: 144 bytes = d f16 | dmin f16 | scales[12] (8 x 6-bit scale, 8 x 6-bit min) | qs[128]
# qs[32j + l]: low nibble = value 64j + l (sub-block 2j), high nibble = 64j + 32 + l (2j + 1)
# ---------------------------------------------------------------------------------------------

def _q4k_scale_bytes(builder, pw):  # -> <16 x i8>: bytes 0-7 the 6-bit scales, 8-15 the mins
    # words u0 u1 u2 of scales[12]; out words: u0 & k1 | (u2 & k2) | (u0 >> 6 & k3) << 4 |
    # u1 & k1 | (u2 >> 4 & k2) | (u1 >> 6 & k3) << 4, computed in one xmm
    v = _load(builder, pw, _vec(I32, 4), 4)  # u0 u1 u2 (and 4 bytes of qs, unused)
    a = _pick(builder, v, [0, 2, 1, 2])
    b = _pick(builder, v, [0, 0, 1, 1])
    c = lambda *k: ir.Constant(_vec(I32, 4), list(k))
    low6 = builder.and_(a, c(*[0x3F3F3F3F] * 4))
    high = builder.or_(builder.and_(builder.lshr(a, c(0, 0, 0, 4)), c(*[0x0F0F0F0F] * 4)),
                       builder.shl(builder.and_(builder.lshr(b, c(*[6] * 4)), c(*[0x03030303] * 4)), c(*[4] * 4)))
    words = builder.select(ir.Constant(_vec(ir.IntType(1), 4), [1, 0, 1, 0]), low6, high)
    return builder.bitcast(words, _vec(I8, 16))


def _byte_lanes(builder, b16, picks, lane_bytes):
    """Lanes of lane_bytes bytes holding b16[picks[i]] zero-extended, as <N x i8>: the 16 bytes
    are copied into every 128-bit lane and picked with one in-lane vpshufb (0x80 = zero)."""
    n = len(picks) * lane_bytes
    copies = builder.shuffle_vector(b16, b16, ir.Constant(_vec(I32, n), [i % 16 for i in range(n)]))
    mask = []
    for i in picks:
        mask += [i] + [-128] * (lane_bytes - 1)
    name, ty = ("llvm.x86.avx512.pshuf.b.512", _vec(I8, 64)) if n == 64 else ("llvm.x86.avx2.pshuf.b", _vec(I8, 32))
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty]), name)
    return builder.call(fn, [copies, ir.Constant(ty, mask)])


def _k4_block(builder, pw, px, ps, pd, nibbles):
    """Shared by Q4_K and Q5_K: nibbles(j) -> (lo, hi) <64 x i8> unsigned values of 64-byte load j.

    x must be in "nibble order" (see kernels.nibble_order): per 128 values [0:32, 64:96, 32:64,
    96:128], so that load j's low nibbles meet x[128j:128j+64] and its high nibbles the next 64.
    A dpbusd lane sums 4 products (|.| <= 4*31*127 < 2**15), so it is scaled with vpdpwssd
    against lanes holding the 16-bit scale in their low half and zero in the high half.
    """
    sm = _q4k_scale_bytes(builder, pw)
    tot = _zero16(builder)
    for j in range(2):  # 64 qs bytes = 128 values = sub-blocks 4j..4j+3
        lo, hi = nibbles(j)
        p_lo = _dpbusd(builder, _zero16(builder), lo, _load(builder, px, _vec(I8, 64), 128 * j))
        p_hi = _dpbusd(builder, _zero16(builder), hi, _load(builder, px, _vec(I8, 64), 128 * j + 64))
        s_lo = _byte_lanes(builder, sm, [4 * j] * 8 + [4 * j + 2] * 8, 4)
        s_hi = _byte_lanes(builder, sm, [4 * j + 1] * 8 + [4 * j + 3] * 8, 4)
        tot = _dpwssd(builder, tot, p_lo, builder.bitcast(s_lo, _vec(I32, 16)))
        tot = _dpwssd(builder, tot, p_hi, builder.bitcast(s_hi, _vec(I32, 16)))
    # mins: lane s = min_s * (bsum[2s] + bsum[2s+1]): int16 pairs against (min_s, min_s)
    mins = _byte_lanes(builder, sm, [8 + i // 2 for i in range(16)], 2)
    bs = _load(builder, ps, _vec(I16, 16))
    v8 = _vec(I32, 8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8, v8, v8]),
                                        "llvm.x86.avx512.vpdpwssd.256")
    mterm = builder.call(fn, [ir.Constant(v8, [0] * 8), builder.bitcast(bs, v8), builder.bitcast(mins, v8)])
    # (d, -dmin) * dx with one fp16 -> fp32 conversion
    dd = builder.fpext(_load(builder, pw, _vec(F16, 2)), _vec(F32, 2))
    dd = builder.fmul(dd, builder.fmul(_splat_f(builder, _load(builder, pd, F32), 2),
                                       ir.Constant(_vec(F32, 2), [1.0, -1.0])))
    return [(tot, builder.extract_element(dd, ir.Constant(I32, 0))), (mterm, builder.extract_element(dd, ir.Constant(I32, 1)))]


def _q4k_block(builder, pw, px, ps, pd):
    def nibbles(j):
        q = _load(builder, pw, _vec(I8, 64), 16 + 64 * j)
        return _and8(builder, q, 0x0F), _lshr8(builder, q, 4)

    return _k4_block(builder, pw, px, ps, pd, nibbles)


@intrinsic
def q4k_row_dot(typingctx, w, wo, x, xo, s, so, xd, do, nb):
    """Q4_K weight row x Q8_K activation row -> float32."""
    return _row_signature(w, wo, x, xo, s, so, xd, do, nb), _row_codegen(_q4k_block, (16, 8), 144, 256, 16, 1)


q4k_rows_dot = _rows_intrinsic(_q4k_block, (16, 8), 144, 256, 16, 1, "Q4_K row x R Q8_K rows -> R float32.")


# ---------------------------------------------------------------------------------------------
# Q5_K: 176 bytes = d | dmin | scales[12] | qh[32] | qs[128]; value 64j + l = low nibble of
# qs[32j + l] + 16 * bit 2j of qh[l]; value 64j + 32 + l = high nibble + 16 * bit 2j+1 of qh[l]
# ---------------------------------------------------------------------------------------------

def _q5k_block(builder, pw, px, ps, pd):
    qh32 = _load(builder, pw, _vec(I8, 32), 16)
    qh = _concat(builder, qh32, _lshr8(builder, qh32, 2))  # bytes 32-63: the bits of chunk 2j+1

    def nibbles(j):
        q = _load(builder, pw, _vec(I8, 64), 48 + 64 * j)
        h = _lshr8(builder, qh, 4 * j)
        lo = builder.or_(_and8(builder, q, 0x0F), builder.shl(_and8(builder, h, 1), _splat(I8, 64, 4)))
        hi = builder.or_(_lshr8(builder, q, 4), builder.shl(_and8(builder, h, 2), _splat(I8, 64, 3)))
        return lo, hi

    return _k4_block(builder, pw, px, ps, pd, nibbles)


@intrinsic
def q5k_row_dot(typingctx, w, wo, x, xo, s, so, xd, do, nb):
    """Q5_K weight row x Q8_K activation row -> float32."""
    return _row_signature(w, wo, x, xo, s, so, xd, do, nb), _row_codegen(_q5k_block, (16, 8), 176, 256, 16, 1)


q5k_rows_dot = _rows_intrinsic(_q5k_block, (16, 8), 176, 256, 16, 1, "Q5_K row x R Q8_K rows -> R float32.")


# ---------------------------------------------------------------------------------------------
# Q6_K: 210 bytes = ql[128] | qh[64] | scales[16] int8 | d f16. Half n (128 values), l < 32:
#   v[128n + l]      = ql[64n + l] & 15      | (qh[32n + l] >> 0 & 3) << 4
#   v[128n + 32 + l] = ql[64n + 32 + l] & 15 | (qh[32n + l] >> 2 & 3) << 4
#   v[128n + 64 + l] = ql[64n + l] >> 4      | (qh[32n + l] >> 4 & 3) << 4
#   v[128n + 96 + l] = ql[64n + 32 + l] >> 4 | (qh[32n + l] >> 6 & 3) << 4
# weight = d * scales[i / 16] * (v - 32); the -32 is applied through the Q8_K bsums.
# ---------------------------------------------------------------------------------------------

def _q6k_block(builder, pw, px, ps, pd):
    # 16-bit scale in the low half of each lane, zero above (see _k4_block); dpbusd lanes here
    # reach 4*63*127 = 32004 < 2**15
    sc = builder.sext(_load(builder, pw, _vec(I8, 16), 192), _vec(I32, 16))
    low16 = _splat(I32, 16, 0xFFFF)
    sc16 = builder.and_(sc, low16)
    neg32 = builder.and_(builder.mul(sc, _splat(I32, 16, -32)), low16)
    b = builder.sext(_load(builder, ps, _vec(I16, 16)), _vec(I32, 16))
    tot = _dpwssd(builder, _zero16(builder), b, neg32)  # -32 * sum_g sc_g * bsum_g
    for n in range(2):
        ql = _load(builder, pw, _vec(I8, 64), 64 * n)
        qh32 = _load(builder, pw, _vec(I8, 32), 128 + 32 * n)
        qh = _concat(builder, qh32, _lshr8(builder, qh32, 2))
        lo = builder.or_(_and8(builder, ql, 0x0F), builder.shl(_and8(builder, qh, 3), _splat(I8, 64, 4)))
        hi = builder.or_(_lshr8(builder, ql, 4), _and8(builder, qh, 0x30))
        p_lo = _dpbusd(builder, _zero16(builder), lo, _load(builder, px, _vec(I8, 64), 128 * n))
        p_hi = _dpbusd(builder, _zero16(builder), hi, _load(builder, px, _vec(I8, 64), 128 * n + 64))
        tot = _dpwssd(builder, tot, p_lo, _pick(builder, sc16, [8 * n + i // 4 for i in range(16)]))
        tot = _dpwssd(builder, tot, p_hi, _pick(builder, sc16, [8 * n + 4 + i // 4 for i in range(16)]))
    return [(tot, builder.fmul(_half(builder, pw, 208), _load(builder, pd, F32)))]


@intrinsic
def q6k_row_dot(typingctx, w, wo, x, xo, s, so, xd, do, nb):
    """Q6_K weight row x Q8_K activation row -> float32."""
    return _row_signature(w, wo, x, xo, s, so, xd, do, nb), _row_codegen(_q6k_block, (16,), 210, 256, 16, 1)


q6k_rows_dot = _rows_intrinsic(_q6k_block, (16,), 210, 256, 16, 1, "Q6_K row x R Q8_K rows -> R float32.")


# ---------------------------------------------------------------------------------------------
# Q2_K: 84 bytes = scales[16] (low nibble scale, high nibble min) | qs[64] | d f16 | dmin f16.
# Value 128n + 32j + i (i < 32) = qs[32n + i] >> 2j & 3, in 16-group 8n + 2j + i / 16:
# weight = d * (sc & 15) * q - dmin * (sc >> 4). Chunk n, shifts 2j: 32 values in x order.
# ---------------------------------------------------------------------------------------------

def _q2k_block(builder, pw, px, ps, pd):
    sc = _load(builder, pw, _vec(I8, 16), 0)
    scales = builder.bitcast(_byte_lanes(builder, _and8(builder, sc, 0x0F), list(range(16)), 4), _vec(I32, 16))
    mins = builder.bitcast(_byte_lanes(builder, _lshr8(builder, sc, 4), list(range(16)), 4), _vec(I32, 16))
    b = builder.sext(_load(builder, ps, _vec(I16, 16)), _vec(I32, 16))
    tot = _zero16(builder)
    for n in range(2):
        q32 = _load(builder, pw, _vec(I8, 32), 16 + 32 * n)
        q = _concat(builder, q32, _lshr8(builder, q32, 2))  # x[128n:+64] pairs with shifts 0 | 2
        for k in range(2):  # k = 1: shifts 4 | 6, x[128n+64:+64]
            v = _and8(builder, _lshr8(builder, q, 4 * k) if k else q, 3)
            p = _dpbusd(builder, _zero16(builder), v, _load(builder, px, _vec(I8, 64), 128 * n + 64 * k))
            tot = _dpwssd(builder, tot, p, _pick(builder, scales, [8 * n + 4 * k + i // 4 for i in range(16)]))
    mterm = _dpwssd(builder, _zero16(builder), b, mins)
    dx = _load(builder, pd, F32)
    neg_dmin = builder.fsub(ir.Constant(F32, 0.0), _half(builder, pw, 82))
    return [(tot, builder.fmul(_half(builder, pw, 80), dx)), (mterm, builder.fmul(neg_dmin, dx))]


@intrinsic
def q2k_row_dot(typingctx, w, wo, x, xo, s, so, xd, do, nb):
    """Q2_K weight row x Q8_K activation row -> float32."""
    return _row_signature(w, wo, x, xo, s, so, xd, do, nb), _row_codegen(_q2k_block, (16, 16), 84, 256, 16, 1)


# ---------------------------------------------------------------------------------------------
# Q3_K: 110 bytes = hmask[32] | qs[64] | scales[12] (16 x 6-bit) | d f16. Value 128n + 32j + i =
# (qs[32n + i] >> 2j & 3) + 4 * (hmask[i] >> (4n + j) & 1) - 4, group g = 8n + 2j + i / 16:
# weight = d * (scale_g - 32) * value. scale_g = (s[g % 8] >> 4 (g / 8) & 15) | (s[8 + g % 4]
# >> 2 (g / 4) & 3) << 4. The -4 is applied through the Q8_K bsums.
# ---------------------------------------------------------------------------------------------

def _q3k_scales(builder, pw):  # -> <16 x i32> scale_g - 32
    s = _load(builder, pw, _vec(I8, 16), 96)  # 12 scale bytes (and d, unused)
    c = lambda *k: ir.Constant(_vec(I32, 16), list(k))
    low = builder.bitcast(_byte_lanes(builder, s, [g % 8 for g in range(16)], 4), _vec(I32, 16))
    high = builder.bitcast(_byte_lanes(builder, s, [8 + g % 4 for g in range(16)], 4), _vec(I32, 16))
    low = builder.and_(builder.lshr(low, c(*[4 * (g // 8) for g in range(16)])), c(*[15] * 16))
    high = builder.and_(builder.lshr(high, c(*[2 * (g // 4) for g in range(16)])), c(*[3] * 16))
    return builder.sub(builder.or_(low, builder.shl(high, c(*[4] * 16))), c(*[32] * 16))


def _q3k_block(builder, pw, px, ps, pd):
    low16 = _splat(I32, 16, 0xFFFF)
    sc = _q3k_scales(builder, pw)
    sc16 = builder.and_(sc, low16)
    b = builder.sext(_load(builder, ps, _vec(I16, 16)), _vec(I32, 16))
    tot = _dpwssd(builder, _zero16(builder), b, builder.and_(builder.mul(sc, _splat(I32, 16, -4)), low16))
    hm32 = _load(builder, pw, _vec(I8, 32), 0)
    for n in range(2):
        q32 = _load(builder, pw, _vec(I8, 32), 32 + 32 * n)
        q = _concat(builder, q32, _lshr8(builder, q32, 2))     # shifts 2j | 2j + 2
        hm = _lshr8(builder, _concat(builder, hm32, _lshr8(builder, hm32, 1)), 4 * n)  # bits 4n+j | 4n+j+1
        for k in range(2):  # j = 2k and 2k + 1
            low = _and8(builder, _lshr8(builder, q, 4 * k) if k else q, 3)
            high = builder.shl(_and8(builder, _lshr8(builder, hm, 2 * k) if k else hm, 1), _splat(I8, 64, 2))
            p = _dpbusd(builder, _zero16(builder), builder.or_(low, high),
                        _load(builder, px, _vec(I8, 64), 128 * n + 64 * k))
            tot = _dpwssd(builder, tot, p, _pick(builder, sc16, [8 * n + 4 * k + i // 4 for i in range(16)]))
    return [(tot, builder.fmul(_half(builder, pw, 108), _load(builder, pd, F32)))]


@intrinsic
def q3k_row_dot(typingctx, w, wo, x, xo, s, so, xd, do, nb):
    """Q3_K weight row x Q8_K activation row -> float32."""
    return _row_signature(w, wo, x, xo, s, so, xd, do, nb), _row_codegen(_q3k_block, (16,), 110, 256, 16, 1)


# ---------------------------------------------------------------------------------------------
# Q8_0: 34 bytes = d f16 | qs[32] int8. Weights are made unsigned (w ^ 0x80 = w + 128) and the
# +128 is taken back with the activation block sums: sum (w + 128) x - 128 sum x. Two blocks
# per step (one 512-bit vpdpbusd): lanes 0-7 belong to the first block, 8-15 to the second.
# ---------------------------------------------------------------------------------------------

def _q80_pair(builder, pw, px, ps, pd):
    q = _concat(builder, _load(builder, pw, _vec(I8, 32), 2), _load(builder, pw, _vec(I8, 32), 36))
    q = builder.xor(q, _splat(I8, 64, -128))
    p = _dpbusd(builder, _zero16(builder), q, _load(builder, px, _vec(I8, 64)))
    s2 = ir.Constant(_vec(F32, 2), None)
    for k in range(2):
        s_k = builder.fmul(_half(builder, pw, 34 * k), _load(builder, pd, F32, 4 * k))
        s2 = builder.insert_element(s2, s_k, ir.Constant(I32, k))
    xsum = builder.sext(_load(builder, ps, _vec(I16, 2)), _vec(I32, 2))
    corr = builder.sub(ir.Constant(_vec(I32, 2), [0, 0]), builder.shl(xsum, _splat(I32, 2, 7)))
    return [(p, _pick(builder, s2, [0] * 8 + [1] * 8)), (corr, s2)]


@intrinsic
def q80_row_dot(typingctx, w, wo, x, xo, s, so, xd, do, nb):
    """Q8_0 weight row x Q8_0 activation row, nb = number of block PAIRS -> float32."""
    return _row_signature(w, wo, x, xo, s, so, xd, do, nb), _row_codegen(_q80_pair, (16, 2), 68, 64, 2, 2)


q80_rows_dot = _rows_intrinsic(_q80_pair, (16, 2), 68, 64, 2, 2, "Q8_0 row x R Q8_0 rows (block pairs).")


def _q80_quad(builder, pw, px, ps, pd):
    # four blocks per step: two vpdpbusd, and the four scales, sums and corrections as <4 x ...>
    ps_ = []
    for k in (0, 2):
        q = _concat(builder, _load(builder, pw, _vec(I8, 32), 34 * k + 2), _load(builder, pw, _vec(I8, 32), 34 * k + 36))
        q = builder.xor(q, _splat(I8, 64, -128))
        ps_.append(_dpbusd(builder, _zero16(builder), q, _load(builder, px, _vec(I8, 64), 32 * k)))
    h4 = ir.Constant(_vec(F16, 4), None)
    for k in range(4):
        h4 = builder.insert_element(h4, _load(builder, pw, F16, 34 * k), ir.Constant(I32, k))
    s4 = builder.fmul(builder.fpext(h4, _vec(F32, 4)), _load(builder, pd, _vec(F32, 4)))
    xsum = builder.sext(_load(builder, ps, _vec(I16, 4)), _vec(I32, 4))
    corr = builder.sub(ir.Constant(_vec(I32, 4), [0] * 4), builder.shl(xsum, _splat(I32, 4, 7)))
    return [(ps_[0], _pick(builder, s4, [0] * 8 + [1] * 8)), (ps_[1], _pick(builder, s4, [2] * 8 + [3] * 8)),
            (corr, s4)]


@intrinsic
def q80_quad_row_dot(typingctx, w, wo, x, xo, s, so, xd, do, nq):
    """Q8_0 weight row x Q8_0 activation row, nq = number of block QUADS -> float32 (per step one
    vector of the four blocks' scales instead of two scalar ones per pair: fewer instructions)."""
    return _row_signature(w, wo, x, xo, s, so, xd, do, nq), _row_codegen(_q80_quad, (16, 16, 4), 136, 128, 4, 4)


q80_quad_rows_dot = _rows_intrinsic(_q80_quad, (16, 16, 4), 136, 128, 4, 4, "Q8_0 row x R Q8_0 rows (block quads).")
