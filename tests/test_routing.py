"""Routing models (moerun.routing): requested, planted in the weights and token ids, and
measured on the real engines; traces recorded from a checkpoint folder and replayed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from moerun import LoadSettings
from moerun.checkpoint import Checkpoint, synthetic_checkpoint, write_synthetic
from moerun.comparison import point_key
from moerun.errors import ConfigError
from moerun.point import Point, batch_token_ids
from moerun.predict import expected_touched
from moerun.routing import CodeLayout, Model, Routing, Trace, measure, plan_for, reuse, stream_ids
from moerun.runner import measure as measure_point
from moerun.spec import ModelSpec


# ------------------------------------------------------------------ the models
@pytest.mark.parametrize("text, message", [
    ("zipff:1", "use one of random, uniform, zipf:ALPHA"),
    ("zipf:x", "zipf needs a number"),
    ("sticky:1.0", "the sticky probability must be in [0, 1)"),
    ("uniform:2", "routing uniform takes no parameter"),
    ("trace:/no/such.npz", "does not exist"),
])
def test_a_bad_routing_is_a_one_line_config_error(text, message):
    with pytest.raises(ConfigError, match=None) as err:
        Routing.parse(text)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_one_spelling_per_routing_and_random_keeps_old_keys():
    assert Point(model="m", backend="torch", routing="zipf:1.0").routing == "zipf:1"
    plain = Point(model="m", backend="torch")
    assert plain.routing == "random"
    old = [json.loads(line) for line in (Path(__file__).parent / "data" / "results-e37cb20.jsonl").open()]
    assert all(Point.from_dict(r["point"]).key == r["key"] for r in old if r.get("point"))  # resumable
    assert Point(model="m", backend="torch", routing="random").key == plain.key
    assert Point(model="m", backend="torch", routing="uniform").key != plain.key
    a, b = (Point(model="m", backend="torch", routing=r) for r in ("uniform", "sticky:0.5"))
    assert point_key(a) != point_key(b)  # sides measured under different routings are not compared


def test_zipf_inclusion_is_capped_and_the_sampler_meets_it():
    m = Model.of(Routing.parse("zipf:1.2"), 3, 16, 4, seed=3)
    pi = m.inclusion()
    assert pi.shape == (3, 16) and np.allclose(pi.sum(axis=1), 4) and pi.max() <= 1 + 1e-12
    assert pi.max() == pytest.approx(1.0)  # rank 1 would be chosen more than once per token: capped
    s = m.sample(4, 3000)
    counts = np.stack([np.bincount(s[:, :, layer].reshape(-1), minlength=16) for layer in range(3)])
    assert np.abs(counts / (4 * 3000) - pi).max() < 0.02
    assert (np.sort(s, axis=-1)[..., 1:] != np.sort(s, axis=-1)[..., :-1]).all()  # k distinct experts


def test_sticky_reuse_and_unions_match_their_expectations():
    m = Model.of(Routing.parse("sticky:0.7"), 2, 16, 4, seed=0)
    seqs = list(m.sample(8, 2000))
    r = reuse(seqs)
    assert r["next_token"] == pytest.approx(m.expected_reuse(), abs=0.01)
    assert r["mean_distance"] < reuse(list(Model.of(Routing.parse("uniform"), 2, 16, 4).sample(8, 2000)))["mean_distance"]
    assert m.expected_reuse() > 0.7  # kept, or drawn again
    out = measure(seqs, m, source="test")
    for b in ("1", "2", "4", "8"):
        assert out["experts_per_step"][b]["measured"] == pytest.approx(out["experts_per_step"][b]["expected"], rel=0.03)
    u = Model.of(Routing.parse("uniform"), 2, 16, 4)
    spec = ModelSpec(name="x", family="mixtral", vocab_size=64, hidden_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, intermediate_size=32, num_experts=16, top_k=4)
    assert u.expected_union(8) == pytest.approx(spec.experts_touched(8))
    assert u.expected_reuse() == pytest.approx(4 / 16)
    z = Model.of(Routing.parse("zipf:1.0"), 2, 16, 4)
    assert z.expected_union(8) < u.expected_union(8)  # popular experts overlap
    assert z.miss_rate(4) < u.miss_rate(4) == pytest.approx(0.75)  # the 4 most popular hold more of the reads


def test_measure_puts_a_fresh_sample_at_the_floor_and_a_wrong_one_far_above():
    m = Model.of(Routing.parse("zipf:1.0"), 2, 16, 4, seed=1)
    own = measure(list(m.sample(8, 500, salt=7)), m, source="test")
    other = measure(list(Model.of(Routing.parse("uniform"), 2, 16, 4).sample(8, 500)), m, source="test")
    assert max(own["tv"]) < 2.5 * max(own["tv_sampling_floor"]) + 0.01
    assert own["expected_mean_distance"] == pytest.approx(own["reuse"]["mean_distance"], rel=0.1)
    assert min(other["tv"]) > 5 * max(own["tv_sampling_floor"])


def test_predict_takes_the_expected_union_from_the_routing(plugins):
    spec = plugins.models.resolve("olmoe-1b-7b")
    assert expected_touched(spec, 8, "random") == pytest.approx(spec.experts_touched(8))
    assert expected_touched(spec, 8, "uniform") == pytest.approx(spec.experts_touched(8))
    assert expected_touched(spec, 1, "zipf:1.0") == pytest.approx(8)
    assert expected_touched(spec, 8, "zipf:1.0") < 0.8 * spec.experts_touched(8)
    assert expected_touched(plugins.models.resolve("llama-3.2-1b"), 8, "zipf:1.0") is None


# ------------------------------------------------------------------ planted and observed
def test_dense_twins_walk_the_same_token_ids(plugins):
    moe, twin = plugins.models.resolve("tiny-olmoe"), plugins.models.resolve("tiny-olmoe:dense-active")
    assert moe.vocab_size == twin.vocab_size
    a = batch_token_ids(moe.vocab_size, 40, 0, 3, "sticky:0.8")
    assert a == batch_token_ids(twin.vocab_size, 40, 0, 3, "sticky:0.8") == stream_ids(moe.vocab_size, 0, 40, 3)
    assert len({t for seq in a for t in seq[:32]}) == 3 * 32  # distinct ids along the streams
    assert a != batch_token_ids(moe.vocab_size, 40, 0, 3)  # random routing: today's ids


@pytest.mark.parametrize("routing", ["uniform", "zipf:1.0", "sticky:0.8"])
def test_torch_and_llamacpp_choose_exactly_the_planted_experts(plugins, cache, routing):
    """Same weights, same ids, same experts on both engines (llama.cpp at q4_k_m), every token
    and layer; the dense twin's checkpoint does not depend on the routing."""
    spec = plugins.models.resolve("tiny-olmoe")
    ckpt = synthetic_checkpoint(spec, cache, routing=routing)
    plan = plan_for(spec, Routing.parse(routing))
    seqs = batch_token_ids(spec.vocab_size, 48, 0, 2, routing)
    want = [np.sort(plan.table[q], axis=-1) for q in seqs]
    seen = {}
    for name, precision in (("torch", "fp32"), ("llamacpp", "q4_k_m")):
        backend = plugins.backends.get(name)()
        session = backend.load(backend.prepare(ckpt, precision, cache), LoadSettings(max_context=128))
        try:
            seen[name] = [np.sort(session.observe_routing(q[:32], q[32:]), axis=-1) for q in seqs]
        finally:
            session.close()
        for got, w in zip(seen[name], want):
            assert got.shape == (48, spec.num_layers, spec.top_k)
            assert (got == w).all(), f"{name}: {(got != w).any(-1).mean():.1%} of token-layers off the plan"
    twin = plugins.models.resolve("tiny-olmoe:dense-active")
    assert synthetic_checkpoint(twin, cache, routing=routing).path == synthetic_checkpoint(twin, cache).path


