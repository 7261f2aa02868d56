"""The weight store: where the bytes the CPU kernels read live before they read them.

- `hugepages`: copied into anonymous 2 MiB-aligned memory advised MADV_HUGEPAGE; the file's pages
  are released from this process's mapping as each tensor is copied (so RSS stays about the file
  size) and the kernel may drop them from the page cache. Decode is faster: a token reads 8 random
  experts per layer (~230 MB at Kimi K2 shapes), and with 4 KiB pages every page is a TLB miss and
  a restart of the hardware prefetcher (medium-12L: 30.2 -> 38.8 t/s, benchmarks.md).
- `mmap`: read in place from the mapped file, zero copy. Pages are faulted in at load
  (MADV_WILLNEED, then one read per page) with a progress bar, so decode never waits on the disk.
- `lazy`: in place, faulted in on first use (fast start; the first tokens wait on the disk).
- `panels`: the matrices the compiled CPU step reads are repacked once into stored panels
  (quant/gemm.py: 16 rows interleaved so that a vector lane is an output row; the raw blocks'
  size, +3 % for Q4_K) in anonymous memory advised MADV_HUGEPAGE, and their file pages are
  released from this process's mapping: the panels replace the raw blocks, which stay readable
  in place (mmap) for the paths that want them (bf16 / exact prefill). Tensors without a panel
  layout (other types or shapes, MLA's per-head attn_k_b / attn_v_b, the embedding) are stored
  as `hugepages` would (or `mmap` without THP).
- `auto` (the default): `panels` where the caller asks for them (the compiled CPU step on a CPU
  with AVX-512 VNNI) and the copy fits in the available memory, else `hugepages` where the kernel
  grants transparent huge pages on request and the copy fits, else `mmap`.

On the CPU-only path the store prepares every tensor the step reads (all but an untied token
embedding, which is only gathered from); with a GPU, just the routed experts of the CPU's layers.
"""

from __future__ import annotations

import os
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
    """A whole (contiguous) tensor as flat uint8 pieces of at most _CHUNK bytes."""
    flat = a.reshape(-1).view(np.uint8)
    for start in range(0, flat.shape[0], _CHUNK):
        yield start, flat[start: start + _CHUNK]


def _progress(total: int, label: str, show: bool):
    if not show:
        return nullcontext(None)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    p = Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
    p.add_task(label, total=total)
    return p


MODES = ("auto", "panels", "mmap", "lazy", "hugepages")


def _fits(n_bytes: int) -> bool:
    import psutil

    return n_bytes * 1.05 + (1 << 30) <= psutil.virtual_memory().available


def resolve(mode: str, n_bytes: int, panels: bool = False) -> str:
    """The store a mode means here: `auto` -> panels (where asked for), hugepages or mmap (see the
    module docstring)."""
    if mode != "auto":
        return mode
    if panels and _fits(n_bytes):
        return "panels"
    from hybrid_runtime.numa.topology import parse_thp

    try:
        thp = parse_thp(open("/sys/kernel/mm/transparent_hugepage/enabled").read())
    except OSError:
        thp = "unknown"
    if thp not in ("always", "madvise"):
        return "mmap"
    return "hugepages" if _fits(n_bytes) else "mmap"


def panel_names(gf, names) -> list[str]:
    """Those of the named tensors that have a stored-panel layout (type and shape)."""
    from hybrid_runtime.quant import gemm

    return [n for n in names if gemm.stored_supported(gf.tensor(n).ggml_type, gf.tensor(n).data.shape)]


