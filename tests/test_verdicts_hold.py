"""What makes a verdict hold, with the real engines: memory that is the engine's, a bandwidth
probe, preflight before anything is measured, the busy-machine guard, and rounds end to end
through the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from moerun import ModelSpec, Point, run_isolated, write_synthetic
from moerun.records import point_results

BACKENDS = [("torch", "fp32"), ("llamacpp", "f16"), ("onnxruntime", "fp32"), ("onnxruntime-contrib", "fp32")]
ONE_ROUND = ["--min-rounds", "1", "--target", "0", "-q"]

# An MoE whose experts hold most of its weights (32 experts, top-2): its total-parameter count is
# about 5x its active twin's, so the loaded engines' memory must differ by tens of megabytes.
MOE = ModelSpec(name="memory-moe", family="mixtral", vocab_size=512, hidden_size=256, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=64, intermediate_size=512, num_experts=32, top_k=2,
                max_position_embeddings=256)


@pytest.fixture(scope="module")
def moe_and_twin(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    paths = {}
    for spec in (MOE, MOE.dense_twin("active")):
        path = root / spec.name.replace(":", "-")
        write_synthetic(spec, path)
        paths[spec.name] = (spec, path)
    return paths


@pytest.mark.parametrize("backend, precision", BACKENDS)
def test_after_load_rss_follows_the_weights_on_every_backend(moe_and_twin, cache, backend, precision):
    got = {}
    for name, (spec, path) in moe_and_twin.items():
        r = run_isolated(Point(model=str(path), backend=backend, precision=precision, prompt_tokens=8, new_tokens=4,
                               repetitions=1, timeout_s=300), cache=cache, env={})
        assert r["status"] == "ok", r.get("error")
        got[name] = (spec, r["memory"])
    (moe_spec, moe), (twin_spec, twin) = got[MOE.name], got[f"{MOE.name}:dense-active"]
    from moerun import get_precision

    weight_diff = (moe_spec.total_params - twin_spec.total_params) * get_precision(precision).bits_per_weight / 8
    rss_diff = moe["rss_after_load_bytes"] - twin["rss_after_load_bytes"]
    assert weight_diff > 20e6
    # direction and order of magnitude: the engine holds the MoE's extra weights once, about
    assert 0.5 * weight_diff < rss_diff < 2.5 * weight_diff, (rss_diff, weight_diff)
    assert moe["engine_rss_bytes"] - twin["engine_rss_bytes"] > 0.5 * weight_diff
    for m in (moe, twin):
        # current RSS, not a high-water mark of the harness: the timed peak is reset before the
        # timed phase and cannot sit below what was resident when it started
        assert m["peak_rss_bytes"] >= m["rss_after_load_bytes"] * 0.9
        assert m["rss_before_load_bytes"] < m["rss_after_load_bytes"]
        assert "clear_refs" in m["timed_peak_method"]
    assert moe["peak_rss_bytes"] != twin["peak_rss_bytes"]


def test_bandwidth_probe_takes_the_best_kernel_and_is_cached(tmp_path):
    from moerun.environment import bandwidth_probe, measure_read_bandwidth

    probe = measure_read_bandwidth(nbytes=64 << 20, rounds=2, cache_root=tmp_path)
    kernels = probe["per_kernel_bytes_s"]
    assert {"numpy-sum", "c-1-stream", "c-4-stream"} <= set(kernels)  # the C kernels built here
    assert probe["bandwidth_bytes_s"] == max(kernels.values()) and probe["kernel"] in kernels
    assert all(v > 1e9 for v in kernels.values())
    first = bandwidth_probe(tmp_path)
    again = bandwidth_probe(tmp_path)  # cached, checked by a quick probe that may only raise it
    assert again["bandwidth_bytes_s"] >= first["bandwidth_bytes_s"]
    if not first["contention"]["contended"]:  # a probe on a busy machine is not cached
        assert again["cached"] or again["bandwidth_bytes_s"] > first["bandwidth_bytes_s"]
        (cached_file,) = (tmp_path / "machine").glob("bandwidth-*.json")
        stale = json.loads(cached_file.read_text())
        low = {k: 1e9 for k in stale["per_kernel_bytes_s"]}  # figures the machine beats, from the weakest kernel
        cached_file.write_text(json.dumps({**stale, "bandwidth_bytes_s": 1e9, "kernel": "numpy-sum",
                                           "per_kernel_bytes_s": low}))
        raised = bandwidth_probe(tmp_path)
        assert not raised["cached"] and raised["bandwidth_bytes_s"] > 1e9
        # the quick look tried every kernel, not only the cached winner, and the best one won
        assert all(v > 1e9 for v in raised["per_kernel_bytes_s"].values())
        assert raised["bandwidth_bytes_s"] == max(raised["per_kernel_bytes_s"].values())
        assert raised["per_kernel_bytes_s"][raised["kernel"]] == raised["bandwidth_bytes_s"]
        assert json.loads(cached_file.read_text())["bandwidth_bytes_s"] == raised["bandwidth_bytes_s"]


def test_mbu_divides_by_a_ceiling_measured_right_after_the_point(plugins, cache):
    from moerun import measure

    env = {"bandwidth_bytes_s": 1e6, "bandwidth_kernel": "numpy-sum"}  # a stale figure far too low
    r = measure(Point(model="tiny-moe", backend="torch", prompt_tokens=8, new_tokens=4, repetitions=1), plugins, cache,
                env)
    now = r["bandwidth_after_timed"]["bytes_s"]
    assert now > 1e9 and r["metrics"]["mbu_reference_bytes_s"] == now
    assert r["metrics"]["mbu"] == pytest.approx(r["metrics"]["achieved_bandwidth_bytes_s"] / now)


def test_mbu_above_the_probe_is_flagged_not_printed(plugins, cache):
    from moerun import measure
    from moerun.plugins.reporters import table
    import io

    r = measure(Point(model="tiny-moe", backend="torch", prompt_tokens=8, new_tokens=4, repetitions=1), plugins, cache,
                {"bandwidth_bytes_s": 1e6})  # a probe far below what any engine reads
    assert r["metrics"]["mbu"] > 1 and r["metrics"]["mbu_exceeds_probe"]
    out = io.StringIO()
    table(point_results([r]), [], out)
    assert "exceeds probe" in out.getvalue()
    assert "%" not in out.getvalue().split("exceeds probe")[0].rsplit("\n", 1)[-1].split("│")[-2]


def _gguf_header(n_tensors=1, n_kv=0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv)


@pytest.mark.parametrize("kind", ["random", "header-only", "truncated", "negative-size", "top-k-above-experts"])
def test_bad_inputs_fail_in_preflight_before_any_probe(tmp_path, cache, kind):
    if kind == "random":
        model = tmp_path / "random.gguf"
        model.write_bytes(os.urandom(4096))
    elif kind == "header-only":
        model = tmp_path / "header.gguf"
        model.write_bytes(_gguf_header())
    elif kind == "truncated":
        good = run_isolated(Point(model="tiny-moe", backend="llamacpp", precision="f32", prompt_tokens=4,
                                  new_tokens=1, repetitions=1), cache=cache, env={})
        data = open(good["artifact"]["path"], "rb").read()
        model = tmp_path / "truncated.gguf"
        model.write_bytes(data[: len(data) // 2])
    else:
        model = tmp_path / kind
        model.mkdir()
        cfg = {"model_type": "mixtral", "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
               "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 128}
        if kind == "negative-size":
            cfg["hidden_size"] = -64
        else:
            cfg["num_experts_per_tok"] = 12
        (model / "config.json").write_text(json.dumps(cfg))
    out_file = tmp_path / "r.jsonl"
    fresh = tmp_path / "cache"  # a cache of its own: what the run wrote in it shows what it did
    out = run_cli("-m", str(model), "-o", str(out_file), "--min-rounds", "1", "--target", "0",
                  env={"MOERUN_CACHE_DIR": str(fresh)})
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()  # not quiet: a probe or a measurement would have said so
    assert len(lines) == 1 and lines[0].startswith("moerun: error:"), out.stderr
    assert not out_file.exists(), "nothing may be measured"
    # no bandwidth probe, checkpoint or engine file came before the error
    assert not fresh.exists() or not any(p.is_file() for p in fresh.rglob("*")), sorted(fresh.rglob("*"))


def _burner():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_busy_machine_is_refused_or_flagged(tmp_path):
    burner = _burner()
    try:
        time.sleep(1.0)
        out = run_cli("-b", "llamacpp", "-m", "tiny-moe", "--no-twins", "--if-busy", "refuse",
                      "-o", str(tmp_path / "x.jsonl"), *ONE_ROUND)
        assert out.returncode == 2 and "busy" in out.stderr and "refuse" in out.stderr
        assert not (tmp_path / "x.jsonl").exists()
        out_file = tmp_path / "busy.jsonl"
        # one engine thread: with two on a 2-core machine beside a burner, llama.cpp's threads
        # wait on each other for whole time slices (200 tokens took minutes), not the point here
        out = run_cli("-b", "llamacpp", "-m", "tiny-moe", "--prompt-tokens", "32", "--new-tokens", "400",
                      "--repetitions", "3", "--threads", "1", "-o", str(out_file), "--json", *ONE_ROUND)
    finally:
        burner.kill()
        burner.wait()
    assert out.returncode == 0, out.stderr
    assert "warning: the machine is busy" in out.stderr and "python" in out.stderr
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    timed = [r["contention"]["timed"] for r in rows]
    assert all(t["others_cores"] > 0.5 for t in timed), timed
    assert all(t["contended"] for t in timed)
    doc = json.loads(out.stdout)
    assert all(r["contended"] for r in doc["results"]) and doc["verdicts"][0]["contended"]


def test_if_busy_wait_waits_for_the_burner_to_stop(tmp_path):
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass"])
    try:
        time.sleep(0.5)
        out_file = tmp_path / "wait.jsonl"
        out = run_cli("-b", "llamacpp", "-m", "tiny-moe", "--no-twins", "--prompt-tokens", "8", "--new-tokens", "4",
                      "--repetitions", "1", "--if-busy", "wait", "--wait-limit", "60", "-o", str(out_file), *ONE_ROUND)
    finally:
        burner.kill()
        burner.wait()
    assert out.returncode == 0, out.stderr
    assert "waiting up to 60 s for quiet" in out.stderr and "still busy" not in out.stderr
    # it measured only once the burner had ended: the look it recorded before measuring was quiet
    before = [json.loads(line)["env"]["contention_before"] for line in out_file.read_text().splitlines()]
    assert before and not any(b["contended"] for b in before), before
    (r,) = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert not r["env"]["contention_before"]["contended"]  # the look that let it start was quiet


@pytest.mark.parametrize("lockstep,method", [
    ("--no-lockstep", "paired rounds (between processes)"),
    ("--lockstep", "lockstep: a ratio per cycle, restarts as a random effect")])
def test_rounds_through_the_cli_pair_sides_and_resume(tmp_path, lockstep, method):
    out_file = tmp_path / "rounds.jsonl"
    args = ["-b", "llamacpp", "-m", "tiny-moe", "--prompt-tokens", "8", "--new-tokens", "4", "--repetitions", "2",
            "--min-rounds", "3", "--max-rounds", "4", "--target", "1", "--no-isomem", "-o", str(out_file), "--json",
            "-q", lockstep, "--unit-s", "0.02"]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    rounds = {}
    for r in rows:
        rounds.setdefault(r["round"], []).append(r["role"])
        assert r["protocol"]["target"] == 0.01 and r["isolated"]
    assert 3 <= len(rounds) <= 4 and all(sorted(v) == ["dense-active", "dense-total", "moe"] for v in rounds.values())
    doc = json.loads(out.stdout)
    assert [len(r["rounds"]) for r in doc["results"]] == [len(rounds)] * 3
    (v,) = doc["verdicts"]
    busy = {r["round"] for r in rows if ((r.get("contention") or {}).get("timed") or {}).get("contended")}
    quiet = len(rounds) - len(busy)  # contended rounds are left out while min-rounds quiet ones remain
    assert v["rounds"] == (quiet if quiet >= 3 else len(rounds)) and v["method"] == method
    assert ("comparisons measured: 1 lockstep" in out.stderr) == (lockstep == "--lockstep")
    lo, hi = v["decode_vs_active_ci95"]
    assert lo < v["decode_vs_active"] < hi
    assert "rounds stopped" in out.stderr
    again = run_cli(*args)  # resumed: the protocol is satisfied or at max-rounds; nothing new unless needed
    after = out_file.read_text().splitlines()
    assert len(after) <= 12 and len(after) >= len(rows)
    assert json.loads(again.stdout)["results"][0]["rounds"][0]["resumed"]


def test_mbu_now_divides_by_the_probe_of_the_same_minutes(plugins, cache):
    """MBU's ceiling is the day's highest probe; MBU now divides by the probe right after."""
    from moerun import measure
    from moerun.plugins.reporters import csv_report, table
    import io

    env = {"bandwidth_bytes_s": 1e15, "bandwidth_kernel": "numpy-sum"}  # a ceiling no machine reaches
    r = measure(Point(model="tiny-moe", backend="torch", prompt_tokens=8, new_tokens=4, repetitions=1), plugins, cache,
                env)
    m, now = r["metrics"], r["bandwidth_after_timed"]["bytes_s"]
    assert m["mbu_reference_bytes_s"] == 1e15 and m["mbu"] < 1e-3
    assert m["mbu_now"] == pytest.approx(m["achieved_bandwidth_bytes_s"] / now) and m["mbu_now"] > 100 * m["mbu"]
    out, rows = io.StringIO(), io.StringIO()
    table(point_results([r]), [], out)
    csv_report(point_results([r]), [], rows)
    assert "MBU now" in out.getvalue() and f"{m['mbu_now']:.0%}" in out.getvalue()
    assert "mbu_now" in rows.getvalue().splitlines()[0]
