"""The measurement protocol: paired statistics over rounds, the precision target, the budget,
contended rounds, resume and folding rounds into one record per point. An executor that
returns scripted values stands in for the child processes here (the real ones run in
tests/test_verdicts_hold.py)."""

from __future__ import annotations

import math
import random

import pytest

from moerun import ConfigError, Point
from moerun.analysis import verdicts
from moerun.protocol import Protocol, collapse, log_interval, paired, run_rounds, t975
from moerun.records import point_results
from moerun.results import base_result


def _points(new_tokens=4):
    base = dict(backend="torch", prompt_tokens=4, new_tokens=new_tokens, group="m")
    return [Point(model="m", role="moe", **base), Point(model="m:dense-active", role="dense-active", **base),
            Point(model="m:dense-total", role="dense-total", **base)]


class Scripted:
    """Decode/prefill tokens/s = the model's true speed x a shared per-round drift x per-process
    noise; `busy` marks the points (by call index) measured under contention."""

    SPEED = {"moe": 100.0, "dense-active": 125.0, "dense-total": 40.0}

    def __init__(self, noise=0.02, drift=0.2, seed=1, busy=(), fail=(), fast=()):
        self.rng, self.noise, self.drift = random.Random(seed), noise, drift
        self.calls: list[Point] = []
        self.busy, self.fail, self.fast = set(busy), set(fail), set(fast)
        self.round_factor, self.this_round = 1.0, set()

    def run(self, point):
        if not self.this_round or point.key in self.this_round:  # a new round: the machine drifted
            self.round_factor = math.exp(self.rng.uniform(-self.drift, self.drift))
            self.this_round = set()
        self.this_round.add(point.key)
        i = len(self.calls)
        self.calls.append(point)
        r = base_result(point, {})
        if point.model in self.fail:
            r["error"] = "engine exploded"
            return r
        v = self.SPEED[point.role] * self.round_factor * math.exp(self.rng.gauss(0, self.noise))
        if i in self.busy:
            v *= 0.5
        r.update(status="ok", metrics={"decode_tok_s": v, "prefill_tok_s": 10 * v},
                 memory={"rss_after_load_bytes": 1000 + i}, timings={},
                 contention={"timed": {"contended": i in self.busy, "others_cores": 1.0 if i in self.busy else 0.0}})
        r["bandwidth_after_timed"] = {"bytes_s": 80e9 if i in self.fast else 40e9, "kernel": "numpy-sum"}
        if point.breakdown:
            r["breakdown"] = {"available": True}
        return r


def test_student_t_interval_on_logs():
    assert t975(1) == pytest.approx(12.706) and t975(9) == pytest.approx(2.262) and 1.96 < t975(200) < 2.0
    out = log_interval([1.0, 1.0, 1.0])
    assert out["value"] == pytest.approx(1.0) and out["halfwidth"] == pytest.approx(0.0)
    out = log_interval([0.9, 1.1, 1.0, 0.95, 1.05])
    lo, hi = out["ci95"]
    assert lo < out["value"] < hi and out["halfwidth"] == pytest.approx(hi / out["value"] - 1)
    assert log_interval([2.0])["halfwidth"] == math.inf and log_interval([])["value"] is None


def test_rounds_until_the_target_then_stop():
    ex = Scripted(noise=0.01)
    run = run_rounds(_points(), ex, Protocol(min_rounds=3, max_rounds=20, target=0.03, budget_s=None))
    results = collapse(run["records"])
    (v,) = verdicts(point_results(results))
    assert run["stopped"] == "every verdict met the target"
    assert v["halfwidth"] <= 0.03 and not v["missed_target"] and v["rounds"] >= 3
    # the shared drift cancels in the pairing: the verdict is the true ratio
    assert v["decode_vs_active"] == pytest.approx(100 / 125, rel=0.03)
    assert v["decode_vs_total"] == pytest.approx(100 / 40, rel=0.03)
    rounds = {r["round"] for r in run["records"]}
    assert rounds == set(range(len(rounds)))
    orders = [tuple(p.role for p in ex.calls[i:i + 3]) for i in (0, 3, 6)]  # the minimum rounds: every side
    assert len(set(orders)) > 1, "the sides' order is shuffled per round"
    assert all(sorted(o) == ["dense-active", "dense-total", "moe"] for o in orders)


def test_noisy_comparison_stops_at_max_rounds_and_is_marked():
    run = run_rounds(_points(), Scripted(noise=0.3), Protocol(min_rounds=3, max_rounds=5, target=0.03, budget_s=None))
    assert run["stopped"] == "max-rounds (5) reached"
    (v,) = verdicts(point_results(collapse(run["records"])))
    assert v["rounds"] == 5 and v["missed_target"] and v["halfwidth"] > 0.03


def test_budget_limits_every_round_after_the_first():
    ex = Scripted(noise=0.3)
    run = run_rounds(_points(), ex, Protocol(min_rounds=2, max_rounds=10, target=0.01, budget_s=0))
    assert len(ex.calls) == 3 and "budget" in run["stopped"]
    (v,) = verdicts(point_results(collapse(run["records"])))
    assert v["rounds"] == 1 and v["missed_target"]  # fewer rounds than the minimum: marked
    ex = Scripted(noise=0.3)
    run = run_rounds(_points(), ex, Protocol(min_rounds=2, max_rounds=2, target=0.01, budget_s=60))
    assert len(ex.calls) == 6
    ex = Scripted(noise=0.3)
    run_rounds(_points(), ex, Protocol(min_rounds=4, target=0.0))
    assert len(ex.calls) == 12  # target 0: exactly min-rounds


