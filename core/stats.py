"""Summary statistics for timings (pure Python/numpy, no engine)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """median, mean, p90, p99, min, max, coefficient of variation and count."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    mean = float(a.mean())
    return {
        "n": int(a.size),
        "median": float(np.median(a)),
        "mean": mean,
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "min": float(a.min()),
        "max": float(a.max()),
        "cv": float(a.std(ddof=1) / mean) if a.size > 1 and mean else 0.0,
    }


def ratio_interval(a: list[float], b: list[float], *, level: float = 0.95, resamples: int = 2000,
                   seed: int = 0) -> list[float] | None:
    """Percentile-bootstrap interval of median(a) / median(b), resampling each side's
    repetitions independently (fixed seed: the same results give the same interval).
    None with fewer than 2 repetitions on either side."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ra = np.median(xa[rng.integers(0, len(xa), (resamples, len(xa)))], axis=1)
    rb = np.median(xb[rng.integers(0, len(xb), (resamples, len(xb)))], axis=1)
    lo, hi = np.percentile(ra / rb, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return [float(lo), float(hi)]
