"""Roofline plot for decode: measured time per layer against bytes read / measured read bandwidth."""

from __future__ import annotations

from pathlib import Path


def layer_active_bytes(gf, cfg, layer: int) -> int:
    """Bytes one decode step reads in `layer`: non-expert tensors + the K used routed experts."""
    total = 0
    for t in gf.tensors.values():
        if not t.name.startswith(f"blk.{layer}."):
            continue
        if "_exps" in t.name:
            total += t.n_bytes * cfg.n_expert_used // max(cfg.n_expert, 1)
        else:
            total += t.n_bytes
    return total


def plot_roofline(model_path, result: dict, threads: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hybrid_runtime.models import get_architecture
    from hybrid_runtime.weights.gguf_file import GGUFModelFile

    gf = GGUFModelFile(model_path)
    cfg = get_architecture(gf.architecture).read_config(gf)
    bw = result["decode"]["bandwidth"]["read_gbs_after"]  # GB/s, measured by the bench right after the run
    per_layer = [layer_active_bytes(gf, cfg, i) for i in range(cfg.n_layer)]
    mean_bytes = sum(per_layer) / len(per_layer)
    t_layer = result["decode"]["ours"]["per_layer_s"]
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [0, max(per_layer) * 1.2]
    ax.plot([x / 1e6 for x in xs], [x / (bw * 1e9) * 1e3 for x in xs], label=f"bytes / {bw:.1f} GB/s (ceiling)")
    ax.scatter([mean_bytes / 1e6], [t_layer * 1e3], color="red", label="measured (mean layer)")
    if "llama_cpp" in result["decode"]:
        t_ll = result["decode"]["llama_cpp"]["step_s"] / cfg.n_layer
        ax.scatter([mean_bytes / 1e6], [t_ll * 1e3], color="gray", label="llama.cpp (mean layer)")
    ax.set_xlabel("bytes read per layer per token (MB)")
    ax.set_ylabel("time per layer (ms)")
    ax.set_title(f"decode roofline, {threads} threads")
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    result["decode"]["mean_layer_bytes"] = mean_bytes
    return out
