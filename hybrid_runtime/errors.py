"""User-facing errors: each carries one clear sentence, and the CLI prints it without a traceback."""


class HybridError(Exception):
    """Base class of every error meant for the user."""


class ModelFormatError(HybridError):
    """The file is not a valid GGUF model (truncated, corrupt, inconsistent)."""


class UnsupportedModelError(HybridError):
    """The file is valid but uses an architecture or quant type we do not run."""


class InvalidRequestError(HybridError):
    """A request or option has an invalid value (bad flag, bad sampling parameter)."""


class ContextOverflowError(InvalidRequestError):
    """A prompt does not fit in the model's context window."""
