#!/usr/bin/env python
"""ONNX Runtime benchmark: both MoE formulations and every precision, next to the PyTorch
backend on the same checkpoints, in one run, against this machine's measured bandwidth.

The dense twins run on both ONNX Runtime backends: there they differ only in attention
(plain ops versus GroupQueryAttention), which measures the contrib attention path.

Bandwidth uses the bytes actually read: the spec's per-token weights scaled by the
artifact's real bits per weight (quantised graphs keep routers and norms in fp32), plus the
KV cache. Targets (issue "ONNX Runtime backend"): fp32 and 4-bit decode >= 80 % of measured
bandwidth; MoE decode time within 1.25x of its active-matched dense twin. Prints figures;
asserts nothing.

    .venv/bin/python examples/benchmarks/bench_onnxruntime.py
    .venv/bin/python examples/benchmarks/bench_onnxruntime.py --models small-moe --precisions fp32
"""

from __future__ import annotations

import argparse
import sys

from moerun import Cache, Point, get_plugin_manager, run_isolated
from moerun.environment import capture


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small-moe")
    ap.add_argument("--precisions", default="fp32,int8,int4")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    pm = get_plugin_manager()
    env = capture()
    bw = env["bandwidth_bytes_s"]
    cache = Cache()
    print(f"measured read bandwidth {bw / 1e9:.1f} GB/s\n")
    print(f"{'model':24s} {'backend':20s} {'prec':5s} {'decode tok/s':>12s} {'MB/token':>9s} {'of bw':>6s} "
          f"{'prefill tok/s':>13s}  notes")
    for model in args.models.split(","):
        decode: dict[tuple[str, str, str], float] = {}
        for role, name in (("moe", model), ("dense-active", f"{model}:dense-active")):
            spec = pm.models.resolve(name)
            runs = [("torch", "fp32")] + [(b, p) for b in ("onnxruntime", "onnxruntime-contrib")
                                          for p in args.precisions.split(",")]
            for backend, precision in runs:
                r = run_isolated(Point(model=name, backend=backend, precision=precision,
                                       prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                       repetitions=args.repetitions, warmup=2, timeout_s=1800), cache=cache, env=env)
                if r["status"] != "ok":
                    print(f"{name:24s} {backend:20s} {precision:5s} {r['status']}: {r['error'][:90]}")
                    continue
                m = r["metrics"]
                bits = 32.0 if backend == "torch" else r["artifact"]["bits_per_weight"]
                actual = spec.weight_bytes_per_token("fp32") * bits / 32 + m["kv_bytes_per_token"]
                share = actual * m["decode_tok_s"] / bw
                decode[(role, backend, precision)] = m["decode_tok_s"]
                target = "" if backend == "torch" or precision == "int8" else \
                    ("bw target met" if share >= 0.8 else "bw target MISSED")
                print(f"{name:24s} {backend:20s} {precision:5s} {m['decode_tok_s']:12.1f} {actual / 1e6:9.1f} "
                      f"{share:6.0%} {m['prefill_tok_s']:13.0f}  {target}")
        for (role, backend, precision), tok_s in decode.items():
            if role != "moe":
                continue
            twin = decode.get(("dense-active", backend, precision))
            if twin:
                slower = twin / tok_s
                print(f"  MoE decode time / active-twin decode time, {backend} {precision}: {slower:.2f}x "
                      f"({'met' if slower <= 1.25 else 'MISSED'} <= 1.25x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
