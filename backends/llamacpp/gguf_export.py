"""Write a moerun (Hugging Face layout) checkpoint as a GGUF file llama.cpp loads.

Mirrors what llama.cpp's convert_hf_to_gguf.py does for the families moerun supports:

- ``llama`` and ``mixtral`` -> GGUF arch ``llama``; llama.cpp rotates adjacent pairs
  (ROPE_TYPE_NORM) where HF rotates halves, so the q and k rows are permuted per head;
- ``qwen2`` -> ``qwen2``, ``qwen2_moe`` -> ``qwen2moe``, ``olmoe`` -> ``olmoe``,
  ``qwen3_moe`` -> ``qwen3moe``: rotate-half (ROPE_TYPE_NEOX), no permutation;
- experts are stacked into ``ffn_{gate,up,down}_exps`` [experts, out, in];
- no tokenizer: ``tokenizer.ggml.model = "none"`` plus ``{arch}.vocab_size`` makes
  llama.cpp add dummy tokens; benchmarks feed token ids.

Tensors are written one at a time (peak memory: one stacked expert tensor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moerun.toolkit import Checkpoint, ModelSpec
from moerun.toolkit import to_bf16_bits

# family -> (GGUF arch, llama.cpp renormalises the top-k weights, needs q/k permutation)
ARCH = {
    "llama": ("llama", None, True),
    "mixtral": ("llama", True, True),
    "qwen2": ("qwen2", None, False),
    "qwen2_moe": ("qwen2moe", False, False),
    "olmoe": ("olmoe", False, False),
    "qwen3_moe": ("qwen3moe", True, False),
}

BASE_TYPES = ("f32", "f16", "bf16")


def unsupported_reason(spec: ModelSpec) -> str | None:
    """Why llama.cpp cannot reproduce this spec exactly, or None."""
    if spec.family not in ARCH:
        return f"llama.cpp export has no mapping for family {spec.family!r}"
    if spec.family == "olmoe" and not (spec.q_dim == spec.kv_dim == spec.hidden_size):
        return ("llama.cpp's olmoe graph sizes the q/k norms by the hidden size: it needs "
                "num_heads x head_dim == num_kv_heads x head_dim == hidden_size")
    _, renorm, _ = ARCH[spec.family]
    if renorm is not None and renorm != spec.renormalize_topk:
        return (f"llama.cpp's {ARCH[spec.family][0]} graph {'always' if renorm else 'never'} renormalises the "
                f"top-k routing weights; this model has norm_topk_prob={spec.norm_topk_prob}")
    return None


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp adjacent-pair order, per head (rows of q/k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensors(ckpt: Checkpoint) -> Iterator[tuple[str, callable]]:
    """(GGUF name, loader) in file order; loaders return float32 arrays."""
    spec = ckpt.spec
    arch, _, permute = ARCH[spec.family]
    r = ckpt.read
    yield "token_embd.weight", lambda: r("model.embed_tokens.weight")
    for i in range(spec.num_layers):
        hf, g = f"model.layers.{i}.", f"blk.{i}."
        a = hf + "self_attn."
        yield g + "attn_norm.weight", lambda a=hf: r(a + "input_layernorm.weight")
        if permute:
            yield g + "attn_q.weight", lambda a=a: permute_rope(r(a + "q_proj.weight"), spec.num_heads)
            yield g + "attn_k.weight", lambda a=a: permute_rope(r(a + "k_proj.weight"), spec.num_kv_heads)
        else:
            yield g + "attn_q.weight", lambda a=a: r(a + "q_proj.weight")
            yield g + "attn_k.weight", lambda a=a: r(a + "k_proj.weight")
        yield g + "attn_v.weight", lambda a=a: r(a + "v_proj.weight")
        if spec.attention_bias:
            yield g + "attn_q.bias", lambda a=a: r(a + "q_proj.bias")
            yield g + "attn_k.bias", lambda a=a: r(a + "k_proj.bias")
            yield g + "attn_v.bias", lambda a=a: r(a + "v_proj.bias")
        yield g + "attn_output.weight", lambda a=a: r(a + "o_proj.weight")
        if spec.qk_norm != "none":
            yield g + "attn_q_norm.weight", lambda a=a: r(a + "q_norm.weight")
            yield g + "attn_k_norm.weight", lambda a=a: r(a + "k_norm.weight")
        yield g + "ffn_norm.weight", lambda a=hf: r(a + "post_attention_layernorm.weight")
        if not spec.is_moe:
            m = hf + "mlp."
            yield g + "ffn_gate.weight", lambda m=m: r(m + "gate_proj.weight")
            yield g + "ffn_up.weight", lambda m=m: r(m + "up_proj.weight")
            yield g + "ffn_down.weight", lambda m=m: r(m + "down_proj.weight")
            continue
        if spec.family == "mixtral":
            m = hf + "block_sparse_moe."
            names = {"gate": "w1", "up": "w3", "down": "w2"}
            expert = lambda m, e, kind: f"{m}experts.{e}.{names[kind]}.weight"  # noqa: E731
        else:
            m = hf + "mlp."
            expert = lambda m, e, kind: f"{m}experts.{e}.{kind}_proj.weight"  # noqa: E731
        if spec.router == "none":  # the split twin: llama.cpp's MoE FFN needs a router; a zero one over k of k
            yield g + "ffn_gate_inp.weight", lambda: np.zeros((spec.num_experts, spec.hidden_size), np.float32)
        else:
            yield g + "ffn_gate_inp.weight", lambda m=m: r(m + "gate.weight")
        for kind in ("gate", "up", "down"):
            yield (g + f"ffn_{kind}_exps.weight",
                   lambda m=m, kind=kind, expert=expert: np.stack(
                       [r(expert(m, e, kind)) for e in range(spec.num_experts)]))
        if spec.traits.shared_expert:
            s = m + "shared_expert."
            yield g + "ffn_gate_inp_shexp.weight", lambda m=m: r(m + "shared_expert_gate.weight")[0]
            yield g + "ffn_gate_shexp.weight", lambda s=s: r(s + "gate_proj.weight")
            yield g + "ffn_up_shexp.weight", lambda s=s: r(s + "up_proj.weight")
            yield g + "ffn_down_shexp.weight", lambda s=s: r(s + "down_proj.weight")
    yield "output_norm.weight", lambda: r("model.norm.weight")
    if not spec.tie_word_embeddings:
        yield "output.weight", lambda: r("lm_head.weight")


def _shape(spec: ModelSpec, name: str) -> tuple[int, ...]:
    """numpy shape of a GGUF tensor, without reading it."""
    h, v = spec.hidden_size, spec.vocab_size
    f, e = spec.intermediate_size, spec.num_experts
    s = spec.shared_expert_intermediate_size
    base = name.split(".", 2)[-1] if name.startswith("blk.") else name
    table = {
        "token_embd.weight": (v, h), "output.weight": (v, h), "output_norm.weight": (h,),
        "attn_norm.weight": (h,), "ffn_norm.weight": (h,),
        "attn_q.weight": (spec.q_dim, h), "attn_k.weight": (spec.kv_dim, h), "attn_v.weight": (spec.kv_dim, h),
        "attn_q.bias": (spec.q_dim,), "attn_k.bias": (spec.kv_dim,), "attn_v.bias": (spec.kv_dim,),
        "attn_output.weight": (h, spec.q_dim),
        "attn_q_norm.weight": (spec.q_dim if spec.qk_norm == "full" else spec.head_dim,),
        "attn_k_norm.weight": (spec.kv_dim if spec.qk_norm == "full" else spec.head_dim,),
        "ffn_gate.weight": (f, h), "ffn_up.weight": (f, h), "ffn_down.weight": (h, f),
        "ffn_gate_inp.weight": (e, h),
        "ffn_gate_exps.weight": (e, f, h), "ffn_up_exps.weight": (e, f, h), "ffn_down_exps.weight": (e, h, f),
        "ffn_gate_inp_shexp.weight": (h,),
        "ffn_gate_shexp.weight": (s, h), "ffn_up_shexp.weight": (s, h), "ffn_down_shexp.weight": (h, s),
    }
    return table[base]


def write_gguf(ckpt: Checkpoint, path: Path, out_type: str = "f32") -> None:
    """Write `ckpt` to `path` with 2-D+ weights in `out_type` (f32, f16 or bf16); 1-D
    tensors (norms, biases) and the router stay f32, as llama.cpp's converter keeps them."""
    import gguf

    if out_type not in BASE_TYPES:
        raise ValueError(f"GGUF base type must be one of {BASE_TYPES}, got {out_type!r}")
    spec = ckpt.spec
    arch, _, _ = ARCH[spec.family]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(spec.name)
    w.add_context_length(spec.max_position_embeddings)
    w.add_embedding_length(spec.hidden_size)
    w.add_block_count(spec.num_layers)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_key_length(spec.head_dim)
    w.add_value_length(spec.head_dim)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_theta)
    w.add_layer_norm_rms_eps(spec.rms_norm_eps)
    w.add_vocab_size(spec.vocab_size)
    if spec.is_moe:
        w.add_expert_count(spec.num_experts)
        w.add_expert_used_count(spec.top_k)
        if spec.family != "mixtral":
            w.add_expert_feed_forward_length(spec.intermediate_size)
        if spec.shared_expert_intermediate_size:
            w.add_expert_shared_feed_forward_length(spec.shared_expert_intermediate_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type]
    w.add_file_type(ftype)
    w.add_tokenizer_model("none")

    loaders = list(_tensors(ckpt))
    kinds = {}
    for name, _ in loaders:
        shape = _shape(spec, name)
        keep_f32 = len(shape) == 1 or name.endswith("ffn_gate_inp.weight") or out_type == "f32"
        kind = "f32" if keep_f32 else out_type
        kinds[name] = kind
        n = int(np.prod(shape))
        if kind == "bf16":
            w.add_tensor_info(name, shape, np.dtype(np.uint16), n * 2, raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            dtype = np.float32 if kind == "f32" else np.float16
            w.add_tensor_info(name, shape, np.dtype(dtype), n * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, load in loaders:
        if name in ROW_STREAMED:  # the vocabulary tables: a block of rows at a time
            w.write_tensor_data(_RowParts(ckpt, ROW_STREAMED[name], kinds[name]))
            continue
        x = np.ascontiguousarray(load(), dtype=np.float32)
        if x.shape != _shape(spec, name):
            raise AssertionError(f"{name}: shape {x.shape} != expected {_shape(spec, name)}")
        w.write_tensor_data(_convert(x, kinds[name]))
        del x
    w.close()


# GGUF tensors copied row for row from one checkpoint tensor, written a block of rows at a
# time: a 256 k-token embedding is 2.4 GB of float32, and converting it whole to bf16 peaked
# at 9.0 GB (gemma-2-2b-shape)
ROW_STREAMED = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight"}
ROW_BLOCK_BYTES = 64 << 20


def _convert(x: np.ndarray, kind: str) -> np.ndarray:
    """float32 rows in the GGUF tensor's type (bf16 as its raw 16-bit patterns)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if kind == "bf16":
        return to_bf16_bits(x)
    return x.astype(np.float16) if kind == "f16" else x


class _RowParts:
    """A checkpoint tensor as GGUFWriter.write_tensor_data takes it (`nbytes`, `tofile`),
    read, converted and written ROW_BLOCK_BYTES of float32 rows at a time."""

    def __init__(self, ckpt: Checkpoint, name: str, kind: str) -> None:
        self.ckpt, self.name, self.kind = ckpt, name, kind
        self.rows, *rest = ckpt.shape(name)
        self.row = int(np.prod(rest))
        self.nbytes = self.rows * self.row * {"f32": 4, "f16": 2, "bf16": 2}[kind]

    def tofile(self, fout: Any) -> None:
        step = max(1, ROW_BLOCK_BYTES // (4 * self.row))
        for lo in range(0, self.rows, step):
            _convert(self.ckpt.read(self.name, rows=(lo, min(lo + step, self.rows))), self.kind).tofile(fout)
