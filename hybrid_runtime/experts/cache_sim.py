"""Expert-cache policy simulator over routing traces (recorded or synthetic).

A trace is int [N tokens, L layers, K experts per token]. Each layer has C slots (the same
share of the pool per layer); every policy sees a token's K accesses of a layer, counts hits,
then updates its cache, as the runtime does (admission happens after the layer ran).

Policies: "ours" (decayed frequency, admission only when a candidate beats the coldest
resident by ADMIT_MARGIN, at most MAX_COPIES_PER_STEP copies per layer and token: the
prefetcher's rule), "lru" and "lfu" (fill on every miss), "static" (the oracle top-C of
the whole trace per layer, never changes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

from hybrid_runtime.experts.gpu_cache import ADMIT_MARGIN, DECAY_PER_TOKEN, MAX_COPIES_PER_STEP

POLICIES = ("ours", "lru", "lfu", "static")
DEFAULT_FRACTIONS = (0.05, 0.10, 0.20, 0.40)


@dataclass(slots=True)
class SimResult:
    policy: str
    fraction: float
    slots_per_layer: int
    hit_rate: float
    copies_per_token: float  # expert uploads per token, all layers together


# -- synthetic traces ---------------------------------------------------------------------------
def synthetic_trace(n_tokens: int = 4000, n_layers: int = 60, n_experts: int = 384, k: int = 8,
                    zipf_s: float = 1.0, stickiness: float = 1.5, drift: float = 0.02, seed: int = 0) -> np.ndarray:
    """Zipf-skewed routing with temporal locality and slow drift: int [N, L, K].

    Per layer a random popularity order with p(rank r) ~ 1 / r**zipf_s; a token picks K distinct
    experts by Gumbel top-k on log p + stickiness * [chosen by the previous token]; the log
    popularities random-walk by `drift` per token (topics change).
    """
    rng = np.random.default_rng(seed)
    ranks = np.argsort(rng.random((n_layers, n_experts)), axis=1) + 1  # [L, E] a permutation of 1..E
    logp = -zipf_s * np.log(ranks.astype(np.float64))
    prev = np.zeros((n_layers, n_experts), dtype=np.float64)
    out = np.empty((n_tokens, n_layers, k), dtype=np.int64)
    rows = np.arange(n_layers)[:, None]
    for t in range(n_tokens):
        score = logp + stickiness * prev + rng.gumbel(size=logp.shape)
        ids = np.argpartition(-score, k, axis=1)[:, :k]  # [L, K]
        out[t] = ids
        prev[:] = 0.0
        prev[rows, ids] = 1.0
        if drift:
            logp += rng.normal(0.0, drift, size=logp.shape)
    return out


def cyclic_trace(n_tokens: int, n_layers: int, n_experts: int, k: int, period: int) -> np.ndarray:
    """Token t routes to experts (t mod period) * k .. + k - 1 in every layer (period * k <= E)."""
    base = (np.arange(n_tokens) % period)[:, None] * k + np.arange(k)[None, :]  # [N, K]
    return np.broadcast_to(base[:, None, :] % n_experts, (n_tokens, n_layers, k)).copy()


def trace_from_record(per_layer: dict[int, np.ndarray]) -> np.ndarray:
    """gpu_cache.load_routing output -> int [N, L, K] over the layers present (common prefix of tokens)."""
    layers = sorted(per_layer)
    n = min(per_layer[l].shape[0] for l in layers)
    return np.stack([per_layer[l][:n] for l in layers], axis=1)


# -- policies -----------------------------------------------------------------------------------
@njit(cache=True)
def _victim(resident, key, layer):  # resident expert of `layer` with the smallest key, -1 if none
    best, arg = np.inf, -1
    for e in range(resident.shape[1]):
        if resident[layer, e] and key[layer, e] < best:
            best, arg = key[layer, e], e
    return arg


@njit(cache=True)
def _sim_demand(trace, n_experts, slots, lfu):
    """LRU (lfu False) or LFU (lfu True), filling on every miss. Returns (hits, copies)."""
    N, L, K = trace.shape
    resident = np.zeros((L, n_experts), dtype=np.bool_)
    key = np.zeros((L, n_experts), dtype=np.float64)  # last use (LRU) or use count (LFU)
    used = np.zeros(L, dtype=np.int64)
    hits = copies = 0
    clock = 0.0
    for t in range(N):
        for l in range(L):
            for j in range(K):
                e = trace[t, l, j]
                clock += 1.0
                if resident[l, e]:
                    hits += 1
                key[l, e] = key[l, e] + 1.0 if lfu else clock
            for j in range(K):
                e = trace[t, l, j]
                if resident[l, e] or slots == 0:
                    continue
                if used[l] == slots:
                    v = _victim(resident, key, l)
                    resident[l, v] = False
                    used[l] -= 1
                resident[l, e] = True
                used[l] += 1
                copies += 1
    return hits, copies


@njit(cache=True)
def _sim_ours(trace, n_experts, slots, decay, margin, max_copies):
    """Decayed frequency with the prefetcher's admission rule. Returns (hits, copies)."""
    N, L, K = trace.shape
    resident = np.zeros((L, n_experts), dtype=np.bool_)
    score = np.zeros((L, n_experts), dtype=np.float64)
    used = np.zeros(L, dtype=np.int64)
    order = np.empty(K, dtype=np.int64)
    hits = copies = 0
    for t in range(N):
        for l in range(L):
            for e in range(n_experts):
                score[l, e] *= decay
            for j in range(K):
                e = trace[t, l, j]
                if resident[l, e]:
                    hits += 1
                score[l, e] += 1.0
            if slots == 0:
                continue
            order[:] = trace[t, l]
            keys = np.empty(K)
            for j in range(K):
                keys[j] = -score[l, order[j]]
            order = order[np.argsort(keys)]
            started = 0
            for j in range(K):
                e = order[j]
                if resident[l, e] or started == max_copies:
                    continue
                if used[l] == slots:
                    v = _victim(resident, score, l)
                    if score[l, e] <= margin * score[l, v]:
                        continue
                    resident[l, v] = False
                    used[l] -= 1
                resident[l, e] = True
                used[l] += 1
                copies += 1
                started += 1
    return hits, copies


