"""Precisions moerun knows, with the nominal bits each weight costs.

Nominal bits drive the *predicted* bytes read per token; backends report the size of the
artifact they actually built, which the results carry beside it.
"""

from __future__ import annotations

import attrs

from .errors import ConfigError


@attrs.frozen(kw_only=True)
class Precision:
    name: str
    bits_per_weight: float
    kind: str  # "float", "int", "gguf"
    description: str


_TABLE = [
    Precision(name="fp32", bits_per_weight=32.0, kind="float", description="IEEE float32"),
    Precision(name="fp16", bits_per_weight=16.0, kind="float", description="IEEE float16"),
    Precision(name="bf16", bits_per_weight=16.0, kind="float", description="bfloat16"),
    Precision(name="fp8", bits_per_weight=8.0, kind="float", description="float8 e4m3 (GPU)"),
    Precision(name="int8", bits_per_weight=8.0, kind="int", description="8-bit weights, per-channel scales"),
    Precision(name="int4", bits_per_weight=4.5, kind="int", description="4-bit weights, block-32 scales"),
    # llama.cpp GGUF types; bits from ggml's block layouts (k-quant mixes are typical values)
    Precision(name="f32", bits_per_weight=32.0, kind="gguf", description="GGUF F32"),
    Precision(name="f16", bits_per_weight=16.0, kind="gguf", description="GGUF F16"),
    Precision(name="q8_0", bits_per_weight=8.5, kind="gguf", description="GGUF Q8_0"),
    Precision(name="q6_k", bits_per_weight=6.5625, kind="gguf", description="GGUF Q6_K"),
    Precision(name="q5_k_m", bits_per_weight=5.69, kind="gguf", description="GGUF Q5_K_M mix"),
    Precision(name="q4_k_m", bits_per_weight=4.89, kind="gguf", description="GGUF Q4_K_M mix"),
    Precision(name="q4_0", bits_per_weight=4.5, kind="gguf", description="GGUF Q4_0"),
    Precision(name="q3_k_m", bits_per_weight=3.91, kind="gguf", description="GGUF Q3_K_M mix"),
    Precision(name="q2_k", bits_per_weight=3.0, kind="gguf", description="GGUF Q2_K mix"),
]

PRECISIONS: dict[str, Precision] = {p.name: p for p in _TABLE}


def get_precision(name: str) -> Precision:
    """Look a precision up by name (case-insensitive); ConfigError lists the known ones."""
    key = name.strip().lower()
    if key not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}"
        )
    return PRECISIONS[key]


HARDER = 0.85  # an iso-memory twin's precision: at most this share of the MoE's bits per weight


def harder_precision(offered: "list[str] | tuple[str, ...]", precision: str, share: float = HARDER) -> str | None:
    """The precision one real step harder than `precision` among `offered` (a backend's):
    the most bits per weight at most `share` of `precision`'s; ties go to the first
    offered. None when the backend offers nothing that much harder. q4_k_m -> q3_k_m,
    f16 -> q8_0, fp32 -> bf16 (torch) or int8 (onnxruntime), int8 -> int4."""
    bits = get_precision(precision).bits_per_weight
    best: str | None = None
    for name in offered:
        b = get_precision(name).bits_per_weight
        if b <= share * bits and (best is None or b > get_precision(best).bits_per_weight):
            best = name
    return best


def nominal(precision: str) -> str:
    """The precision whose nominal bits predict bytes per token (an engine file's own type
    that moerun does not know: f16)."""
    return precision if precision in PRECISIONS else "f16"
