"""Op-level breakdown: where a step's time goes, by category, from each engine's own
instrument, reconciled against the un-instrumented timings of the same run."""

from __future__ import annotations

from typing import Any

CATEGORIES = ("embedding", "attention", "norm", "router", "experts", "shared_expert", "dense_ffn", "head", "other")
MOE_BLOCK = ("router", "experts", "shared_expert")


def empty() -> dict[str, float]:
    return {c: 0.0 for c in CATEGORIES}


def summarize(phase: dict[str, float], instrumented_s: float, plain_s: float | None) -> dict[str, Any]:
    """Category seconds for one step -> shares, the category sum reconciled with the plain
    (un-instrumented) step time, the instrument's overhead (instrumented wall time over the
    plain time), the wall time no category covers, and routing's share of the MoE block."""
    total = sum(phase.values())
    moe = sum(phase[c] for c in MOE_BLOCK)
    out: dict[str, Any] = {
        "seconds": phase,
        "shares": {c: (v / total if total else 0.0) for c, v in phase.items()},
        "sum_s": total,
        "instrumented_s": instrumented_s,
        "unattributed_s": max(0.0, instrumented_s - total),
        "router_share_of_moe_block": phase["router"] / moe if moe else None,
    }
    if plain_s:
        out["plain_s"] = plain_s
        out["sum_over_plain"] = total / plain_s
        out["instrument_overhead"] = instrumented_s / plain_s - 1
    return out


def time_phases(session: Any, prompt: Any, follow: Any) -> tuple[float, float]:
    """Wall seconds of one prefill of `prompt` and of the mean decode step over `follow`,
    for breakdown runs whose instrument records per phase on its own."""
    import time

    session.reset()
    t0 = time.perf_counter()
    session.prefill(prompt)
    session.synchronize()
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for tok in follow:
        session.decode(tok)
    session.synchronize()
    return prefill, (time.perf_counter() - t0) / max(1, len(follow))
