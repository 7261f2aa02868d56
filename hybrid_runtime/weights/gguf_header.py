"""A bounded GGUF header parser: every length is checked against what is left of the file
before anything is read or allocated, so a hostile header gives one ModelFormatError.

Layout (little-endian), versions 2 and 3:

    "GGUF" u32 version   u64 n_tensors   u64 n_kv
    n_kv    x  string key, u32 value_type, value          (string = u64 length + UTF-8 bytes)
                 array value = u32 element_type, u64 count, count elements (no nested arrays)
    n_tensors x string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from hybrid_runtime.errors import ModelFormatError

MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
_STRING, _ARRAY = 8, 9
# value type -> (struct code, size); strings and arrays are parsed apart
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4), 6: ("f", 4),
            7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_NUMPY = {"B": np.uint8, "b": np.int8, "H": np.uint16, "h": np.int16, "I": np.uint32, "i": np.int32,
          "f": np.float32, "?": np.uint8, "Q": np.uint64, "q": np.int64, "d": np.float64}
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset


@dataclass(slots=True, frozen=True)
class TensorInfo:
    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    offset: int  # absolute offset in the file
    n_bytes: int


@dataclass(slots=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_start: int = 0
    file_size: int = 0


class _Cursor:
    """Reads from a bytes-like buffer; every read is checked against the end first."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, problem: str):
        raise ModelFormatError(f"{self.path}: {problem}")

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left:
            self.fail(f"{what} needs {n} bytes at offset {self.pos}, only {self.left} are left (truncated or corrupt)")

    def scalar(self, code: str, size: int, what: str):
        self.need(size, what)
        (v,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def array(self, what: str) -> list:
        sub = self.u32(f"the element type of {what}")
        count = self.u64(f"the length of {what}")
        if sub == _STRING:
            self.need(count * 8, f"{what} ({count} strings)")
            return [self.string(f"element {i} of {what}") for i in range(count)]
        if sub not in _SCALARS:
            self.fail(f"{what} has " + ("nested arrays" if sub == _ARRAY else f"unknown element type {sub}"))
        code, size = _SCALARS[sub]
        self.need(count * size, f"{what} ({count} elements)")
        values = np.frombuffer(self.buf, _NUMPY[code], count, self.pos)
        self.pos += count * size
        return values.astype(bool).tolist() if code == "?" else values.tolist()

    def value(self, vtype: int, what: str) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what)
        if vtype not in _SCALARS:
            self.fail(f"{what} has unknown value type {vtype}")
        return self.scalar(*_SCALARS[vtype], what)


def read_header(path: Path, buf) -> GGUFHeader:
    """Parse and check the header of one GGUF file held in `buf` (bytes or a memory map)."""
    c = _Cursor(buf, path)
    if c.left < 24 or bytes(buf[:4]) != b"GGUF":
        c.fail("not a GGUF file (bad magic or too short)")
    c.pos = 4
    version = c.u32("the version")
    if version not in (2, 3):
        c.fail(f"unsupported GGUF version {version} (2 and 3 are supported)")
    n_tensors, n_kv = c.u64("the tensor count"), c.u64("the key count")
    if n_kv * _MIN_KV_BYTES > c.left or n_tensors * _MIN_TENSOR_INFO_BYTES > c.left:
        c.fail(f"corrupt header: {n_tensors} tensors and {n_kv} keys cannot fit in {len(buf)} bytes")
    metadata = _read_metadata(c, n_kv)
    alignment = _alignment(c, metadata)
    infos = [_read_tensor_info(c, i) for i in range(n_tensors)]
    data_start = -(-c.pos // alignment) * alignment
    header = GGUFHeader(version, metadata, alignment=alignment, data_start=data_start, file_size=len(buf))
    header.tensors = _place_tensors(c, infos, data_start, alignment)
    return header


def _read_metadata(c: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}")
        vtype = c.u32(f"the type of key {key!r}")
        value = c.value(vtype, f"key {key!r}")
        if key in metadata:
            c.fail(f"duplicate metadata key {key!r}")
        metadata[key] = value
    return metadata


def _alignment(c: _Cursor, metadata: dict) -> int:
    a = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(a, bool) or not isinstance(a, int) or a <= 0 or a & (a - 1) or a > 1 << 30:
        c.fail(f"general.alignment {a!r} is not a power of two")
    return a


def _read_tensor_info(c: _Cursor, i: int) -> tuple[str, int, tuple[int, ...], int]:
    name = c.string(f"the name of tensor {i}")
    n_dims = c.u32(f"the dimension count of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} are allowed)")
    ne = tuple(c.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims))
    ggml_type = c.u32(f"the type of tensor {name!r}")
    offset = c.u64(f"the offset of tensor {name!r}")
    return name, ggml_type, ne, offset


def _tensor_bytes(c: _Cursor, name: str, ggml_type: int, ne: tuple[int, ...]) -> tuple[GGMLQuantizationType, int]:
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        c.fail(f"tensor {name!r} has unknown type {ggml_type}")
    if any(d <= 0 or d >= 1 << 62 for d in ne):
        c.fail(f"tensor {name!r} has an invalid shape {list(ne)}")
    n = 1
    for d in ne:
        n *= d
    if n >= 1 << 62:
        c.fail(f"tensor {name!r} shape {list(ne)} overflows")
    if ne[0] % block:
        c.fail(f"tensor {name!r} row of {ne[0]} is not a multiple of its {qtype.name} block of {block}")
    return qtype, n // block * type_size


def _place_tensors(c: _Cursor, infos: list, data_start: int, alignment: int) -> list[TensorInfo]:
    """Tensors in header order, each at the padded end of the one before (llama.cpp's rule)."""
    out, seen, expected = [], set(), 0
    for name, ggml_type, ne, offset in infos:
        if name in seen:
            c.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        qtype, n_bytes = _tensor_bytes(c, name, ggml_type, ne)
        if offset % alignment:
            c.fail(f"tensor {name!r} offset {offset} is not aligned to {alignment}")
        if offset < expected:
            problem = "out of order" if out and offset < out[-1].offset - data_start else "overlaps the tensor before it"
            c.fail(f"tensor {name!r} data at offset {offset} is {problem} (expected {expected})")
        if offset > expected:
            c.fail(f"tensor {name!r} data at offset {offset} leaves a gap after the tensor before it (expected {expected})")
        end = data_start + offset + n_bytes
        if end > len(c.buf):
            c.fail(f"tensor {name!r} data runs past the end of the file ({end} > {len(c.buf)} bytes; truncated download?)")
        out.append(TensorInfo(name, qtype, ne, data_start + offset, n_bytes))
        expected = -(-(offset + n_bytes) // alignment) * alignment
    return out
