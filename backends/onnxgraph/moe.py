"""The MoE layer in three ONNX formulations, a part of `OnnxDecoderBuilder` (builder.py):

- ``grouped``: per expert an ``If`` that runs it on the tokens that chose it (standard ops);
- ``standard``: a Gather of the k chosen experts for one token, every expert for several;
- ``contrib``: ONNX Runtime's ``com.microsoft`` MoE / QMoE op.

The module docstring of builder.py says what each costs."""

from __future__ import annotations

from typing import Any

import numpy as np

from .graph import G
from .quantize import INT4_BLOCK, quantize_blockwise, quantize_int4_rows, quantize_per_channel


class MoeFormulations:
    """The MoE layer's routing and formulations; mixed into `OnnxDecoderBuilder`, whose
    `g`, `spec`, `ckpt`, `linear` and settings they use."""

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
    def _routing_matrix(g: "G", probs: str, topv: str, topi: str) -> str:
        """The routing weights as a dense [1, T, E] matrix: top-k weights, zeros elsewhere."""
        return g.op("ScatterElements", [g.op("Mul", [probs, g.const(np.float32(0.0))]), topi, topv], axis=-1)

    def _branch(self, label: str, build: Any) -> Any:
        """An If branch: `build(g)` adds nodes to a fresh graph (outer-scope names stay visible)
        and returns its output name; the graph is returned."""
        saved = self.g
        sub = G(saved.sink)
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

            def matmul(gr: G, x: str, w: np.ndarray, label: str) -> str:
                """x @ w, the expert's weight an initializer of the main graph read from the
                branch (outer scope). As initializers of the branch itself ONNX Runtime kept
                about three copies resident (small-moe's extra expert weights: 300 MB of RSS
                for 94 MB of weights) at no measurable speed gain. Quantised like every other
                weight (`linear`)."""
                return self.linear(x, w, f"l{i}.expert{e}.{label}", f"l{i}_experts_{label.split('.')[0]}", gr=gr)

            def run_expert(gr: G, e=e, gu_np=gu_np, d_np=d_np) -> str:
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

        def weights(gr: G, w: str, scale: str | None, idx: str | None) -> str:
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

        def act(gr: G, y: str) -> str:
            gt, up = gr.op("Split", [y, split], outputs=2, axis=-1)
            return gr.op("Mul", [gr.op("Mul", [gt, gr.op("Sigmoid", [gt])]), up])

        def one_token(g2: G) -> str:
            """Gather only the k selected experts ([k, H, 2I]) and run them batched."""
            idx = g2.op("Reshape", [topi, g2.const(np.array([-1], np.int64))])  # [k]
            x1 = g2.op("Reshape", [h, g2.const(np.array([1, 1, s.hidden_size], np.int64))])  # [1, 1, H]
            gu = g2.op("MatMul", [x1, weights(g2, w_gu, s_gu, idx)], name=f"l{i}_experts_gate_up")  # [k, 1, 2I]
            y = g2.op("MatMul", [act(g2, gu), weights(g2, w_d, s_d, idx)], name=f"l{i}_experts_down")  # [k,1,H]
            wts = g2.op("Reshape", [topv, g2.const(np.array([-1, 1, 1], np.int64))])
            return g2.op("Reshape", [g2.op("ReduceSum", [g2.op("Mul", [y, wts]), g2.const(np.array([0], np.int64))],
                                           keepdims=0), g2.const(np.array([1, 1, s.hidden_size], np.int64))])

        x2 = g.op("Reshape", [h, g.const(np.array([-1, s.hidden_size], np.int64))])  # [N, H]: every token

        def many_tokens(g3: G) -> str:
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
