"""Open single or split GGUF files: metadata as Python values, tensors as zero-copy mmap views.

A split model is named `name-00001-of-00003.gguf`; given any part we open all of them.
Tensor data is never copied here: `TensorRef.data` is a numpy view into the memory map
(uint8 `[..., row_bytes]` for block-quantized types, the element type otherwise).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from hybrid_runtime.errors import ModelFormatError

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_MISSING = object()
_MAX_DIMS = 4


@dataclass(slots=True)
class TensorRef:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: reversed ggml ne, elements (not bytes)
    data: np.ndarray  # zero-copy view into the mapped file
    n_bytes: int
    part: int  # index of the split part holding it

    @property
    def is_quantized(self) -> bool:
        return self.data.dtype == np.uint8 and self.ggml_type not in (GGMLQuantizationType.I8,)


def split_parts(path: Path) -> list[Path]:
    """All parts of a split model given any one of them (a single file gives itself)."""
    m = _SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    if count < 1:
        raise ModelFormatError(f"{path}: split name says 0 parts")
    parts = [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelFormatError(f"{path}: split model is incomplete, missing {', '.join(missing[:3])}")
    return parts


def _field_value(field) -> Any:
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        sub = types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def _check_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ModelFormatError(f"{path}: not a GGUF file (bad magic or too short)")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ModelFormatError(f"{path}: unsupported GGUF version {version}")
    n_tensors = int.from_bytes(head[8:16], "little")
    n_kv = int.from_bytes(head[16:24], "little")
    # every tensor info takes >= 32 bytes and every kv >= 12: counts beyond that are lies
    if n_tensors * 32 > size or n_kv * 12 > size:
        raise ModelFormatError(f"{path}: corrupt header ({n_tensors} tensors, {n_kv} keys in {size} bytes)")


def _read_part(path: Path) -> GGUFReader:
    _check_header(path)
    try:
        return GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as e:
        raise ModelFormatError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from None


def _tensor_refs(reader: GGUFReader, part: int, path: Path) -> dict[str, TensorRef]:
    refs: dict[str, TensorRef] = {}
    file_size = path.stat().st_size
    for t in reader.tensors:
        dims = [int(d) for d in t.shape]
        if not 1 <= len(dims) <= _MAX_DIMS or any(d <= 0 for d in dims):
            raise ModelFormatError(f"{path}: tensor {t.name} has invalid shape {dims}")
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        if dims[0] % block:
            raise ModelFormatError(f"{path}: tensor {t.name} row of {dims[0]} is not a multiple of its block {block}")
        if t.data_offset + t.n_bytes > file_size or t.data.nbytes != t.n_bytes:
            raise ModelFormatError(f"{path}: tensor {t.name} extends past the end of the file (truncated?)")
        refs[t.name] = TensorRef(t.name, GGMLQuantizationType(t.tensor_type), tuple(reversed(dims)), t.data, int(t.n_bytes), part)
    return refs


class GGUFModelFile:
    """A GGUF model, possibly split: `metadata` (dict of Python values) and `tensors` (name -> TensorRef)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise ModelFormatError(f"{path}: no such file")
        if not path.is_file():
            raise ModelFormatError(f"{path}: not a file")
        self.path = path
        self.parts = split_parts(path)
        self._readers = [_read_part(p) for p in self.parts]
        self.metadata = self._metadata(self._readers[0])
        self.tensors: dict[str, TensorRef] = {}
        for i, (reader, p) in enumerate(zip(self._readers, self.parts)):
            for name, ref in _tensor_refs(reader, i, p).items():
                if name in self.tensors:
                    raise ModelFormatError(f"{p}: tensor {name} appears in two parts")
                self.tensors[name] = ref
        self._check_split()

    @staticmethod
    def _metadata(reader: GGUFReader) -> dict[str, Any]:
        try:
            return {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        except (ValueError, IndexError, TypeError) as e:
            raise ModelFormatError(f"corrupt GGUF metadata ({e})") from None

    def _check_split(self) -> None:
        expected = self.metadata.get("split.tensors.count")
        if expected is not None and expected != len(self.tensors):
            raise ModelFormatError(f"{self.path}: split model holds {len(self.tensors)} tensors, header says {expected}")

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{self.path}: no general.architecture in the metadata")
        return arch

    def get(self, key: str, default: Any = _MISSING) -> Any:
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise ModelFormatError(f"{self.path}: required metadata key {key} is missing")
        return default

    def tensor(self, name: str) -> TensorRef:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.path}: required tensor {name} is missing") from None

    def has(self, name: str) -> bool:
        return name in self.tensors

    @property
    def n_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())
