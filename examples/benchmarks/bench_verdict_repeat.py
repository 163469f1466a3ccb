#!/usr/bin/env python
"""Do verdicts hold? Two moerun studies in a row, every verdict side by side: both values and
95 % intervals, the difference, whether the second lies inside the first's interval, whether
the two intervals overlap, and whether they agree within +-3 % and +-5 % (issues "Verdicts
that hold", "Verdicts in minutes on any machine").

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
from moerun.records import point_results

KEYS = ("decode_vs_active", "prefill_vs_active", "decode_vs_total", "prefill_vs_total", "decode_vs_isomem",
        "prefill_vs_isomem")


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
    for v in verdicts(point_results(read_results(path))):
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
    print(f"\n{'verdict':52s} {'first [95 % interval]':>23s} {'second [95 % interval]':>23s} {'diff':>7s}  "
          f"inside overlap ±3%  ±5%  second run")
    counts = {"inside": 0, "overlap": 0, "3": 0, "5": 0}
    total = 0
    for key in sorted(ra.keys() & rb.keys()):
        x, y = ra[key], rb[key]
        diff = y["value"] / x["value"] - 1
        ins = bool(x["ci"]) and x["ci"][0] <= y["value"] <= x["ci"][1]
        over = bool(x["ci"] and y["ci"]) and x["ci"][0] <= y["ci"][1] and y["ci"][0] <= x["ci"][1]
        total += 1
        for name, ok in (("inside", ins), ("overlap", over), ("3", abs(diff) <= 0.03), ("5", abs(diff) <= 0.05)):
            counts[name] += ok
        note = ", ".join(filter(None, ["missed target" if y["missed"] else "",
                                       "contended" if y["contended"] else ""]))

        def cell(v):
            return f"{v['value']:.3f}x " + (f"[{v['ci'][0]:.3f}-{v['ci'][1]:.3f}]" if v["ci"] else "[-]")

        label = " ".join(str(k) for k in key)
        print(f"{label:52s} {cell(x):>23s} {cell(y):>23s} {diff:>+7.1%}  {'yes' if ins else 'NO':6s} "
              f"{'yes' if over else 'NO':7s} {'yes' if abs(diff) <= 0.03 else 'NO':4s} "
              f"{'yes' if abs(diff) <= 0.05 else 'NO':4s} {note}")
    print(f"\nof {total} verdicts: {counts['inside']} of the second run inside the first's interval, "
          f"{counts['overlap']} with overlapping intervals, {counts['3']} within ±3 %, {counts['5']} within ±5 %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
