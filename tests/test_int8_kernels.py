"""int8 on ONNX Runtime computes the same integers on every x86 CPU.

Without AVX512-VNNI, MLAS's u8 x s8 kernel sums pairs of products in saturating 16-bit lanes
(backends/onnxruntime/int8.py). These tests hold the choice of kernel to the CPU's features,
check the numpy model of the saturating kernel, and show on any machine, this one included,
that the weights a pre-VNNI CPU would multiply leave no sum to clip. Where qemu-user is
installed (CI installs it), the real ONNX Runtime also runs under an emulated AVX2 CPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moerun import LoadSettings
from moerun.checkpoint import synthetic_checkpoint
from moerun.parity import teacher_forced_logits
from moerun.point import token_ids

pytest.importorskip("onnxruntime")
from moerun.backends.onnxruntime import int8  # noqa: E402

AVX2_ONLY = {"AVX2": True, "FMA3": True, "F16C": True, "AVX512F": False, "AVX512VNNI": False}
AVX512_NO_VNNI = {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": False}
VNNI = {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": True}


def test_the_weights_and_kernel_follow_the_cpu():
    for features in (AVX2_ONLY, AVX512_NO_VNNI):
        assert int8.saturates(features, "x86_64") and int8.weights_for_cpu(features, "x86_64") == "u8"
        k = int8.int8_kernel("u8", features, "x86_64")
        assert (k["kernel"], k["exact"], k["session_option"]) == ("u8u8", True, None)
        # an s8 graph built elsewhere: ONNX Runtime's rewrite, which misses If branches
        k = int8.int8_kernel("s8", features, "x86_64")
        assert (k["kernel"], k["exact"], k["session_option"]) == ("u8u8", None, "1") and "If branches" in k["why"]
    assert not int8.saturates(VNNI, "x86_64") and int8.weights_for_cpu(VNNI, "x86_64") == "s8"
    k = int8.int8_kernel("s8", VNNI, "x86_64")
    assert (k["kernel"], k["exact"], k["session_option"]) == ("u8s8", True, None) and "VNNI" in k["why"]
    assert "faster" in int8.int8_kernel("u8", VNNI, "x86_64")["why"]  # exact, but not the fast kernel there
    assert int8.weights_for_cpu(AVX2_ONLY, "aarch64") == "s8"  # no saturating kernel off x86


def test_the_saturating_kernel_model_clips_pair_sums_to_16_bits():
    a = np.array([[255, 255, 1, 0]], np.uint8)
    b = np.array([[127], [127], [-5], [9]], np.int8)
    # 255*127*2 = 64770 clips to 32767; the second pair (-5) is exact
    assert int8.saturating_u8s8(a, b).tolist() == [[32767 - 5]]
    assert (a.astype(np.int64) @ b.astype(np.int64)).tolist() == [[64770 - 5]]
    neg = int8.saturating_u8s8(a, -b)
    assert neg.tolist() == [[-32768 + 5]]
    rng = np.random.default_rng(0)  # small values never clip: the model is a plain matmul then
    a, b = rng.integers(0, 64, (3, 33), dtype=np.uint8), rng.integers(-64, 64, (33, 5), dtype=np.int8)
    assert (int8.saturating_u8s8(a, b) == a.astype(np.int64) @ b.astype(np.int64)).all()


def _weights_as_run(artifact, option, tmp_path):
    """The integer GEMMs' weights as ONNX Runtime runs them (its optimised graph, If branches
    included, after any s8 -> u8 rewrite that session.x64quantprecision = `option` asks)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if option is not None:
        so.add_session_config_entry(int8.SESSION_OPTION, option)
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(artifact.path), sess_options=so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "optimised.onnx"))
    out = []

    def walk(graph, inits):
        inits = {**inits, **{t.name: t for t in graph.initializer}}  # a branch sees the outer scope's
        for node in graph.node:
            if node.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"):
                zp = node.input[3] if len(node.input) > 3 else ""  # b_zero_point in all three
                b = numpy_helper.to_array(inits[node.input[1]])
                out.append((b, numpy_helper.to_array(inits[zp]) if zp in inits else np.zeros((), b.dtype)))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, inits)

    walk(model.graph, {})
    return out


def _clipped_outputs(weights, rng) -> int:
    """How many outputs the pre-VNNI kernel would get wrong, for u8 activations spanning
    0..255 as DynamicQuantizeLinear makes them: s8 weights go through the saturating
    u8 x s8 model, u8 weights through u8 x u8 (widened to 16 bits first: exact)."""
    wrong = 0
    for b, _ in weights:
        a = rng.integers(0, 256, (16, b.shape[0]), dtype=np.uint8)
        exact = a.astype(np.int64) @ b.astype(np.int64)
        got = int8.saturating_u8s8(a, b) if b.dtype == np.int8 else exact  # u8u8 never clips
        wrong += int((got != exact).sum())
    return wrong


