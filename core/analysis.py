"""From results to the verdict: MoE tokens/s over its dense twins, per backend and precision,
and the framework maturity matrix. Both read folded points (moerun.records.PointResult)."""

from __future__ import annotations

from typing import Any, Iterable

from .records import PointResult


def verdicts(results: Iterable[PointResult]) -> list[dict[str, Any]]:
    """One row per (group, workload) holding an MoE result and at least one twin or named
    baseline: MoE/twin ratios of decode and prefill tokens/s (> 1: the MoE is faster) paired
    by round (`moerun.protocol.paired`), each with its 95 % interval (`_ci95`), relative
    half-width (`_hw`), rounds used (`_n`) and contention flags, and, against the
    total-matched twin, the share of the ideal (weight bytes read per token) speed-up realised.
    `results` are folded points (moerun.records.point_results / load_results)."""
    from .comparison import SHARED_FIELDS, TWIN_KINDS, record_key
    from .protocol import paired

    by_key: dict[tuple, dict[str, PointResult]] = {}
    baselines: dict[tuple, list[PointResult]] = {}
    for r in results:
        if r.role == "moe" or r.role in TWIN_KINDS:
            by_key.setdefault((r.group, *record_key(r.record)), {})[r.role] = r
        elif r.role == "baseline" and r.ok:
            baselines.setdefault(record_key(r.record), []).append(r)
    rows = []
    for (group, *key), roles in by_key.items():
        label, backend, precision, *shared, options = key
        fields = dict(zip(SHARED_FIELDS, shared))
        moe = roles.get("moe")
        named = baselines.get(tuple(key), [])
        if moe is None or (len(roles) < 2 and not named):
            continue
        target, min_rounds = moe.protocol.get("target"), moe.protocol.get("min_rounds", 3)
        row: dict[str, Any] = {"group": group, "hardware": label, "options": options, "backend": backend,
                               "precision": precision,
                               "prompt_tokens": fields["prompt_tokens"], "new_tokens": fields["new_tokens"],
                               "threads": fields["threads"], "batch_size": fields["batch_size"] or 1,
                               "routing": fields["routing"] or "random", "memory_cap": fields["memory_cap"],
                               "target": target}
        stats: list[dict[str, Any]] = []

        def compare(other: PointResult, metric: str) -> dict[str, Any] | None:
            if not (moe.ok and other.ok):
                return None
            st = paired(moe.record, other.record, metric, min_rounds)
            if st["value"] is not None:
                stats.append(st)
            return st

        row["baselines"] = {}
        for b in named:
            entry: dict[str, Any] = {}
            for metric in ("decode_tok_s", "prefill_tok_s"):
                st = compare(b, metric)
                short = metric.split("_")[0]
                entry[short] = st["value"] if st else None
                entry[f"{short}_ci95"] = st["ci95"] if st else None
                entry[f"{short}_hw"] = st["halfwidth"] if st else None
            row["baselines"][b.model_name] = entry
        for twin, kind in TWIN_KINDS.items():
            if twin not in roles:
                continue
            for metric in ("decode_tok_s", "prefill_tok_s"):
                st = compare(roles[twin], metric)
                key = f"{metric.split('_')[0]}_vs_{kind}"
                row[key] = st["value"] if st else None
                row[key + "_ci95"] = st["ci95"] if st else None
                row[key + "_hw"] = st["halfwidth"] if st else None
                row[key + "_n"] = st["n"] if st else 0
        row["rounds"] = min((st["n"] for st in stats), default=0)
        row["halfwidth"] = max((st["halfwidth"] for st in stats), default=None)
        row["missed_target"] = bool(target) and row["halfwidth"] is not None and (
            row["halfwidth"] > target or row["rounds"] < min_rounds)
        row["contended"] = any(st["contended"] for st in stats)
        row["uneven_rounds"] = max((st["uneven"] for st in stats), default=0)
        row["bandwidth_range"] = max((st["bandwidth_range"] for st in stats if st.get("bandwidth_range")),
                                     default=None)
        row["method"] = stats[0]["method"] if stats else None
        if "dense-isomem" in roles:
            row["isomem"] = isomem_facts(moe, roles["dense-isomem"])
        if "dense-fit" in roles:
            row["fit_twin"] = {"model": roles["dense-fit"].model_name,
                               "params": (roles["dense-fit"].model or {}).get("total_params")}
        # Bandwidth-bound ideal: the dense model reads this many times more weight bytes (per
        # decode step: with a batch the MoE reads the union of the experts its sequences chose)
        total = roles.get("dense-total")
        ideal = None
        if total and moe.model and total.model:
            ideal = step_bytes(total) / step_bytes(moe)
        row["ideal_decode_vs_total"] = ideal
        got = row.get("decode_vs_total")
        row["realised_share_decode"] = got / ideal if got and ideal else None
        rows.append(row)
    return rows


