"""Architecture registry keyed by GGUF `general.architecture`."""

from __future__ import annotations

from types import ModuleType

from hybrid_runtime.errors import UnsupportedModelError
from hybrid_runtime.models import deepseek2

ARCHITECTURES: dict[str, ModuleType] = {deepseek2.ARCH: deepseek2}


def get_architecture(name: str) -> ModuleType:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModelError(f"architecture {name!r} is not supported yet (supported: {known})") from None
