"""hybrid_runtime: trillion-parameter MoE models (Kimi K2, DeepSeek-V3) on one workstation."""

from hybrid_runtime.errors import HybridError

__version__ = "0.1.0"
__all__ = ["load", "Model", "HybridError", "__version__"]


def __getattr__(name):  # lazy: importing the package stays cheap (the CLI starts fast)
    if name in ("load", "Model"):
        from hybrid_runtime import api

        return getattr(api, name)
    raise AttributeError(name)
