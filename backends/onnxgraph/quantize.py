"""Weight quantisation for the ONNX builder, done while the graph is written: int8 per
output channel (MatMulInteger), int4 in blocks along K (opset 21's blocked DequantizeLinear),
QMoE's block layout; column chunks keep a large matrix's temporaries small."""

from __future__ import annotations

from typing import Any

import numpy as np

INT4_BLOCK = 32  # entries of K that share one int4 scale


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel for weights laid out [..., K, N] ([E, K, N] stacked
    experts, [K, N] one weight): codes int8 of w's shape, scales float [..., 1, N]."""
    scale = np.abs(w).max(axis=-2, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


COLUMN_CHUNK = 4096  # columns quantised at a time (quantize_columns)


def quantize_columns(w: np.ndarray, quantize: Any, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`quantize` (codes [K, n], scales [..., n]) applied to `chunk` columns of w [K, N] at a
    time: the scales of both layouts are per output column, so chunks are exact, and the
    temporaries are a chunk's, not the matrix's (a 256 k-token head is 2.4 GB of fp32)."""
    K, N = w.shape
    chunk = chunk or COLUMN_CHUNK
    codes, scales = np.empty((K, N), np.int8), None
    for n0 in range(0, N, chunk):
        c, sc = quantize(np.asarray(w[:, n0:n0 + chunk], dtype=np.float32))
        codes[:, n0:n0 + chunk] = c
        if scales is None:
            scales = np.empty((*sc.shape[:-1], N), np.float32)
        scales[..., n0:n0 + chunk] = sc
    return codes, scales


def quantize_int4_rows(w: np.ndarray, block: int, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric signed 4-bit codes (int8 values in [-8, 7]) with one float scale per `block`
    consecutive entries along `axis` (K of a [K, N] or [E, K, N] weight): the layout of
    opset 21's blocked DequantizeLinear, whose scale has ceil(K / block) entries along that
    axis (a last, shorter block where K is no multiple of it)."""
    K = w.shape[axis]
    n = -(-K // block)
    if n * block != K:  # pad K with zeros to whole blocks; the codes are cut back to K
        pad = [(0, 0)] * w.ndim
        pad[axis] = (0, n * block - K)
        w = np.pad(w, pad)
    shape = list(w.shape)
    shape[axis: axis + 1] = [n, block]
    blocks = w.reshape(shape)
    scale = np.abs(blocks).max(axis=axis + 1, keepdims=True) / 7.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(blocks / scale), -8, 7).astype(np.int8).reshape(w.shape)
    codes = np.take(codes, np.arange(K), axis=axis)
    return codes, np.squeeze(scale, axis=axis + 1).astype(np.float32)


def quantize_blockwise(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantisation along K (the last axis) as QMoE reads it: uint8 codes with
    the default zero point 2^(bits-1), two 4-bit codes per byte (low nibble = even K), float
    scales [E, N, K/block]."""
    E, N, K = w.shape
    if K % block:
        raise ValueError(f"QMoE needs K ({K}) divisible by block_size ({block})")
    levels = 2 ** (bits - 1)
    blocks = w.reshape(E, N, K // block, block)
    scale = np.abs(blocks).max(-1) / (levels - 1)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(blocks / scale[..., None]), -levels, levels - 1).astype(np.int32) + levels
    q = q.reshape(E, N, K).astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return q, scale.astype(np.float32)
