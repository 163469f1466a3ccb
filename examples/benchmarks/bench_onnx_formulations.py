#!/usr/bin/env python
"""The MoE formulations in ONNX, measured against each other in one run on the same weights.

- ``grouped`` (the onnxruntime backend's): per expert an ``If`` that runs only when a token
  chose the expert, on its own tokens and its own weight initializers;
- ``gather`` (the former onnxruntime formulation, still TensorRT's): one token gathers the k
  selected experts' weights (a copy) and runs them as a batched MatMul; several tokens run
  every expert over every token;
- ``contrib``: ONNX Runtime's com.microsoft MoE kernel (the onnxruntime-contrib backend).

Rounds interleave every variant (a fresh session per measurement, in this process, so the
variants share one environment); medians over rounds. Printed: decode and prefill tokens/s,
decode share of the measured bandwidth (the start's probe, and "MBU now": the quick probe
right after each measurement), and the ratios the issue sets targets on (grouped
standard ops within 1.25x of the contrib op's time in both phases; MoE decode within 1.15x
of its active twin's time). Asserts nothing.

    .venv/bin/python examples/benchmarks/bench_onnx_formulations.py
    .venv/bin/python examples/benchmarks/bench_onnx_formulations.py --models tiny-moe --rounds 3
    .venv/bin/python examples/benchmarks/bench_onnx_formulations.py --models olmoe-1b-7b --layers 4 \
        --variants grouped,contrib --rounds 3

`--layers N` keeps every per-layer shape of the preset and cuts the depth (real shapes
without the real model's 28 GB of fp32).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys

import attrs

from moerun import Cache, Point, get_plugin_manager, measure, synthetic_checkpoint
from moerun.backends.onnxruntime.backend import OnnxRuntimeBackend
from moerun.environment import capture


class GatherBackend(OnnxRuntimeBackend):
    """The former standard-op formulation, kept for this comparison (and for TensorRT)."""

    name = "onnxruntime-gather"
    aliases = ()
    formulation = "standard"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small-moe")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=None, help="cut every model to N layers")
    ap.add_argument("--variants", default="grouped,gather,contrib")
    args = ap.parse_args()
    pm = get_plugin_manager()
    pm.backends.add(GatherBackend)
    env = capture()
    bw = env["bandwidth_bytes_s"]
    cache = Cache()
    variants = [(label, backend) for label, backend in
                (("grouped", "onnxruntime"), ("gather", "onnxruntime-gather"), ("contrib", "onnxruntime-contrib"))
                if label in args.variants.split(",")]
    print(f"measured read bandwidth {bw / 1e9:.1f} GB/s; {args.rounds} rounds, medians\n")
    for model in args.models.split(","):
        where = {model: model, f"{model}:dense-active": f"{model}:dense-active"}
        if args.layers:  # the cut model and its twin as checkpoint folders
            spec = attrs.evolve(pm.models.resolve(model), name=f"{model}[{args.layers}L]", num_layers=args.layers)
            where = {model: str(synthetic_checkpoint(spec, cache, seed=0).path),
                     f"{model}:dense-active": str(synthetic_checkpoint(spec.dense_twin("active"), cache, seed=0).path)}
        runs = [(label, backend, name) for label, backend in variants
                for name in (model, f"{model}:dense-active")]
        got: dict[tuple[str, str], dict[str, list[float]]] = {}
        rng = random.Random(0)
        for _ in range(args.rounds):
            rng.shuffle(runs)
            for label, backend, name in runs:
                r = measure(Point(model=where[name], backend=backend, precision=args.precision,
                                  prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                  repetitions=args.repetitions, warmup=1), pm, cache, env)
                if r["status"] != "ok":
                    print(f"{label} {name}: {r['status']}: {r['error'][:120]}")
                    continue
                cell = got.setdefault((label, name), {"decode": [], "prefill": [], "bytes": [], "mbu_now": []})
                cell["mbu_now"].append(r["metrics"].get("mbu_now", float("nan")))
                cell["decode"].append(r["metrics"]["decode_tok_s"])
                cell["prefill"].append(r["metrics"]["prefill_tok_s"])
                cell["bytes"].append(r["metrics"]["bytes_per_token"])
        med = {k: {m: statistics.median(v) for m, v in c.items()} for k, c in got.items()}
        print(f"{'formulation':10s} {'model':24s} {'decode tok/s':>12s} {'of bw':>6s} {'MBU now':>7s} {'prefill tok/s':>13s}")
        for (label, name), m in sorted(med.items()):
            print(f"{label:10s} {name:24s} {m['decode']:12.1f} {m['bytes'] * m['decode'] / bw:6.0%} "
                  f"{m['mbu_now']:7.0%} {m['prefill']:13.0f}")
        print()
        for label, _ in variants:
            moe, twin = med.get((label, model)), med.get((label, f"{model}:dense-active"))
            if moe and twin:
                slower = twin["decode"] / moe["decode"]
                print(f"  {label:8s} MoE decode time / active twin's: {slower:.2f}x "
                      f"({'met' if slower <= 1.15 else 'MISSED'} <= 1.15x); prefill time: "
                      f"{twin['prefill'] / moe['prefill']:.2f}x")
        contrib = med.get(("contrib", model))
        for label in ("grouped", "gather"):
            mine = med.get((label, model))
            if mine and contrib:
                d, p = contrib["decode"] / mine["decode"], contrib["prefill"] / mine["prefill"]
                print(f"  {label:8s} time / contrib op's time: decode {d:.2f}x, prefill {p:.2f}x "
                      f"({'met' if max(d, p) <= 1.25 else 'MISSED'} <= 1.25x in both)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
