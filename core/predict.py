"""Roofline predictions: what a model should do on a device, from its spec and the device's
published bandwidth, compute and memory, scaled by the efficiency measured here.

Decode is bandwidth-bound: tokens/s = efficiency x bandwidth / bytes read per token. With a
batch of B sequences a step reads the dense weights once and, per MoE layer, the union of
the experts the sequences chose (the routing model's expectation, moerun.routing; uniform
routing: E·(1 − (1 − k/E)^B)), plus B KV caches; a
step also costs B tokens' FLOPs, so large batches turn compute-bound (the slower bound wins).
Prefill is compute-bound: tokens/s = efficiency x peak FLOP/s / FLOPs per token.
With the operations a decode step executes (`ops`: the engine's real graph, counted by
moerun.ladder.graph_ops) and a device's dispatch cost per operation (its profile's published
figure, or this machine's measured one), each decode step also pays ops x dispatch: the
roofline leaves out that an MoE layer runs several times the operations of a dense FFN.
A model whose weights and KV cache do not fit in the device's memory is flagged, not
predicted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import attrs

from .errors import ConfigError
from .precision import get_precision, nominal
from .profiles import GB, HARDWARE, Hardware, get_hardware
from .spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from .point import Point
    from .records import PointResult


def fits(peak_bytes: float) -> dict[str, bool]:
    """Whether a process whose memory peaked at `peak_bytes` fits each device profile's
    usable memory (its memory minus the OS share)."""
    return {h.name: peak_bytes <= h.usable_bytes for h in HARDWARE.values()}


def expected_need(spec: ModelSpec, precision: str, *, batch: int = 1, context: int = 512,
                  kv_bytes_per_value: float = 2.0) -> float:
    """What a point will hold before it runs: its weights at the precision's nominal bits
    and the KV cache of every sequence (the engine's own buffers come on top)."""
    weights = spec.total_params * get_precision(precision).bits_per_weight / 8
    return weights + batch * spec.kv_bytes_per_token(context, kv_bytes_per_value)


def fit_obstacle(spec: ModelSpec, precision: str, device: str, *, batch: int = 1, context: int = 512) -> str | None:
    """Why a point of `spec` at `precision` cannot fit `device` (its usable memory), or None."""
    hw = get_hardware(device)
    need = expected_need(spec, precision, batch=batch, context=context)
    if need <= hw.usable_bytes:
        return None
    return (f"would not fit {device}: its weights at {precision} and KV cache need {need / GB:.1f} GB, "
            f"{hw.usable_bytes / GB:.1f} of its {hw.memory_bytes / GB:.0f} GB are usable (--fit)")


def point_fit_obstacle(point: "Point", spec: ModelSpec, precision: str) -> str | None:
    """Why `point` (at `precision`) cannot fit its `--fit` device, or None (no device named,
    or it fits): its weights at nominal bits and every sequence's KV cache."""
    if not point.fit:
        return None
    return fit_obstacle(spec, nominal(precision), point.fit, batch=point.batch_size,
                        context=point.prompt_tokens + point.new_tokens)


def this_machine(env: dict[str, Any]) -> Hardware:
    """The measuring machine as a profile: measured bandwidth and GEMM rate, its memory."""
    if not env.get("bandwidth_bytes_s") or not env.get("peak_flops"):
        raise ConfigError("this machine's profile needs a measured bandwidth and GEMM rate")
    storage = env.get("storage") or {}
    return Hardware(name="this-machine", description=env.get("cpu_model", "this machine"),
                    bandwidth_bytes_s=env["bandwidth_bytes_s"], peak_flops=env["peak_flops"],
                    memory_bytes=float(env.get("memory_bytes") or 0), source="measured in this run",
                    storage_bytes_s=storage.get("paging_read_bytes_s"),
                    storage_source="measured: random reads of the readahead window (moerun.storage)" if storage else "")


def efficiency_from_results(results: Iterable["PointResult"], precision: str | None = None) -> dict[str, float]:
    """Median decode MBU and prefill FLOP utilisation of ok results (optionally one precision):
    how much of the roofline this machine's engines actually reached."""
    import statistics

    mbu, mfu = [], []
    for r in results:
        if not r.ok or (precision and r.precision != precision):
            continue
        m = r.metrics
        if m.get("mbu"):
            mbu.append(m["mbu"])
        if m.get("s_mfu_prefill"):
            mfu.append(m["s_mfu_prefill"])
    if not mbu:
        raise ConfigError("the calibration results hold no ok measurement with a bandwidth figure"
                          + (f" at precision {precision}" if precision else ""))
    return {"decode": statistics.median(mbu), "prefill": statistics.median(mfu) if mfu else 0.5,
            "n": len(mbu), "prefill_measured": bool(mfu)}


def predict(spec: ModelSpec, hw: Hardware, *, precision: str, context: int = 512,
            efficiency: dict[str, float] | None = None, kv_bytes_per_value: float = 2.0,
            batch: int = 1, routing: str = "random", memory_cap: float | None = None,
            ops: float | None = None) -> dict[str, Any]:
    """Predicted decode (aggregate over `batch` sequences) and prefill tokens/s of `spec` on
    `hw`, or why it does not fit. With `ops` (operations per decode step) and a device
    dispatch cost, a step also pays ops x dispatch (`with_dispatch`); `decode_tok_s` is then
    that, `roofline_decode_tok_s` the bytes-and-FLOPs bound alone. `routing` (moerun.routing) gives the experts a step of the
    batch touches; `random` and `uniform` the uniform expectation. Under a `memory_cap`
    (bytes) the weights that do not fit page from storage (`paged_reads`, `FIT_RESERVE` of
    the cap kept for the KV cache and buffers) at the device's storage rate."""
    if memory_cap:
        return with_dispatch(_predict_capped(spec, hw, precision=precision, context=context, efficiency=efficiency,
                                             kv_bytes_per_value=kv_bytes_per_value, batch=batch, routing=routing,
                                             cap=memory_cap), hw, ops)
    eff = efficiency or {"decode": 0.8, "prefill": 0.5}
    weights = spec.total_params * get_precision(precision).bits_per_weight / 8
    kv = spec.kv_bytes_per_token(context, kv_bytes_per_value)  # read per token = held at `context`
    need = expected_need(spec, precision, batch=batch, context=context, kv_bytes_per_value=kv_bytes_per_value)
    out: dict[str, Any] = {
        "model": spec.name, "hardware": hw.name, "precision": precision, "context": context, "batch_size": batch,
        "weights_bytes": weights, "memory_needed_bytes": need, "memory_bytes": hw.memory_bytes,
        "fits": need <= 0.9 * hw.memory_bytes if hw.memory_bytes else None,
        "efficiency": eff, "calibrated": efficiency is not None,
    }
    if out["fits"] is False:
        out["reason"] = (f"needs {need / 1e9:.1f} GB for weights and KV cache; {hw.name} has "
                         f"{hw.memory_bytes / 1e9:.0f} GB (90 % usable assumed)")
        return out
    touched = expected_touched(spec, batch, routing)
    per_step = spec.weight_bytes_per_step(precision, batch, touched) + batch * kv
    out["bytes_per_step"] = per_step
    out["bytes_per_token"] = per_step / batch
    out["experts_touched"] = touched
    out["routing"] = routing
    t_bytes = per_step / (eff["decode"] * hw.bandwidth_bytes_s)
    t_flops = batch * spec.flops_per_token(context) / (eff["prefill"] * hw.peak_flops)
    out["decode_tok_s"] = batch / max(t_bytes, t_flops)
    out["prefill_tok_s"] = eff["prefill"] * hw.peak_flops / spec.flops_per_token(context // 2)
    out["decode_bound"] = "bandwidth" if t_bytes >= t_flops else "compute"
    return with_dispatch(out, hw, ops)


def with_dispatch(out: dict[str, Any], hw: Hardware, ops: float | None) -> dict[str, Any]:
    """A decode prediction with the dispatch term: each step's time (the roofline's) plus
    `ops` x the device's dispatch cost, with the low and high ends of its published range.
    Unchanged (`dispatch` says why) without a count or a device figure."""
    out["roofline_decode_tok_s"] = out.get("decode_tok_s")
    if not out.get("decode_tok_s"):
        return out
    if not ops or not hw.dispatch_s:
        out["dispatch"] = {"applied": False, "reason": "no operation count" if not ops else
                           f"{hw.name} has no dispatch figure"}
        return out
    batch = out["batch_size"]
    step = batch / out["decode_tok_s"]

    def rate(per_op: float) -> float:
        return batch / (step + ops * per_op)

    lo, hi = hw.dispatch_range_s or (hw.dispatch_s, hw.dispatch_s)
    out["dispatch"] = {"applied": True, "ops_per_step": ops, "s_per_op": hw.dispatch_s,
                       "s_per_step": ops * hw.dispatch_s, "share": ops * hw.dispatch_s / (step + ops * hw.dispatch_s),
                       "range_s_per_op": [lo, hi], "source": hw.dispatch_source}
    out["decode_tok_s"] = rate(hw.dispatch_s)
    out["decode_tok_s_range"] = [rate(hi), rate(lo)]
    return out


def _predict_capped(spec: ModelSpec, hw: Hardware, *, precision: str, context: int, efficiency: dict[str, float] | None,
                    kv_bytes_per_value: float, batch: int, routing: str, cap: float) -> dict[str, Any]:
    """`predict` under a memory cap: resident reads at memory speed, missed bytes at the
    device's storage speed, one after the other (a fault stalls the step)."""
    from .spec import FIT_RESERVE

    out = predict(spec, attrs.evolve(hw, memory_bytes=0.0), precision=precision, context=context,
                  efficiency=efficiency, kv_bytes_per_value=kv_bytes_per_value, batch=batch, routing=routing)
    out.update(memory_cap=cap, fits=out["memory_needed_bytes"] <= cap, memory_bytes=hw.memory_bytes)
    if not hw.storage_bytes_s:
        out.update(decode_tok_s=None, prefill_tok_s=None,
                   reason=f"{hw.name} has no storage figure: nothing pages from it (an accelerator profile)")
        return out
    room = cap * (1 - FIT_RESERVE)
    paged = paged_reads(spec, precision, room_bytes=room, routing=routing, batch=batch)
    eff = out["efficiency"]
    miss = paged["read_bytes_per_step"]
    t_mem = (out["bytes_per_step"] - miss) / (eff["decode"] * hw.bandwidth_bytes_s)
    t_storage = miss / hw.storage_bytes_s
    t_flops = batch * spec.flops_per_token(context) / (eff["prefill"] * hw.peak_flops)
    out["paging"] = {**paged, "storage_bytes_s": hw.storage_bytes_s, "storage_source": hw.storage_source,
                     "storage_share": t_storage / (t_mem + t_storage) if t_mem + t_storage else 0.0}
    out["decode_tok_s"] = batch / max(t_mem + t_storage, t_flops)
    if t_storage > 0:
        out["decode_bound"] = "storage" if t_storage >= t_mem else out["decode_bound"]
    prompt = max(1, context // 2)  # a prompt's union of experts misses once per prefill
    prefill_miss = paged_reads(spec, precision, room_bytes=room, routing=routing, batch=prompt)["read_bytes_per_step"]
    t_prefill = prompt / out["prefill_tok_s"] + prefill_miss / hw.storage_bytes_s
    out["prefill_tok_s"] = prompt / t_prefill
    return out


def paged_reads(spec: ModelSpec, precision: str, *, file_bytes: float | None = None, room_bytes: float,
                routing: str = "random", batch: int = 1) -> dict[str, Any]:
    """Storage bytes per decoded token when the page cache may hold `room_bytes` of the
    weights (a memory cap less what cannot page), for weights in a file of `file_bytes`
    (default: the nominal bytes at `precision`; a real file scales every figure).

    The model (docs/concepts.md, "Memory caps"): the weights every step reads (attention,
    norms, router, shared experts, output head) are the hottest pages and stay resident if
    they fit; the rest of the room holds experts, the most popular first, so that a routed
    expert misses with the routing's miss rate (`moerun.routing.Model.miss_rate`: uniform
    for random routing). Where the always-read weights alone outgrow the room, a step's
    reads cycle through more than the cache holds and, least-recently-used, every page
    misses (the dense model over its cap: all its weights from storage, every token).
    Readahead can read more than this (whole windows around each fault): the measured bytes
    over these are the read amplification a record reports."""
    bits = get_precision(precision).bits_per_weight
    scale = file_bytes / (spec.total_params * bits / 8) if file_bytes else 1.0
    touched = expected_touched(spec, batch, routing) or 0.0
    step = spec.weight_bytes_per_step(precision, batch, touched) * scale
    out: dict[str, Any] = {"room_bytes": room_bytes, "step_bytes": step, "routing": routing, "batch_size": batch}
    if spec.is_moe:
        expert = spec.expert_params * bits / 8 * scale
        always = step - spec.num_layers * touched * expert
    else:
        expert, always = 0.0, step
    if always > room_bytes:
        out.update(regime="thrashing", miss_rate=1.0, read_bytes_per_step=step)
    elif not spec.is_moe:
        out.update(regime="resident", miss_rate=0.0, read_bytes_per_step=0.0)
    else:
        from .routing import Model, Routing

        r = Routing.parse(routing)
        held = int((room_bytes - always) // (spec.num_layers * expert))
        if r.planted:
            miss = Model.of(r, spec.num_layers, spec.num_experts, spec.top_k).miss_rate(held) or 0.0
        else:  # uniform popularity: the held experts catch held / E of the routed reads
            miss = max(0.0, 1.0 - min(held, spec.num_experts) / spec.num_experts)
        out.update(regime="experts paged" if miss > 0 else "resident", miss_rate=miss, experts_held=min(held, spec.num_experts),
                   read_bytes_per_step=miss * spec.num_layers * touched * expert)
    out["read_bytes_per_token"] = out["read_bytes_per_step"] / batch
    return out


def expected_touched(spec: ModelSpec, batch: int, routing: str = "random") -> float | None:
    """Distinct experts per MoE layer one step of `batch` sequences reads under `routing`."""
    if not spec.is_moe:
        return None
    from .routing import Model, Routing

    r = Routing.parse(routing)
    if not r.planted:
        return spec.experts_touched(batch)
    return Model.of(r, spec.num_layers, spec.num_experts, spec.top_k).expected_union(batch)


def crossover(spec: ModelSpec, hw: Hardware, *, precision: str, context: int = 512,
              efficiency: dict[str, float] | None = None, advantage: float = 1.1,
              limit: int = 256, routing: str = "random") -> dict[str, Any]:
    """The smallest batch at which the MoE's predicted decode is no longer `advantage` times
    its total-matched twin's (the union of the experts its sequences chose has eaten its
    bandwidth advantage), with the ratio there; None past `limit` (or when the twin does not
    fit). Beyond the crossover a compute-bound device can widen the gap again: the MoE does a
    fraction of the twin's FLOPs."""
    twin = spec.dense_twin("total")
    closest: tuple[float, int] | None = None
    why = f"not reached by batch {limit}"
    for b in range(1, limit + 1):
        m, t = (predict(x, hw, precision=precision, context=context, efficiency=efficiency, batch=b,
                        routing=routing if x is spec else "random") for x in (spec, twin))
        if not m.get("decode_tok_s") or not t.get("decode_tok_s"):
            why = f"not reached before batch {b} outgrows {hw.memory_bytes / 1e9:.0f} GB"
            break
        ratio = m["decode_tok_s"] / t["decode_tok_s"]
        if closest is None or ratio < closest[0]:
            closest = (ratio, b)
        if ratio < advantage:
            return {"batch": b, "ratio": ratio, "advantage": advantage}
    return {"batch": None, "why": why, "advantage": advantage,
            "closest_ratio": closest[0] if closest else None, "closest_batch": closest[1] if closest else None}


def cap_sweep(spec: ModelSpec, hw: Hardware, *, precision: str, caps: Iterable[float], context: int = 512,
              efficiency: dict[str, float] | None = None, routing: str = "random") -> list[dict[str, Any]]:
    """At each memory cap: the MoE's predicted decode (paging what does not fit) against its
    iso-cap dense twin's (the largest dense model of the family that fits the cap: no
    paging), with their ratio; a cap where no dense twin fits has none."""
    rows = []
    for cap in caps:
        moe = predict(spec, hw, precision=precision, context=context, efficiency=efficiency, routing=routing,
                      memory_cap=cap)
        row: dict[str, Any] = {"memory_cap": cap, "moe_decode_tok_s": moe.get("decode_tok_s"),
                               "moe_regime": (moe.get("paging") or {}).get("regime")}
        try:
            twin = spec.fit_twin(int(cap), precision)
        except ConfigError:
            twin = None
        if twin is not None:
            dense = predict(twin, hw, precision=precision, context=context, efficiency=efficiency, memory_cap=cap)
            row.update(fit_twin=twin.name, fit_twin_params=twin.total_params, fit_decode_tok_s=dense.get("decode_tok_s"))
            if row["moe_decode_tok_s"] and row["fit_decode_tok_s"]:
                row["ratio"] = row["moe_decode_tok_s"] / row["fit_decode_tok_s"]
        rows.append(row)
    return rows


def cap_crossover(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where, between neighbouring caps of a sweep (any order), the MoE/iso-cap-twin decode
    ratio crosses 1, interpolated in log(cap) and log(ratio); which side wins above it. None
    where it never crosses."""
    import math

    pts = sorted((r["memory_cap"], r["ratio"]) for r in rows if r.get("ratio"))
    for (c0, r0), (c1, r1) in zip(pts, pts[1:]):
        if (r0 - 1) * (r1 - 1) < 0:
            f = math.log(r0) / (math.log(r0) - math.log(r1))
            cap = math.exp(math.log(c0) + f * (math.log(c1) - math.log(c0)))
            return {"memory_cap": cap, "between": [c0, c1],
                    "moe_wins": "above" if r1 > 1 else "below"}
    return None
