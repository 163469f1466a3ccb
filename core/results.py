"""Results: one JSON object per measurement, appended atomically to a JSONL file."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .point import Point

SCHEMA_VERSION = 1
FINISHED = ("ok", "failed", "unsupported", "unavailable")  # statuses of a round that needs no re-run


def _default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(result: dict[str, Any]) -> str:
    return json.dumps(result, default=_default, sort_keys=True, allow_nan=False)


def append_result(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """Append one result as a single line with one O_APPEND write, then fsync.

    If an earlier writer was killed mid-line (the file does not end in a newline), the
    new record starts on a fresh line so that only the torn line is lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (dumps(result) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = b"\n" + line
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete record of a JSONL results file; a torn line is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                out.append(json.loads(raw))
            except ValueError:
                warnings.warn(f"{path}:{lineno}: skipping an incomplete record (interrupted write)", stacklevel=2)
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def base_result(point: "Point", env: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "key": point.key,
        "point": point.to_dict(),
        "backend": point.backend,
        "model_name": point.model,
        "role": point.role,
        "group": point.group,
        "precision": point.precision,
        "hardware": point.hardware,
        "status": "failed",
        "error": None,
        "env": env or {},
        "started_at": now(),
    }


def section(value: Any) -> dict[str, Any]:
    """A record's section as a dict: an older record may lack it, or hold None."""
    return value if isinstance(value, dict) else {}


@attrs.frozen(kw_only=True)
class Measurement:
    """One line of a results file, typed for its readers: a point measured in one round (the
    schema is in docs/architecture.md, "Result record"). Every section is a dict, empty where
    an older line lacks it; `record` is the line as written. moerun.protocol folds a point's
    measurements into one `moerun.records.PointResult`."""

    key: str
    status: str
    round: int = 0
    error: str | None = None
    resumed: bool = False
    retry: bool = False  # the fleet could not measure the point: a resumed study measures it again
    wall_s: float | None = None
    started_at: str | None = None
    metrics: dict[str, Any] = attrs.field(factory=dict)
    memory: dict[str, Any] = attrs.field(factory=dict)
    timings: dict[str, Any] = attrs.field(factory=dict)
    contention: dict[str, Any] = attrs.field(factory=dict)
    bandwidth_after_timed: dict[str, Any] = attrs.field(factory=dict)
    lockstep: dict[str, Any] = attrs.field(factory=dict)
    phases_s: dict[str, Any] = attrs.field(factory=dict)
    record: dict[str, Any] = attrs.field(factory=dict, repr=False, eq=False)

    @classmethod
    def of(cls, record: dict[str, Any]) -> "Measurement":
        return cls(key=str(record.get("key") or ""), status=str(record.get("status") or "failed"),
                   round=int(record.get("round") or 0), error=record.get("error"),
                   resumed=bool(record.get("resumed")), retry=bool(record.get("retry")),
                   wall_s=record.get("wall_s"), started_at=record.get("started_at"), record=record,
                   **{name: section(record.get(name)) for name in
                      ("metrics", "memory", "timings", "contention", "bandwidth_after_timed", "lockstep",
                       "phases_s")})

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def timed_contention(self) -> dict[str, Any]:
        """What other processes did while this measurement's timed phase ran."""
        return section(self.contention.get("timed"))
