"""Hot routed experts on the GPU: a fixed pool of slots, routing statistics and a prefetcher.

Each slot is one preallocated uint8 row holding an expert's raw GGUF blocks back to back:

    slot bytes: | gate [F, gate_row_bytes] | up [F, up_row_bytes] | down [D, down_row_bytes] | pad |

(a layer's own quant types decide the sizes; the slot is as large as the largest layer's expert).
Routing statistics keep a decayed frequency per (layer, expert). After a layer's GPU work is
queued, the prefetcher admits experts whose score beats the coldest resident one by
ADMIT_MARGIN, copying them from pinned staging on a side stream; a slot is marked resident
only once its copy event has completed, so decode never waits on a copy.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hybrid_runtime.errors import InvalidRequestError
from hybrid_runtime.util import write_atomic
from hybrid_runtime.weights.gguf_file import TensorRef

# Per routed token, every score is multiplied by this: a half-life of ~140 tokens (ln 2 / 0.005).
DECAY_PER_TOKEN = 0.995
# A candidate replaces the coldest resident expert only when its score is this many times higher
# (hysteresis: without it two experts of equal heat would evict each other on every token).
ADMIT_MARGIN = 1.25
# Copies started per layer and step: one K2 expert is ~28 MB, ~1 ms of PCIe 4 x16; decode must
# never queue more than the bus moves while the CPU computes the layer (~0.5-1 ms).
MAX_COPIES_PER_STEP = 2
N_STAGING = 4  # pinned staging buffers in rotation
PACK_CHUNK = 4 << 20  # bytes per piece of a parallel pack
PROFILE_VERSION = 1


@dataclass(slots=True, frozen=True)
class ExpertLayout:
    """Byte layout of one expert of one layer inside a slot."""

    types: tuple[int, int, int]  # gate, up, down GGML types
    shapes: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (rows, row_bytes) each
    @property
    def sizes(self) -> tuple[int, int, int]:
        return tuple(r * b for r, b in self.shapes)

    @property
    def n_bytes(self) -> int:
        return sum(self.sizes)

    @classmethod
    def of(cls, refs: tuple[TensorRef, TensorRef, TensorRef]) -> "ExpertLayout":
        return cls(tuple(int(r.ggml_type) for r in refs),
                   tuple((int(r.data.shape[1]), int(r.data.shape[-1])) for r in refs))

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """flat uint8 [>= n_bytes] -> raw gate [F, rb], up [F, rb], down [D, rb]."""
        out, start = [], 0
        for (rows, rb), size in zip(self.shapes, self.sizes):
            out.append(flat[start : start + size].view(rows, rb))
            start += size
        return tuple(out)

    def pack(self, refs: tuple[TensorRef, TensorRef, TensorRef], e: int, out: np.ndarray,
             pool: ThreadPoolExecutor | None = None) -> None:
        """Copy expert e's raw blocks from the mapped file into out (uint8 [>= n_bytes]).

        pool: copy in PACK_CHUNK pieces on these threads (numpy releases the GIL while copying):
        one thread moves ~10 GB/s, less than PCIe 4 x16 takes, so the prefill ring packs in parallel.
        """
        pieces, start = [], 0
        for ref, size in zip(refs, self.sizes):
            src = np.ascontiguousarray(ref.data[e]).reshape(-1)
            step = size if pool is None else PACK_CHUNK
            pieces += [(start + s, src[s : s + step]) for s in range(0, size, step)]
            start += size

        def copy(piece) -> None:
            at, src = piece
            out[at : at + src.size] = src

        if pool is None:
            for piece in pieces:
                copy(piece)
        else:
            list(pool.map(copy, pieces))


class RoutingStats:
    """Decayed routing frequency per (layer, expert): scores [n_layer, E]."""

    def __init__(self, n_layer: int, n_expert: int, decay: float = DECAY_PER_TOKEN):
        self.scores = np.zeros((n_layer, n_expert), dtype=np.float64)
        self.counts = np.zeros((n_layer, n_expert), dtype=np.int64)  # undecayed, for profiles
        self.tokens = np.zeros(n_layer, dtype=np.int64)
        self.decay = decay

    def update(self, layer: int, ids: np.ndarray) -> None:
        """ids [T, K] of one layer's routing."""
        row = self.scores[layer]
        row *= self.decay ** ids.shape[0]
        self.tokens[layer] += ids.shape[0]
        flat = ids.reshape(-1)
        np.add.at(row, flat, 1.0)
        np.add.at(self.counts[layer], flat, 1)

    def save_profile(self, path: str | Path) -> None:
        """JSON {version, n_expert, tokens: {layer: n}, layers: {layer: [counts]}} of the layers that saw tokens.

        Written to a temporary file in the same directory and renamed over `path`: a crash never
        leaves a half-written profile. Raises OSError when it cannot be written.
        """
        seen = [l for l in range(len(self.counts)) if self.tokens[l]]
        text = json.dumps({
            "version": PROFILE_VERSION, "n_expert": self.counts.shape[1],
            "tokens": {str(l): int(self.tokens[l]) for l in seen},
            "layers": {str(l): self.counts[l].tolist() for l in seen}})
        write_atomic(Path(path), text)

    def load_profile(self, path: str | Path) -> None:
        """Start warm: counts from a saved profile, scores at the steady state of their rates.

        Raises InvalidRequestError (naming the file) when it is unreadable, not a profile, or made
        for a model of another shape; the statistics are unchanged then.
        """
        n_expert, tokens, layers = read_profile(path)
        if n_expert != self.counts.shape[1]:
            raise InvalidRequestError(f"expert profile {path} is for {n_expert} experts per layer; "
                                      f"this model has {self.counts.shape[1]}")
        beyond = [l for l in layers if l >= len(self.counts)]
        if beyond:
            raise InvalidRequestError(f"expert profile {path} has layer {beyond[0]}; "
                                      f"this model has {len(self.counts)} layers")
        for layer, counts in layers.items():
            self.counts[layer], self.tokens[layer] = counts, tokens.get(layer, 0)
            rate = counts / max(self.tokens[layer], 1)  # routes per token
            self.scores[layer] = rate / (1.0 - self.decay)  # the decayed sum's steady state