def test_layers_beyond_the_code_reuse_a_block_through_a_permutation(tmp_path, plugins, cache):
    spec = ModelSpec(name="deep-moe", family="mixtral", vocab_size=256, hidden_size=64, num_layers=5, num_heads=4,
                     num_kv_heads=2, head_dim=16, intermediate_size=32, num_experts=16, top_k=2)
    layout = CodeLayout.of(spec.hidden_size, spec.num_layers, spec.num_experts)
    assert layout.blocks == 2 and layout.base == 32
    write_synthetic(spec, tmp_path / "ck", routing="zipf:1.0")
    ckpt = Checkpoint.open(tmp_path / "ck")
    plan = plan_for(spec, Routing.parse("zipf:1.0"))
    backend = plugins.backends.get("torch")()
    ids = batch_token_ids(spec.vocab_size, 24, 0, 1, "zipf:1.0")[0]
    with backend.load(backend.prepare(ckpt, "fp32", cache), LoadSettings(max_context=64)) as session:
        got = session.observe_routing(ids[:16], ids[16:])
    assert (np.sort(got, -1) == np.sort(plan.table[ids], -1)).all()
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["moerun_synthetic"]["routing"]["shared_blocks"]


def test_a_point_records_requested_against_measured_routing(plugins, cache):
    point = Point(model="tiny-olmoe", backend="llamacpp", precision="q8_0", prompt_tokens=24, new_tokens=8,
                  batch_size=2, repetitions=1, warmup=0, routing="zipf:1.0")
    result = measure_point(point, plugins, cache)
    assert result["status"] == "ok", result.get("error")
    g = result["routing"]
    assert g["planted_match"] == 1.0 and g["sequences"] == 8
    assert g["routed_token_layers"] == 8 * 32 * 2
    assert len(g["tv"]) == 2 and all(0 <= tv < 0.5 for tv in g["tv"])
    assert set(g["experts_per_step"]) == {"1", "2", "4", "8"}
    cov = result["metrics"]["expert_coverage"]
    assert cov["batch_size"] == 2 and cov["routing"] == "zipf:1"
    assert cov["expected"] == pytest.approx(Model.of(Routing.parse("zipf:1.0"), 2, 16, 4).expected_union(2))
    assert result["metrics"]["experts_touched_source"] == "measured"


