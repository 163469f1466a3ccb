"""Study files and presets: a grid with twins and named baselines, clear errors on typos."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from moerun import ConfigError
from moerun.study import points_from_study
from moerun.studyfile import PRESETS, load_study

STUDY = """
[study]
name = "mini"
models = ["tiny-moe"]
dense = ["tiny-dense"]
backends = ["torch"]
prompt_tokens = [4, 8]
new_tokens = [2]
repetitions = 2
warmup = 0
min_rounds = 1
target = 0
"""


def test_grid_has_twins_baselines_and_every_prompt_length(plugins, tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(STUDY)
    study = load_study(f)
    points = points_from_study(plugins, study, ["torch"])
    assert len(points) == 4 * 2  # moe, 2 twins, 1 baseline x 2 prompt lengths
    assert {(p.role, p.prompt_tokens) for p in points} >= {("baseline", 4), ("dense-total", 8)}
    assert len({p.key for p in points}) == len(points)


def test_typos_and_bad_files_name_the_problem(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text(STUDY.replace("prompt_tokens", "prompt_token"))
    with pytest.raises(ConfigError, match="prompt_token"):
        load_study(f)
    f.write_text("[study\nmodels=")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_study(f)
    f.write_text('[runs]\nmodels=["x"]')
    with pytest.raises(ConfigError, match="single \\[study\\] table"):
        load_study(f)
    with pytest.raises(ConfigError, match="unknown study preset"):
        load_study(preset="nope")


def test_presets_are_valid_studies(plugins):
    for name in PRESETS:
        study = load_study(preset=name)
        assert points_from_study(plugins, study, ["llamacpp"])
    paper = load_study(preset="paper-olmoe")
    assert paper.models == ["olmoe-1b-7b"] and paper.precisions == ["q4_k_m"]
    assert set(paper.dense) == {"llama-3.2-1b", "qwen2.5-1.5b", "gemma-2-2b-shape"}


def test_study_command_runs_and_reports_baselines(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(STUDY)
    out = run_cli("study", str(f), "-o", str(tmp_path / "r.jsonl"), "--json", "-q")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["results"]) == 8 and all(r["status"] == "ok" for r in doc["results"])
    assert sorted(v["prompt_tokens"] for v in doc["verdicts"]) == [4, 8]
    for v in doc["verdicts"]:
        assert set(v["baselines"]) == {"tiny-dense"} and v["baselines"]["tiny-dense"]["decode"] > 0
    table = run_cli("study", str(f), "-o", str(tmp_path / "r.jsonl"), "-q")  # resumed: nothing reruns
    assert "MoE / named dense baseline" in table.stdout
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 8
