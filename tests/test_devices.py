"""Accelerators on a machine without one: every engine says, through its real install, which
devices it has and why the others are missing (with the command that gets them); a point
asking for a missing device is `unsupported` with that reason, never run on the CPU; the
llama.cpp offload options reach the engine and what it did is read back from the engine.
What ran on a GPU is checked by scripts/gpu-check on a machine that has one."""

from __future__ import annotations

import json

import pytest

from moerun import LoadSettings, Point, UnsupportedError, measure, synthetic_checkpoint

pytest.importorskip("llama_cpp")


def _point(backend, **kw):
    return Point(model="tiny-moe", backend=backend, prompt_tokens=8, new_tokens=2, repetitions=1, warmup=0, **kw)


@pytest.mark.parametrize("device, flag", [("cuda", "-DGGML_CUDA=on"), ("metal", "-DGGML_METAL=on"),
                                          ("vulkan", "-DGGML_VULKAN=on"), ("gpu", "-DGGML_CUDA=on")])
def test_llamacpp_gpu_on_a_cpu_build_is_unsupported_with_the_rebuild_command(plugins, cache, device, flag):
    av = plugins.backends.get("llamacpp")().availability()
    assert av.devices == ("cpu",)
    assert "llama_supports_gpu_offload() = False" in av.device_notes[device]
    r = measure(_point("llamacpp", device=device), plugins, cache, {})
    assert r["status"] == "unsupported"
    assert f'CMAKE_ARGS="{flag}" pip install --force-reinstall --no-cache-dir llama-cpp-python==' in r["error"]
    assert "metrics" not in r or not r["metrics"]  # nothing ran on the CPU instead


def test_llamacpp_session_refuses_a_missing_device_itself(plugins, cache):
    """The backend's own check, for code that loads without the runner."""
    b = plugins.backends.get("llamacpp")()
    art = b.prepare(synthetic_checkpoint(plugins.models.resolve("tiny-moe"), cache, seed=0), "f16", cache)
    with pytest.raises(UnsupportedError, match=r"no cuda:1 device: .*-DGGML_CUDA=on"):
        b.load(art, LoadSettings(device="cuda:1", max_context=64))


def test_llamacpp_offload_options_reach_the_engine_and_are_read_back(plugins, cache):
    spec = plugins.models.resolve("tiny-moe")
    r = measure(_point("llamacpp", options={"n_gpu_layers": 99, "n_cpu_moe": 1}), plugins, cache, {})
    assert r["status"] == "ok", r.get("error")
    placement = r["session"]["placement"]
    assert placement["n_gpu_layers"] == 99 and placement["n_cpu_moe"] == 1
    assert [d["name"] for d in placement["registered"]] == ["CPU"]
    back = placement["read_back"]
    assert back["layers_offloaded"] == 0  # a CPU build: asked for 99, the engine offloaded none
    assert back["layers_by_device"] == {"CPU": spec.num_layers + 1}  # the repeated layers and the output layer
    assert back["tensors_overridden"] == 3  # layer 0's gate, up and down experts moved to the CPU buffer
    assert sum(back["model_buffers_mib"].values()) > 0
    default = measure(_point("llamacpp"), plugins, cache, {})
    assert default["session"]["placement"]["n_gpu_layers"] == 0
    assert default["session"]["placement"]["read_back"]["tensors_overridden"] == 0


