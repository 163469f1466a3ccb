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

from moerun.toolkit import CATEGORIES, Checkpoint

from .graph import IR_VERSION, OPSET, ExternalData, G, RowsAsColumns
from .moe import MoeFormulations
from .quantize import INT4_BLOCK, quantize_columns, quantize_int4_rows, quantize_per_channel

FORMULATIONS = ("grouped", "standard", "contrib")
WEIGHT_BITS = (None, 8, 4)
INT8_WEIGHTS = ("s8", "u8")  # MatMulInteger weight codes (OnnxDecoderBuilder)


def node_category(name: str) -> str:
    """The breakdown category a node name carries ("router:l0_router_topk" -> router);
    ``other`` for names without one (nodes other tools added or renamed)."""
    prefix = name.split(":", 1)[0]
    return prefix if prefix in CATEGORIES else "other"


class OnnxDecoderBuilder(MoeFormulations):
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
        self.g = self.main = G(self.sink)  # `g` is the graph being built (an If branch's, inside one)
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

    def linear(self, x: str, w: np.ndarray, wname: str, tag: str, gr: "G | None" = None,
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
        """The ModelProto: inputs, the positions, the layers, the head (see the module's text)."""
        from onnx import TensorProto, helper

        s, g = self.spec, self.g
        self.two = g.const(np.float32(2.0), "two")
        self.eps = g.const(np.float32(s.rms_norm_eps), "eps")
        self.rope_halves = g.const(np.array([s.head_dim // 2] * 2, np.int64), "rope_halves")
        self.last_axis = g.const(np.array([-1], np.int64), "last_axis")
        hd, nkv = s.head_dim, s.num_kv_heads
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", "T"]),
                  helper.make_tensor_value_info("logits_from", TensorProto.INT64, [1])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "L", s.vocab_size])]
        positions = self._positions()
        g.scope = "embedding"
        x = g.op("Gather", [self.w("model.embed_tokens.weight"), "input_ids"], axis=0)  # [1, T, H]
        scale = g.const(np.float32(1.0 / np.sqrt(hd)))
        for i in range(s.num_layers):
            inputs += [helper.make_tensor_value_info(f"past_key_{i}", TensorProto.FLOAT, ["B", nkv, "P", hd]),
                       helper.make_tensor_value_info(f"past_value_{i}", TensorProto.FLOAT, ["B", nkv, "P", hd])]
            outputs += [helper.make_tensor_value_info(f"present_key_{i}", TensorProto.FLOAT, ["B", nkv, "S", hd]),
                        helper.make_tensor_value_info(f"present_value_{i}", TensorProto.FLOAT, ["B", nkv, "S", hd])]
            x = self._layer(i, x, positions, scale)
        self._head(x)
        graph = helper.make_graph(g.nodes, f"moerun-{s.family}", inputs, outputs, initializer=g.inits)
        opsets = [helper.make_opsetid("", OPSET)]
        if self.formulation == "contrib":
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="moerun")
        model.ir_version = IR_VERSION
        if self.sink is not None:
            self.sink.close()
        return model

    def _positions(self) -> dict[str, str]:
        """Positions P..P+T-1 from the past length, and what attention needs of them: the
        rotary cos / sin rows and the causal mask (plain attention), or the sequence lengths
        and rotary caches (GroupQueryAttention, which rotates and masks inside its kernel)."""
        s, g = self.spec, self.g
        group = s.num_heads // s.num_kv_heads
        g.scope = "attention"
        shape_ids = g.op("Shape", ["input_ids"])
        T = g.op("Gather", [shape_ids, g.const(np.array([1], np.int64))], axis=0)
        past_shape = g.op("Shape", ["past_key_0"])
        P = g.op("Gather", [past_shape, g.const(np.array([2], np.int64))], axis=0)
        P_s = g.op("Squeeze", [P, g.const(np.array([0], np.int64))])
        T_s = g.op("Squeeze", [T, g.const(np.array([0], np.int64))])
        end = g.op("Add", [P_s, T_s])
        one = g.const(np.int64(1))
        out = {"cos": "", "sin": "", "mask": ""}
        if self.attention != "gqa":
            positions = g.op("Range", [P_s, end, one])  # [T]
            cos_t = g.const(self._rope_table(np.cos), "rope_cos")
            sin_t = g.const(self._rope_table(np.sin), "rope_sin")
            out["cos"] = g.op("Gather", [cos_t, positions], axis=0)  # [T, hd]
            out["sin"] = g.op("Gather", [sin_t, positions], axis=0)
            # causal mask [T, P+T]: key j visible to query i iff j <= P + i
            keys_idx = g.op("Range", [g.const(np.int64(0)), end, one])
            q_pos = g.op("Unsqueeze", [positions, g.const(np.array([1], np.int64))])
            k_pos = g.op("Unsqueeze", [keys_idx, g.const(np.array([0], np.int64))])
            masked = g.op("Greater", [k_pos, q_pos])
            mask = g.op("Where", [masked, g.const(np.float32(-1e30)), g.const(np.float32(0.0))])
            # query rows come grouped by head within each KV head (row = g * T + t): tile the mask
            out["mask"] = g.op("Tile", [mask, g.const(np.array([group, 1], np.int64))])
        else:
            batch = g.op("Gather", [shape_ids, g.const(np.array([0], np.int64))], axis=0)  # [1]: B
            out["seqlens_k"] = g.op("Cast", [g.op("Expand", [g.op("Sub", [end, one]), batch])],
                                    to=6)  # int32 [B]: total length - 1, every sequence
            out["total_len"] = g.op("Cast", [end], to=6)
            half = s.head_dim // 2
            self.gqa_cos = g.const(self._rope_table(np.cos)[:, :half].copy(), "gqa_cos_cache")
            self.gqa_sin = g.const(self._rope_table(np.sin)[:, :half].copy(), "gqa_sin_cache")
        return out

    def _layer(self, i: int, x: str, positions: dict[str, str], scale: str) -> str:
        """Decoder layer i on the residual stream `x`: norm, attention, norm, FFN or MoE."""
        s, g = self.spec, self.g
        p = f"model.layers.{i}."
        a = p + "self_attn."
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
            attn = self._gqa(i, q, k, v, positions["seqlens_k"], positions["total_len"])
        else:
            attn = self._plain_attention(i, q, k, v, positions["cos"], positions["sin"], positions["mask"], scale)
        g.scope = "other"
        x = g.op("Add", [x, attn])
        g.scope = "norm"
        h = self.rms(x, self.w(p + "post_attention_layernorm.weight"))
        ffn = self.ffn(i, h)
        g.scope = "other"
        return g.op("Add", [x, ffn])

    def _head(self, x: str) -> None:
        """The final norm and the LM head on positions logits_from.., as the `logits` output."""
        from onnx import helper

        s, g = self.spec, self.g
        g.scope = "norm"
        x = self.rms(x, self.w("model.norm.weight"))
        g.scope = "head"
        x = g.op("Slice", [x, "logits_from", g.const(np.array([2**62], np.int64)), g.const(np.array([1], np.int64))])
        head = "model.embed_tokens.weight" if s.tie_word_embeddings else "lm_head.weight"
        # quantised, the head is converted a column chunk (a row block of the checkpoint's
        # [vocab, hidden]) at a time; in fp32 the MatMul needs it transposed whole
        w = RowsAsColumns(self.ckpt, head) if self.weight_bits else self.ckpt.read(head).T
        logits = self.linear(x, w, head + ".T", "lm_head")
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="head:lm_head_out"))

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

    def _split_experts(self, i: int, h: str, name: Any) -> str:
        """The ladder's split twin (`ModelSpec.split_twin`): every one of its k experts on,
        each weighted 1/k, no router. In standard ops each expert is its own SwiGLU (a
        gate+up and a down MatMul); ``contrib`` keeps the MoE op, fed constant zero logits
        instead of a router (the op's own softmax and top-k over k experts remain)."""
        s, g = self.spec, self.g
        g.scope = "experts"
        if self.formulation == "contrib":
            E = s.num_experts
            first = g.op("Slice", [h, g.const(np.array([0], np.int64)), g.const(np.array([E], np.int64)),
                                   g.const(np.array([-1], np.int64))])
            return self._contrib_moe(i, h, g.op("Mul", [first, g.const(np.float32(0.0))], name=f"l{i}_split_logits"),
                                     name)
        out = None
        for e in range(s.num_experts):
            y = self._dense_swiglu(h, name(e, "gate"), name(e, "up"), name(e, "down"), f"l{i}_expert{e}")
            out = y if out is None else g.op("Add", [out, y])
        return g.op("Mul", [out, g.const(np.float32(1.0 / s.num_experts))], name=f"l{i}_split_scale")

    def _routed_experts(self, i: int, h: str, m: str, name: Any) -> str:
        g = self.g
        g.scope = "router"
        router = self.linear(h, self.ckpt.read(m + "gate.weight").T, m + "gate.weight.T", f"l{i}_router_gate",
                             quantize=False)
        if self.formulation == "contrib":
            g.scope = "experts"  # the MoE op does softmax and top-k itself: routing and experts in one kernel
            return self._contrib_moe(i, h, router, name)
        if self.formulation == "grouped":
            return self._grouped_moe(i, h, router, name)
        return self._standard_moe(i, h, router, name)

    def ffn(self, i: int, h: str) -> str:
        s, g = self.spec, self.g
        if not s.is_moe:
            g.scope = "dense_ffn"
            m = f"model.layers.{i}.mlp."
            return self._dense_swiglu(h, m + "gate_proj.weight", m + "up_proj.weight", m + "down_proj.weight",
                                      f"l{i}_ffn")
        m, name = self._expert_names(i)
        if s.router == "none":
            out = self._split_experts(i, h, name)
        else:
            out = self._routed_experts(i, h, m, name)
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


def build_onnx(ckpt: Checkpoint, **kwargs: Any):
    """The ModelProto for `ckpt` (see the module docstring for the I/O)."""
    return OnnxDecoderBuilder(ckpt, **kwargs).build()
