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

import numpy as np
import pytest

from moerun import ConfigError, LoadSettings
from moerun.checkpoint import synthetic_checkpoint
from moerun.runner import teacher_forced_logits, token_ids

pytest.importorskip("onnxruntime")
from moerun.backends.onnxruntime import int8  # noqa: E402

AVX2_ONLY = {"AVX2": True, "FMA3": True, "F16C": True, "AVX512F": False, "AVX512VNNI": False}
AVX512_NO_VNNI = {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": False}
VNNI = {"AVX2": True, "AVX512F": True, "AVX512BW": True, "AVX512VNNI": True}


def test_the_kernel_follows_the_cpu():
    for features in (AVX2_ONLY, AVX512_NO_VNNI):
        k = int8.int8_kernel("auto", features, "x86_64")
        assert (k["kernel"], k["session_option"], k["exact"]) == ("u8u8", "1", True)
        assert "AVX512-VNNI" in k["why"]
    k = int8.int8_kernel("auto", VNNI, "x86_64")
    assert (k["kernel"], k["session_option"], k["exact"]) == ("u8s8", "0", True)
    assert int8.int8_kernel("auto", AVX2_ONLY, "aarch64")["session_option"] is None  # no such kernel off x86
    forced = int8.int8_kernel("u8s8", AVX2_ONLY, "x86_64")
    assert (forced["kernel"], forced["exact"]) == ("u8s8", False) and "saturate" in forced["why"]
    assert int8.int8_kernel("u8u8", VNNI, "x86_64")["session_option"] == "1"
    with pytest.raises(ConfigError, match="int8_kernel must be one of auto, u8s8, u8u8"):
        int8.int8_kernel("s8", VNNI, "x86_64")


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


def _weights_as_run(session, tmp_path):
    """The integer GEMMs' weight initializers as ONNX Runtime runs them with this session's
    options (its optimised graph, where the s8 -> u8 rewrite has happened or not)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    so = session._session_options()
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(str(session.artifact.path), sess_options=so, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "optimised.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ("DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat"):
            w, zp = node.input[1], node.input[3] if len(node.input) > 3 else ""  # B, b_zero_point
            b = numpy_helper.to_array(inits[w])
            out.append((b, numpy_helper.to_array(inits[zp]) if zp in inits else np.zeros((), b.dtype)))
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


@pytest.mark.parametrize("name,backend", [("tiny-dense", "onnxruntime"), ("tiny-qwen2-moe", "onnxruntime"),
                                          ("tiny-moe", "onnxruntime-contrib")])
def test_a_cpu_without_vnni_multiplies_weights_no_sum_can_clip(plugins, cache, tmp_path, monkeypatch, name, backend):
    """On any machine: pretend the CPU is an AVX2 one and look at the weights ONNX Runtime
    would multiply. The session moerun loads runs them u8 x u8 (no clipped output); the old
    session, u8 x s8 (forced here with -O int8_kernel=u8s8), clips many."""
    monkeypatch.setattr(int8, "cpu_features", lambda: dict(AVX2_ONLY))
    spec = plugins.models.resolve(name)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    b = plugins.backends.get(backend)()
    art = b.prepare(ck, "int8", cache)
    with b.load(art, LoadSettings(max_context=16)) as s:
        assert s.describe()["int8_kernel"]["kernel"] == "u8u8" and s.describe()["kernel_path"] == "int8 u8u8"
        now = _weights_as_run(s, tmp_path)
    with b.load(art, LoadSettings(max_context=16, options={"int8_kernel": "u8s8"})) as s:
        old = _weights_as_run(s, tmp_path)
    assert now and len(now) == len(old)
    assert {w.dtype for w, _ in now} == {np.dtype(np.uint8)} and {int(z) for _, z in now} == {128}
    for (u, _), (s8, _) in zip(now, old):  # the same integers, shifted by the zero point
        np.testing.assert_array_equal(u.astype(np.int16) - 128, s8.astype(np.int16))
    rng = np.random.default_rng(1)
    assert _clipped_outputs(now, rng) == 0
    assert _clipped_outputs(old, rng) > 0


def test_parity_records_say_which_int8_kernel_ran(plugins, cache):
    from moerun.runner import Point, measure

    r = measure(Point(model="tiny-dense", backend="onnxruntime", precision="int8", prompt_tokens=8, new_tokens=2,
                      repetitions=1, warmup=0, parity=True), plugins, cache, {})
    assert r["status"] == "ok", r.get("error")
    want = "int8 " + int8.int8_kernel()["kernel"]
    assert r["parity"]["kernel_path"] == want and r["session"]["kernel_path"] == want
    assert r["session"]["int8_kernel"]["why"]


QEMU = shutil.which("qemu-x86_64")


@pytest.mark.skipif(QEMU is None, reason="qemu-user is not installed: the emulated AVX2 run needs qemu-x86_64 "
                                         "(apt-get install qemu-user; .ci/run installs it)")
@pytest.mark.parametrize("name,backend", [("tiny-dense", "onnxruntime"), ("tiny-moe", "onnxruntime-contrib")])
def test_onnxruntime_int8_under_an_emulated_avx2_cpu_matches_this_one(plugins, cache, tmp_path, name, backend):
    """The real ONNX Runtime under `qemu-x86_64 -cpu Haswell` (AVX2, FMA, F16C; no AVX-512,
    no VNNI): MLAS picks its AVX2 kernels from the emulated CPUID, moerun picks u8 x u8, and
    the logits match this machine's (where the old session differed by up to 3-4)."""
    spec = plugins.models.resolve(name)
    ck = synthetic_checkpoint(spec, cache, seed=0)
    b = plugins.backends.get(backend)()
    art = b.prepare(ck, "int8", cache)
    ids = token_ids(spec.vocab_size, 24, seed=4)
    with b.load(art, LoadSettings(max_context=24)) as s:
        here = teacher_forced_logits(s, ids, 16)
    script = textwrap.dedent(f"""
        import sys, numpy as np
        from moerun import Cache, Checkpoint, LoadSettings, get_plugin_manager
        from moerun.runner import teacher_forced_logits
        from moerun.backends.onnxruntime import int8
        b = get_plugin_manager(entrypoints=False).backends.get({backend!r})()
        ck = Checkpoint.open({str(ck.path)!r}, name={spec.name!r})
        art = b.prepare(ck, "int8", Cache({str(cache.root)!r}))  # the artifact built above, from the cache
        assert not int8.cpu_features().get("AVX512VNNI")
        with b.load(art, LoadSettings(max_context=24)) as s:
            print(s.describe()["kernel_path"], file=sys.stderr)
            np.save({str(tmp_path / 'emulated.npy')!r}, teacher_forced_logits(s, {ids!r}, 16))
    """)
    done = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "int8 u8u8" in done.stderr
    emulated = np.load(tmp_path / "emulated.npy")
    # the integers are identical; the float kernels around them (AVX2 vs AVX-512 sgemm) differ in rounding
    assert float(np.abs(emulated - here).max()) < 1e-3
    assert (emulated.argmax(-1) == here.argmax(-1)).all()
