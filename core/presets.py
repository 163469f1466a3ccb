"""Built-in model presets: tiny shapes for tests, a small default-study MoE, and real
published shapes. An in-tree plugin like any other (listed in DEFAULT_PLUGINS).

Published totals come from each model's card / config.json; tests check the computed
count against them within 2 %. DeepSeek-V2-Lite is absent on purpose: its multi-head
latent attention is not a family moerun implements.
"""

from __future__ import annotations

from .hookimpl import hookimpl
from .spec import ModelSpec

_TINY = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
             max_position_embeddings=1024)

TINY = [
    (ModelSpec(name="tiny-dense", family="llama", intermediate_size=192, **_TINY),
     "tiny dense Llama for tests"),
    (ModelSpec(name="tiny-moe", family="mixtral", intermediate_size=64, num_experts=8, top_k=2, **_TINY),
     "tiny Mixtral-style MoE (8 experts, top-2) for tests"),
    (ModelSpec(name="tiny-qwen2-moe", family="qwen2_moe", intermediate_size=32, num_experts=8, top_k=2,
               shared_expert_intermediate_size=64, norm_topk_prob=False, **_TINY),
     "tiny Qwen2-MoE (shared expert, q/k/v bias) for tests"),
    (ModelSpec(name="tiny-olmoe", family="olmoe", intermediate_size=32, num_experts=16, top_k=4,
               norm_topk_prob=False, **{**_TINY, "num_kv_heads": 4}),
     "tiny OLMoE (full q/k norm, no GQA as in OLMoE, 16 experts top-4) for tests"),
    (ModelSpec(name="tiny-qwen3-moe", family="qwen3_moe", intermediate_size=32, num_experts=16, top_k=4,
               **_TINY),
     "tiny Qwen3-MoE (per-head q/k norm) for tests"),
    (ModelSpec(name="small-moe", family="mixtral", vocab_size=8192, hidden_size=512, num_layers=6,
               num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=1024, num_experts=8, top_k=2,
               max_position_embeddings=4096),
     "the default study's MoE: 88 M total / 32 M active, big enough to be bandwidth-bound"),
]

# (spec, published total, published active, source)
REAL = [
    (ModelSpec(name="olmoe-1b-7b", family="olmoe", vocab_size=50304, hidden_size=2048, num_layers=16,
               num_heads=16, num_kv_heads=16, head_dim=128, intermediate_size=1024, num_experts=64, top_k=8,
               norm_topk_prob=False, rope_theta=10000.0, max_position_embeddings=4096),
     6_919_000_000, 1_280_000_000, "allenai/OLMoE-1B-7B-0924: 6.9 B total, 1.3 B active"),
    (ModelSpec(name="llama-3.2-1b", family="llama", vocab_size=128256, hidden_size=2048, num_layers=16,
               num_heads=32, num_kv_heads=8, head_dim=64, intermediate_size=8192, tie_word_embeddings=True,
               rope_theta=500000.0, max_position_embeddings=131072),
     1_235_814_400, None, "meta-llama/Llama-3.2-1B: 1.24 B"),
    (ModelSpec(name="qwen2.5-1.5b", family="qwen2", vocab_size=151936, hidden_size=1536, num_layers=28,
               num_heads=12, num_kv_heads=2, head_dim=128, intermediate_size=8960, tie_word_embeddings=True,
               rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768),
     1_543_714_304, None, "Qwen/Qwen2.5-1.5B: 1.54 B"),
    (ModelSpec(name="gemma-2-2b-shape", family="llama", vocab_size=256000, hidden_size=2304, num_layers=26,
               num_heads=8, num_kv_heads=4, head_dim=256, intermediate_size=9216, tie_word_embeddings=True,
               rms_norm_eps=1e-6, max_position_embeddings=8192),
     2_614_341_888, None, "google/gemma-2-2b's shapes as a Llama-family dense model (Gemma's extra "
                          "norms and soft-capping left out): 2.61 B"),
    (ModelSpec(name="mixtral-8x7b", family="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32,
               num_heads=32, num_kv_heads=8, head_dim=128, intermediate_size=14336, num_experts=8, top_k=2,
               rope_theta=1000000.0, max_position_embeddings=32768),
     46_702_792_704, 12_879_925_248, "mistralai/Mixtral-8x7B-v0.1: 46.7 B total, 12.9 B active"),
    (ModelSpec(name="qwen1.5-moe-a2.7b", family="qwen2_moe", vocab_size=151936, hidden_size=2048,
               num_layers=24, num_heads=16, num_kv_heads=16, head_dim=128, intermediate_size=1408,
               num_experts=60, top_k=4, shared_expert_intermediate_size=5632, norm_topk_prob=False,
               rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=8192),
     14_315_784_192, 2_689_000_000, "Qwen/Qwen1.5-MoE-A2.7B: 14.3 B total, 2.7 B active"),
    (ModelSpec(name="qwen3-30b-a3b", family="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48,
               num_heads=32, num_kv_heads=4, head_dim=128, intermediate_size=768, num_experts=128, top_k=8,
               rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960),
     30_532_122_624, 3_300_000_000, "Qwen/Qwen3-30B-A3B: 30.5 B total, 3.3 B active"),
]


@hookimpl
def moerun_register_models(registry):
    for spec, description in TINY:
        registry.add(spec, description=description)
    for spec, total, active, source in REAL:
        registry.add(spec, description=source, published_total_params=total,
                     published_active_params=active, source=source)
