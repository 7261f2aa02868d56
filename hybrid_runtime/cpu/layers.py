"""One deepseek2 layer for T new tokens, compiled: MLA attention against the paged latent cache,
then the MoE block (router, top-k, routed experts, shared expert) or the dense FFN.

Shape legend: T new tokens, D hidden, H heads, N nope dims, R rope dims, V value dims, C latent
(kv_lora), QL q_lora, E experts, K experts used, P = T*K pairs, F expert FFN, FS shared FFN.

Weights `w` (namedtuple): space (the byte span the weights live in), mats, vecs, va (vector arena), layers.
Dims `dm` (int64) and `fd` (float64) as indexed by the D_* / FD_* names; scratch `s` (namedtuple,
see step.Scratch). Everything runs on preallocated buffers: no allocation per token.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from hybrid_runtime.quant.floatbits import f32_bits
from hybrid_runtime.cpu.rows import is_panel, need_for, quantize_row, quantize_rows, row_dot, run_jobs
from hybrid_runtime.quant.panels import P_Q8_0, ROWS, stored_through
from hybrid_runtime.cpu.table import (F_ATTN_NORM, F_BIAS, F_DOWN, F_DOWN_X, F_FFN_NORM, F_GATE,
                                      F_GATE_X, F_K_B, F_KV_A, F_KV_A_NORM, F_MOE, F_O, F_Q_A,
                                      F_Q_A_NORM, F_Q_B, F_ROUTER, F_UP, F_UP_X, F_V_B, K_F32,
                                      M_ESTRIDE, M_KIND, M_NB, M_OFF, M_ROWS, M_RSTRIDE)

(D_D, D_H, D_N, D_R, D_V, D_C, D_QL, D_E, D_K, D_NG, D_NGU, D_GATING, D_WNORM, D_BS, D_CHUNKS,
 D_LMAX, D_HG, D_SERIAL) = range(18)
FD_EPS, FD_SCALE, FD_WSCALE = range(3)
N_DIMS, N_FDIMS = 18, 3


@numba.njit(cache=True, nogil=True, fastmath=True)
def dot(a, ao, b, bo, n):
    """sum a[ao + i] * b[bo + i] for i < n in float32, vectorized (a fixed order for given n)."""
    acc = np.float32(0.0)
    for i in range(n):
        acc += a[ao + i] * b[bo + i]
    return acc


@numba.njit(cache=True, nogil=True, inline="always")
def rms_norm(x, n, w, wo, eps, out):
    """out[:n] = x[:n] / rms(x[:n]) * va[wo: wo + n] (float32 throughout, as the torch model)."""
    ss = dot(x, 0, x, 0, n)
    r = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(n) + np.float32(eps)))
    wv = w[wo: wo + n]  # a slice indexed from 0: an offset in every index keeps LLVM from vectorizing
    for i in range(n):
        out[i] = x[i] * r * wv[i]


@numba.njit(cache=True, nogil=True, inline="always")
def rope(x, o, n, cos, sin, p):
    """Rotate adjacent pairs of x[o: o + n] by position p (llama.cpp NORM mode)."""
    for i in range(n // 2):
        c, sn = cos[p, i], sin[p, i]
        x0, x1 = x[o + 2 * i], x[o + 2 * i + 1]
        x[o + 2 * i] = x0 * c - x1 * sn
        x[o + 2 * i + 1] = x0 * sn + x1 * c


@numba.njit(cache=True, nogil=True)
def project(w, jobs, n_jobs, a, act_row, Y, n_chunks, serial_work):
    run_jobs(w.space, w.mats, jobs, n_jobs, a.X, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs, act_row, Y, n_chunks,
             serial_work, w.wp)


@numba.njit(cache=True, nogil=True, inline="always")
def set_job(jobs, j, m, e, p0, p1, col):
    jobs[j, 0], jobs[j, 1], jobs[j, 2], jobs[j, 3], jobs[j, 4] = m, e, p0, p1, col


@numba.njit(cache=True, nogil=True)
def norm_and_quantize(w, x, T, n, vec, need, a, eps):
    """a.X[t] = rms_norm(x[t]) for t < T, quantized into the scratch rows (need: see quantize_row)."""
    wo = w.vecs[vec, 0]
    for t in range(T):
        rms_norm(x[t], n, w.va, wo, eps, a.X[t])
    if need:
        quantize_rows(a.X, T, n, need, a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)


@numba.njit(cache=True, nogil=True, inline="always")
def cache_row(btab, t, j, bs):
    return btab[t, j // bs] * bs + j % bs


HT = 8  # heads per register tile of the attention core (a head group is padded to a multiple)


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def exp_neg(x):
    """e**x for x <= 0 in float32 (relative error ~1e-7; 0 below -87), written so that LLVM
    vectorizes a loop over it (there is no vector exp without SVML)."""
    x = max(x, np.float32(-87.0))
    k = np.rint(x * np.float32(1.4426950408889634))
    f = x - k * np.float32(0.693145751953125) - k * np.float32(1.428606765330187e-06)
    p = np.float32(1.0 / 5040.0)
    p = p * f + np.float32(1.0 / 720.0)
    p = p * f + np.float32(1.0 / 120.0)
    p = p * f + np.float32(1.0 / 24.0)
    p = p * f + np.float32(1.0 / 6.0)
    p = p * f + np.float32(0.5)
    p = p * f + np.float32(1.0)
    p = p * f + np.float32(1.0)
    return p * f32_bits(np.int32((np.int32(k) + 127) << 23))


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def dot_tile(q, stride, row, n, out):
    """out[i] += q[i*stride : +n] . row[:n] for the HT heads i of a tile: one pass over the cache
    row serves all of them (each head its own accumulator: the same arithmetic for every head).
    q starts at the tile (a slice): an offset added to every index keeps LLVM from vectorizing."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    for c in range(n):
        x = row[c]
        a0 += q[c] * x
        a1 += q[stride + c] * x
        a2 += q[2 * stride + c] * x
        a3 += q[3 * stride + c] * x
        a4 += q[4 * stride + c] * x
        a5 += q[5 * stride + c] * x
        a6 += q[6 * stride + c] * x
        a7 += q[7 * stride + c] * x
    out[0] += a0
    out[1] += a1
    out[2] += a2
    out[3] += a3
    out[4] += a4
    out[5] += a5
    out[6] += a6
    out[7] += a7


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def axpy_tile(o, i0, p, row, n):
    """o[i0 + i, :n] += p[i] * row[:n] for the HT heads of a tile (one pass over the cache row)."""
    p0, p1, p2, p3, p4, p5, p6, p7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    for c in range(n):
        x = row[c]
        o[i0, c] += p0 * x
        o[i0 + 1, c] += p1 * x
        o[i0 + 2, c] += p2 * x
        o[i0 + 3, c] += p3 * x
        o[i0 + 4, c] += p4 * x
        o[i0 + 5, c] += p5 * x
        o[i0 + 6, c] += p6 * x
        o[i0 + 7, c] += p7 * x


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def dot_tile2(q, stride, r0, r1, n, out):
    """out[i] += q_i . r0[:n] and out[HT + i] += q_i . r1[:n] for the HT heads i of a tile: two
    cache rows per pass, so each load of q feeds two accumulators (16 in all)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
    b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = np.float32(0.0)
    for c in range(n):
        x, y = r0[c], r1[c]
        q0, q1, q2, q3 = q[c], q[stride + c], q[2 * stride + c], q[3 * stride + c]
        q4, q5, q6, q7 = q[4 * stride + c], q[5 * stride + c], q[6 * stride + c], q[7 * stride + c]
        a0 += q0 * x
        b0 += q0 * y
        a1 += q1 * x
        b1 += q1 * y
        a2 += q2 * x
        b2 += q2 * y
        a3 += q3 * x
        b3 += q3 * y
        a4 += q4 * x
        b4 += q4 * y
        a5 += q5 * x
        b5 += q5 * y
        a6 += q6 * x
        b6 += q6 * y
        a7 += q7 * x
        b7 += q7 * y
    out[0] += a0
    out[1] += a1
    out[2] += a2
    out[3] += a3
    out[4] += a4
    out[5] += a5
    out[6] += a6
    out[7] += a7
    out[8] += b0
    out[9] += b1
    out[10] += b2
    out[11] += b3
    out[12] += b4
    out[13] += b5
    out[14] += b6
    out[15] += b7


@numba.njit(cache=True, nogil=True, fastmath=True, inline="always")
def axpy_tile4(o, i0, p, r0, r1, r2, r3, n):
    """o[i0 + i, :n] += p[i] r0 + p[HT + i] r1 + p[2HT + i] r2 + p[3HT + i] r3 for the HT heads of a
    tile: four cache rows per pass over o (a quarter of axpy_tile's loads and stores of o)."""
    (a0, a1, a2, a3, a4, a5, a6, a7) = (p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7])
    (b0, b1, b2, b3, b4, b5, b6, b7) = (p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15])
    (c0, c1, c2, c3, c4, c5, c6, c7) = (p[16], p[17], p[18], p[19], p[20], p[21], p[22], p[23])
    (d0, d1, d2, d3, d4, d5, d6, d7) = (p[24], p[25], p[26], p[27], p[28], p[29], p[30], p[31])
    for c in range(n):
        w, x, y, z = r0[c], r1[c], r2[c], r3[c]
        o[i0, c] += a0 * w + b0 * x + c0 * y + d0 * z
        o[i0 + 1, c] += a1 * w + b1 * x + c1 * y + d1 * z
        o[i0 + 2, c] += a2 * w + b2 * x + c2 * y + d2 * z
        o[i0 + 3, c] += a3 * w + b3 * x + c3 * y + d3 * z
        o[i0 + 4, c] += a4 * w + b4 * x + c4 * y + d4 * z
        o[i0 + 5, c] += a5 * w + b5 * x + c5 * y + d5 * z
        o[i0 + 6, c] += a6 * w + b6 * x + c6 * y + d6 * z
        o[i0 + 7, c] += a7 * w + b7 * x + c7 * y + d7 * z


