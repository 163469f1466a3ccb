"""Synthetic checkpoints: HF layout, determinism, streaming, and clear errors on bad files."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from moerun import Checkpoint, CheckpointError, write_synthetic
from moerun.presets import TINY

TINY_MOE = next(s for s, _ in TINY if s.name == "tiny-moe")
TINY_QWEN = next(s for s, _ in TINY if s.name == "tiny-qwen2-moe")


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = write_synthetic(TINY_MOE, tmp_path / "a", seed=7)
    b = write_synthetic(TINY_MOE, tmp_path / "b", seed=7)
    c = write_synthetic(TINY_MOE, tmp_path / "c", seed=8)
    assert _digest(a.path) == _digest(b.path)
    assert _digest(a.path)["model.safetensors"] != _digest(c.path)["model.safetensors"]


def test_hf_layout_and_names(tmp_path):
    ck = write_synthetic(TINY_QWEN, tmp_path / "q", seed=0)
    cfg = json.loads((ck.path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["architectures"] == ["Qwen2MoeForCausalLM"]
    names = set(ck.weight_map)
    assert "model.layers.0.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.1.mlp.shared_expert_gate.weight" in names
    assert "model.layers.0.self_attn.q_proj.bias" in names
    assert ck.read("model.layers.0.mlp.gate.weight").shape == (8, 64)
    reopened = Checkpoint.open(ck.path)
    assert reopened.spec == TINY_QWEN


def test_bf16_and_sharded_checkpoints_read_back(tmp_path):
    f32 = write_synthetic(TINY_MOE, tmp_path / "f32", seed=1)
    bf = write_synthetic(TINY_MOE, tmp_path / "bf16", seed=1, dtype="bfloat16", shard_bytes=64 << 10)
    assert (bf.path / "model.safetensors.index.json").exists()
    assert len({f for f in bf.weight_map.values()}) > 1
    name = "model.layers.1.block_sparse_moe.experts.5.w2.weight"
    a, b = f32.read(name), bf.read(name)
    assert a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(b, a, rtol=2 ** -8, atol=1e-6)  # bf16 keeps 8 bits of mantissa


def test_synthetic_weights_have_sane_scale_and_router_skew(tmp_path):
    plain = write_synthetic(TINY_MOE, tmp_path / "plain", seed=0)
    skew = write_synthetic(TINY_MOE, tmp_path / "skew", seed=0, router_skew=3.0)
    r0 = plain.read("model.layers.0.block_sparse_moe.gate.weight")
    r1 = skew.read("model.layers.0.block_sparse_moe.gate.weight")
    norms = np.linalg.norm(r1, axis=1)
    assert norms[0] > 10 * norms[-1]  # expert rows scaled from 1 down to e^-3
    assert np.isclose(np.linalg.norm(r0, axis=1).std() / np.linalg.norm(r0, axis=1).mean(), 0, atol=0.3)
    norm = plain.read("model.layers.0.input_layernorm.weight")
    assert 0.5 < norm.mean() < 1.5


def test_writing_streams_with_memory_near_one_block(tmp_path):
    # small-moe is 354 MB in fp32; the writer must not hold it in memory.
    code = (
        "import resource, sys; from moerun import write_synthetic; from moerun.presets import TINY;"
        "spec = next(s for s, _ in TINY if s.name == 'small-moe');"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"write_synthetic(spec, {str(tmp_path / 'big')!r}, seed=0);"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew_mib = int(out.stdout.strip()) / 1024
    size_mib = sum(p.stat().st_size for p in (tmp_path / "big").iterdir()) / 2**20
    assert size_mib > 300
    assert grew_mib < 120, f"peak RSS grew {grew_mib:.0f} MiB writing a {size_mib:.0f} MiB checkpoint"


def test_truncated_file_is_a_clear_error(tmp_path):
    ck = write_synthetic(TINY_MOE, tmp_path / "t", seed=0)
    f = ck.path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(ck.path)


def test_corrupt_header_is_a_clear_error(tmp_path):
    ck = write_synthetic(TINY_MOE, tmp_path / "c", seed=0)
    f = ck.path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = (10**12).to_bytes(8, "little")
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint.open(ck.path)
    f.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(ck.path)


def test_missing_tensor_and_missing_config_are_clear_errors(tmp_path):
    ck = write_synthetic(TINY_MOE, tmp_path / "m", seed=0)
    cfg = json.loads((ck.path / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (ck.path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2"):
        Checkpoint.open(ck.path)
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint.open(tmp_path)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import moerun.checkpoint as cp

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cp, "to_bf16_bits", boom)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic(TINY_MOE, tmp_path / "x", seed=0, dtype="bfloat16")
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_every_byte(tmp_path):
    seen = []
    ck = write_synthetic(TINY_MOE, tmp_path / "p", seed=0, progress=lambda done, total: seen.append((done, total)))
    data = (ck.path / "model.safetensors").stat().st_size
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    assert data - seen[-1][1] < 64 << 10  # the rest is the JSON header
