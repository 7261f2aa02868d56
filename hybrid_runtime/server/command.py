"""`hybrid-runtime serve`: the typer command that runs the OpenAI-compatible server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from hybrid_runtime import cli_options as opt


def serve_command(
    model: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True, help="GGUF model file (first part of a split model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 exposes the server to the network)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="HYBRID_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 and /metrics."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id clients must send (default: the file's stem)."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=1, help="Context length in tokens (default: min(training context, 8192))."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for the expert kernels (default: all cores)."),
    max_queue: int = typer.Option(16, "--max-queue", min=0, help="Requests that may wait for a place in the batch; more get HTTP 503 with Retry-After."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Requests decoded together in one batched step (continuous batching)."),
    cache_mib: Optional[float] = typer.Option(None, "--cache-mib", min=0.001, help="Latent-cache budget of the running requests in MiB (default: --max-batch full contexts within a quarter of the free memory)."),
    exact_reuse: bool = typer.Option(True, "--exact-reuse/--any-reuse", help="Reuse only cached prefixes that give the same bits as computing them anew (a request's output never depends on what else runs), or any shared prefix (faster multi-turn)."),
    prefill_chunk: Optional[int] = typer.Option(None, "--prefill-chunk", min=1, help="Prompt tokens per step (default 512); below 96 every token runs through the compiled step's per-token kernels and any shared prefix is reused exactly."),
    compute: str = typer.Option("fast", "--compute", help="'fast' (quantized CPU experts) or 'reference' (exact float path)."),
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
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions)."""
    import uvicorn

    from hybrid_runtime.config import RuntimeOptions
    from hybrid_runtime.errors import HybridError
    from hybrid_runtime.server.app import ServerConfig, create_app
    from hybrid_runtime.server.validation import RequestGuard, allowed_hosts

    if compute not in ("fast", "reference"):
        raise typer.BadParameter("must be 'fast' or 'reference'", param_hint="--compute")
    options = {k: v for k, v in (("n_ctx", n_ctx), ("threads", threads), ("compute", compute),
                                 ("prefill_chunk", prefill_chunk)) if v is not None}
    try:
        options.update(opt.load_options(numa_config, expert_store, device, gpu_mem, cpu_moe, n_cpu_moe, override))
        options.update(opt.gpu_path_options(expert_profile, record_routing, speculative_prefetch, cuda_graphs))
        RuntimeOptions(**options).validate()  # bad paths fail here, before the socket opens
        from hybrid_runtime.weights.model_file import open_model_file

        open_model_file(model)  # a corrupt or inconsistent file too (headers only, no weights read)
    except HybridError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(1)
    cfg = ServerConfig(str(model), model_name, api_key, options, max_queue, max_batch=max_batch, cache_mib=cache_mib,
                       exact_reuse=exact_reuse)
    failed: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True

    app = RequestGuard(create_app(cfg, on_load_error=on_load_error), hosts=allowed_hosts(host))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=3, access_log=False))
    print(f"hybrid-runtime: serving '{cfg.served_name}' on http://{host}:{port}/v1 (loading the model...)",
          file=sys.stderr, flush=True)
    server.run()
    if failed or not server.started:
        raise typer.Exit(1)
