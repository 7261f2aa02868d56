"""Benchmarks of the CPU expert kernels against the machine's read bandwidth (plain dicts out).

Every figure is judged against the read bandwidth measured in the same process right before and
right after it, because the bandwidth of shared or virtual machines drifts over minutes.
"""

from __future__ import annotations

import time

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT
from numba import prange

from hybrid_runtime.experts.moe_cpu import ExpertWeights, moe_forward
from hybrid_runtime.quant.cpu_features import has_avx512_vnni
from hybrid_runtime.quant.kernels import CPU_KERNELS, grouped_matmul, quantize_acts

_ROTATE_BYTES = 576 << 20  # weights visited in turn: well beyond any cache
_SCALE_FIELDS = {QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,), QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q8_0: (0,)}


@numba.njit(cache=True, nogil=True)
def _sum_slice(a):  # a plain reduction: LLVM vectorizes it with several accumulators
    s = np.uint64(0)
    for i in range(a.shape[0]):
        s += a[i]
    return s


@numba.njit(cache=True, nogil=True, parallel=True)
def _stream_sum(buf, n_chunks):  # buf [N] uint64, each thread reads one contiguous part once
    n = buf.shape[0]
    parts = np.zeros(n_chunks, np.uint64)
    for c in prange(n_chunks):
        parts[c] = _sum_slice(buf[n * c // n_chunks: n * (c + 1) // n_chunks])
    return parts.sum()


def _timed(fn, seconds: float) -> float:
    """Best seconds per call over repeated calls for about `seconds`."""
    fn()
    best, stop = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


class ReadBandwidth:
    """A page-touched buffer reused for the before/after bandwidth measurements of a run."""

    def __init__(self, nbytes: int):
        self.buf = np.ones(nbytes // 8, np.uint64)

    def measure(self, threads: int, seconds: float = 1.5) -> float:
        numba.set_num_threads(threads)
        return self.buf.nbytes / _timed(lambda: _stream_sum(self.buf, threads), seconds) / 1e9


def random_weights(qtype: QT, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random valid raw blocks uint8 [..., rows, row_bytes] with small positive fp16 scales."""
    values, nbytes = GGML_QUANT_SIZES[qtype]
    *lead, cols = shape
    raw = rng.integers(0, 256, size=(*lead, cols // values, nbytes), dtype=np.uint8)
    for off in _SCALE_FIELDS.get(qtype, ()):
        raw[..., off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    return raw.reshape(*lead, -1)


def _kernel_case(qtype: QT, threads: int, rows: int, cols: int, n_matrices: int | None,
                 seconds: float, rng) -> dict:
    spec = CPU_KERNELS[qtype]
    row_bytes = cols // spec.block_values * spec.block_bytes
    n = n_matrices or max(2, -(-_ROTATE_BYTES // (rows * row_bytes)))
    w = random_weights(qtype, (n, rows, cols), rng)                              # [n, rows, row_bytes]
    acts = quantize_acts(spec.act, rng.standard_normal((1, cols)).astype(np.float32))
    out = np.empty((1, rows), np.float32)
    offsets, tok = np.array([0, 1], np.int64), np.zeros(1, np.int64)

    def sweep():
        for e in range(n):
            grouped_matmul(spec, w, np.array([e], np.int64), offsets, tok, acts, out)

    numba.set_num_threads(threads)
    per_sweep = _timed(sweep, seconds)
    gbps = w.nbytes / per_sweep / 1e9
    return {"type": qtype.name, "threads": threads, "rows": rows, "cols": cols, "matrices": n,
            "vnni": spec.vnni and has_avx512_vnni(), "gbps": round(gbps, 2),
            "us_per_matrix": round(per_sweep / n * 1e6, 1)}


def _judge(result: dict, before: float, after: float) -> dict:
    read = (before + after) / 2
    return result | {"read_gbps_before": round(before, 2), "read_gbps_after": round(after, 2),
                     "fraction_of_read": round(result["gbps"] / read, 3)}


def bench_kernels(types=(QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q8_0, QT.Q2_K, QT.Q3_K), threads: int = 2,
                  rows: int = 2048, cols: int = 7168, n_matrices: int | None = None,
                  seconds: float = 3.0, bandwidth_bytes: int = 2 << 30) -> list[dict]:
    """GEMV (T = 1) GB/s of weight bytes per type, weights rotating over > 512 MB, with the
    read bandwidth measured just before and after each type."""
    rng = np.random.default_rng(0)
    bw = ReadBandwidth(bandwidth_bytes)
    results = []
    for qtype in types:
        qtype = QT[qtype] if isinstance(qtype, str) else QT(qtype)
        before = bw.measure(threads)
        res = _kernel_case(qtype, threads, rows, cols, n_matrices, seconds, rng)
        results.append(_judge(res, before, bw.measure(threads)))
    return results


def _moe_pool(n_expert: int, hidden: int, n_ff: int, gate_type: QT, down_type: QT, rng) -> ExpertWeights:
    gate = random_weights(gate_type, (n_expert, n_ff, hidden), rng)
    up = random_weights(gate_type, (n_expert, n_ff, hidden), rng)
    down = random_weights(down_type, (n_expert, hidden, n_ff), rng)
    return ExpertWeights(gate, up, down, gate_type, gate_type, down_type, n_expert, n_ff, hidden)


def bench_moe_step(threads: int = 2, hidden: int = 7168, n_ff: int = 2048, top_k: int = 8,
                   gate_type: QT = QT.Q4_K, down_type: QT = QT.Q6_K, n_expert: int | None = None,
                   seconds: float = 5.0, bandwidth_bytes: int = 2 << 30) -> dict:
    """The fused decode step (T = 1, top_k experts of a pool > 512 MB, Kimi K2 shapes) in GB/s of
    expert bytes read, against the read bandwidth measured just before and after."""
    rng = np.random.default_rng(0)
    one = 2 * n_ff * hidden // GGML_QUANT_SIZES[gate_type][0] * GGML_QUANT_SIZES[gate_type][1] \
        + hidden * n_ff // GGML_QUANT_SIZES[down_type][0] * GGML_QUANT_SIZES[down_type][1]
    n_expert = n_expert or max(2 * top_k, -(-_ROTATE_BYTES // one) + top_k)
    experts = _moe_pool(n_expert, hidden, n_ff, gate_type, down_type, rng)
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    routes = [rng.choice(n_expert, top_k, replace=False)[None] for _ in range(64)]
    weights = np.full((1, top_k), 1.0 / top_k, np.float32)
    step = iter(range(1 << 62))

    def run():
        moe_forward(x, routes[next(step) % len(routes)], weights, experts)

    bw = ReadBandwidth(bandwidth_bytes)
    before = bw.measure(threads)
    numba.set_num_threads(threads)
    per_step = _timed(run, seconds)
    res = {"gate_up": gate_type.name, "down": down_type.name, "threads": threads, "top_k": top_k,
           "experts": n_expert, "hidden": hidden, "n_ff": n_ff, "ms_per_step": round(per_step * 1e3, 3),
           "gbps": round(top_k * one / per_step / 1e9, 2)}
    return _judge(res, before, bw.measure(threads))


def bench_prefill_threshold(threads: int = 2, tokens=(8, 16, 32, 64, 128, 256), hidden: int = 7168,
                            n_ff: int = 2048, gate_type: QT = QT.Q4_K, down_type: QT = QT.Q6_K,
                            seconds: float = 2.0) -> list[dict]:
    """ms per expert for n tokens on one expert: integer kernels vs dequantize + torch bf16 matmul
    (how prefill.TORCH_MIN_TOKENS was chosen)."""
    from hybrid_runtime.experts.prefill import configure_threads, prefill_forward

    rng = np.random.default_rng(0)
    experts = _moe_pool(1, hidden, n_ff, gate_type, down_type, rng)
    configure_threads(threads)
    rows = []
    for n in tokens:
        x = rng.standard_normal((n, hidden)).astype(np.float32)
        ids, w = np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32)
        ms = [_timed(lambda m=m: prefill_forward(x, ids, w, experts, torch_min_tokens=m), seconds) * 1e3
              for m in (n + 1, n)]
        rows.append({"tokens": n, "threads": threads, "int_ms": round(ms[0], 2), "torch_ms": round(ms[1], 2)})
    return rows
