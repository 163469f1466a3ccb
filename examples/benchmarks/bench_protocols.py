#!/usr/bin/env python
"""Precision per minute: sequential rounds (the old protocol, `--no-lockstep`) against lockstep,
run alternately in the same hour on the same comparison.

Each run is a warm `moerun` with the same budget; printed per run: wall time, the rounds it
reached, every verdict's 95 % half-width (median and widest), and the information rate
1 / halfwidth^2 per minute of wall time (a half-width shrinks as one over the square root
of the measuring time, so this rate is what a protocol buys per minute), then the ratio
lockstep / sequential of the median rates.

    .venv/bin/python examples/benchmarks/bench_protocols.py                       # default study, 2 pairs
    .venv/bin/python examples/benchmarks/bench_protocols.py --pairs 3 -- -b llamacpp --budget 60
"""

from __future__ import annotations

import argparse
import statistics
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


def _run(out: Path, extra: list[str], lockstep: bool) -> dict:
    exe = Path(sys.executable).with_name("moerun")
    t0 = time.perf_counter()
    done = subprocess.run([str(exe), "-q", "-o", str(out), "--lockstep" if lockstep else "--no-lockstep", *extra],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise SystemExit(done.stderr[-2000:])
    rows = verdicts(point_results(read_results(out)))
    hws = [v[k + "_hw"] for v in rows for k in KEYS if v.get(k + "_hw") is not None]
    rounds = [v["rounds"] for v in rows]
    rate = statistics.median(1 / hw ** 2 for hw in hws) / (wall / 60) if hws else 0.0
    return {"wall": wall, "hws": hws, "rounds": rounds, "rate": rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2, help="sequential/lockstep pairs, alternating (default 2)")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: arguments for every moerun run")
    args = ap.parse_args()
    extra = [a for a in args.extra if a != "--"]
    folder = Path(tempfile.mkdtemp(prefix="moerun-protocols-"))
    rates: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        for lockstep in order:
            r = _run(folder / f"{i}-{'lockstep' if lockstep else 'sequential'}.jsonl", extra, lockstep)
            rates[lockstep].append(r["rate"])
            hws = sorted(r["hws"])
            print(f"pair {i + 1} {'lockstep  ' if lockstep else 'sequential'}: {r['wall']:5.0f} s, rounds "
                  f"{min(r['rounds'], default=0)}-{max(r['rounds'], default=0)}, {len(hws)} verdicts, half-width "
                  f"median ±{statistics.median(hws):.1%} widest ±{hws[-1]:.1%}, "
                  f"1/hw² per minute {r['rate']:.0f}", flush=True)
    if all(rates.values()):
        ratio = statistics.median(rates[True]) / statistics.median(rates[False])
        print(f"\nprecision per minute, lockstep / sequential (median 1/hw² per minute): {ratio:.2f}x "
              f"(equivalently, the same half-width in {1 / ratio:.2f}x the time)")
    print(f"results files in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
