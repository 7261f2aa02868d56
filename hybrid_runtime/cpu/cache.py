"""The paged MLA latent cache of the compiled step.

One pool per model: lat [n_layer, n_blocks * BLOCK, C] and pe [n_layer, n_blocks * BLOCK, R]
float32; a sequence owns a list of blocks (its block table). Token j of a sequence lives at row
table[j // BLOCK] * BLOCK + j % BLOCK of every layer. Pages the OS never touched cost nothing, so
the pool is sized for several full contexts up front and grows (by copy) only past that.

Blocks are reference counted: `PagedCache.share_prefix` lets a sequence start from another's
first whole blocks (the agents of a swarm start from the same long system prompt) without a copy;
a block is written only while one sequence holds it (copy on write: `reserve` copies a shared
block before the first token past the shared prefix lands in it).
"""

from __future__ import annotations

import numpy as np

from hybrid_runtime.errors import ContextOverflowError

BLOCK = 64


class LatentPool:
    def __init__(self, n_layer: int, kv_lora: int, rope: int, n_blocks: int):
        self.lat = np.empty((n_layer, n_blocks * BLOCK, kv_lora), np.float32)
        self.pe = np.empty((n_layer, n_blocks * BLOCK, rope), np.float32)
        self._free = list(range(n_blocks - 1, -1, -1))
        self.refs = np.zeros(n_blocks, np.int32)  # holders of each block; 0 = free

    @property
    def n_blocks(self) -> int:
        return self.lat.shape[1] // BLOCK

    @property
    def blocks_in_use(self) -> int:
        return self.n_blocks - len(self._free)

    @property
    def block_bytes(self) -> int:
        return BLOCK * (self.lat.shape[2] + self.pe.shape[2]) * 4 * self.lat.shape[0]

    def take(self) -> int:
        if not self._free:
            self._grow()
        b = self._free.pop()
        self.refs[b] = 1
        return b

    def share(self, block: int) -> None:
        self.refs[block] += 1

    def give(self, blocks) -> None:
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free.append(b)

    def copy(self, src: int, dst: int, rows: int) -> None:
        """The first `rows` tokens of block src into block dst, every layer."""
        s, d = src * BLOCK, dst * BLOCK
        self.lat[:, d: d + rows] = self.lat[:, s: s + rows]
        self.pe[:, d: d + rows] = self.pe[:, s: s + rows]

    def _grow(self) -> None:
        old = self.n_blocks
        for name in ("lat", "pe"):
            a = getattr(self, name)
            grown = np.empty((a.shape[0], 2 * a.shape[1], a.shape[2]), np.float32)
            grown[:, : a.shape[1]] = a
            setattr(self, name, grown)
        self.refs = np.concatenate([self.refs, np.zeros(old, np.int32)])
        self._free.extend(range(2 * old - 1, old - 1, -1))


class PagedCache:
    """One sequence's view of the pool: the LatentCache interface (n_tokens, commit, truncate)."""

    def __init__(self, pool: LatentPool, capacity: int):
        self.pool, self.capacity = pool, capacity
        self.n_tokens = 0
        self.blocks: list[int] = []
        self.table = np.zeros((capacity + BLOCK - 1) // BLOCK, np.int64)  # block ids, padded

    def reserve(self, n: int) -> None:
        """Make room for tokens [0, n); the block the next token lands in becomes this sequence's own."""
        if n > self.capacity:
            raise ContextOverflowError(f"context full: {n} tokens do not fit the context of {self.capacity}")
        j = self.n_tokens // BLOCK
        if n > self.n_tokens and j < len(self.blocks) and self.pool.refs[self.blocks[j]] > 1:
            own = self.pool.take()  # copy on write: another sequence still reads this block
            self.pool.copy(self.blocks[j], own, self.n_tokens - j * BLOCK)
            self.pool.give([self.blocks[j]])
            self.blocks[j] = own
            self.table[j] = own
        while len(self.blocks) * BLOCK < n:
            self.table[len(self.blocks)] = self.pool.take()
            self.blocks.append(int(self.table[len(self.blocks)]))

    def rows(self, start: int, end: int) -> np.ndarray:
        """Pool rows of tokens start..end-1."""
        j = np.arange(start, end)
        return self.table[j // BLOCK] * BLOCK + j % BLOCK

    def append(self, layer: int, latent, k_pe):
        """The LatentCache interface for the torch model (large prefill chunks): write T entries
        after the committed ones; return copies of all L entries of this layer as torch tensors."""
        import torch

        start, T = self.n_tokens, latent.shape[0]
        self.reserve(start + T)
        new = self.rows(start, start + T)
        self.pool.lat[layer][new] = latent.numpy()
        self.pool.pe[layer][new] = k_pe.numpy()
        every = self.rows(0, start + T)
        return torch.from_numpy(self.pool.lat[layer][every]), torch.from_numpy(self.pool.pe[layer][every])

    def commit(self, n: int) -> None:
        self.n_tokens += n

    def share_prefix(self, other: "PagedCache", n: int) -> int:
        """Start this (emptied) sequence from the first n tokens of `other`'s cache: their blocks
        are shared, not copied (a partial last block is shared too and copied on the first write).
        Returns n."""
        if other.pool is not self.pool:
            raise ValueError("the caches belong to different pools")
        n = max(0, min(n, other.n_tokens))
        self.release()
        k = -(-n // BLOCK)
        for j in range(k):
            self.pool.share(other.blocks[j])
            self.blocks.append(other.blocks[j])
            self.table[j] = other.blocks[j]
        self.n_tokens = n
        return n

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (prefix reuse); blocks past them go back to the pool."""
        self.n_tokens = max(0, min(n, self.n_tokens))
        keep = (self.n_tokens + BLOCK - 1) // BLOCK
        self.pool.give(self.blocks[keep:])
        del self.blocks[keep:]

    def release(self) -> None:
        self.truncate(0)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown
            pass

    @property
    def n_bytes(self) -> int:
        per_block = BLOCK * (self.pool.lat.shape[2] + self.pool.pe.shape[2]) * 4 * self.pool.lat.shape[0]
        return len(self.blocks) * per_block
