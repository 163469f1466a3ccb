"""Graph plumbing for the ONNX builder: `G`, a small graph-building helper (unique names,
initializers, nodes, If branches' scopes), `ExternalData`, which streams initializers to a
side file as they are made, and the opset the graphs use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

OPSET = 21  # INT4 and the blocked DequantizeLinear (4-bit weights in standard ops)
IR_VERSION = 10
INT4_PACK_ROWS = 256  # rows of int4 codes packed at a time (an even count; G.const_int4)


class ExternalData:
    """Initializers written to one external-data file as the builder makes them, so the graph
    held in memory is names, shapes and offsets, never the weights: the peak of a build is
    the few tensors being converted (a layer's experts at most). Large tensors start on a
    page boundary, which lets onnxruntime map them."""

    ALIGN = 4096

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.offset = 0

    def tensor(self, name: str, raw: Any, data_type: int, dims: tuple[int, ...], nbytes: int | None = None) -> Any:
        """One initializer: `raw` a buffer, or (with `nbytes`, their total) an iterable of
        buffers written one after another, so a tensor never has to exist whole in memory."""
        from onnx import TensorProto

        parts = [raw] if nbytes is None else raw
        length = memoryview(raw).nbytes if nbytes is None else nbytes
        pad = (-self.offset) % self.ALIGN if length >= self.ALIGN else 0
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        t = TensorProto()
        t.name, t.data_type = name, data_type
        t.dims.extend(dims)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        written = 0
        for part in parts:
            data = memoryview(part).cast("B")
            self.file.write(data)
            written += data.nbytes
        if written != length:
            raise ValueError(f"initializer {name}: {written} bytes written, {length} announced")
        self.offset += length
        return t

    def close(self) -> None:
        self.file.close()


def _pack_int4(flat: np.ndarray) -> np.ndarray:
    """int8 codes in [-8, 7] packed two per byte, the low nibble first (an odd count gets a
    zero nibble last: only a tensor's last block can be odd, its blocks being even)."""
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = flat.view(np.uint8) & 0x0F
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


class RowsAsColumns:
    """W.T for a checkpoint tensor W [N, K], as a [K, N] array whose column slices read only
    those rows of W: `quantize_columns` then converts a tied 256 k-token head (2.4 GB of
    fp32) a chunk at a time, without reading it whole."""

    def __init__(self, ckpt: Any, name: str) -> None:
        self.ckpt, self.name = ckpt, name
        n, k = ckpt.shape(name)
        self.shape = (k, n)

    def __getitem__(self, index: tuple[slice, slice]) -> np.ndarray:
        rows, cols = index
        if rows != slice(None) or cols.step not in (None, 1):
            raise IndexError("only [:, lo:hi] column slices")
        lo, hi, _ = cols.indices(self.shape[1])
        return self.ckpt.read(self.name, rows=(lo, max(lo, hi))).T


class G:
    """A tiny graph-building helper: unique names, initializers, nodes. With a `sink`,
    initializers of 1 KiB and more go straight to its external-data file."""

    SINK_MIN_BYTES = 1024

    def __init__(self, sink: ExternalData | None = None) -> None:
        from onnx import helper, numpy_helper

        self.helper, self.numpy_helper = helper, numpy_helper
        self.sink = sink
        self.nodes: list = []
        self.inits: list = []
        self.count = 0
        self.scope = "other"  # breakdown category, the prefix of every node name ("router:l0_...")

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, value: Any, name: str | None = None, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        n = name or self.name("c")
        if self.sink is not None and arr.nbytes >= self.SINK_MIN_BYTES:
            from onnx import helper

            arr = np.ascontiguousarray(arr)
            self.inits.append(self.sink.tensor(n, arr, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape))
        else:
            self.inits.append(self.numpy_helper.from_array(arr, n))
        return n

    def const_rows(self, name: str, rows: Any, shape: tuple[int, ...], dtype: Any, chunk_bytes: int) -> str:
        """A float initializer of `shape` from `rows(lo, hi)` (its rows lo..hi), streamed to the
        sink about `chunk_bytes` at a time (without a sink: read whole)."""
        if self.sink is None:
            return self.const(np.ascontiguousarray(rows(0, shape[0]), dtype=dtype), name)
        from onnx import helper

        n, row = shape[0], int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
        step = max(1, chunk_bytes // max(row, 1))
        parts = (np.ascontiguousarray(rows(lo, min(lo + step, n)), dtype=dtype) for lo in range(0, n, step))
        self.inits.append(self.sink.tensor(name, parts, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape,
                                           nbytes=n * row))
        return name

    def const_int4(self, codes: np.ndarray, name: str) -> str:
        """Signed 4-bit codes (int8 values in [-8, 7]) as an INT4 initializer: two per byte,
        the low nibble first, as ONNX packs them. Packed INT4_PACK_ROWS rows (an even count)
        at a time, so the packing temporaries are a block's (a 256 k-token head's codes are
        590 MB; packed whole, its temporaries took 1.2 GB more)."""
        from onnx import TensorProto

        codes = np.asarray(codes, np.int8)
        flat = codes.reshape(-1)
        per = INT4_PACK_ROWS * (flat.size // codes.shape[0] if codes.ndim and codes.shape[0] else 1)
        parts = (_pack_int4(flat[i:i + per]) for i in range(0, flat.size, per))
        nbytes = (flat.size + 1) // 2
        if self.sink is not None and nbytes >= self.SINK_MIN_BYTES:
            self.inits.append(self.sink.tensor(name, parts, TensorProto.INT4, codes.shape, nbytes=nbytes))
        else:
            t = TensorProto()
            t.name, t.data_type = name, TensorProto.INT4
            t.dims.extend(codes.shape)
            t.raw_data = b"".join(p.tobytes() for p in parts)
            self.inits.append(t)
        return name

    def op(self, op_type: str, inputs: list[str], *, outputs: int = 1, name: str | None = None,
           domain: str | None = None, **attrs: Any) -> Any:
        base = name or op_type.lower()
        outs = [self.name(base) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, outs, name=f"{self.scope}:{self.name(base)}",
                                                domain=domain, **attrs))
        return outs[0] if outputs == 1 else outs
