"""The reference model: one readable file for dense and MoE decoders, explicit KV cache.

Families differ only in data (q/k/v bias, q/k norm, shared expert, top-k renormalisation),
read from the ModelSpec. MoE decode touches only the selected experts (weight views, no
copies); MoE prefill groups tokens by expert (index_select / index_add_), never computing
all experts densely. `moe_all_experts` is the naive dense reference the tests hold it to.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from moerun.toolkit import Checkpoint, ModelSpec
from moerun.toolkit import release_free


# ---------------------------------------------------------------- building blocks
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as Hugging Face does. In float32 that is
    exactly torch's fused `F.rms_norm` (bit-identical, measured: 6.9 against 9.1 us a call at
    decode, 13 calls a token on small-moe); other dtypes keep HF's rounding to the dtype
    before the weight (bit-identical to the written-out form, checked in the tests)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    # the same rounding (normalised in float32, cast, times the weight), in 4 ops instead of 7
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def rope_tables(spec: ModelSpec, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [length, head_dim] in float32 (HF's rotate-half convention), computed in float64
    on the CPU (Apple's MPS has no float64) and moved to `device`."""
    half = spec.head_dim // 2
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, half, dtype=torch.float64) / half))
    t = torch.arange(length, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim]; cos/sin broadcast against it ([T, 1, head_dim] for [B, T, heads, hd])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class StepCut(Exception):
    """Raised at the armed cut point: the step ends there (cut timing)."""


class Cuts:
    """Cut timing's counter: every region entry and exit is a cut point, numbered in order
    within a step. `arm(k)` makes point k end the step (after a device synchronize, so
    queued GPU work is inside the time); `labels`, while recording, collects each point's
    category: the stretch ending at a region's exit is that region's, the stretch ending at
    an entry (residual adds, Python between regions) is ``other``."""

    __slots__ = ("n", "cut", "labels", "sync")

    def __init__(self, sync: Callable[[], None]) -> None:
        self.n, self.cut, self.labels, self.sync = 0, -1, None, sync

    def arm(self, cut: int = -1, *, record: bool = False) -> None:
        self.n, self.cut = 0, cut
        self.labels = [] if record else None

    def mark(self, category: str) -> None:
        if self.labels is not None:
            self.labels.append(category)
        n = self.n
        self.n = n + 1
        if n == self.cut:
            self.sync()
            raise StepCut


class _CutRegion:
    __slots__ = ("cuts", "category")

    def __init__(self, cuts: Cuts, category: str) -> None:
        self.cuts, self.category = cuts, category

    def __enter__(self) -> None:
        self.cuts.mark("other")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.cuts.mark(self.category)
        return False


class Linear:
    """y = x @ W^T (+ b). On CPU the weight is pre-packed once into oneDNN's blocked layout
    (what torch's inductor does when it freezes weights): measured here, plain `F.linear`
    reached about half the memory bandwidth in decode and half the FLOP rate in prefill
    (examples/benchmarks/bench_torch.py). Falls back to `F.linear` wherever packing is
    unavailable (other devices, dtypes or torch builds)."""

    __slots__ = ("weight", "bias", "packed", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True) -> None:
        self.bias, self.out_features = bias, weight.shape[0]
        self.packed = _pack(weight) if pack else None
        self.weight = None if self.packed is not None else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        probe = torch.ones(1, weight.shape[1], dtype=weight.dtype)
        out = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        if out.shape != (1, weight.shape[0]):
            return None
        return packed
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def swiglu(x: torch.Tensor, gate_up: Linear, down: Linear) -> torch.Tensor:
    """SwiGLU FFN with gate and up fused into one [2*inter, hidden] matrix."""
    gate, up = gate_up(x).chunk(2, dim=-1)
    return down(F.silu(gate) * up)


@dataclass
class Layer:
    input_norm: torch.Tensor
    qkv: Linear  # [q_dim + 2*kv_dim, hidden] with the q/k/v biases
    o: Linear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    # dense FFN
    gate_up: Linear | None = None  # [2I, H]
    down: Linear | None = None  # [H, I]
    # MoE: one Linear per expert, so a token touches only its experts' weights
    router: Linear | None = None  # [E, H]
    experts_gate_up: list[Linear] | None = None
    experts_down: list[Linear] | None = None
    shared_gate_up: Linear | None = None
    shared_down: Linear | None = None
    shared_gate: Linear | None = None  # [1, H]


def _moe_names(spec: ModelSpec, i: int) -> tuple[str, Callable[[int], tuple[str, str, str]]]:
    if spec.family == "mixtral":
        p = f"model.layers.{i}.block_sparse_moe."
        return p, lambda e: (f"{p}experts.{e}.w1.weight", f"{p}experts.{e}.w3.weight", f"{p}experts.{e}.w2.weight")
    p = f"model.layers.{i}.mlp."
    return p, lambda e: (f"{p}experts.{e}.gate_proj.weight", f"{p}experts.{e}.up_proj.weight",
                         f"{p}experts.{e}.down_proj.weight")


