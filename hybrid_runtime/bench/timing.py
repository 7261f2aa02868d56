"""Time spent inside compute kernels during a decode step, to separate it from Python overhead.

`kernel_timer()` temporarily wraps the callables that do the arithmetic (quantized matmuls, the
MoE backends); everything else in a step (attention's small torch ops, routing, glue) is overhead.
"""

from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def kernel_timer():
    from hybrid_runtime.experts import backends
    from hybrid_runtime.weights import provider

    classes = [provider.KernelLinear, provider.KernelHeadLinear, provider.RoundedLinear,
               provider.RoundedHeadLinear, backends.CpuQuantExperts, backends.FloatExperts]
    spent = [0.0]
    originals = {cls: cls.__call__ for cls in classes}

    def wrap(orig):
        def timed(self, *args):
            t0 = time.perf_counter()
            try:
                return orig(self, *args)
            finally:
                spent[0] += time.perf_counter() - t0

        return timed

    for cls, orig in originals.items():
        cls.__call__ = wrap(orig)
    try:
        yield spent
    finally:
        for cls, orig in originals.items():
            cls.__call__ = orig
