"""What a point's timings mean: the model's record, bandwidth and MBU, S-MFU, routing
balance and the experts a decode step touches. Pure functions of the timings, the spec and
the environment record (`observed_routing` runs untimed passes on the session)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .cache import Cache
from .point import Point, batch_token_ids
from .routing import STREAMS, Routing, distinct_per_step, plan_for
from .routing import Model as RoutingModel
from .routing import measure as measure_routing
from .precision import get_precision
from .spec import ModelSpec


def model_record(spec: ModelSpec, precision: str) -> dict[str, Any]:
    return {
        "spec": spec.to_dict(),
        "is_moe": spec.is_moe,
        "total_params": spec.total_params,
        "active_params": spec.active_params,
        "weight_bytes_per_token": spec.weight_bytes_per_token(precision),
        "flops_per_token": spec.flops_per_token(),
    }



def bandwidth_now(result: dict[str, Any], cache: Cache, probe: bool = True) -> dict[str, Any]:
    """The environment MBU divides by: the study's probe, raised to the machine's read bandwidth
    measured right after this point's timed phase when that is higher (a shared machine's
    bandwidth moves over minutes; the ceiling must hold for this point). Recorded as
    `bandwidth_after_timed`; a fixed figure (MOERUN_BANDWIDTH_GBPS) is left alone, and so is
    the study's figure where `probe` is off (a capped point: its buffers would be charged to
    the cap)."""
    env = result["env"]
    if not env.get("bandwidth_bytes_s") or not env.get("bandwidth_kernel") or not probe:
        return env
    from .environment import quick_probe

    now = quick_probe(cache.root)
    result["bandwidth_after_timed"] = {"bytes_s": now["bandwidth_bytes_s"], "kernel": now["kernel"]}
    return {**env, "bandwidth_bytes_s": max(env["bandwidth_bytes_s"], now["bandwidth_bytes_s"]),
            "bandwidth_now_bytes_s": now["bandwidth_bytes_s"]}


def derive_metrics(spec: ModelSpec, precision: str, point: Point, timings: dict[str, Any],
                   env: dict[str, Any], session: Any, coverage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bandwidth and MBU: bytes actually read per decode step x steps/s. A step of B
    sequences reads the dense weights once, per layer the union of the experts the
    sequences chose (measured where the engine exposes routing, else the uniform-routing
    expectation) and B sequences' KV cache; per decoded token that is a B-th of it."""
    m: dict[str, Any] = {
        "prefill_tok_s": timings["prefill_tok_s"]["median"],
        "weight_bytes_per_token": spec.weight_bytes_per_token(precision),
    }
    peak = env.get("peak_flops")
    if peak:  # MoE-CAP's S-MFU: FLOPs of the active parameters only
        m["s_mfu_prefill"] = m["prefill_tok_s"] * spec.flops_per_token(point.prompt_tokens // 2) / peak
    if "decode_tok_s" not in timings:
        return m
    tok_s = timings["decode_tok_s"]["median"]
    B = point.batch_size
    mean_context = point.prompt_tokens + (point.new_tokens - 1) / 2
    kv = spec.kv_bytes_per_token(mean_context, getattr(session, "kv_bytes_per_value", 2.0))
    touched = coverage["experts_per_step_mean"] if coverage else None
    step_weights = spec.weight_bytes_per_step(precision, B, touched)
    bytes_per_token = step_weights / B + kv
    m.update(
        decode_tok_s=tok_s,
        kv_bytes_per_token=kv,
        bytes_per_token=bytes_per_token,
        achieved_bandwidth_bytes_s=bytes_per_token * tok_s,
        decode_flops_s=spec.flops_per_token(int(mean_context)) * tok_s,
    )
    if B > 1:
        m.update(batch_size=B, decode_seq_tok_s=timings["decode_seq_tok_s"]["median"],
                 weight_bytes_per_step=step_weights,
                 experts_touched_per_step=touched if touched is not None else spec.experts_touched(B),
                 experts_touched_source="measured" if touched is not None else "uniform-routing expectation")
    bw = env.get("bandwidth_bytes_s")
    if bw:
        # S-MBU (MoE-CAP): bytes the token actually reads (active experts, their union over a
        # batch); 'mbu_dense' counts every weight as a dense model would, which overstates an
        # MoE's bandwidth use
        m["mbu"] = bytes_per_token * tok_s / bw
        m["mbu_reference_bytes_s"] = bw
        if m["mbu"] > 1.0:  # the probe is no ceiling for this engine: say so, never print MBU > 100 %
            m["mbu_exceeds_probe"] = True
        dense_bytes = spec.total_params * get_precision(precision).bits_per_weight / 8 / B + kv
        m["mbu_dense"] = dense_bytes * tok_s / bw
    if env.get("bandwidth_now_bytes_s"):
        # against the bandwidth of the same minutes alone: the ceiling above is the highest
        # figure the machine showed within the probe's lifetime, and a shared machine's moves
        # 2x within the hour (measured here: 42-48 GB/s, 86, then 39-43)
        m["mbu_now"] = bytes_per_token * tok_s / env["bandwidth_now_bytes_s"]
    if peak:
        m["s_mfu"] = m["decode_flops_s"] / peak
    return m


def routing_stats(counts: np.ndarray) -> dict[str, Any]:
    """Load imbalance over experts: max/mean tokens per expert, averaged over layers."""
    if counts.ndim != 2 or counts.sum() == 0:
        return {}
    per_layer = counts.max(axis=1) / np.maximum(counts.mean(axis=1), 1e-12)
    share = counts.sum(axis=0) / counts.sum()
    return {"load_imbalance": float(per_layer.mean()), "expert_share": share.tolist()}



def observed_routing(session: Any, spec: ModelSpec, point: Point, prompts: list[list[int]],
                     follows: list[list[int]]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """What the engine chose, from `Session.observe_routing` in untimed passes after the timed
    repetitions: (the routing record, the coverage of this point's batch). The coverage is the
    distinct experts per decode step and layer, the union over the batch's sequences, beside
    the requested routing's expectation and uniform routing's E·(1 − (1 − k/E)^B). In a
    point's first round (`point.observe_routing`) the record covers at least `STREAMS`
    sequences of the same workload: histogram, its distance from the requested routing,
    reuse, the union at batch 1, 2, 4 and 8, and, for a planted routing, the share of token
    layers that chose exactly the planted experts. (None, None) for dense models and engines
    that do not expose routing."""
    if not spec.is_moe or not follows[0]:
        return None, None
    B, P = len(prompts), len(prompts[0])
    n = max(B, STREAMS) if point.observe_routing else B
    seqs = [p + f for p, f in zip(prompts, follows)]
    if n > B:
        seqs += batch_token_ids(spec.vocab_size, len(seqs[0]), point.seed, n, point.routing)[B:]
    first = session.observe_routing(seqs[0][:P], seqs[0][P:])
    if first is None:
        return None, None
    observed = [first] + [session.observe_routing(q[:P], q[P:]) for q in seqs[1:]]
    routing = Routing.parse(point.routing)
    model = RoutingModel.of(routing, spec.num_layers, spec.num_experts, spec.top_k, point.seed)
    touched = distinct_per_step([np.asarray(o)[P:] for o in observed[:B]])  # [steps, layers]
    coverage = {"batch_size": B, "experts_per_step_mean": float(touched.mean()),
                "experts_per_step_min": int(touched.min()), "experts_per_step_max": int(touched.max()),
                "per_layer_mean": touched.mean(axis=0).tolist(), "steps": len(touched),
                "expected": model.expected_union(B), "uniform_expectation": spec.experts_touched(B),
                "num_experts": spec.num_experts, "top_k": spec.top_k, "routing": routing.label,
                "source": "the engine's expert choices (untimed pass)"}
    if not point.observe_routing:
        return None, coverage
    record = measure_routing(observed, model, source="the engine's expert choices (untimed pass)", decode_from=P)
    record["sequences"] = len(observed)
    if routing.planted:
        plan = plan_for(spec, routing, point.seed)
        same = [(np.sort(np.asarray(o), -1) == np.sort(plan.table[q], -1)).all(-1) for o, q in zip(observed, seqs)]
        record["planted_match"] = float(np.mean(np.concatenate([m.reshape(-1) for m in same])))
        record["plan"] = plan.describe()
    return record, coverage
