#!/usr/bin/env python
"""The builder's own int8 / int4 graphs against onnxruntime's quantisation tools, same weights.

The onnxruntime backends quantise while the graph is written (one pass, streamed): int8 per
output channel through DynamicQuantizeLinear + MatMulInteger, int4 in blocks of 32 through
opset 21's DequantizeLinear (fused into MatMulNBits by onnxruntime). Before, the fp32 graph
was built whole and handed to ``quantize_dynamic`` (int8) or ``MatMulNBitsQuantizer`` (int4,
accuracy level 4). This measures both on a dense model (the dense twins: every MatMul is one
the tools reach) in interleaved rounds, decode and prefill, in this process; medians and the
ratio builder / tool. Asserts nothing.

    .venv/bin/python examples/benchmarks/bench_ort_quantisation.py
    .venv/bin/python examples/benchmarks/bench_ort_quantisation.py --model small-moe:dense-total --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build(ckpt, precision: str, tool: bool, folder: Path) -> Path:
    import onnx

    from moerun.backends.onnxgraph.builder import build_onnx

    path = folder / f"{precision}-{'tool' if tool else 'builder'}.onnx"
    if not tool:
        bits = {"int8": 8, "int4": 4}[precision]
        onnx.save_model(build_onnx(ckpt, formulation="grouped", weight_bits=bits), str(path))
        return path
    model = build_onnx(ckpt, formulation="grouped")
    raw = folder / "fp32.onnx"
    onnx.save_model(model, str(raw))
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(raw), str(path), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        onnx.save_model(q.model.model if hasattr(q.model, "model") else q.model, str(path))
    return path


def time_it(path: Path, spec, prompt: list[int], follow: list[int]) -> tuple[float, float]:
    import onnxruntime as ort

    from moerun.backends.onnxruntime.int8 import SESSION_OPTION, int8_kernel

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry(SESSION_OPTION, int8_kernel(None)["session_option"] or "0")  # s8 graph: exact here
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    names = [o.name for o in sess.get_outputs()]

    def step(ids, past):
        feed = {"input_ids": np.asarray([ids], np.int64), "logits_from": np.asarray([len(ids) - 1], np.int64), **past}
        outs = dict(zip(names, sess.run(names, feed)))
        return {n.replace("present_", "past_"): v for n, v in outs.items() if n.startswith("present_")}

    fresh = {f"past_{k}_{i}": empty for i in range(spec.num_layers) for k in ("key", "value")}
    step(prompt, fresh)  # warm
    t = time.perf_counter()
    past = step(prompt, fresh)
    prefill = len(prompt) / (time.perf_counter() - t)
    t = time.perf_counter()
    for tok in follow:
        past = step([tok], past)
    return prefill, len(follow) / (time.perf_counter() - t)


def main() -> None:
    from moerun import Cache, get_plugin_manager
    from moerun.checkpoint import synthetic_checkpoint
    from moerun.point import token_ids

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small-moe:dense-active")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    spec = get_plugin_manager().models.resolve(args.model)
    ckpt = synthetic_checkpoint(spec, Cache(), seed=0)
    ids = token_ids(spec.vocab_size, 64 + 32, 0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {(p, tool): build(ckpt, p, tool, Path(tmp)) for p in ("int8", "int4") for tool in (False, True)}
        got: dict = {k: [] for k in paths}
        for _ in range(args.rounds):
            for k, path in paths.items():
                got[k].append(time_it(path, spec, ids[:64], ids[64:]))
    print(f"{args.model}: medians over {args.rounds} interleaved rounds (tokens/s)")
    for p in ("int8", "int4"):
        rows = {tool: [statistics.median(x[i] for x in got[(p, tool)]) for i in (0, 1)] for tool in (False, True)}
        print(f"  {p}: builder decode {rows[False][1]:8.1f} prefill {rows[False][0]:9.1f} | tool decode "
              f"{rows[True][1]:8.1f} prefill {rows[True][0]:9.1f} | builder / tool decode "
              f"{rows[False][1] / rows[True][1]:.2f}x prefill {rows[False][0] / rows[True][0]:.2f}x")


if __name__ == "__main__":
    main()
