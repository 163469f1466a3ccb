"""Typed results for readers: what reporters, verdicts, `compare`, `report` and `predict
--calibrate` read. A results file holds one JSON line per point and round (written by
moerun.results, the schema in docs/architecture.md); `load_results` reads one or more files,
old ones included, folds each point's rounds (moerun.protocol.collapse) and gives one
`PointResult` per point.

A `PointResult` names the fields every reader uses and gives every section as a dict, never
None (an old record without a section reads as empty), so a reader writes `r.metrics.get(k)`
and never `(r.get("metrics") or {}).get(k)`. `record` keeps the whole folded record as
written, for the JSON reporter and for fields a reader needs that are not named here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import attrs

from .errors import ConfigError
from .protocol import collapse
from .results import read_results, section

SECTIONS = ("point", "model", "metrics", "timings", "memory", "env", "fits", "parity", "breakdown", "artifact",
            "spread", "node", "protocol", "session", "contention", "lockstep", "routing", "cap", "paging", "ops")


@attrs.frozen(kw_only=True)
class PointResult:
    """One point of a study, its rounds folded: medians over its ok rounds in `metrics` and
    `memory`, a summary of every round in `rounds`, each speed's interval over rounds in
    `spread`."""

    key: str
    status: str
    model_name: str = ""
    backend: str = ""
    precision: str | None = None
    role: str = ""
    group: str = ""
    hardware: str | None = None  # the fleet label of the machine that measured it
    error: str | None = None
    contended: bool = False  # some ok round was measured under contention
    rounds: list[dict[str, Any]] = attrs.field(factory=list)
    point: dict[str, Any] = attrs.field(factory=dict)
    model: dict[str, Any] = attrs.field(factory=dict)  # spec, parameter counts, bytes and FLOPs per token
    metrics: dict[str, Any] = attrs.field(factory=dict)
    timings: dict[str, Any] = attrs.field(factory=dict)
    memory: dict[str, Any] = attrs.field(factory=dict)
    env: dict[str, Any] = attrs.field(factory=dict)
    fits: dict[str, Any] = attrs.field(factory=dict)
    parity: dict[str, Any] = attrs.field(factory=dict)
    breakdown: dict[str, Any] = attrs.field(factory=dict)
    artifact: dict[str, Any] = attrs.field(factory=dict)
    spread: dict[str, Any] = attrs.field(factory=dict)
    node: dict[str, Any] = attrs.field(factory=dict)
    protocol: dict[str, Any] = attrs.field(factory=dict)
    session: dict[str, Any] = attrs.field(factory=dict)
    contention: dict[str, Any] = attrs.field(factory=dict)
    lockstep: dict[str, Any] = attrs.field(factory=dict)
    routing: dict[str, Any] = attrs.field(factory=dict)  # the engine's expert choices, measured (first round)
    cap: dict[str, Any] = attrs.field(factory=dict)  # its memory cgroup's figures (moerun.memcap)
    paging: dict[str, Any] = attrs.field(factory=dict)  # what paging cost under the cap (moerun.runner)
    ops: dict[str, Any] = attrs.field(factory=dict)  # operations per decode step (count_ops, first round)
    record: dict[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @classmethod
    def of(cls, record: dict[str, Any]) -> "PointResult":
        """From one folded record (`collapse`'s), of this version or an older one."""
        point = section(record.get("point"))
        return cls(
            key=str(record.get("key") or ""), status=str(record.get("status") or "failed"),
            model_name=str(record.get("model_name") or point.get("model") or ""),
            backend=str(record.get("backend") or point.get("backend") or ""),
            precision=record.get("precision", point.get("precision")), role=str(record.get("role") or ""),
            group=str(record.get("group") or ""), hardware=record.get("hardware") or point.get("hardware"),
            error=record.get("error"), contended=bool(record.get("contended")),
            rounds=list(record.get("rounds") or []), record=record,
            **{name: section(record.get(name)) for name in SECTIONS},
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def batch_size(self) -> int:
        return int(self.point.get("batch_size") or 1)

    @property
    def routing_name(self) -> str:
        """The requested routing ('random' for records from before routing models)."""
        return str(self.point.get("routing") or "random")

    @property
    def memory_cap(self) -> int | None:
        """The memory cap in bytes (None: uncapped, and records from before caps)."""
        cap = self.point.get("memory_cap")
        return int(cap) if cap else None

    @property
    def options(self) -> dict[str, Any]:
        return section(self.point.get("options"))

    @property
    def options_text(self) -> str:
        """The backend options as 'k=v k=v' (sorted), '' when none."""
        return " ".join(f"{k}={self.options[k]}" for k in sorted(self.options))

    @property
    def is_moe(self) -> bool:
        return bool(self.model.get("is_moe")) or self.role == "moe"


def point_results(records: Iterable[dict[str, Any]]) -> list[PointResult]:
    """Per-round records (or records already folded) -> one PointResult per point."""
    return [PointResult.of(r) for r in collapse(records)]


def load_results(paths: Iterable[str | os.PathLike]) -> list[PointResult]:
    """The points of one or more results files, each file's rounds folded; a file that is
    missing or holds no complete record is a one-line ConfigError."""
    out: list[PointResult] = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"no results file {path}")
        out += point_results(read_results(path))
    if not out:
        raise ConfigError("the results files hold no complete record")
    return out
