"""Why the MoE is behind: the ablation ladder's gap taken apart by measurement.

The ladder (`moerun --ladder`, docs/concepts.md "The ablation ladder") measures four models
of one comparison, in lockstep where it can:

1. ``dense-active``: the dense FFN of the MoE's active width;
2. ``split``: the same bytes as k always-on experts of the expert shape, no router;
3. ``fixed-route``: the MoE with weights that send every token to experts 0..k-1
   (`moerun.checkpoint.fix_route`);
4. ``moe``: the MoE itself.

Per phase (decode, prefill) the time per token of each rung gives the steps 1→2
(shape and dispatch: expert-sized GEMVs and their operations), 2→3 (routing: the router,
top-k and the gather/scatter around the experts) and 3→4 (sparsity: weights that change
every token), each in microseconds per token and as a share of the gap 1→4, with 95 %
intervals from a bootstrap over restarts and, inside each, lockstep cycles (the cycles of
one restart are the units measured within a second of each other; sequential rounds count
as one unit each). Where the rungs counted their operations, 1→2 divided by the operations
it adds is the engine's dispatch cost per operation on this machine. Where `--breakdown` ran
on the MoE, its routing time sits beside the ladder's routing step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from .records import PointResult
from .spec import LADDER

if TYPE_CHECKING:  # pragma: no cover
    from .spec import ModelSpec

STEPS = (("shape", "dense-active", "split", "shape & dispatch"), ("routing", "split", "fixed-route", "routing"),
         ("sparsity", "fixed-route", "moe", "sparsity"))
PHASES = (("decode", "decode_tok_s"), ("prefill", "prefill_tok_s"))
RESAMPLES = 2000


def ladders(results: Iterable[PointResult]) -> list[dict[str, Any]]:
    """One row per MoE comparison holding its active twin and at least one other rung: the
    rungs' speeds and operation counts, the gap's steps per phase with intervals, the
    dispatch cost per operation, and the breakdown's routing time where it ran."""
    from .comparison import SHARED_FIELDS, record_key

    by_key: dict[tuple, dict[str, PointResult]] = {}
    for r in results:
        if r.role in LADDER and r.ok:
            roles = by_key.setdefault((r.group, *record_key(r.record)), {})
            # a rung measured twice (a resumed run with other flags): the record with more rounds
            if r.role not in roles or _ok_rounds(r) > _ok_rounds(roles[r.role]):
                roles[r.role] = r
    rows = []
    for (group, label, backend, precision, *shared, options), roles in by_key.items():
        rungs = [role for role in LADDER if role in roles]
        if "moe" not in roles or "dense-active" not in roles or len(rungs) < 3:
            continue
        fields = dict(zip(SHARED_FIELDS, shared))
        row: dict[str, Any] = {
            "group": group, "hardware": label, "backend": backend, "precision": precision, "options": options,
            "batch_size": fields["batch_size"] or 1, "prompt_tokens": fields["prompt_tokens"],
            "new_tokens": fields["new_tokens"], "routing": fields["routing"] or "random",
            "rungs": [{"role": role, "model": roles[role].model_name,
                       "decode_tok_s": roles[role].metrics.get("decode_tok_s"),
                       "prefill_tok_s": roles[role].metrics.get("prefill_tok_s"),
                       "ops": roles[role].ops.get("ops") if roles[role].ops.get("available") else None,
                       "ops_unit": roles[role].ops.get("unit")} for role in rungs],
        }
        for phase, metric in PHASES:
            units = _units([roles[role] for role in rungs], metric)
            if units is not None:
                row[phase] = _steps(rungs, units)
                row[phase]["method"] = units[2]
        row["dispatch"] = _dispatch(row)
        row["breakdown"] = _breakdown(roles["moe"], row.get("decode"))
        rows.append(row)
    return rows


def _ok_rounds(r: PointResult) -> int:
    return sum(1 for x in r.rounds if x.get("status") == "ok")


