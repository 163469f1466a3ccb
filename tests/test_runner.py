"""The runner and studies: timings, isolation (segfault, hang, exit), results files, resume."""

from __future__ import annotations

import json

import pytest

from moerun import Point, measure, run_isolated
from moerun.results import append_result, read_results
from moerun.grid import grid_points
from moerun.study import LocalExecutor, run_study
from moerun.studyfile import StudySpec
from moerun.records import point_results

ENV = {"bandwidth_bytes_s": 20e9}


def _point(**kw):
    base = dict(model="tiny-moe", backend="torch", prompt_tokens=16, new_tokens=8, repetitions=2, warmup=1)
    return Point(**{**base, **kw})


def test_measure_in_process_reports_timings_and_metrics(plugins, cache):
    r = measure(_point(), plugins, cache, ENV)
    assert r["status"] == "ok", r.get("error")
    t = r["timings"]
    assert t["prefill_ms"]["n"] == 2 and t["decode_token_ms"]["n"] == 16
    for key in ("median", "p90", "p99", "min", "max", "cv"):
        assert key in t["decode_token_ms"]
    assert t["decode_token_ms"]["min"] <= t["decode_token_ms"]["median"] <= t["decode_token_ms"]["max"]
    m = r["metrics"]
    spec_bytes = r["model"]["weight_bytes_per_token"]
    assert m["bytes_per_token"] > spec_bytes  # weights + KV cache
    assert m["achieved_bandwidth_bytes_s"] == pytest.approx(m["bytes_per_token"] * m["decode_tok_s"])
    assert m["mbu"] == pytest.approx(m["achieved_bandwidth_bytes_s"] / 20e9)
    counts = m["expert_counts"]
    # warm-up excluded: reset before the last repetition leaves one prefill + decode
    assert sum(counts[0]) == (16 + 8) * 2
    assert r["memory"]["peak_rss_bytes"] > 0
    assert r["precision"] == "fp32" and r["backend_version"]


def test_unsupported_and_unknown_are_statuses(plugins, cache):
    r = measure(_point(precision="q4_k_m"), plugins, cache, ENV)
    assert r["status"] == "unsupported" and "q4_k_m" in r["error"]
    r = measure(_point(model="no-such-model"), plugins, cache, ENV)
    assert r["status"] == "failed" and "unknown model preset" in r["error"]
    r = measure(_point(prompt_tokens=1000, new_tokens=100), plugins, cache, ENV)
    assert r["status"] == "failed" and "max_position_embeddings" in r["error"]


@pytest.mark.parametrize("mode, reason", [
    ("segfault", "crashed: segmentation fault (SIGSEGV)"),
    ("hang", "timed out after 8 s"),
    ("exit", "worker exited with code 3"),
    ("raise", "RuntimeError: engine exploded on purpose"),
])
def test_isolated_faults_become_failed_results(test_plugin_env, cache, mode, reason):
    test_plugin_env.setenv("MOERUN_PLUGINS", "moerun_fault")
    r = run_isolated(_point(backend="fault", options={"mode": mode}, timeout_s=8 if mode == "hang" else 60), cache=cache, env=ENV)
    assert r["status"] == "failed"
    assert reason in r["error"]
    json.dumps(r)  # serialisable as it is


def test_study_goes_on_after_crash_and_hang_and_resumes(test_plugin_env, tmp_path, cache):
    from moerun import get_plugin_manager

    test_plugin_env.setenv("MOERUN_PLUGINS", "moerun_fault")
    pm = get_plugin_manager(entrypoints=False)
    out = tmp_path / "study.jsonl"
    points = [
        _point(backend="fault", options={"mode": "segfault"}, timeout_s=30),
        _point(backend="fault", options={"mode": "hang"}, timeout_s=8),
        _point(backend="fault", options={"mode": "ok"}, timeout_s=120),
        _point(backend="torch", model="tiny-dense", timeout_s=120),
    ]
    ex = LocalExecutor(plugins=pm, cache=cache, env=ENV, isolate=True)
    results = run_study(points, pm, output=out, executor=ex).results
    assert [r.status for r in results] == ["failed", "failed", "ok", "ok"]
    assert "SIGSEGV" in results[0].error and "timed out" in results[1].error
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["key"] for line in lines)
    # resume: nothing reruns, nothing is appended twice
    started = []
    again = run_study(points, pm, output=out, executor=ex, on_start=lambda i, r, p: started.append(i)).results
    assert started == [] and all(r.record.get("resumed") for r in again)
    assert len(out.read_text().splitlines()) == 4


def test_torn_last_line_is_skipped_and_next_record_starts_clean(tmp_path):
    out = tmp_path / "r.jsonl"
    append_result(out, {"key": "a", "status": "ok"})
    with open(out, "a") as f:
        f.write('{"key": "b", "sta')  # a writer killed mid-line
    append_result(out, {"key": "c", "status": "ok"})
    with pytest.warns(UserWarning, match="incomplete record"):
        rows = read_results(out)
    assert [r["key"] for r in rows] == ["a", "c"]


def test_the_grid_adds_twins_and_rejects_unknown_precision(plugins):
    pts = grid_points(plugins, StudySpec(models=["tiny-moe"]), ["torch"])
    assert [(p.model, p.role) for p in pts] == [
        ("tiny-moe", "moe"), ("tiny-moe:dense-isomem-fp32-bf16", "dense-isomem"),
        ("tiny-moe:dense-active", "dense-active"), ("tiny-moe:dense-total", "dense-total")]
    assert len({p.key for p in pts}) == 4
    from moerun import ConfigError

    with pytest.raises(ConfigError, match="unknown precision"):
        grid_points(plugins, StudySpec(models=["tiny-moe"], precisions=["fp9"]), ["torch"])


def test_point_validation_and_round_trip():
    from moerun import ConfigError

    p = _point(options={"a": 1})
    assert Point.from_dict(p.to_dict()) == p and Point.from_dict(p.to_dict()).key == p.key
    with pytest.raises(ConfigError, match="prompt-tokens must be >= 1"):
        _point(prompt_tokens=0)
    with pytest.raises(ConfigError, match="unexpected|extra"):
        Point.from_dict({**p.to_dict(), "bogus": 1})


def test_parity_against_the_reference_is_measured_and_cached(plugins, cache):
    r = measure(_point(backend="llamacpp", precision="q8_0", parity=True), plugins, cache, ENV)
    p = r["parity"]
    assert p["available"] and p["positions"] == 16
    assert p["max_abs_diff"] > 0 and 0.5 <= p["top1_agreement"] <= 1.0
    refs = list((cache.root / "reference").glob("*.npy"))
    assert refs  # computed once per checkpoint, reused by the next point
    exact = measure(_point(backend="torch", precision="fp32", parity=True), plugins, cache, ENV)["parity"]
    assert exact["max_abs_diff"] < 1e-5 and exact["top1_agreement"] == 1.0


def test_maturity_matrix_summarises_runs_unsupported_and_parity(plugins, cache):
    from moerun.analysis import maturity

    rs = [measure(_point(model=m, backend="torch", precision=p, parity=True), plugins, cache, ENV)
          for m in ("tiny-moe", "tiny-dense") for p in ("fp32", "q4_k_m")]
    cells = {(c["kind"], c["precision"]): c for c in maturity(point_results(rs))}
    assert cells[("MoE", "fp32")]["verdict"] == "runs" and cells[("MoE", "fp32")]["max_abs_diff"] < 1e-5
    assert cells[("dense", "q4_k_m")]["verdict"] == "unsupported"
    assert "q4_k_m" in cells[("dense", "q4_k_m")]["reasons"][0]
