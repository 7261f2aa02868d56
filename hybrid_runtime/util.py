"""Small process-level helpers."""

from __future__ import annotations

import contextlib
import os
import sys


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