def test_llamacpp_read_back_of_a_gpu_load_log():
    """The parser on log lines as a CUDA build of llama.cpp writes them at load."""
    from moerun.backends.llamacpp.devices import read_back

    lines = ["load_tensors: layer   0 assigned to device CUDA0, is_swa = 0",
             "load_tensors: layer   1 assigned to device CUDA0, is_swa = 0",
             "load_tensors: layer   2 assigned to device CPU, is_swa = 0",
             "load_tensors: offloaded 2/3 layers to GPU",
             "load_tensors:        CUDA0 model buffer size =   512.25 MiB",
             "load_tensors:   CPU_Mapped model buffer size =    40.00 MiB",
             "llama_kv_cache:      CUDA0 KV buffer size =    16.00 MiB",
             "tensor blk.0.ffn_up_exps.weight (24 MiB q4_K) buffer type overridden to CPU"]
    back = read_back(lines)
    assert back["layers_offloaded"] == 2 and back["layers_total"] == 3
    assert back["offload_source"] == "llama.cpp 'offloaded' line"
    assert back["layers_by_device"] == {"CUDA0": 2, "CPU": 1}
    assert back["model_buffers_mib"] == {"CUDA0": 512.25, "CPU_Mapped": 40.0}
    assert back["kv_buffers_mib"] == {"CUDA0": 16.0}
    assert back["overridden_to"] == {"CPU": 1}


def test_torch_names_why_cuda_and_mps_are_absent(plugins, cache):
    torch = pytest.importorskip("torch")
    av = plugins.backends.get("torch")().availability()
    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has an accelerator")
    assert av.devices == ("cpu",)
    r = measure(_point("torch", device="mps"), plugins, cache, {})
    assert r["status"] == "unsupported" and "MPS" in r["error"] and "Apple" in r["error"]
    r = measure(_point("torch", device="cuda"), plugins, cache, {})
    assert r["status"] == "unsupported" and "without CUDA" in r["error"]


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-contrib"])
@pytest.mark.parametrize("device, provider", [("cuda", "CUDAExecutionProvider"),
                                              ("tensorrt", "TensorrtExecutionProvider"),
                                              ("coreml", "CoreMLExecutionProvider")])
def test_onnxruntime_gpu_providers_absent_with_the_reason(plugins, cache, backend, device, provider):
    ort = pytest.importorskip("onnxruntime")
    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is installed here")
    r = measure(_point(backend, device=device), plugins, cache, {})
    assert r["status"] == "unsupported"
    assert f"no {provider}" in r["error"] and "CPUExecutionProvider" in r["error"]


def test_onnxruntime_records_which_provider_ran_each_node(plugins, cache):
    r = measure(_point("onnxruntime-contrib", options={"placement": True}), plugins, cache, {})
    assert r["status"] == "ok", r.get("error")
    placement = r["session"]["placement"]
    assert placement["measured"] and placement["cpu_fallback_nodes"] == 0
    assert set(placement["nodes_by_provider"]) == {"CPUExecutionProvider"}
    assert "MoE" in placement["op_types_by_provider"]["CPUExecutionProvider"]
    plain = measure(_point("onnxruntime-contrib"), plugins, cache, {})
    assert plain["session"]["placement"]["measured"] is False  # the CPU provider alone: nothing to find out


def test_onnxruntime_placement_counts_cpu_fallback(tmp_path):
    """The profile parser on events as the CUDA provider's profile writes them, with two
    nodes the CUDA provider left to the CPU."""
    from moerun.backends.onnxruntime.backend import node_placement

    events = [{"cat": "Session", "name": "model_run", "args": {}}]
    for name, op, ep in [("l0_q", "MatMul", "CUDAExecutionProvider"), ("l0_moe", "MoE", "CUDAExecutionProvider"),
                         ("l0_topk", "TopK", "CPUExecutionProvider"), ("l0_shape", "Shape", "CPUExecutionProvider")]:
        events.append({"cat": "Node", "name": f"{name}_kernel_time", "args": {"op_name": op, "provider": ep}})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    p = node_placement(str(path))
    assert p["nodes_by_provider"] == {"CUDAExecutionProvider": 2, "CPUExecutionProvider": 2}
    assert p["op_types_by_provider"]["CPUExecutionProvider"] == ["Shape", "TopK"]


def test_backends_json_lists_device_notes():
    from conftest import run_cli

    r = run_cli("backends", "--json")
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert "cuda" in rows["llamacpp"]["capabilities"]["devices"]
    assert rows["llamacpp"]["devices"] == ["cpu"]
    assert "CMAKE_ARGS" in rows["llamacpp"]["device_notes"]["metal"]
    assert "mps" in rows["torch"]["device_notes"]
