"""llama.cpp's devices: what the installed build registered, how a moerun device name picks
them, the expert-on-CPU overrides, and what the engine says it did at load.

The registry is ggml's own (``ggml_backend_dev_*`` in libggml, bound here with ctypes), so a
CPU-only build of llama-cpp-python reports exactly that, and a request for a GPU it lacks
is refused with the reinstall command instead of quietly running on the CPU.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path
from typing import Any

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# moerun device name -> (ggml backend registry names, the CMake switch that builds it)
GPU_BACKENDS = {
    "cuda": (("CUDA",), "-DGGML_CUDA=on"),
    "metal": (("Metal", "MTL"), "-DGGML_METAL=on"),
    "vulkan": (("Vulkan",), "-DGGML_VULKAN=on"),
}
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}  # enum ggml_backend_dev_type


def reinstall_hint(device: str) -> str:
    """The command that rebuilds llama-cpp-python with `device`'s ggml backend."""
    install = f"pip install --force-reinstall --no-cache-dir {LLAMA_CPP_PYTHON}"
    if device not in GPU_BACKENDS:
        return (f"rebuild it with a GPU backend: CMAKE_ARGS=\"-DGGML_CUDA=on\" {install} (NVIDIA; "
                f"-DGGML_METAL=on on Apple silicon, -DGGML_VULKAN=on elsewhere)")
    return f"rebuild it: CMAKE_ARGS=\"{GPU_BACKENDS[device][1]}\" {install}"


_P, _SIZE = ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)
# ggml-backend.h signatures: name -> (restype, argtypes); the registry lives in libggml, the
# device accessors in libggml-base
_REGISTRY = {"ggml_backend_dev_count": (ctypes.c_size_t, []), "ggml_backend_dev_get": (_P, [ctypes.c_size_t])}
_DEVICE = {"ggml_backend_dev_name": (ctypes.c_char_p, [_P]), "ggml_backend_dev_description": (ctypes.c_char_p, [_P]),
           "ggml_backend_dev_type": (ctypes.c_int, [_P]), "ggml_backend_dev_memory": (None, [_P, _SIZE, _SIZE]),
           "ggml_backend_dev_backend_reg": (_P, [_P]), "ggml_backend_reg_name": (ctypes.c_char_p, [_P]),
           "ggml_backend_dev_buffer_type": (_P, [_P])}