@pytest.mark.parametrize("name,formulation", [("tiny-dense", "grouped"), ("tiny-moe", "grouped"),
                                              ("tiny-olmoe", "standard"), ("tiny-moe", "contrib")])
def test_a_cpu_without_vnni_multiplies_weights_no_sum_can_clip(plugins, cache, tmp_path, monkeypatch, name,
                                                               formulation):
    """On any machine: pretend the CPU is an AVX2 one and look at every integer GEMM's weights
    (If branches included) as ONNX Runtime would multiply them. moerun's artifact for that CPU
    holds u8 codes (no output can clip); the s8 artifact the old code built, even with ONNX
    Runtime's own rewrite on, clips many (the grouped experts inside If branches)."""
    from conftest import onnxruntime_with_formulation

    spec = plugins.models.resolve(name)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    b = onnxruntime_with_formulation(formulation)
    monkeypatch.setattr(int8, "cpu_features", lambda: dict(AVX2_ONLY))
    art = b.prepare(ck, "int8", cache)
    assert art.meta["int8_weights"] == "u8"
    with b.load(art, LoadSettings(max_context=16)) as s:
        assert s.describe()["kernel_path"] == "int8 u8u8" and s.describe()["int8_kernel"]["exact"] is True
    now = _weights_as_run(art, None, tmp_path)
    monkeypatch.setattr(int8, "cpu_features", lambda: dict(VNNI))
    old = b.prepare(ck, "int8", cache)  # the s8 artifact, in its own cache folder
    assert old.meta["int8_weights"] == "s8" and old.path != art.path
    before = _weights_as_run(old, "1", tmp_path)  # ONNX Runtime's own remedy on
    assert now and len(now) == len(before)
    assert {w.dtype for w, _ in now} == {np.dtype(np.uint8)} and {int(z) for _, z in now} == {128}
    rng = np.random.default_rng(1)
    assert _clipped_outputs(now, rng) == 0
    if formulation == "grouped" and spec.is_moe:  # the rewrite misses the experts inside If branches
        assert _clipped_outputs(before, rng) > 0
    assert _clipped_outputs(_weights_as_run(old, None, tmp_path), rng) > 0  # the old session: no remedy


def test_parity_records_say_which_int8_kernel_ran(plugins, cache):
    from moerun.point import Point
    from moerun.runner import measure

    r = measure(Point(model="tiny-dense", backend="onnxruntime", precision="int8", prompt_tokens=8, new_tokens=2,
                      repetitions=1, warmup=0, parity=True), plugins, cache, {})
    assert r["status"] == "ok", r.get("error")
    want = "int8 " + int8.int8_kernel(int8.weights_for_cpu())["kernel"]
    assert r["parity"]["kernel_path"] == want and r["session"]["kernel_path"] == want
    assert r["session"]["int8_kernel"]["why"]


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed: the emulated AVX2 run needs qemu-x86_64 "
                                         "(apt-get install qemu-user; .ci/run installs it)")
@pytest.mark.parametrize("name,formulation", [("tiny-dense", "standard"), ("tiny-moe", "grouped"),
                                              ("tiny-moe", "contrib")])
def test_onnxruntime_int8_under_an_emulated_avx2_cpu_matches_this_one(plugins, cache, tmp_path, name, formulation):
    """The real ONNX Runtime under `qemu-x86_64 -cpu Haswell` (AVX2, FMA, F16C; no AVX-512,
    no VNNI): MLAS picks its AVX2 kernels from the emulated CPUID, moerun builds u8 weights,
    and the logits match this machine's (the old graphs differed by 2-4 there)."""
    from conftest import onnxruntime_with_formulation

    spec = plugins.models.resolve(name)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    b = onnxruntime_with_formulation(formulation)
    ids = token_ids(spec.vocab_size, 24, seed=4)
    with b.load(b.prepare(ck, "int8", cache), LoadSettings(max_context=24)) as s:
        here = teacher_forced_logits(s, ids, 16)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import onnxruntime_with_formulation
        from moerun import Cache, Checkpoint, LoadSettings
        from moerun.parity import teacher_forced_logits
        from moerun.backends.onnxruntime import int8
        assert not int8.cpu_features().get("AVX512VNNI")
        b = onnxruntime_with_formulation({formulation!r})
        art = b.prepare(Checkpoint.open({str(ck.path)!r}, name={spec.name!r}), "int8", Cache({str(cache.root)!r}))
        with b.load(art, LoadSettings(max_context=24)) as s:
            print(s.describe()["kernel_path"], art.meta["int8_weights"], file=sys.stderr)
            np.save({str(tmp_path / 'emulated.npy')!r}, teacher_forced_logits(s, {ids!r}, 16))
    """)
    done = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "int8 u8u8 u8" in done.stderr
    emulated = np.load(tmp_path / "emulated.npy")
    # the integers are identical; the float kernels around them (AVX2 vs AVX-512 sgemm) round differently
    assert float(np.abs(emulated - here).max()) < 1e-3
    assert (emulated.argmax(-1) == here.argmax(-1)).all()
