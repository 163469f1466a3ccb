"""Why the MoE is behind: the ablation ladder's twins (split, fixed route) on the real
engines, the operations each engine's decode step runs, the ladder's arithmetic over lockstep
cycles, the dispatch term of `moerun predict`, and the commands (moerun.ladder)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import run_cli
from moerun import LoadSettings, synthetic_checkpoint, teacher_forced_logits, token_ids
from moerun.errors import ConfigError
from moerun.ladder import graph_ops, ladders, proxy_spec
from moerun.predict import HARDWARE, predict, with_dispatch
from moerun.records import PointResult
from moerun.spec import ModelSpec

ENGINES = {"llamacpp": "f32", "onnxruntime": "fp32", "onnxruntime-contrib": "fp32", "torch": "fp32"}
EXACT = {"llamacpp": {"type_k": "f32", "type_v": "f32", "flash_attn": False}}


@pytest.fixture
def opened():
    """Sessions a test opens, closed after it: an engine file left mapped in this process
    would stay in the page cache where a later capped test must evict it."""
    sessions = []
    yield sessions
    for s in sessions:
        s.close()


def _session(plugins, cache, backend, spec, opened, precision=None, exact=True):
    engine = plugins.backends.get(backend)()
    if not engine.availability().available:
        pytest.skip(f"{backend} is not available here")
    ck = synthetic_checkpoint(spec, cache, seed=0)
    artifact = engine.prepare(ck, precision or engine.capabilities.default_precision, cache)
    opened.append(engine.load(artifact, LoadSettings(max_context=64, options=EXACT.get(backend, {}) if exact else {})))
    return opened[-1]


def test_the_ladder_twins_are_the_moe_with_one_thing_changed(plugins):
    moe = plugins.models.resolve("small-moe")
    split, fixed = plugins.models.resolve("small-moe:split"), plugins.models.resolve("small-moe:fixed-route")
    active = plugins.models.resolve("small-moe:dense-active")
    # split: k experts of the expert shape, all on, no router; the active twin's bytes within 1 %
    assert (split.num_experts, split.top_k, split.router) == (moe.top_k, moe.top_k, "none")
    assert split.intermediate_size == moe.intermediate_size
    assert not any(name.endswith("gate.weight") for name, _ in split.tensor_shapes())
    assert abs(split.weight_bytes_per_token() / active.weight_bytes_per_token() - 1) < 0.01
    # fixed route: every tensor of the MoE, the same bytes per token; only the router's values differ
    assert list(fixed.tensor_shapes()) == list(moe.tensor_shapes()) and fixed.router == "fixed"
    assert fixed.weight_bytes_per_token() == moe.weight_bytes_per_token()
    # a default router leaves the fingerprint (the cache key of every earlier checkpoint) as it was
    d = moe.to_dict()
    d.pop("name"), d.pop("router")
    import hashlib

    assert moe.fingerprint == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert len({moe.fingerprint, split.fingerprint, fixed.fingerprint}) == 3
    # the spec round-trips through config.json
    assert ModelSpec.from_hf_config(fixed.to_hf_config()).router == "fixed"
    for bad in (dict(router="none"), dict(router="sometimes")):
        with pytest.raises(ConfigError):
            ModelSpec(**{**moe.to_dict(), **bad})
    with pytest.raises(ConfigError, match="dense"):
        plugins.models.resolve("tiny-dense:split")


def test_a_fixed_route_checkpoint_ranks_experts_by_a_constant_dimension(plugins, cache):
    spec = plugins.models.resolve("tiny-moe:fixed-route")
    ck, learned = (synthetic_checkpoint(s, cache, seed=0) for s in (spec, plugins.models.resolve("tiny-moe")))
    router = ck.read("model.layers.0.block_sparse_moe.gate.weight")
    # the last dimension ranks experts 0..k-1 first, every weight distinct and none zero
    assert list(np.argsort(-router[:, -1])) == list(range(spec.num_experts))
    assert (router[:2, -1] > 0).all() and (router[2:, -1] < 0).all() and router.all()
    assert (ck.read("model.embed_tokens.weight")[:, -1] == 2.0).all()
    # the experts are the MoE's own
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    assert np.array_equal(ck.read(name), learned.read(name))


@pytest.mark.parametrize("backend", ["llamacpp", "onnxruntime", "onnxruntime-contrib"])
@pytest.mark.parametrize("rung", ["split", "fixed-route"])
def test_the_ladder_rungs_compute_the_same_function_on_every_engine(plugins, cache, backend, rung, opened):
    """llama.cpp has no router-free expert FFN: its split twin routes over k of k with a zero
    router (weights 1/k), ONNX Runtime's contrib op takes zero logits, the others sum the
    experts / k; the fixed route's weights rank experts 0..k-1 first on every engine. The
    same function everywhere: logits agree with torch fp32's."""
    spec = plugins.models.resolve(f"tiny-olmoe:{rung}")
    ids = token_ids(spec.vocab_size, 20, seed=3)
    ref = teacher_forced_logits(_session(plugins, cache, "torch", spec, opened, "fp32"), ids, 12)
    got = teacher_forced_logits(_session(plugins, cache, backend, spec, opened, ENGINES[backend]), ids, 12)
    diff = np.abs(got - ref).max()
    print(f"{backend} {rung} against torch fp32: max abs diff {diff:.2e}")
    assert diff < 1e-3 and (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("backend", ["llamacpp", "torch"])
def test_a_fixed_route_picks_experts_0_to_k_for_every_token(plugins, cache, backend, opened):
    spec = plugins.models.resolve("tiny-moe:fixed-route")
    session = _session(plugins, cache, backend, spec, opened)
    ids = token_ids(spec.vocab_size, 24, seed=5)
    chosen = np.asarray(session.observe_routing(ids[:16], ids[16:]))  # [tokens, layers, k]
    assert {tuple(sorted(row)) for row in chosen.reshape(-1, spec.top_k)} == {(0, 1)}
    moe = _session(plugins, cache, backend, plugins.models.resolve("tiny-moe"), opened)
    learned = np.asarray(moe.observe_routing(ids[:16], ids[16:]))
    assert len({tuple(sorted(row)) for row in learned[:, 0]}) > 1  # the MoE's own routing changes


@pytest.mark.parametrize("backend", list(ENGINES))
def test_each_engine_counts_the_operations_of_a_decode_step(plugins, cache, backend, opened):
    ops = {}
    for name in ("tiny-moe", "tiny-moe:dense-active", "tiny-moe:split"):
        session = _session(plugins, cache, backend, plugins.models.resolve(name), opened)
        got = session.decode_ops(token_ids(512, 8, 0))
        assert got["ops"] > 0 and sum(got["by_op"].values()) >= got["ops"] and got["unit"]
        ops[name] = got["ops"]
    print(backend, ops)
    # an expert FFN runs more operations than the dense FFN of the same bytes, on every engine
    assert ops["tiny-moe:split"] > ops["tiny-moe:dense-active"]
    assert ops["tiny-moe"] > ops["tiny-moe:dense-active"]


def test_a_proxy_graph_has_the_real_models_operations(plugins, cache, opened):
    """predict counts a large model's operations on a proxy of small widths: on llama.cpp
    the proxy's decode graph is the real one's, node for node."""
    spec = plugins.models.resolve("small-moe")
    # the engine's default settings, as predict's count has them (without flash attention
    # llama.cpp's attention is three more nodes a layer)
    real = _session(plugins, cache, "llamacpp", spec, opened, "f16", exact=False).decode_ops(
        token_ids(spec.vocab_size, 8, 0))
    proxy = graph_ops(plugins, spec, "llamacpp")
    assert proxy["available"] and proxy["ops"] == real["ops"] and proxy["by_op"] == real["by_op"]
    assert proxy_spec(spec).num_layers == spec.num_layers and proxy_spec(spec).hidden_size == 64
    olmoe, llama = (graph_ops(plugins, plugins.models.resolve(m), "llamacpp")["ops"]
                    for m in ("olmoe-1b-7b", "llama-3.2-1b"))
    assert olmoe > llama  # 16 layers each: the MoE block runs more operations than the dense FFN


# ---------------------------------------------------------------- the ladder's arithmetic
def _record(role, model, rates, session="s1", rnd=0, ops=None):
    """A folded record of one side of a lockstep restart with per-cycle rates."""
    rounds = [{"round": rnd, "status": "ok", "decode_tok_s": float(np.mean(rates)),
               "lockstep": {"session": session, "decode_tok_s": list(rates)}}]
    return {"key": model, "status": "ok", "model_name": model, "backend": "llamacpp", "precision": "f16",
            "role": role, "group": "m", "point": {"model": model, "backend": "llamacpp", "precision": "f16"},
            "rounds": rounds, "metrics": {"decode_tok_s": float(np.mean(rates))},
            "ops": {"available": True, "ops": ops, "unit": "nodes"} if ops else {}}


def test_the_steps_add_up_to_the_gap_with_intervals():
    rng = np.random.default_rng(0)
    base = {"dense-active": 1000.0, "split": 1100.0, "fixed-route": 1150.0, "moe": 1400.0}  # us per token
    ops = {"dense-active": 120, "split": 170, "fixed-route": 180, "moe": 180}
    noise = rng.normal(1.0, 0.01, 16)  # drift every side shares in a cycle
    records = [_record(role, f"m:{role}" if role != "moe" else "m", 1e6 / (us * noise), ops=ops[role])
               for role, us in base.items()]
    (row,) = ladders([PointResult.of(r) for r in records])
    dec = row["decode"]
    assert dec["gap_us"] == pytest.approx(sum(s["us"] for s in dec["steps"]))
    assert sum(s["share"] for s in dec["steps"]) == pytest.approx(1.0)
    expected = {"shape": 100.0, "routing": 50.0, "sparsity": 250.0}
    for st in dec["steps"]:
        # drift multiplies every side alike: the step is the true one times the mean drift
        assert st["us"] == pytest.approx(expected[st["step"]] * noise.mean(), rel=1e-9)
        assert st["us_ci95"][0] <= st["us"] <= st["us_ci95"][1]
    d = row["dispatch"]
    assert d["available"] and d["added_ops"] == 50
    assert d["us_per_op"] == pytest.approx(100.0 * noise.mean() / 50)
    # without the split twin there is no shape step and no dispatch figure, and the rest still adds up
    (row,) = ladders([PointResult.of(r) for r in records if r["role"] != "split"])
    assert [s["step"] for s in row["decode"]["steps"]] == ["dense-active->fixed-route", "sparsity"]
    assert not row["dispatch"]["available"]
    # a comparison without its active twin is no ladder
    assert ladders([PointResult.of(r) for r in records if r["role"] != "dense-active"]) == []


# ---------------------------------------------------------------- predict with dispatch
def test_dispatch_adds_operations_times_the_device_cost():
    hw = HARDWARE["apple-m2-pro-16gb"]
    llama = ModelSpec(name="x", family="llama", vocab_size=1000, hidden_size=256, num_layers=4, num_heads=4,
                      num_kv_heads=4, head_dim=64, intermediate_size=512)
    plain = predict(llama, hw, precision="q4_k_m")
    assert plain["dispatch"]["applied"] is False and plain["decode_tok_s"] == plain["roofline_decode_tok_s"]
    got = predict(llama, hw, precision="q4_k_m", ops=300)
    step = 1 / got["roofline_decode_tok_s"] + 300 * hw.dispatch_s
    assert got["decode_tok_s"] == pytest.approx(1 / step)
    lo, hi = got["decode_tok_s_range"]
    assert lo <= got["decode_tok_s"] <= hi < got["roofline_decode_tok_s"]
    assert got["dispatch"]["share"] == pytest.approx(300 * hw.dispatch_s / step)
    # a batch pays the step's operations once for all its sequences
    b8 = predict(llama, hw, precision="q4_k_m", ops=300, batch=8)
    assert 8 / b8["decode_tok_s"] == pytest.approx(8 / b8["roofline_decode_tok_s"] + 300 * hw.dispatch_s)
    assert with_dispatch({"decode_tok_s": None, "batch_size": 1}, hw, 300)["roofline_decode_tok_s"] is None
    # every profile that carries a dispatch figure names its source and a range around it
    for h in HARDWARE.values():
        if h.dispatch_s:
            assert h.dispatch_source and h.dispatch_range_s[0] <= h.dispatch_s <= h.dispatch_range_s[1]


def test_predict_prints_before_and_after_next_to_the_published_ratio():
    out = run_cli("predict", "-m", "olmoe-1b-7b", "--hardware", "jetson-orin-nano-8gb", "--dense", "llama-3.2-1b")
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("MoE / llama-3.2-1b"))
    assert "roofline" in line and "with dispatch" in line and "published 0.69x" in line
    rows = json.loads(run_cli("predict", "-m", "olmoe-1b-7b", "--hardware", "apple-m2-pro-16gb", "--dense",
                              "llama-3.2-1b", "--json").stdout)
    moe, llama = rows[0], rows[-1]
    assert moe["dispatch"]["applied"] and moe["dispatch"]["ops_per_step"] > llama["dispatch"]["ops_per_step"]
    assert moe["decode_tok_s"] < moe["roofline_decode_tok_s"]
    assert llama["published_ratio"]["ratio"] == 0.90
    off = json.loads(run_cli("predict", "-m", "olmoe-1b-7b", "--hardware", "apple-m2-pro-16gb", "--dispatch", "off",
                             "--json").stdout)
    assert not off[0]["dispatch"]["applied"] and off[0]["decode_tok_s"] == off[0]["roofline_decode_tok_s"]
    bad = run_cli("predict", "-m", "olmoe-1b-7b", "--hardware", "apple-m2-pro-16gb", "--dense", "tiny-moe")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "MoE" in bad.stderr


