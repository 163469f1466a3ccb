#!/usr/bin/env python
"""Do verdicts hold? Two moerun studies in a row, every verdict of the second against the
first: its value, the first's 95 % interval, the difference, and whether it lies inside that
interval and within +-5 % (issue "Verdicts that hold").

    .venv/bin/python examples/benchmarks/bench_verdict_repeat.py                  # two default studies
    .venv/bin/python examples/benchmarks/bench_verdict_repeat.py --burn            # the second beside a busy core
    .venv/bin/python examples/benchmarks/bench_verdict_repeat.py a.jsonl b.jsonl   # two existing results files
    .venv/bin/python examples/benchmarks/bench_verdict_repeat.py -- -b llamacpp    # extra moerun arguments

With --burn a process spins on one core for the whole second study: moerun must warn before
measuring, flag the contended points, and its verdicts either stay within +-5 % of the quiet
run or be marked as having missed the target.
"""

from __future__ import annotations

import argparse
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moerun.analysis import verdicts
from moerun.results import read_results

KEYS = ("decode_vs_active", "prefill_vs_active", "decode_vs_total", "prefill_vs_total")


def _spin() -> None:
    while True:
        pass


def _study(out: Path, extra: list[str], burn: bool) -> tuple[float, str]:
    burner = None
    if burn:
        burner = multiprocessing.Process(target=_spin, daemon=True)
        burner.start()
        time.sleep(1.0)
    try:
        exe = Path(sys.executable).with_name("moerun")
        t0 = time.perf_counter()
        done = subprocess.run([str(exe), "-o", str(out), "-q", *extra], capture_output=True, text=True)
        return time.perf_counter() - t0, done.stderr
    finally:
        if burner is not None:
            burner.terminate()


def _rows(path: Path) -> dict[tuple, dict]:
    out = {}
    for v in verdicts(read_results(path)):
        for key in KEYS:
            if v.get(key) is not None:
                out[(v["group"], v["backend"], v["precision"], key)] = {
                    "value": v[key], "ci": v.get(key + "_ci95"), "hw": v.get(key + "_hw"),
                    "missed": v.get("missed_target"), "contended": v.get("contended")}
        for name, b in (v.get("baselines") or {}).items():
            for metric in ("decode", "prefill"):
                if b.get(metric) is not None:
                    out[(v["group"], v["backend"], v["precision"], f"{metric}_vs_{name}")] = {
                        "value": b[metric], "ci": b.get(f"{metric}_ci95"), "hw": b.get(f"{metric}_hw"),
                        "missed": v.get("missed_target"), "contended": v.get("contended")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, help="two results files (default: run two studies)")
    ap.add_argument("--burn", action="store_true", help="keep one core busy during the second study")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments for both moerun runs")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    if args.files and len(args.files) != 2:
        ap.error("give two results files, or none")
    if args.files:
        a, b = args.files
    else:
        folder = Path(tempfile.mkdtemp(prefix="moerun-repeat-"))
        a, b = folder / "a.jsonl", folder / "b.jsonl"
        for path, burn in ((a, False), (b, args.burn)):
            wall, stderr = _study(path, extra, burn)
            warned = "busy" in stderr
            print(f"{path.name}: {wall:.0f} s{' (one core burning)' if burn else ''}; "
                  f"busy warning before measuring: {'yes' if warned else 'no'}")
            for line in stderr.splitlines():
                if "rounds stopped" in line or "missed" in line or "warning" in line:
                    print("   " + line)
    ra, rb = _rows(a), _rows(b)
    print(f"\n{'verdict':56s} {'first [95 % interval]':>24s} {'second':>8s} {'diff':>7s}  inside  ±5%   second run")
    inside = within = total = 0
    for key in sorted(ra.keys() & rb.keys()):
        x, y = ra[key], rb[key]
        diff = y["value"] / x["value"] - 1
        ins = bool(x["ci"]) and x["ci"][0] <= y["value"] <= x["ci"][1]
        near = abs(diff) <= 0.05
        total += 1
        inside += ins
        within += near
        note = ", ".join(filter(None, ["missed target" if y["missed"] else "",
                                       "contended" if y["contended"] else ""]))
        ci = f"[{x['ci'][0]:.2f}-{x['ci'][1]:.2f}]" if x["ci"] else "[-]"
        label = " ".join(str(k) for k in key)
        print(f"{label:56s} {x['value']:>9.3f}x {ci:>13s} {y['value']:>7.3f}x {diff:>+7.1%}  "
              f"{'yes' if ins else 'NO':6s}  {'yes' if near else 'NO':4s}  {note}")
    print(f"\n{inside} of {total} verdicts of the second run inside the first's interval; "
          f"{within} of {total} within ±5 %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
