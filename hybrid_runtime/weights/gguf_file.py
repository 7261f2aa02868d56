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
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from hybrid_runtime.errors import ModelFormatError
from hybrid_runtime.weights.gguf_header import GGUFHeader, TensorInfo, read_header

_SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_MISSING = object()


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


_FLOAT_TYPES = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
                GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                GGMLQuantizationType.I64: np.int64}


def _map(path: Path) -> np.memmap | bytes:
    try:
        if path.stat().st_size == 0:
            return b""
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{path}: cannot map the file ({e})") from None


def _view(mm: np.ndarray, t: TensorInfo) -> np.ndarray:
    """Zero-copy view: element dtype for plain types, uint8 [..., row_bytes] for block-quantized ones."""
    shape = list(reversed(t.ne))
    raw = mm[t.offset:t.offset + t.n_bytes]
    dtype = _FLOAT_TYPES.get(t.ggml_type)
    if dtype is None:
        block, type_size = GGML_QUANT_SIZES[t.ggml_type]
        shape[-1] = shape[-1] // block * type_size
        return raw.reshape(shape)
    return raw.view(dtype).reshape(shape)


def _tensor_refs(header: GGUFHeader, mm, part: int) -> dict[str, TensorRef]:
    return {t.name: TensorRef(t.name, t.ggml_type, tuple(reversed(t.ne)), _view(mm, t), t.n_bytes, part)
            for t in header.tensors}


def _check_split_part(path: Path, metadata: dict, index: int, n_parts: int) -> None:
    """A part's split.no / split.count agree with its place among the files found."""
    count, no = metadata.get("split.count"), metadata.get("split.no")
    if count is None and n_parts == 1:
        return
    if count != n_parts:
        what = "a split model, but no sibling parts are named" if n_parts == 1 else f"{n_parts} parts are named"
        raise ModelFormatError(f"{path}: header says split.count {count!r}, yet {what} (mismatched split parts)")
    if no != index:
        raise ModelFormatError(f"{path}: header says split.no {no!r}, but the file name makes it part {index} (mismatched split parts)")


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
        self._maps = [_map(p) for p in self.parts]
        self.headers = [read_header(p, mm) for p, mm in zip(self.parts, self._maps)]
        self.metadata = self.headers[0].metadata
        self.tensors: dict[str, TensorRef] = {}
        self.store_report = None  # set by experts/store.prepare: where the prepared tensors live
        self.panels: dict = {}  # name -> quant/gemm.StoredPanels, made by experts/store.prepare
        for i, (header, mm, p) in enumerate(zip(self.headers, self._maps, self.parts)):
            _check_split_part(p, header.metadata, i, len(self.parts))
            for name, ref in _tensor_refs(header, mm, i).items():
                if name in self.tensors:
                    raise ModelFormatError(f"{p}: tensor {name} appears in two parts")
                self.tensors[name] = ref
        self._check_split()

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
