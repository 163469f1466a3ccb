"""The PyTorch reference backend on real torch: cache correctness, MoE against a naive
reference, precisions, routing statistics and session errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moerun import ConfigError, LoadSettings, UnsupportedError, synthetic_checkpoint, token_ids
from moerun.presets import TINY

TINY_NAMES = [s.name for s, _ in TINY if s.name.startswith("tiny-")]


def _session(plugins, cache, name, precision="fp32", max_context=64, router_skew=0.0):
    spec = plugins.models.resolve(name)
    ck = synthetic_checkpoint(spec, cache, seed=0, router_skew=router_skew)
    backend = plugins.backends.get("torch")()
    backend.check(spec, precision)
    art = backend.prepare(ck, precision, cache)
    return spec, backend.load(art, LoadSettings(max_context=max_context))


@pytest.mark.parametrize("name", TINY_NAMES)
def test_prefill_plus_decode_equals_full_forward_without_cache(plugins, cache, name):
    spec, s = _session(plugins, cache, name)
    ids = token_ids(spec.vocab_size, 24, seed=3)
    full = s.model.forward(torch.tensor(ids), 0, all_logits=True, use_cache=False).numpy()
    s.reset()
    first = s.prefill(ids[:10], all_logits=True)
    rest = [s.decode(t) for t in ids[10:]]
    got = np.concatenate([first, np.stack(rest)])
    assert got.shape == (24, spec.vocab_size)
    assert np.abs(got - full).max() < 1e-4
    assert (got.argmax(-1) == full.argmax(-1)).all()
    # a chunked prefill (chunk after cached positions) agrees too
    s.reset()
    chunked = np.concatenate([s.prefill(ids[:7], all_logits=True), s.prefill(ids[7:], all_logits=True)])
    assert np.abs(chunked - full).max() < 1e-4
    # logits are spread enough for top-1 comparisons between engines
    assert full.std() > 1.0


@pytest.mark.parametrize("name", [n for n in TINY_NAMES if n != "tiny-dense"])
def test_moe_grouped_and_gathered_paths_equal_naive_all_experts(plugins, cache, name):
    from moerun.backends.torch.model import moe_all_experts

    spec, s = _session(plugins, cache, name)
    m = s.model
    x = torch.randn(40, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    for i in range(spec.num_layers):
        ref = moe_all_experts(spec, m.layers[i], x)
        grouped = m.ffn(i, x)  # prefill path: tokens grouped by expert
        one_by_one = torch.cat([m.ffn(i, x[j : j + 1]) for j in range(40)])  # decode path
        assert (grouped - ref).abs().max() < 1e-5
        assert (one_by_one - ref).abs().max() < 1e-5
    # and the routing really is sparse and spread: several experts used, top_k per token
    assert (m.expert_counts.sum(axis=1) == 2 * 40 * spec.top_k).all()
    assert (m.expert_counts > 0).sum(axis=1).min() >= min(spec.num_experts, 4)


def test_bf16_agrees_with_fp32_on_top1(plugins, cache):
    spec, ref = _session(plugins, cache, "tiny-moe")
    _, bf = _session(plugins, cache, "tiny-moe", precision="bf16")
    ids = token_ids(spec.vocab_size, 32, seed=5)
    a, b = ref.prefill(ids, all_logits=True), bf.prefill(ids, all_logits=True)
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.5
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.85
    assert bf.kv_bytes_per_value == 2 and ref.kv_bytes_per_value == 4
    # decode runs its own attention in bf16 (decode_attention, not SDPA): same agreement
    assert bf.model.matmul_decode_attention and not ref.model.matmul_decode_attention
    steps = [(ref.decode(t), bf.decode(t)) for t in token_ids(spec.vocab_size, 16, seed=6)]
    assert max(np.abs(x - y).max() for x, y in steps) < 0.5
    assert np.mean([x.argmax() == y.argmax() for x, y in steps]) >= 0.85


def test_decode_attention_is_sdpa_for_one_query():
    """The bf16 decode attention equals torch's SDPA on a grouped-query cache slice."""
    import torch
    import torch.nn.functional as F

    from moerun.backends.torch.model import decode_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 1, 64, generator=g)
    cache_k, cache_v = torch.randn(2, 2, 4, 100, 64, generator=g)
    k, v = cache_k[:, :, :37], cache_v[:, :, :37]  # strided slices, as in the model's cache
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out = decode_attention(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype and out.shape == ref.shape
        assert (out.float() - ref).abs().max() < tol


def test_router_skew_makes_expert_popularity_unequal(plugins, cache):
    from moerun.metrics import routing_stats

    ids = token_ids(512, 200, seed=1)
    imbalance = {}
    for skew in (0.0, 4.0):
        _, s = _session(plugins, cache, "tiny-olmoe", max_context=256, router_skew=skew)
        s.prefill(ids)
        imbalance[skew] = routing_stats(s.expert_counts())["load_imbalance"]
    assert imbalance[4.0] > imbalance[0.0] * 1.3, imbalance


def test_session_rejects_bad_input(plugins, cache):
    spec, s = _session(plugins, cache, "tiny-dense", max_context=8)
    with pytest.raises(ConfigError, match="token ids must be in"):
        s.prefill([1, 2, spec.vocab_size])
    with pytest.raises(ConfigError, match="at least one token"):
        s.prefill([])
    s.prefill([1] * 8)
    with pytest.raises(ConfigError, match="context full"):
        s.decode(1)
    s.reset()
    assert s.decode(1).shape == (spec.vocab_size,)


def test_unsupported_precision_is_unsupported_not_a_crash(plugins):
    backend = plugins.backends.get("torch")()
    spec = plugins.models.resolve("tiny-moe")
    with pytest.raises(UnsupportedError, match="does not support precision 'q4_k_m'"):
        backend.check(spec, "q4_k_m")
    with pytest.raises(ConfigError, match="unknown precision 'fp5'"):
        backend.check(spec, "fp5")


def test_availability_reports_version_and_devices(plugins):
    av = plugins.backends.get("torch")().availability()
    assert av.available and av.version == torch.__version__ and "cpu" in av.devices


def test_compiled_session_matches_eager(plugins, cache):
    """--compile: torch.compile over the same model (plain weights; routing counted outside
    the graph) gives the eager logits."""
    spec = plugins.models.resolve("tiny-moe")
    ck = synthetic_checkpoint(spec, cache, seed=0)
    backend = plugins.backends.get("torch")()
    art = backend.prepare(ck, "fp32", cache)
    eager = backend.load(art, LoadSettings(max_context=32))
    compiled = backend.load(art, LoadSettings(max_context=32, compile=True))
    assert compiled.describe()["compiled"] and not eager.describe()["compiled"]
    ids = token_ids(spec.vocab_size, 12, seed=2)
    a = np.concatenate([eager.prefill(ids[:8]), np.stack([eager.decode(t) for t in ids[8:]])])
    b = np.concatenate([compiled.prefill(ids[:8]), np.stack([compiled.decode(t) for t in ids[8:]])])
    assert np.abs(a - b).max() < 1e-4
    assert compiled.expert_counts().sum() == eager.expert_counts().sum() == (8 + 4) * spec.top_k * spec.num_layers


def test_rms_norm_is_hugging_faces_bit_for_bit():
    """The fused norm rounds exactly as HF's written-out RMSNorm does, in every dtype."""
    import torch

    from moerun.backends.torch.model import rms_norm

    g = torch.Generator().manual_seed(0)
    for shape in ((1, 512), (128, 2048), (3, 7, 2304)):
        x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd, wd = x.to(dtype), w.to(dtype)
            xf = xd.float()
            hf = wd * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
            assert torch.equal(rms_norm(xd, wd, 1e-6), hf), (shape, dtype)
