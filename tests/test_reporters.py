"""Reporters on a real (tiny) measurement: every registered one renders, CSV and Markdown
carry the figures of the results they were given."""

from __future__ import annotations

import csv
import io
import json
import statistics

import pytest

from moerun import Point, measure
from moerun.records import point_results

ENV = {"bandwidth_bytes_s": 20e9, "cpu_model": "test", "cores": 2}


@pytest.fixture(scope="module")
def results(cache):
    from moerun import get_plugin_manager

    pm = get_plugin_manager(entrypoints=False)
    out = []
    for model, role in (("tiny-moe", "moe"), ("tiny-moe:dense-active", "dense-active"),
                        ("tiny-moe:dense-total", "dense-total")):
        r = measure(Point(model=model, backend="torch", prompt_tokens=8, new_tokens=4, repetitions=1, role=role,
                          group="tiny-moe"), pm, cache, ENV)
        assert r["status"] == "ok"
        out.append(r)
    out.append(measure(Point(model="tiny-moe", backend="torch", precision="q4_0", role="moe", group="x"), pm, cache, ENV))
    return out


def report(plugins, name: str, records: list[dict], **kw) -> str:
    """What reporter `name` writes for `records`, given as moerun gives them: folded points
    and their verdict rows."""
    from moerun.analysis import verdicts

    results = point_results(records)
    buf = io.StringIO()
    plugins.reporters.get(name)(results, verdicts(results), buf, **kw)
    return buf.getvalue()


def test_every_reporter_shows_every_point_and_the_verdict(plugins, results):
    """Each built-in reporter names every point, its status and the MoE / active-twin ratio."""
    ratio = results[0]["metrics"]["decode_tok_s"] / results[1]["metrics"]["decode_tok_s"]
    for name in ("table", "markdown", "json", "csv"):
        text = report(plugins, name, results)
        for model in ("tiny-moe", "tiny-moe:dense-active", "tiny-moe:dense-total"):
            assert model in text, (name, model)
        assert "unsupported" in text, name
        if name == "json":
            assert json.loads(text)["verdicts"][0]["decode_vs_active"] == pytest.approx(ratio), name
        elif name != "csv":  # the CSV holds the points only
            assert f"{ratio:.2f}x" in text, name


def test_csv_rows_carry_the_measured_figures(plugins, results):
    rows = list(csv.DictReader(io.StringIO(report(plugins, "csv", results))))
    assert [r["role"] for r in rows] == ["moe", "dense-active", "dense-total", "moe"]
    assert float(rows[0]["decode_tok_s"]) == pytest.approx(results[0]["metrics"]["decode_tok_s"])
    assert rows[3]["status"] == "unsupported" and "q4_0" in rows[3]["error"]


def test_markdown_and_json_hold_the_verdict(plugins, results):
    text = report(plugins, "markdown", results)
    ratio = results[0]["metrics"]["decode_tok_s"] / results[1]["metrics"]["decode_tok_s"]
    assert f"{ratio:.2f}x" in text and "| tiny-moe | torch | fp32 |" in text
    assert "**unsupported**" in text
    doc = json.loads(report(plugins, "json", results))
    assert doc["verdicts"][0]["decode_vs_active"] == pytest.approx(ratio)


