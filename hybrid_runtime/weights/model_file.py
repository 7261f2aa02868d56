"""Open and validate a model file: the one path `load()` and `inspect` share.

GGUFModelFile checks the container (header bounds, tensor layout, split parts); the architecture
builds its config from the metadata; then the metadata is checked against the tensors.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from hybrid_runtime.config import ModelConfig, _require_positive
from hybrid_runtime.errors import HybridError, ModelFormatError
from hybrid_runtime.models import get_architecture
from hybrid_runtime.quant.registry import get_format
from hybrid_runtime.weights.consistency import check_consistency
from hybrid_runtime.weights.gguf_file import GGUFModelFile


def open_model_file(path: str | Path) -> tuple[GGUFModelFile, ModuleType, ModelConfig]:
    """(file, architecture module, config), or one HybridError naming the file and the problem."""
    gf = GGUFModelFile(path)
    arch = get_architecture(gf.architecture)
    cfg = read_checked_config(gf, arch)
    for ref in gf.tensors.values():
        get_format(ref.ggml_type)  # UnsupportedModelError for types we do not run
    check_consistency(gf, cfg)
    return gf, arch, cfg


def read_checked_config(gf: GGUFModelFile, arch: ModuleType) -> ModelConfig:
    try:
        cfg = arch.read_config(gf)
        _require_positive(cfg)
    except HybridError as e:
        raise type(e)(_with_path(gf, str(e))) from None
    except (TypeError, ValueError, OverflowError, ZeroDivisionError) as e:  # e.g. a key holding a string or an array
        raise ModelFormatError(f"{gf.path}: metadata of the wrong type or value ({e})") from None
    if cfg.n_layer > len(gf.tensors):
        raise ModelFormatError(f"{gf.path}: block_count {cfg.n_layer} is more than the file's {len(gf.tensors)} tensors")
    return cfg


def _with_path(gf: GGUFModelFile, message: str) -> str:
    return message if str(gf.path) in message else f"{gf.path}: {message}"
