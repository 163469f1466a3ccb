"""The llama.cpp backend on the real llama-cpp-python: GGUF export of every family, parity
with the PyTorch reference, quantization, bad files, and GGUF files measured directly."""

from __future__ import annotations

import numpy as np
import pytest

from moerun import (CheckpointError, LoadSettings, Point, UnsupportedError, measure, synthetic_checkpoint,
                    teacher_forced_logits, token_ids)
from moerun.presets import TINY

FAMILIES = [s.name for s, _ in TINY if s.name.startswith("tiny-")]
EXACT = {"type_k": "f32", "type_v": "f32", "flash_attn": False}


@pytest.fixture(scope="module")
def backends():
    from moerun import get_plugin_manager

    pm = get_plugin_manager(entrypoints=False)
    if not pm.backends.get("llamacpp")().availability().available:
        pytest.skip("llama-cpp-python is not installed")
    return pm, pm.backends.get("torch")(), pm.backends.get("llamacpp")()


def _reference(torch_backend, ck, cache, ids, n_prompt):
    s = torch_backend.load(torch_backend.prepare(ck, "fp32", cache), LoadSettings(max_context=64))
    return teacher_forced_logits(s, ids, n_prompt)


@pytest.mark.parametrize("name", FAMILIES)
def test_f32_matches_the_pytorch_reference(backends, cache, name):
    pm, tb, lb = backends
    spec = pm.models.resolve(name)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    ids = token_ids(spec.vocab_size, 24, seed=3)
    ref = _reference(tb, ck, cache, ids, 16)
    s = lb.load(lb.prepare(ck, "f32", cache), LoadSettings(max_context=64, options=EXACT))
    got = teacher_forced_logits(s, ids, 16)
    diff = np.abs(got - ref).max()
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{name} f32 (f32 KV, no flash attention): max abs diff {diff:.2e}, top-1 agreement {top1:.0%}")
    # Same f32 weights and f32 KV cache: only summation order differs (~1e-6 of logits ~3).
    assert diff < 1e-4 and top1 == 1.0
    s.close()


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe"])
@pytest.mark.parametrize("precision, min_top1", [("f16", 0.95), ("bf16", 0.9), ("q8_0", 0.8), ("q4_k_m", 0.5)])
def test_reduced_precisions_agree_on_top1(backends, cache, name, precision, min_top1):
    pm, tb, lb = backends
    spec = pm.models.resolve(name)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    ids = token_ids(spec.vocab_size, 48, seed=4)
    ref = _reference(tb, ck, cache, ids, 32)
    art = lb.prepare(ck, precision, cache)
    s = lb.load(art, LoadSettings(max_context=64))  # defaults: f16 KV, flash attention auto, no repack
    got = teacher_forced_logits(s, ids, 32)
    top1 = (got.argmax(-1) == ref.argmax(-1)).mean()
    print(f"{name} {precision}: top-1 agreement {top1:.0%}, max abs diff {np.abs(got - ref).max():.2f}, "
          f"{art.meta['bits_per_weight']:.2f} bits/weight")
    assert top1 >= min_top1
    assert s.describe()["use_extra_bufts"] is False  # the AMX repack path stays off by default
    s.close()


def test_artifacts_are_cached_by_content(backends, cache):
    pm, _, lb = backends
    ck = synthetic_checkpoint(pm.models.resolve("tiny-moe"), cache, seed=0)
    a = lb.prepare(ck, "q4_0", cache)
    mtime = a.path.stat().st_mtime_ns
    b = lb.prepare(ck, "q4_0", cache)
    assert a.path == b.path and b.path.stat().st_mtime_ns == mtime
    other = synthetic_checkpoint(pm.models.resolve("tiny-moe"), cache, seed=1)
    assert lb.prepare(other, "q4_0", cache).path != a.path
    # the float base is only an intermediate: a cached quantized file does not need it back
    base = lb.prepare(ck, "f32", cache).path
    base.unlink()
    assert lb.prepare(ck, "q4_0", cache).path == a.path and not base.exists()
    assert lb.prepare(ck, "f32", cache).path == base and base.exists()  # a half-emptied folder is rebuilt