def test_contended_rounds_are_left_out_while_enough_quiet_ones_remain():
    # round 1 (calls 3-5): every side at half speed under contention, the MoE first
    ex = Scripted(noise=0.0, drift=0.0, busy={3})
    run = run_rounds(_points(), ex, Protocol(min_rounds=3, max_rounds=4, target=0.5, budget_s=None))
    (v,) = verdicts(point_results(collapse(run["records"])))
    busy_role = ex.calls[3].role
    assert busy_role  # whichever side ran first in round 1 was slowed
    assert v["decode_vs_active"] == pytest.approx(0.8) and v["decode_vs_total"] == pytest.approx(2.5)
    assert not v["contended"] and v["uneven_rounds"] >= 1
    # when every round is contended they are kept, and the row says so
    ex = Scripted(noise=0.0, drift=0.0, busy=set(range(9)))
    run = run_rounds(_points(), ex, Protocol(min_rounds=3, max_rounds=3, target=0.5, budget_s=None))
    (v,) = verdicts(point_results(collapse(run["records"])))
    assert v["contended"]
    assert all(r["contended"] for r in collapse(run["records"])[0]["rounds"])


def test_a_point_failing_in_its_first_round_gets_no_more_rounds():
    ex = Scripted(fail={"m:dense-total"})
    run = run_rounds(_points(), ex, Protocol(min_rounds=3, max_rounds=3, target=0.5, budget_s=None))
    assert [p.model for p in ex.calls].count("m:dense-total") == 1
    results = {r["model_name"]: r for r in collapse(run["records"])}
    assert results["m:dense-total"]["status"] == "failed" and results["m"]["status"] == "ok"
    (v,) = verdicts(point_results(list(results.values())))
    assert v["decode_vs_total"] is None and v["decode_vs_active"] is not None


def test_resume_keeps_finished_rounds_and_adds_only_what_is_missing():
    first = run_rounds(_points(), Scripted(noise=0.0), Protocol(min_rounds=2, target=0.0))
    ex = Scripted(noise=0.0)
    again = run_rounds(_points(), ex, Protocol(min_rounds=3, target=0.0), previous=first["records"])
    assert len(ex.calls) == 3 and {r["round"] for r in again["records"]} == {0, 1, 2}
    ex = Scripted()
    run_rounds(_points(), ex, Protocol(min_rounds=3, target=0.0), previous=again["records"])
    assert ex.calls == []


def test_breakdown_and_parity_run_in_the_first_round_only():
    pts = [Point(model="m", role="moe", backend="torch", breakdown=True, parity=True)]
    ex = Scripted()
    run = run_rounds(pts, ex, Protocol(min_rounds=3, target=0.0))
    assert [p.breakdown for p in ex.calls] == [True, False, False]
    assert all(r["key"] == pts[0].key and r["point"]["breakdown"] for r in run["records"])
    (folded,) = collapse(run["records"])
    assert folded["breakdown"] == {"available": True} and len(folded["rounds"]) == 3


def test_collapse_takes_medians_and_keeps_every_round():
    run = run_rounds(_points()[:1], Scripted(noise=0.1), Protocol(min_rounds=5, target=0.0))
    (folded,) = collapse(run["records"])
    values = sorted(r["metrics"]["decode_tok_s"] for r in run["records"])
    assert folded["metrics"]["decode_tok_s"] == pytest.approx(values[2])
    assert folded["memory"]["rss_after_load_bytes"] == 1002
    assert [r["round"] for r in folded["rounds"]] == [0, 1, 2, 3, 4]
    s = folded["spread"]["decode_tok_s"]
    assert s["n"] == 5 and s["ci95"][0] < folded["metrics"]["decode_tok_s"] < s["ci95"][1]
    assert collapse([folded]) == [folded]  # already folded: unchanged


def test_one_round_files_fall_back_to_the_repetitions_interval():
    pts = _points()[:2]
    recs = []
    for p, reps in zip(pts, ([10.0, 11.0, 9.0], [20.0, 21.0, 19.0])):
        r = base_result(p, {})
        r.update(status="ok", metrics={"decode_tok_s": reps[0], "prefill_tok_s": 1.0},
                 timings={"decode_tok_s_reps": reps, "prefill_tok_s_reps": [1.0, 1.0, 1.0]})
        recs.append(r)
    st = paired(collapse(recs)[0], collapse(recs)[1], "decode_tok_s")
    assert st["n"] == 1 and st["ci95"] and st["method"].startswith("one round")


def test_protocol_options_are_checked():
    with pytest.raises(ConfigError, match="min-rounds must be >= 1"):
        Protocol(min_rounds=0)
    with pytest.raises(ConfigError, match="below min-rounds"):
        Protocol(min_rounds=5, max_rounds=3)
    with pytest.raises(ConfigError, match="if-busy"):
        Protocol(if_busy="sometimes")


def test_a_machine_whose_bandwidth_moved_is_flagged():
    import io

    from moerun.plugins.reporters import table

    steady = run_rounds(_points(), Scripted(), Protocol(min_rounds=3, target=0.0))
    (v,) = verdicts(point_results(collapse(steady["records"])))
    assert v["bandwidth_range"] == pytest.approx(1.0)
    moved = run_rounds(_points(), Scripted(fast={4}), Protocol(min_rounds=3, target=0.0))
    (v,) = verdicts(point_results(collapse(moved["records"])))
    assert v["bandwidth_range"] == pytest.approx(2.0)
    out = io.StringIO()
    folded = point_results(moved["records"])
    table(folded, verdicts(folded), out)
    assert "bandwidth moved x2.00" in out.getvalue()
