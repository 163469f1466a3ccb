"""TensorRT, tested through what runs here (no NVIDIA GPU, no TensorRT): its availability
report and error, and the ONNX graph it consumes. The engine build and run are UNVERIFIED
on CPU-only machines; scripts/gpu-check exercises them where a GPU exists."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from conftest import run_cli
from moerun import LoadSettings, Point, measure, synthetic_checkpoint, token_ids

HAS_TRT = importlib.util.find_spec("tensorrt") is not None

# Operators TensorRT 10's ONNX parser documents as supported (onnx-tensorrt operators.md),
# restricted to the ones this builder may emit.
TRT_SUPPORTED_OPS = {
    "Add", "Cast", "Concat", "Div", "Equal", "Gather", "Greater", "Identity", "If", "MatMul", "Mul", "Neg",
    "Pow", "Range", "ReduceMean", "ReduceSum", "Reshape", "ScatterElements", "Shape", "Sigmoid", "Slice",
    "Softmax", "Split", "Sqrt", "Squeeze", "Tile", "TopK", "Transpose", "Unsqueeze", "Where",
}


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here: the unavailable path cannot be shown")
def test_availability_says_why_and_how_to_install(plugins):
    av = plugins.backends.get("trt")().availability()
    assert not av.available
    assert "tensorrt not importable" in av.reason
    assert "moerun[tensorrt]" in av.install_hint


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_asking_for_trt_is_one_line_exit_2():
    out = run_cli("--backend", "trt", "--model", "tiny-moe")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("moerun: error: backend tensorrt is unavailable here: tensorrt not importable")
    assert "moerun[tensorrt]" in line
    rows = {r["name"]: r for r in json.loads(run_cli("backends", "--json").stdout)}
    assert rows["tensorrt"]["available"] is False and rows["tensorrt"]["capabilities"]["devices"] == ["cuda"]


def test_cpu_device_is_refused_before_any_work(plugins, cache):
    r = measure(Point(model="tiny-moe", backend="tensorrt", device="cpu"), plugins, cache, {})
    assert r["status"] in ("unsupported", "unavailable")


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-qwen2-moe", "tiny-olmoe", "tiny-qwen3-moe"])
def test_the_graph_tensorrt_consumes_is_valid_standard_onnx_and_matches_torch(plugins, cache, name):
    """The engine is built from exactly this graph (build_onnx, standard formulation): it passes
    onnx's full checker with shape inference, uses only operators TensorRT's parser supports,
    and reproduces the PyTorch reference when ONNX Runtime runs it."""
    import onnx

    from moerun.backends.onnxgraph.builder import build_onnx

    spec = plugins.models.resolve(name)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    model = build_onnx(ck, formulation="standard")
    onnx.checker.check_model(model, full_check=True)

    def ops(graph):
        for n in graph.node:
            yield n.op_type, n.domain
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield from ops(a.g)

    found = set(ops(model.graph))
    assert {d for _, d in found} <= {""}
    assert {o for o, _ in found} <= TRT_SUPPORTED_OPS
    # the same graph through ONNX Runtime, against torch
    ort_backend, torch_backend = plugins.backends.get("onnxruntime")(), plugins.backends.get("torch")()
    ids = token_ids(spec.vocab_size, 12, seed=7)
    outs = []
    for b in (ort_backend, torch_backend):
        s = b.load(b.prepare(ck, "fp32", cache), LoadSettings(max_context=32))
        outs.append(np.concatenate([s.prefill(ids[:8], all_logits=True), np.stack([s.decode(t) for t in ids[8:]])]))
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


@pytest.mark.skipif(not HAS_TRT, reason="tensorrt is not installed here (UNVERIFIED path)")
def test_engine_builds_and_matches_torch_on_a_gpu(plugins, cache):
    backend = plugins.backends.get("tensorrt")()
    if not backend.availability().available:
        pytest.skip(backend.availability().reason)
    spec = plugins.models.resolve("tiny-moe")
    ck = synthetic_checkpoint(spec, cache, seed=0)
    s = backend.load(backend.prepare(ck, "fp32", cache), LoadSettings(device="cuda", max_context=64))
    ref = plugins.backends.get("torch")()
    r = ref.load(ref.prepare(ck, "fp32", cache), LoadSettings(max_context=64))
    ids = token_ids(spec.vocab_size, 12, seed=7)
    a = np.concatenate([s.prefill(ids[:8], all_logits=True), np.stack([s.decode(t) for t in ids[8:]])])
    b = np.concatenate([r.prefill(ids[:8], all_logits=True), np.stack([r.decode(t) for t in ids[8:]])])
    assert np.abs(a - b).max() < 1e-2
