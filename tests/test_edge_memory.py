"""Preparation that streams, 4-bit weights in standard ONNX, and whether a point fits a device.

The builder quantises and writes each tensor as it goes (external data past 1 GiB of fp32);
int4 rides opset 21's blocked DequantizeLinear, which onnxruntime fuses into MatMulNBits;
`--fit DEVICE` skips what cannot fit before anything is prepared, and every result says
which device profiles its measured peak fits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import onnxruntime_with_formulation, run_cli
from moerun import LoadSettings
from moerun.checkpoint import synthetic_checkpoint
from moerun.parity import teacher_forced_logits
from moerun.point import Point, token_ids
from moerun.runner import measure


def _ort(path, optimized=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def test_a_streamed_graph_holds_no_weights_and_computes_the_same(plugins, cache, tmp_path):
    import onnx

    from moerun.backends.onnxgraph.builder import build_onnx

    spec = plugins.models.resolve("tiny-olmoe")
    ck = synthetic_checkpoint(spec, cache, seed=0)
    streamed = build_onnx(ck, formulation="grouped", external_data=tmp_path / "model.onnx.data")
    in_memory = build_onnx(ck, formulation="grouped")
    assert streamed.ByteSize() < in_memory.ByteSize() / 3
    external = [t for t in streamed.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    lengths = [int(dict((e.key, e.value) for e in t.external_data)["length"]) for t in external]
    assert sum(lengths) > 0.9 * spec.total_params * 4
    _assert_same_logits(spec, streamed, in_memory, [3, 5, 7], tmp_path)


def _assert_same_logits(spec, proto_a, proto_b, ids, tmp_path):
    """Both graphs, saved and run by onnxruntime on one prompt, give identical logits."""
    import onnx

    onnx.save_model(proto_a, str(tmp_path / "a.onnx"))
    onnx.save_model(proto_b, str(tmp_path / "b.onnx"))
    feed = {"input_ids": np.array([ids], np.int64), "logits_from": np.array([0], np.int64)}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            feed[f"past_{kind}_{i}"] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    a = _ort(tmp_path / "a.onnx").run(["logits"], feed)[0]
    b = _ort(tmp_path / "b.onnx").run(["logits"], feed)[0]
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_weights_streamed_in_parts_build_the_same_graph(plugins, cache, tmp_path, monkeypatch, bits):
    """The embedding read and written a few rows at a time, the head quantised a few columns
    (checkpoint rows) at a time and its int4 codes packed a few rows at a time: the streamed
    graph computes exactly what the graph built whole in memory does."""
    from moerun.backends.onnxgraph import builder, graph, quantize

    spec = plugins.models.resolve("tiny-moe")  # untied head: embedding and lm_head both
    ck = synthetic_checkpoint(spec, cache, seed=0)
    whole = builder.build_onnx(ck, formulation="grouped", weight_bits=bits)
    monkeypatch.setattr(builder.OnnxDecoderBuilder, "STREAM_CHUNK_BYTES", 3 * spec.hidden_size * 4 + 8)  # 3 rows a part
    monkeypatch.setattr(quantize, "COLUMN_CHUNK", 40)
    monkeypatch.setattr(graph, "INT4_PACK_ROWS", 6)
    parts = builder.build_onnx(ck, formulation="grouped", weight_bits=bits, external_data=tmp_path / "a.onnx.data")
    _assert_same_logits(spec, parts, whole, [3, 5, 7, 11], tmp_path)


def test_checkpoint_reads_a_stretch_of_rows(plugins, cache):
    from moerun import CheckpointError

    spec = plugins.models.resolve("tiny-moe")
    for dtype in ("float32", "bfloat16"):
        ck = synthetic_checkpoint(spec, cache, seed=0, dtype=dtype)
        name = "model.embed_tokens.weight"
        whole = ck.read(name)
        assert ck.shape(name) == whole.shape
        np.testing.assert_array_equal(ck.read(name, rows=(5, 17)), whole[5:17])
        assert ck.read(name, rows=(9, 9)).shape == (0, spec.hidden_size)
        with pytest.raises(CheckpointError, match="has no rows 3:2"):
            ck.read(name, rows=(3, 2))
        with pytest.raises(CheckpointError, match=f"has no rows 0:{spec.vocab_size + 1}"):
            ck.read(name, rows=(0, spec.vocab_size + 1))
        for look in (ck.read, ck.shape):
            with pytest.raises(CheckpointError, match="no tensor model.nope"):
                look("model.nope")


# tiny models (hidden 64) quantise badly at 4 bits: the bounds hold the graphs to what
# symmetric per-channel int8 and block-32 int4 give on them (tests/test_onnxruntime_backend.py
# holds MatMulNBits to the same top-1 floor)
@pytest.mark.parametrize("precision,atol,top1", [("int8", 0.6, 0.8), ("int4", 5.0, 0.6)])
@pytest.mark.parametrize("model,formulation", [("tiny-olmoe", "grouped"), ("tiny-moe", "grouped"),
                                               ("tiny-dense", "grouped"), ("tiny-olmoe", "standard"),
                                               ("tiny-moe", "standard")])  # a dense graph has no MoE to formulate
def test_standard_op_graphs_run_quantised_weights_close_to_the_reference(plugins, cache, tmp_path, model,
                                                                           formulation, precision, atol, top1):
    """Every weight MatMul but the routers at int8 or int4, experts included (inside If
    branches for grouped), with opset-21 standard ops only: onnxruntime fuses the int4
    DequantizeLinear + MatMul pairs into MatMulNBits."""
    import onnx

    from moerun.backends.onnxgraph.builder import build_onnx

    spec = plugins.models.resolve(model)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    bits = {"int8": 8, "int4": 4}[precision]
    proto = build_onnx(ck, formulation=formulation, weight_bits=bits)
    assert {o.domain for o in proto.opset_import} == {""} and proto.opset_import[0].version == 21
    path = tmp_path / "q.onnx"
    onnx.save_model(proto, str(path))
    _ort(path, optimized=tmp_path / "opt.onnx")  # writes the graph as onnxruntime optimised it
    ops = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx"), load_external_data=False).graph.node}
    if precision == "int4":
        assert "MatMulNBits" in ops, ops  # the fast 4-bit kernel, from standard ops
    ids = token_ids(spec.vocab_size, 16, seed=4)
    torch_backend = plugins.backends.get("torch")()
    ref = torch_backend.load(torch_backend.prepare(ck, "fp32", cache), LoadSettings(max_context=16))
    want = teacher_forced_logits(ref, ids, 8)
    backend = onnxruntime_with_formulation(formulation)
    art = backend.prepare(ck, precision, cache)
    assert art.meta["moe_formulation"] == (formulation if spec.is_moe else None)
    with backend.load(art, LoadSettings(max_context=16)) as s:
        got = teacher_forced_logits(s, ids, 8)
    diff = float(np.abs(got - want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(f"{model} {formulation} {precision}: max |diff| {diff:.3f}, top-1 {agree:.0%}")
    assert diff < atol and agree >= top1


def test_streamed_preparation_holds_a_fraction_of_the_in_memory_build(plugins, cache, tmp_path):
    """Peak RSS of building small-moe's int4 graph in a fresh process, streamed into external
    data against held in memory (88 M parameters, 354 MB of fp32)."""
    spec = plugins.models.resolve("small-moe")
    ck = synthetic_checkpoint(spec, cache, seed=0)
    # VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across fork + exec
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from moerun import Checkpoint
        from moerun.backends.onnxgraph.builder import build_onnx
        from moerun.memory import status
        ck = Checkpoint.open(Path(sys.argv[1]))
        out = Path(sys.argv[2])
        base = status()["hwm_bytes"]
        ext = out / "m.onnx.data" if sys.argv[3] == "stream" else None
        model = build_onnx(ck, formulation="grouped", weight_bits=4, external_data=ext)
        print(base, status()["hwm_bytes"])
    """)
    peaks = {}
    for mode in ("stream", "memory"):
        out = subprocess.run([sys.executable, "-c", script, str(ck.path), str(tmp_path), mode],
                             capture_output=True, text=True, check=True).stdout.split()
        base, peak = map(int, out)
        peaks[mode] = peak - base
    print(f"small-moe int4 build, peak RSS over the interpreter's: streamed {peaks['stream'] / 2**20:.0f} MiB, "
          f"in memory {peaks['memory'] / 2**20:.0f} MiB")
    assert peaks["stream"] < 0.6 * peaks["memory"]


