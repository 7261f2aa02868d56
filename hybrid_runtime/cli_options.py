"""Load options shared by the commands that run a model (generate, chat, serve): one definition.

Also the helpers those commands share around the loaded model: the note on options without
effect, and closing it (which writes --expert-profile).
"""

from __future__ import annotations

from typing import Optional

import typer

NumaConfig = typer.Option(None, "--numa-config", help="config written by numa-tune (pinned per-node expert threads)")
ExpertStore = typer.Option("auto", "--expert-store", help="where the weights the CPU reads live: auto (panels on the "
                           "compiled CPU path, else hugepages where THP is granted and the copy fits, else mmap), panels (repacked "
                           "16 rows to a vector: the fastest kernels), hugepages (copied), mmap (in place, faulted in at load), lazy")
Device = typer.Option("auto", "--device", help="auto (GPU when CUDA is present), cpu, or cuda")
GpuMem = typer.Option(None, "--gpu-mem", help="GPU memory budget, e.g. 22GiB (default: free memory minus a margin)")
CpuMoe = typer.Option(False, "--cpu-moe", help="keep every routed expert on the CPU (no GPU expert cache)")
NCpuMoe = typer.Option(None, "--n-cpu-moe", help="routed experts of the first N MoE layers on the CPU")
Override = typer.Option([], "--override", "-ot", help="REGEX=DEVICE placement override, e.g. exps=CPU (repeatable)")

# the GPU path (no effect on a CPU-only placement: the commands print a note)
ExpertProfile = typer.Option(None, "--expert-profile", metavar="FILE",
                             help="routing profile: warms the GPU expert cache at start when the file exists, and is "
                                  "written back with the updated statistics when the command ends")
RecordRouting = typer.Option(None, "--record-routing", metavar="FILE",
                             help="append every token's expert ids per MoE layer (JSON lines, for scripts/cache_sim.py)")
SpeculativePrefetch = typer.Option(False, "--speculative-prefetch",
                                   help="prefetch layer L+1's likely experts from layer L's hidden state")
CudaGraphs = typer.Option(False, "--cuda-graphs", help="replay one-token GPU matmuls as CUDA graphs (CUDA only)")


def load_options(numa_config: Optional[str], expert_store: str, device: str, gpu_mem: Optional[str],
                 cpu_moe: bool, n_cpu_moe: Optional[int], override: list[str]) -> dict:
    """The load() keywords for these options (gpu_mem parsed; bad sizes raise InvalidRequestError)."""
    from hybrid_runtime.plan import parse_size

    return {"numa_config": numa_config, "expert_store": expert_store, "device": device,
            "gpu_mem": parse_size(gpu_mem) if gpu_mem else None, "cpu_moe": cpu_moe,
            "n_cpu_moe": n_cpu_moe, "override": list(override)}


def gpu_path_options(expert_profile: Optional[str], record_routing: Optional[str], speculative_prefetch: bool,
                     cuda_graphs: bool) -> dict:
    """The load() keywords of the GPU-path options (checked by RuntimeOptions.validate at load)."""
    return {"expert_profile": expert_profile, "record_routing": record_routing,
            "speculative_prefetch": speculative_prefetch, "cuda_graphs": cuda_graphs}


def inert_note(model) -> Optional[str]:
    """One line naming the given GPU-path flags that do nothing with this placement, or None."""
    inert = getattr(model, "inert_options", dict)()
    if not inert:
        return None
    by_reason: dict[str, list[str]] = {}
    for name, why in inert.items():
        by_reason.setdefault(why, []).append("--" + name.replace("_", "-"))
    return "; ".join(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect: {why}"
                     for why, flags in by_reason.items())


def close_model(model) -> Optional[str]:
    """model.close() (writes --expert-profile, closes --record-routing); the error's sentence if it failed."""
    from hybrid_runtime.errors import HybridError

    try:
        getattr(model, "close", lambda: None)()
    except HybridError as e:
        return str(e)
    return None
