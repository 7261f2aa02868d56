"""Shared fixtures: synthetic models built by the project's own generator, cached per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Where synthetic models are built (the key covers the generator's source: never stale)."""
    path = Path(os.environ.get("HR_MODEL_CACHE", ROOT / ".pytest_cache" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def tiny(model_cache):
    """tiny(preset, quant, **kw) -> (quantized path, F32 twin path)."""
    from hybrid_runtime.synth import cached_model

    def build(preset: str = "kimi-k2-tiny", quant: str = "Q4_K_M", **kw):
        return cached_model(preset, quant, model_cache, **kw)

    return build


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    """Children spawned by the tests get default signal dispositions: a run started with SIGINT
    ignored (a background job, nohup) would otherwise hand that on to every CLI it starts."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def structured_server(model_cache):
    """A `serve` process on the tiny Kimi K2 model for the structured-output tests: (base url, model path)."""
    from serve_process import serve_process

    from hybrid_runtime.synth import cached_model

    path = cached_model("kimi-k2-tiny", "Q4_K_M", model_cache)[0]
    with serve_process(path, "--n-ctx", "2048", "--model-name", "tiny", "--threads", "1") as (base, _, _):
        yield base, path
