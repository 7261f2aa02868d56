"""`hybrid-runtime`: generate, inspect, verify, perplexity, bench, chat, serve, numa-tune."""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from hybrid_runtime import cli_options as opt

try:  # typer >= 0.24 carries its own copy of click
    from typer._click import exceptions as click_errors
    from typer._click.globals import get_current_context
except ImportError:  # older typer: click itself
    from click import exceptions as click_errors
    from click import get_current_context
from hybrid_runtime.errors import HybridError, InvalidRequestError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Kimi K2 / DeepSeek-V3 GGUF models: experts on the CPU, the rest on one GPU.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: kernels, decode, prefill.")
app.add_typer(bench_app, name="bench")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def user_errors(fn):
    """Turn HybridError (and Ctrl-C) into one line on stderr and exit code 1, never a traceback;
    anything unexpected is one line too, unless `--debug` asks for the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click_errors.ClickException):
            raise
        except HybridError as e:
            _one_line_error(str(e))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)
        except OSError as e:
            where = getattr(e, "filename", "") or ""
            _one_line_error(f"{e.strerror or e}: {where}" if where else str(e.strerror or e))
        except Exception as e:  # noqa: BLE001 - a bug or an unforeseen input: one line, --debug for more
            if _debug():
                raise
            _one_line_error(f"internal error ({type(e).__name__}: {_first_line(e)}); run with --debug for the traceback")

    return wrapper


def _one_line_error(message: str):
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # one line, even past 80 columns
    raise typer.Exit(1)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]


def _debug() -> bool:
    ctx = get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug")) or "--debug" in sys.argv


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="show the traceback of an unexpected error")):
    """Run Kimi K2 / DeepSeek-V3 GGUF models: experts on the CPU, the rest on one GPU."""


def _load(model: Path, compute: str, threads: Optional[int], n_ctx: Optional[int] = None, **more):
    from hybrid_runtime import load

    err.print(f"[dim]loading {model.name} ...[/dim]")
    return load(model, compute=compute, threads=threads, n_ctx=n_ctx, progress=True, **more)


ModelArg = typer.Argument(..., help="GGUF model file (the first part of a split model)")
ThreadsOpt = typer.Option(None, "--threads", "-t", help="CPU threads (default: all usable cores)")
ComputeOpt = typer.Option("fast", "--compute", help="fast (quantized CPU experts) or reference (exact float path)")
CompareOpt = typer.Option(False, "--compare-llama-cpp", help="also run llama.cpp on the same file and threads")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON")
PlotOpt = typer.Option(None, "--plot", help="write a roofline PNG (time per layer vs bytes/bandwidth)")
PrefillPrecisionOpt = typer.Option("int8", "--prefill-precision", help="long prefill chunks: int8 (default: the integer panel GEMM for Q4_K/Q6_K/Q8_0, bf16 for other types), bf16, or exact (float32, llama.cpp's activation rounding)")
NumaOpt = typer.Option(None, "--numa-config", help="config written by numa-tune")


@app.command()
@user_errors
def generate(
    model: Path = ModelArg,
    prompt: str = typer.Option(..., "--prompt", "-p", help="prompt text"),
    n: int = typer.Option(128, "--n-predict", "-n", help="tokens to generate"),
    temp: float = typer.Option(0.8, "--temp", help="sampling temperature (0 = greedy)"),
    top_p: float = typer.Option(1.0, "--top-p"),
    top_k: int = typer.Option(0, "--top-k", help="0 = off"),
    min_p: float = typer.Option(0.0, "--min-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="stop string (repeatable)"),
    chat: bool = typer.Option(False, "--chat", help="wrap the prompt in the model's chat template"),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="constrain the output to JSON matching this schema file"),
    threads: Optional[int] = ThreadsOpt,
    compute: str = ComputeOpt,
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="context length"),
    numa_config: Optional[str] = opt.NumaConfig,
    expert_store: str = opt.ExpertStore,
    device: str = opt.Device,
    gpu_mem: Optional[str] = opt.GpuMem,
    cpu_moe: bool = opt.CpuMoe,
    n_cpu_moe: Optional[int] = opt.NCpuMoe,
    override: list[str] = opt.Override,
    expert_profile: Optional[str] = opt.ExpertProfile,
    record_routing: Optional[str] = opt.RecordRouting,
    speculative_prefetch: bool = opt.SpeculativePrefetch,
    cuda_graphs: bool = opt.CudaGraphs,
):
    """Stream a completion of PROMPT and print prompt and generation tokens/s."""
    from hybrid_runtime.engine.grammar import schema_from_file

    schema = schema_from_file(json_schema) if json_schema is not None else None  # bad files fail before loading
    m = _load(model, compute, threads, n_ctx,
              **opt.load_options(numa_config, expert_store, device, gpu_mem, cpu_moe, n_cpu_moe, override),
              **opt.gpu_path_options(expert_profile, record_routing, speculative_prefetch, cuda_graphs))
    try:
        _generate(m, prompt, chat, dict(max_tokens=n, temperature=temp, top_p=top_p, top_k=top_k, min_p=min_p,
                                        seed=seed, stop=stop), schema)
    finally:
        failed = opt.close_model(m)  # writes --expert-profile; after the output, whatever happened
        if failed:
            err.print(f"[red]error:[/red] {escape(failed)}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


def _generate(m, prompt: str, chat: bool, sampling: dict, schema=None) -> None:
    console.print(f"[dim]placement: {m.placement_summary()}[/dim]")
    note = opt.inert_note(m)
    if note:
        err.print(f"[dim]note: {escape(note)}[/dim]", soft_wrap=True)
    for line in m.memory_report():
        console.print(f"[dim]{line}[/dim]")
    ids = m.tokenizer.encode_chat([{"role": "user", "content": prompt}]) if chat else m.tokenize(prompt)
    console.print(f"[dim]{m.config.arch} · {m.file.path.name} · {len(ids)} prompt tokens[/dim]")
    constraint = None
    if schema is not None:
        from hybrid_runtime.chat_format import prompt_opens_think
        from hybrid_runtime.engine.grammar import fitted_json_constraint

        opened = chat and prompt_opens_think(m.tokenizer.render_chat([{"role": "user", "content": prompt}])[-64:])
        constraint = fitted_json_constraint(m.tokenizer, schema, sampling["max_tokens"], opened)
    sys.stdout.write(prompt if not chat and constraint is None else "")
    for piece in m.generate(ids, constraint=constraint, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    s = m.last_stats
    sys.stdout.write("\n")
    if s is not None:
        console.print(f"[ Prompt: {s.prefill_tps:.1f} t/s | Generation: {s.decode_tps:.1f} t/s ]  "
                      f"[dim]({s.prompt_tokens} prompt, {s.generated_tokens} generated)[/dim]")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def inspect_summary(gf, cfg) -> dict:
    types = Counter(t.ggml_type.name for t in gf.tensors.values())
    type_bytes = Counter()
    expert_bytes = 0
    for t in gf.tensors.values():
        type_bytes[t.ggml_type.name] += t.n_bytes
        if "_exps" in t.name:
            expert_bytes += t.n_bytes
    params = sum(math.prod(t.shape) for t in gf.tensors.values())
    return {
        "file": str(gf.path), "parts": len(gf.parts), "architecture": cfg.arch, "name": cfg.name,
        "parameters": params, "bytes": gf.n_bytes, "routed_expert_bytes": expert_bytes,
        "other_bytes": gf.n_bytes - expert_bytes,
        "kv_bytes_per_token_f32": cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope) * 4,
        "tensor_types": {k: {"count": types[k], "bytes": type_bytes[k]} for k in sorted(types)},
        "config": cfg.to_dict(),
    }


@app.command()
@user_errors
def inspect(
    model: Path = ModelArg,
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help="plan placement for this much GPU memory, e.g. 24GiB"),
    cpu_moe: bool = typer.Option(False, "--cpu-moe", help="keep every routed expert on the CPU"),
    n_cpu_moe: Optional[int] = typer.Option(None, "--n-cpu-moe", help="routed experts of the first N MoE layers on the CPU"),
    override: list[str] = typer.Option([], "--override", "-ot", help="REGEX=DEVICE placement override (repeatable)"),
    n_ctx: int = typer.Option(8192, "--n-ctx", help="context to reserve KV cache for in the plan"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
):
    """Print the architecture, sizes, tensor types and the memory the model needs (no weights are read)."""
    from hybrid_runtime.weights.model_file import open_model_file

    gf, _, cfg = open_model_file(model)  # the same validation as load()
    info = inspect_summary(gf, cfg)
    plan = _plan(gf, cfg, gpu_mem, cpu_moe, n_cpu_moe, override, n_ctx) if gpu_mem is not None else None
    if as_json:
        if plan is not None:
            info["plan"] = plan.to_dict()
        print(json.dumps(info, indent=2))
        return
    _print_inspect(info, cfg)
    if plan is not None:
        from hybrid_runtime.plan import describe_plan

        describe_plan(plan, console)
        _ram_note(plan)


def _ram_note(plan) -> None:
    import psutil

    need, have = plan.cpu_total, psutil.virtual_memory().total
    if need > have:
        console.print(f"[yellow]note:[/yellow] the RAM part ({_fmt_bytes(need)}) exceeds this machine's "
                      f"{_fmt_bytes(have)}; experts would be paged in from disk")


def _plan(gf, cfg, gpu_mem, cpu_moe, n_cpu_moe, override, n_ctx):
    from hybrid_runtime.plan import make_plan, parse_size

    # inspect plans for the machine the user names, not this one: RAM is reported, not enforced
    return make_plan(gf.tensors, cfg, gpu_mem=parse_size(gpu_mem), ram=1 << 62, cpu_moe=cpu_moe,
                     n_cpu_moe=n_cpu_moe, overrides=list(override), n_ctx=n_ctx)


def _print_inspect(info: dict, cfg) -> None:
    c = info["config"]
    console.print(f"[bold]{info['name'] or Path(info['file']).name}[/bold]  ({info['architecture']}, {info['parts']} part(s))")
    console.print(f"  parameters       {info['parameters'] / 1e9:.3f} B   file data {_fmt_bytes(info['bytes'])}")
    console.print(f"  routed experts   {_fmt_bytes(info['routed_expert_bytes'])}   everything else {_fmt_bytes(info['other_bytes'])}")
    console.print(f"  layers {c['n_layer']} ({c['n_dense_lead']} dense) · hidden {c['n_embd']} · heads {c['n_head']} · vocab {c['n_vocab']}")
    attn = f"q_lora {c['q_lora_rank']}" if c["q_lora_rank"] else "plain attn_q"
    console.print(f"  MLA: {attn} · kv_lora {c['kv_lora_rank']} · rope {c['qk_rope']} · nope {c['qk_nope']} · v {c['v_head']}"
                  f" · {'split k_b/v_b' if c['mla_split'] else 'combined kv_b'}")
    gating = {1: "softmax", 2: "sigmoid"}[c["gating"]]
    console.print(f"  MoE: {c['n_expert']} experts × {c['n_ff_expert']}, {c['n_expert_used']} used, {c['n_expert_shared']} shared,"
                  f" {gating}, groups {c['n_group_used']}/{c['n_group']}, scale {c['weights_scale']:.3f}")
    console.print(f"  rope: base {c['rope_base']:g}, {c['rope_scaling']} ×{c['rope_factor']:g} over {c['rope_orig_ctx']},"
                  f" context {c['n_ctx_train']}")
    console.print(f"  latent KV cache: {_fmt_bytes(info['kv_bytes_per_token_f32'] / 2)}/token in bf16")
    t = Table("type", "tensors", "bytes", title="tensor types", title_justify="left")
    for name, v in info["tensor_types"].items():
        t.add_row(name, str(v["count"]), _fmt_bytes(v["bytes"]))
    console.print(t)
    need = info["bytes"] + 4096 * info["kv_bytes_per_token_f32"] / 2
    console.print(f"  memory needed (weights + 4K-token bf16 cache): {_fmt_bytes(need)}")


@app.command()
@user_errors
def verify(
    model: Path = ModelArg,
    prompt: str = typer.Option("The quick brown fox jumps over the lazy dog. " * 3, "--prompt", "-p"),
    threads: Optional[int] = ThreadsOpt,
    compute: str = ComputeOpt,
):
    """Run a prompt through this runtime and llama.cpp on the same file and report agreement."""
    from hybrid_runtime.oracle import llama_cpp_logits, rel_l2, top1_agreement

    m = _load(model, compute, threads)
    ids = m.tokenize(prompt)
    if len(ids) < 2:
        raise HybridError("the prompt must have at least 2 tokens")
    t0 = time.perf_counter()
    ours = m.logits(ids)
    t1 = time.perf_counter()
    with console.status("running llama.cpp on the same file ..."):
        theirs = llama_cpp_logits(model, ids, threads=threads, yarn_betas=m.yarn_betas)
        spread = llama_cpp_logits(model, ids, n_ubatch=1, threads=threads, yarn_betas=m.yarn_betas)
    t2 = time.perf_counter()
    r = {"tokens": len(ids), "rel_l2": rel_l2(ours, theirs), "top1": top1_agreement(ours, theirs),
         "llama_cpp_self_rel_l2": rel_l2(spread, theirs), "ours_s": t1 - t0, "llama_cpp_s": (t2 - t1) / 2}
    console.print(f"{r['tokens']} tokens: relative L2 {r['rel_l2']:.2e}, top-1 agreement {100 * r['top1']:.1f} %"
                  f"  (llama.cpp against itself, ubatch 1 vs 512: {r['llama_cpp_self_rel_l2']:.2e})")
    ok = r["top1"] >= 0.9 and r["rel_l2"] <= max(1e-3, 2 * r["llama_cpp_self_rel_l2"])
    console.print("[green]agreement OK[/green]" if ok else "[red]DISAGREEMENT: please report this file[/red]")
    raise typer.Exit(0 if ok else 2)


@app.command()
@user_errors
def perplexity(
    model: Path = ModelArg,
    file: Path = typer.Option(..., "--file", "-f", help="text file to score (UTF-8)"),
    n_ctx: int = typer.Option(512, "--n-ctx", "-c", help="window length; the second half of each window is scored"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="score at most this many windows"),
    save_logits: Optional[Path] = typer.Option(None, "--save-logits", help="save the scored log-probabilities (a base for --kl-divergence)"),
    kl_base: Optional[Path] = typer.Option(None, "--kl-divergence", help="KL-divergence against logits saved by --save-logits"),
    compare: bool = typer.Option(False, "--compare-llama-cpp", help="also score the same windows with llama.cpp on the same file"),
    threads: Optional[int] = ThreadsOpt,
    compute: str = ComputeOpt,
    compiled: bool = typer.Option(True, "--compiled/--no-compiled", help="the compiled CPU step where it applies (default) or the torch model"),
    prefill_precision: str = PrefillPrecisionOpt,
    as_json: bool = JsonOpt,
):
    """Perplexity and bits per byte over a text, KL-divergence against saved logits (as llama-perplexity)."""
    from hybrid_runtime import perplexity as px

    text = file.read_text(encoding="utf-8", errors="replace")
    if kl_base is not None and not kl_base.is_file():
        raise InvalidRequestError(f"{kl_base}: no such logits file")
    m = _load(model, compute, threads, n_ctx=n_ctx, compiled=compiled, prefill_precision=prefill_precision)
    windows = px.make_windows(m.tokenize(text), n_ctx, chunks)
    base = px.load_log_probs(kl_base, windows, m.n_vocab) if kl_base is not None else None
    ours = _scored(px, m.logits, windows, "ours")
    r = {"model": str(model), "file": str(file), "n_ctx": n_ctx, "ours": px.perplexity(ours, windows, m.tokenizer.token_bytes).as_dict()}
    if base is not None:
        r["ours"].update(px.kl_divergence(base, ours).as_dict())
    if save_logits is not None:
        px.save_log_probs(save_logits, ours, windows)
    if compare:
        from hybrid_runtime.oracle import llama_cpp_scorer

        with llama_cpp_scorer(model, n_ctx, threads, m.yarn_betas) as score:
            theirs = _scored(px, score, windows, "llama.cpp")
        r["llama_cpp"] = px.perplexity(theirs, windows, m.tokenizer.token_bytes).as_dict()
        if base is not None:
            r["llama_cpp"].update(px.kl_divergence(base, theirs).as_dict())
        r["ours_vs_llama_cpp"] = px.kl_divergence(theirs, ours).as_dict()
    if as_json:
        print(json.dumps(r, indent=2))
        return
    _print_perplexity(r, kl_base)


def _scored(px, scorer, windows, who: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn(f"{who}"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(who, total=windows.n_windows)
        return px.scored_log_probs(scorer, windows, progress=lambda: bar.advance(task))


def _print_perplexity(r: dict, kl_base: Optional[Path]) -> None:
    o = r["ours"]
    console.print(f"{o['windows']} windows of {r['n_ctx']} tokens, {o['scored_tokens']} tokens scored ({o['bytes']} bytes)")
    for who, d in (("ours", o), ("llama.cpp", r.get("llama_cpp"))):
        if d is None:
            continue
        line = f"{who}: perplexity {d['perplexity']:.4f} ± {d['perplexity_stderr']:.4f}, {d['bits_per_byte']:.4f} bits per byte"
        if "kld_mean" in d:
            line += (f"; KLD vs {kl_base.name}: mean {d['kld_mean']:.6f} ± {d['kld_stderr']:.6f}, "
                     f"p99 {d['kld_p99']:.6f}, max {d['kld_max']:.4f}; top-1 agreement {100 * d['top1_agreement']:.2f} %")
        console.print(line, soft_wrap=True)
    if "ours_vs_llama_cpp" in r:
        d, ratio = r["ours_vs_llama_cpp"], o["perplexity"] / r["llama_cpp"]["perplexity"] - 1
        console.print(f"ours vs llama.cpp: perplexity {100 * ratio:+.3f} %, KLD mean {d['kld_mean']:.6f}, "
                      f"p99 {d['kld_p99']:.6f}, top-1 agreement {100 * d['top1_agreement']:.2f} %", soft_wrap=True)


@bench_app.command("kernels")
@user_errors
def bench_kernels_cmd(
    threads: Optional[int] = ThreadsOpt,
    types: str = typer.Option("Q4_K,Q5_K,Q6_K,Q8_0,Q2_K,Q3_K", "--types", help="comma-separated quant types"),
    as_json: bool = typer.Option(False, "--json"),
):
    """GB/s of each expert kernel against the read bandwidth measured in the same run."""
    from hybrid_runtime.bench.kernels import bench_kernels, bench_moe_step

    rows = bench_kernels([t.strip() for t in types.split(",") if t.strip()], threads)
    moe = bench_moe_step(threads=threads)
    if as_json:
        print(json.dumps({"kernels": rows, "moe_step": moe}, indent=2, default=str))
        return
    t = Table(*[str(k) for k in rows[0]]) if rows else Table("none")
    for r in rows:
        t.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()])
    console.print(t)
    console.print(moe)


def _bench_model(model, threads, compare, as_json, plot, what, n_prompt, n_gen, decode_prompt, numa_config,
                 **load_opts):
    from hybrid_runtime.bench.e2e import bench_model

    threads = threads or _usable_cores()
    r = bench_model(model, threads, n_prompt=n_prompt, n_gen=n_gen, decode_prompt=decode_prompt,
                    compare=compare, what=what, numa_config=numa_config, **load_opts)
    if plot is not None:
        from hybrid_runtime.bench.roofline import plot_roofline

        r["plot"] = str(plot_roofline(model, r, threads, plot))
    if as_json:
        print(json.dumps(r, indent=2))
        return
    for kind in what:
        d = r[kind]
        line = f"{kind}: ours {d['ours']['tokens_per_s']:.1f} t/s"
        if "llama_cpp" in d:
            line += f", llama.cpp {d['llama_cpp']['tokens_per_s']:.1f} t/s, ratio {d['ratio']:.2f}x"
        if kind == "decode":
            line += (f"  ({1e6 * d['ours']['per_layer_s']:.0f} µs/layer, of which "
                     f"{1e6 * d['ours']['overhead_per_layer_s']:.0f} µs outside the kernels; context {d['context']})")
            b = d["bandwidth"]
            line += (f"\n  reads {b['bytes_per_step'] / 1e6:.0f} MB per token at {b['effective_gbs']:.1f} GB/s = "
                     f"{b['fraction_before']:.2f} / {b['fraction_after']:.2f} of the read bandwidth measured "
                     f"right before / after ({b['read_gbs_before']:.1f} / {b['read_gbs_after']:.1f} GB/s)")
        console.print(line + f"  [{threads} threads]")


def _usable_cores() -> int:
    import os

    return len(os.sched_getaffinity(0))




@bench_app.command("decode")
@user_errors
def bench_decode_cmd(model: Path = ModelArg, threads: Optional[int] = ThreadsOpt, compare: bool = CompareOpt,
                     as_json: bool = JsonOpt, plot: Optional[Path] = PlotOpt,
                     n_gen: int = typer.Option(32, "--n-gen", help="decode steps to time"),
                     context: int = typer.Option(16, "--context", help="prompt tokens before decoding"),
                     numa_config: Optional[str] = NumaOpt):
    """Decode tokens/s on MODEL (median step), optionally against llama.cpp."""
    _bench_model(model, threads, compare, as_json, plot, ("decode",), 0, n_gen, context, numa_config)


@bench_app.command("prefill")
@user_errors
def bench_prefill_cmd(model: Path = ModelArg, threads: Optional[int] = ThreadsOpt, compare: bool = CompareOpt,
                      as_json: bool = JsonOpt, n_prompt: int = typer.Option(512, "--n-prompt"),
                      numa_config: Optional[str] = NumaOpt, prefill_precision: str = PrefillPrecisionOpt):
    """Prefill tokens/s of an n-token prompt on MODEL, optionally against llama.cpp."""
    _bench_model(model, threads, compare, as_json, None, ("prefill",), n_prompt, 0, 0, numa_config,
                 prefill_precision=prefill_precision)


@bench_app.command("sweep")
@user_errors
def bench_sweep_cmd(model: Path = ModelArg, threads: Optional[int] = ThreadsOpt, compare: bool = CompareOpt,
                    as_json: bool = JsonOpt, plot: Optional[Path] = PlotOpt,
                    depths: str = typer.Option("0,1024,4096,16384", "--depths", help="comma-separated context depths"),
                    n_gen: int = typer.Option(16, "--n-gen", help="decode steps timed at each depth")):
    """Decode tokens/s at several context depths, optionally against llama.cpp (sweep-bench)."""
    from hybrid_runtime.bench.sweep import plot_sweep, sweep

    try:
        ds = sorted({int(d) for d in depths.split(",") if d.strip()})
    except ValueError:
        raise InvalidRequestError(f"--depths must be comma-separated integers, not {depths!r}") from None
    if not ds or ds[0] < 0:
        raise InvalidRequestError("--depths must list depths >= 0")
    r = sweep(model, threads or _usable_cores(), ds, n_gen=n_gen, compare=compare)
    if plot is not None:
        r["plot"] = plot_sweep(r, plot)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    for row in r["rows"]:
        line = f"depth {row['depth']:>6}: ours {row['ours_tps']:.1f} t/s"
        if "ratio" in row:
            line += f", llama.cpp {row['llama_cpp_tps']:.1f} t/s, ratio {row['ratio']:.2f}x"
        console.print(line)


@bench_app.command("swarm")
@user_errors
def bench_swarm_cmd(model: Path = ModelArg, threads: Optional[int] = ThreadsOpt, as_json: bool = JsonOpt,
                    plot: Optional[Path] = typer.Option(None, "--plot", help="write a PNG of t/s against clients, with the memory-bound limit"),
                    clients: str = typer.Option("1,4,16,64", "--clients", help="comma-separated numbers of concurrent clients"),
                    n_gen: int = typer.Option(32, "--n-gen", min=2, help="tokens each client streams"),
                    prompt_tokens: int = typer.Option(32, "--prompt-tokens", min=1, help="prompt tokens of each client"),
                    ttft_prompt: int = typer.Option(512, "--ttft-prompt", min=1, help="prompt tokens of the time-to-first-token probe"),
                    max_batch: int = typer.Option(32, "--max-batch", min=1, help="the server's --max-batch (above --ttft-streams, so that the probe is admitted while they run)"),
                    ttft_streams: int = typer.Option(16, "--ttft-streams", min=0, help="streams running while the time-to-first-token probe is sent"),
                    max_queue: int = typer.Option(16, "--max-queue", min=0, help="the server's --max-queue (more clients get 503 and retry)")):
    """Concurrent streaming clients against a server on loopback: aggregate and per-stream t/s,
    time to first token, routed-expert bytes per token, against the memory-bound limit."""
    from hybrid_runtime.bench.swarm import plot_swarm, swarm

    try:
        ns = [int(c) for c in clients.split(",") if c.strip()]
    except ValueError:
        raise InvalidRequestError(f"--clients must be comma-separated integers, not {clients!r}") from None
    if not ns or min(ns) < 1:
        raise InvalidRequestError("--clients must list numbers >= 1")

    def progress(row):
        if not as_json:
            console.print(_swarm_line(row))

    r = swarm(model, threads or _usable_cores(), ns, n_gen=n_gen, prompt_tokens=prompt_tokens,
              ttft_prompt=ttft_prompt, max_batch=max_batch, max_queue=max_queue, ttft_streams=ttft_streams,
              progress=progress)
    if plot is not None:
        r["plot"] = str(plot_swarm(r, plot))
    if as_json:
        print(json.dumps(r, indent=2))
        return
    t = r["ttft"]
    console.print(f"time to first token of a {t['prompt_tokens']}-token prompt: idle {t['idle_s']:.2f} s, with "
                  f"{t['streams']} streams {t['with_streams_s']:.2f} s ({t.get('ratio', float('nan')):.2f}x); "
                  f"server healthy afterwards: {r['healthy_after']}; read bandwidth {r['read_gbs_before']:.1f} / "
                  f"{r['read_gbs_after']:.1f} GB/s before / after")


def _swarm_line(row: dict) -> str:
    line = (f"{row['clients']:>3} clients: {row['aggregate_tps']:.1f} t/s aggregate, {row['per_stream_tps']:.1f} per "
            f"stream, ttft {row['ttft_mean_s'] or 0:.2f} s, served {row['served']}, lost {row['lost']}, "
            f"503s {row['rejected_503']}")
    if "mean_batch" in row:
        line += f"; batch {row['mean_batch']:.1f}, step {1e3 * row['step_s']:.1f} ms = {row['decode_tps']:.1f} t/s decoding"
    if "bound_step_s" in row:
        line += (f" vs {1e3 * row['bound_step_s']:.1f} ms memory-bound ({row['step_over_bound']:.2f}x), "
                 f"{row['expert_bytes_per_token'] / 2**20:.1f} MiB of experts per token")
    return line


@bench_app.command("gpu")
@user_errors
def bench_gpu_cmd(model: Path = ModelArg, threads: Optional[int] = ThreadsOpt, as_json: bool = JsonOpt,
                  n_prompt: int = typer.Option(512, "--n-prompt", help="prompt tokens, prefilled as one chunk"),
                  n_gen: int = typer.Option(32, "--n-gen", help="decode steps to time"),
                  stand_in: Optional[str] = typer.Option(None, "--stand-in", hidden=True,
                                                         help="torch device standing in for the GPU (tests)")):
    """The GPU path against the CPU path: agreement, prefill/decode t/s, cache off/on, CUDA graphs."""
    import torch

    from hybrid_runtime.bench.gpu import bench_gpu, markdown

    if stand_in is None and not torch.cuda.is_available():
        raise InvalidRequestError("bench gpu needs a CUDA device, and torch sees none")
    r = bench_gpu(model, threads, n_prompt=n_prompt, n_gen=n_gen, stand_in=stand_in)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    if torch.cuda.is_available() and stand_in is None:
        console.print(f"[dim]{torch.cuda.get_device_name()} · {model.name} · {n_prompt} prompt, {n_gen} decode[/dim]")
    print(markdown(r))


def main() -> None:
    _mount_optional()
    try:
        code = app(standalone_mode=False)
    except click_errors.NoArgsIsHelpError as e:  # a bare command: its help
        print(e.ctx.get_help() if e.ctx is not None else e.format_message(), file=sys.stderr)
        sys.exit(2)
    except click_errors.UsageError as e:  # a bad flag or argument: one line, exit 2
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        err.print(f"[red]error:[/red] {escape(e.format_message())}{escape(hint)}", soft_wrap=True)
        sys.exit(2)
    except click_errors.ClickException as e:
        err.print(f"[red]error:[/red] {escape(e.format_message())}", soft_wrap=True)
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _mount_optional() -> None:
    """Commands whose modules are optional extras (server needs fastapi)."""
    from hybrid_runtime.chat import chat_command

    app.command("chat")(user_errors(chat_command))
    from hybrid_runtime.numa.tune import numa_tune_command

    app.command("numa-tune")(user_errors(numa_tune_command))
    try:
        import fastapi  # noqa: F401  (the server extra)
    except ImportError:
        return
    from hybrid_runtime.server import serve_command

    app.command("serve")(user_errors(serve_command))


if __name__ == "__main__":
    main()
