#!/usr/bin/env python
"""What scripts/gpu-check runs: every GPU path moerun has, on tiny dense and MoE presets.

For each backend that can use a CUDA device here: logits against the PyTorch CPU fp32
reference (max abs diff, top-1 agreement) and decode / prefill tokens/s from the real
runner, with where the work ran as the engine reports it (llama.cpp: layers offloaded and
buffers per device; ONNX Runtime: nodes per execution provider, CPU fallback) and the
trackers' device memory and energy (NVML). A backend without CUDA here is skipped with the
engine's own reason (for llama.cpp, the rebuild command). Prints one line per check and a
summary; exit code 1 if a check that ran failed.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from moerun import (Cache, LoadSettings, Point, get_plugin_manager, measure, synthetic_checkpoint,
                    teacher_forced_logits, token_ids)

MODELS = ("tiny-dense", "tiny-moe", "tiny-qwen2-moe")
CHECKS = [("torch", "fp32", 1e-3), ("torch", "bf16", 0.5), ("onnxruntime", "fp32", 1e-3),
          ("onnxruntime-contrib", "fp32", 1e-3), ("tensorrt", "fp32", 1e-2), ("tensorrt", "fp16", 0.5),
          ("llamacpp", "f16", 0.5), ("llamacpp", "q8_0", 0.5)]


def where_it_ran(r: dict) -> str:
    """The engine's own account of placement, and the device trackers' figures."""
    placement = (r.get("session") or {}).get("placement") or {}
    parts = []
    back = placement.get("read_back") or {}
    if back:
        parts.append(f"llama.cpp offloaded {back.get('layers_offloaded')}/{back.get('layers_total')} layers, "
                     f"model buffers {back.get('model_buffers_mib')}")
    if placement.get("measured"):
        parts.append(f"nodes by provider {placement.get('nodes_by_provider')}"
                     + (f" ({placement['note']})" if placement.get("note") else ""))
    for name in ("nvml", "torch_cuda"):
        t = (r.get("trackers") or {}).get(name) or {}
        if t.get("available"):
            parts.append(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in t.items()
                                                  if isinstance(v, (int, float)) and not isinstance(v, bool)))
    return "; ".join(parts)


def main() -> int:
    try:
        print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"nvidia-smi: {exc}")
    pm = get_plugin_manager()
    cache = Cache()
    env = {"bandwidth_bytes_s": None}
    failures = 0
    ref_backend = pm.backends.get("torch")()
    for model in MODELS:
        spec = pm.models.resolve(model)
        ck = synthetic_checkpoint(spec, cache, seed=0)
        ids = token_ids(spec.vocab_size, 40, seed=1)
        ref = teacher_forced_logits(ref_backend.load(ref_backend.prepare(ck, "fp32", cache), LoadSettings(max_context=64)), ids, 32)
        for name, precision, atol in CHECKS:
            backend = pm.backends.get(name)()
            av = backend.availability()
            if "cuda" not in (av.devices or ()):
                why = av.reason or av.device_notes.get("cuda") or "no CUDA device for this backend"
                print(f"SKIP {model} {name} {precision}: {why}")
                continue
            try:
                s = backend.load(backend.prepare(ck, precision, cache), LoadSettings(device="cuda", max_context=64))
                got = teacher_forced_logits(s, ids, 32)
                s.close()
            except Exception as exc:  # noqa: BLE001 - report and go on
                failures += 1
                print(f"FAIL {model} {name} {precision}: {type(exc).__name__}: {exc}")
                continue
            diff = float(np.abs(got - ref).max())
            top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
            r = measure(Point(model=model, backend=name, precision=precision, device="cuda", prompt_tokens=32,
                              new_tokens=64, repetitions=3), pm, cache, env)
            speed = (f"decode {r['metrics']['decode_tok_s']:.0f} tok/s, prefill {r['metrics']['prefill_tok_s']:.0f} tok/s"
                     if r["status"] == "ok" else f"{r['status']}: {r['error']}")
            ok = diff <= atol or (precision != "fp32" and top1 >= 0.9)
            failures += not ok
            print(f"{'OK  ' if ok else 'FAIL'} {model} {name} {precision}: max abs diff {diff:.2e}, "
                  f"top-1 {top1:.0%}; {speed}; {where_it_ran(r)}")
    print(f"gpu-check: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
