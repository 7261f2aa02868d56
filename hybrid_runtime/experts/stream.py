"""Layerwise prefill offload: whole experts streamed to the GPU through a ring of buffers.

A large prefill batch touches most of a layer's experts, and computing them on the GPU pays once
the CPU would take longer than PCIe takes to move them (hybrid.PrefillPolicy). The uploads go
through `n` preallocated expert buffers (plan.prefill_slots), in the order the compute uses them:

    RAM (GGUF blocks) --pack--> pinned staging[i] --copy stream--> ring[i] --compute--> release(i)

A buffer is refilled once the compute queued on it is released (the copy stream waits for that
event, the host does not), so the copy engine runs up to `n` experts ahead of the compute. At the
end of layer L's experts the stream is told which experts layer L+1 will likely use (all of them
when the batch covers the layer, else the speculative router's guess): their uploads start while
layer L's compute, layer L+1's attention and its routing sync still run. At layer L+1 the
experts already uploaded are computed first; wrong guesses are dropped.

The host waits only to reuse a staging buffer (its previous copy must be done): that paces the
packing at PCIe speed. On a CPU stand-in (tests) the copies are plain synchronous copies.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from hybrid_runtime.experts.gpu_cache import ExpertLayout, GpuExpertCache
from hybrid_runtime.weights.gguf_file import TensorRef

Refs3 = tuple[TensorRef, TensorRef, TensorRef]
Raw3 = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Layer L+1 is predicted to use every expert once a batch of T tokens covers this fraction of
# them in expectation: 1 - (1 - K/E)**T (K2: 143 tokens; the offload itself starts near 1,250).
COVER_ALL = 0.9
PACK_THREADS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def expected_distinct(n_tokens: int, n_used: int, n_expert: int) -> float:
    """Distinct experts that n_tokens uniform routings of n_used of n_expert touch, in expectation."""
    return n_expert * (1.0 - (1.0 - n_used / n_expert) ** n_tokens)


@dataclass(slots=True)
class StreamCounters:
    uploads: int = 0  # experts copied into the ring
    prefetched: int = 0  # of which were queued before their layer's routing was known
    prefetch_used: int = 0  # predictions that the layer then used
    prefetch_wasted: int = 0  # predictions dropped (uploaded or not)
    wasted_uploads: int = 0  # of which had been uploaded already (PCIe time spent for nothing)
    max_loaded: int = 0  # most experts uploaded and not yet released at once (<= ring size)
    ready_at_begin: int = 0  # experts already uploaded when their layer's routing arrived (the overlap)


class ExpertStream:
    """A ring of `n_ring` expert buffers on `device`, fed in compute order, across layers."""

    def __init__(self, n_ring: int, device: torch.device | str, sources: dict[int, Refs3],
                 cache: GpuExpertCache | None = None):
        if n_ring < 2:
            raise ValueError("the prefill ring needs at least 2 buffers")
        self.device = torch.device(device)
        self.sources, self.cache = sources, cache
        self.layouts = {l: ExpertLayout.of(r) for l, r in sources.items()}
        self.layers = sorted(sources)
        self.slot_bytes = max((lay.n_bytes for lay in self.layouts.values()), default=0)
        self.pool = torch.empty(n_ring, self.slot_bytes, dtype=torch.uint8, device=self.device)  # [n, bytes]
        self._cuda = self.device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        staging = [torch.empty(self.slot_bytes, dtype=torch.uint8) for _ in range(n_ring)]
        self._staging = [s.pin_memory() for s in staging] if self._cuda else staging
        self._copied: list[object | None] = [None] * n_ring  # copy event: ring i filled, staging i reusable
        self._released: list[object | None] = [None] * n_ring  # compute event: ring i may be overwritten
        self._free: deque[int] = deque(range(n_ring))
        self._queue: deque[tuple[int, int]] = deque()  # (layer, expert) wanted, not yet uploaded
        self._loaded: dict[tuple[int, int], int] = {}  # uploaded, not yet released -> ring index
        self._predicted: set[tuple[int, int]] = set()
        self.counters = StreamCounters()
        # packing threads: the CPU experts are idle while a layer is offloaded
        self._packers = ThreadPoolExecutor(max_workers=PACK_THREADS, thread_name_prefix="ring-pack")

    @property
    def n_ring(self) -> int:
        return self.pool.shape[0]

    def next_layer(self, layer: int) -> int | None:
        later = [l for l in self.layers if l > layer]
        return later[0] if later else None

    # -- the consumer's protocol: begin_layer, then take/release each expert in the returned order --
    def begin_layer(self, layer: int, experts: list[int]) -> list[int]:
        """The layer's experts to compute, in the order to take them: uploaded ones first."""
        wanted = set(experts)
        for key in [k for k in self._loaded if k[0] != layer or k[1] not in wanted]:
            self._drop(key)
        for key in [k for k in self._predicted if k[0] != layer or k[1] not in wanted]:
            self._predicted.discard(key)
            self.counters.prefetch_wasted += 1
        queued = [k[1] for k in self._queue if k[0] == layer and k[1] in wanted]
        ready = [k[1] for k in self._loaded]  # insertion order = upload order
        self.counters.ready_at_begin += len(ready)
        seen = set(ready) | set(queued)
        order = ready + queued + [e for e in experts if e not in seen]
        for e in order:
            if (layer, e) in self._predicted:
                self._predicted.discard((layer, e))
                self.counters.prefetch_used += 1
        self._queue = deque((layer, e) for e in order[len(ready):])
        self._pump()
        return order

    def take(self, layer: int, e: int) -> tuple[Raw3, int]:
        """Expert e's raw gate/up/down on the device (the compute stream waits for its copy), ring index."""
        key = (layer, e)
        if key not in self._loaded:
            self._pump()
        if key not in self._loaded:
            raise RuntimeError(f"expert {e} of layer {layer} was taken out of order")
        i = self._loaded[key]
        ev = self._copied[i]
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        return self.layouts[layer].views(self.pool[i]), i

    def release(self, layer: int, e: int, i: int) -> None:
        """The compute queued so far is ring i's last use: it may be refilled."""
        del self._loaded[(layer, e)]
        if self._cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self._released[i] = ev
        self._free.append(i)
        self._pump()

    def prefetch(self, layer: int, experts) -> int:
        """Queue a guess of `layer`'s experts (in order) behind what is queued; returns how many."""
        if layer not in self.sources:
            return 0
        resident = self.cache.slot_map[layer] if self.cache is not None and layer in self.cache.sources else None
        n = 0
        for e in experts:
            key = (layer, int(e))
            if key in self._predicted or key in self._loaded or (resident is not None and resident[key[1]] >= 0):
                continue
            self._queue.append(key)
            self._predicted.add(key)
            n += 1
        self.counters.prefetched += n
        self._pump()
        return n

    def predict_next(self, layer: int, n_tokens: int, n_used: int, n_expert: int, guess: np.ndarray | None) -> int:
        """Queue layer L+1's likely experts after layer L's: all of them for a covering batch, else `guess`."""
        nxt = self.next_layer(layer)
        if nxt is None:
            return 0
        if expected_distinct(n_tokens, n_used, n_expert) >= COVER_ALL * n_expert:
            if self.cache is not None:  # the hottest first: the ring's head holds the surest bets
                return self.prefetch(nxt, np.argsort(-self.cache.stats.scores[nxt], kind="stable").tolist())
            return self.prefetch(nxt, range(n_expert))
        if guess is None:
            return 0
        ids, counts = np.unique(guess.reshape(-1), return_counts=True)
        return self.prefetch(nxt, ids[np.argsort(-counts, kind="stable")].tolist())

    def drain(self) -> None:
        """Wait for every copy in flight (tests, shutdown)."""
        for ev in self._copied:
            if ev is not None:
                ev.synchronize()

    # -- internals ------------------------------------------------------------------------------
    def _drop(self, key: tuple[int, int]) -> None:
        """An uploaded guess that was not used: its buffer is free (the copy stream keeps the order)."""
        i = self._loaded.pop(key)
        self._free.append(i)
        self.counters.wasted_uploads += 1

    def _pump(self) -> None:
        while self._free and self._queue:
            self._upload(self._queue.popleft(), self._free.popleft())

    def _upload(self, key: tuple[int, int], i: int) -> None:
        layer, e = key
        lay = self.layouts[layer]
        ev = self._copied[i]
        if ev is not None:
            ev.synchronize()  # staging i's previous copy: the host keeps PCIe pace here
        lay.pack(self.sources[layer], e, self._staging[i].numpy(), self._packers)
        n = lay.n_bytes
        if self._cuda:
            if self._released[i] is not None:
                self._copy_stream.wait_event(self._released[i])
            with torch.cuda.stream(self._copy_stream):
                self.pool[i, :n].copy_(self._staging[i][:n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._copy_stream)
            self._copied[i] = ev
        else:
            self.pool[i, :n].copy_(self._staging[i][:n])
        self._loaded[key] = i
        self.counters.uploads += 1
        self.counters.max_loaded = max(self.counters.max_loaded, len(self._loaded))
