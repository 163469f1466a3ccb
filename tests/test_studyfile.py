"""Study files and presets: a grid with twins and named baselines, clear errors on typos."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from moerun import ConfigError
from moerun.grid import grid_points
from moerun.studyfile import PRESETS, load_study
from moerun.records import point_results

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
    points = grid_points(plugins, study, ["torch"])
    assert len(points) == 5 * 2  # moe, 2 twins, the iso-memory twin, 1 baseline x 2 prompt lengths
    assert {(p.role, p.prompt_tokens) for p in points} >= {("baseline", 4), ("dense-total", 8)}
    assert len({p.key for p in points}) == len(points)


def test_an_option_given_as_a_list_is_swept_and_verdicts_keep_the_values_apart(plugins, tmp_path):
    """llama.cpp's n_cpu_moe swept as a grid dimension; each value is its own comparison."""
    f = tmp_path / "s.toml"
    f.write_text(STUDY.replace('backends = ["torch"]', 'backends = ["llamacpp"]\noptions = { n_cpu_moe = [0, 1], '
                                                       'mmap = false }').replace("dense = [\"tiny-dense\"]\n", ""))
    points = grid_points(plugins, load_study(f), ["llamacpp"])
    assert len(points) == 4 * 2 * 2  # moe and 3 twins x 2 prompt lengths x 2 sweep values
    assert {(p.options["n_cpu_moe"], p.options["mmap"]) for p in points} == {(0, False), (1, False)}
    from moerun.analysis import verdicts
    from moerun.results import base_result

    results = []
    for p in points:
        r = base_result(p, {})
        r.update(status="ok", metrics={"decode_tok_s": 2.0 if p.role == "moe" else 1.0, "prefill_tok_s": 1.0})
        results.append(r)
    rows = verdicts(point_results(results))
    assert len(rows) == 4 and {row["options"] for row in rows} == {"mmap=False n_cpu_moe=0", "mmap=False n_cpu_moe=1"}
    f.write_text(STUDY.replace('backends = ["torch"]', 'backends = ["torch"]\noptions = { mode = [] }'))
    with pytest.raises(ConfigError, match="sweeps an empty list"):
        grid_points(plugins, load_study(f), ["torch"])


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
        assert grid_points(plugins, study, ["llamacpp"])
    paper = load_study(preset="paper-olmoe")
    assert paper.models == ["olmoe-1b-7b"] and paper.precisions == ["q4_k_m"]
    assert set(paper.dense) == {"llama-3.2-1b", "qwen2.5-1.5b", "gemma-2-2b-shape"}


def test_study_command_runs_and_reports_baselines(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(STUDY)
    out = run_cli("study", str(f), "-o", str(tmp_path / "r.jsonl"), "--json", "-q")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert len(doc["results"]) == 10 and all(r["status"] == "ok" for r in doc["results"])
    assert sorted(v["prompt_tokens"] for v in doc["verdicts"]) == [4, 8]
    for v in doc["verdicts"]:
        assert set(v["baselines"]) == {"tiny-dense"} and v["baselines"]["tiny-dense"]["decode"] > 0
    table = run_cli("study", str(f), "-o", str(tmp_path / "r.jsonl"), "-q")  # resumed: nothing reruns
    assert "MoE / named dense baseline" in table.stdout
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 10