# ---------------------------------------------------------------- the commands, end to end
def test_a_ladder_run_is_explained(tmp_path):
    results = tmp_path / "ladder.jsonl"
    out = run_cli("-m", "tiny-moe", "--ladder", "--no-twins", "-b", "llamacpp", "--new-tokens", "8",
                  "--prompt-tokens", "16", "--min-rounds", "2", "--max-rounds", "2", "-o", str(results))
    assert out.returncode == 0, out.stderr[-2000:]
    roles = {json.loads(line)["role"] for line in results.read_text().splitlines()}
    assert roles == {"moe", "dense-active", "split", "fixed-route"}
    text = run_cli("explain", str(results))
    assert text.returncode == 0, text.stderr[-2000:]
    for words in ("shape & dispatch", "routing", "sparsity", "us per operation", "operations per decode step"):
        assert words in text.stdout
    (row,) = json.loads(run_cli("explain", str(results), "--json").stdout)
    dec = row["decode"]
    assert dec["restarts"] == 2 and dec["gap_us_ci95"] and math.isfinite(dec["gap_us"])
    assert dec["gap_us"] == pytest.approx(sum(s["us"] for s in dec["steps"]))
    assert [r["ops"] for r in row["rungs"]][1] > [r["ops"] for r in row["rungs"]][0]  # split > active
    report = run_cli("report", str(results), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stderr[-2000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "ablation ladder" in md and (tmp_path / "report" / "ladder.png").is_file()
    # results without a ladder: one line, exit 2
    plain = tmp_path / "plain.jsonl"
    run_cli("-m", "tiny-moe", "--no-twins", "-b", "llamacpp", "--new-tokens", "2", "--repetitions", "1",
            "--min-rounds", "1", "--max-rounds", "1", "-o", str(plain))
    bad = run_cli("explain", str(plain))
    assert bad.returncode == 2 and "--ladder" in bad.stderr and bad.stderr.strip().count("\n") == 0


def test_the_dispatch_probe_counts_and_times_two_graphs():
    out = run_cli("dispatch", "-b", "llamacpp", "-m", "tiny-moe", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert [r["spec"] for r in rows] == ["tiny-moe", "tiny-moe:dense-active"]
    for r in rows:
        assert r["available"] and r["ops"][1] > r["ops"][0] and all(t > 0 for t in r["step_us"])
        assert math.isfinite(r["us_per_op"]) and r["us_per_op_range"][0] <= r["us_per_op"] <= r["us_per_op_range"][1]
