"""Read a ModelSpec back from a GGUF file's metadata (for `--model path/to/file.gguf`)."""

from __future__ import annotations

from pathlib import Path

from moerun.toolkit import CheckpointError, ModelSpec, UnsupportedError

from .gguf_export import ARCH

# GGUF general.file_type -> moerun precision name (llama_ftype values)
FILE_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 7: "q8_0", 10: "q2_k", 12: "q3_k_m", 15: "q4_k_m",
              17: "q5_k_m", 18: "q6_k", 32: "bf16"}


def _families_for(arch: str, moe: bool) -> str:
    for family, (a, _, _) in ARCH.items():
        if a == arch and (family in ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")) == moe:
            return family
    raise UnsupportedError(f"GGUF architecture {arch!r} ({'MoE' if moe else 'dense'}) is not a family moerun knows")


def _f32(x: float) -> float:
    return float(f"{float(x):.7g}")


def spec_from_gguf(path: Path) -> tuple[ModelSpec, str]:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from None

    def get(key: str, default=None):
        field = r.fields.get(key)
        if field is None:
            return default
        value = field.contents()
        return value

    arch = get("general.architecture")
    if arch is None:
        raise CheckpointError(f"{path}: GGUF without general.architecture")
    experts = int(get(f"{arch}.expert_count", 0) or 0)
    family = _families_for(arch, experts > 0)
    hidden = int(get(f"{arch}.embedding_length"))
    heads = int(get(f"{arch}.attention.head_count"))
    names = {t.name for t in r.tensors}
    vocab = get(f"{arch}.vocab_size")
    if vocab is None:
        tokens = get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else None
    if vocab is None:
        emb = next(t for t in r.tensors if t.name == "token_embd.weight")
        vocab = int(emb.shape[-1])
    inter = get(f"{arch}.expert_feed_forward_length") if experts else None
    inter = inter or get(f"{arch}.feed_forward_length")
    spec = ModelSpec(
        name=str(get("general.name", path.stem) or path.stem),
        family=family,
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(get(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(get(f"{arch}.attention.key_length", hidden // heads)),
        intermediate_size=int(inter),
        num_experts=experts,
        top_k=int(get(f"{arch}.expert_used_count", 0) or 0),
        shared_expert_intermediate_size=int(get(f"{arch}.expert_shared_feed_forward_length", 0) or 0),
        norm_topk_prob=bool(ARCH[family][1]) if ARCH[family][1] is not None else True,
        tie_word_embeddings="output.weight" not in names,
        # GGUF stores float32: back to the shortest decimal that rounds to it
        rms_norm_eps=_f32(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(get(f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(get(f"{arch}.context_length", 4096)),
    )
    ftype = get("general.file_type")
    return spec, FILE_TYPES.get(int(ftype), f"ftype-{int(ftype)}") if ftype is not None else "unknown"
