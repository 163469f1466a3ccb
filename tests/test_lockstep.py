"""Lockstep: one comparison object for scheduler and verdicts, the two-level interval, and the
real workers (torch on tiny models) loaded together and timed in alternating cycles, with a
side that fails to open and one that crashes mid-way."""

from __future__ import annotations

import math
import random

import pytest

from moerun import Point
from moerun.analysis import verdicts
from moerun.comparison import comparisons, point_key, record_key
from moerun.lockstep import run_together
from moerun.protocol import Protocol, collapse, nested_interval, paired, run_rounds
from moerun.results import base_result
from moerun.grid import grid_points
from moerun.study import LocalExecutor
from moerun.studyfile import StudySpec
from moerun.records import point_results


def _default(backend: str) -> str:
    return {"torch": "fp32", "llamacpp": "f16", "onnxruntime": "fp32"}.get(backend, "fp32")


def test_one_comparison_holds_the_moe_its_twins_the_isomem_twin_and_baselines(plugins):
    points = grid_points(plugins, StudySpec(models=["tiny-moe"], prompt_tokens=[8], new_tokens=[4]),
                         ["torch", "llamacpp"])
    points.append(Point(model="tiny-dense", backend="torch", role="baseline", prompt_tokens=8, new_tokens=4))
    comps = comparisons(points, _default)
    assert len(comps) == 2  # one per backend: the parity flag and the isomem twin's own precision do not split them
    torch = next(c for c in comps if c.key[1] == "torch")
    roles = sorted(p.role for p in torch.sides)
    assert roles == ["baseline", "dense-active", "dense-isomem", "dense-total", "moe"]
    assert sorted(pair.kind for pair in torch.pairs) == ["active", "baseline", "isomem", "total"]
    # without resolving the backend default, the isomem twin (named fp32) stands apart: that is the old bug
    assert len(comparisons(points)) > 2
    # a record of a point lands on the same key as the point (the precision resolved in the record)
    for p in torch.sides:
        r = {**base_result(p, {}), "precision": p.precision or "fp32"}
        assert record_key(r) == point_key(p, _default)


def test_the_nested_interval_is_as_tight_as_the_cycles_when_restarts_agree_and_wide_when_not():
    rng = random.Random(0)
    agree = [[rng.gauss(0, 0.05) for _ in range(20)] for _ in range(3)]
    out = nested_interval(agree)
    assert out["n"] == 3 and out["cycles"] == 60 and out["df"] > 30  # the cycles' degrees of freedom
    assert out["halfwidth"] < 0.03 and out["ci95"][0] < 1 < out["ci95"][1]
    # restarts that disagree by far more than their cycles: the interval follows the restarts
    apart = [[m + rng.gauss(0, 0.01) for _ in range(20)] for m in (-0.1, 0.0, 0.1)]
    wide = nested_interval(apart)
    assert wide["df"] < 3 and wide["between_share"] > 0.9
    means = [sum(g) / len(g) for g in apart]
    assert wide["halfwidth"] > 0.1  # t(2) x sd(restart means) / sqrt(3) ~ 0.25
    assert math.log(wide["value"]) == pytest.approx(sum(means) / 3)
    one = nested_interval([agree[0]])
    assert one["n"] == 1 and one["halfwidth"] > out["halfwidth"]


def test_paired_uses_cycles_of_the_same_lockstep_session_only():
    def rec(values_by_round, session):
        return {"status": "ok", "metrics": {"decode_tok_s": 1.0}, "rounds": [
            {"round": i, "status": "ok", "decode_tok_s": sum(v) / len(v),
             "lockstep": {"session": f"{session}{i}", "decode_tok_s": v}} for i, v in enumerate(values_by_round)]}

    a = rec([[100, 102, 98, 101], [90, 91, 89, 92]], "s")
    b = rec([[125, 127, 123, 126], [112, 114, 111, 115]], "s")
    st = paired(a, b, "decode_tok_s")
    assert st["method"].startswith("lockstep") and st["cycles"] == 8
    assert st["value"] == pytest.approx(0.8, rel=0.01)  # the machine slowed between restarts; the ratio did not
    other = rec([[125, 127, 123, 126], [112, 114, 111, 115]], "elsewhere")
    assert paired(a, other, "decode_tok_s")["method"] == "paired rounds (between processes)"


def test_two_sides_in_lockstep_alternate_units_and_say_so(plugins, cache):
    pts = [Point(model="tiny-moe", backend="torch", role="moe", group="tiny-moe", prompt_tokens=8, new_tokens=4,
                 parity=True),
           Point(model="tiny-moe:dense-active", backend="torch", role="dense-active", group="tiny-moe",
                 prompt_tokens=8, new_tokens=4)]
    rs = run_together(pts, cache=cache, env={"marker": 1}, unit_s=0.02, min_cycles=4, max_cycles=4, seed=3)
    assert [r["status"] for r in rs] == ["ok", "ok"], [r.get("error") for r in rs]
    sessions = {r["lockstep"]["session"] for r in rs}
    assert len(sessions) == 1
    for r in rs:
        lock = r["lockstep"]
        assert lock["cycles"] == 4 and len(lock["decode_tok_s"]) == 4 and len(lock["prefill_tok_s"]) == 4
        assert all(v > 0 for v in lock["decode_tok_s"] + lock["prefill_tok_s"])
        assert lock["unit_reps"]["prefill"] >= 1 and lock["unit_reps"]["decode"] >= 1
        # the worker's timings are its units' own: one decode pass per rep per cycle
        assert r["timings"]["decode_tok_s"]["n"] == 4 * lock["unit_reps"]["decode"]
        assert 1 <= lock["unit_reps"]["decode_steps"] <= 4
        assert r["contention"]["timed"]["stretches"] == "timed units only"
        assert r["trackers"]["rss"]["covers"] == "this side's timed units"
        assert r["env"] == {"marker": 1} and r["isolated"]
    assert rs[0]["parity"]["available"] and "parity" not in rs[1]
    # the records fold and pair like any round's
    for r, p in zip(rs, pts):
        r.update(key=p.key, point=p.to_dict(), round=0, protocol=Protocol().to_dict())
    (v,) = verdicts(point_results(rs))
    assert v["method"].startswith("lockstep, one restart") and v["decode_vs_active"] > 0