def load_weights(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, *, pack: bool = True
                 ) -> tuple[torch.Tensor, list[Layer], torch.Tensor, Linear]:
    """Read a HF-layout checkpoint into fused, packed tensors, one tensor at a time."""
    spec = ckpt.spec

    def t(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ckpt.read(name))).to(device=device, dtype=dtype)

    def lin(*names: str, bias: tuple[str, ...] = ()) -> Linear:
        w = t(names[0]) if len(names) == 1 else torch.cat([t(n) for n in names])
        b = torch.cat([t(n) for n in bias]) if bias else None
        return Linear(w, b, pack=pack)

    embed = t("model.embed_tokens.weight")
    layers = []
    for i in range(spec.num_layers):
        a = f"model.layers.{i}.self_attn."
        qkv = [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"]
        qkv_bias = (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias") if spec.attention_bias else ()
        has_qk = spec.qk_norm != "none"
        layer = Layer(
            input_norm=t(f"model.layers.{i}.input_layernorm.weight"),
            qkv=lin(*qkv, bias=qkv_bias), o=lin(a + "o_proj.weight"),
            q_norm=t(a + "q_norm.weight") if has_qk else None,
            k_norm=t(a + "k_norm.weight") if has_qk else None,
            post_norm=t(f"model.layers.{i}.post_attention_layernorm.weight"),
        )
        if not spec.is_moe:
            m = f"model.layers.{i}.mlp."
            layer.gate_up = lin(m + "gate_proj.weight", m + "up_proj.weight")
            layer.down = lin(m + "down_proj.weight")
        else:
            prefix, names = _moe_names(spec, i)
            layer.router = lin(prefix + "gate.weight") if spec.router != "none" else None
            layer.experts_gate_up, layer.experts_down = [], []
            for e in range(spec.num_experts):
                g, u, d = names(e)
                layer.experts_gate_up.append(lin(g, u))
                layer.experts_down.append(lin(d))
            if spec.shared_expert_intermediate_size:
                s = prefix + "shared_expert."
                layer.shared_gate_up = lin(s + "gate_proj.weight", s + "up_proj.weight")
                layer.shared_down = lin(s + "down_proj.weight")
                layer.shared_gate = lin(prefix + "shared_expert_gate.weight")
        layers.append(layer)
        # each tensor is staged through float32 numpy and an unpacked torch copy; glibc keeps
        # the freed staging buffers between the packed weights it placed after them, so
        # without a trim per layer the load peaked at 1.37x the loaded weights (OLMoE-1B-7B
        # bf16: 18.5 GB for 13.5)
        release_free()
    norm = t("model.norm.weight")
    head = Linear(embed, pack=pack) if spec.tie_word_embeddings else lin("lm_head.weight")
    return embed, layers, norm, head


# ---------------------------------------------------------------- MoE
def route(spec: ModelSpec, x: torch.Tensor, router: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (float32), top-k, optional renormalisation.
    Returns (weights [T, k] in x's dtype, expert ids [T, k])."""
    probs = F.softmax(router(x).float(), dim=-1)
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.renormalize_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(x.dtype), ids


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query per sequence against its cache, the math in float32 (the cache stays in its
    dtype; the cast copies are cheaper than bf16 matmuls on strided cache slices): q [B,
    heads, 1, hd], keys/values [B, kv_heads, S, hd] shared by groups of heads. Returns
    [B, heads, 1, hd] in q's dtype."""
    B, heads, _, hd = q.shape
    kv = keys.shape[1]
    scores = torch.matmul(q.reshape(B, kv, heads // kv, hd).float(), keys.float().transpose(-1, -2))
    probs = torch.softmax(scores * hd**-0.5, dim=-1)
    return torch.matmul(probs, values.float()).view(B, heads, 1, hd).to(q.dtype)


def moe_decode(layer: Layer, x: torch.Tensor, weights: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """One token: only the selected experts' weights are read (no gather copy)."""
    out = None
    for j, e in enumerate(ids):
        y = swiglu(x, layer.experts_gate_up[e], layer.experts_down[e]) * weights[:, j : j + 1]
        out = y if out is None else out + y
    return out


def moe_prefill(layer: Layer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                counts: list[int]) -> torch.Tensor:
    """Many tokens: tokens grouped by expert, each expert run once on its tokens (one
    gather into expert order, contiguous slices per expert, one weighted scatter back:
    measured 2.59-2.71 against 2.71-2.99 ms for a gather and a scatter per expert, on a
    small-moe block of 128 tokens in fp32)."""
    order = torch.argsort(ids.flatten(), stable=True)
    token_of = order // ids.shape[1]
    xs = x.index_select(0, token_of)  # the token rows in expert order: one gather
    ys = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(counts):
        if c:
            ys[start : start + c] = swiglu(xs[start : start + c], layer.experts_gate_up[e], layer.experts_down[e])
            start += c
    ys.mul_(weights.flatten()[order].unsqueeze(1))
    return torch.zeros_like(x).index_add_(0, token_of, ys)  # one scatter back


def moe_all_experts(spec: ModelSpec, layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """Naive reference: every expert on every token, combined with the routing weights."""
    weights, ids = route(spec, x, layer.router)
    dense = torch.zeros(x.shape[0], spec.num_experts, dtype=x.dtype, device=x.device)
    dense.scatter_(1, ids, weights)
    out = torch.zeros_like(x)
    for e in range(spec.num_experts):
        out = out + swiglu(x, layer.experts_gate_up[e], layer.experts_down[e]) * dense[:, e : e + 1]
    return out + shared_expert(layer, x)


def shared_expert(layer: Layer, x: torch.Tensor) -> torch.Tensor | float:
    if layer.shared_gate_up is None:
        return 0.0
    gate = torch.sigmoid(layer.shared_gate(x))
    return swiglu(x, layer.shared_gate_up, layer.shared_down) * gate


# ---------------------------------------------------------------- the model
class Model:
    """Decoder with an explicit KV cache: `forward(ids, pos)` appends at `pos`."""

    def __init__(self, spec: ModelSpec, ckpt: Checkpoint, *, dtype: torch.dtype, device: torch.device,
                 max_context: int, pack: bool = True, batch: int = 1) -> None:
        self.spec, self.dtype, self.device = spec, dtype, torch.device(device)
        self.embed, self.layers, self.norm, self.head = load_weights(ckpt, dtype, self.device, pack=pack)
        self.linear_kernel = "onednn-packed" if self.head.packed is not None else "aten-linear"
        self.max_context, self.batch = max_context, batch
        # torch's CPU flash-attention kernel is slow for one bf16/fp16 query: measured 65 against
        # 39 us (small-moe's heads, 160 cached keys) and 1462 against 343 us (OLMoE's, 1024
        # keys) for decode_attention's float32 matmuls; bf16 matmuls on the strided cache
        # slices took 70 and 873 us. In fp32 SDPA is the faster one (9.7 against 16.8 us).
        self.matmul_decode_attention = self.device.type == "cpu" and dtype != torch.float32
        self.cos, self.sin = rope_tables(spec, max_context, self.device)
        shape = (batch, spec.num_kv_heads, max_context, spec.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.layers]
        self.expert_counts = np.zeros((spec.num_layers, max(spec.num_experts, 1)), dtype=np.int64)
        self.instrument: Cuts | str | None = None  # the breakdown's (see region())
        self.route_log: list[list[np.ndarray]] | None = None  # per layer, the ids chosen (observe_routing)

    _NO_LABEL = contextlib.nullcontext()

    def region(self, category: str):
        """One breakdown category's stretch of the step: free unless an instrument is set
        (`self.instrument`: a `Cuts` counter, or "profiler" for torch.profiler labels)."""
        inst = self.instrument
        if inst is None:
            return self._NO_LABEL
        if inst == "profiler":
            return torch.profiler.record_function(f"moerun::{category}")
        return _CutRegion(inst, category)

    # attention --------------------------------------------------------------
    def attention(self, i: int, x: torch.Tensor, pos: int, use_cache: bool = True, B: int = 1) -> torch.Tensor:
        """x: [B*T, H], B sequences of T tokens each (sequence-major), all at positions pos.."""
        spec, layer = self.spec, self.layers[i]
        T = x.shape[0] // B
        heads, kv_heads, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        qkv = layer.qkv(x)
        if spec.qk_norm == "none":  # q and k side by side in qkv: one rotation for both
            qk = qkv[:, : spec.q_dim + spec.kv_dim].view(B, T, heads + kv_heads, hd)
        else:
            q, k = qkv[:, : spec.q_dim], qkv[:, spec.q_dim : spec.q_dim + spec.kv_dim]
            if spec.qk_norm == "full":
                q = rms_norm(q, layer.q_norm, spec.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, spec.rms_norm_eps)
            q, k = q.reshape(B, T, heads, hd), k.reshape(B, T, kv_heads, hd)
            if spec.qk_norm == "head":
                q = rms_norm(q, layer.q_norm, spec.rms_norm_eps)
                k = rms_norm(k, layer.k_norm, spec.rms_norm_eps)
            qk = torch.cat([q, k], dim=2)
        qk = apply_rope(qk, self.cos[pos : pos + T, None], self.sin[pos : pos + T, None])
        q = qk[:, :, :heads].transpose(1, 2)  # [B, heads, T, hd]
        k = qk[:, :, heads:].transpose(1, 2)
        v = qkv[:, spec.q_dim + spec.kv_dim :].view(B, T, kv_heads, hd).transpose(1, 2)
        if use_cache:
            self.k_cache[i][:B, :, pos : pos + T] = k
            self.v_cache[i][:B, :, pos : pos + T] = v
            keys, values = self.k_cache[i][:B, :, : pos + T], self.v_cache[i][:B, :, : pos + T]
        else:
            keys, values = k, v
        if T == 1 and self.matmul_decode_attention:
            o = decode_attention(q, keys, values)
            return layer.o(o.reshape(B, spec.q_dim))
        if T == 1:
            mask, causal = None, False
        elif keys.shape[2] == T:
            mask, causal = None, True
        else:  # a chunk after cached positions: query i sees keys <= pos + i
            j = torch.arange(keys.shape[2], device=x.device)
            mask = j[None, :] <= (pos + torch.arange(T, device=x.device))[:, None]
            causal = False
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal,
                                           enable_gqa=spec.num_kv_heads != spec.num_heads)
        o = o.transpose(1, 2).reshape(B * T, spec.q_dim)
        return layer.o(o)

    # FFN --------------------------------------------------------------------
    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        layer = self.layers[i]
        if self.spec.router == "none":  # the split twin: every expert on, each weighted 1/k, no router
            with self.region("experts"):
                k = self.spec.top_k
                self._count(i, slice(None), x.shape[0])
                if self.route_log is not None:
                    self._log(i, torch.arange(k).expand(x.shape[0], k))
                out = moe_decode(layer, x, torch.full((x.shape[0], k), 1.0 / k, dtype=x.dtype, device=x.device),
                                 list(range(k)))
            if layer.shared_gate_up is None:
                return out
            with self.region("shared_expert"):
                return out + shared_expert(layer, x)
        if layer.router is None:
            with self.region("dense_ffn"):
                return swiglu(x, layer.gate_up, layer.down)
        with self.region("router"):
            weights, ids = route(self.spec, x, layer.router)
            chosen = ids[0].tolist() if x.shape[0] == 1 else None
            counts = None if chosen else torch.bincount(ids.flatten(), minlength=self.spec.num_experts).tolist()
            if self.route_log is not None:
                self._log(i, ids)
        with self.region("experts"):
            if chosen:
                self._count(i, chosen, 1)
                out = moe_decode(layer, x, weights, chosen)
            else:
                self._count(i, slice(None), counts)
                out = moe_prefill(layer, x, weights, ids, counts)
        if layer.shared_gate_up is None:
            return out
        with self.region("shared_expert"):
            return out + shared_expert(layer, x)

    @torch.compiler.disable
    def _count(self, layer: int, experts: list[int] | slice, n: int | list[int]) -> None:
        """Routing histogram, kept in numpy outside any compiled graph."""
        self.expert_counts[layer, experts] += n

    @torch.compiler.disable
    def _log(self, layer: int, ids: torch.Tensor) -> None:
        self.route_log[layer].append(ids.cpu().numpy().astype(np.int64))

    # whole model ------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, pos: int, *, all_logits: bool, use_cache: bool = True) -> torch.Tensor:
        """Logits for `ids` placed at positions pos.., float32 [T or 1, vocab]. `ids` [B, T]
        runs B sequences together (each its own cache row): logits [B*T or B, vocab]. Every
        layer but attention sees the B*T tokens as one flat batch, so an MoE layer groups
        all sequences' tokens by expert: a step reads the union of their experts once."""
        spec, region = self.spec, self.region
        B = ids.shape[0] if ids.dim() == 2 else 1
        if B > self.batch:
            raise ValueError(f"{B} sequences, the cache holds {self.batch}")
        with region("embedding"):
            x = self.embed[ids.reshape(-1)]
        for i in range(spec.num_layers):
            with region("norm"):
                h = rms_norm(x, self.layers[i].input_norm, spec.rms_norm_eps)
            with region("attention"):
                x = x + self.attention(i, h, pos, use_cache, B)
            with region("norm"):
                h = rms_norm(x, self.layers[i].post_norm, spec.rms_norm_eps)
            x = x + self.ffn(i, h)
        if not all_logits:
            x = x.view(B, -1, x.shape[-1])[:, -1]  # each sequence's last position
        with region("norm"):
            x = rms_norm(x, self.norm, spec.rms_norm_eps)
        with region("head"):
            return self.head(x).float()

    def reset(self) -> None:
        # Positions restart at 0; stale cache entries are overwritten before being read.
        self.expert_counts[:] = 0