def test_truncated_and_corrupt_gguf_are_clear_errors(backends, cache, tmp_path):
    pm, _, lb = backends
    ck = synthetic_checkpoint(pm.models.resolve("tiny-dense"), cache, seed=0)
    good = lb.prepare(ck, "f16", cache).path
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated GGUF"):
        lb.prepare_file(cut)
    with pytest.raises(CheckpointError, match="truncated GGUF"):
        lb.load(lb.prepare_file(good).__class__(backend="llamacpp", precision="f16", spec=ck.spec, path=cut,
                                                 size_bytes=0), LoadSettings())
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        lb.prepare_file(junk)
    garbled = tmp_path / "garbled.gguf"
    garbled.write_bytes(good.read_bytes()[:16] + b"\xff" * 200 + good.read_bytes()[216:])
    with pytest.raises(CheckpointError, match="corrupt or truncated GGUF"):
        lb.prepare_file(garbled)


def test_existing_gguf_is_measured_directly_with_its_spec(backends, cache, plugins):
    pm, _, lb = backends
    spec = pm.models.resolve("tiny-qwen2-moe")
    ck = synthetic_checkpoint(spec, cache, seed=0)
    path = lb.prepare(ck, "q8_0", cache).path
    art = lb.prepare_file(path)
    assert art.precision == "q8_0"
    assert art.spec.to_dict() | {"name": spec.name} == spec.to_dict()
    r = measure(Point(model=str(path), backend="llamacpp", prompt_tokens=8, new_tokens=4, repetitions=1),
                plugins, cache, {"bandwidth_bytes_s": 20e9})
    assert r["status"] == "ok", r.get("error")
    assert r["precision"] == "q8_0" and r["model"]["total_params"] == spec.total_params
    r = measure(Point(model=str(path), backend="llamacpp", precision="f16", prompt_tokens=8, new_tokens=4),
                plugins, cache, {})
    assert r["status"] == "unsupported" and "is q8_0" in r["error"]


def test_unsupported_precisions_and_shapes(backends, cache, plugins):
    pm, _, lb = backends
    r = measure(Point(model="tiny-moe", backend="llamacpp", precision="int8", prompt_tokens=8, new_tokens=2),
                plugins, cache, {})
    assert r["status"] == "unsupported" and "does not support precision 'int8'" in r["error"]
    import attrs

    gqa_olmoe = attrs.evolve(pm.models.resolve("tiny-olmoe"), num_kv_heads=2)
    with pytest.raises(UnsupportedError, match="olmoe graph"):
        lb.check(gqa_olmoe, "f16")
    renorm = attrs.evolve(pm.models.resolve("tiny-qwen2-moe"), norm_topk_prob=True)
    with pytest.raises(UnsupportedError, match="never renormalises"):
        lb.check(renorm, "f16")


def test_measurement_records_engine_counters_and_settings(backends, cache, plugins):
    r = measure(Point(model="tiny-moe", backend="llamacpp", precision="q4_k_m", prompt_tokens=16, new_tokens=8,
                      repetitions=2), plugins, cache, {"bandwidth_bytes_s": 20e9})
    assert r["status"] == "ok", r.get("error")
    reps = r["timings"]["engine_per_rep"]
    assert len(reps) == 2
    for e in reps:  # llama.cpp's own counters, reset with the KV cache every repetition
        assert e["prompt_tokens"] == 16 and e["eval_tokens"] == 8
        assert 0 < e["eval_ms"] <= e["moerun_decode_ms"] * 1.05
        assert 0 < e["prompt_eval_ms"] <= e["moerun_prefill_ms"] * 1.05
    assert r["session"]["repack"] is False and r["artifact"]["gguf_type"] == "q4_k_m"
