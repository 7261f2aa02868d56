"""Synthetic deepseek2 GGUF models: the project's test and benchmark models.

`make_tiny_model` writes a random model quantized by llama.cpp (plus an optional F32 twin);
`make_trained_model` the checked-in trained model (preset `kimi-k2-stdlib`, synth/trained.py);
`make_scale_model` writes random quant blocks at real Kimi K2 shapes; `cached_model` builds a
tiny model once per argument set into a cache directory (for session-scoped test fixtures).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path

from hybrid_runtime.synth.presets import PRESETS, Preset, get_preset
from hybrid_runtime.synth.tiny import FTYPES, make_tiny_model, write_f32_twin

__all__ = ["PRESETS", "FTYPES", "Preset", "get_preset", "make_tiny_model", "make_scale_model",
           "make_trained_model", "write_f32_twin", "cached_model", "TRAINED_PRESET"]

TRAINED_PRESET = "kimi-k2-stdlib"      # the trained checkpoint of assets/kimi-k2-stdlib/


def make_scale_model(*args, **kwargs) -> Path:
    """See hybrid_runtime.synth.scale.make_scale_model."""
    from hybrid_runtime.synth.scale import make_scale_model as impl
    return impl(*args, **kwargs)


def make_trained_model(*args, **kwargs) -> Path:
    """See hybrid_runtime.synth.trained.make_trained_model."""
    from hybrid_runtime.synth.trained import make_trained_model as impl
    return impl(*args, **kwargs)


def cached_model(preset: str | Preset, quant: str, cache_dir: str | os.PathLike, **kw) -> tuple[Path, Path]:
    """(quantized path, F32 twin path) of a tiny model, built once per distinct argument set.

    The cache key covers every argument and the synth package's own source, so a change to
    the generator rebuilds. Safe against concurrent callers (a lock file per key).
    `preset="kimi-k2-stdlib"` is the trained checkpoint (only `kv_layout` applies).
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(preset, quant, kw)
    name = preset.name if isinstance(preset, Preset) else str(preset)
    stem = f"{name}-{quant}-{key}"
    quant_path, twin_path = cache_dir / f"{stem}.gguf", cache_dir / f"{stem}.f32.gguf"
    with open(cache_dir / f"{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (quant_path.exists() and twin_path.exists()):
            tmp_q, tmp_t = quant_path.with_suffix(".tmp"), twin_path.with_suffix(".tmp")
            if name == TRAINED_PRESET:
                make_trained_model(quant, tmp_q, f32_twin=tmp_t, **kw)
            else:
                make_tiny_model(preset, quant, tmp_q, f32_twin=tmp_t, **kw)
            os.replace(tmp_t, twin_path)
            os.replace(tmp_q, quant_path)
    return quant_path, twin_path


def _cache_key(preset: str, quant: str, kw: dict) -> str:
    h = hashlib.sha256(json.dumps([preset, quant, sorted(kw.items())], default=str).encode())
    for src in sorted(Path(__file__).parent.glob("*.py")):
        h.update(src.read_bytes())
    if preset == TRAINED_PRESET:
        from hybrid_runtime.synth.trained import ASSET_DIR
        for src in sorted(ASSET_DIR.glob("*")):
            h.update(src.read_bytes())
    return h.hexdigest()[:12]
