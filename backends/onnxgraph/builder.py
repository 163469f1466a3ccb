"""Build an ONNX decoder graph from a moerun checkpoint, with the KV cache as inputs and
outputs: one graph serves prefill (T tokens) and decode (T = 1) at any past length.

Engine-neutral: only `onnx` is imported; ONNX Runtime and TensorRT consume the same file.
Opset 21 (IR 10), plain ops (RMSNorm as Pow/ReduceMean/Add/Sqrt/Div/Mul, the form ONNX Runtime
fuses). Weights are quantised while the graph is written (``weight_bits``: int8 per channel
through MatMulInteger, int4 in blocks of 32 through the blocked DequantizeLinear), and with
``external_data`` every initializer streams to that file as it is made: a build holds a few
tensors, never the model. Two MoE formulations:

- ``grouped`` (the onnxruntime backend's): ops every runtime has. Per expert an ``If`` runs
  the expert only when some token chose it, on those tokens (Gather, NonZero) and on the
  expert's own weight initializers, and places the weighted result (ScatterND); a Sum
  combines the experts. Bytes read per token = the k chosen experts, no weight copies;
  prefill FLOPs = the routed tokens' only.
- ``standard`` (TensorRT's; kept for comparison): An ``If`` on the token count picks, for one token,
  a Gather of only the k selected experts' weights and a batched MatMul over them (bytes
  read = k experts); for several tokens, every expert on every token combined with the
  sparse routing weights (ONNX has no grouped GEMM; E/k times the expert FLOPs).
- ``contrib``: ONNX Runtime's ``com.microsoft`` MoE op (softmax, top-k, optional
  renormalisation and the experts in one kernel; fused interleaved SwiGLU layout), or QMoE
  with 8- or 4-bit block-quantised experts.

Graph I/O: ``input_ids`` int64 [B, T] (B sequences of T tokens, all at positions P..P+T-1);
``logits_from`` int64 [1] (logits are produced for positions logits_from..T-1: T-1 for a
prefill that needs only the last, 0 for all); ``past_key_i`` / ``past_value_i`` float
[B, kv_heads, P, head_dim]; outputs ``logits`` [B, T - logits_from, vocab] and
``present_key_i`` / ``present_value_i`` [B, kv, P+T, hd]. Every layer but attention sees
the B*T tokens as one set: an MoE layer runs the union of the experts the batch chose.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moerun.toolkit import Checkpoint
from moerun.toolkit import CATEGORIES


def node_category(name: str) -> str:
    """The breakdown category a node name carries ("router:l0_router_topk" -> router);
    ``other`` for names without one (nodes other tools added or renamed)."""
    prefix = name.split(":", 1)[0]
    return prefix if prefix in CATEGORIES else "other"

OPSET = 21  # INT4 and the blocked DequantizeLinear (4-bit weights in standard ops)
IR_VERSION = 10
FORMULATIONS = ("grouped", "standard", "contrib")
WEIGHT_BITS = (None, 8, 4)
INT8_WEIGHTS = ("s8", "u8")  # MatMulInteger weight codes (OnnxDecoderBuilder)
INT4_BLOCK = 32


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


class _RowsAsColumns:
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


class _G:
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


class OnnxDecoderBuilder:
    def __init__(self, ckpt: Checkpoint, *, formulation: str = "standard", expert_bits: int | None = None,
                 block_size: int = 32, weight_bits: int | None = None, attention: str = "plain",
                 external_data: Path | None = None, int8_weights: str = "s8") -> None:
        """`weight_bits` 8 or 4 quantises every weight MatMul but the routers' as the graph is
        written (8: per-channel symmetric int8 through DynamicQuantizeLinear + MatMulInteger;
        4: blocked int4 through DequantizeLinear, which onnxruntime fuses into MatMulNBits);
        the experts too, except under the contrib formulation, whose QMoE takes
        `expert_bits`. `external_data`: stream every initializer of 1 KiB and more into that
        file while building. `int8_weights`: the MatMulInteger weights as ``s8`` codes or as
        ``u8`` (the same codes + 128, zero point 128) for CPUs whose u8 x s8 kernel saturates
        (backends/onnxruntime/int8.py); the integers multiplied are the same."""
        if int8_weights not in INT8_WEIGHTS:
            raise ValueError(f"int8_weights must be one of {INT8_WEIGHTS}, got {int8_weights!r}")
        self.int8_weights = int8_weights
        if formulation not in FORMULATIONS:
            raise ValueError(f"MoE formulation must be one of {FORMULATIONS}, got {formulation!r}")
        if expert_bits is not None and formulation != "contrib":
            raise ValueError("quantised experts need the contrib (QMoE) formulation")
        if weight_bits not in WEIGHT_BITS:
            raise ValueError(f"weight_bits must be one of {WEIGHT_BITS}, got {weight_bits!r}")
        self.ckpt, self.spec = ckpt, ckpt.spec
        self.formulation, self.expert_bits, self.block_size = formulation, expert_bits, block_size
        self.weight_bits = weight_bits
        if attention not in ("plain", "gqa"):
            raise ValueError(f"attention must be 'plain' or 'gqa', got {attention!r}")
        if attention == "gqa" and formulation != "contrib":
            raise ValueError("GroupQueryAttention is an ONNX Runtime contrib op: use it with the contrib formulation")
        self.attention = attention
        self.sink = ExternalData(external_data) if external_data is not None else None
        self.g = self.main = _G(self.sink)  # `g` is the graph being built (an If branch's, inside one)
        self.node_categories: dict[str, str] = {}

    # ------------------------------------------------------------------ pieces
    STREAM_CHUNK_BYTES = 64 << 20  # a streamed fp32 weight is read and written this much at a time

    def w(self, name: str, transpose: bool = False) -> str:
        shape = self.ckpt.shape(name)
        if not transpose and len(shape) == 2:  # read in parts when streaming (a 2.4 GB embedding)
            return self.g.const_rows(name, lambda lo, hi: self.ckpt.read(name, rows=(lo, hi)), shape, np.float32,
                                     self.STREAM_CHUNK_BYTES)
        x = self.ckpt.read(name)
        return self.g.const(np.ascontiguousarray(x.T if transpose else x), name=name + (".T" if transpose else ""))

    def linear(self, x: str, w: np.ndarray, wname: str, tag: str, gr: "_G | None" = None,
               quantize: bool = True) -> str:
        """x @ w for a checkpoint weight already laid out [K, N], in the graph's weight
        precision. The initializers always go to the main graph (`self.main`, streamed): as
        initializers of an If branch onnxruntime kept about three copies resident. The nodes
        go to `gr` (an If branch) or the graph being built. fp32: MatMul. int8: the codes stay
        int8 and MatMulInteger reads them (x quantised per call by DynamicQuantizeLinear),
        one scale per output channel after: the pattern quantize_dynamic emits, which
        onnxruntime fuses. int4: codes [K, N] with a scale per 32 rows of K, dequantised by
        the blocked DequantizeLinear (opset 21) into the MatMul: onnxruntime fuses the pair
        into MatMulNBits. `quantize=False` keeps fp32 (the routers)."""
        gr = gr or self.g
        bits = self.weight_bits if quantize else None
        # int4 in an If branch: onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits
        # only when the codes are an initializer of the branch itself (the fusion fails on an
        # outer-scope one at session creation), so they stay there
        g = gr if bits == 4 else self.main
        if bits is None:
            return gr.op("MatMul", [x, g.const(np.ascontiguousarray(w, dtype=np.float32), wname)], name=tag)
        if bits == 8:
            q, sc = quantize_columns(w, quantize_per_channel)
            xq, xs, xz = gr.op("DynamicQuantizeLinear", [x], outputs=3)
            if self.int8_weights == "u8":  # code + 128 in place (two's complement: flip the top bit)
                u = q.view(np.uint8)
                u ^= 0x80
                zero = g.const(np.array(128, np.uint8), wname + ".zp")
                acc = gr.op("MatMulInteger", [xq, g.const(u, wname + ".q"), xz, zero], name=tag)
            else:
                acc = gr.op("MatMulInteger", [xq, g.const(q, wname + ".q"), xz], name=tag)
            scale = gr.op("Mul", [xs, g.const(sc.reshape(-1), wname + ".s")])
            return gr.op("Mul", [gr.op("Cast", [acc], to=1), scale])
        codes, scales = quantize_columns(w, lambda c: quantize_int4_rows(c, INT4_BLOCK))
        deq = gr.op("DequantizeLinear", [g.const_int4(codes, wname + ".q4"), g.const(scales, wname + ".s4")],
                    axis=0, block_size=INT4_BLOCK)
        return gr.op("MatMul", [x, deq], name=tag)

    def rms(self, x: str, weight: str) -> str:
        g = self.g
        sq = g.op("Pow", [x, self.two])
        mean = g.op("ReduceMean", [sq, self.last_axis], keepdims=1)
        std = g.op("Sqrt", [g.op("Add", [mean, self.eps])])
        return g.op("Mul", [g.op("Div", [x, std]), weight])

    def _rope(self, x: str, cos: str, sin: str) -> str:
        g = self.g
        x1, x2 = g.op("Split", [x, self.rope_halves], outputs=2, axis=-1)
        rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])

    # ------------------------------------------------------------------ graph
    def build(self):
        from onnx import TensorProto, helper

        s, g = self.spec, self.g
        self.two = g.const(np.float32(2.0), "two")
        self.eps = g.const(np.float32(s.rms_norm_eps), "eps")
        self.rope_halves = g.const(np.array([s.head_dim // 2] * 2, np.int64), "rope_halves")
        self.last_axis = g.const(np.array([-1], np.int64), "last_axis")
        hd, nh, nkv = s.head_dim, s.num_heads, s.num_kv_heads
        group = nh // nkv

        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
                  helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "L", s.vocab_size])]

        # positions P..P+T-1 from the past length
        g.scope = "attention"
        shape_ids = g.op("Shape", ["input_ids"])
        T = g.op("Gather", [shape_ids, g.const(np.array([1], np.int64))], axis=0)
        past_shape = g.op("Shape", ["past_key_0"])
        P = g.op("Gather", [past_shape, g.const(np.array([2], np.int64))], axis=0)
        P_s = g.op("Squeeze", [P, g.const(np.array([0], np.int64))])
        T_s = g.op("Squeeze", [T, g.const(np.array([0], np.int64))])
        end = g.op("Add", [P_s, T_s])
        one = g.const(np.int64(1))
        cos = sin = mask = ""
        if self.attention != "gqa":  # GroupQueryAttention rotates and masks inside its kernel
            positions = g.op("Range", [P_s, end, one])  # [T]
            cos_t = g.const(self._rope_table(np.cos), "rope_cos")
            sin_t = g.const(self._rope_table(np.sin), "rope_sin")
            cos = g.op("Gather", [cos_t, positions], axis=0)  # [T, hd]
            sin = g.op("Gather", [sin_t, positions], axis=0)
            # causal mask [T, P+T]: key j visible to query i iff j <= P + i
            keys_idx = g.op("Range", [g.const(np.int64(0)), end, one])
            q_pos = g.op("Unsqueeze", [positions, g.const(np.array([1], np.int64))])
            k_pos = g.op("Unsqueeze", [keys_idx, g.const(np.array([0], np.int64))])
            masked = g.op("Greater", [k_pos, q_pos])
            mask = g.op("Where", [masked, g.const(np.float32(-1e30)), g.const(np.float32(0.0))])
            # query rows come grouped by head within each KV head (row = g * T + t): tile the mask
            mask = g.op("Tile", [mask, g.const(np.array([group, 1], np.int64))])

        if self.attention == "gqa":
            batch = g.op("Gather", [shape_ids, g.const(np.array([0], np.int64))], axis=0)  # [1]: B
            seqlens_k = g.op("Cast", [g.op("Expand", [g.op("Sub", [end, one]), batch])],
                             to=6)  # int32 [B]: total length - 1, every sequence
            total_len = g.op("Cast", [end], to=6)
            half = s.head_dim // 2
            self.gqa_cos = g.const(self._rope_table(np.cos)[:, :half].copy(), "gqa_cos_cache")
            self.gqa_sin = g.const(self._rope_table(np.sin)[:, :half].copy(), "gqa_sin_cache")
        g.scope = "embedding"
        x = g.op("Gather", [self.w("model.embed_tokens.weight"), "input_ids"], axis=0)  # [1, T, H]
        scale = g.const(np.float32(1.0 / np.sqrt(hd)))
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            inputs += [helper.make_tensor_value_info(f"past_key_{i}", TensorProto.FLOAT, ["B", nkv, "P", hd]),
                       helper.make_tensor_value_info(f"past_value_{i}", TensorProto.FLOAT, ["B", nkv, "P", hd])]
            outputs += [helper.make_tensor_value_info(f"present_key_{i}", TensorProto.FLOAT, ["B", nkv, "S", hd]),
                        helper.make_tensor_value_info(f"present_value_{i}", TensorProto.FLOAT, ["B", nkv, "S", hd])]
            g.scope = "norm"
            h = self.rms(x, self.w(p + "input_layernorm.weight"))
            g.scope = "attention"
            wqkv = np.concatenate([self.ckpt.read(a + f"{n}_proj.weight") for n in "qkv"]).T
            qkv = self.linear(h, wqkv, a + "qkv.T", f"l{i}_attn_qkv")
            del wqkv
            if s.attention_bias:
                b = np.concatenate([self.ckpt.read(a + f"{n}_proj.bias") for n in "qkv"])
                qkv = g.op("Add", [qkv, g.const(b, a + "qkv.bias")])
            q, k, v = g.op("Split", [qkv, g.const(np.array([s.q_dim, s.kv_dim, s.kv_dim], np.int64))],
                           outputs=3, axis=-1)
            if s.qk_norm == "full":
                q = self.rms(q, self.w(a + "q_norm.weight"))
                k = self.rms(k, self.w(a + "k_norm.weight"))
            if self.attention == "gqa":
                attn = self._gqa(i, q, k, v, seqlens_k, total_len)
            else:
                attn = self._plain_attention(i, q, k, v, cos, sin, mask, scale)
            g.scope = "other"
            x = g.op("Add", [x, attn])
            g.scope = "norm"
            h = self.rms(x, self.w(p + "post_attention_layernorm.weight"))
            ffn = self.ffn(i, h)
            g.scope = "other"
            x = g.op("Add", [x, ffn])
        g.scope = "norm"
        x = self.rms(x, self.w("model.norm.weight"))
        g.scope = "head"
        x = g.op("Slice", [x, "logits_from", g.const(np.array([2**62], np.int64)), g.const(np.array([1], np.int64))])
        head = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
        # quantised, the head is converted a column chunk (a row block of the checkpoint's
        # [vocab, hidden]) at a time; in fp32 the MatMul needs it transposed whole
        w = _RowsAsColumns(self.ckpt, head) if self.weight_bits else self.ckpt.read(head).T
        logits = self.linear(x, w, head + ".T", "lm_head")
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="head:lm_head_out"))
        graph = helper.make_graph(g.nodes, f"moerun-{s.family}", inputs, outputs, initializer=g.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.formulation == "contrib":
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="moerun")
        model.ir_version = IR_VERSION
        if self.sink is not None:
            self.sink.close()
        return model

    def _plain_attention(self, i: int, q: str, k: str, v: str, cos: str, sin: str, mask: str, scale: str) -> str:
        """Attention from plain ops; K/V concatenated onto the past, GQA by reshaping q."""
        from onnx import helper

        s, g, a = self.spec, self.g, f"model.layers.{i}.self_attn."
        hd, nh, nkv = s.head_dim, s.num_heads, s.num_kv_heads
        q = g.op("Transpose", [g.op("Reshape", [q, g.const(np.array([0, -1, nh, hd], np.int64))])],
                 perm=[0, 2, 1, 3])
        k = g.op("Transpose", [g.op("Reshape", [k, g.const(np.array([0, -1, nkv, hd], np.int64))])],
                 perm=[0, 2, 1, 3])
        v = g.op("Transpose", [g.op("Reshape", [v, g.const(np.array([0, -1, nkv, hd], np.int64))])],
                 perm=[0, 2, 1, 3])
        if s.qk_norm == "head":
            q = self.rms(q, self.w(a + "q_norm.weight"))
            k = self.rms(k, self.w(a + "k_norm.weight"))
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        keys = g.op("Concat", [f"past_key_{i}", k], axis=2)
        vals = g.op("Concat", [f"past_value_{i}", v], axis=2)
        g.nodes.append(helper.make_node("Identity", [keys], [f"present_key_{i}"], name=f"attention:l{i}_present_key"))
        g.nodes.append(helper.make_node("Identity", [vals], [f"present_value_{i}"], name=f"attention:l{i}_present_value"))
        # grouped-query attention without copying K/V: q [1, kv, group*T, hd]
        qg = g.op("Reshape", [q, g.const(np.array([0, nkv, -1, hd], np.int64))])
        scores = g.op("Mul", [g.op("MatMul", [qg, g.op("Transpose", [keys], perm=[0, 1, 3, 2])],
                                   name=f"l{i}_attn_scores"), scale])
        scores = g.op("Add", [scores, mask])
        probs = g.op("Softmax", [scores], axis=-1, name=f"l{i}_attn_softmax")
        ctx = g.op("MatMul", [probs, vals], name=f"l{i}_attn_context")  # [1, kv, group*T, hd]
        ctx = g.op("Reshape", [ctx, g.const(np.array([0, nh, -1, hd], np.int64))])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]),
                               g.const(np.array([0, -1, s.q_dim], np.int64))])
        return self.linear(ctx, self.ckpt.read(a + "o_proj.weight").T, a + "o_proj.weight.T", f"l{i}_attn_out")

    def _gqa(self, i: int, q: str, k: str, v: str, seqlens_k: str, total_len: str) -> str:
        """Attention as ONNX Runtime's GroupQueryAttention: rotary, per-head q/k norm, the
        causal mask and the KV concatenation in one kernel."""
        from onnx import helper

        s, g, a = self.spec, self.g, f"model.layers.{i}.self_attn."
        if s.qk_norm == "head":
            # the op's own per-head norm inputs exist on CUDA/WebGPU only: normalise here, per head
            def per_head(t: str, heads: int, weight: str) -> str:
                t4 = g.op("Reshape", [t, g.const(np.array([0, -1, heads, s.head_dim], np.int64))])
                return g.op("Reshape", [self.rms(t4, self.w(weight)), g.const(np.array([0, -1, heads * s.head_dim],
                                                                                       np.int64))])
            q, k = per_head(q, s.num_heads, a + "q_norm.weight"), per_head(k, s.num_kv_heads, a + "k_norm.weight")
        inputs = [q, k, v, f"past_key_{i}", f"past_value_{i}", seqlens_k, total_len, self.gqa_cos, self.gqa_sin]
        attrs = dict(num_heads=s.num_heads, kv_num_heads=s.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                     scale=float(1.0 / np.sqrt(s.head_dim)))
        out = g.name("gqa_out")
        g.nodes.append(helper.make_node("GroupQueryAttention", inputs, [out, f"present_key_{i}", f"present_value_{i}"],
                                        name=f"attention:l{i}_attn_gqa", domain="com.microsoft", **attrs))
        return self.linear(out, self.ckpt.read(a + "o_proj.weight").T, a + "o_proj.weight.T", f"l{i}_attn_out")

    def _rope_table(self, fn) -> np.ndarray:
        s = self.spec
        half = s.head_dim // 2
        inv = 1.0 / (s.rope_theta ** (np.arange(half, dtype=np.float64) / half))
        ang = np.outer(np.arange(s.max_position_embeddings, dtype=np.float64), inv)
        return fn(np.concatenate([ang, ang], -1)).astype(np.float32)

    # ------------------------------------------------------------------ FFN / MoE
    def _expert_names(self, i: int) -> tuple[str, Any]:
        s = self.spec
        if s.family == "mixtral":
            m = f"model.layers.{i}.block_sparse_moe."
            return m, lambda e, kind: f"{m}experts.{e}.{ {'gate': 'w1', 'up': 'w3', 'down': 'w2'}[kind]}.weight"
        m = f"model.layers.{i}.mlp."
        return m, lambda e, kind: f"{m}experts.{e}.{kind}_proj.weight"

    def _dense_swiglu(self, x: str, gate: str, up: str, down: str, tag: str) -> str:
        g, r = self.g, self.ckpt.read
        gu = np.concatenate([r(gate), r(up)]).T
        inter = gu.shape[1] // 2
        y = self.linear(x, gu, gate + "+up.T", f"{tag}_gate_up")
        del gu
        gt, upv = g.op("Split", [y, g.const(np.array([inter, inter], np.int64))], outputs=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gt, g.op("Sigmoid", [gt])]), upv])
        return self.linear(act, r(down).T, down + ".T", f"{tag}_down")

    def ffn(self, i: int, h: str) -> str:
        s, g = self.spec, self.g
        if not s.is_moe:
            g.scope = "dense_ffn"
            m = f"model.layers.{i}.mlp."
            return self._dense_swiglu(h, m + "gate_proj.weight", m + "up_proj.weight", m + "down_proj.weight",
                                      f"l{i}_ffn")
        m, name = self._expert_names(i)
        g.scope = "router"
        router = self.linear(h, self.ckpt.read(m + "gate.weight").T, m + "gate.weight.T", f"l{i}_router_gate",
                             quantize=False)
        if self.formulation == "contrib":
            g.scope = "experts"  # the MoE op does softmax and top-k itself: routing and experts in one kernel
            out = self._contrib_moe(i, h, router, name)
        elif self.formulation == "grouped":
            out = self._grouped_moe(i, h, router, name)
        else:
            out = self._standard_moe(i, h, router, name)
        if s.shared_expert_intermediate_size:
            g.scope = "shared_expert"
            sh = m + "shared_expert."
            shared = self._dense_swiglu(h, sh + "gate_proj.weight", sh + "up_proj.weight", sh + "down_proj.weight",
                                        f"l{i}_shared")
            gate = g.op("Sigmoid", [self.linear(h, self.ckpt.read(m + "shared_expert_gate.weight").T,
                                                m + "shared_expert_gate.weight.T", f"l{i}_shared_gate",
                                                quantize=False)])
            out = g.op("Add", [out, g.op("Mul", [shared, gate])])
        return out

    def _stack(self, name, kind: str, transpose: bool) -> np.ndarray:
        s = self.spec
        mats = [self.ckpt.read(name(e, kind)) for e in range(s.num_experts)]
        return np.stack([m.T if transpose else m for m in mats])

    def _routing(self, i: int, router: str) -> tuple[str, str, str]:
        """Softmax over the experts, top-k, optional renormalisation: (probs, topv, topi)."""
        s, g = self.spec, self.g
        probs = g.op("Softmax", [router], axis=-1, name=f"l{i}_router_softmax")
        topv, topi = g.op("TopK", [probs, g.const(np.array([s.top_k], np.int64))], outputs=2, axis=-1,
                          name=f"l{i}_router_topk")
        if s.renormalize_topk:
            topv = g.op("Div", [topv, g.op("ReduceSum", [topv, g.const(np.array([-1], np.int64))], keepdims=1)])
        return probs, topv, topi

    @staticmethod
    def _routing_matrix(g: "_G", probs: str, topv: str, topi: str) -> str:
        """The routing weights as a dense [1, T, E] matrix: top-k weights, zeros elsewhere."""
        return g.op("ScatterElements", [g.op("Mul", [probs, g.const(np.float32(0.0))]), topi, topv], axis=-1)

    def _branch(self, label: str, build: Any) -> Any:
        """An If branch: `build(g)` adds nodes to a fresh graph (outer-scope names stay visible)
        and returns its output name; the graph is returned."""
        saved = self.g
        sub = _G(saved.sink)
        sub.scope, sub.count = saved.scope, saved.count + 1
        sub.helper, sub.numpy_helper = saved.helper, saved.numpy_helper
        self.g = sub
        try:
            out = build(sub)
        finally:
            self.g = saved
        saved.count = sub.count + 1
        return saved.helper.make_graph(sub.nodes, label, [], [saved.helper.make_tensor_value_info(out, 1, None)],
                                       initializer=sub.inits)

    def _grouped_moe(self, i: int, h: str, router: str, name) -> str:
        """Tokens grouped by expert, in standard ops: for each expert an ``If`` that runs only
        when some token chose it, gathers those tokens, runs the expert's SwiGLU on its own
        weight initializers (no copy of the weights) and scatter-adds the weighted result.
        One token touches exactly its k experts' weights; a prompt runs each used expert once
        over its own tokens (the expert FLOPs of the routed tokens, no more)."""
        s, g = self.spec, self.g
        E, H, I = s.num_experts, s.hidden_size, s.intermediate_size
        probs, topv, topi = self._routing(i, router)
        g.scope = "experts"
        dense = g.op("Reshape", [self._routing_matrix(g, probs, topv, topi), g.const(np.array([-1, E], np.int64))],
                     name=f"l{i}_experts_weights")  # [T, E]
        hits = g.op("Greater", [g.op("ReduceMax", [dense, g.const(np.array([0], np.int64))], keepdims=0),
                                g.const(np.float32(0.0))],
                    name=f"l{i}_experts_used")  # [E]
        # one condition per expert, [1] each, from a single Split (E Gathers cost ~1 us apiece)
        conds = (g.op("Split", [hits], outputs=E, axis=0, num_outputs=E, name=f"l{i}_experts_conditions")
                 if E > 1 else [hits])
        x2 = g.op("Reshape", [h, g.const(np.array([-1, H], np.int64))])  # [T, H]
        zeros = g.op("Mul", [x2, g.const(np.float32(0.0))])  # [T, H]
        parts = []
        for e in range(E):
            gate_t, up_t, down_t = (self.ckpt.read(name(e, k)).T for k in ("gate", "up", "down"))
            gu_np, d_np = np.concatenate([gate_t, up_t], axis=1), down_t  # [H, 2I], [I, H]

            def matmul(gr: _G, x: str, w: np.ndarray, label: str) -> str:
                """x @ w, the expert's weight an initializer of the main graph read from the
                branch (outer scope). As initializers of the branch itself ONNX Runtime kept
                about three copies resident (small-moe's extra expert weights: 300 MB of RSS
                for 94 MB of weights) at no measurable speed gain. Quantised like every other
                weight (`linear`)."""
                return self.linear(x, w, f"l{i}.expert{e}.{label}", f"l{i}_experts_{label.split('.')[0]}", gr=gr)

            def run_expert(gr: _G, e=e, gu_np=gu_np, d_np=d_np) -> str:
                # constants local to the branch: every outer-scope name is an implicit input of
                # the If, passed on each execution, taken or not
                index, flat = gr.const(np.array(e, np.int64)), gr.const(np.array([-1], np.int64))
                split, col_axis = gr.const(np.array([I, I], np.int64)), gr.const(np.array([1], np.int64))
                col = gr.op("Gather", [dense, index], axis=1)  # [T]: this expert's weight per token
                tok = gr.op("Reshape", [gr.op("NonZero", [col]), flat], name=f"l{i}_expert{e}_tokens")  # [n]
                xe = gr.op("Gather", [x2, tok], axis=0)  # [n, H]
                gu = matmul(gr, xe, gu_np, "gate_up.T")
                gt, up = gr.op("Split", [gu, split], outputs=2, axis=-1)
                act = gr.op("Mul", [gr.op("Mul", [gt, gr.op("Sigmoid", [gt])]), up])
                y = matmul(gr, act, d_np, "down.T")  # [n, H]
                we = gr.op("Unsqueeze", [gr.op("Gather", [col, tok], axis=0), col_axis])  # [n, 1]
                return gr.op("ScatterND", [zeros, gr.op("Unsqueeze", [tok, col_axis]), gr.op("Mul", [y, we])],
                             name=f"l{i}_experts_place")

            then_graph = self._branch(f"l{i}_expert{e}_run", run_expert)
            else_graph = self._branch(f"l{i}_expert{e}_skip",  # no node: an all-zero row, broadcast by Sum
                                      lambda gr, e=e: gr.const(np.zeros((1, H), np.float32), f"l{i}_expert{e}_none"))
            parts.append(g.op("If", [conds[e]], then_branch=then_graph, else_branch=else_graph,
                              name=f"l{i}_expert{e}"))
        acc = g.op("Sum", parts, name=f"l{i}_experts_combine")
        return g.op("Reshape", [acc, g.op("Shape", [h])])  # [B, T, H]

    def _standard_moe(self, i: int, h: str, router: str, name) -> str:
        s, g = self.spec, self.g
        I = s.intermediate_size
        probs, topv, topi = self._routing(i, router)
        g.scope = "experts"
        gu_np = np.concatenate([self._stack(name, "gate", True), self._stack(name, "up", True)], axis=2)  # [E,H,2I]
        d_np = self._stack(name, "down", True)  # [E, I, H]
        int4 = self.weight_bits == 4
        if self.weight_bits == 8:  # int8 codes + one scale per (expert, output channel)
            (gu_q, gu_s), (d_q, d_s) = quantize_per_channel(gu_np), quantize_per_channel(d_np)
            w_gu, s_gu = g.const(gu_q, f"l{i}.experts.gate_up.T.q"), g.const(gu_s, f"l{i}.experts.gate_up.T.s")
            w_d, s_d = g.const(d_q, f"l{i}.experts.down.T.q"), g.const(d_s, f"l{i}.experts.down.T.s")
        elif int4:  # int4 codes, a scale per 32 rows of K: dequantised whole (Gather has no 4-bit kernel)
            (gu_q, gu_s), (d_q, d_s) = (quantize_int4_rows(w, INT4_BLOCK, axis=1) for w in (gu_np, d_np))
            w_gu, s_gu = g.const_int4(gu_q, f"l{i}.experts.gate_up.T.q4"), g.const(gu_s, f"l{i}.experts.gate_up.T.s4")
            w_d, s_d = g.const_int4(d_q, f"l{i}.experts.down.T.q4"), g.const(d_s, f"l{i}.experts.down.T.s4")
        else:
            w_gu = g.const(np.ascontiguousarray(gu_np), f"l{i}.experts.gate_up.T")
            w_d = g.const(np.ascontiguousarray(d_np), f"l{i}.experts.down.T")
            s_gu = s_d = None
        del gu_np, d_np
        split = g.const(np.array([I, I], np.int64))

        def weights(gr: _G, w: str, scale: str | None, idx: str | None) -> str:
            """Expert weights, gathered for `idx` (or all), dequantised when quantised."""
            if int4:
                w = gr.op("DequantizeLinear", [w, scale], axis=1, block_size=INT4_BLOCK, name=f"l{i}_experts_dequant")
                return gr.op("Gather", [w, idx], axis=0, name=f"l{i}_experts_gather") if idx is not None else w
            if idx is not None:
                w = gr.op("Gather", [w, idx], axis=0, name=f"l{i}_experts_gather")
            if scale is None:
                return w
            sc = gr.op("Gather", [scale, idx], axis=0) if idx is not None else scale
            return gr.op("Mul", [gr.op("Cast", [w], to=1), sc], name=f"l{i}_experts_dequant")

        def act(gr: _G, y: str) -> str:
            gt, up = gr.op("Split", [y, split], outputs=2, axis=-1)
            return gr.op("Mul", [gr.op("Mul", [gt, gr.op("Sigmoid", [gt])]), up])

        def one_token(g2: _G) -> str:
            """Gather only the k selected experts ([k, H, 2I]) and run them batched."""
            idx = g2.op("Reshape", [topi, g2.const(np.array([-1], np.int64))])  # [k]
            x1 = g2.op("Reshape", [h, g2.const(np.array([1, 1, s.hidden_size], np.int64))])  # [1, 1, H]
            gu = g2.op("MatMul", [x1, weights(g2, w_gu, s_gu, idx)], name=f"l{i}_experts_gate_up")  # [k, 1, 2I]
            y = g2.op("MatMul", [act(g2, gu), weights(g2, w_d, s_d, idx)], name=f"l{i}_experts_down")  # [k,1,H]
            wts = g2.op("Reshape", [topv, g2.const(np.array([-1, 1, 1], np.int64))])
            return g2.op("Reshape", [g2.op("ReduceSum", [g2.op("Mul", [y, wts]), g2.const(np.array([0], np.int64))],
                                           keepdims=0), g2.const(np.array([1, 1, s.hidden_size], np.int64))])

        x2 = g.op("Reshape", [h, g.const(np.array([-1, s.hidden_size], np.int64))])  # [N, H]: every token

        def many_tokens(g3: _G) -> str:
            """Every expert on every token, weighted by the sparse routing matrix."""
            xt = g3.op("Unsqueeze", [x2, g3.const(np.array([0], np.int64))])  # [1, N, H]
            gu = g3.op("MatMul", [xt, weights(g3, w_gu, s_gu, None)], name=f"l{i}_experts_all_gate_up")  # [E,N,2I]
            y = g3.op("MatMul", [act(g3, gu), weights(g3, w_d, s_d, None)], name=f"l{i}_experts_all_down")  # [E,N,H]
            dense = g3.op("Transpose", [g3.op("Reshape", [self._routing_matrix(g3, probs, topv, topi),
                                                          g3.const(np.array([-1, s.num_experts], np.int64))])],
                          perm=[1, 0])  # [E, N]
            weighted = g3.op("Mul", [y, g3.op("Unsqueeze", [dense, g3.const(np.array([2], np.int64))])])
            return g3.op("ReduceSum", [weighted, g3.const(np.array([0], np.int64))], keepdims=1)  # [1, N, H]

        then_graph = self._branch(f"l{i}_moe_one_token", one_token)
        else_graph = self._branch(f"l{i}_moe_many_tokens", many_tokens)
        N = g.op("Gather", [g.op("Shape", [x2]), g.const(np.array([0], np.int64))], axis=0)
        is_one = g.op("Equal", [N, g.const(np.array([1], np.int64))])
        is_one = g.op("Squeeze", [is_one, g.const(np.array([0], np.int64))])
        out = g.op("If", [is_one], then_branch=then_graph, else_branch=else_graph, name=f"l{i}_moe_experts")
        return g.op("Reshape", [out, g.op("Shape", [h])])  # [B, T, H]

    def _contrib_moe(self, i: int, h: str, router: str, name) -> str:
        s, g = self.spec, self.g
        E, I, H = s.num_experts, s.intermediate_size, s.hidden_size
        gate, up, down = (self._stack(name, k, False) for k in ("gate", "up", "down"))  # [E,I,H],[E,I,H],[E,H,I]
        fc1 = np.empty((E, 2 * I, H), np.float32)
        fc1[:, 0::2], fc1[:, 1::2] = gate, up  # interleaved rows: gate_0, up_0, gate_1, ...
        x2 = g.op("Reshape", [h, g.const(np.array([-1, H], np.int64))])
        r2 = g.op("Reshape", [router, g.const(np.array([-1, E], np.int64))])
        attrs = dict(k=s.top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                     activation_beta=0.0, normalize_routing_weights=int(s.renormalize_topk))
        if self.expert_bits is None:
            out = g.op("MoE", [x2, r2, g.const(fc1, f"l{i}.moe.fc1"), "", g.const(down, f"l{i}.moe.fc2")],
                       domain="com.microsoft", name=f"l{i}_experts_moe", **attrs)
        else:
            q1, s1 = quantize_blockwise(fc1, self.expert_bits, self.block_size)
            q2, s2 = quantize_blockwise(down, self.expert_bits, self.block_size)
            out = g.op("QMoE", [x2, r2, g.const(q1, f"l{i}.qmoe.fc1"), g.const(s1, f"l{i}.qmoe.fc1_scales"), "",
                                g.const(q2, f"l{i}.qmoe.fc2"), g.const(s2, f"l{i}.qmoe.fc2_scales")],
                       domain="com.microsoft", name=f"l{i}_experts_qmoe", expert_weight_bits=self.expert_bits,
                       block_size=self.block_size, **attrs)
        return g.op("Reshape", [out, g.op("Shape", [h])])  # [B, T, H]


def quantize_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel for weights laid out [..., K, N] ([E, K, N] stacked
    experts, [K, N] one weight): codes int8 of w's shape, scales float [..., 1, N]."""
    scale = np.abs(w).max(axis=-2, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


COLUMN_CHUNK = 4096  # columns quantised at a time (quantize_columns)
INT4_PACK_ROWS = 256  # rows of int4 codes packed at a time (an even count; _G.const_int4)


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


def build_onnx(ckpt: Checkpoint, **kwargs: Any):
    """The ModelProto for `ckpt` (see the module docstring for the I/O)."""
    return OnnxDecoderBuilder(ckpt, **kwargs).build()
