"""Op-level breakdown: where a step's time goes, by category, from each engine's own
instrument, reconciled against the un-instrumented timings of the same run.

Two kinds of instrument feed it:

* **cut timing** (`cut_timing`): the engine runs the step and stops it right after the
  k-th category boundary (llama.cpp: its scheduler eval callback ends the graph there;
  PyTorch: moerun's labelled regions in its own model code; ONNX Runtime: a session pruned
  to the nodes before the cut). The wall time to cut k,
  minus the time to cut k-1, is the time of the nodes between them. Each measured step
  holds at most one cut, so the instrument costs the same in every step and cancels in
  the differences; nothing is computed node by node.
* **per-node profilers** (TensorRT's IProfiler; torch.profiler and ONNX Runtime's session
  profiling as options): each node's or region's recorded duration. Their fixed cost per
  node, microseconds, swamps the steps of small models.
"""

from __future__ import annotations

import os
import random
import statistics
from typing import Any, Callable, Sequence

CATEGORIES = ("embedding", "attention", "norm", "router", "experts", "shared_expert", "dense_ffn", "head", "other")
MOE_BLOCK = ("router", "experts", "shared_expert")


def empty() -> dict[str, float]:
    return {c: 0.0 for c in CATEGORIES}


def monotone(values: Sequence[float]) -> list[float]:
    """The non-decreasing sequence nearest `values` in least squares (pool adjacent
    violators): cumulative times measured with noise, made cumulative again."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out: list[float] = []
    for s, n in blocks:
        out.extend([s / n] * int(n))
    return out


def cut_points(categories: Sequence[str]) -> tuple[list[int], list[str]]:
    """Cut points of one step whose nodes, in order, have `categories`: node 0 (with the
    step's set-up) ending a stretch counted as ``other``, then the last node of every run of
    one category. Returns the node indices and the label of the stretch each one ends."""
    if not categories:
        raise ValueError("an empty graph has no cut points")
    n = len(categories)
    points = [0] + [j for j in range(1, n) if j == n - 1 or categories[j] != categories[j + 1]]
    return points, ["other"] + [categories[j] for j in points[1:]]


def cut_timing(step: Callable[[int | None], float], labels: Sequence[str], *,
               plain: Callable[[], float] | None = None, repetitions: int = 31, budget_s: float | None = None,
               seed: int = 0) -> tuple[dict[str, float], dict[str, Any]]:
    """Category seconds of one step from cut timing.

    `step(k)` runs the step stopped right after cut point k (``None``: not stopped, the
    instrument armed) and returns its wall seconds. `labels[k]` is the category of the
    interval that ends at cut k (the first interval also holds the step's set-up); the time
    after the last cut goes to ``other``. Every cut is measured `repetitions` times (fewer
    when the whole sweep would exceed `budget_s`, default ``$MOERUN_BREAKDOWN_BUDGET_S`` or
    10 s per phase; at least once), in a shuffled order per
    repetition so drift spreads over all cuts; the medians are made non-decreasing
    (`monotone`) before differencing. `plain()`, when given, times the same step without the
    instrument, interleaved with the cuts: the reference the category sum is reconciled with,
    measured at the same moments (these machines are shared and drift)."""
    if not labels:
        raise ValueError("cut timing needs at least one cut point")
    bad = sorted(set(labels) - set(CATEGORIES))
    if bad:
        raise ValueError(f"unknown categories: {', '.join(bad)}")
    if budget_s is None:
        budget_s = float(os.environ.get("MOERUN_BREAKDOWN_BUDGET_S", "10"))
    probe = step(None)
    per_rep = probe * (len(labels) + 1 + (plain is not None))
    reps = max(1, min(repetitions, int(budget_s / max(per_rep, 1e-9))))
    rng = random.Random(seed)
    times: list[list[float]] = [[] for _ in labels]
    full: list[float] = []
    plains: list[float] = []
    order: list[int | str | None] = [*range(len(labels)), None] + (["plain"] if plain else [])
    for k in (k for _ in range(reps) for k in rng.sample(order, len(order))):
        if k == "plain":
            plains.append(plain())  # type: ignore[misc]
            continue
        t = step(k)  # type: ignore[arg-type]
        (full if k is None else times[k]).append(t)  # type: ignore[index]
    cum = monotone([statistics.median(t) for t in times])
    cats, prev = empty(), 0.0
    for label, t in zip(labels, cum):
        cats[label] += t - prev
        prev = t
    armed = statistics.median(full)
    cats["other"] += max(0.0, armed - prev)
    info: dict[str, Any] = {"cuts": len(labels), "repetitions": reps, "armed_step_s": armed}
    if plains:
        info["plain_step_s"] = statistics.median(plains)
    return cats, info


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


def reconcile(session: Any, prompt: list[int], follow: list[int], timings: dict[str, Any]) -> dict[str, Any]:
    """The engine's own per-category times, after (never during) the timed repetitions.
    The category sum is reconciled with the un-instrumented step timed at the same moments
    by the instrument's run where the backend provides it (these machines are shared and
    drift), else with this run's timed medians; both references are kept."""
    raw = session.breakdown(prompt, follow[: max(1, min(len(follow), 16))])
    if raw is None:
        return {"available": False, "reason": "this backend exposes no per-op instrument"}
    out: dict[str, Any] = {"available": True, "instrument": raw.get("instrument", "")}
    timed = {"prefill": timings["prefill_ms"]["median"] / 1e3}
    if follow and raw.get("decode"):
        timed["decode"] = timings["decode_token_ms"]["median"] / 1e3
    for phase, timed_s in timed.items():
        same_moment = raw.get(f"{phase}_plain_s")
        d = summarize(raw[phase], raw[f"{phase}_wall_s"], same_moment or timed_s)
        d["plain_reference"] = "interleaved with the instrumented steps" if same_moment else "timed repetitions"
        d["timed_plain_s"] = timed_s
        d["sum_over_timed"] = d["sum_s"] / timed_s if timed_s else None
        out[phase] = d
    if raw.get("detail"):
        out["detail"] = raw["detail"]
    return out