def _units(sides: list[PointResult], metric: str) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Seconds per token of every side per unit: (times [units, sides], each unit's restart,
    how they were measured). A lockstep restart's units are its cycles (all sides present);
    a sequential round is one unit. None without a round every side measured."""
    from .protocol import round_values

    per_side = [round_values(s.record, metric) for s in sides]
    times, restart, lockstep = [], [], True
    for rnd in sorted(set.intersection(*(set(v) for v in per_side))):
        rs = [v[rnd] for v in per_side]
        cycles = [r["cycles"] for r in rs]
        if all(cycles) and len({c["session"] for c in cycles}) == 1:
            for rates in zip(*(c["values"] for c in cycles)):  # a side that died pairs up to its last cycle
                if all(rates):
                    times.append([1.0 / x for x in rates])
                    restart.append(rnd)
        else:
            lockstep = False
            times.append([1.0 / r["value"] for r in rs])
            restart.append(rnd)
    if not times:
        return None
    how = ("lockstep cycles, restarts resampled" if lockstep else
           "sequential rounds (sides measured apart: drift between them is in the steps)")
    return np.asarray(times), np.asarray(restart), how


def _steps(rungs: list[str], units: tuple[np.ndarray, np.ndarray, str]) -> dict[str, Any]:
    """Each consecutive rung's added microseconds per token and share of the gap, with
    bootstrap intervals (restarts resampled, then units within each)."""
    times, restart, _ = units
    col = {role: i for i, role in enumerate(rungs)}
    pairs = [(rungs[i], rungs[i + 1]) for i in range(len(rungs) - 1)]
    known = {(a, b): (name, label) for name, a, b, label in STEPS}
    boot = _bootstrap_means(times, restart)  # [resamples, sides]
    mean = times.mean(axis=0)
    gap = mean[col["moe"]] - mean[col["dense-active"]]
    gaps = boot[:, col["moe"]] - boot[:, col["dense-active"]]
    out: dict[str, Any] = {
        "us_per_token": {role: mean[col[role]] * 1e6 for role in rungs},
        "gap_us": gap * 1e6, "gap_us_ci95": _ci(gaps * 1e6),
        "gap_ratio": mean[col["moe"]] / mean[col["dense-active"]],
        "units": int(len(times)), "restarts": int(len(set(restart.tolist()))), "steps": [],
    }
    for a, b in pairs:
        d = mean[col[b]] - mean[col[a]]
        ds = boot[:, col[b]] - boot[:, col[a]]
        with np.errstate(divide="ignore", invalid="ignore"):
            shares = ds / gaps
        name, label = known.get((a, b), (f"{a}->{b}", f"{a} to {b}"))
        out["steps"].append({
            "step": name, "from": a, "to": b, "label": label,
            "us": d * 1e6, "us_ci95": _ci(ds * 1e6),
            "share": d / gap if gap else None,
            "share_ci95": _ci(shares[np.isfinite(shares)]) if gap else None,
        })
    return out


def _bootstrap_means(times: np.ndarray, restart: np.ndarray, resamples: int = RESAMPLES) -> np.ndarray:
    """Mean seconds per token of each side over a two-level resample: restarts with
    replacement, then units within each chosen restart (one restart: units only)."""
    rng = np.random.default_rng(0)
    groups = [np.flatnonzero(restart == g) for g in sorted(set(restart.tolist()))]
    out = np.empty((resamples, times.shape[1]))
    for i in range(resamples):
        chosen = [groups[j] for j in rng.integers(0, len(groups), len(groups))] if len(groups) > 1 else groups
        idx = np.concatenate([g[rng.integers(0, len(g), len(g))] for g in chosen])
        out[i] = times[idx].mean(axis=0)
    return out


def _ci(values: np.ndarray) -> list[float] | None:
    if len(values) < 2:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def _dispatch(row: dict[str, Any]) -> dict[str, Any]:
    """The engine's cost per operation at decode: what the split twin adds to the active
    twin's step (the same weight bytes, more and smaller operations) over the operations it
    adds. Unavailable where a count or the step is missing or the split adds no operation."""
    ops = {r["role"]: r["ops"] for r in row["rungs"]}
    decode = row.get("decode") or {}
    step = next((s for s in decode.get("steps", ()) if s["from"] == "dense-active" and s["to"] == "split"), None)
    out: dict[str, Any] = {"ops": ops, "unit": next((r["ops_unit"] for r in row["rungs"] if r["ops_unit"]), None)}
    if step is None or ops.get("split") is None or ops.get("dense-active") is None:
        return {**out, "available": False, "reason": "needs the active and split twins' decode times and op counts"}
    added = ops["split"] - ops["dense-active"]
    if added <= 0:
        return {**out, "available": False, "reason": f"the split twin adds {added} operations"}
    ci = step["us_ci95"]
    batch = row["batch_size"]  # the step's time is per token: a step of B tokens costs B times it
    return {**out, "available": True, "added_ops": added, "us_per_op": step["us"] * batch / added,
            "us_per_op_ci95": [c * batch / added for c in ci] if ci else None,
            "method": "(split - active decode step) / (split - active operations): equal bytes, more operations"}


def _breakdown(moe: PointResult, decode: dict[str, Any] | None) -> dict[str, Any] | None:
    """The MoE's own per-op instrument beside the ladder: its routing time per decode token
    and that time's share of the ladder's gap."""
    b = moe.breakdown
    if not b.get("available") or not (b.get("decode") or {}).get("seconds"):
        return None
    d = b["decode"]
    scale = (d.get("timed_plain_s") or d.get("plain_s") or d["sum_s"]) / d["sum_s"] if d.get("sum_s") else 1.0
    router_us = d["seconds"]["router"] * scale * 1e6 / max(1, int(moe.batch_size))
    out = {"instrument": b.get("instrument"), "router_us": router_us,
           "router_share_of_moe_block": d.get("router_share_of_moe_block")}
    if decode and decode.get("gap_us"):
        out["router_share_of_gap"] = router_us / decode["gap_us"]
    return out


# ---------------------------------------------------------------- operations of a real graph
def proxy_spec(spec: "ModelSpec") -> "ModelSpec":
    """A spec with `spec`'s graph and small widths: the same family, layers, experts, top-k,
    shared expert, q/k norms, grouped or full attention and tied head, so an engine builds
    the same operations per decode step from a checkpoint of a few megabytes."""
    import attrs

    gqa = spec.num_kv_heads != spec.num_heads
    return attrs.evolve(spec, name=f"{spec.name}:graph", vocab_size=256, hidden_size=64, num_heads=4,
                        num_kv_heads=2 if gqa else 4, head_dim=16, intermediate_size=32,
                        shared_expert_intermediate_size=32 if spec.shared_expert_intermediate_size else 0,
                        max_position_embeddings=256)


def graph_ops(plugins: Any, spec: "ModelSpec", backend: str = "llamacpp", prompt_tokens: int = 8) -> dict[str, Any]:
    """The operations one decode step of `spec` executes on `backend` (`Session.decode_ops`
    on `proxy_spec(spec)`: the engine's own graph, not a formula), cached per engine version.
    {"available": False, "reason": ...} where the engine is not here or cannot count."""
    import json

    from .backend import LoadSettings
    from .cache import Cache
    from .checkpoint import synthetic_checkpoint
    from .point import token_ids

    cls = plugins.backends.get(backend)
    av = cls().availability()
    if not av.available:
        return {"available": False, "reason": f"{backend} is not available here: {av.reason}"}
    proxy = proxy_spec(spec)
    cache = Cache()
    path = cache.root / "graph-ops" / f"{cls.name}-{av.version}-{proxy.fingerprint}.json"
    if path.is_file():
        return json.loads(path.read_text())
    engine = cls()
    artifact = engine.prepare(synthetic_checkpoint(proxy, cache), engine.capabilities.default_precision, cache)
    session = engine.load(artifact, LoadSettings(threads=1, max_context=64))
    try:
        ops = session.decode_ops(token_ids(proxy.vocab_size, prompt_tokens, 0))
    finally:
        session.close()
    out = ({"available": False, "reason": f"{backend} does not count its operations"} if ops is None else
           {"available": True, "backend": cls.name, "version": av.version, **ops})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def dispatch_probe(plugins: Any, backend: str, spec: "ModelSpec", *, layers: tuple[int, int] = (2, 8),
                   steps: int = 48, reps: int = 7) -> dict[str, Any]:
    """The cost per operation of `backend`'s decode steps on this machine where bytes do not
    matter: `proxy_spec(spec)` graphs (a few kilobytes of weights a layer) with `layers[0]`
    and `layers[1]` layers, their decode steps timed alternately (`reps` pairs of `steps`
    steps each), their operations counted: per pair (t1 - t0) / (ops1 - ops0), so what every
    step pays once (the engine's call, the logits) cancels. Median and range over pairs."""
    import time

    import attrs

    from .backend import LoadSettings
    from .cache import Cache
    from .checkpoint import synthetic_checkpoint
    from .point import token_ids

    cls = plugins.backends.get(backend)
    av = cls().availability()
    if not av.available:
        return {"available": False, "backend": backend, "reason": f"not available here: {av.reason}"}
    cache, sessions, ops = Cache(), [], []
    prompt = token_ids(256, 8, 0)
    try:
        for n in layers:
            proxy = attrs.evolve(proxy_spec(spec), num_layers=n, name=f"{spec.name}:graph-{n}")
            engine = cls()
            artifact = engine.prepare(synthetic_checkpoint(proxy, cache), engine.capabilities.default_precision, cache)
            session = engine.load(artifact, LoadSettings(max_context=steps + len(prompt) + 8))
            sessions.append(session)
            counted = session.decode_ops(prompt)
            if counted is None:
                return {"available": False, "backend": cls.name, "reason": "the engine does not count its operations"}
            ops.append(counted["ops"])

        def step_s(session: Any) -> float:
            session.reset()
            session.prefill(prompt)
            session.synchronize()
            t0 = time.perf_counter()
            for i in range(steps):
                session.decode(prompt[i % len(prompt)])
            session.synchronize()
            return (time.perf_counter() - t0) / steps

        for s in sessions:
            step_s(s)  # warm-up
        pairs = [(step_s(sessions[0]), step_s(sessions[1])) for _ in range(reps)]
    finally:
        for s in sessions:
            s.close()
    added = ops[1] - ops[0]
    slopes = sorted((b - a) / added * 1e6 for a, b in pairs)
    return {"available": True, "backend": cls.name, "version": av.version, "spec": spec.name, "layers": list(layers),
            "ops": ops, "step_us": [float(np.median([p[i] for p in pairs])) * 1e6 for i in (0, 1)],
            "us_per_op": float(np.median(slopes)), "us_per_op_range": [slopes[0], slopes[-1]], "pairs": reps,
            "unit": counted["unit"],
            "method": f"decode steps of {spec.name}'s graph at small widths with {layers[0]} and {layers[1]} layers, "
                      f"alternated: (t{layers[1]} - t{layers[0]}) / (ops{layers[1]} - ops{layers[0]})"}
