"""Time the compiled step's parts per call from loops inside Numba (no dispatch, no Python between
calls): every layer, one layer's attention / MoE / dense FFN, and single projections of layer 1.

    python scripts/time_step_parts.py models/kimi-k2-tiny-Q4_K_M.gguf

Each part runs N times on the same token at the same position (its weights warm in cache): a
measure of the step's fixed costs, not of a real decode step's memory traffic.
"""
import sys
import time

import numba
import numpy as np
from hybrid_runtime import api  # noqa: E402
from hybrid_runtime.cpu import layers as L  # noqa: E402
m = api.load(sys.argv[1] if len(sys.argv) > 1 else "models/kimi-k2-tiny-Q4_K_M.gguf", threads=2)
net = m.net
c = m.new_cache(); m.forward(list(range(16)), c)
pos = np.array([c.n_tokens]); c.reserve(c.n_tokens + 1)
btab = c.table.reshape(1, -1)
x = net.embed(np.array([5]))

@numba.njit(nogil=True)
def rep_attn(n, w, lt, dm, fd, x, pos, btab, lat, pe, cos, sin, s, a, ah):
    for i in range(n):
        L.attention(w, lt, dm, fd, x, 1, pos, btab, lat, pe, cos, sin, s, a, ah)

@numba.njit(nogil=True)
def rep_moe(n, w, lt, dm, fd, x, s, a):
    for i in range(n):
        L.moe(w, lt, dm, fd, x, 1, s, a)

@numba.njit(nogil=True)
def rep_dense(n, w, lt, dm, fd, x, s, a):
    for i in range(n):
        L.dense_ffn(w, lt, dm, fd, x, 1, s, a)

@numba.njit(nogil=True)
def rep_layers(n, w, dm, fd, x, pos, btab, lat, pe, cos, sin, s, a, ah, nl):
    for i in range(n):
        L.model_layers(w, dm, fd, x, 1, pos, btab, lat, pe, cos, sin, s, a, ah, 0, nl)

@numba.njit(nogil=True)
def rep_proj(n, w, jobs, nj, a, ident, Y, nc, sw):
    for i in range(n):
        L.project(w, jobs, nj, a, ident, Y, nc, sw)

w, dm, fd, s, a, ah = net.w, net.dm, net.fd, net.s, net.a, net.ah
lat, pe = net.pool.lat, net.pool.pe
N = 2000
def tm(f, *args):
    f(1, *args)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter(); f(N, *args); best = min(best, (time.perf_counter() - t0) / N)
    return best * 1e6
x0 = x.copy()
r = {}
r["layers(all)"] = tm(rep_layers, w, dm, fd, x0.copy(), pos, btab, lat, pe, net.cos, net.sin, s, a, ah, net.cfg.n_layer)
r["attn L1"] = tm(rep_attn, w, w.layers[1], dm, fd, x0.copy(), pos, btab, lat[1], pe[1], net.cos, net.sin, s, a, ah)
r["moe L1"] = tm(rep_moe, w, w.layers[1], dm, fd, x0.copy(), s, a)
r["dense L0"] = tm(rep_dense, w, w.layers[0], dm, fd, x0.copy(), s, a)
from hybrid_runtime.cpu import table as tb
lt = w.layers[1]
jobs = np.zeros((8, 5), np.int64)
for name, f in [("q_a", tb.F_Q_A), ("q_b", tb.F_Q_B), ("kv_a", tb.F_KV_A), ("o", tb.F_O), ("router", tb.F_ROUTER), ("shared gate", tb.F_GATE)]:
    jobs[0] = (lt[f], 0, 0, 1, 0)
    Y = np.zeros((4, 4096), np.float32)
    r["proj " + name + f" rows={w.mats[lt[f], tb.M_ROWS]} kind={w.mats[lt[f], tb.M_KIND]}"] = tm(
        rep_proj, w, jobs, 1, a, s.ident, Y, dm[L.D_CHUNKS], dm[L.D_SERIAL])
for k, v in r.items():
    print(f"{k:40s} {v:8.2f} us")
print("threads", numba.config.NUMBA_NUM_THREADS, numba.threading_layer())
