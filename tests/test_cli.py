"""The real `moerun` console script: listing commands, a measuring run, one-line errors."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

SMALL = ["--prompt-tokens", "8", "--new-tokens", "4", "--repetitions", "1", "--warmup", "0", "-q",
         "--min-rounds", "1", "--target", "0"]  # one round: these tests are not about the protocol


def test_backends_json_says_what_is_available_and_why_not():
    out = run_cli("backends", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["torch"]["available"] is True and rows["torch"]["version"]
    assert "fp32" in rows["torch"]["capabilities"]["precisions"]


def test_models_json_lists_presets_with_counts():
    out = run_cli("models", "--json")
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["olmoe-1b-7b"]["total_params"] == 6_919_161_856
    assert rows["olmoe-1b-7b"]["active_params"] < rows["olmoe-1b-7b"]["total_params"] / 5
    assert rows["small-moe"]["moe"] is True


def test_measuring_run_prints_table_and_writes_jsonl(tmp_path):
    out_file = tmp_path / "r.jsonl"
    out = run_cli("--backend", "torch", "--model", "tiny-moe", "--output", str(out_file), *SMALL)
    assert out.returncode == 0, out.stderr
    assert "moerun results" in out.stdout and "MoE / dense twin" in out.stdout
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    # shuffled per round; the iso-memory twin (tiny-moe at bf16) comes by default
    assert sorted(r["role"] for r in rows) == ["dense-active", "dense-isomem", "dense-total", "moe"]
    assert all(r["status"] == "ok" and r["isolated"] and r["round"] == 0 for r in rows)
    # rerun with the same output: resumed, nothing appended
    again = run_cli("--backend", "torch", "--model", "tiny-moe", "--output", str(out_file), "--json", *SMALL)
    doc = json.loads(again.stdout)
    assert len(out_file.read_text().splitlines()) == 4
    assert all(r["resumed"] for r in doc["results"]) and doc["verdicts"][0]["group"] == "tiny-moe"
    # the points' order
    assert [r["role"] for r in doc["results"]] == ["moe", "dense-isomem", "dense-active", "dense-total"]


def test_unsupported_precision_is_reported_not_fatal(tmp_path):
    out = run_cli("-b", "torch", "-m", "tiny-dense", "-p", "q4_k_m", "-o", str(tmp_path / "u.jsonl"), *SMALL)
    assert out.returncode == 0
    assert "unsupported" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--backend", "nope"], "unknown backend 'nope'; available: torch, llamacpp, onnxruntime, onnxruntime-contrib"),
    (["--backend", "torch", "--precision", "fp5"], "unknown precision 'fp5'"),
    (["--model", "tiny-mo"], "unknown model preset 'tiny-mo'"),
    (["--model", "tiny-dense:dense-active"], "is dense: only MoE models have dense twins"),
    (["--prompt-tokens", "0"], "--prompt-tokens: must be >= 1, got 0"),
    (["--new-tokens", "x"], "expected an integer"),
    (["-O", "novalue"], "--option takes KEY=VALUE"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    out = run_cli(*args, *SMALL)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_a_broken_plugin_does_not_stop_a_measuring_run(tmp_path):
    from conftest import TEST_PLUGINS

    env = {"MOERUN_PLUGINS": "moerun_broken", "PYTHONPATH": str(TEST_PLUGINS)}
    out = run_cli("-b", "torch", "-m", "tiny-dense", "-o", str(tmp_path / "b.jsonl"), *SMALL, env=env)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_plugins_command_shows_a_broken_plugin(monkeypatch):
    from conftest import TEST_PLUGINS

    env = {"MOERUN_PLUGINS": "moerun_broken", "PYTHONPATH": str(TEST_PLUGINS)}
    out = run_cli("plugins", env=env)
    assert out.returncode == 0
    assert "moerun.backends.torch [default]" in out.stdout
    assert "FAILED moerun_broken" in out.stdout and "broken on purpose" in out.stdout


def test_help_lists_commands_and_options():
    out = run_cli("--help")
    for word in ("backends", "models", "plugins", "--backend", "--precision", "--output", "--json"):
        assert word in out.stdout


def test_install_hints_survive_table_markup():
    out = run_cli("backends")
    assert "moerun[tensorrt]" in out.stdout.replace("│", "").replace("\n", "").replace(" ", "")
