"""ModelSpec: validation, exact counts, published presets, dense twins, HF config."""

from __future__ import annotations

import math

import attrs
import pytest

from moerun import ConfigError, ModelSpec
from moerun.presets import REAL, TINY

BASE = dict(name="t", family="mixtral", vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=8, intermediate_size=16, num_experts=4, top_k=2)


@pytest.mark.parametrize("change, message", [
    (dict(top_k=5), "top_k must be between 1 and num_experts"),
    (dict(top_k=0), "top_k must be between 1 and num_experts"),
    (dict(num_experts=1), "needs num_experts >= 2"),
    (dict(num_kv_heads=3), "must be a multiple of num_kv_heads"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(vocab_size=-3), "vocab_size must be a positive integer"),
    (dict(family="gpt9"), "unknown family 'gpt9'"),
    (dict(family="llama"), "dense family llama takes no experts"),
    (dict(shared_expert_intermediate_size=8), "has no shared expert"),
    (dict(family="qwen2_moe"), "needs shared_expert_intermediate_size > 0"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be a positive number"),
])
def test_invalid_shapes_are_rejected_with_a_clear_message(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec(**{**BASE, **change})


def test_from_dict_rejects_unknown_keys_and_names_them():
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelSpec.from_dict({**BASE, "hiden_size": 3})
    with pytest.raises(ConfigError, match="top_k"):
        ModelSpec.from_dict({**BASE, "top_k": 9})


@pytest.mark.parametrize("spec", [s for s, _ in TINY] + [r[0] for r in REAL], ids=lambda s: s.name)
def test_param_count_equals_sum_of_tensor_shapes(spec):
    assert spec.total_params == sum(math.prod(shape) for _, shape in spec.tensor_shapes())


@pytest.mark.parametrize("spec, total, active", [(r[0], r[1], r[2]) for r in REAL], ids=lambda x: getattr(x, "name", ""))
def test_real_presets_match_published_counts(spec, total, active):
    assert abs(spec.total_params / total - 1) < 0.02
    if active:
        assert abs(spec.active_params / active - 1) < 0.05  # published actives are rounded


def test_olmoe_and_llama_reference_shapes():
    # ../shared/REFERENCE-SHAPES.md: llama.cpp reported these counts for the same shapes
    olmoe = next(r[0] for r in REAL if r[0].name == "olmoe-1b-7b")
    llama = next(r[0] for r in REAL if r[0].name == "llama-3.2-1b")
    # llama.cpp's count leaves out OLMoE's q/k norm weights: 2 x 2048 per layer
    assert abs((olmoe.total_params - 16 * 2 * 2048) / 6.92e9 - 1) < 0.002
    assert abs(llama.total_params / 1.24e9 - 1) < 0.005
    assert 1.25e9 < olmoe.active_params < 1.35e9


@pytest.mark.parametrize("spec", [s for s, _ in TINY if s.is_moe] + [r[0] for r in REAL if r[0].is_moe],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("match", ["active", "total"])
def test_dense_twins_match_within_one_percent(spec, match):
    twin = spec.dense_twin(match)
    target = spec.active_params if match == "active" else spec.total_params
    assert not twin.is_moe
    assert abs(twin.total_params / target - 1) < 0.01
    # same attention, embeddings and depth
    for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
        assert getattr(twin, field) == getattr(spec, field)
    assert twin.attention_bias == spec.attention_bias


def test_twin_of_dense_model_is_an_error():
    with pytest.raises(ConfigError, match="is dense"):
        TINY[0][0].dense_twin("active")


def test_bytes_per_token_counts_active_experts_and_the_head():
    moe = ModelSpec(**BASE)
    h, v, L = 32, 100, 2
    attn = 2 * h * 32 + 2 * h * 16
    per_layer = 2 * h + attn + 4 * h + 2 * 3 * h * 16  # norms, attention, router, top-2 experts
    expected_params = h + L * per_layer + h + v * h  # embedding row, layers, final norm, head
    assert moe.weight_bytes_per_token("fp32") == expected_params * 4
    assert moe.weight_bytes_per_token("bf16") == expected_params * 2
    tied = attrs.evolve(moe, tie_word_embeddings=True)
    assert tied.weight_bytes_per_token("fp32") == expected_params * 4  # head still read in full
    with pytest.raises(ConfigError, match="unknown precision"):
        moe.weight_bytes_per_token("fp7")


def test_hf_config_round_trip_for_every_family():
    for spec, _ in TINY:
        again = ModelSpec.from_hf_config(spec.to_hf_config())
        assert again == spec


def test_hf_config_of_unsupported_family_is_a_clear_error():
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        ModelSpec.from_hf_config({"model_type": "gpt2"})
    cfg = TINY[0][0].to_hf_config() | {"rope_scaling": {"rope_type": "llama3", "factor": 32.0}}
    with pytest.raises(ConfigError, match="rope_scaling=.*not implemented yet"):
        ModelSpec.from_hf_config(cfg)
    with pytest.raises(ConfigError, match="lacks 'hidden_size'"):
        ModelSpec.from_hf_config({"model_type": "llama", "num_attention_heads": 4})
