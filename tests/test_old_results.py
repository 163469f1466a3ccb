"""Results files written before the restructuring still read: `tests/data/results-e37cb20.jsonl`
holds the llama.cpp comparison of a default study written by moerun at commit e37cb20 (two
lockstep rounds of the MoE and its three twins; host name and paths scrubbed). It must load
as typed points, give its verdict, and serve `report`, `compare`, `predict --calibrate` and
resume unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import run_cli
from moerun.analysis import verdicts
from moerun.records import load_results

OLD = Path(__file__).parent / "data" / "results-e37cb20.jsonl"
ROLES = ["moe", "dense-active", "dense-total", "dense-isomem"]


def test_an_old_file_loads_as_typed_points_with_its_verdict():
    results = sorted(load_results([OLD]), key=lambda r: ROLES.index(r.role))
    assert [r.role for r in results] == ROLES
    assert all(r.ok and r.backend == "llamacpp" and len(r.rounds) == 2 for r in results)
    assert all(r.metrics["decode_tok_s"] > 0 and r.model["total_params"] > 0 for r in results)
    raw = [json.loads(line) for line in OLD.read_text().splitlines()]
    moe_rounds = sorted(r["metrics"]["decode_tok_s"] for r in raw if r["role"] == "moe")
    assert results[0].metrics["decode_tok_s"] == sum(moe_rounds) / 2  # the median of its two rounds
    (row,) = verdicts(results)
    assert row["group"] == "small-moe" and row["rounds"] == 2
    assert row["method"].startswith("lockstep")
    for key in ("decode_vs_active", "decode_vs_total", "decode_vs_isomem", "prefill_vs_active"):
        lo, hi = row[key + "_ci95"]
        assert lo < row[key] < hi, key


def test_report_compare_and_calibrate_read_an_old_file(tmp_path):
    r = run_cli("report", str(OLD), "--out", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| small-moe | moe | llamacpp |" in md and "MoE / dense twin" in md
    r = run_cli("compare", str(OLD), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert sorted(row["role"] for row in doc["results"]) == sorted(ROLES)
    assert doc["verdicts"][0]["group"] == "small-moe"
    r = run_cli("predict", "--hardware", "jetson-orin-nano-8gb", "--model", "small-moe", "--precision", "f16",
                "--calibrate", str(OLD), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    mbu = sorted(json.loads(line)["metrics"]["mbu"] for line in OLD.read_text().splitlines()
                 if json.loads(line)["precision"] == "f16")
    assert all(row["calibrated"] for row in rows) and rows[0]["efficiency"]["n"] == 3  # three f16 points
    assert mbu[0] <= rows[0]["efficiency"]["decode"] <= mbu[-1]


def test_an_old_file_resumes_without_measuring_again(tmp_path):
    out = tmp_path / "resumed.jsonl"
    shutil.copy(OLD, out)
    r = run_cli("-b", "llamacpp", "-o", str(out), "--min-rounds", "2", "--max-rounds", "2", "--target", "0",
                "-q", "--json")
    assert r.returncode == 0, r.stderr
    assert out.read_text() == OLD.read_text(), "nothing may be measured or appended"
    doc = json.loads(r.stdout)
    assert sorted(x["role"] for x in doc["results"]) == sorted(ROLES) and all(x["resumed"] for x in doc["results"])
