"""Memory policy, huge-page advice and thread pinning through ctypes; every call degrades.

Where the kernel refuses a call (containers without CAP_SYS_NICE, seccomp, non-Linux,
non-x86-64) the function logs one note and returns False; nothing here raises for that.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import platform
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE = 0, 1, 2, 3
MPOL_MF_STRICT, MPOL_MF_MOVE = 1 << 0, 1 << 1
MADV_WILLNEED, MADV_DONTNEED, MADV_HUGEPAGE = 3, 4, 14
HUGE_2M = 2 << 20

# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl)
_SYS = {"mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "move_pages": 279}
_MASK_WORDS = 16  # 1024 nodes
_noted: set[str] = set()


def _note(what: str, err: int) -> None:
    if what not in _noted:
        _noted.add(what)
        log.info("%s refused (%s); continuing without it", what, os.strerror(err) if err else "unsupported")


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    lib = ctypes.CDLL(None, use_errno=True)
    lib.syscall.restype = ctypes.c_long
    lib.madvise.restype = ctypes.c_int
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def _syscall(name: str, *args: int | ctypes._SimpleCData | ctypes.Array | None) -> bool:
    lib = _libc()
    if lib is None or platform.machine() not in ("x86_64", "AMD64"):
        _note(name, 0)
        return False
    ctypes.set_errno(0)
    ret = lib.syscall(ctypes.c_long(_SYS[name]), *args)
    if ret < 0:
        _note(name, ctypes.get_errno())
        return False
    return True


def node_mask(nodes: list[int]) -> ctypes.Array:
    """A kernel nodemask (array of unsigned long) with the given node bits set."""
    mask = (ctypes.c_ulong * _MASK_WORDS)()
    for n in nodes:
        mask[n // 64] |= 1 << (n % 64)
    return mask


def _maxnode() -> ctypes.c_ulong:
    return ctypes.c_ulong(_MASK_WORDS * 64 + 1)  # the kernel drops one bit (libnuma does the same)


def set_mempolicy(mode: int, nodes: list[int] | None = None) -> bool:
    """Set this thread's allocation policy; MPOL_DEFAULT with no nodes resets it."""
    if mode == MPOL_DEFAULT or not nodes:
        return _syscall("set_mempolicy", ctypes.c_long(MPOL_DEFAULT), None, ctypes.c_ulong(0))
    return _syscall("set_mempolicy", ctypes.c_long(mode), node_mask(nodes), _maxnode())


def address(arr: np.ndarray) -> int:
    """The address of an array's first byte."""
    return arr.__array_interface__["data"][0]


def _page_span(arr: np.ndarray) -> tuple[int, int]:
    """The page-aligned [start, length) inside the array's bytes (whole pages only)."""
    page = mmap.PAGESIZE
    start = address(arr)
    end = start + arr.nbytes
    a0 = (start + page - 1) // page * page
    a1 = end // page * page
    return a0, max(0, a1 - a0)


def mbind(arr: np.ndarray, mode: int, nodes: list[int], move: bool = False) -> bool:
    """Bind the whole pages of a contiguous array to `nodes` with policy `mode`."""
    addr, length = _page_span(arr)
    if length == 0:
        return False
    flags = MPOL_MF_MOVE if move else 0
    return _syscall(
        "mbind", ctypes.c_void_p(addr), ctypes.c_ulong(length), ctypes.c_long(mode),
        node_mask(nodes), _maxnode(), ctypes.c_uint(flags),
    )


def madvise(arr: np.ndarray, advice: int) -> bool:
    """madvise() the whole pages of an array (MADV_HUGEPAGE, MADV_WILLNEED, MADV_DONTNEED)."""
    lib = _libc()
    addr, length = _page_span(arr)
    if lib is None or length == 0:
        return False
    ctypes.set_errno(0)
    if lib.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), ctypes.c_int(advice)) != 0:
        _note(f"madvise({advice})", ctypes.get_errno())
        return False
    return True


def pin_thread(cpus: list[int]) -> bool:
    """Pin the calling thread to `cpus` (threads it creates afterwards inherit the mask)."""
    if not cpus:
        return False
    try:
        os.sched_setaffinity(0, cpus)
        return True
    except (AttributeError, OSError) as e:
        _note("sched_setaffinity", getattr(e, "errno", 0) or 0)
        return False


def page_nodes(arr: np.ndarray, max_samples: int = 4096) -> dict[int, int]:
    """Bytes of the array resident on each node, from move_pages() on sampled pages.

    Returns {} where the kernel refuses the query. Pages not yet touched are not counted.
    """
    addr, length = _page_span(arr)
    page = mmap.PAGESIZE
    n_pages = length // page
    if n_pages == 0:
        return {}
    idx = np.unique(np.linspace(0, n_pages - 1, min(n_pages, max_samples)).astype(np.int64))
    pages = (ctypes.c_void_p * len(idx))(*[addr + int(i) * page for i in idx])
    status = (ctypes.c_int * len(idx))()
    if not _syscall("move_pages", ctypes.c_long(0), ctypes.c_ulong(len(idx)), pages, None, status,
                    ctypes.c_int(0)):
        return {}
    scale = n_pages / len(idx) * page
    counts: dict[int, int] = {}
    for s in status:
        if s >= 0:
            counts[s] = counts.get(s, 0) + 1
    return {n: int(c * scale) for n, c in counts.items()}


@dataclass(slots=True)
class NodeBuffer:
    """An anonymous mapping aligned to 2 MiB, and the uint8 view of its usable part."""

    mapping: mmap.mmap
    array: np.ndarray  # [nbytes] uint8


def alloc(nbytes: int, mode: int = MPOL_DEFAULT, nodes: list[int] | None = None,
          huge: bool = True) -> NodeBuffer:
    """Anonymous private memory, policy applied before the first touch; not zeroed by us.

    The policy decides where pages land when they are first written, so fill the buffer
    from a thread pinned to the target node to keep locality even where mbind is refused.
    """
    size = max(nbytes, 1) + HUGE_2M
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    raw = np.frombuffer(mapping, dtype=np.uint8)
    start = address(raw)
    offset = (-start) % HUGE_2M
    arr = raw[offset : offset + nbytes]
    if huge:
        madvise(arr, MADV_HUGEPAGE)
    if mode != MPOL_DEFAULT and nodes:
        mbind(arr, mode, nodes)
    return NodeBuffer(mapping=mapping, array=arr)
