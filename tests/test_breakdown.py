"""Op-level breakdowns from each CPU backend's own instrument: categories present, time
reconciled with the un-instrumented run, and routing's share tracking the model's shape."""

from __future__ import annotations

import pytest

from moerun import LoadSettings, ModelSpec, synthetic_checkpoint, token_ids
from moerun.breakdown import CATEGORIES, summarize

BACKENDS = [("torch", "fp32"), ("llamacpp", "f32"), ("onnxruntime", "fp32"), ("onnxruntime-contrib", "fp32")]
SHAPE = dict(family="mixtral", vocab_size=256, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=4,
             head_dim=64, max_position_embeddings=512, top_k=2)
# Same top-k, so both run the same number of expert calls: 128 small experts (a 128 x 512
# router) against 4 large ones (a 4 x 512 router, 16x wider experts).
ROUTER_HEAVY = ModelSpec(name="router-heavy", intermediate_size=64, num_experts=128, **SHAPE)
FEW_LARGE = ModelSpec(name="few-large", intermediate_size=1024, num_experts=4, **SHAPE)


def _breakdown(pm, cache, backend, precision, spec):
    b = pm.backends.get(backend)()
    if not b.availability().available:
        pytest.skip(f"{backend} unavailable")
    ck = synthetic_checkpoint(spec, cache, seed=0)
    s = b.load(b.prepare(ck, precision, cache), LoadSettings(max_context=128))
    ids = token_ids(spec.vocab_size, 40, seed=2)
    try:
        raw = s.breakdown(ids[:32], ids[32:])
    finally:
        s.close()
    assert set(raw["prefill"]) == set(CATEGORIES) and set(raw["decode"]) == set(CATEGORIES)
    return raw


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_router_heavy_spec_shows_a_larger_router_share(plugins, cache, backend, precision):
    shares = {}
    for spec in (ROUTER_HEAVY, FEW_LARGE):
        raw = _breakdown(plugins, cache, backend, precision, spec)
        d = summarize(raw["decode"], raw["decode_wall_s"], None)
        p = summarize(raw["prefill"], raw["prefill_wall_s"], None)
        shares[spec.name] = (d["router_share_of_moe_block"], p["router_share_of_moe_block"])
        assert raw["decode"]["experts"] > 0 and raw["decode"]["attention"] > 0
    print(backend, {k: f"decode {v[0]:.1%}, prefill {v[1]:.1%}" for k, v in shares.items()})
    # decode: same expert calls, a 32x larger router -> a clearly larger share on every engine.
    # Prefill is printed, not asserted: there the expert side changes shape too (128 experts
    # each get a token or two; ONNX's standard formulation runs every expert on every token).
    assert shares["router-heavy"][0] > 1.5 * shares["few-large"][0]


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_dense_model_has_no_moe_categories(plugins, cache, backend, precision):
    spec = plugins.models.resolve("tiny-dense")
    raw = _breakdown(plugins, cache, backend, precision, spec)
    for phase in ("prefill", "decode"):
        assert raw[phase]["router"] == raw[phase]["experts"] == 0
        assert raw[phase]["dense_ffn"] > 0 and raw[phase]["attention"] > 0


def test_measurement_reconciles_breakdown_with_plain_timings(plugins, cache):
    from moerun import Point, measure

    r = measure(Point(model="tiny-moe", backend="torch", prompt_tokens=16, new_tokens=8, repetitions=2,
                      breakdown=True), plugins, cache, {})
    b = r["breakdown"]
    assert b["available"] and b["instrument"].startswith("cut timing")
    for phase in ("prefill", "decode"):
        d = b[phase]
        assert d["plain_s"] > 0 and d["sum_over_plain"] == pytest.approx(d["sum_s"] / d["plain_s"])
        assert abs(sum(d["shares"].values()) - 1) < 1e-9
        # the MoE block took time; the router's part of it is a share (a tiny router can time as
        # zero under cut timing's monotone correction on a noisy machine)
        assert d["shares"]["experts"] > 0 and 0 <= d["router_share_of_moe_block"] < 1
    r = measure(Point(model="tiny-moe", backend="torch", prompt_tokens=4, new_tokens=2, repetitions=1),
                plugins, cache, {})
    assert "breakdown" not in r  # instrumented runs only when asked for


def test_llamacpp_node_names_map_to_categories():
    from moerun.backends.llamacpp.cut import categorize_node

    assert categorize_node("ffn_moe_topk-3") == "router"
    assert categorize_node("ffn_moe_logits-0") == "router"
    assert categorize_node("ffn_moe_down-12") == "experts"
    assert categorize_node("ffn_shexp-1") == "shared_expert"
    assert categorize_node("Qcur-0 (reshaped)") == "attention"
    assert categorize_node("kq_soft_max-5") == "attention"
    assert categorize_node("attn_norm-2") == "norm"
    assert categorize_node("ffn_gate-0") == "dense_ffn"
    assert categorize_node("result_output") == "head"
    assert categorize_node("inp_embd") == "embedding"
    assert categorize_node("l_out-1") == "other"
    assert categorize_node("ffn_out-4", moe=False) == "dense_ffn"  # a dense FFN's down projection
    assert categorize_node("ffn_out-4", moe=True) == "experts"