def cap_crossovers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per MoE, backend, precision and workload measured under several memory caps: the cap
    at which its decode ratio against the iso-cap dense twin crosses 1 (moerun.predict's
    `cap_crossover` over the measured ratios), or None where it never crosses."""
    from .predict import cap_crossover

    sweeps: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("memory_cap") and row.get("decode_vs_fit"):
            key = (row["group"], row.get("hardware"), row["backend"], row["precision"], row.get("options"),
                   row.get("prompt_tokens"), row.get("batch_size"), row.get("routing"))
            sweeps.setdefault(key, []).append({"memory_cap": row["memory_cap"], "ratio": row["decode_vs_fit"]})
    out = []
    for (group, hardware, backend, precision, options, *_), sweep in sweeps.items():
        out.append({"group": group, "hardware": hardware, "backend": backend, "precision": precision,
                    "options": options, "caps": sorted(s["memory_cap"] for s in sweep),
                    "ratios": [s["ratio"] for s in sorted(sweep, key=lambda s: s["memory_cap"])],
                    "crossover": cap_crossover(sweep)})
    return out


def paired_precision(r: PointResult) -> str | None:
    """The precision a result is compared at: its own, except for an iso-memory twin
    (``NAME:dense-isomem-P-Q``), which runs at Q and pairs with the MoE at P."""
    from .comparison import record_key

    return record_key(r.record)[2]


def step_bytes(r: PointResult) -> float:
    """Weight bytes one decode step reads (the union of experts over a batch where measured)."""
    return r.metrics.get("weight_bytes_per_step") or r.model["weight_bytes_per_token"]


def isomem_facts(moe: PointResult, twin: PointResult) -> dict[str, Any]:
    """What the iso-memory comparison rests on: the dense point's shape, precision and bytes
    against the MoE's (the engine files as built: nominal bits only approximate k-quant
    mixes), and both sides' parity with the fp32 reference."""
    def parity(r: PointResult) -> dict[str, Any] | None:
        p = r.parity
        if not p.get("available"):
            return {"available": False, "reason": p.get("reason", "not measured")} if r.ok else None
        return {"available": True, "max_abs_diff": p["max_abs_diff"], "top1_agreement": p["top1_agreement"],
                "kernel_path": p.get("kernel_path")}

    out = {"model": twin.point.get("model") or twin.model_name, "precision": twin.precision,
           "status": twin.status, "error": twin.error,
           "total_params": twin.model.get("total_params"), "moe_total_params": moe.model.get("total_params"),
           "bytes": twin.artifact.get("size_bytes"), "moe_bytes": moe.artifact.get("size_bytes"),
           "parity": parity(twin), "moe_parity": parity(moe)}
    if out["bytes"] and out["moe_bytes"]:
        out["bytes_ratio"] = out["bytes"] / out["moe_bytes"]
    return out


def maturity(results: Iterable[PointResult]) -> list[dict[str, Any]]:
    """The framework maturity matrix: per backend x (dense, MoE) x precision, whether the
    points ran, were unsupported or failed, the worst parity seen and the median decode
    tokens/s of the points that ran."""
    import statistics

    cells: dict[tuple, list[PointResult]] = {}
    for r in results:
        cells.setdefault((r.hardware, r.backend, "MoE" if r.is_moe else "dense", r.precision), []).append(r)
    rows = []
    for (label, backend, kind, precision), rs in sorted(cells.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        statuses = [r.status for r in rs]
        parity = [r.parity for r in rs if r.parity.get("available")]
        decode = [r.metrics["decode_tok_s"] for r in rs if r.ok and r.metrics.get("decode_tok_s")]
        rows.append({
            "hardware": label, "backend": backend, "kind": kind, "precision": precision, "points": len(rs),
            "ok": statuses.count("ok"), "unsupported": statuses.count("unsupported"),
            "failed": statuses.count("failed") + statuses.count("unavailable"),
            "verdict": "runs" if statuses.count("ok") == len(rs) else
                       "unsupported" if statuses.count("unsupported") == len(rs) else
                       "fails" if not statuses.count("ok") else "partly",
            "max_abs_diff": max((p["max_abs_diff"] for p in parity), default=None),
            "min_top1": min((p["top1_agreement"] for p in parity), default=None),
            "decode_tok_s": statistics.median(decode) if decode else None,
            "reasons": sorted({r.error for r in rs if not r.ok and r.error})[:3],
        })
    return rows


def machine_label(env: dict[str, Any]) -> str:
    """'CPU model, N cores @ host' from a result's environment record."""
    if not env:
        return "unknown machine"
    return f"{env.get('cpu_model', '?')}, {env.get('cores', '?')} cores @ {env.get('hostname', '?')}"


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(int(n))