def test_a_side_that_cannot_open_or_crashes_midway_leaves_the_others_measured(plugins, cache, test_plugin_env):
    test_plugin_env.setenv("MOERUN_PLUGINS", "moerun_fault")
    base = dict(backend="fault", group="tiny-moe", prompt_tokens=8, new_tokens=4,
                options={"crash_model": "tiny-moe:dense-total", "crash_after": 12})
    pts = [Point(model="tiny-moe", role="moe", **base),
           Point(model="tiny-moe:dense-active", role="dense-active", **base),
           Point(model="tiny-moe:dense-total", role="dense-total", **base),
           Point(model="tiny-moe:dense-active", role="dense-active", precision="int4", **base)]  # torch has no int4
    rs = run_together(pts, cache=cache, env={}, unit_s=0.01, min_cycles=6, max_cycles=6)
    moe, active, total, bad = rs
    assert moe["status"] == active["status"] == "ok"
    assert moe["lockstep"]["cycles"] == 6 and len(active["lockstep"]["decode_tok_s"]) == 6
    assert bad["status"] in ("unsupported", "failed") and "int4" in bad["error"]
    assert total["status"] == "failed" and "segmentation fault" in total["error"]
    # it decoded (warm-up 4 + calibration 4 + units of 1-4 steps) until its 13th decode call: fewer cycles
    assert len(total["lockstep"]["decode_tok_s"]) < 6


def test_rounds_run_in_lockstep_through_the_executor_and_resume(plugins, cache, tmp_path):
    pts = grid_points(plugins, StudySpec(models=["tiny-moe"], isomem=False, prompt_tokens=[8], new_tokens=[4],
                                         repetitions=1, warmup=0), ["torch"])
    ex = LocalExecutor(plugins=plugins, cache=cache, env={})
    ok, why = ex.together(pts)
    assert ok and why.startswith("lockstep: 3 sides")
    protocol = Protocol(min_rounds=2, max_rounds=2, target=0.5, budget_s=None, unit_s=0.02)
    run = run_rounds(pts, ex, protocol, default_precision=_default)
    assert len(run["records"]) == 6 and {r["round"] for r in run["records"]} == {0, 1}
    assert [r["lockstep"]["loaded"] for r in sorted(run["records"], key=lambda r: r["round"])][::3] == [
        "one at a time", "together"]
    folded = collapse(run["records"])
    assert all(len(f["rounds"]) == 2 and f["rounds"][0]["lockstep"]["decode_tok_s"] for f in folded)
    (v,) = verdicts(point_results(folded))
    assert v["method"] == "lockstep: a ratio per cycle, restarts as a random effect" and v["rounds"] == 2
    again = run_rounds(pts, ex, protocol, previous=run["records"], default_precision=_default)
    assert again["records"] == [] or all(r.get("resumed") for r in again["records"])


def test_sides_that_do_not_fit_together_fall_back_to_sequential_rounds(plugins, cache, monkeypatch):
    import moerun.environment as environment

    pts = grid_points(plugins, StudySpec(models=["tiny-moe"], isomem=False, prompt_tokens=[8], new_tokens=[4]),
                      ["torch"])
    monkeypatch.setattr(environment, "meminfo_bytes", lambda field: 1000)
    ok, why = LocalExecutor(plugins=plugins, cache=cache, env={}).together(pts)
    assert not ok and "need about" in why and "available" in why
    assert LocalExecutor(plugins=plugins, cache=cache, env={}, isolate=False).together(pts)[0] is False


def test_no_iso_memory_twin_at_a_precision_this_cpu_would_emulate(plugins, monkeypatch):
    import moerun.toolkit as environment  # what backends read the CPU through

    monkeypatch.delenv("MOERUN_EMULATED_TWINS")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(environment, "cpu_flags", lambda: {"avx2", "fma", "f16c"})  # an AVX2 EPYC
    notes: list[str] = []
    pts = grid_points(plugins, StudySpec(models=["tiny-moe"]), ["torch", "llamacpp"], notes=notes)
    assert {(p.backend, p.role) for p in pts if p.role == "dense-isomem"} == {("llamacpp", "dense-isomem")}
    (note,) = notes
    assert "no iso-memory twin for tiny-moe on torch at bf16" in note and "avx512_bf16" in note
    monkeypatch.setattr(environment, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    pts = grid_points(plugins, StudySpec(models=["tiny-moe"]), ["torch"])
    assert any(p.role == "dense-isomem" and p.precision == "bf16" for p in pts)
    # a fleet's nodes judge their own CPUs: the twin stays
    monkeypatch.setattr(environment, "cpu_flags", lambda: {"avx2"})
    pts = grid_points(plugins, StudySpec(models=["tiny-moe"], hardware=["node-a"]), ["torch"])
    assert any(p.role == "dense-isomem" for p in pts)


@pytest.mark.parametrize("args,message", [(["--unit-s", "0"], "between 0.01 and 10 seconds"),
                                          (["--unit-s", "x"], "expected seconds")])
def test_bad_lockstep_options_are_one_line_errors(args, message):
    from conftest import run_cli

    done = run_cli(*args, "-m", "tiny-moe")
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