def test_breakdown_figure_holds_the_measured_stacks(plugins, cache, tmp_path):
    from moerun.plugins.reporters import breakdown_figure

    rows = []
    for model, role in (("tiny-moe", "moe"), ("tiny-moe:dense-active", "dense-active")):
        rows.append(measure(Point(model=model, backend="torch", prompt_tokens=8, new_tokens=4, repetitions=1,
                                  role=role, group="tiny-moe", breakdown=True), plugins, cache, ENV))
    fig = breakdown_figure(point_results(rows), "decode")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["tiny-moe | torch", "tiny-moe:dense-active | torch"]
    assert "decode time per token (ms)" in ax.get_xlabel()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "router" in legend and "experts" in legend and "dense_ffn" in legend
    # each bar segment is a measured category time; a bar's segments add to that row's sum
    for i, r in enumerate(rows):
        segments = [p for p in ax.patches if abs(p.get_y() + p.get_height() / 2 - i) < 1e-6]
        assert sum(p.get_width() for p in segments) == pytest.approx(r["breakdown"]["decode"]["sum_s"] * 1e3)
    router = [p for c in ax.containers if c.get_label() == "router" for p in c]
    assert router[0].get_width() == pytest.approx(rows[0]["breakdown"]["decode"]["seconds"]["router"] * 1e3)
    assert router[1].get_width() == 0  # the dense twin has no router
    # through the CLI: report.md links the PNGs, which are real images
    out = tmp_path / "results.jsonl"
    from moerun.results import append_result

    for r in rows:
        append_result(out, r)
    from conftest import run_cli

    res = run_cli("report", str(out), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![Where decode time goes](breakdown-decode.png)" in md
    png = (tmp_path / "rep" / "breakdown-decode.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_ratio_interval_brackets_the_ratio_and_narrows_with_agreement():
    from moerun.stats import ratio_interval

    lo, hi = ratio_interval([10.0, 11.0, 9.0, 10.5], [20.0, 19.0, 21.0, 20.5])
    assert lo <= 10.25 / 20.25 <= hi and 0.4 < lo < hi < 0.6
    tight = ratio_interval([10.0, 10.01, 9.99], [20.0, 20.01, 19.99])
    assert tight[1] - tight[0] < (hi - lo) / 10
    assert ratio_interval([10.0], [20.0, 21.0]) is None
    assert ratio_interval([1.0, 2.0], [3.0, 4.0]) == ratio_interval([1.0, 2.0], [3.0, 4.0])  # seeded


def test_verdict_rows_carry_intervals_from_repetitions(plugins, cache):
    from moerun.analysis import verdicts

    rows = [measure(Point(model=m, backend="torch", prompt_tokens=8, new_tokens=4, repetitions=3, role=role,
                          group="tiny-moe"), plugins, cache, ENV)
            for m, role in (("tiny-moe", "moe"), ("tiny-moe:dense-active", "dense-active"))]
    (v,) = verdicts(point_results(rows))
    moe, active = (r["timings"]["decode_tok_s_reps"] for r in rows)
    assert len(moe) == len(active) == 3
    # one round of each: the ratio of the medians, inside its bootstrap interval over the repetitions
    from moerun.stats import ratio_interval

    assert v["decode_vs_active"] == pytest.approx(statistics.median(moe) / statistics.median(active))
    assert v["decode_vs_active_ci95"] == pytest.approx(list(ratio_interval(moe, active)))
    lo, hi = v["decode_vs_active_ci95"]
    assert lo < v["decode_vs_active"] < hi and v["method"].startswith("one round")


def test_compare_merges_machines(results, tmp_path):
    import copy

    from conftest import run_cli
    from moerun.results import append_result

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for r in results:
        append_result(a, r)
        other = copy.deepcopy(r)
        other["env"] = {**r["env"], "hostname": "jetson", "cpu_model": "ARMv8 Processor rev 1", "cores": 6}
        append_result(b, other)
    out = run_cli("compare", str(a), str(b), "--json", "--csv", str(tmp_path / "m.csv"))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    machines = {r["machine"] for r in doc["results"]}
    assert len(machines) == 2 and any("ARMv8 Processor rev 1, 6 cores @ jetson" == m for m in machines)
    assert len(doc["verdicts"]) == 2 and {v["machine"] for v in doc["verdicts"]} == machines
    assert (tmp_path / "m.csv").read_text().count("\n") == 1 + 2 * len(results)
    table = run_cli("compare", str(a), str(b))
    assert "results by machine" in table.stdout and "jetson" in table.stdout



def test_throughput_and_speedup_figures_hold_the_results(results):
    from moerun.plugins.reporters import speedup_figure, throughput_figure

    ok = [r for r in results if r["status"] == "ok"]
    fig = throughput_figure(point_results(results), "decode_tok_s")
    ax = fig.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted(round(r["metrics"]["decode_tok_s"], 6) for r in ok)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["tiny-moe", "tiny-moe:dense-active",
                                                                   "tiny-moe:dense-total"]
    assert "decode tokens/s" in ax.get_ylabel()
    from moerun.analysis import verdicts

    (v,) = verdicts(point_results(results))
    fig = speedup_figure([v])
    ax = fig.axes[0]
    measured = [p.get_height() for c in ax.containers if c.get_label() == "measured" for p in c]
    ideal = [p.get_height() for c in ax.containers if c.get_label() == "ideal (bytes ratio)" for p in c]
    assert measured == pytest.approx([v["decode_vs_total"]]) and ideal == pytest.approx([v["ideal_decode_vs_total"]])



def test_roofline_figure_places_each_point_under_the_measured_line(results):
    from moerun.plugins.reporters import roofline_figure

    ok = [r for r in results if r["status"] == "ok"]
    ax = roofline_figure(point_results(results)).axes[0]
    (line,) = ax.get_lines()
    x, y = line.get_xdata(), line.get_ydata()
    assert y[0] == pytest.approx(20e9 / (x[0] * 1e6))  # ENV's 20 GB/s over bytes per token
    (points,) = [c for c in ax.collections]
    got = sorted(map(tuple, points.get_offsets().round(6)))
    want = sorted((round(r["metrics"]["bytes_per_token"] / 1e6, 6), round(r["metrics"]["decode_tok_s"], 6)) for r in ok)
    assert got == want
    assert ax.get_xscale() == "log" and "bytes read per decoded token" in ax.get_xlabel()