@numba.njit(cache=True, nogil=True, fastmath=True)
def tile_scores(qa, qp, i0, C, R, lat, pe, btab, t, bs, L, scale, sc, LM, mx, acc):
    """sc[(i0+i)*LM + j] = scale * (q_abs . c_j + q_pe . pe_j) for the tile's heads, j < L; mx = max.
    Positions go in pairs (dot_tile2), an odd last one alone; which positions pair up depends only
    on j, so a token's scores do not depend on its batch. (fastmath in its own function: an inlined
    body takes its caller's flags.) acc: scratch [>= 2 HT]."""
    qa_t, qp_t = qa[i0 * C:], qp[i0 * R:]
    j = 0
    while j + 1 < L:
        row0, row1 = cache_row(btab, t, j, bs), cache_row(btab, t, j + 1, bs)
        acc[:2 * HT] = 0.0
        dot_tile2(qa_t, C, lat[row0], lat[row1], C, acc)
        dot_tile2(qp_t, R, pe[row0], pe[row1], R, acc)
        for i in range(HT):
            v0, v1 = acc[i] * scale, acc[HT + i] * scale
            sc[(i0 + i) * LM + j] = v0
            sc[(i0 + i) * LM + j + 1] = v1
            mx[i0 + i] = max(mx[i0 + i], max(v0, v1))
        j += 2
    if j < L:
        row = cache_row(btab, t, j, bs)
        acc[:HT] = 0.0
        dot_tile(qa_t, C, lat[row], C, acc)
        dot_tile(qp_t, R, pe[row], R, acc)
        for i in range(HT):
            v = acc[i] * scale
            sc[(i0 + i) * LM + j] = v
            mx[i0 + i] = max(mx[i0 + i], v)


