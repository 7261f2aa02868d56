"""The compiled CPU step: the whole deepseek2 network for T new tokens in one Numba call.

`CompiledDeepSeek2` is the fast twin of models/deepseek2.DeepSeek2 (the readable definition and
the reference): same interface (`new_cache`, `forward`, `logits`), same arithmetic as the default
CPU path (activations rounded to Q8_K / Q8_0 as llama.cpp does, raw GGUF blocks read in place).
One call runs every layer (cpu/layers.py), a second the head; inside, the work is a handful of
`prange` regions per layer and no Python, no torch, no allocation.

Tokens of one call may belong to different sequences (`forward_batch`): each has its own
position and block table, and each token's arithmetic is independent of the others (a sequence's
logits are bit-identical alone and batched).
"""

from __future__ import annotations

import os
from collections import namedtuple

import numba
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT

from hybrid_runtime.config import GATING_SIGMOID, ModelConfig
from hybrid_runtime.cpu import table as tb
from hybrid_runtime.cpu.cache import BLOCK, LatentPool, PagedCache
from hybrid_runtime.errors import InvalidRequestError, UnsupportedModelError
from hybrid_runtime.quant.cpu_features import has_avx512_vnni
from hybrid_runtime.weights.gguf_file import GGUFModelFile

Weights = namedtuple("Weights", "space mats vecs va layers wp")
Acts = namedtuple("Acts", "X kq kn kd ks zq zd zs")
Scratch = namedtuple("Scratch", "jobs ident Y1 Q O Y2 Yx Yd q_abs qpe scores mx olat ids wts probs sel counts offsets "
                                "pair_tok pair_of_slot touched")
_POOL_SEQS = 4  # full contexts the latent pool holds before it grows


def threading_layer() -> str:
    """Numba's threading layer in use (or the one asked for, before the first parallel call)."""
    try:
        return numba.threading_layer()
    except ValueError:
        return str(numba.config.THREADING_LAYER)


SERIAL_WORK_ENV = "HYBRID_RUNTIME_SERIAL_WORK"


def serial_work() -> int:
    """Work (rows.run_jobs' units, about weight bytes) below which a projection or the attention
    core runs on the calling thread: rows.SERIAL_WORK, everything with one thread, or the value of
    $HYBRID_RUNTIME_SERIAL_WORK (for measuring the threshold on another machine)."""
    from hybrid_runtime.cpu.rows import SERIAL_WORK

    if numba.config.NUMBA_NUM_THREADS == 1:
        return 1 << 62
    raw = os.environ.get(SERIAL_WORK_ENV, "").strip()
    try:
        return max(0, int(raw)) if raw else SERIAL_WORK
    except ValueError:
        raise InvalidRequestError(f"${SERIAL_WORK_ENV} must be a whole number of bytes, not {raw!r}") from None


