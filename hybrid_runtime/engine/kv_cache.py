"""MLA latent cache: per layer the normed latent c [L, C] and the roped shared key k_pe [L, R].

576 values per token and layer for Kimi K2 (C 512 + R 64), not the expanded per-head K/V.
Storage grows in chunks up to a fixed capacity; `truncate` keeps a prefix for reuse.
"""

from __future__ import annotations

import torch

from hybrid_runtime.errors import ContextOverflowError

_GROW = 256


class LatentCache:
    def __init__(self, n_layer: int, kv_lora: int, rope: int, capacity: int, dtype=torch.float32):
        self.capacity = capacity
        self.n_tokens = 0  # committed tokens (a forward pass appends after them, then commits)
        self._lat = [torch.empty(0, kv_lora, dtype=dtype) for _ in range(n_layer)]
        self._pe = [torch.empty(0, rope, dtype=dtype) for _ in range(n_layer)]

    def _reserve(self, layer: int, n: int, device: torch.device) -> None:
        have = self._lat[layer].shape[0]
        if n <= have and self._lat[layer].device == device:
            return
        new = min(self.capacity, max(n, have * 2, _GROW))
        for store in (self._lat, self._pe):
            grown = torch.empty(new, store[layer].shape[1], dtype=store[layer].dtype, device=device)
            grown[:have] = store[layer]
            store[layer] = grown

    def append(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new entries after the committed ones; return views of all L entries of this layer."""
        start, T = self.n_tokens, latent.shape[0]
        end = start + T
        if end > self.capacity:
            raise ContextOverflowError(f"context full: {end} tokens do not fit the context of {self.capacity}")
        self._reserve(layer, end, latent.device)  # the cache lives where attention runs
        self._lat[layer][start:end] = latent
        self._pe[layer][start:end] = k_pe
        return self._lat[layer][:end], self._pe[layer][:end]

    def commit(self, n: int) -> None:
        self.n_tokens += n

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (prefix reuse)."""
        self.n_tokens = max(0, min(n, self.n_tokens))

    @property
    def n_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._lat + self._pe)
