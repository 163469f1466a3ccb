"""Cut timing (moerun.breakdown.cut_timing) on steps whose times are known, and the
pieces each backend builds it from: llama.cpp's cut callback and node categories, the
PyTorch model's cut points."""

from __future__ import annotations

import random

import pytest

from moerun.breakdown import CATEGORIES, cut_timing, monotone


def test_monotone_is_the_nearest_non_decreasing_sequence():
    assert monotone([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    assert monotone([1.0, 3.0, 2.0, 4.0]) == [1.0, 2.5, 2.5, 4.0]
    assert monotone([3.0, 2.0, 1.0]) == [2.0, 2.0, 2.0]
    out = monotone([random.Random(1).random() for _ in range(50)])
    assert all(a <= b for a, b in zip(out, out[1:]))


def _step(stretches, tail, noise=0.0, seed=0):
    """A step made of known stretches: the time to cut k is the sum of stretches 0..k."""
    rng = random.Random(seed)
    calls = []

    def step(k):
        calls.append(k)
        t = sum(stretches) + tail if k is None else sum(stretches[: k + 1])
        return t * (1 + rng.uniform(-noise, noise))
    return step, calls


def test_cut_timing_recovers_known_stretches():
    labels = ["other", "norm", "attention", "other", "norm", "router", "experts", "norm", "head"]
    stretches = [5e-6, 2e-6, 40e-6, 1e-6, 2e-6, 6e-6, 30e-6, 2e-6, 9e-6]
    step, calls = _step(stretches, tail=3e-6)
    cats, info = cut_timing(step, labels, repetitions=5)
    expected = dict.fromkeys(CATEGORIES, 0.0)
    for label, s in zip(labels, stretches):
        expected[label] += s
    expected["other"] += 3e-6  # after the last cut
    assert cats == pytest.approx(expected, abs=1e-12)
    assert info["repetitions"] == 5 and info["cuts"] == len(labels)
    assert info["armed_step_s"] == pytest.approx(sum(stretches) + 3e-6)
    assert sorted(c for c in calls[1:] if c is not None) == sorted(list(range(len(labels))) * 5)


def test_cut_timing_under_noise_stays_close_and_sums_to_the_step():
    labels = ["attention", "router", "experts", "head"]
    stretches = [40e-6, 8e-6, 50e-6, 10e-6]
    step, _ = _step(stretches, tail=0.0, noise=0.05, seed=3)
    plain, _ = _step(stretches, tail=0.0, noise=0.05, seed=4)
    cats, info = cut_timing(step, labels, plain=lambda: plain(None))
    assert sum(cats.values()) == pytest.approx(sum(stretches), rel=0.05)
    assert cats["experts"] == pytest.approx(50e-6, rel=0.25)
    assert cats["router"] < cats["experts"] and all(v >= 0 for v in cats.values())
    assert info["plain_step_s"] == pytest.approx(sum(stretches), rel=0.05)


def test_cut_timing_shrinks_repetitions_to_its_budget_and_checks_labels():
    step, _ = _step([1.0, 1.0], tail=0.0)
    _, info = cut_timing(step, ["norm", "head"], repetitions=15, budget_s=13.0)
    assert info["repetitions"] == 2  # 2 s steps, 3 measurements per repetition: 6 s each
    with pytest.raises(ValueError, match="unknown categories: nonsense"):
        cut_timing(step, ["nonsense"])
    with pytest.raises(ValueError, match="at least one"):
        cut_timing(step, [])


def test_llamacpp_unnamed_nodes_take_their_neighbours_category():
    from moerun.backends.llamacpp.cut import categorize_nodes

    names = ["embd", "Qcur-0", "node_5", "kqv_out-0", "attn_out-0", "node_7", "ffn_inp-0", "ffn_moe_logits-0",
             "ffn_moe_weights_sum_clamped-0", "ffn_norm-0 (reshaped)", "ffn_moe_down-0"]
    assert categorize_nodes(names) == ["embedding", "attention", "attention", "attention", "attention", "other",
                                       "other", "router", "router", "experts", "experts"]


@pytest.mark.parametrize("native", [True, False])
def test_llamacpp_cut_callback_ends_the_graph_at_the_armed_node(plugins, cache, native, monkeypatch):
    """The scheduler asks the callback about nodes 0..k and no more: the graph stopped."""
    import ctypes

    from moerun import LoadSettings, synthetic_checkpoint, token_ids
    from moerun.backends.llamacpp import cut as cutmod

    b = plugins.backends.get("llamacpp")()
    if not b.availability().available:
        pytest.skip("llama-cpp-python is not installed")
    if not native:
        monkeypatch.setattr(cutmod.CutCallback, "_compile", staticmethod(lambda root: None))
    spec = plugins.models.resolve("tiny-moe")
    s = b.load(b.prepare(synthetic_checkpoint(spec, cache, seed=0), "f32", cache), LoadSettings(max_context=64))
    try:
        cut = cutmod.CutCallback(s.lib.ggml_backend_sched_eval_callback, cache.root)
        if native and cut.native is False:
            pytest.skip("no C compiler here")
        assert cut.native is native
        ctx = s._context(cut.callback)
        main, s.ctx = s.ctx, ctx
        ids = token_ids(spec.vocab_size, 8, seed=0)
        try:
            cut.arm(-1)
            s.prefill(ids)
            nodes = cut.asked()
            assert nodes > 20
            for k in (0, 7, nodes // 2):
                s.reset()
                cut.arm(k)
                s.prefill(ids)
                assert cut.asked() == k + 1
        finally:
            s.ctx = main
            s.lib.llama_free(ctx)
        assert isinstance(cut.callback, ctypes._CFuncPtr)
    finally:
        s.close()


def test_torch_cut_points_label_every_region_and_stop_the_step(plugins, cache):
    import torch

    from moerun import LoadSettings, synthetic_checkpoint
    from moerun.backends.torch.model import Cuts, StepCut

    b = plugins.backends.get("torch")()
    spec = plugins.models.resolve("tiny-qwen2-moe")  # with a shared expert
    s = b.load(b.prepare(synthetic_checkpoint(spec, cache, seed=0), "fp32", cache), LoadSettings(max_context=32))
    model = s.model
    cuts = Cuts(lambda: None)
    model.instrument = cuts
    ids = torch.tensor([1, 2, 3])
    cuts.arm(record=True)
    model.forward(ids, 0, all_logits=False)
    labels = cuts.labels
    # each region: an entry (the stretch before it is "other") and an exit (the region's own)
    assert labels[0::2] == ["other"] * (len(labels) // 2)
    per_layer = ["norm", "attention", "norm", "router", "experts", "shared_expert"]
    assert labels[1::2] == ["embedding"] + per_layer * spec.num_layers + ["norm", "head"]
    cuts.arm(5)
    with pytest.raises(StepCut):
        model.forward(ids, 0, all_logits=False)
    assert cuts.n == 6
    model.instrument = None
    assert model.region("norm") is model._NO_LABEL  # free when no breakdown runs


def test_torch_breakdown_instrument_option(plugins, cache):
    from moerun import ConfigError, LoadSettings, synthetic_checkpoint, token_ids

    b = plugins.backends.get("torch")()
    spec = plugins.models.resolve("tiny-moe")
    art = b.prepare(synthetic_checkpoint(spec, cache, seed=0), "fp32", cache)
    ids = token_ids(spec.vocab_size, 12, seed=1)
    s = b.load(art, LoadSettings(max_context=32, options={"breakdown": "profiler"}))
    raw = s.breakdown(ids[:8], ids[8:])
    assert raw["instrument"].startswith("torch.profiler") and raw["decode"]["experts"] > 0
    s = b.load(art, LoadSettings(max_context=32))
    raw = s.breakdown(ids[:8], ids[8:])
    assert raw["instrument"].startswith("cut timing") and raw["decode"]["experts"] > 0
    assert raw["decode_plain_s"] > 0 and raw["detail"]["decode"]["cuts"] > 10
    with pytest.raises(ConfigError, match="option breakdown must be one of 'cut', 'profiler', got 'sampling'"):
        type(b).check_options({"breakdown": "sampling"})  # the core's check before anything is loaded


@pytest.fixture()
def ort_model(plugins, cache):
    b = plugins.backends.get("onnxruntime-contrib")()
    if not b.availability().available:
        pytest.skip("onnxruntime is not installed")
    from moerun import synthetic_checkpoint

    spec = plugins.models.resolve("tiny-moe")
    return spec, b.prepare(synthetic_checkpoint(spec, cache, seed=0), "fp32", cache)


def test_onnx_cut_points_end_each_stretch():
    from moerun.breakdown import cut_points

    points, labels = cut_points(["attention", "attention", "embedding", "norm", "norm", "attention", "head"])
    assert points == [0, 1, 2, 4, 5, 6]
    assert labels == ["other", "attention", "embedding", "norm", "attention", "head"]


def test_onnx_prefix_models_compute_what_the_full_graph_does(ort_model):
    """A pruned session's cut output equals the full graph's tensor there; the last cut's
    is the full model's logits, and it keeps the present KV outputs."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from moerun.backends.onnxruntime.cut import elem_types, prefix_model

    spec, art = ort_model
    model = onnx.load(str(art.path))
    types = elem_types(model)
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    feeds = {"input_ids": np.array([[3, 1, 4, 1, 5]], np.int64), "logits_from": np.array([4], np.int64),
             **{f"past_{kv}_{i}": empty for i in range(spec.num_layers) for kv in ("key", "value")}}
    full = ort.InferenceSession(str(art.path), providers=["CPUExecutionProvider"])
    logits = full.run(["logits"], feeds)[0]
    names = [n.name for n in model.graph.node]
    last = prefix_model(model, len(names) - 1, types)
    assert [o.name for o in last.graph.output][0] == "logits"
    assert {o.name for o in last.graph.output} == {o.name for o in model.graph.output}
    got = ort.InferenceSession(last.SerializeToString(), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, logits, atol=1e-5)
    j = next(i for i, n in enumerate(names) if n.startswith("router:"))
    early = prefix_model(model, j, types)
    assert len(early.graph.node) < len(names) // 2 and {o.name for o in early.graph.output} == {
        model.graph.node[j].output[0], "present_key_0", "present_value_0"}
    out = ort.InferenceSession(early.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert out.shape[-1] == spec.num_experts and np.isfinite(out).all()


def test_onnxruntime_breakdown_instruments(plugins, cache, ort_model):
    from moerun import ConfigError, LoadSettings, token_ids

    spec, art = ort_model
    b = plugins.backends.get("onnxruntime-contrib")()
    ids = token_ids(spec.vocab_size, 12, seed=1)
    raw = b.load(art, LoadSettings(max_context=32)).breakdown(ids[:8], ids[8:])
    assert raw["instrument"].startswith("cut timing") and raw["decode"]["experts"] > 0
    assert raw["detail"]["decode"]["thread_pool"] == "process-wide" and raw["decode_plain_s"] > 0
    raw = b.load(art, LoadSettings(max_context=32, options={"breakdown": "profile"})).breakdown(ids[:8], ids[8:])
    assert raw["instrument"].startswith("onnxruntime session profiling") and raw["decode"]["experts"] > 0
    with pytest.raises(ConfigError, match="option breakdown must be one of 'cut', 'profile', got 'sampling'"):
        type(b).check_options({"breakdown": "sampling"})