def acts(rows: int, width: int) -> Acts:
    w = max(256, -(-width // 256) * 256)
    return Acts(np.zeros((rows, w), np.float32), np.zeros((rows, w), np.int8), np.zeros((rows, w), np.int8),
                np.zeros((rows, w // 256), np.float32), np.zeros((rows, w // 16), np.int16),
                np.zeros((rows, w), np.int8), np.zeros((rows, w // 32), np.float32), np.zeros((rows, w // 16), np.int16))


def build_table(gf: GGUFModelFile, cfg: ModelConfig, experts: dict) -> tb.WeightTable:
    """The weight table of every layer; experts: {layer: (gate, up, down) TensorRefs}."""
    if not cfg.mla_split:
        raise UnsupportedModelError("the compiled step needs the attn_k_b/attn_v_b layout")
    t = tb.WeightTable(cfg.n_layer)

    def of(ref):  # the stored panels the loader made of this tensor, else its raw blocks
        sp = gf.panels.get(ref.name)
        return t.stored(sp) if sp is not None else t.matrix(ref.data, ref.ggml_type)

    def mat(name):
        return of(gf.tensor(name))

    def vec(name):
        return t.vector_of(gf, name)

    for i in range(cfg.n_layer):
        b = f"blk.{i}."
        put = lambda field, value: t.set(i, field, value)  # noqa: E731
        put(tb.F_ATTN_NORM, vec(b + "attn_norm.weight"))
        if cfg.q_lora_rank:
            put(tb.F_Q_A, mat(b + "attn_q_a.weight"))
            put(tb.F_Q_A_NORM, vec(b + "attn_q_a_norm.weight"))
            put(tb.F_Q_B, mat(b + "attn_q_b.weight"))
        else:
            put(tb.F_Q_B, mat(b + "attn_q.weight"))
        put(tb.F_KV_A, mat(b + "attn_kv_a_mqa.weight"))
        put(tb.F_KV_A_NORM, vec(b + "attn_kv_a_norm.weight"))
        for field, name in ((tb.F_K_B, "attn_k_b"), (tb.F_V_B, "attn_v_b")):
            ref = gf.tensor(f"{b}{name}.weight")
            put(field, t.head_panels(ref.data, ref.ggml_type) if gf.panels else t.matrix(ref.data, ref.ggml_type))
        put(tb.F_O, mat(b + "attn_output.weight"))
        put(tb.F_FFN_NORM, vec(b + "ffn_norm.weight"))
        if cfg.is_moe_layer(i):
            put(tb.F_MOE, 1)
            put(tb.F_ROUTER, mat(b + "ffn_gate_inp.weight"))
            if gf.has(b + "exp_probs_b.bias"):
                put(tb.F_BIAS, vec(b + "exp_probs_b.bias"))
            gate, up, down = experts[i]
            put(tb.F_GATE_X, of(gate))
            put(tb.F_UP_X, of(up))
            put(tb.F_DOWN_X, of(down))
            if cfg.n_expert_shared:
                for field, name in ((tb.F_GATE, "ffn_gate_shexp"), (tb.F_UP, "ffn_up_shexp"), (tb.F_DOWN, "ffn_down_shexp")):
                    put(field, mat(f"{b}{name}.weight"))
        else:
            put(tb.F_MOE, 0)
            for field, name in ((tb.F_GATE, "ffn_gate"), (tb.F_UP, "ffn_up"), (tb.F_DOWN, "ffn_down")):
                put(field, mat(f"{b}{name}.weight"))
    return t


class EntryPoints:
    """Calls a Numba function through the compiled entry point of its signature. The step's state
    is ~50 arrays in named tuples, and the dispatcher types every one of them on each call (10-12
    us a call measured here, a tenth of a tiny model's decode step); the entry point of the
    signature resolved on the first call only unboxes them (~3 us). Only for callers whose argument
    types never change: the step's own scratch and the arrays it makes itself."""

    def __init__(self):
        self._fns: dict = {}

    def __call__(self, fn, args: tuple):
        entry = self._fns.get(fn)
        if entry is not None:
            return entry(*args)
        out = fn(*args)  # compiles, or loads from the cache, the signature of these types
        sig = tuple(fn.typeof_pyval(a) for a in args)
        self._fns[fn] = fn.overloads[sig].entry_point
        return out


class CompiledDeepSeek2:
    """The deepseek2 network as one compiled call per step (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, gf: GGUFModelFile, experts: dict, rope, max_tokens: int,
                 prefill_net=None, prefill_min_tokens: int = 1 << 30):
        if not has_avx512_vnni():
            raise UnsupportedModelError("the compiled step needs AVX-512 VNNI")
        from hybrid_runtime.cpu import layers as L

        self.cfg, self.rope, self._L = cfg, rope, L
        self.store_report = gf.store_report
        self.table = build_table(gf, cfg, experts)
        t = self.table
        self.embed_ref = gf.tensor("token_embd.weight")
        head_ref = gf.tensor("token_embd.weight" if cfg.tied_output else "output.weight")
        sp = gf.panels.get(head_ref.name)
        self.head_mat = t.stored(sp) if sp is not None else t.matrix(head_ref.data, head_ref.ggml_type)
        self.norm_vec = t.vector_of(gf, "output_norm.weight")
        space, mats = t.finish()
        from hybrid_runtime.quant.gemm import scratch_panels

        max_nb = max([int(mats[i, tb.M_NB]) for i in range(len(mats)) if mats[i, tb.M_KIND] >= tb.P_Q4_K], default=1)
        wp = scratch_panels(numba.config.NUMBA_NUM_THREADS, max_nb)  # indexed by Numba's thread id
        self.w = Weights(space, mats, t.vecs, t.vec_arena, t.layers, wp)
        # chunks of >= prefill_min_tokens tokens go through the torch model (oneDNN GEMMs beat the
        # row kernels there); it reads and writes the same paged cache
        self.prefill_net, self.prefill_min_tokens = prefill_net, prefill_min_tokens
        self.expert_types = {r.ggml_type for refs in experts.values() for r in refs}
        # bytes of one routed expert (gate + up + down) per layer, for the expert-read counter
        self._expert_bytes = np.zeros(cfg.n_layer, np.int64)
        for i, refs in experts.items():
            self._expert_bytes[i] = sum(int(gf.panels[r.name].nbytes if r.name in gf.panels else r.data.nbytes)
                                        for r in refs) // max(cfg.n_expert, 1)
        self.max_tokens = max_tokens
        self.dm, self.fd = self._dims()
        self._scratch(max_tokens)
        self.pool: LatentPool | None = None
        self._rope_of = None
        self._entry = EntryPoints()
        self._head_rows = int(self.w.mats[self.head_mat, tb.M_ROWS])

    # -- setup ----------------------------------------------------------------------------------
    def _dims(self):
        c, L = self.cfg, self._L
        dm = np.zeros(L.N_DIMS, np.int64)
        dm[[L.D_D, L.D_H, L.D_N, L.D_R, L.D_V, L.D_C, L.D_QL]] = (c.n_embd, c.n_head, c.qk_nope, c.qk_rope,
                                                                 c.v_head, c.kv_lora_rank, c.q_lora_rank)
        dm[[L.D_E, L.D_K, L.D_NG, L.D_NGU]] = (max(c.n_expert, 1), max(c.n_expert_used, 1), c.n_group, c.n_group_used)
        dm[L.D_GATING] = 2 if c.gating == GATING_SIGMOID else 1
        dm[L.D_WNORM], dm[L.D_BS] = int(c.weights_norm), BLOCK
        dm[L.D_CHUNKS] = 4 * numba.config.NUMBA_NUM_THREADS
        # heads per attention work item: one group per thread (at most 16 heads share a pass)
        dm[L.D_HG] = max(1, min(16, -(-c.n_head // numba.config.NUMBA_NUM_THREADS)))
        dm[L.D_SERIAL] = serial_work()
        fd = np.array([c.rms_eps, c.attn_scale, c.weights_scale], np.float64)
        return dm, fd

    def _scratch(self, T: int) -> None:
        c, mats = self.cfg, self.w.mats
        H, K, E = c.n_head, max(c.n_expert_used, 1), max(c.n_expert, 1)
        lt = self.table.layers
        ff = [mats[m, tb.M_ROWS] for m in lt[:, [tb.F_GATE, tb.F_GATE_X]].ravel() if m >= 0]
        F = max(ff) if ff else 1
        n_th = numba.config.NUMBA_NUM_THREADS
        hq = H * (c.qk_nope + c.qk_rope)
        P = T * (K + 1)
        width = max(c.n_embd, c.q_lora_rank, H * c.v_head, F, c.kv_lora_rank)
        self.a = acts(P, width)
        hg = int(self.dm[self._L.D_HG])
        hgp = -(-hg // self._L.HT) * self._L.HT  # a head group padded to whole register tiles
        self.ah = acts(T * H + n_th * hg, max(c.qk_nope, c.kv_lora_rank))
        y1 = max((c.q_lora_rank or hq) + c.kv_lora_rank + c.qk_rope, E + 2 * F)
        self.s = Scratch(
            jobs=np.zeros((2 * E + 8, 5), np.int64), ident=np.arange(P, dtype=np.int64),
            Y1=np.zeros((T, y1), np.float32), Q=np.zeros((T, hq), np.float32),
            O=np.zeros((T, H * c.v_head), np.float32), Y2=np.zeros((T, c.n_embd), np.float32),
            Yx=np.zeros((P, 2 * F), np.float32), Yd=np.zeros((P, c.n_embd), np.float32),
            q_abs=np.zeros((n_th, hgp * c.kv_lora_rank), np.float32), qpe=np.zeros((n_th, hgp * c.qk_rope), np.float32),
            scores=np.zeros((n_th, 4 * self._L.HT), np.float32), mx=np.zeros((n_th, hgp), np.float32),
            olat=np.zeros((n_th, hgp, c.kv_lora_rank), np.float32),
            ids=np.zeros((T, K), np.int64), wts=np.zeros((T, K), np.float32), probs=np.zeros(E, np.float32),
            sel=np.zeros(E, np.float32), counts=np.zeros(E, np.int64), offsets=np.zeros(E + 1, np.int64),
            pair_tok=np.zeros(T * K, np.int64), pair_of_slot=np.zeros(T * K, np.int64),
            touched=np.zeros(c.n_layer, np.int64))
        self.logit_rows = np.arange(T, dtype=np.int64)

    def _fit_context(self, n_ctx: int) -> None:
        hgp = self.s.mx.shape[1]
        if self.dm[self._L.D_LMAX] < n_ctx:  # scores: [threads, padded heads per group * n_ctx + a tile]
            self.s = self.s._replace(scores=np.zeros((self.s.scores.shape[0], hgp * n_ctx + 4 * self._L.HT), np.float32))
            self.dm[self._L.D_LMAX] = n_ctx
        if self.rope._cos.shape[0] < n_ctx:
            self.rope._table(n_ctx)
        if self._rope_of is not self.rope._cos:  # numpy views of the table, made when it grows
            self.cos = np.ascontiguousarray(self.rope._cos.numpy())
            self.sin = np.ascontiguousarray(self.rope._sin.numpy())
            self._rope_of = self.rope._cos

    def expert_reads(self) -> tuple[int, int]:
        """(routed experts read, their bytes) over every step so far: an expert chosen by several
        tokens of a step is read once for all of them."""
        t = self.s.touched
        return int(t.sum()), int((t * self._expert_bytes).sum())

    def describe(self) -> str:
        return f"all weights on the CPU, compiled step ({threading_layer()} threading layer)"

    def describe_experts(self) -> str:
        kinds = sorted({QT(int(t)).name for t in self.expert_types})
        from hybrid_runtime.experts.store import where

        return f"Numba kernels {'/'.join(kinds)}, {where(self.store_report)}" if kinds else "none (dense model)"

    # -- the model interface ----------------------------------------------------------------------
    def new_cache(self, capacity: int) -> PagedCache:
        c = self.cfg
        if self.pool is None:
            self.pool = LatentPool(c.n_layer, c.kv_lora_rank, c.qk_rope, _POOL_SEQS * (-(-capacity // BLOCK)))
        self._fit_context(capacity)
        return PagedCache(self.pool, capacity)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        from hybrid_runtime.quant.kernels import dequantize_rows

        ref = self.embed_ref
        rows = ref.data[tokens]
        if ref.ggml_type == QT.F32:
            return np.array(rows, np.float32)
        return np.ascontiguousarray(dequantize_rows(ref.ggml_type, rows), np.float32)

    def forward(self, tokens: torch.Tensor, cache: PagedCache) -> torch.Tensor:
        """tokens [T] at positions cache.n_tokens.. -> hidden [T, D] (before the final norm)."""
        ids = np.asarray(tokens, np.int64).reshape(-1)
        T, start = ids.shape[0], cache.n_tokens
        if self.prefill_net is not None and T >= self.prefill_min_tokens:
            return self.prefill_net.hidden(torch.as_tensor(ids), cache)
        x = self._run(ids, *self._one_sequence(T, start, cache))
        cache.commit(T)
        return torch.from_numpy(x)

    def forward_last_logits(self, ids: list[int], cache: PagedCache) -> np.ndarray:
        """Decode's path: tokens [T] (T <= max_tokens) at positions cache.n_tokens.. -> float32
        logits [1, vocab] of the last, the layers and the head in one compiled call; the same bits
        as logits(forward(ids, cache)[-1:])."""
        T, start = len(ids), cache.n_tokens
        if (self.prefill_net is not None and T >= self.prefill_min_tokens) or T > self.max_tokens:
            return self.logits(self.forward(torch.as_tensor(ids), cache)[-1:]).numpy()
        ids = np.asarray(ids, np.int64)
        pos, btab = self._one_sequence(T, start, cache)
        self._fit_context(start + T)
        out = self._decode(self.embed(ids), pos, btab)
        cache.commit(T)
        return out

    def _decode(self, x: np.ndarray, pos: np.ndarray, btab: np.ndarray) -> np.ndarray:
        """The one compiled call of a decode step (bench.timing times it): x [T, D] -> logits [1, V]."""
        out = np.empty((1, self._head_rows), np.float32)
        self._entry(self._L.step_and_head, (self.w, self.dm, self.fd, x, x.shape[0], pos, btab, self.pool.lat,
                                            self.pool.pe, self.cos, self.sin, self.s, self.a, self.ah,
                                            self.cfg.n_layer, self.norm_vec, self.head_mat, out))
        return out

    @staticmethod
    def _one_sequence(T: int, start: int, cache: PagedCache):
        """Positions and block table rows of T tokens of one sequence from `start`."""
        cache.reserve(start + T)
        pos = np.arange(start, start + T, dtype=np.int64)
        return pos, (cache.table.reshape(1, -1) if T == 1 else np.tile(cache.table, (T, 1)))

    def forward_batch(self, tokens, caches: list[PagedCache]) -> torch.Tensor:
        """One new token for each of B sequences -> hidden [B, D]; each cache grows by one."""
        ids = np.asarray(tokens, np.int64).reshape(-1)
        return self.forward_segments([[int(t)] for t in ids], caches)

    def forward_segments(self, segments: list, caches: list[PagedCache]) -> torch.Tensor:
        """Several sequences' new tokens in one step (a decode token, or a short prompt chunk, each
        at its cache's next positions) -> hidden [S, D] of every segment's last token; each cache
        grows by its segment. Every token's arithmetic is what it gets alone, so a prompt chunk
        computed here equals `forward(chunk, cache)` below prefill_min_tokens, bit for bit."""
        lens = [len(seg) for seg in segments]
        if len(segments) != len(caches) or min(lens, default=0) < 1:
            raise ValueError("one non-empty segment per cache")
        ids = np.asarray([t for seg in segments for t in seg], np.int64)
        pos = np.empty(len(ids), np.int64)
        for cache, n in zip(caches, lens):
            cache.reserve(cache.n_tokens + n)
        width = max(len(c.table) for c in caches)
        btab = np.zeros((len(ids), width), np.int64)
        last, i = [], 0
        for cache, n in zip(caches, lens):
            pos[i: i + n] = np.arange(cache.n_tokens, cache.n_tokens + n)
            btab[i: i + n, : len(cache.table)] = cache.table
            i += n
            last.append(i - 1)
        x = self._run(ids, pos, btab)
        for cache, n in zip(caches, lens):
            cache.commit(n)
        return torch.from_numpy(np.ascontiguousarray(x[last]))

    def _run(self, ids: np.ndarray, pos: np.ndarray, btab: np.ndarray) -> np.ndarray:
        if ids.shape[0] > self.max_tokens:
            raise ValueError(f"{ids.shape[0]} tokens in one step; the scratch holds {self.max_tokens}")
        self._fit_context(int(pos.max()) + 1)
        x = self.embed(ids)
        pool = self.pool
        self._entry(self._L.model_layers, (self.w, self.dm, self.fd, x, ids.shape[0], pos, btab, pool.lat, pool.pe,
                                           self.cos, self.sin, self.s, self.a, self.ah, 0, self.cfg.n_layer))
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, D] from forward -> logits [n, vocab] (final norm, then the head)."""
        x = np.ascontiguousarray(hidden.numpy(), np.float32)
        n = x.shape[0]
        out = np.empty((n, self.w.mats[self.head_mat, tb.M_ROWS]), np.float32)
        for i in range(0, n, self.max_tokens):  # the scratch holds max_tokens rows
            part = x[i: i + self.max_tokens]
            self._L.head(self.w, self.dm, self.fd, part, self.logit_rows, part.shape[0], self.norm_vec,
                         self.head_mat, self.s, self.a, out[i: i + self.max_tokens])
        return torch.from_numpy(out)
