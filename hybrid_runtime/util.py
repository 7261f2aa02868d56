"""Small process-level helpers."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from pathlib import Path


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp's C code prints to fd 2 even with verbose=False; keep the user's terminal clean."""
    try:
        fd = os.dup(2)
    except OSError:  # no fd 2 (daemonized): nothing to hide
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write text to path via a temporary file in the same directory and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for a plain write
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
