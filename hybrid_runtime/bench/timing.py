"""Time spent inside compute kernels during a decode step, to separate it from Python overhead.

`kernel_timer()` temporarily wraps the callables that do the arithmetic (quantized matmuls, the
MoE backends, the compiled step's Numba calls); everything else in a step (attention's small
torch ops, routing, glue, the embedding lookup) is overhead.
"""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def kernel_timer():
    from hybrid_runtime.cpu.step import CompiledDeepSeek2
    from hybrid_runtime.experts import backends
    from hybrid_runtime.weights import provider

    methods = [(cls, "__call__") for cls in (provider.KernelLinear, provider.KernelHeadLinear, provider.RoundedLinear,
                                             provider.RoundedHeadLinear, backends.CpuQuantExperts,
                                             backends.FloatExperts)]
    methods += [(CompiledDeepSeek2, "_run"), (CompiledDeepSeek2, "logits"), (CompiledDeepSeek2, "_decode")]
    spent = [0.0]
    originals = {m: getattr(*m) for m in methods}

    def wrap(orig):
        def timed(self, *args):
            t0 = time.perf_counter()
            try:
                return orig(self, *args)
            finally:
                spent[0] += time.perf_counter() - t0

        return timed

    for (cls, name), orig in originals.items():
        setattr(cls, name, wrap(orig))
    try:
        yield spent
    finally:
        for (cls, name), orig in originals.items():
            setattr(cls, name, orig)
