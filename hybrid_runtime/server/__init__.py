"""OpenAI-compatible HTTP server: `create_app` (FastAPI) and the `serve_command` typer command."""

from hybrid_runtime.server.command import serve_command

__all__ = ["serve_command", "create_app", "ServerConfig"]


def __getattr__(name):  # the FastAPI app module loads only when asked for
    if name in ("create_app", "ServerConfig"):
        from hybrid_runtime.server import app

        return getattr(app, name)
    raise AttributeError(name)
