#!/usr/bin/env python
"""Does a waiting partner cost the side that works? (issue "Verdicts in minutes": a side timed
alone and beside its idle partners must agree within 1 %.)

One lockstep worker X (the measured side) and its partners (the comparison's other sides,
loaded, each in its own process) are driven by hand. Every cycle times X's unit twice, in a
shuffled order: once *alone* (right after an untimed unit of X itself: X's threads are as
warm as in a lockstep cycle and no other engine ran in between, as if X had the machine to
itself), once *after a partner* (a partner's unit, then the settle pause, then X's unit:
exactly what lockstep does). Both are preceded by the same settle pause. The ratio
after/alone is formed within each cycle, so drift cancels; printed with a Student-t 95 %
interval, per settle pause and phase. (An "alone" after a long quiet pause measures
something else: cold threads; `--quiet-s` adds such a pause before both conditions.) With `--passive` the workers run with
OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep at once instead of spinning after work).

    .venv/bin/python examples/benchmarks/bench_lockstep_idle.py                    # small-moe on torch
    .venv/bin/python examples/benchmarks/bench_lockstep_idle.py -b onnxruntime -b llamacpp
    .venv/bin/python examples/benchmarks/bench_lockstep_idle.py --settle 0 --settle 0.005 --cycles 40
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from moerun import Cache, Point
from moerun.environment import capture
from moerun.lockstep import Side
from moerun.protocol import log_interval


def _unit(side: Side, phase: str) -> float:
    msg = side.call(side.unit_timeout, cmd="unit", phase=phase, reps=side.reps[phase],
                    steps=side.reps["decode_steps"])
    if msg is None:
        raise SystemExit(f"{side.point.model} died: {side.result().get('error')}")
    return msg["tok_s"]


def measure(backend: str, model: str, settles: list[float], cycles: int, quiet_s: float, unit_s: float) -> None:
    names = [model, f"{model}:dense-active", f"{model}:dense-total"]
    points = [Point(model=n, backend=backend, role="moe" if ":" not in n else n.split(":")[1], group=model)
              for n in names]
    cache, env = Cache(), {}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        sides = []
        for i, p in enumerate(points):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            side = Side(p, cache, env, folder, None)
            msg = side.receive(p.timeout_s)
            if not msg or not msg.get("ok"):
                raise SystemExit(f"{p.model} on {backend}: {side.result().get('error')}")
            side.call(p.timeout_s, cmd="warm")
            cal = side.call(p.timeout_s, cmd="calibrate")
            side.reps = {"prefill": max(1, round(unit_s / (cal["prefill_ns"] / 1e9))), "decode": 1,
                         "decode_steps": min(p.new_tokens, max(1, round(unit_s / (cal["step_ns"] / 1e9))))}
            side.unit_timeout = 120.0
            sides.append(side)
        x, partners = sides[0], sides[1:]
        try:
            for settle in settles:
                for phase in ("prefill", "decode"):
                    ratios = []
                    for _ in range(cycles):
                        got = {}
                        for cond in rng.sample(["alone", "after"], 2):
                            time.sleep(quiet_s)
                            _unit(x if cond == "alone" else rng.choice(partners), phase)
                            time.sleep(settle)
                            got[cond] = _unit(x, phase)
                        ratios.append(got["after"] / got["alone"])
                    iv = log_interval(ratios)
                    lo, hi = iv["ci95"]
                    print(f"{backend:20s} {phase:8s} settle {settle * 1e3:5.1f} ms: after a partner / alone "
                          f"{iv['value']:.4f} [{lo:.4f}-{hi:.4f}] over {cycles} cycles "
                          f"(unit: {x.reps['prefill']} prefills or {x.reps['decode_steps']} decode steps)",
                          flush=True)
        finally:
            for s in sides:
                s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-b", "--backend", action="append", help="backends (default: torch)")
    ap.add_argument("-m", "--model", default="small-moe")
    ap.add_argument("--settle", action="append", type=float, help="settle pauses in s (default: 0 and 0.005)")
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--quiet-s", type=float, default=0.0, help="pause before either condition (default 0)")
    ap.add_argument("--unit-s", type=float, default=0.05)
    ap.add_argument("--passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE in the workers")
    args = ap.parse_args()
    if args.passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    env = capture()
    print(f"machine: {env.get('cpu_model')}, probe {env.get('bandwidth_bytes_s', 0) / 1e9:.1f} GB/s; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    for backend in args.backend or ["torch"]:
        measure(backend, args.model, args.settle or [0.0, 0.005], args.cycles, args.quiet_s, args.unit_s)


if __name__ == "__main__":
    main()
