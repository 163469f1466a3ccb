"""Roofline predictions: what a model should do on a device, from its spec and the device's
published bandwidth, compute and memory, scaled by the efficiency measured here.

Decode is bandwidth-bound: tokens/s = efficiency x bandwidth / bytes read per token. With a
batch of B sequences a step reads the dense weights once and, per MoE layer, the union of
the experts the sequences chose (the routing model's expectation, moerun.routing; uniform
routing: E·(1 − (1 − k/E)^B)), plus B KV caches; a
step also costs B tokens' FLOPs, so large batches turn compute-bound (the slower bound wins).
Prefill is compute-bound: tokens/s = efficiency x peak FLOP/s / FLOPs per token.
A model whose weights and KV cache do not fit in the device's memory is flagged, not
predicted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import attrs

from .errors import ConfigError
from .precision import get_precision, nominal
from .spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from .point import Point
    from .records import PointResult


@attrs.frozen(kw_only=True)
class Hardware:
    name: str
    description: str
    bandwidth_bytes_s: float
    peak_flops: float  # dense, at the precision class the device runs LLMs at (see source)
    memory_bytes: float
    source: str
    # what the OS and its services keep out of an LLM's reach (estimates; docs/cli.md lists them)
    os_reserve_bytes: float = 0.0

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes - self.os_reserve_bytes


GB = 1e9
HARDWARE: dict[str, Hardware] = {h.name: h for h in [
    Hardware(name="jetson-orin-nano-8gb", description="NVIDIA Jetson Orin Nano 8GB (the published study's edge device)",
             bandwidth_bytes_s=68 * GB, peak_flops=10e12, memory_bytes=8 * GB,
             source="NVIDIA: 68 GB/s LPDDR5, 8 GB; 40 INT8 TOPS sparse -> ~10 TFLOPS dense FP16",
             os_reserve_bytes=1.5 * GB),
    Hardware(name="jetson-agx-orin-64gb", description="NVIDIA Jetson AGX Orin 64GB",
             bandwidth_bytes_s=204.8 * GB, peak_flops=68e12, memory_bytes=64 * GB,
             source="NVIDIA: 204.8 GB/s LPDDR5, 64 GB; 275 INT8 TOPS sparse -> ~68 TFLOPS dense FP16",
             os_reserve_bytes=2 * GB),
    Hardware(name="apple-m2-pro-16gb", description="Apple M2 Pro, 16 GB (the published study's laptop)",
             bandwidth_bytes_s=200 * GB, peak_flops=6.8e12, memory_bytes=16 * GB,
             source="Apple: 200 GB/s unified memory; 19-core GPU ~6.8 TFLOPS FP32",
             os_reserve_bytes=4 * GB),
    Hardware(name="raspberry-pi-5-8gb", description="Raspberry Pi 5, 8 GB",
             bandwidth_bytes_s=17 * GB, peak_flops=0.15e12, memory_bytes=8 * GB,
             source="LPDDR4X-4267 on a 32-bit bus ~17 GB/s; 4x Cortex-A76 @ 2.4 GHz NEON ~150 GFLOPS FP32",
             os_reserve_bytes=0.5 * GB),
    Hardware(name="rtx-4090", description="NVIDIA GeForce RTX 4090",
             bandwidth_bytes_s=1008 * GB, peak_flops=165e12, memory_bytes=24 * GB,
             source="NVIDIA: 1008 GB/s GDDR6X, 24 GB; 165 TFLOPS FP16 tensor, dense",
             os_reserve_bytes=1 * GB),
    Hardware(name="h200", description="NVIDIA H200 SXM",
             bandwidth_bytes_s=4800 * GB, peak_flops=989e12, memory_bytes=141 * GB,
             source="NVIDIA: 4.8 TB/s HBM3e, 141 GB; 989 TFLOPS BF16 dense",
             os_reserve_bytes=1 * GB),
]}


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


def get_hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ConfigError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[name]


def this_machine(env: dict[str, Any]) -> Hardware:
    """The measuring machine as a profile: measured bandwidth and GEMM rate, its memory."""
    if not env.get("bandwidth_bytes_s") or not env.get("peak_flops"):
        raise ConfigError("this machine's profile needs a measured bandwidth and GEMM rate")
    return Hardware(name="this-machine", description=env.get("cpu_model", "this machine"),
                    bandwidth_bytes_s=env["bandwidth_bytes_s"], peak_flops=env["peak_flops"],
                    memory_bytes=float(env.get("memory_bytes") or 0), source="measured in this run")


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
            batch: int = 1, routing: str = "random") -> dict[str, Any]:
    """Predicted decode (aggregate over `batch` sequences) and prefill tokens/s of `spec` on
    `hw`, or why it does not fit. `routing` (moerun.routing) gives the experts a step of the
    batch touches; `random` and `uniform` the uniform expectation."""
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
