"""Batches of sequences and the iso-memory twin, on the real engines.

A batched step must compute exactly what each sequence computes alone (its own KV cache
row, its own positions), the union of experts it touches must be what the routing says,
and the iso-memory twin must hold the MoE's bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import onnxruntime_with_formulation, run_cli
from moerun import LoadSettings
from moerun.checkpoint import synthetic_checkpoint
from moerun.point import Point, batch_token_ids, token_ids
from moerun.runner import measure

B, PROMPT, NEW = 3, 9, 4
# max |logit difference| between a batched step and the same sequence alone: torch and
# ONNX Runtime run the same fp32 kernels on other row counts; llama.cpp keeps K/V in f16 and
# picks other kernels for several rows
TOLERANCE = {"torch": 1e-4, "onnxruntime": 1e-4, "onnxruntime-contrib": 1e-4, "llamacpp": 5e-3}


def _backend(plugins, name):
    if name == "onnxruntime-grouped":  # the grouped formulation at tiny expert sizes
        return onnxruntime_with_formulation("grouped")
    return plugins.backends.get(name)()


@pytest.mark.parametrize("model", ["tiny-moe", "tiny-olmoe", "tiny-qwen2-moe", "tiny-dense"])
@pytest.mark.parametrize("name", ["torch", "llamacpp", "onnxruntime", "onnxruntime-contrib", "onnxruntime-grouped"])
def test_a_batched_step_computes_what_each_sequence_computes_alone(plugins, cache, name, model):
    backend = _backend(plugins, name)
    spec = plugins.models.resolve(model)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    artifact = backend.prepare(ck, "f32" if name == "llamacpp" else "fp32", cache)
    seqs = batch_token_ids(spec.vocab_size, PROMPT + NEW, 0, B)
    assert seqs[0] == token_ids(spec.vocab_size, PROMPT + NEW, 0)  # batch 1 is the old workload
    assert len({tuple(s) for s in seqs}) == B
    with backend.load(artifact, LoadSettings(max_context=PROMPT + NEW, batch_size=B)) as s:
        s.reset()
        got = [s.prefill_batch([q[:PROMPT] for q in seqs])]
        got += [s.decode_batch([q[PROMPT + j] for q in seqs]) for j in range(NEW)]
        got = np.stack(got, axis=1)  # [B, 1 + NEW, vocab]
        # the same session runs a lone sequence after a reset, and another batch after that
        s.reset()
        lone_in_batched = s.prefill(seqs[1][:PROMPT])[-1]
        s.reset()
        again = s.prefill_batch([q[:PROMPT] for q in seqs])
    with backend.load(artifact, LoadSettings(max_context=PROMPT + NEW)) as alone:
        want = []
        for q in seqs:
            alone.reset()
            rows = [alone.prefill(q[:PROMPT])[-1]] + [alone.decode(t) for t in q[PROMPT:]]
            want.append(np.stack(rows))
    want = np.stack(want)
    tol = TOLERANCE.get(name, 1e-4) * max(1.0, float(np.abs(want).max()))
    assert got.shape == want.shape == (B, 1 + NEW, spec.vocab_size)
    assert np.abs(got - want).max() <= tol, f"{name} {model}: max diff {np.abs(got - want).max():.2e}"
    assert np.abs(lone_in_batched - want[1, 0]).max() <= tol
    assert np.abs(again - got[:, 0]).max() <= tol
    # the sequences really differ (else the comparison above proves little)
    assert np.abs(want[0] - want[1]).max() > 100 * tol


def test_batched_steps_refuse_what_the_session_was_not_made_for(plugins, cache):
    from moerun.errors import ConfigError

    spec = plugins.models.resolve("tiny-moe")
    ck = synthetic_checkpoint(spec, cache, seed=0)
    for name in ("torch", "llamacpp", "onnxruntime"):
        backend = plugins.backends.get(name)()
        artifact = backend.prepare(ck, backend.capabilities.default_precision, cache)
        with backend.load(artifact, LoadSettings(max_context=8, batch_size=2)) as s:
            with pytest.raises(ConfigError, match="batch size|sequences"):
                s.prefill_batch([[1, 2], [3, 4], [5, 6]])
            s.reset()
            with pytest.raises(ConfigError, match="one length|same count"):
                s.prefill_batch([[1, 2], [3]])


def test_a_backend_without_batching_reports_unsupported(plugins, cache):
    example = pytest.importorskip("moerun_example_backend.backend")  # a third-party backend that never batches
    plugins.backends.add(example.NumpyBackend)
    point = Point(model="tiny-moe", backend="numpy", batch_size=2, repetitions=1, prompt_tokens=4, new_tokens=2)
    result = measure(point, plugins, cache)
    assert result["status"] == "unsupported"
    assert "at most 1 sequence together (batch size 2" in result["error"]


def test_batch_points_measure_aggregate_rates_and_the_experts_they_touch(plugins, cache):
    """torch exposes routing: the distinct experts per step and layer are counted in an
    untimed pass; one sequence touches exactly top-k, a batch the union, never more than
    min(E, B*k), and MBU divides the bytes of that union."""
    spec = plugins.models.resolve("tiny-olmoe")  # 16 experts, top-4
    common = dict(model="tiny-olmoe", backend="torch", prompt_tokens=8, new_tokens=6, repetitions=2, warmup=0)
    one = measure(Point(**common), plugins, cache)
    four = measure(Point(batch_size=4, **common), plugins, cache)
    assert one["status"] == four["status"] == "ok", (one.get("error"), four.get("error"))
    c1, c4 = one["metrics"]["expert_coverage"], four["metrics"]["expert_coverage"]
    assert c1["experts_per_step_min"] == c1["experts_per_step_max"] == spec.top_k
    assert c4["batch_size"] == 4 and c4["steps"] == 6
    assert spec.top_k < c4["experts_per_step_mean"] <= min(spec.num_experts, 4 * spec.top_k)
    assert c4["uniform_expectation"] == pytest.approx(16 * (1 - (1 - 4 / 16) ** 4))
    m4 = four["metrics"]
    assert m4["experts_touched_source"] == "measured"
    assert m4["weight_bytes_per_step"] == pytest.approx(
        spec.weight_bytes_per_step("fp32", 4, c4["experts_per_step_mean"]))
    assert m4["decode_tok_s"] == pytest.approx(4 * m4["decode_seq_tok_s"], rel=0.05)
    t4 = four["timings"]
    assert t4["batch_size"] == 4 and len(t4["decode_tok_s_reps"]) == 2
    assert four["point"]["batch_size"] == 4 and Point(**common).key == Point(batch_size=1, **common).key
    assert Point(batch_size=4, **common).key != Point(**common).key


def test_expected_union_and_bytes_per_step(plugins):
    spec = plugins.models.resolve("olmoe-1b-7b")
    assert spec.experts_touched(1) == pytest.approx(8)
    assert spec.experts_touched(8) == pytest.approx(64 * (1 - (56 / 64) ** 8))
    assert spec.weight_bytes_per_step("q4_k_m", 1) == spec.weight_bytes_per_token("q4_k_m")
    # every expert touched: the step reads what the total-matched twin reads, give or take
    # the router and the twin's FFN rounding
    everything = spec.weight_bytes_per_step("q4_k_m", 1, experts_touched=64)
    assert everything == pytest.approx(spec.dense_twin("total").weight_bytes_per_token("q4_k_m"), rel=0.01)
    dense = plugins.models.resolve("llama-3.2-1b")
    assert dense.weight_bytes_per_step("q4_k_m", 8) == dense.weight_bytes_per_token("q4_k_m")


@pytest.mark.parametrize("model,p,q", [("olmoe-1b-7b", "q4_k_m", "q3_k_m"), ("small-moe", "fp32", "bf16"),
                                       ("small-moe", "fp32", "int8"), ("tiny-moe", "f16", "q8_0")])
def test_the_isomem_twin_holds_the_moes_bytes_at_the_harder_precision(plugins, model, p, q):
    from moerun.precision import get_precision

    moe = plugins.models.resolve(model)
    twin = plugins.models.resolve(f"{model}:dense-isomem-{p}-{q}")
    assert not twin.is_moe and twin.num_layers == moe.num_layers and twin.hidden_size == moe.hidden_size
    moe_bytes = moe.total_params * get_precision(p).bits_per_weight / 8
    twin_bytes = twin.total_params * get_precision(q).bits_per_weight / 8
    assert twin_bytes == pytest.approx(moe_bytes, rel=0.01)
    assert twin.total_params > moe.total_params  # more parameters, quantised harder


def test_the_study_adds_an_isomem_point_at_the_harder_precision(plugins):
    from moerun.grid import grid_points
    from moerun.studyfile import StudySpec

    points = grid_points(plugins, StudySpec(models=["small-moe"], batch_sizes=[1, 4]),
                         ["llamacpp", "torch", "tensorrt"])
    iso = [p for p in points if p.role == "dense-isomem"]
    got = {(p.backend, p.batch_size): (p.model, p.precision) for p in iso}
    assert got == {("llamacpp", 1): ("small-moe:dense-isomem-f16-q8_0", "q8_0"),
                   ("llamacpp", 4): ("small-moe:dense-isomem-f16-q8_0", "q8_0"),
                   ("torch", 1): ("small-moe:dense-isomem-fp32-bf16", "bf16"),
                   ("torch", 4): ("small-moe:dense-isomem-fp32-bf16", "bf16")}  # TensorRT: nothing below fp16
    assert all(p.parity for p in points if p.role in ("moe", "dense-isomem") and p.backend != "tensorrt")
    assert not any(p.parity for p in points if p.backend == "tensorrt")  # no twin: parity stays as asked
    assert {p.batch_size for p in points} == {1, 4}
    plain = grid_points(plugins, StudySpec(models=["small-moe"], isomem=False), ["torch"])
    assert [p.role for p in plain] == ["moe", "dense-active", "dense-total"]
    # a twin named on its own keeps its role in its MoE's group (pairs in the verdicts)
    named = grid_points(plugins, StudySpec(models=["small-moe", "small-moe:dense-active"], twins=False), ["torch"])
    assert [(p.role, p.group) for p in named] == [("moe", "small-moe"), ("dense-active", "small-moe")]


def test_a_twin_named_on_its_own_pairs_with_its_moe(tmp_path):
    """`-m NAME -m NAME:dense-active --no-twins` (skip the total twin) still gives the verdict."""
    r = run_cli("-b", "torch", "-m", "tiny-moe", "-m", "tiny-moe:dense-active", "--no-twins", "--prompt-tokens", "4",
                "--new-tokens", "2", "--repetitions", "1", "--min-rounds", "1", "--max-rounds", "1",
                "-o", str(tmp_path / "r.jsonl"), "--json", "-q")
    assert r.returncode == 0, r.stderr
    (v,) = json.loads(r.stdout)["verdicts"]
    assert v["decode_vs_active"] > 0 and v.get("decode_vs_total") is None


def test_verdicts_pair_the_isomem_twin_and_keep_batch_sizes_apart(tmp_path):
    """A study over two batch sizes with the iso-memory twin, through the real CLI: one verdict
    row per batch size, each with its iso-memory ratio and both sides' parity, and the
    Markdown report carries the iso-memory and coverage tables and the batch figure."""
    out = tmp_path / "r.jsonl"
    r = run_cli("-b", "torch", "-m", "tiny-moe", "--batch-size", "1,3", "--prompt-tokens", "8", "--new-tokens", "4",
                "--repetitions", "2", "--min-rounds", "1", "--max-rounds", "1", "-o", str(out), "--json", "-q")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    rows = sorted(doc["verdicts"], key=lambda v: v["batch_size"])
    assert [v["batch_size"] for v in rows] == [1, 3]
    for v in rows:
        assert v["decode_vs_isomem"] > 0 and v["decode_vs_active"] > 0
        iso = v["isomem"]
        assert iso["model"] == "tiny-moe:dense-isomem-fp32-bf16" and iso["precision"] == "bf16"
        assert iso["parity"]["available"] and iso["moe_parity"]["available"]
        assert iso["moe_parity"]["max_abs_diff"] < 1e-4 < iso["parity"]["max_abs_diff"]  # bf16 costs accuracy
        assert 0.95 < iso["bytes_ratio"] < 1.05
    report = tmp_path / "report"
    r = run_cli("report", str(out), "--out", str(report))
    assert r.returncode == 0, r.stderr
    text = (report / "report.md").read_text()
    assert "## Iso-memory" in text and "dense-isomem-fp32-bf16" in text
    assert "## Experts touched per decode step" in text
    assert (report / "decode-batch.png").stat().st_size > 10_000


def test_batch_size_errors_are_one_line(tmp_path):
    r = run_cli("-b", "torch", "-m", "tiny-moe", "--batch-size", "0")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "batch size must be a whole number >= 1, got '0'" in r.stderr
    study = tmp_path / "s.toml"
    study.write_text('[study]\nmodels = ["tiny-moe"]\nbatch_sizes = []\n')
    r = run_cli("study", str(study), "-b", "torch")
    assert r.returncode == 2 and "batch_sizes must list whole numbers >= 1" in r.stderr


def test_predict_reads_the_union_and_prints_the_crossover(plugins):
    from moerun.predict import crossover, get_hardware, predict

    spec, hw = plugins.models.resolve("olmoe-1b-7b"), get_hardware("jetson-orin-nano-8gb")
    one, eight = (predict(spec, hw, precision="q4_k_m", batch=b) for b in (1, 8))
    assert eight["bytes_per_step"] == pytest.approx(spec.weight_bytes_per_step("q4_k_m", 8)
                                                    + 8 * spec.kv_bytes_per_token(512, 2.0))
    assert eight["decode_tok_s"] < 8 * one["decode_tok_s"]  # the union costs: not 8x
    cross = crossover(spec, hw, precision="q4_k_m")
    assert cross["batch"] == 16 and cross["ratio"] < 1.1
    r = run_cli("predict", "--hardware", "jetson-orin-nano-8gb", "--model", "olmoe-1b-7b", "--precision", "q4_k_m",
                "--batch-size", "1,8")
    assert r.returncode == 0, r.stderr
    assert "batch 8 (MoE: 42.0 of 64 experts" in r.stdout and "crossover: from batch 16" in r.stdout
