"""Split a GGUF file into `name-0000K-of-0000N.gguf` parts, in the layout llama.cpp's gguf-split writes:
every part carries split.no / split.count / split.tensors.count, the first part all other metadata."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from hybrid_runtime.synth.writer import copy_metadata


def split_gguf(src: str | Path, n_parts: int, out_dir: str | Path | None = None) -> list[Path]:
    src = Path(src)
    reader = gguf.GGUFReader(src)
    tensors = list(reader.tensors)
    stem = src.name.removesuffix(".gguf")
    out_dir = Path(out_dir or src.parent)
    chunks = [tensors[i::n_parts] for i in range(n_parts)]
    paths = []
    for k, chunk in enumerate(chunks):
        path = out_dir / f"{stem}-{k + 1:05d}-of-{n_parts:05d}.gguf"
        w = gguf.GGUFWriter(path, reader.fields["general.architecture"].contents(), use_temp_file=False)
        if k == 0:
            copy_metadata(reader, w)
        else:
            w.kv_data[0].pop("general.architecture", None)
        w.add_uint16("split.no", k)
        w.add_uint16("split.count", n_parts)
        w.add_int32("split.tensors.count", len(tensors))
        for t in chunk:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # byte shape for quantized data
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(path)
    return paths
