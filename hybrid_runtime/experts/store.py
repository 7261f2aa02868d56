"""The routed-expert store: where the expert bytes live before the CPU kernels read them.

- `mmap` (default): read in place from the mapped file, zero copy. Pages are faulted in at load
  (MADV_WILLNEED, then one read per page) with a progress bar, so that decode never waits on the
  disk: a token touches 8 random experts per layer, ~230 MB at Kimi K2 shapes.
- `lazy`: in place, faulted in on first use (fast start; the first tokens wait on the disk).
- `hugepages`: copied into anonymous 2 MiB-aligned memory advised MADV_HUGEPAGE (fewer TLB
  misses on a 600 GB working set); the file's page cache can then be dropped by the kernel.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numba
import numpy as np
from numba import prange

from hybrid_runtime.numa import memory
from hybrid_runtime.weights.gguf_file import TensorRef

PAGE = 4096
_CHUNK = 256 << 20  # bytes faulted or copied per progress update


@numba.njit(parallel=True, nogil=True, cache=True)
def _touch(buf, stride):  # read one byte per page of buf (uint8 [N]); returns their sum
    n = (buf.shape[0] + stride - 1) // stride
    total = 0
    for i in prange(n):
        total += buf[i * stride]
    return total


@dataclass(slots=True)
class StoreReport:
    mode: str
    bytes: int
    seconds: float


def _pieces(a: np.ndarray):
    """Contiguous flat uint8 pieces of a tensor (one per expert when it is a strided view)."""
    if a.flags.c_contiguous:
        flat = a.reshape(-1).view(np.uint8)
        for start in range(0, flat.shape[0], _CHUNK):
            yield flat[start : start + _CHUNK]
    else:  # a fused gate_up split: each expert's rows are contiguous
        for e in range(a.shape[0]):
            yield np.ascontiguousarray(a[e]).reshape(-1).view(np.uint8) if not a[e].flags.c_contiguous \
                else a[e].reshape(-1).view(np.uint8)


def _progress(total: int, label: str, show: bool):
    if not show:
        return nullcontext(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    p = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
    p.add_task(label, total=total)
    return p


def prepare(layers: dict[int, tuple[TensorRef, ...]], mode: str = "mmap", show_progress: bool = True,
            ) -> tuple[dict[int, tuple[TensorRef, ...]], StoreReport]:
    """Fault in (mmap) or copy (hugepages) every routed-expert tensor; returns the refs to use."""
    import time

    total = sum(r.n_bytes for refs in layers.values() for r in refs)
    t0 = time.perf_counter()
    out: dict[int, tuple[TensorRef, ...]] = {}
    label = "faulting in experts" if mode == "mmap" else "copying experts to huge pages"
    with _progress(total, label, show_progress and total > (64 << 20)) as bar:
        for layer, refs in layers.items():
            out[layer] = tuple(_prepare_one(r, mode, bar) for r in refs)
    return out, StoreReport(mode, total, time.perf_counter() - t0)


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.advance(bar.task_ids[0], n)


def _prepare_one(ref: TensorRef, mode: str, bar) -> TensorRef:
    if mode == "lazy":
        return ref
    if mode == "mmap":
        for piece in _pieces(ref.data):
            memory.madvise(piece, memory.MADV_WILLNEED)
            _touch(piece, PAGE)
            _advance(bar, piece.shape[0])
        return ref
    buf = memory.alloc(ref.data.nbytes, huge=True)  # np.frombuffer keeps the mapping alive
    data = buf.array.view(ref.data.dtype).reshape(ref.data.shape)
    for e in range(ref.data.shape[0]):  # expert by expert, so the progress bar moves
        data[e] = ref.data[e]
        _advance(bar, data[e].nbytes)
    return TensorRef(ref.name, ref.ggml_type, ref.shape, data, ref.n_bytes, ref.part)
