#!/usr/bin/env python
"""Op-level breakdown on every CPU backend: where decode and prefill time goes, routing's
share of the MoE block, and how the instrumented category sum reconciles with the
un-instrumented step time of the same run (target, issue "op-level breakdown": within 15 %).

    .venv/bin/python examples/benchmarks/bench_breakdown.py
    .venv/bin/python examples/benchmarks/bench_breakdown.py --models small-moe,small-moe:dense-active
"""

from __future__ import annotations

import argparse
import sys

from moerun import Cache, Point, run_isolated
from moerun.breakdown import CATEGORIES

BACKENDS = ("torch", "llamacpp", "onnxruntime", "onnxruntime-contrib")
SHORT = {"embedding": "emb", "attention": "attn", "norm": "norm", "router": "route", "experts": "exp",
         "shared_expert": "shexp", "dense_ffn": "ffn", "head": "head", "other": "other"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-moe,tiny-dense,small-moe,small-moe:dense-active")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    cache = Cache()
    print(f"{'model':24s} {'backend':20s} {'phase':7s} " + " ".join(f"{SHORT[c]:>5s}" for c in CATEGORIES)
          + f" {'sum/plain':>9s} {'/timed':>6s} {'overhead':>8s} {'route/MoE':>9s}")
    for model in args.models.split(","):
        for backend in BACKENDS:
            precision = "f32" if backend == "llamacpp" else "fp32"
            r = run_isolated(Point(model=model, backend=backend, precision=precision, prompt_tokens=args.prompt_tokens,
                                   new_tokens=args.new_tokens, repetitions=5, breakdown=True, timeout_s=900),
                             cache=cache, env={})
            if r["status"] != "ok":
                print(f"{model:24s} {backend:20s} {r['status']}: {r['error'][:80]}")
                continue
            for phase in ("prefill", "decode"):
                d = r["breakdown"][phase]
                rs = d["router_share_of_moe_block"]
                print(f"{model:24s} {backend:20s} {phase:7s} "
                      + " ".join(f"{d['shares'][c]:5.0%}" for c in CATEGORIES)
                      + f" {d['sum_over_plain']:9.2f} {d['sum_over_timed']:6.2f}"
                      + f" {d['instrument_overhead']:+8.0%} "
                      + (f"{rs:9.1%}" if rs is not None else f"{'-':>9s}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