@numba.njit(cache=True, nogil=True, fastmath=True)
def softmax_rows(sc, n, LM, L, mx):
    """Rows i < n of sc (stride LM, length L) -> exp(v - mx[i]); mx[i] -> 1 / the row's sum."""
    for i in range(n):
        m, tot = mx[i], np.float32(0.0)
        for j in range(L):
            e = exp_neg(sc[i * LM + j] - m)
            sc[i * LM + j] = e
            tot += e
        mx[i] = np.float32(1.0) / tot


@numba.njit(cache=True, nogil=True, fastmath=True)
def tile_values(sc, mx, i0, lat, btab, t, bs, L, LM, ol, C, p):
    """ol[i0 + i] += p_ij c_j over j < L for the tile's heads (p = softmax weights): positions in
    fours (axpy_tile4), the last L % 4 one by one (fixed by L alone). p: scratch [>= 4 HT]."""
    j = 0
    while j + 3 < L:
        for k in range(4):
            for i in range(HT):
                p[k * HT + i] = sc[(i0 + i) * LM + j + k] * mx[i0 + i]
        axpy_tile4(ol, i0, p, lat[cache_row(btab, t, j, bs)], lat[cache_row(btab, t, j + 1, bs)],
                   lat[cache_row(btab, t, j + 2, bs)], lat[cache_row(btab, t, j + 3, bs)], C)
        j += 4
    while j < L:
        row = cache_row(btab, t, j, bs)
        for i in range(HT):
            p[i] = sc[(i0 + i) * LM + j] * mx[i0 + i]
        axpy_tile(ol, i0, p, lat[row], C)
        j += 1


