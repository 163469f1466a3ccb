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