def _bind(lib: ctypes.CDLL, signatures: dict[str, tuple[Any, list[Any]]]) -> ctypes.CDLL:
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _ggml() -> ctypes.CDLL:
    """libggml, with libggml-base (the device accessors) as `.base`, as loaded by llama_cpp."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"

    def find(stem: str) -> str:  # Linux .so, macOS .dylib, Windows .dll
        for pattern in (f"lib{stem}.so*", f"lib{stem}.dylib", f"lib{stem}.*.dylib", f"{stem}.dll"):
            found = sorted(lib_dir.glob(pattern))
            if found:
                return str(found[0])
        return str(lib_dir / f"lib{stem}.so")

    base = _bind(ctypes.CDLL(find("ggml-base")), _DEVICE)
    ggml = _bind(ctypes.CDLL(find("ggml")), _REGISTRY)
    ggml.base = base  # type: ignore[attr-defined]
    return ggml


def registered_devices() -> list[dict[str, Any]]:
    """Every device ggml registered in this build (after llama_backend_init): name,
    description, type, backend (the registry's name), memory free/total in bytes, and the
    raw handle under `_handle`."""
    ggml = _ggml()
    base = ggml.base  # type: ignore[attr-defined]
    out = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        reg = base.ggml_backend_dev_backend_reg(dev)
        out.append({"name": (base.ggml_backend_dev_name(dev) or b"").decode(),
                    "description": (base.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
                    "type": DEVICE_TYPES.get(base.ggml_backend_dev_type(dev), "?"),
                    "backend": (base.ggml_backend_reg_name(reg) or b"").decode() if reg else "",
                    "memory_free_bytes": free.value, "memory_total_bytes": total.value, "_handle": dev})
    return out


def public(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in d.items() if not k.startswith("_")} for d in devices]


def moerun_devices(devices: list[dict[str, Any]]) -> tuple[str, ...]:
    """The moerun device names this build can serve: cpu, and cuda/metal/vulkan/gpu for the
    GPU backends it registered (another GPU backend, such as HIP or SYCL, by its lower-cased name)."""
    names = ["cpu"]
    for d in devices:
        if d["type"] not in ("gpu", "igpu"):
            continue
        name = next((k for k, (regs, _) in GPU_BACKENDS.items() if d["backend"] in regs), d["backend"].lower())
        for n in (name, "gpu"):
            if n and n not in names:
                names.append(n)
    return tuple(names)


def absent_notes(present: tuple[str, ...], supports_offload: bool, devices: list[dict[str, Any]]) -> dict[str, str]:
    """Why each known GPU device name is missing from this build, with the reinstall command."""
    have = ", ".join(sorted({d["backend"] for d in devices})) or "none"
    notes = {}
    for name in (*GPU_BACKENDS, "gpu"):
        if name in present:
            continue
        notes[name] = (f"this llama-cpp-python build has no {name if name != 'gpu' else 'GPU'} backend "
                       f"(llama_supports_gpu_offload() = {supports_offload}; ggml backends: {have}); "
                       f"{reinstall_hint(name)}")
    return notes


def select(device: str, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPU devices a moerun device name ('cuda', 'cuda:1', 'metal', 'vulkan', 'gpu') picks."""
    kind, _, index = device.partition(":")
    gpus = [d for d in devices if d["type"] in ("gpu", "igpu")]
    if kind != "gpu":
        regs = GPU_BACKENDS.get(kind, ((kind.upper(),), ""))[0]
        gpus = [d for d in gpus if d["backend"] in regs or d["backend"].lower() == kind]
    if index:
        if not index.isdigit() or int(index) >= len(gpus):
            return []
        gpus = [gpus[int(index)]]
    return gpus


def expert_overrides(n_cpu_moe: int, n_layer: int, devices: list[dict[str, Any]]) -> tuple[Any, list[bytes]]:
    """llama.cpp's `--n-cpu-moe N` as model parameters: the expert tensors of the first N
    layers (blk.i.ffn_{up,down,gate,gate_up}_exps, llama.cpp's own pattern) stay in the CPU's
    buffer type. Returns the NULL-terminated override array and the pattern strings, which
    the caller keeps alive as long as the model params are used."""
    import llama_cpp

    cpu = next((d for d in devices if d["type"] == "cpu"), None)
    if cpu is None:
        raise RuntimeError("ggml registered no CPU device")
    buft = _ggml().base.ggml_backend_dev_buffer_type(cpu["_handle"])  # type: ignore[attr-defined]

    class Override(ctypes.Structure):  # struct llama_model_tensor_buft_override
        _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

    count = min(max(n_cpu_moe, 0), n_layer)
    if count + 1 > llama_cpp.llama_max_tensor_buft_overrides():
        raise ValueError(f"n_cpu_moe={n_cpu_moe} needs more tensor overrides than llama.cpp allows")
    patterns = [rf"blk\.{i}\.ffn_(up|down|gate|gate_up)_(ch|)exps".encode() for i in range(count)]
    array = (Override * (count + 1))()
    for i, pattern in enumerate(patterns):
        array[i].pattern, array[i].buft = pattern, buft
    array[count].pattern, array[count].buft = None, None
    return array, patterns


_LAYER = re.compile(r"layer\s+(\d+) assigned to device (\w+)")
_BUFFER = re.compile(r"(\S+) (model|KV|compute) buffer size =\s+([\d.]+) MiB")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_OVERRIDDEN = re.compile(r"tensor (\S+) .*buffer type overridden to (\S+)")


def read_back(lines: list[str]) -> dict[str, Any]:
    """What llama.cpp's load log says it did: layers per device, GPU layers offloaded (its
    own count where it prints one, else the layers on a non-CPU device), model / KV /
    compute buffers per buffer type in MiB, and the tensors moved by an override."""
    layers: dict[int, str] = {}
    buffers: dict[str, dict[str, float]] = {"model": {}, "KV": {}, "compute": {}}
    offloaded = overridden = None
    moved: dict[str, int] = {}
    for line in lines:
        for m in _LAYER.finditer(line):
            layers[int(m.group(1))] = m.group(2)
        for m in _BUFFER.finditer(line):
            buffers[m.group(2)][m.group(1)] = buffers[m.group(2)].get(m.group(1), 0.0) + float(m.group(3))
        m = _OFFLOADED.search(line)
        if m:
            offloaded = (int(m.group(1)), int(m.group(2)))
        m = _OVERRIDDEN.search(line)
        if m:
            moved[m.group(2)] = moved.get(m.group(2), 0) + 1
    by_device: dict[str, int] = {}
    for dev in layers.values():
        by_device[dev] = by_device.get(dev, 0) + 1
    if moved:
        overridden = sum(moved.values())
    return {
        "layers_by_device": by_device,
        "layers_offloaded": offloaded[0] if offloaded else sum(n for d, n in by_device.items() if d != "CPU"),
        "layers_total": offloaded[1] if offloaded else len(layers),
        "offload_source": "llama.cpp 'offloaded' line" if offloaded else "llama.cpp layer assignment lines",
        "model_buffers_mib": buffers["model"], "kv_buffers_mib": buffers["KV"],
        "compute_buffers_mib": buffers["compute"],
        "tensors_overridden": overridden or 0, "overridden_to": moved,
    }
