"""Row kernels of the compiled step: activation quantization into scratch rows, one row dot
product for any matrix of the weight table, and `run_jobs`, the one parallel region that every
projection goes through.

A job is (matrix, expert, p0, p1, y_col): for every row r of the matrix (of that expert) and
every pair p in [p0, p1): Y[p, y_col + r] = W[r] . act[act_row[p]]. The rows of all jobs of a
call are cut into contiguous chunks of about equal cost (rows x (2 + pairs)), so each thread
streams contiguous weight bytes and the pairs of a job reuse each row from L1; for the quantized
kinds of Q4_K_M files (Q4_K, Q5_K, Q6_K, Q8_0) the pairs go 8, 4, then 2 at a time through
`rows_dot`, which reads and unpacks each weight block once for all of them (the batched step's
saving: 2-3x less work per pair, measured in docs/benchmarks.md). Each (row, pair) product is computed the same way whatever else is in the
call, alone or in a group: a token's arithmetic does not depend on its batch.

Activation scratch (rows of a fixed width W, the widest input):
    kq, kn  int8 [rows, W]      Q8_K values, and the same in the Q4_K/Q5_K nibble order
    kd      f32  [rows, W/256]  Q8_K scales;  ks int16 [rows, W/16] bsums
    zq      int8 [rows, W]      Q8_0 values;  zd f32 [rows, W/32] (fp16-rounded); zs int16 sums
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange
from numba.extending import overload

from hybrid_runtime.quant.numba_cache import use_versioned_cache_dir

use_versioned_cache_dir()

from hybrid_runtime.quant import vnni  # noqa: E402
from hybrid_runtime.quant.floatbits import f16_round  # noqa: E402
from hybrid_runtime.quant.kernels import (K_Q2_K, K_Q3_K, K_Q4_K, K_Q5_K, K_Q6_K, K_Q8_0,  # noqa: E402
                                          q80_block_dot, q80_pairs_dot)
from hybrid_runtime.quant.panels import P_Q4_K, P_Q8_0, ROWS, stored_through  # noqa: E402
from hybrid_runtime.cpu.table import K_F32, M_COLS, M_ESTRIDE, M_KIND, M_NB, M_OFF, M_ROWS, M_RSTRIDE  # noqa: E402

ACT_NONE, ACT_Q8_K, ACT_Q8_0 = 0, 1, 2


@numba.njit(cache=True, inline="always")
def act_kind(kind):
    if kind == K_F32:
        return ACT_NONE
    return ACT_Q8_0 if kind == K_Q8_0 or kind == P_Q8_0 else ACT_Q8_K


@numba.njit(cache=True, nogil=True, fastmath=True)
def _absmax(x):  # max |x[i]| (fastmath so that the reduction vectorizes; no NaNs expected)
    m = np.float32(0.0)
    for i in range(x.shape[0]):
        m = max(m, abs(x[i]))
    return m


@numba.njit(cache=True, nogil=True)
def _q8k_block(xb, iscale, qb, sb):
    """qb[:256] = min(rint(iscale * xb), 127), sb[:16] = the sums per 16 (slices indexed from 0,
    so that LLVM vectorizes: an offset in every index kept it scalar, 23 ns a value)."""
    for j in range(256):
        qb[j] = min(np.int32(np.rint(iscale * xb[j])), np.int32(127))
    for g in range(16):
        t = np.int32(0)
        for j in range(16):
            t += np.int32(qb[16 * g + j])
        sb[g] = t


@numba.njit(cache=True, nogil=True, inline="always")
def q8k_block(xb, qb, sb):
    """One 256-block xb into Q8_K values qb and bsums sb; returns its scale d. Rounds as ggml's
    quantize_row_q8_K: the scale comes from the first value of the largest magnitude."""
    amax = _absmax(xb)
    if amax == 0:
        qb[:] = 0
        sb[:] = 0
        return np.float32(0.0)
    j = 0
    while abs(xb[j]) != amax:
        j += 1
    iscale = np.float32(-127.0) / xb[j]
    _q8k_block(xb, iscale, qb, sb)
    return np.float32(1.0) / iscale


@numba.njit(cache=True, nogil=True)
def quantize_q8_k_row(x, n, qs, qn, d, bs, a):
    """x f32 [n] -> Q8_K row a of (qs, qn, d, bs), as q8k_block, and qn in the nibble order."""
    for b in range(n // 256):
        base = 256 * b
        qb = qs[a, base: base + 256]
        d[a, b] = q8k_block(x[base: base + 256], qb, bs[a, 16 * b: 16 * b + 16])
        for c in range(2):  # nibble order per 128: [0:32, 64:96, 32:64, 96:128]
            src, dst = qb[128 * c: 128 * c + 128], qn[a, base + 128 * c: base + 128 * c + 128]
            dst[0:32] = src[0:32]
            dst[32:64] = src[64:96]
            dst[64:96] = src[32:64]
            dst[96:128] = src[96:128]


@numba.njit(cache=True, nogil=True)
def quantize_q8_0_row(x, n, qs, d, s, a):
    """x f32 [n] -> Q8_0 row a of (qs, d, s): d = fp16(amax / 127), q = rint(x * 127 / amax)."""
    for b in range(n // 32):
        base = 32 * b
        xb, qb = x[base: base + 32], qs[a, base: base + 32]  # slices from 0: the loops vectorize
        amax = _absmax(xb)
        inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        t = np.int32(0)
        for j in range(32):
            q = np.int32(np.rint(xb[j] * inv))
            qb[j] = q
            t += q
        s[a, b] = t
        d[a, b] = f16_round(amax / np.float32(127.0))


@numba.njit(cache=True, nogil=True, inline="always")
def quantize_row(x, n, need, kq, kn, kd, ks, zq, zd, zs, a):
    """Quantize x [n] into row a of the Q8_K and/or Q8_0 scratch (need: bit 1 Q8_K, bit 2 Q8_0)."""
    if need & 1 and n % 256 == 0:
        quantize_q8_k_row(x, n, kq, kn, kd, ks, a)
    if need & 2:
        quantize_q8_0_row(x, n, zq, zd, zs, a)


SERIAL_VALUES = 4096  # a quantization of fewer values runs on the calling thread: a parallel region
# costs more than it saves there (decode's one row of hidden 2048; every row of the tiny models)


@numba.njit(cache=True, nogil=True, parallel=True)
def _quantize_rows_par(X, n_rows, n, need, kq, kn, kd, ks, zq, zd, zs):
    for a in prange(n_rows):
        quantize_row(X[a], n, need, kq, kn, kd, ks, zq, zd, zs, a)


@numba.njit(cache=True, nogil=True)
def quantize_rows(X, n_rows, n, need, kq, kn, kd, ks, zq, zd, zs):
    """Rows 0..n_rows of X [rows, >= n] into the same rows of the scratch (each row the same bits
    whichever thread quantizes it)."""
    if n_rows * n < SERIAL_VALUES:
        for a in range(n_rows):
            quantize_row(X[a], n, need, kq, kn, kd, ks, zq, zd, zs, a)
    else:
        _quantize_rows_par(X, n_rows, n, need, kq, kn, kd, ks, zq, zd, zs)


def need_of(*kinds) -> int:
    need = 0
    for k in kinds:
        need |= 2 if k in (K_Q8_0, P_Q8_0) else (0 if k == K_F32 else 1)
    return need


@numba.njit(cache=True, nogil=True, inline="always")
def need_for(mats, m):
    k = mats[m, M_KIND]
    if k == K_F32:
        return 0
    return 2 if k == K_Q8_0 or k == P_Q8_0 else 1


@numba.njit(cache=True, nogil=True, fastmath=True)
def float_dot(w, wo, x, n):  # w: a byte array holding float32 at byte offset wo; x f32 [>= n]
    wf = w[wo: wo + 4 * n].view(np.float32)
    acc = np.float32(0.0)
    for i in range(n):
        acc += wf[i] * x[i]
    return acc


@numba.njit(cache=True, nogil=True, inline="always")
def row_dot(kind, nb, cols, w, wo, X, kq, kn, kd, ks, zq, zd, zs, a):
    """One weight row (raw blocks at byte wo of w) . activation row a -> float32."""
    if kind == K_Q4_K:
        return vnni.q4k_row_dot(w, wo, kn, a * kn.shape[1], ks, a * ks.shape[1], kd, a * kd.shape[1], nb)
    if kind == K_Q6_K:
        return vnni.q6k_row_dot(w, wo, kq, a * kq.shape[1], ks, a * ks.shape[1], kd, a * kd.shape[1], nb)
    if kind == K_Q5_K:
        return vnni.q5k_row_dot(w, wo, kn, a * kn.shape[1], ks, a * ks.shape[1], kd, a * kd.shape[1], nb)
    if kind == K_Q2_K:
        return vnni.q2k_row_dot(w, wo, kq, a * kq.shape[1], ks, a * ks.shape[1], kd, a * kd.shape[1], nb)
    if kind == K_Q3_K:
        return vnni.q3k_row_dot(w, wo, kq, a * kq.shape[1], ks, a * ks.shape[1], kd, a * kd.shape[1], nb)
    if kind == K_Q8_0:
        v = q80_pairs_dot(w, wo, zq, a * zq.shape[1], zs, a * zs.shape[1], zd, a * zd.shape[1], nb // 2)
        if nb % 2:
            last = nb - 1
            v += q80_block_dot(w, wo + 34 * last, zq[a], 32 * last, zd[a], zs[a], last)
        return v
    return float_dot(w, wo, X[a], cols)


def _tmul(t, k):  # (t[0] * k, t[1] * k, ...)
    raise NotImplementedError


def _tadd(t, k):  # (t[0] + k, ...)
    raise NotImplementedError


def _tsum(a, b):  # (a[0] + b[0], ...)
    raise NotImplementedError


def _q80_last(w, wo, zq, zd, zs, a, last):  # the odd last Q8_0 block of the row, per activation row
    raise NotImplementedError


@overload(_tmul, inline="always")
def _ov_tmul(t, k):
    if t.count == 2:
        return lambda t, k: (t[0] * k, t[1] * k)
    if t.count == 4:
        return lambda t, k: (t[0] * k, t[1] * k, t[2] * k, t[3] * k)
    if t.count == 8:
        return lambda t, k: (t[0] * k, t[1] * k, t[2] * k, t[3] * k, t[4] * k, t[5] * k, t[6] * k, t[7] * k)


@overload(_tadd, inline="always")
def _ov_tadd(t, k):
    if t.count == 2:
        return lambda t, k: (t[0] + k, t[1] + k)
    if t.count == 4:
        return lambda t, k: (t[0] + k, t[1] + k, t[2] + k, t[3] + k)
    if t.count == 8:
        return lambda t, k: (t[0] + k, t[1] + k, t[2] + k, t[3] + k, t[4] + k, t[5] + k, t[6] + k, t[7] + k)


@overload(_tsum, inline="always")
def _ov_tsum(a, b):
    if a.count == 2:
        return lambda a, b: (a[0] + b[0], a[1] + b[1])
    if a.count == 4:
        return lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3])
    if a.count == 8:
        return lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2], a[3] + b[3], a[4] + b[4], a[5] + b[5], a[6] + b[6], a[7] + b[7])


@overload(_q80_last, inline="always")
def _ov_q80_last(w, wo, zq, zd, zs, a, last):
    def one(w, wo, zq, zd, zs, r, last):
        return q80_block_dot(w, wo, zq[r], 32 * last, zd[r], zs[r], last)

    one = numba.njit(inline="always")(one)
    if a.count == 2:
        return lambda w, wo, zq, zd, zs, a, last: (one(w, wo, zq, zd, zs, a[0], last), one(w, wo, zq, zd, zs, a[1], last))
    if a.count == 4:
        return lambda w, wo, zq, zd, zs, a, last: (one(w, wo, zq, zd, zs, a[0], last), one(w, wo, zq, zd, zs, a[1], last),
                                                   one(w, wo, zq, zd, zs, a[2], last), one(w, wo, zq, zd, zs, a[3], last))
    if a.count == 8:
        return lambda w, wo, zq, zd, zs, a, last: (one(w, wo, zq, zd, zs, a[0], last), one(w, wo, zq, zd, zs, a[1], last), one(w, wo, zq, zd, zs, a[2], last), one(w, wo, zq, zd, zs, a[3], last), one(w, wo, zq, zd, zs, a[4], last), one(w, wo, zq, zd, zs, a[5], last), one(w, wo, zq, zd, zs, a[6], last), one(w, wo, zq, zd, zs, a[7], last))


@numba.njit(cache=True, nogil=True, inline="always")
def multi_kind(kind):
    return kind == K_Q4_K or kind == K_Q5_K or kind == K_Q6_K or kind == K_Q8_0


@numba.njit(cache=True, nogil=True, inline="always")
def rows_dot(kind, nb, w, wo, kq, kn, kd, ks, zq, zd, zs, a):
    """One weight row . the activation rows of the tuple a (2, 4 or 8 of them; multi_kind(kind)):
    the weight blocks are unpacked once for all, and each value is bit-identical to row_dot's
    for that row alone (the same block order and the same operations per row)."""
    if kind == K_Q8_0:
        xo, so, do = _tmul(a, zq.shape[1]), _tmul(a, zs.shape[1]), _tmul(a, zd.shape[1])
        n_pairs = nb // 2
        nq = n_pairs // 2
        v = vnni.q80_quad_rows_dot(w, wo, zq, xo, zs, so, zd, do, nq)
        if n_pairs % 2:
            v = _tsum(v, vnni.q80_rows_dot(w, wo + 136 * nq, zq, _tadd(xo, 128 * nq), zs, _tadd(so, 4 * nq), zd,
                                           _tadd(do, 4 * nq), 1))
        if nb % 2:
            v = _tsum(v, _q80_last(w, wo + 34 * (nb - 1), zq, zd, zs, a, nb - 1))
        return v
    xo, so, do = _tmul(a, kn.shape[1]), _tmul(a, ks.shape[1]), _tmul(a, kd.shape[1])
    if kind == K_Q4_K:
        return vnni.q4k_rows_dot(w, wo, kn, xo, ks, so, kd, do, nb)
    if kind == K_Q5_K:
        return vnni.q5k_rows_dot(w, wo, kn, xo, ks, so, kd, do, nb)
    return vnni.q6k_rows_dot(w, wo, kq, xo, ks, so, kd, do, nb)


@numba.njit(cache=True, nogil=True, inline="always")
def is_panel(kind):  # stored panels (quant/panels.py): 16 rows at a time, lanes = rows
    return kind >= P_Q4_K


ROW_COST = 2  # the cost of streaming one weight row, in units of one (row, pair) product


@numba.njit(cache=True, nogil=True, inline="always")
def _job_cost(mats, jobs, j):  # a job's rows x (ROW_COST + its pairs)
    return mats[jobs[j, 0], M_ROWS] * (ROW_COST + jobs[j, 3] - jobs[j, 2])


@numba.njit(cache=True, nogil=True, inline="always")
def _boundary(mats, jobs, n_jobs, target):
    """The row (counted over all the jobs' rows) where the cost `target` is reached, moved down to
    the first row of its panel where it falls inside a stored-panel matrix (every thread then
    works on whole panels). Cost rather than rows: the experts of a batched step have different
    numbers of tokens, and a split by rows gave one thread more products than the other."""
    j, base, acc = 0, 0, 0
    while j < n_jobs and acc + _job_cost(mats, jobs, j) <= target:
        acc += _job_cost(mats, jobs, j)
        base += mats[jobs[j, 0], M_ROWS]
        j += 1
    if j == n_jobs:
        return base
    pos = base + (target - acc) // (ROW_COST + jobs[j, 3] - jobs[j, 2])
    if is_panel(mats[jobs[j, 0], M_KIND]):
        return base + (pos - base) // ROWS * ROWS
    return pos


SERIAL_WORK = 1 << 17  # the default of run_jobs' serial_work (CompiledDeepSeek2 sets it per step): a
# call whose work (weight bytes x (ROW_COST + pairs) / ROW_COST, _work) is below it runs on the
# calling thread, where a parallel region's fork and join (~1.5-3 us on 2 threads) costs more
# than the second thread saves (the tiny models' 256-wide rows; docs/benchmarks.md). The bits do
# not change: a chunk computes each row as any other would.


@numba.njit(cache=True, nogil=True, inline="always")
def _row_bytes(mats, m):
    b = mats[m, M_RSTRIDE]
    return b // ROWS if is_panel(mats[m, M_KIND]) else b


@numba.njit(cache=True, nogil=True)
def _work(mats, jobs, n_jobs):
    """The bytes a call streams, each row counted (ROW_COST + its pairs) / ROW_COST times."""
    t = 0
    for j in range(n_jobs):
        m = jobs[j, 0]
        t += mats[m, M_ROWS] * _row_bytes(mats, m) * (ROW_COST + jobs[j, 3] - jobs[j, 2])
    return t // ROW_COST


@numba.njit(cache=True, nogil=True)
def run_jobs(space, mats, jobs, n_jobs, X, kq, kn, kd, ks, zq, zd, zs, act_row, Y, n_chunks, serial_work, wp):
    """Every job's rows x pairs (see the module docstring); X f32 [act rows, W] for float weights.
    A stored-panel matrix goes 16 rows at a time, all its pairs in tiles of tokens (wp: per-thread
    scratch of gemm.scratch_panels, indexed by Numba's thread id). One parallel region of n_chunks
    chunks of equal cost, or (n_chunks 1, or less work than serial_work) one span on the calling
    thread."""
    total, rows = 0, 0
    for j in range(n_jobs):
        total += _job_cost(mats, jobs, j)
        rows += mats[jobs[j, 0], M_ROWS]
    n_chunks = max(1, min(n_chunks, rows))
    if n_chunks == 1 or _work(mats, jobs, n_jobs) < serial_work:
        _run_span(space, mats, jobs, n_jobs, X, kq, kn, kd, ks, zq, zd, zs, act_row, Y, 0, rows,
                  wp[numba.get_thread_id()])
    else:
        _run_chunks(space, mats, jobs, n_jobs, X, kq, kn, kd, ks, zq, zd, zs, act_row, Y, n_chunks, total, wp)


@numba.njit(cache=True, nogil=True, parallel=True)
def _run_chunks(space, mats, jobs, n_jobs, X, kq, kn, kd, ks, zq, zd, zs, act_row, Y, n_chunks, total, wp):
    for c in prange(n_chunks):
        start = _boundary(mats, jobs, n_jobs, total * c // n_chunks)
        stop = _boundary(mats, jobs, n_jobs, total * (c + 1) // n_chunks)
        if start < stop:
            _run_span(space, mats, jobs, n_jobs, X, kq, kn, kd, ks, zq, zd, zs, act_row, Y, start, stop,
                      wp[numba.get_thread_id()])


@numba.njit(cache=True, nogil=True)
def _run_span(space, mats, jobs, n_jobs, X, kq, kn, kd, ks, zq, zd, zs, act_row, Y, start, stop, wpt):
    """Rows start..stop-1, counted over all the jobs' rows (wpt: this thread's panel scratch)."""
    j, base = 0, 0
    while base + mats[jobs[j, 0], M_ROWS] <= start:
        base += mats[jobs[j, 0], M_ROWS]
        j += 1
    r = start - base
    pos = start
    while pos < stop:
        m = jobs[j, 0]
        kind, nb, cols = mats[m, M_KIND], mats[m, M_NB], mats[m, M_COLS]
        col = jobs[j, 4] + r
        p, p1 = jobs[j, 2], jobs[j, 3]
        if is_panel(kind):  # rows r .. r + 15: panel r // 16, M_RSTRIDE bytes a panel
            wo = mats[m, M_OFF] + jobs[j, 1] * mats[m, M_ESTRIDE] + (r // ROWS) * mats[m, M_RSTRIDE]
            q8 = kind == P_Q8_0
            xa, sa, da = (zq, zs, zd) if q8 else (kq, ks, kd)
            stored_through(kind, space[wo:], nb, xa, sa, da, act_row, p, p1, Y, col, wpt)
            r += ROWS
            pos += ROWS
        else:
            wo = mats[m, M_OFF] + jobs[j, 1] * mats[m, M_ESTRIDE] + r * mats[m, M_RSTRIDE]
            if multi_kind(kind):  # the row's blocks unpacked once for 8, 4, then 2 pairs
                while p + 8 <= p1:
                    y8 = rows_dot(kind, nb, space, wo, kq, kn, kd, ks, zq, zd, zs,
                                  (act_row[p], act_row[p + 1], act_row[p + 2], act_row[p + 3],
                                   act_row[p + 4], act_row[p + 5], act_row[p + 6], act_row[p + 7]))
                    for i in range(8):
                        Y[p + i, col] = y8[i]
                    p += 8
                if p + 4 <= p1:
                    y = rows_dot(kind, nb, space, wo, kq, kn, kd, ks, zq, zd, zs,
                                 (act_row[p], act_row[p + 1], act_row[p + 2], act_row[p + 3]))
                    Y[p, col], Y[p + 1, col], Y[p + 2, col], Y[p + 3, col] = y[0], y[1], y[2], y[3]
                    p += 4
                if p + 2 <= p1:
                    y2 = rows_dot(kind, nb, space, wo, kq, kn, kd, ks, zq, zd, zs, (act_row[p], act_row[p + 1]))
                    Y[p, col], Y[p + 1, col] = y2[0], y2[1]
                    p += 2
            while p < p1:
                Y[p, col] = row_dot(kind, nb, cols, space, wo, X, kq, kn, kd, ks, zq, zd, zs, act_row[p])
                p += 1
            r += 1
            pos += 1
        if r == mats[m, M_ROWS]:
            r = 0
            j += 1
