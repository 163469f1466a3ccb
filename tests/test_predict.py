"""Roofline predictions from published device profiles, calibrated by measured efficiency."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from moerun import ConfigError
from moerun.predict import HARDWARE, efficiency_from_results, predict
from moerun.presets import REAL
from moerun.records import point_results

OLMOE = next(r[0] for r in REAL if r[0].name == "olmoe-1b-7b")
LLAMA = next(r[0] for r in REAL if r[0].name == "llama-3.2-1b")


def test_decode_is_bound_by_bandwidth_and_scales_with_its_terms():
    """What a roofline prediction must do, checked through its behaviour: the rate scales with
    the efficiency, falls in inverse proportion to the bytes a token reads, and never asks for
    more bandwidth than the device has."""
    hw = HARDWARE["jetson-orin-nano-8gb"]

    def rate(precision: str, efficiency: float, context: int = 512) -> float:
        return predict(LLAMA, hw, precision=precision, context=context,
                       efficiency={"decode": efficiency, "prefill": 0.5})["decode_tok_s"]

    assert rate("q4_k_m", 0.8) == pytest.approx(2 * rate("q4_k_m", 0.4))
    read = {p: LLAMA.weight_bytes_per_token(p) + LLAMA.kv_bytes_per_token(512, 2.0) for p in ("q4_k_m", "q8_0")}
    assert rate("q4_k_m", 0.5) / rate("q8_0", 0.5) == pytest.approx(read["q8_0"] / read["q4_k_m"])
    assert rate("q4_k_m", 1.0) * read["q4_k_m"] <= hw.bandwidth_bytes_s * (1 + 1e-9)
    assert rate("q4_k_m", 0.5, context=4096) < rate("q4_k_m", 0.5, context=512)  # a longer context reads more KV


def test_models_that_do_not_fit_are_flagged_not_predicted():
    p = predict(OLMOE, HARDWARE["raspberry-pi-5-8gb"], precision="bf16")  # 13.8 GB of weights
    assert p["fits"] is False and "decode_tok_s" not in p and "needs 13.9 GB" in p["reason"]
    assert predict(OLMOE, HARDWARE["jetson-orin-nano-8gb"], precision="q4_k_m")["fits"] is True


def test_calibration_uses_measured_efficiency():
    rows = [{"key": f"p{i}", "status": "ok", "precision": "q4_k_m", "metrics": {"mbu": x, "s_mfu_prefill": 0.2}}
            for i, x in enumerate((0.6, 0.7, 0.9))]
    eff = efficiency_from_results(point_results(rows + [{"key": "p3", "status": "failed"}]), "q4_k_m")
    assert eff == {"decode": 0.7, "prefill": 0.2, "n": 3, "prefill_measured": True}
    with pytest.raises(ConfigError, match="no ok measurement"):
        efficiency_from_results(point_results(rows), "f16")


def test_cli_predicts_moe_and_twins_on_the_papers_edge_device():
    out = run_cli("predict", "--hardware", "jetson-orin-nano-8gb", "--model", "olmoe-1b-7b", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [r["model"] for r in rows] == ["olmoe-1b-7b", "olmoe-1b-7b:dense-active", "olmoe-1b-7b:dense-total"]
    moe, active, total = rows
    # roofline: the active twin reads about the same bytes per token; the total twin (6.9 B at
    # 4.9 bits, 4.2 GB: it fits in 8 GB) reads every weight, ~5x more
    assert 0.8 < moe["decode_tok_s"] / active["decode_tok_s"] < 1.2
    assert moe["decode_tok_s"] / total["decode_tok_s"] > 4
    assert moe["crossover"]["batch"] == 16 and "crossover" not in active
    text = run_cli("predict", "--hardware", "nope", "--model", "olmoe-1b-7b")
    assert text.returncode == 2 and "unknown hardware 'nope'" in text.stderr
    assert "jetson-orin-nano-8gb" in run_cli("predict", "--list").stdout
