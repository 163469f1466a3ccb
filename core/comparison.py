"""What is compared: one module for the scheduler and the verdicts alike.

A *comparison* is the set of points that measure one workload on one backend and hardware
(prompt and generation lengths, threads, batch size, options, seed, router skew, routing,
memory cap, device, checkpoint dtype) at one *paired precision*: the MoE, its dense twins (active, total and
iso-memory; the iso-memory twin runs at a harder precision but is compared at the MoE's)
and the named dense baselines. Its *pairs* are the verdicts it yields: the MoE against each
twin of its own group and against every baseline.

`point_key` (for points, before anything runs) and `record_key` (for result records, old
files included) give the same key for the same workload, so `run_rounds` chases exactly the
ratios `analysis.verdicts` prints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import attrs

if TYPE_CHECKING:  # pragma: no cover
    from .point import Point

# role of the other side -> the verdict's short name (decode_vs_active, ...)
TWIN_KINDS = {"dense-active": "active", "dense-total": "total", "dense-isomem": "isomem", "dense-fit": "fit",
              "split": "split", "fixed-route": "fixed"}
# what the sides of a comparison share, besides backend, hardware and paired precision
SHARED_FIELDS = ("prompt_tokens", "new_tokens", "threads", "batch_size", "seed", "router_skew", "device",
                 "compile", "checkpoint_dtype", "routing", "memory_cap")
_DEFAULTS = {"threads": None, "batch_size": 1, "seed": 0, "router_skew": 0.0, "device": None, "compile": False,
             "checkpoint_dtype": "float32", "routing": "random", "memory_cap": None}


def isomem_moe_precision(model: str) -> str | None:
    """The MoE precision an iso-memory twin (``NAME:dense-isomem-P-Q``) is compared at: P."""
    _, sep, tail = model.partition(":dense-isomem-")
    return tail.split("-")[0] if sep and "-" in tail else None


def _key(fields: dict[str, Any], hardware: Any, backend: Any, precision: Any) -> tuple:
    options = fields.get("options") or {}
    return (hardware, backend, precision, *(fields.get(k, _DEFAULTS.get(k)) for k in SHARED_FIELDS),
            " ".join(f"{k}={options[k]}" for k in sorted(options)))


def point_key(point: "Point", default_precision: Callable[[str], str] | None = None) -> tuple:
    """The comparison a point belongs to. `default_precision(backend)` resolves a point
    without a precision (the backend's default), so that it meets its iso-memory twin."""
    precision = isomem_moe_precision(point.model) if point.role == "dense-isomem" else point.precision
    if precision is None and default_precision is not None:
        precision = default_precision(point.backend)
    return _key(point.to_dict(), point.hardware, point.backend, precision)


def record_key(record: dict[str, Any]) -> tuple:
    """The comparison a result record belongs to (records carry their resolved precision)."""
    p = record.get("point") or {}
    precision = record.get("precision")
    if record.get("role") == "dense-isomem":
        precision = isomem_moe_precision(p.get("model") or record.get("model_name") or "") or precision
    return _key(p, record.get("hardware") or p.get("hardware"), record.get("backend"), precision)


def pair_kind(moe_group: str, role: str, group: str) -> str | None:
    """What an MoE side and another side of its comparison compare as: a twin of the same
    group (active, total, isomem), a named baseline, or nothing (None)."""
    if role in TWIN_KINDS and group == moe_group:
        return TWIN_KINDS[role]
    return "baseline" if role == "baseline" else None


@attrs.frozen
class Pair:
    moe: str  # the MoE side's point key
    other: str
    kind: str  # active, total, isomem or baseline


@attrs.frozen
class Comparison:
    """The sides measured together and the verdicts they yield."""

    key: tuple
    sides: tuple["Point", ...]
    pairs: tuple[Pair, ...]

    @property
    def paired_keys(self) -> set[str]:
        return {k for pair in self.pairs for k in (pair.moe, pair.other)}


def comparisons(points: Sequence["Point"],
                default_precision: Callable[[str], str] | None = None) -> list[Comparison]:
    """Points grouped into comparisons, in first-seen order, with their pairs."""
    groups: dict[tuple, list["Point"]] = {}
    for p in points:
        groups.setdefault(point_key(p, default_precision), []).append(p)
    return [Comparison(key=key, sides=tuple(sides), pairs=pairs_of(sides)) for key, sides in groups.items()]


def pairs_of(sides: Sequence["Point"]) -> tuple[Pair, ...]:
    """The verdicts a set of sides of one comparison yields."""
    return tuple(Pair(moe.key, p.key, kind) for moe in sides if moe.role == "moe" for p in sides
                 if p is not moe and (kind := pair_kind(moe.group, p.role, p.group)))
