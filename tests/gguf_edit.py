"""Helpers for the hostile-file tests: patch fields of a valid GGUF in place, or rewrite it with
changed metadata or tensors through gguf-py's writer (the format the synth models use)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from hybrid_runtime.synth.writer import copy_metadata


def _string_field(name: str) -> bytes:
    raw = name.encode()
    return struct.pack("<Q", len(raw)) + raw


def key_pos(data: bytes, key: str) -> int:
    """Offset of the u64 length that starts metadata key `key`."""
    pos = data.find(_string_field(key))
    assert pos > 0, key
    return pos


def tensor_info_pos(data: bytes, name: str) -> int:
    """Offset of tensor `name`'s n_dims field (right after its name in the tensor infos)."""
    field = _string_field(name)
    pos = data.rfind(field)  # tensor infos come after the metadata
    assert pos > 0, name
    return pos + len(field)


def tensor_info(data: bytes, name: str) -> tuple[int, list[int], int, int, int]:
    """(n_dims position, ne, type, offset, position of the offset field)."""
    pos = tensor_info_pos(data, name)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    ne = list(struct.unpack_from(f"<{n_dims}Q", data, pos + 4))
    ggml_type, offset = struct.unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
    return pos, ne, ggml_type, offset, pos + 4 + 8 * n_dims + 4


def patched(data: bytes, pos: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into("<" + fmt, out, pos, value)
    return bytes(out)


def rewrite(src: Path, dst: Path, overrides: dict | None = None, drop_keys=(), drop_tensors=(),
            add=None, alignment: int | None = None) -> Path:
    """Copy `src` to `dst` with metadata `overrides` (same types), keys/tensors dropped, and
    `add(writer)` adding keys of any type."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents(), use_temp_file=False)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    copy_metadata(reader, w, overrides)
    for key in drop_keys:
        w.kv_data[0].pop(key)
    if add is not None:
        add(w)
    for t in reader.tensors:
        if t.name not in drop_tensors:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst
