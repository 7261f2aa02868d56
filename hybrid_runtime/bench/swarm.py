"""`hybrid-runtime bench swarm`: N concurrent streaming clients against a server on loopback.

A `hybrid-runtime serve` child process runs the model; for each N, N client threads each stream
one /v1/completions request (distinct random prompts, greedy, `ignore_eos` so every stream runs
its full length; a 503 is retried after its Retry-After). Reported per N: aggregate and
per-stream tokens/s, time to first token, the 503s, requests lost, and from the server's
/metrics the decode steps, the mean batch, the routed-expert bytes read per generated token
(counted by the compiled step: an expert chosen by several tokens of a step is read once) and
the step time against the bytes each step read divided by the read bandwidth measured right
before and after (the memory-bound limit for that N). Then the time to first token of a new
long prompt on the idle server and while streams run.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hybrid_runtime.errors import HybridError

_METRICS = ("generated_tokens_total", "decode_steps_total", "decode_step_tokens_total", "decode_step_seconds_total",
            "expert_reads_total", "expert_read_bytes_total", "shared_prefix_tokens_total")


@dataclass
class ClientResult:
    ttft_s: float | None = None
    start: float = 0.0
    first: float = 0.0
    end: float = 0.0
    tokens: int = 0
    rejected: int = 0  # 503s retried
    error: str | None = None
    chunks: list[float] = field(default_factory=list)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `hybrid-runtime serve` child on loopback."""

    def __init__(self, model: Path, args: list[str], timeout_s: float = 900.0):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "hybrid_runtime.cli", "serve", str(model), "--port",
                                      str(self.port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + timeout_s
        while self.health() != 200:
            if self.proc.poll() is not None:
                raise HybridError(f"the server exited: {self.proc.stderr.read().strip()[-500:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise HybridError("the server did not become ready in time")
            time.sleep(0.3)

    def conn(self, timeout: float = 600.0) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def health(self) -> int | None:
        try:
            c = self.conn(5)
            c.request("GET", "/health")
            return c.getresponse().status
        except OSError:
            return None

    def metrics(self) -> dict[str, float]:
        c = self.conn(30)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("hybrid_runtime_") and " " in line and "{" not in line:
                name, value = line.split(" ", 1)
                out[name.removeprefix("hybrid_runtime_")] = float(value)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream_completion(server: Server, prompt: list[int], n_gen: int, res: ClientResult) -> None:
    """One streaming request; 503s are retried after Retry-After. Fills `res`."""
    body = json.dumps({"prompt": prompt, "max_tokens": n_gen, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
    res.start = time.perf_counter()
    try:
        while True:
            c = server.conn()
            c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status == 503:
                res.rejected += 1
                wait = float(r.getheader("Retry-After") or 1)
                r.read()
                time.sleep(wait)
                continue
            if r.status != 200:
                res.error = f"HTTP {r.status}: {r.read()[:200]!r}"
                return
            break
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                res.error = str(chunk["error"])
                return
            if chunk["choices"] and chunk["choices"][0].get("text") is not None:
                now = time.perf_counter()
                if res.ttft_s is None:
                    res.ttft_s, res.first = now - res.start, now
                res.chunks.append(now)
            if chunk.get("usage"):
                res.tokens = chunk["usage"]["completion_tokens"]
        res.end = time.perf_counter()
        res.tokens = res.tokens or len(res.chunks)
    except (OSError, ValueError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"


def run_clients(server: Server, prompts: list[list[int]], n_gen: int) -> list[ClientResult]:
    results = [ClientResult() for _ in prompts]
    threads = [threading.Thread(target=stream_completion, args=(server, p, n_gen, r), daemon=True)
               for p, r in zip(prompts, results)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _bytes_model(model: Path) -> tuple[int, float]:
    """(bytes a decode step reads besides the routed experts, bytes of one routed expert on average)."""
    from hybrid_runtime.bench.e2e import step_bytes
    from hybrid_runtime.weights.model_file import open_model_file

    gf, _, cfg = open_model_file(model)
    routed = sum(t.n_bytes for t in gf.tensors.values() if "_exps" in t.name)
    per_step_routed = routed * cfg.n_expert_used / max(cfg.n_expert, 1)
    moe_layers = sum(1 for i in range(cfg.n_layer) if cfg.is_moe_layer(i))
    return int(step_bytes(gf, cfg) - per_step_routed), routed / max(cfg.n_expert * moe_layers, 1)


def _row(n: int, results: list[ClientResult], m0: dict, m1: dict, other_bytes: int, bw: float) -> dict:
    ok = [r for r in results if r.error is None and r.ttft_s is not None]
    d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in _METRICS}
    tokens = sum(r.tokens for r in ok)
    span = max(r.end for r in ok) - min(r.start for r in ok) if ok else 0.0
    per_stream = [(r.tokens - 1) / (r.end - r.first) for r in ok if r.tokens > 1 and r.end > r.first]
    steps = d["decode_steps_total"]
    row = {"clients": n, "served": len(ok), "lost": len(results) - len(ok), "rejected_503": sum(r.rejected for r in results),
           "errors": sorted({r.error for r in results if r.error})[:3], "generated_tokens": tokens,
           "aggregate_tps": tokens / span if span > 0 else 0.0,
           "per_stream_tps": float(np.mean(per_stream)) if per_stream else 0.0,
           "ttft_mean_s": float(np.mean([r.ttft_s for r in ok])) if ok else None,
           "ttft_max_s": max((r.ttft_s for r in ok), default=None),
           "decode_steps": int(steps)}
    if steps > 0:
        batch = d["decode_step_tokens_total"] / steps
        step_s = d["decode_step_seconds_total"] / steps
        row.update(mean_batch=batch, step_s=step_s, decode_tps=batch / step_s)
        if d["expert_read_bytes_total"] > 0:
            expert_bytes = d["expert_read_bytes_total"] / steps
            read = other_bytes + expert_bytes
            limit = read / (bw * 1e9)
            row.update(experts_read_per_step=d["expert_reads_total"] / steps,
                       expert_bytes_per_token=d["expert_read_bytes_total"] / d["decode_step_tokens_total"],
                       bytes_per_step=read, bound_step_s=limit, bound_tps=batch / limit, step_over_bound=step_s / limit)
    return row


def _ttft(server: Server, prompt: list[int]) -> float | None:
    r = ClientResult()
    stream_completion(server, prompt, 1, r)
    return r.ttft_s


def swarm(model: Path, threads: int, clients: list[int], n_gen: int = 32, prompt_tokens: int = 32,
          ttft_prompt: int = 512, max_batch: int = 32, max_queue: int = 16, ttft_streams: int = 16,
          server_args: list[str] | None = None, progress=print) -> dict:
    from hybrid_runtime.bench.kernels import ReadBandwidth

    other_bytes, expert_bytes = _bytes_model(model)
    bw = ReadBandwidth(1 << 30)
    before = bw.measure(threads)
    n_ctx = max(ttft_prompt, prompt_tokens) + 4 * n_gen + 64
    args = ["--threads", str(threads), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
            "--n-ctx", str(n_ctx), *(server_args or [])]
    rng = np.random.default_rng(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [rng.integers(10, 2000, length).tolist() for _ in range(n)]

    server = Server(model, args)
    out: dict = {"model": str(model), "threads": threads, "max_batch": max_batch, "max_queue": max_queue,
                 "n_gen": n_gen, "prompt_tokens": prompt_tokens, "read_gbs_before": before,
                 "non_expert_bytes_per_step": other_bytes, "bytes_per_expert": expert_bytes, "rows": []}
    try:
        run_clients(server, prompts(2, prompt_tokens), 4)  # warm-up: compile, page in
        for n in clients:
            m0 = server.metrics()
            results = run_clients(server, prompts(n, prompt_tokens), n_gen)
            row = _row(n, results, m0, server.metrics(), other_bytes, before)
            out["rows"].append(row)
            progress(row)
        idle = [_ttft(server, prompts(1, ttft_prompt)[0]) for _ in range(2)]
        streams = [ClientResult() for _ in range(ttft_streams)]
        ts = [threading.Thread(target=stream_completion, args=(server, p, 4 * n_gen, r), daemon=True)
              for p, r in zip(prompts(ttft_streams, prompt_tokens), streams)]
        for t in ts:
            t.start()
        deadline = time.monotonic() + 600
        while sum(r.ttft_s is not None for r in streams) < ttft_streams and time.monotonic() < deadline:
            time.sleep(0.05)
        loaded = _ttft(server, prompts(1, ttft_prompt)[0])
        busy = sum(1 for r in streams if r.end == 0.0)  # streams still running when it answered
        for t in ts:
            t.join()
        out["ttft"] = {"prompt_tokens": ttft_prompt, "idle_s": min(x for x in idle if x is not None),
                       "with_streams_s": loaded, "streams": ttft_streams, "streams_running_at_answer": busy}
        if loaded is not None:
            out["ttft"]["ratio"] = loaded / out["ttft"]["idle_s"]
        out["healthy_after"] = server.health() == 200
    finally:
        server.stop()
    out["read_gbs_after"] = bw.measure(threads)
    base = next((r for r in out["rows"] if r["clients"] == 1), None)
    for r in out["rows"]:
        if base and base.get("aggregate_tps"):
            r["speedup_vs_one"] = r["aggregate_tps"] / base["aggregate_tps"]
        if base and base.get("decode_tps") and "decode_tps" in r:  # the decode steps alone
            r["decode_speedup_vs_one"] = r["decode_tps"] / base["decode_tps"]
        if base and "bytes_per_step" in base and "bytes_per_step" in r:
            r["bytes_limit_speedup"] = r["mean_batch"] * base["bytes_per_step"] / (base["mean_batch"] * r["bytes_per_step"])
    return out


def plot_swarm(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    n = [r["clients"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(n, [r["aggregate_tps"] for r in rows], "o-", label="aggregate t/s (measured)")
    dec = [(r["clients"], r["decode_tps"]) for r in rows if "decode_tps" in r]
    if dec:
        ax.plot(*zip(*dec), "^-", label="decode steps alone (mean batch / step time)")
    ax.plot(n, [r["per_stream_tps"] for r in rows], "s--", label="per-stream t/s")
    bound = [(r["clients"], r["bound_tps"]) for r in rows if "bound_tps" in r]
    if bound:
        ax.plot(*zip(*bound), "k:", label=f"memory-bound limit ({result['read_gbs_before']:.0f} GB/s read)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(x) for x in n])
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{Path(result['model']).name}: {result['threads']} threads, batch <= {result['max_batch']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