def read_profile(path: str | Path) -> tuple[int, dict[int, int], dict[int, np.ndarray]]:
    """A saved routing profile -> (n_expert, tokens per layer, counts [n_expert] per layer).

    Checks the format only (not a model's shape); InvalidRequestError naming the file otherwise.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read expert profile {path} ({e.strerror or e})") from None
    try:
        data = json.loads(raw)
    except ValueError as e:  # includes UnicodeDecodeError
        raise InvalidRequestError(f"expert profile {path} is not JSON ({e})") from None
    if not isinstance(data, dict) or "version" not in data:
        raise InvalidRequestError(f"{path} is not an expert profile (expected a JSON object with a version)")
    if data["version"] != PROFILE_VERSION:
        raise InvalidRequestError(f"expert profile {path} has version {data['version']!r}; "
                                  f"this runtime reads version {PROFILE_VERSION}")
    try:
        return _profile_fields(data)
    except KeyError as e:
        raise InvalidRequestError(f"expert profile {path} lacks the field {e}") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        raise InvalidRequestError(f"expert profile {path} is malformed ({e})") from None


def _profile_fields(data: dict) -> tuple[int, dict[int, int], dict[int, np.ndarray]]:
    n_expert = data["n_expert"]
    if type(n_expert) is not int or n_expert < 1:
        raise ValueError(f"n_expert must be a positive integer, not {n_expert!r}")
    for name in ("tokens", "layers"):
        if not isinstance(data[name], dict):
            raise ValueError(f"{name} must be an object keyed by layer number")
    tokens = {_layer(k): _count(v, "token count") for k, v in data["tokens"].items()}
    layers = {}
    for k, v in data["layers"].items():
        if not isinstance(v, list) or len(v) != n_expert:
            raise ValueError(f"layer {k} must list {n_expert} counts")
        layers[_layer(k)] = np.array([_count(c, "count") for c in v], dtype=np.int64)
    if set(layers) - set(tokens):
        raise ValueError(f"no token count for layer {min(set(layers) - set(tokens))}")
    return n_expert, tokens, layers


def _layer(key: str) -> int:
    if not key.isdigit():
        raise ValueError(f"{key!r} is not a layer number")
    return int(key)


def _count(v, what: str) -> int:
    if type(v) is not int or not 0 <= v < 1 << 62:
        raise ValueError(f"{what} {v!r} is not an integer in [0, 2**62)")
    return v


@dataclass(slots=True)
class _Copy:
    slot: int
    key: tuple[int, int]
    event: object | None
    staging: int


@dataclass(slots=True)
class CacheCounters:
    hits: int = 0
    misses: int = 0
    copies: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.hits + self.misses, 1)


class GpuExpertCache:
    """A pool of `n_slots` expert slots on `device`, filled by the prefetcher."""

    def __init__(self, n_slots: int, device: torch.device | str, sources: dict[int, tuple[TensorRef, TensorRef, TensorRef]],
                 n_layer: int, n_expert: int, stats: RoutingStats | None = None):
        self.device = torch.device(device)
        self.sources = sources
        self.layouts = {l: ExpertLayout.of(refs) for l, refs in sources.items()}
        self.slot_bytes = max((lay.n_bytes for lay in self.layouts.values()), default=0)
        self.pool = torch.empty(n_slots, self.slot_bytes, dtype=torch.uint8, device=self.device)  # [S, bytes]
        self.owner_layer = np.full(n_slots, -1, dtype=np.int64)
        self.owner_expert = np.full(n_slots, -1, dtype=np.int64)
        self.slot_map = np.full((n_layer, n_expert), -1, dtype=np.int64)  # resident slot or -1
        self.stats = stats or RoutingStats(n_layer, n_expert)
        self.counters = CacheCounters()
        self._pending: list[_Copy] = []
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._staging = [self._new_staging() for _ in range(N_STAGING if self._cuda else 1)]
        self._staging_free = [None] * len(self._staging)  # event after which a buffer is reusable
        self._next_staging = 0

    @property
    def n_slots(self) -> int:
        return self.pool.shape[0]

    def _new_staging(self) -> torch.Tensor:
        buf = torch.empty(self.slot_bytes, dtype=torch.uint8)
        return buf.pin_memory() if self._cuda else buf

    # -- lookups (decode path) --------------------------------------------------------------------
    def lookup(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Resident slot of every routed id (same shape), -1 where the expert is not on the GPU."""
        slots = self.slot_map[layer][ids]
        hit = int((slots >= 0).sum())
        self.counters.hits += hit
        self.counters.misses += slots.size - hit
        return slots

    def expert(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.layouts[layer].views(self.pool[slot])

    # -- statistics and prefetch ------------------------------------------------------------------
    def observe(self, layer: int, ids: np.ndarray) -> None:
        self.stats.update(layer, ids)

    def after_layer(self, layer: int, extra: np.ndarray | None = None) -> None:
        """Called once the layer's GPU work is queued: finish copies, admit newly hot experts.

        `extra`: speculative ids for this layer (e.g. layer L+1's router on layer L's hidden).
        """
        self.poll()
        if self.n_slots == 0 or layer not in self.sources:
            return
        scores = self.stats.scores[layer]
        cand = np.argsort(-scores)[: 4 * MAX_COPIES_PER_STEP]
        if extra is not None:
            cand = np.concatenate([np.unique(extra.reshape(-1)), cand])
        started = 0
        for e in cand.tolist():
            if started == MAX_COPIES_PER_STEP or scores[e] <= 0 and extra is None:
                break
            if self.slot_map[layer, e] >= 0 or self._is_pending(layer, e):
                continue
            slot = self._slot_for(scores[e])
            if slot < 0:
                break
            self._start_copy(slot, layer, e)
            started += 1

    def _is_pending(self, layer: int, e: int) -> bool:
        return any(c.key == (layer, e) for c in self._pending)

    def _slot_for(self, score: float) -> int:
        """A free slot, else the coldest resident one if `score` beats it by ADMIT_MARGIN; -1: none."""
        busy = {c.slot for c in self._pending}
        free = np.flatnonzero(self.owner_layer < 0)
        free = [s for s in free.tolist() if s not in busy]
        if free:
            return free[0]
        owned = np.flatnonzero(self.owner_layer >= 0)
        owned = owned[[s not in busy for s in owned.tolist()]] if busy else owned
        if owned.size == 0:
            return -1
        heat = self.stats.scores[self.owner_layer[owned], self.owner_expert[owned]]
        i = int(np.argmin(heat))
        return int(owned[i]) if score > ADMIT_MARGIN * heat[i] else -1

    def _evict(self, slot: int) -> None:
        layer, e = int(self.owner_layer[slot]), int(self.owner_expert[slot])
        if layer >= 0:
            self.slot_map[layer, e] = -1
            self.counters.evictions += 1
        self.owner_layer[slot] = self.owner_expert[slot] = -1

    def _start_copy(self, slot: int, layer: int, e: int) -> None:
        self._evict(slot)
        self.owner_layer[slot], self.owner_expert[slot] = layer, e  # reserved; resident after the copy
        lay = self.layouts[layer]
        i = self._take_staging()
        lay.pack(self.sources[layer], e, self._staging[i].numpy())
        n = lay.n_bytes
        self.counters.copies += 1
        if not self._cuda:
            self.pool[slot, :n].copy_(self._staging[i][:n])
            self.slot_map[layer, e] = slot
            return
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # the layer's reads of the slot first
        with torch.cuda.stream(self._stream):
            self.pool[slot, :n].copy_(self._staging[i][:n], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._staging_free[i] = event
        self._pending.append(_Copy(slot, (layer, e), event, i))

    def _take_staging(self) -> int:
        i = self._next_staging
        self._next_staging = (i + 1) % len(self._staging)
        ev = self._staging_free[i]
        if ev is not None:
            ev.synchronize()  # only when N_STAGING copies are still in flight
        return i

    def poll(self) -> None:
        """Mark slots whose copies have completed as resident (never blocks)."""
        still = []
        for c in self._pending:
            if c.event is None or c.event.query():
                self.slot_map[c.key] = c.slot
            else:
                still.append(c)
        self._pending = still

    def drain(self) -> None:
        """Wait for every copy in flight (tests, shutdown)."""
        for c in self._pending:
            if c.event is not None:
                c.event.synchronize()
        self.poll()

    def warm_start(self) -> int:
        """Fill slots with the globally hottest experts of the current statistics; returns how many."""
        layers = sorted(self.sources)
        if not layers or self.n_slots == 0:
            return 0
        scores = self.stats.scores[layers]  # [L, E]
        order = np.argsort(-scores, axis=None)[: self.n_slots]
        n = 0
        for flat in order.tolist():
            li, e = divmod(flat, scores.shape[1])
            if scores[li, e] <= 0:
                break
            self._start_copy(n, layers[li], e)
            n += 1
        self.drain()
        return n


@dataclass(slots=True)
class RoutingRecorder:
    """Append per-layer routing (ids [T, K]) to a JSON-lines file: {"layer": L, "ids": [[...], ...]}."""

    path: Path
    _file: object = field(default=None, repr=False)

    def record(self, layer: int, ids: np.ndarray) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps({"layer": int(layer), "ids": ids.tolist()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def load_routing(path: str | Path) -> dict[int, np.ndarray]:
    """A recorded routing file -> per layer ids [n_tokens, K] in recording order."""
    per_layer: dict[int, list[np.ndarray]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    per_layer.setdefault(int(rec["layer"]), []).append(np.asarray(rec["ids"], dtype=np.int64))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidRequestError(f"cannot read routing record {path} ({e})") from None
    return {l: np.concatenate(chunks) for l, chunks in per_layer.items()}