# ------------------------------------------------------------------ traces and the command line
def test_a_trace_round_trips_and_a_wrong_shape_is_refused(tmp_path):
    experts = np.random.default_rng(0).integers(0, 16, size=(50, 2, 4))
    path = Trace(experts=experts, starts=np.array([0, 30]), num_experts=16, meta={"model": "x"}).save(tmp_path / "t")
    assert path.name == "t.npz"
    back = Trace.load(path)
    assert (back.experts == experts).all() and back.meta == {"model": "x"} and len(back.sequences()) == 2
    m = Model.of(Routing.parse(f"trace:{path}"), 2, 16, 4)
    planned, fresh = m.sample(2, 10), m.sample(2, 10, salt=5)
    assert (planned[0] == experts[:10]).all() and (planned[1] == experts[25:35]).all()  # evenly spaced stretches
    windows = {tuple(experts[(a + np.arange(10)) % 50].reshape(-1)) for a in range(50)}
    assert all(tuple(f.reshape(-1)) in windows for f in fresh) and not (fresh == planned).all()  # random stretches
    with pytest.raises(ConfigError, match="has 2 MoE layers x 16 experts, top-4; the model has 6 x 8, top-2"):
        Model.of(Routing.parse(f"trace:{path}"), 6, 8, 2)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a moerun routing trace"):
        Trace.load(tmp_path / "bad.npz")