@numba.njit(cache=True, nogil=True)
def attention_core(space, mats, kb, vb, dm, scale, T, pos, btab, lat, pe, cos, sin, Q, O, q_abs_t, qpe_t, scores_t,
                   mx_t, olat_t, X, kq, kn, kd, ks, zq, zd, zs, wp):
    """Per (token, group of HG heads): each head's rope of q_pe and its quantized q_nope row (here,
    not before the region: the T x H rows in parallel), q_abs = k_b q_nope; then the heads in tiles
    of HT: one pass over the token's cache rows per tile computes every head's score (MLA shares
    one latent across heads), a vectorized softmax, then one pass for o_lat = sum p_j c_j; o =
    v_b o_lat -> O[t, h*V:(h+1)*V]. A group is padded with zero heads to whole tiles, so every
    head runs the same code whatever its group or batch. q_nope rows are quantized in activation
    rows t*H + h; rows T*H + thread*HG + i hold a thread's o_lat rows. (Arrays are passed one by
    one: Numba's parallel regions take no tuples.) Stored-panel k_b / v_b (table.head_panels) go
    16 rows at a time through the panel kernels, one token a call (wp: their scratch by thread).
    One parallel region over the items, or a loop on the calling thread where their work is below
    rows.SERIAL_WORK (the same bits: an item is computed alike on any thread)."""
    H, HG, C, R = dm[D_H], dm[D_HG], dm[D_C], dm[D_R]
    n_items = T * ((H + HG - 1) // HG)
    # bytes the items stream: the heads' k_b / v_b rows and, per tile of heads, the cache rows read
    per_head = mats[kb, M_ESTRIDE] + mats[vb, M_ESTRIDE]
    ctx = 0
    for t in range(T):
        ctx += pos[t] + 1
    work = T * H * per_head + ctx * ((HG + HT - 1) // HT) * ((H + HG - 1) // HG) * 4 * (C + R) * 2
    if n_items == 1 or work < dm[D_SERIAL]:
        # one thread: groups as wide as its scratch allows (fewer zero heads padding the tiles)
        G = min(H, (HG + HT - 1) // HT * HT, q_abs_t.shape[0] * HG)
        for item in range(T * ((H + G - 1) // G)):
            _attn_item(item, space, mats, kb, vb, dm, scale, T, pos, btab, lat, pe, cos, sin, Q, O, q_abs_t,
                       qpe_t, scores_t, mx_t, olat_t, X, kq, kn, kd, ks, zq, zd, zs, wp, 0, G)
    else:
        _attn_items(n_items, space, mats, kb, vb, dm, scale, T, pos, btab, lat, pe, cos, sin, Q, O, q_abs_t,
                    qpe_t, scores_t, mx_t, olat_t, X, kq, kn, kd, ks, zq, zd, zs, wp, HG)


@numba.njit(cache=True, nogil=True, parallel=True)
def _attn_items(n_items, space, mats, kb, vb, dm, scale, T, pos, btab, lat, pe, cos, sin, Q, O, q_abs_t, qpe_t,
                scores_t, mx_t, olat_t, X, kq, kn, kd, ks, zq, zd, zs, wp, HG):
    for item in prange(n_items):
        _attn_item(item, space, mats, kb, vb, dm, scale, T, pos, btab, lat, pe, cos, sin, Q, O, q_abs_t, qpe_t,
                   scores_t, mx_t, olat_t, X, kq, kn, kd, ks, zq, zd, zs, wp, numba.get_thread_id(), HG)


@numba.njit(cache=True, nogil=True)
def _attn_item(item, space, mats, kb, vb, dm, scale, T, pos, btab, lat, pe, cos, sin, Q, O, q_abs_t, qpe_t,
               scores_t, mx_t, olat_t, X, kq, kn, kd, ks, zq, zd, zs, wp, tid, HG):
    """One (token, group of HG heads) of attention_core on thread tid's scratch."""
    H, N, R, V, C, bs, LM = dm[D_H], dm[D_N], dm[D_R], dm[D_V], dm[D_C], dm[D_BS], dm[D_LMAX]
    kind_k, nb_k, rs_k, es_k, off_k = mats[kb, M_KIND], mats[kb, M_NB], mats[kb, M_RSTRIDE], mats[kb, M_ESTRIDE], mats[kb, M_OFF]
    kind_v, nb_v, rs_v, es_v, off_v = mats[vb, M_KIND], mats[vb, M_NB], mats[vb, M_RSTRIDE], mats[vb, M_ESTRIDE], mats[vb, M_OFF]
    need_v, need_k = need_for(mats, vb), need_for(mats, kb)
    n_groups = (H + HG - 1) // HG
    n_pad = (HG + HT - 1) // HT * HT
    t, g = item // n_groups, item % n_groups
    h0 = g * HG
    nh = min(H, h0 + HG) - h0
    qa, qp, sc, mx, ol = q_abs_t[tid], qpe_t[tid], scores_t[tid], mx_t[tid], olat_t[tid]
    one = np.empty(1, np.int64)  # the activation row of a panel call
    for i in range(n_pad):
        if i < nh:
            h, arow = h0 + i, t * H + h0 + i
            rope(Q[t], h * (N + R) + N, R, cos, sin, pos[t])
            X[arow, :N] = Q[t, h * (N + R): h * (N + R) + N]
            quantize_row(X[arow], N, need_k, kq, kn, kd, ks, zq, zd, zs, arow)
            if is_panel(kind_k):
                one[0] = t * H + h0 + i
                qa2 = qa.reshape((1, qa.shape[0]))
                xa, sa, da = (zq, zs, zd) if kind_k == P_Q8_0 else (kq, ks, kd)
                for q in range(C // ROWS):
                    stored_through(kind_k, space[off_k + (h0 + i) * es_k + q * rs_k:], nb_k, xa, sa, da, one, 0, 1,
                                   qa2, i * C + ROWS * q, wp[tid])
            else:
                for c in range(C):
                    qa[i * C + c] = row_dot(kind_k, nb_k, N, space, off_k + (h0 + i) * es_k + c * rs_k,
                                            X, kq, kn, kd, ks, zq, zd, zs, t * H + h0 + i)
            for r in range(R):
                qp[i * R + r] = Q[t, (h0 + i) * (N + R) + N + r]
        else:
            qa[i * C: (i + 1) * C] = 0.0
            qp[i * R: (i + 1) * R] = 0.0
        mx[i] = -np.inf
    L = pos[t] + 1
    acc = sc[n_pad * LM: n_pad * LM + 4 * HT]  # the tile's accumulators / weights
    for i0 in range(0, n_pad, HT):
        tile_scores(qa, qp, i0, C, R, lat, pe, btab, t, bs, L, scale, sc, LM, mx, acc)
    softmax_rows(sc, n_pad, LM, L, mx)
    for i in range(n_pad):
        ol[i, :C] = 0.0
    for i0 in range(0, n_pad, HT):
        tile_values(sc, mx, i0, lat, btab, t, bs, L, LM, ol, C, acc)
    for i in range(nh):
        arow = T * H + tid * HG + i
        X[arow, :C] = ol[i, :C]
        quantize_row(X[arow], C, need_v, kq, kn, kd, ks, zq, zd, zs, arow)
        h = h0 + i
        if is_panel(kind_v):
            one[0] = arow
            xa, sa, da = (zq, zs, zd) if kind_v == P_Q8_0 else (kq, ks, kd)
            for q in range(V // ROWS):
                stored_through(kind_v, space[off_v + h * es_v + q * rs_v:], nb_v, xa, sa, da, one, 0, 1,
                               O, t * O.shape[1] + h * V + ROWS * q, wp[tid])
        else:
            for v_ in range(V):
                O[t, h * V + v_] = row_dot(kind_v, nb_v, C, space, off_v + h * es_v + v_ * rs_v,
                                           X, kq, kn, kd, ks, zq, zd, zs, arow)


@numba.njit(cache=True, nogil=True)
def attention(w, lt, dm, fd, x, T, pos, btab, lat, pe, cos, sin, s, a, ah):
    """x[t] += MLA(rms_norm(x[t])) for the T new tokens; their latents are written to the cache."""
    D, H, N, R, V, C, QL = dm[D_D], dm[D_H], dm[D_N], dm[D_R], dm[D_V], dm[D_C], dm[D_QL]
    HQ = H * (N + R)
    n_chunks = dm[D_CHUNKS]
    kv_a, jobs = lt[F_KV_A], s.jobs
    ident = s.ident
    need = need_for(w.mats, kv_a) | need_for(w.mats, lt[F_Q_A] if QL else lt[F_Q_B])
    norm_and_quantize(w, x, T, D, lt[F_ATTN_NORM], need, a, fd[FD_EPS])
    q_cols = QL if QL else HQ  # s.Y1[t] = [q_a (or q) | latent | k_pe]
    set_job(jobs, 0, lt[F_Q_A] if QL else lt[F_Q_B], 0, 0, T, 0)
    set_job(jobs, 1, kv_a, 0, 0, T, q_cols)
    project(w, jobs, 2, a, ident, s.Y1, n_chunks, dm[D_SERIAL])
    if QL:
        for t in range(T):  # q = q_b(rms_norm(q_a))
            rms_norm(s.Y1[t], QL, w.va, w.vecs[lt[F_Q_A_NORM], 0], fd[FD_EPS], a.X[t])
        quantize_rows(a.X, T, QL, need_for(w.mats, lt[F_Q_B]), a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)
        set_job(jobs, 0, lt[F_Q_B], 0, 0, T, 0)
        project(w, jobs, 1, a, ident, s.Q, n_chunks, dm[D_SERIAL])
    else:
        for t in range(T):
            s.Q[t, :HQ] = s.Y1[t, :HQ]
    for t in range(T):  # the new latent rows (every token's attention reads them); q: in attention_core
        row = cache_row(btab, t, pos[t], dm[D_BS])
        rms_norm(s.Y1[t, q_cols:], C, w.va, w.vecs[lt[F_KV_A_NORM], 0], fd[FD_EPS], lat[row])
        for r in range(R):
            pe[row, r] = s.Y1[t, q_cols + C + r]
        rope(pe[row], 0, R, cos, sin, pos[t])
    attention_core(w.space, w.mats, lt[F_K_B], lt[F_V_B], dm, np.float32(fd[FD_SCALE]), T, pos, btab, lat, pe,
                   cos, sin, s.Q, s.O, s.q_abs, s.qpe, s.scores, s.mx, s.olat, ah.X, ah.kq, ah.kn, ah.kd, ah.ks, ah.zq, ah.zd,
                   ah.zs, w.wp)
    wo = lt[F_O]
    quantize_rows(s.O, T, H * V, need_for(w.mats, wo), a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)
    if w.mats[wo, M_KIND] == K_F32:  # float weights read the activations themselves
        for t in range(T):
            a.X[t, :H * V] = s.O[t, :H * V]
    set_job(jobs, 0, wo, 0, 0, T, 0)
    project(w, jobs, 1, a, ident, s.Y2, n_chunks, dm[D_SERIAL])
    for t in range(T):
        for i in range(D):
            x[t, i] += s.Y2[t, i]


@numba.njit(cache=True, nogil=True)
def select_experts(logits, bias_va, bias_o, dm, fd, ids, wts, probs, sel):
    """Top-K of (probs + bias) within the best groups; weights = the unbiased probs (normed, scaled).
    logits [E] f32 -> ids [K] int64, wts [K] f32 (probs, sel: scratch [E])."""
    E, K, G, GU = dm[D_E], dm[D_K], dm[D_NG], dm[D_NGU]
    if dm[D_GATING] == 2:
        for e in range(E):
            probs[e] = np.float32(1.0) / (np.float32(1.0) + np.float32(math.exp(-logits[e])))
    else:
        mx = np.float32(-np.inf)
        for e in range(E):
            mx = max(mx, logits[e])
        tot = np.float32(0.0)
        for e in range(E):
            probs[e] = np.float32(math.exp(logits[e] - mx))
            tot += probs[e]
        for e in range(E):
            probs[e] /= tot
    for e in range(E):
        sel[e] = probs[e] + (bias_va[bias_o + e] if bias_o >= 0 else np.float32(0.0))
    if G > 1:
        per = E // G
        for _ in range(G - GU):  # drop the weakest group (score: its two best), G - GU times
            worst, worst_score = -1, np.float32(np.inf)
            for g in range(G):
                b1, b2 = np.float32(-np.inf), np.float32(-np.inf)
                for e in range(g * per, (g + 1) * per):
                    v = sel[e]
                    if v > b1:
                        b1, b2 = v, b1
                    elif v > b2:
                        b2 = v
                if b1 != -np.inf and b1 + b2 < worst_score:
                    worst, worst_score = g, b1 + b2
            for e in range(worst * per, (worst + 1) * per):
                sel[e] = -np.inf
    tot = np.float32(0.0)
    for k in range(K):
        best = 0
        for e in range(1, E):
            if sel[e] > sel[best]:
                best = e
        ids[k] = best
        wts[k] = probs[best]
        tot += probs[best]
        sel[best] = -np.inf
    if dm[D_WNORM]:
        tot = max(tot, np.float32(6.103515625e-05))
        for k in range(K):
            wts[k] = wts[k] / tot
    ws = np.float32(fd[FD_WSCALE])
    if ws != 0.0 and ws != 1.0:
        for k in range(K):
            wts[k] = wts[k] * ws


@numba.njit(cache=True, nogil=True)
def group_pairs(ids, T, K, E, counts, offsets, pair_tok, pair_of_slot):
    """Counting sort of the T*K (token, k) slots by expert: pairs of expert e are
    offsets[e]:offsets[e+1], in slot order; pair_of_slot[t*K + k] is the pair of slot (t, k)."""
    counts[:E] = 0
    for t in range(T):
        for k in range(K):
            counts[ids[t, k]] += 1
    offsets[0] = 0
    for e in range(E):
        offsets[e + 1] = offsets[e] + counts[e]
        counts[e] = offsets[e]
    for t in range(T):
        for k in range(K):
            p = counts[ids[t, k]]
            counts[ids[t, k]] += 1
            pair_tok[p] = t
            pair_of_slot[t * K + k] = p


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def silu_mul(Y, n_rows, F, out):
    """out[p, :F] = silu(Y[p, :F]) * Y[p, F:2F], the sigmoid through exp_neg. Vectorized: there is
    no vector exp without SVML, and Numba's default error model checks every division for zero,
    which keeps a loop scalar (error_model="numpy" drops the check); 5 -> 0.7 ns a value."""
    for p in range(n_rows):
        g_row, u_row, o_row = Y[p, :F], Y[p, F: 2 * F], out[p, :F]
        for f in range(F):
            g = g_row[f]
            e = exp_neg(-abs(g))  # exp(-|g|) in (0, 1]
            r = np.float32(1.0) / (np.float32(1.0) + e)
            o_row[f] = g * (r if g >= 0 else e * r) * u_row[f]


@numba.njit(cache=True, nogil=True)
def moe(w, lt, dm, fd, x, T, s, a):
    """x[t] += sum_k w_tk expert_k(h_t) + shared(h_t), h = rms_norm(x): the whole MoE block."""
    D, E, K = dm[D_D], dm[D_E], dm[D_K]
    n_chunks, jobs = dm[D_CHUNKS], s.jobs
    gx, ux, dx, gs, us, ds = lt[F_GATE_X], lt[F_UP_X], lt[F_DOWN_X], lt[F_GATE], lt[F_UP], lt[F_DOWN]
    F = w.mats[gx, M_ROWS]
    FS = w.mats[gs, M_ROWS] if gs >= 0 else 0
    need = need_for(w.mats, gx) | need_for(w.mats, ux) | (need_for(w.mats, gs) | need_for(w.mats, us) if gs >= 0 else 0)
    norm_and_quantize(w, x, T, D, lt[F_FFN_NORM], need, a, fd[FD_EPS])
    # router logits s.Y1[t, :E] and the shared expert's gate | up in s.Y1[t, E: E + 2FS], one region
    n = 1
    set_job(jobs, 0, lt[F_ROUTER], 0, 0, T, 0)
    if gs >= 0:
        set_job(jobs, 1, gs, 0, 0, T, E)
        set_job(jobs, 2, us, 0, 0, T, E + FS)
        n = 3
    project(w, jobs, n, a, s.ident, s.Y1, n_chunks, dm[D_SERIAL])
    bias = w.vecs[lt[F_BIAS], 0] if lt[F_BIAS] >= 0 else -1
    for t in range(T):
        select_experts(s.Y1[t], w.va, bias, dm, fd, s.ids[t], s.wts[t], s.probs, s.sel)
    group_pairs(s.ids, T, K, E, s.counts, s.offsets, s.pair_tok, s.pair_of_slot)
    P = T * K
    n = 0
    for e in range(E):  # gate | up of every (token, expert) pair -> s.Yx[p, :2F]
        p0, p1 = s.offsets[e], s.offsets[e + 1]
        if p1 > p0:
            set_job(jobs, n, gx, e, p0, p1, 0)
            set_job(jobs, n + 1, ux, e, p0, p1, F)
            n += 2
    project(w, jobs, n, a, s.pair_tok, s.Yx, n_chunks, dm[D_SERIAL])
    silu_mul(s.Yx, P, F, a.X)
    if gs >= 0:
        for t in range(T):
            for f in range(2 * FS):
                s.Yx[P + t, f] = s.Y1[t, E + f]
        silu_mul(s.Yx[P:], T, FS, a.X[P:])
    quantize_rows(a.X, P, F, need_for(w.mats, dx), a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)
    n = 0
    for e in range(E):  # down of every pair -> s.Yd[p, :D]; the shared expert's in rows P + t
        p0, p1 = s.offsets[e], s.offsets[e + 1]
        if p1 > p0:
            set_job(jobs, n, dx, e, p0, p1, 0)
            n += 1
    if gs >= 0:
        for t in range(T):
            quantize_row(a.X[P + t], FS, need_for(w.mats, ds), a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs, P + t)
        set_job(jobs, n, ds, 0, P, P + T, 0)
        n += 1
    project(w, jobs, n, a, s.ident, s.Yd, n_chunks, dm[D_SERIAL])
    acc = s.Y2[0]
    for t in range(T):  # fixed order per token: k = 0..K-1, then the shared expert
        acc[:D] = 0.0
        for k in range(K):
            wk, yk = s.wts[t, k], s.Yd[s.pair_of_slot[t * K + k]]
            for i in range(D):
                acc[i] += wk * yk[i]
        if gs >= 0:
            for i in range(D):
                acc[i] += s.Yd[P + t, i]
        for i in range(D):
            x[t, i] += acc[i]


@numba.njit(cache=True, nogil=True)
def dense_ffn(w, lt, dm, fd, x, T, s, a):
    """x[t] += down(silu(gate h) * up h), h = rms_norm(x[t])."""
    D, n_chunks, jobs = dm[D_D], dm[D_CHUNKS], s.jobs
    g, u, d = lt[F_GATE], lt[F_UP], lt[F_DOWN]
    F = w.mats[g, M_ROWS]
    norm_and_quantize(w, x, T, D, lt[F_FFN_NORM], need_for(w.mats, g) | need_for(w.mats, u), a, fd[FD_EPS])
    set_job(jobs, 0, g, 0, 0, T, 0)
    set_job(jobs, 1, u, 0, 0, T, F)
    project(w, jobs, 2, a, s.ident, s.Yx, n_chunks, dm[D_SERIAL])
    silu_mul(s.Yx, T, F, a.X)
    quantize_rows(a.X, T, F, need_for(w.mats, d), a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)
    set_job(jobs, 0, d, 0, 0, T, 0)
    project(w, jobs, 1, a, s.ident, s.Yd, n_chunks, dm[D_SERIAL])
    for t in range(T):
        for i in range(D):
            x[t, i] += s.Yd[t, i]


@numba.njit(cache=True, nogil=True)
def model_layers(w, dm, fd, x, T, pos, btab, lat, pe, cos, sin, s, a, ah, first, last):
    """Layers first..last-1 over x [T, D] (lat/pe: [n_layer, rows, C|R] cache pools)."""
    for layer in range(first, last):
        lt = w.layers[layer]
        attention(w, lt, dm, fd, x, T, pos, btab, lat[layer], pe[layer], cos, sin, s, a, ah)
        if lt[F_MOE]:
            moe(w, lt, dm, fd, x, T, s, a)
            for e in range(dm[D_E]):  # experts this step read (their tokens grouped: each once)
                if s.offsets[e + 1] > s.offsets[e]:
                    s.touched[layer] += 1
        else:
            dense_ffn(w, lt, dm, fd, x, T, s, a)


@numba.njit(cache=True, nogil=True)
def head(w, dm, fd, x, rows, n_rows, norm_vec, head_mat, s, a, logits):
    """logits[i] = head(rms_norm(x[rows[i]])) for i < n_rows."""
    D = dm[D_D]
    for i in range(n_rows):
        rms_norm(x[rows[i]], D, w.va, w.vecs[norm_vec, 0], fd[FD_EPS], a.X[i])
    quantize_rows(a.X, n_rows, D, need_for(w.mats, head_mat), a.kq, a.kn, a.kd, a.ks, a.zq, a.zd, a.zs)
    set_job(s.jobs, 0, head_mat, 0, 0, n_rows, 0)
    project(w, s.jobs, 1, a, s.ident, logits, dm[D_CHUNKS], dm[D_SERIAL])


@numba.njit(cache=True, nogil=True)
def step_and_head(w, dm, fd, x, T, pos, btab, lat, pe, cos, sin, s, a, ah, n_layer, norm_vec, head_mat, logits):
    """Every layer over x [T, D], then logits[0] = head(rms_norm(x[T - 1])): decode's one call."""
    model_layers(w, dm, fd, x, T, pos, btab, lat, pe, cos, sin, s, a, ah, 0, n_layer)
    last = s.ident[T - 1: T]
    head(w, dm, fd, x, last, 1, norm_vec, head_mat, s, a, logits)
