"""From results to the verdict: MoE tokens/s over its dense twins, per backend and precision."""

from __future__ import annotations

from typing import Any, Iterable


def verdicts(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (group, workload) holding an MoE result and at least one twin or named
    baseline: MoE/twin ratios of decode and prefill tokens/s (> 1: the MoE is faster) paired
    by round (`moerun.protocol.paired`), each with its 95 % interval (`_ci95`), relative
    half-width (`_hw`), rounds used (`_n`) and contention flags, and, against the
    total-matched twin, the share of the ideal (weight bytes read per token) speed-up realised.
    Per-round records are collapsed first; older one-record files still work (one round)."""
    from .comparison import SHARED_FIELDS, record_key
    from .protocol import collapse, paired

    results = collapse(results)
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    baselines: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        if r.get("role") in ("moe", "dense-active", "dense-total", "dense-isomem"):
            by_key.setdefault((r.get("group"), *record_key(r)), {})[r["role"]] = r
        elif r.get("role") == "baseline" and r.get("status") == "ok":
            baselines.setdefault(record_key(r), []).append(r)
    rows = []
    for (group, *key), roles in by_key.items():
        label, backend, precision, *shared, options = key
        fields = dict(zip(SHARED_FIELDS, shared))
        moe = roles.get("moe")
        named = baselines.get(tuple(key), [])
        if moe is None or (len(roles) < 2 and not named):
            continue
        protocol = moe.get("protocol") or {}
        target, min_rounds = protocol.get("target"), protocol.get("min_rounds", 3)
        row: dict[str, Any] = {"group": group, "hardware": label, "options": options, "backend": backend,
                               "precision": precision,
                               "prompt_tokens": fields["prompt_tokens"], "new_tokens": fields["new_tokens"],
                               "threads": fields["threads"], "batch_size": fields["batch_size"] or 1,
                               "target": target}
        stats: list[dict[str, Any]] = []

        def compare(other: dict[str, Any], metric: str) -> dict[str, Any] | None:
            if moe.get("status") != "ok" or other.get("status") != "ok":
                return None
            st = paired(moe, other, metric, min_rounds)
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
            row["baselines"][b["model_name"]] = entry
        for twin in ("dense-active", "dense-total", "dense-isomem"):
            if twin not in roles:
                continue
            for metric in ("decode_tok_s", "prefill_tok_s"):
                st = compare(roles[twin], metric)
                key = f"{metric.split('_')[0]}_vs_{twin.split('-')[1]}"
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
        # Bandwidth-bound ideal: the dense model reads this many times more weight bytes (per
        # decode step: with a batch the MoE reads the union of the experts its sequences chose)
        total = roles.get("dense-total")
        ideal = None
        if total and moe.get("model") and total.get("model"):
            ideal = step_bytes(total) / step_bytes(moe)
        row["ideal_decode_vs_total"] = ideal
        got = row.get("decode_vs_total")
        row["realised_share_decode"] = got / ideal if got and ideal else None
        rows.append(row)
    return rows


def paired_precision(r: dict[str, Any]) -> str | None:
    """The precision a result is compared at: its own, except for an iso-memory twin
    (``NAME:dense-isomem-P-Q``), which runs at Q and pairs with the MoE at P."""
    from .comparison import record_key

    return record_key(r)[2]


def step_bytes(r: dict[str, Any]) -> float:
    """Weight bytes one decode step reads (the union of experts over a batch where measured)."""
    m = r.get("metrics") or {}
    return m.get("weight_bytes_per_step") or r["model"]["weight_bytes_per_token"]


def isomem_facts(moe: dict[str, Any], twin: dict[str, Any]) -> dict[str, Any]:
    """What the iso-memory comparison rests on: the dense point's shape, precision and bytes
    against the MoE's (the engine files as built: nominal bits only approximate k-quant
    mixes), and both sides' parity with the fp32 reference."""
    def size(r: dict[str, Any]) -> int | None:
        return (r.get("artifact") or {}).get("size_bytes")

    def parity(r: dict[str, Any]) -> dict[str, Any] | None:
        p = r.get("parity") or {}
        if not p.get("available"):
            return {"available": False, "reason": p.get("reason", "not measured")} if r.get("status") == "ok" else None
        return {"available": True, "max_abs_diff": p["max_abs_diff"], "top1_agreement": p["top1_agreement"],
                "kernel_path": p.get("kernel_path")}

    model = twin.get("model") or {}
    out = {"model": (twin.get("point") or {}).get("model") or twin.get("model_name"),
           "precision": twin.get("precision"),
           "status": twin.get("status"), "error": twin.get("error"),
           "total_params": model.get("total_params"), "moe_total_params": (moe.get("model") or {}).get("total_params"),
           "bytes": size(twin), "moe_bytes": size(moe), "parity": parity(twin), "moe_parity": parity(moe)}
    if out["bytes"] and out["moe_bytes"]:
        out["bytes_ratio"] = out["bytes"] / out["moe_bytes"]
    return out


def maturity(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The framework maturity matrix: per backend x (dense, MoE) x precision, whether the
    points ran, were unsupported or failed, the worst parity seen and the median decode
    tokens/s of the points that ran."""
    import statistics

    from .protocol import collapse

    cells: dict[tuple, list[dict[str, Any]]] = {}
    for r in collapse(results):
        kind = "MoE" if (r.get("model") or {}).get("is_moe") or r.get("role") == "moe" else "dense"
        cells.setdefault((hardware(r), r.get("backend"), kind, r.get("precision")), []).append(r)
    rows = []
    for (label, backend, kind, precision), rs in sorted(cells.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        statuses = [r.get("status") for r in rs]
        parity = [r["parity"] for r in rs if (r.get("parity") or {}).get("available")]
        decode = [r["metrics"]["decode_tok_s"] for r in rs if r.get("status") == "ok"
                  and (r.get("metrics") or {}).get("decode_tok_s")]
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
            "reasons": sorted({r.get("error") for r in rs if r.get("status") != "ok" and r.get("error")})[:3],
        })
    return rows


def options_text(r: dict[str, Any]) -> str:
    """A result's backend options as 'k=v k=v' (sorted), '' when none."""
    options = (r.get("point") or {}).get("options") or {}
    return " ".join(f"{k}={options[k]}" for k in sorted(options))


def hardware(r: dict[str, Any]) -> str | None:
    """A result's fleet label (`--hardware`), None for a point measured without one."""
    return r.get("hardware") or (r.get("point") or {}).get("hardware")


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
