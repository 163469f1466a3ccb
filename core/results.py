"""Results: one JSON object per measurement, appended atomically to a JSONL file."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

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
