"""From results to the verdict: MoE tokens/s over its dense twins, per backend and precision."""

from __future__ import annotations

from typing import Any, Iterable


def _metric(result: dict[str, Any], name: str) -> float | None:
    if result.get("status") != "ok":
        return None
    return result.get("metrics", {}).get(name)


def verdicts(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group, backend, precision) holding an MoE result and at least one twin:
    MoE/twin ratios of decode and prefill tokens/s (> 1: the MoE is faster) and, against the
    total-matched twin, the share of the ideal (weight bytes read per token) speed-up realised."""
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in results:
        if r.get("role") in ("moe", "dense-active", "dense-total"):
            by_key.setdefault((r.get("group"), r.get("backend"), r.get("precision")), {})[r["role"]] = r
    rows = []
    for (group, backend, precision), roles in by_key.items():
        moe = roles.get("moe")
        if moe is None or len(roles) < 2:
            continue
        row: dict[str, Any] = {"group": group, "backend": backend, "precision": precision}
        for twin in ("dense-active", "dense-total"):
            if twin not in roles:
                continue
            for metric in ("decode_tok_s", "prefill_tok_s"):
                a, b = _metric(moe, metric), _metric(roles[twin], metric)
                row[f"{metric.split('_')[0]}_vs_{twin.split('-')[1]}"] = a / b if a and b else None
        # Bandwidth-bound ideal: the dense model reads this many times more weight bytes.
        total = roles.get("dense-total")
        ideal = None
        if total and moe.get("model") and total.get("model"):
            ideal = total["model"]["weight_bytes_per_token"] / moe["model"]["weight_bytes_per_token"]
        row["ideal_decode_vs_total"] = ideal
        got = row.get("decode_vs_total")
        row["realised_share_decode"] = got / ideal if got and ideal else None
        rows.append(row)
    return rows


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))
