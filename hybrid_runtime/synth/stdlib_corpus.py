"""The trained demo model's corpus: the running interpreter's standard library.

Every `.py` file of the standard library (not site-packages; its test suites only when asked)
plus the docstrings of the built-in modules, in sorted path order. About one file in fifty is held out
(chosen by a hash of its relative path, so the split is the same on every machine that has the
file) for validation during training.
"""

from __future__ import annotations

import importlib
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}
HELD_OUT_EVERY = 50


@dataclass(frozen=True, slots=True)
class Corpus:
    train: list[str]            # one document per file (or built-in module docstrings)
    held_out: list[str]
    n_files: int

    @property
    def train_bytes(self) -> int:
        return sum(len(d.encode()) for d in self.train)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path | None = None, tests: bool = False) -> list[Path]:
    """The standard library's .py files in sorted relative-path order (test suites only when
    `tests`)."""
    root = root or stdlib_root()
    skip = _SKIP_DIRS if tests else _SKIP_DIRS | _TEST_DIRS
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_held_out(relative: str) -> bool:
    return zlib.crc32(relative.encode()) % HELD_OUT_EVERY == 0


def builtin_docstrings() -> str:
    """Docstrings of the built-in (C) modules and their public members."""
    parts = []
    for name in sorted(sys.builtin_module_names):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        parts.append(f"# {name}\n{mod.__doc__ or ''}")
        for attr in sorted(dir(mod)):
            doc = getattr(getattr(mod, attr, None), "__doc__", None)
            if not attr.startswith("_") and isinstance(doc, str) and doc.strip():
                parts.append(f"{name}.{attr}: {doc.strip()}")
    return "\n\n".join(parts) + "\n"


def load_corpus(root: Path | None = None, tests: bool = False) -> Corpus:
    """The corpus split into train and held-out documents (with the test suites when `tests`)."""
    root = root or stdlib_root()
    train, held = [], []
    files = source_files(root, tests)
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        (held if is_held_out(path.relative_to(root).as_posix()) else train).append(text)
    train.append(builtin_docstrings())
    return Corpus(train, held, len(files))
