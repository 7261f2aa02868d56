"""The weight table of the compiled CPU step: every matrix as (byte offset, kind, shape, strides)
from one base address over the arrays the weights live in, built once at load.

No weight is copied, except tensors of the 32-block types Q4_0 / Q5_0 / IQ4_NL, which are
re-expressed exactly as Q8_0 blocks (their values are fp16 d times small integers, and their
vec_dot type is Q8_0 in llama.cpp too, so the integer products are the same), and the norm
vectors, gathered into one small float32 array.

Matrices the loader stored as panels (quant/gemm.StoredPanels, replacing their raw blocks) are
registered with `stored`: kind P_Q4_K / P_Q6_K / P_Q8_0, the row stride then the bytes of a panel
of 16 rows.

Layout of the int64 tables (rows are indexed by the ids the layer table holds):
    mats [n_mat, 7]  byte offset from the space's base | kind | rows | cols | row stride | expert stride | act blocks
    vecs [n_vec, 2]  offset into the float32 vector arena | length
    layers [n_layer, N_FIELDS]  matrix / vector ids per role (-1: absent), see the F_* names
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize

from hybrid_runtime.errors import UnsupportedModelError
from hybrid_runtime.quant.kernels import CPU_KERNELS, K_Q8_0
from hybrid_runtime.quant.panels import P_Q4_K, P_Q6_K, P_Q8_0  # noqa: F401  (the kinds of stored panels)

K_F32 = 6  # float32 weights, float32 activations (the router; F32 files)
_REPACK_Q8_0 = (QT.Q4_0, QT.Q5_0, QT.IQ4_NL)

# layer table fields
(F_MOE, F_ATTN_NORM, F_Q_A, F_Q_A_NORM, F_Q_B, F_KV_A, F_KV_A_NORM, F_K_B, F_V_B, F_O, F_FFN_NORM,
 F_ROUTER, F_BIAS, F_GATE_X, F_UP_X, F_DOWN_X, F_GATE, F_UP, F_DOWN) = range(19)
N_FIELDS = 19

# mats columns
M_OFF, M_KIND, M_ROWS, M_COLS, M_RSTRIDE, M_ESTRIDE, M_NB = range(7)


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _extent(a: np.ndarray) -> int:
    """Bytes from the first element to the end of the last (strides in bytes)."""
    return a.itemsize + sum((n - 1) * s for n, s in zip(a.shape, a.strides)) if a.size else 0


def q8_0_from_32_blocks(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """Q4_0 / Q5_0 / IQ4_NL blocks [..., row_bytes] -> the same values as Q8_0 blocks (exact)."""
    values = dequantize(np.ascontiguousarray(raw), qtype).astype(np.float32)  # [..., cols]
    n_blocks = values.shape[-1] // 32
    blocks = raw.reshape(*raw.shape[:-1], n_blocks, -1)
    d16 = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # every such block starts with fp16 d
    v = values.reshape(*values.shape[:-1], n_blocks, 32)
    d = d16.astype(np.float32)[..., None]
    q = np.where(d != 0, np.rint(v / np.where(d != 0, d, 1)), 0)
    if np.any(np.abs(q) > 127) or not np.array_equal(q * d, v):
        raise UnsupportedModelError(f"{qtype.name} blocks are not representable as Q8_0")
    out = np.empty((*raw.shape[:-1], n_blocks, 34), np.uint8)
    out[..., 0:2] = d16[..., None].view(np.uint8)
    out[..., 2:] = q.astype(np.int8).view(np.uint8)
    return out.reshape(*raw.shape[:-1], n_blocks * 34)


class _Span:
    """A read-only byte array over [base, base + n) of this process's address space."""

    def __init__(self, base: int, n: int):
        self.__array_interface__ = {"data": (base, True), "shape": (n,), "typestr": "|u1", "version": 3}