def test_fit_skips_what_cannot_fit_before_preparing_and_records_what_fits(plugins, cache, tmp_path):
    # OLMoE-1B-7B at f16 (13.8 GB) on the 8 GB Jetson: unsupported at once, no checkpoint written
    big = measure(Point(model="olmoe-1b-7b", backend="llamacpp", precision="f16", fit="jetson-orin-nano-8gb"),
                  plugins, cache)
    assert big["status"] == "unsupported"
    assert "would not fit jetson-orin-nano-8gb" in big["error"] and "6.5 of its 8 GB are usable" in big["error"]
    assert not list((cache.root / "checkpoints").glob(f"{plugins.models.resolve('olmoe-1b-7b').fingerprint}*"))
    small = measure(Point(model="tiny-moe", backend="torch", fit="jetson-orin-nano-8gb", repetitions=1,
                          prompt_tokens=4, new_tokens=2), plugins, cache)
    assert small["status"] == "ok" and small["point"]["fit"] == "jetson-orin-nano-8gb"
    assert all(small["fits"]["devices"].values()) and small["fits"]["peak_bytes"] == small["memory"]["peak_rss_bytes"]
    assert Point(model="tiny-moe", backend="torch", fit="h200").key == Point(model="tiny-moe", backend="torch").key
    out = tmp_path / "fit.jsonl"
    r = run_cli("-b", "llamacpp", "-m", "olmoe-1b-7b", "--no-twins", "-p", "f16", "--fit", "jetson-orin-nano-8gb",
                "-o", str(out), "--json", "-q")
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(r.stdout)["results"]
    assert rec["status"] == "unsupported" and "would not fit" in rec["error"]
    r = run_cli("-b", "llamacpp", "-m", "tiny-moe", "--fit", "nano")
    assert r.returncode == 2 and "unknown hardware 'nano'" in r.stderr


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16"])
def test_gguf_vocabulary_tables_written_in_row_blocks_are_byte_identical(plugins, cache, tmp_path, monkeypatch,
                                                                          out_type):
    """The embedding and the output head go to the GGUF a few rows at a time; the file is the
    same, byte for byte, as with both written in one block."""
    from moerun.backends.llamacpp import gguf_export

    ck = synthetic_checkpoint(plugins.models.resolve("tiny-moe"), cache, seed=0)  # untied: both tables
    with monkeypatch.context() as m:
        m.setattr(gguf_export, "ROW_STREAMED", {})  # every tensor read and converted whole
        gguf_export.write_gguf(ck, tmp_path / "one.gguf", out_type)
    monkeypatch.setattr(gguf_export, "ROW_BLOCK_BYTES", 5 * ck.spec.hidden_size * 4)  # 5 rows a block
    gguf_export.write_gguf(ck, tmp_path / "parts.gguf", out_type)
    assert (tmp_path / "one.gguf").read_bytes() == (tmp_path / "parts.gguf").read_bytes()
