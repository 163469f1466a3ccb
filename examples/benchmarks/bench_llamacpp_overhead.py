#!/usr/bin/env python
"""moerun's overhead on llama.cpp: moerun's clock against llama.cpp's own perf counters
(llama_perf_context) for the same calls, repetition by repetition, in one run.

Overhead = moerun time / llama.cpp time - 1, median over repetitions, for decode (sum of
the per-token calls) and prefill. Target (issue "llama.cpp backend"): <= 2 % for decode on
the tiny presets, where per-call overhead shows most. Prints figures; asserts nothing.

    .venv/bin/python examples/benchmarks/bench_llamacpp_overhead.py
    .venv/bin/python examples/benchmarks/bench_llamacpp_overhead.py --models small-moe --precisions q4_k_m
"""

from __future__ import annotations

import argparse
import statistics
import sys

from moerun import Cache, Point, run_isolated
from moerun.environment import capture


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny-dense,tiny-moe,small-moe")
    ap.add_argument("--precisions", default="f16,q4_k_m")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=7)
    args = ap.parse_args()
    env = capture(measure_bandwidth=False)
    cache = Cache()
    print(f"{'model':12s} {'prec':7s} {'decode tok/s':>12s} {'us/token moerun':>15s} {'llama.cpp':>10s} "
          f"{'overhead':>9s} {'target':>7s} {'prefill overhead':>17s}")
    for model in args.models.split(","):
        for precision in args.precisions.split(","):
            p = Point(model=model, backend="llamacpp", precision=precision, prompt_tokens=args.prompt_tokens,
                      new_tokens=args.new_tokens, repetitions=args.repetitions, warmup=2, timeout_s=1800)
            r = run_isolated(p, cache=cache, env=env)
            if r["status"] != "ok":
                print(f"{model} {precision}: {r['status']}: {r['error']}", file=sys.stderr)
                continue
            reps = r["timings"]["engine_per_rep"]
            dec = statistics.median(e["moerun_decode_ms"] / e["eval_ms"] - 1 for e in reps)
            pre = statistics.median(e["moerun_prefill_ms"] / e["prompt_eval_ms"] - 1 for e in reps)
            us_m = statistics.median(e["moerun_decode_ms"] / e["eval_tokens"] for e in reps) * 1e3
            us_e = statistics.median(e["eval_ms"] / e["eval_tokens"] for e in reps) * 1e3
            ok = "met" if dec <= 0.02 else "MISSED"
            print(f"{model:12s} {precision:7s} {r['metrics']['decode_tok_s']:12.1f} {us_m:15.1f} {us_e:10.1f} "
                  f"{dec:9.2%} {ok:>7s} {pre:17.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