class WeightTable:
    """Builds the tables. Every matrix is addressed by its byte offset from one base address:
    `space` is a byte array spanning all the memory the weights live in (the file maps, repacked
    copies, expert stores), so the compiled code needs one array whatever the number of parts.
    Nothing outside the registered arrays is ever read."""

    def __init__(self, n_layer: int):
        self._arrays: list[np.ndarray] = []  # kept alive: the space points into them
        self._mats: list[list[int]] = []
        self._vec_chunks: list[np.ndarray] = []
        self._vec_rows: list[tuple[int, int]] = []
        self._vec_len = 0
        self.layers = np.full((n_layer, N_FIELDS), -1, np.int64)

    # -- entries --------------------------------------------------------------------------------
    def matrix(self, data: np.ndarray, qtype: QT) -> int:
        """Register raw blocks [R, RB] or [E, R, RB] (or float32 [R, C] / [E, R, C]); -> matrix id."""
        if qtype in _REPACK_Q8_0:
            data = q8_0_from_32_blocks(data, qtype)
            qtype = QT.Q8_0
        if qtype == QT.F32:
            kind, cols, n_act_blocks = K_F32, data.shape[-1], 0
            if data.strides[-1] != 4:
                raise UnsupportedModelError("float rows must be contiguous")
        elif qtype in CPU_KERNELS:
            spec = CPU_KERNELS[qtype]
            kind = spec.kind
            cols = data.shape[-1] // spec.block_bytes * spec.block_values
            n_act_blocks = cols // 32 if kind == K_Q8_0 else cols // 256
            if data.strides[-1] != 1:
                raise UnsupportedModelError("quantized rows must be contiguous")
        else:
            raise UnsupportedModelError(f"the compiled CPU step has no kernel for {qtype.name}")
        self._arrays.append(data)
        e_stride = data.strides[0] if data.ndim == 3 else 0
        self._mats.append([_addr(data), kind, data.shape[-2], cols, data.strides[-2], e_stride, n_act_blocks])
        return len(self._mats) - 1

    def stored(self, sp) -> int:
        """Register stored panels (quant/gemm.StoredPanels): kind = their format, the row stride
        field = the bytes of one panel of 16 rows, act blocks = records of 256 values; -> matrix id."""
        self._arrays.append(sp.data)
        e_stride = sp.estride if sp.n_expert > 1 else 0
        self._mats.append([_addr(sp.data), sp.fmt, sp.rows, sp.cols, sp.pstride, e_stride, sp.nb])
        return len(self._mats) - 1

    def head_panels(self, data: np.ndarray, qtype: QT) -> int:
        """Per-head matrices [H, R, row_bytes] (MLA's attn_k_b / attn_v_b) as stored panels, their
        rows zero-padded to whole 256-value records (attn_k_b's 128 columns are half a record: the
        padding blocks have d = 0, so they add exactly nothing); the raw matrix where the type or
        the rows do not allow panels. A copy: the raw blocks stay for the torch prefill path
        (medium-12L: 2.2 MB a layer; Kimi K2: 9 MB of ~10 GB a layer)."""
        from hybrid_runtime.quant import gemm

        if qtype in _REPACK_Q8_0:
            data, qtype = q8_0_from_32_blocks(data, qtype), QT.Q8_0
        if data.ndim == 3 and qtype == QT.Q8_0 and data.shape[-1] % 272:
            pad = np.zeros((*data.shape[:-1], -data.shape[-1] % 272), np.uint8)  # d = 0, q = 0
            data = np.concatenate([data, pad], axis=-1)
        if data.ndim != 3 or not gemm.stored_supported(qtype, data.shape):
            return self.matrix(data, qtype)
        return self.stored(gemm.build_stored(data, qtype))

    def vector(self, values: np.ndarray) -> int:
        v = np.asarray(values, np.float32).reshape(-1)
        self._vec_chunks.append(v)
        self._vec_rows.append((self._vec_len, v.size))
        self._vec_len += v.size
        return len(self._vec_rows) - 1

    def vector_of(self, gf, name: str) -> int:
        """The vector `name` of the file, dequantized to float32; -> vector id."""
        from hybrid_runtime.quant.registry import get_format

        ref = gf.tensor(name)
        return self.vector(get_format(ref.ggml_type).dequantize(ref.data))

    def set(self, layer: int, field: int, value: int) -> None:
        self.layers[layer, field] = value

    # -- results --------------------------------------------------------------------------------
    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(space, mats): the byte span over every registered array, offsets relative to it."""
        lo = min(_addr(a) for a in self._arrays)
        hi = max(_addr(a) + _extent(a) for a in self._arrays)
        space = np.asarray(_Span(lo, hi - lo))
        space.flags.writeable = False
        mats = np.array(self._mats, np.int64).reshape(-1, 7)
        mats[:, M_OFF] -= lo
        return space, mats

    @property
    def vecs(self) -> np.ndarray:
        return np.array(self._vec_rows, np.int64).reshape(-1, 2)

    @property
    def vec_arena(self) -> np.ndarray:
        return np.concatenate(self._vec_chunks) if self._vec_chunks else np.zeros(1, np.float32)

    def rows_of(self, mat: int) -> int:
        return self._mats[mat][M_ROWS]
