"""Load options shared by the commands that run a model (generate, chat, serve): one definition."""

from __future__ import annotations

from typing import Optional

import typer

NumaConfig = typer.Option(None, "--numa-config", help="config written by numa-tune (pinned per-node expert threads)")
ExpertStore = typer.Option("mmap", "--expert-store", help="mmap (in place, faulted in at load), lazy, or hugepages (copied)")
Device = typer.Option("auto", "--device", help="auto (GPU when CUDA is present), cpu, or cuda")
GpuMem = typer.Option(None, "--gpu-mem", help="GPU memory budget, e.g. 22GiB (default: free memory minus a margin)")
CpuMoe = typer.Option(False, "--cpu-moe", help="keep every routed expert on the CPU (no GPU expert cache)")
NCpuMoe = typer.Option(None, "--n-cpu-moe", help="routed experts of the first N MoE layers on the CPU")
Override = typer.Option([], "--override", "-ot", help="REGEX=DEVICE placement override, e.g. exps=CPU (repeatable)")


def load_options(numa_config: Optional[str], expert_store: str, device: str, gpu_mem: Optional[str],
                 cpu_moe: bool, n_cpu_moe: Optional[int], override: list[str]) -> dict:
    """The load() keywords for these options (gpu_mem parsed; bad sizes raise InvalidRequestError)."""
    from hybrid_runtime.plan import parse_size

    return {"numa_config": numa_config, "expert_store": expert_store, "device": device,
            "gpu_mem": parse_size(gpu_mem) if gpu_mem else None, "cpu_moe": cpu_moe,
            "n_cpu_moe": n_cpu_moe, "override": list(override)}
