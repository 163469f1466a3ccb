"""Reporters on a real (tiny) measurement: every registered one renders, CSV and Markdown
carry the figures of the results they were given."""

from __future__ import annotations

import csv
import io
import json

import pytest

from moerun import Point, measure

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


def test_every_reporter_renders(plugins, results):
    for name in plugins.reporters:
        buf = io.StringIO()
        plugins.reporters.get(name)(results, buf)
        assert buf.getvalue().strip(), name


def test_csv_rows_carry_the_measured_figures(plugins, results):
    buf = io.StringIO()
    plugins.reporters.get("csv")(results, buf)
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [r["role"] for r in rows] == ["moe", "dense-active", "dense-total", "moe"]
    assert float(rows[0]["decode_tok_s"]) == pytest.approx(results[0]["metrics"]["decode_tok_s"])
    assert rows[3]["status"] == "unsupported" and "q4_0" in rows[3]["error"]


def test_markdown_and_json_hold_the_verdict(plugins, results):
    md = io.StringIO()
    plugins.reporters.get("markdown")(results, md)
    text = md.getvalue()
    ratio = results[0]["metrics"]["decode_tok_s"] / results[1]["metrics"]["decode_tok_s"]
    assert f"{ratio:.2f}x" in text and "| tiny-moe | torch | fp32 |" in text
    assert "**unsupported**" in text
    js = io.StringIO()
    plugins.reporters.get("json")(results, js)
    doc = json.loads(js.getvalue())
    assert doc["verdicts"][0]["decode_vs_active"] == pytest.approx(ratio)