def _sim_static(trace: np.ndarray, n_experts: int, slots: int) -> tuple[int, int]:
    N, L, K = trace.shape
    hits = 0
    for l in range(L):
        counts = np.bincount(trace[:, l].ravel(), minlength=n_experts)
        top = np.zeros(n_experts, dtype=bool)
        top[np.argsort(-counts, kind="stable")[:slots]] = True
        hits += int(top[trace[:, l]].sum())
    return hits, L * slots


def simulate(trace: np.ndarray, n_experts: int, policy: str, slots: int, decay: float = DECAY_PER_TOKEN,
             margin: float = ADMIT_MARGIN, max_copies: int = MAX_COPIES_PER_STEP) -> tuple[float, float]:
    """Hit rate and copies per token of one policy with `slots` slots per layer."""
    trace = np.ascontiguousarray(trace, dtype=np.int64)
    if policy == "ours":
        hits, copies = _sim_ours(trace, n_experts, slots, decay, margin, max_copies)
    elif policy in ("lru", "lfu"):
        hits, copies = _sim_demand(trace, n_experts, slots, policy == "lfu")
    elif policy == "static":
        hits, copies = _sim_static(trace, n_experts, slots)
    else:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    return hits / trace.size, copies / trace.shape[0]


def compare(trace: np.ndarray, n_experts: int, fractions=DEFAULT_FRACTIONS, policies=POLICIES) -> list[SimResult]:
    out = []
    for f in fractions:
        slots = max(1, int(round(f * n_experts)))
        for p in policies:
            hit, copies = simulate(trace, n_experts, p, slots)
            out.append(SimResult(p, f, slots, hit, copies))
    return out


def markdown_table(results: list[SimResult]) -> str:
    policies = list(dict.fromkeys(r.policy for r in results))
    fractions = list(dict.fromkeys(r.fraction for r in results))
    by = {(r.policy, r.fraction): r for r in results}
    lines = ["| cache (% of experts) | " + " | ".join(policies) + " |", "|---" * (len(policies) + 1) + "|"]
    for f in fractions:
        cells = [f"{by[p, f].hit_rate:.1%} ({by[p, f].copies_per_token:.1f})" for p in policies]
        lines.append(f"| {f:.0%} ({by[policies[0], f].slots_per_layer} slots/layer) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results_by_trace: dict[str, list[SimResult]], path) -> None:
    """Hit rate vs cache size, one panel per trace (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results_by_trace), figsize=(4.2 * len(results_by_trace), 3.2), squeeze=False)
    for ax, (name, results) in zip(axes[0], results_by_trace.items()):
        for p in dict.fromkeys(r.policy for r in results):
            rs = [r for r in results if r.policy == p]
            ax.plot([100 * r.fraction for r in rs], [100 * r.hit_rate for r in rs], marker="o", label=p)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cache size (% of experts)")
        ax.set_ylabel("hit rate (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