def prepare(gf, names: list[str], mode: str = "auto", show_progress: bool = True, panels=()) -> StoreReport:
    """Fault in (mmap) or copy (hugepages) the named tensors of gf; a copy replaces the tensor in
    gf.tensors, so every reader after this one reads the copy. panels: the names that may be
    stored as panels (mode `panels`, or `auto` with panels): those go to gf.panels instead."""
    import time

    import psutil

    names = list(dict.fromkeys(names))
    total = sum(gf.tensor(n).n_bytes for n in names)
    mode = resolve(mode, total, bool(panels))
    if mode == "panels":
        t0 = time.perf_counter()
        as_panels = set(panel_names(gf, [n for n in names if n in set(panels)]))
        _store_panels(gf, [n for n in names if n in as_panels], show_progress)
        rest = [n for n in names if n not in as_panels]
        if rest:
            prepare(gf, rest, resolve("auto", sum(gf.tensor(n).n_bytes for n in rest)), show_progress)
        return StoreReport("panels", total, time.perf_counter() - t0)
    # a copy of more than a quarter of RAM also drops the file's pages from the page cache as it
    # goes, so the kernel need not reclaim them while it looks for free huge pages
    drop = _PageCacheDropper(gf) if mode == "hugepages" and total > psutil.virtual_memory().total // 4 else None
    t0 = time.perf_counter()
    label = "faulting in weights" if mode == "mmap" else "copying weights to huge pages"
    with _progress(total, label, show_progress and mode != "lazy" and total > (64 << 20)) as bar:
        for name in names:
            gf.tensors[name] = _prepare_one(gf.tensor(name), mode, bar, drop)
    if drop is not None:
        drop.close()
    return StoreReport(mode, total, time.perf_counter() - t0)


class _PageCacheDropper:
    """posix_fadvise(DONTNEED) over the file bytes behind a piece of a mapped tensor."""

    def __init__(self, gf):
        self._maps = [(memory.address(m), os.open(p, os.O_RDONLY)) for m, p in zip(gf._maps, gf.parts)]

    def __call__(self, part: int, piece: np.ndarray) -> None:
        base, fd = self._maps[part]
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, memory.address(piece) - base, piece.nbytes, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for _, fd in self._maps:
            os.close(fd)


def _store_panels(gf, names: list[str], show_progress: bool) -> None:
    """Each named tensor into stored panels (gf.panels), its file pages released as it goes."""
    from hybrid_runtime.quant import gemm

    total = sum(gf.tensor(n).n_bytes for n in names)
    with _progress(total, "storing weights as panels", show_progress and total > (64 << 20)) as bar:
        for name in names:
            ref = gf.tensor(name)
            size = gemm.stored_bytes(ref.ggml_type, ref.data.shape)
            buf = memory.alloc(size, huge=True)
            gf.panels[name] = gemm.build_stored(ref.data, ref.ggml_type, buf.array.view(np.uint8))
            if _in_file(gf, ref):  # the raw blocks stay readable in place, on demand
                for _, piece in _pieces(ref.data):
                    memory.madvise(piece, memory.MADV_DONTNEED)
            _advance(bar, ref.n_bytes)


def _in_file(gf, ref: TensorRef) -> bool:
    """Whether the tensor's bytes are the file's mapped pages (MADV_DONTNEED only drops those)."""
    m = gf._maps[ref.part]
    lo, a = memory.address(m), memory.address(ref.data)
    return lo <= a and a + ref.data.nbytes <= lo + m.nbytes


def where(report: StoreReport | None) -> str:
    """How a load summary says where the prepared weights live."""
    mode = report.mode if report is not None else "mmap"
    return {"hugepages": "copied to huge pages", "lazy": "in place (lazy)",
            "panels": "stored as panels"}.get(mode, "in place (mmap)")


def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.advance(bar.task_ids[0], n)


def _prepare_one(ref: TensorRef, mode: str, bar, drop=None) -> TensorRef:
    if mode == "lazy":
        return ref
    if mode == "mmap":
        for _, piece in _pieces(ref.data):
            memory.madvise(piece, memory.MADV_WILLNEED)
            _touch(piece, PAGE)
            _advance(bar, piece.shape[0])
        return ref
    src = ref.data
    buf = memory.alloc(src.nbytes, huge=True)  # np.frombuffer keeps the mapping alive
    data = buf.array.view(src.dtype).reshape(src.shape)
    flat = data.reshape(-1).view(np.uint8)
    for start, piece in _pieces(src):  # piece by piece, so the progress bar moves
        flat[start: start + piece.shape[0]] = piece
        memory.madvise(piece, memory.MADV_DONTNEED)  # this process's RSS no longer holds the file's copy
        if drop is not None:
            drop(ref.part, piece)
        _advance(bar, piece.shape[0])
    return TensorRef(ref.name, ref.ggml_type, ref.shape, data, ref.n_bytes, ref.part)