def _hf_folder(tmp_path, plugins):
    """A checkpoint folder as a user has one: HF layout with a tokenizer.json (trained here on
    the project's docs: there is no model hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    spec = plugins.models.resolve("tiny-olmoe")
    folder = tmp_path / "hf-moe"
    write_synthetic(spec, folder)
    text = "\n\n".join(p.read_text() for p in sorted((Path(__file__).parents[1] / "docs").glob("*.md")))
    (tmp_path / "text.txt").write_text(text)
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([str(tmp_path / "text.txt")], trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=["[UNK]"]))
    tok.save(str(folder / "tokenizer.json"))
    return folder, tmp_path / "text.txt"


def test_record_a_trace_from_a_checkpoint_folder_and_replay_it(tmp_path, plugins):
    folder, text = _hf_folder(tmp_path, plugins)
    out = run_cli("routing", "record", "-m", str(folder), "--prompt-file", str(text), "-o", str(tmp_path / "trace"),
                  "--max-tokens", "64")
    assert out.returncode == 0, out.stderr
    trace = Trace.load(tmp_path / "trace.npz")
    assert trace.layers == 2 and trace.top_k == 4 and len(trace.experts) > 1000
    assert trace.meta["recorded_by"] == "moerun routing record" and trace.meta["prompt_file"] == "text.txt"
    shown = run_cli("routing", "show", str(tmp_path / "trace.npz"), "--json")
    assert shown.returncode == 0 and json.loads(shown.stdout)["tokens"] == len(trace.experts)
    res = tmp_path / "replay.jsonl"
    run = run_cli("-m", "tiny-olmoe", "-b", "torch", "--no-twins", "--routing", f"trace:{tmp_path / 'trace.npz'}",
                  "--prompt-tokens", "48", "--new-tokens", "16", "--repetitions", "1", "--min-rounds", "1",
                  "--max-rounds", "1", "-o", str(res), "--no-isolate")
    assert run.returncode == 0, run.stderr
    rec = next(json.loads(line) for line in res.read_text().splitlines() if json.loads(line).get("routing"))
    g = rec["routing"]
    assert g["planted_match"] == 1.0
    # the replay chose what the recording chose: its histogram sits at the sampling floor of
    # the recording's shares (the replay walks 8 x 64 of the trace's tokens)
    assert max(g["tv"]) < 2 * max(g["tv_sampling_floor"]) + 0.02
    spec = plugins.models.resolve("tiny-olmoe")
    plan = plan_for(spec, Routing.parse(f"trace:{tmp_path / 'trace.npz'}"))
    first = stream_ids(spec.vocab_size, 0, 64, 1)[0]  # stream 0 replays the trace from its start
    assert (plan.table[first] == trace.experts[:64]).all()
    recorded = np.stack([np.bincount(trace.experts[:, layer].reshape(-1), minlength=16) for layer in range(2)])
    assert np.allclose(g["requested_share"], recorded / (len(trace.experts) * 4))


@pytest.mark.parametrize("args, message", [
    (["--routing", "zipf"], "zipf needs a number"),
    (["--routing", "uniform", "-m", "{folder}"], "is planted in synthetic weights"),
    (["routing", "record", "-m", "{folder}", "-o", "t"], "needs --prompt-file F"),
    (["routing", "record", "-m", "tiny-olmoe", "-o", "t", "--token-ids", "x"], "reads a checkpoint folder"),
])
def test_routing_input_errors_are_one_line_and_exit_2(tmp_path, plugins, args, message):
    folder = tmp_path / "ck"
    write_synthetic(plugins.models.resolve("tiny-moe"), folder)
    args = [a.replace("{folder}", str(folder)) for a in args]
    out = run_cli(*args, "-b", "torch") if args[0] != "routing" else run_cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr


def test_a_trace_of_another_shape_fails_before_anything_is_prepared(tmp_path):
    path = Trace(experts=np.zeros((10, 3, 2), int), starts=np.array([0]), num_experts=8).save(tmp_path / "t")
    out = run_cli("-m", "tiny-olmoe", "-b", "torch", "--routing", f"trace:{path}", "-o", str(tmp_path / "r.jsonl"))
    assert out.returncode == 2 and "has 3 MoE layers x 8 experts, top-2; the model has 2 x 16, top-4" in out.stderr
    assert not (tmp_path / "r.jsonl").exists()
