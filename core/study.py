"""A study: a list of points (moerun.grid), run in rounds (moerun.protocol), each record
appended to a JSONL file as it finishes, resumable. The Executor is the seam that places
points: `LocalExecutor` on this machine (its environment and checkpoints from
moerun.prepare), `moerun.fleet.RayExecutor` on a Ray cluster's labelled nodes (points are
self-contained and serialisable for that)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import attrs

from . import defaults
from .cache import Cache
from .errors import ConfigError
from .isolation import run_isolated
from .point import Point, point_spec
from .protocol import Protocol as MeasurementProtocol
from .protocol import collapse, run_rounds
from .records import PointResult
from .results import FINISHED, append_result, base_result, read_results
from .runner import measure

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins


class Executor(Protocol):
    def run(self, point: Point) -> dict[str, Any]: ...


@attrs.define
class LocalExecutor:
    """Points run one at a time on this machine (timing needs a quiet machine), each in a
    child process unless `isolate` is off."""

    plugins: "MoerunPlugins"
    cache: Cache
    env: dict[str, Any]
    isolate: bool = True

    def run(self, point: Point) -> dict[str, Any]:
        """The point's result, with what else used the CPU over its whole life (load included)
        as `contention.point`, beside the child's own view of its timed phase."""
        from .contention import CpuWindow

        window = CpuWindow(include_children=True)
        if point.memory_cap and not self.isolate:
            from .results import base_result, now

            result = base_result(point, self.env)
            result.update(status="unsupported", finished_at=now(),
                          error="a memory cap runs the point in a process of its own, inside the cap: drop --no-isolate")
            return result
        if self.isolate:
            result = run_isolated(point, cache=self.cache, env=self.env)
        else:
            result = measure(point, self.plugins, self.cache, self.env)
            result["isolated"] = False
        result.setdefault("contention", {})["point"] = window.close()
        return result

    TOGETHER_HEADROOM = 1.5  # engines hold more than their weights (int4 ONNX graphs twice; docs/backends.md)

    def together(self, points: Sequence[Point]) -> tuple[bool, str]:
        """Whether the sides of a comparison can be loaded at once here (lockstep), and why
        or why not: each in its own process, so isolation must be on, and their weights and
        KV caches (x TOGETHER_HEADROOM) must fit the memory available now."""
        if not self.isolate:
            return False, "--no-isolate: one process holds one engine at a time"
        if len(points) < 2:
            return False, "one side"
        need = sum(self._expected_bytes(p) for p in points) * self.TOGETHER_HEADROOM
        from .environment import meminfo_bytes

        available = meminfo_bytes("MemAvailable")
        if available and need > available:
            return False, (f"the {len(points)} sides need about {need / 1e9:.1f} GB together, "
                           f"{available / 1e9:.1f} GB available")
        return True, f"lockstep: {len(points)} sides loaded together (about {need / 1e9:.1f} GB)"

    def _expected_bytes(self, point: Point) -> float:
        from .predict import expected_need

        path = Path(point.model)
        if path.is_file():
            return path.stat().st_size
        try:
            spec = point_spec(point, self.plugins)
            precision = point.precision or self.plugins.backends.get(point.backend).capabilities.default_precision
            return expected_need(spec, precision, batch=point.batch_size,
                                 context=point.prompt_tokens + point.new_tokens)
        except Exception:  # noqa: BLE001 - the point itself will say what is wrong with it
            return 0.0

    def run_together(self, points: Sequence[Point], *, protocol: MeasurementProtocol, seed: int = 0,
                     first: bool = True) -> list[dict[str, Any]]:
        """One lockstep restart of `points` (`moerun.lockstep`); after the `first`, the sides
        load at the same time."""
        from .lockstep import run_together

        return run_together(points, cache=self.cache, env=self.env, unit_s=protocol.unit_s,
                            target=protocol.target or defaults.TARGET, seed=seed, load_together=not first)


@attrs.frozen
class StudyOutcome:
    """What a study run returns: one folded point per point (input order; a point that never
    ran is `failed` with no error), every per-round record as written, why rounds stopped and
    the seconds they took."""

    results: list[PointResult]
    records: list[dict[str, Any]]
    stopped: str
    elapsed_s: float
    scheduling: dict[tuple, str] = attrs.field(factory=dict)  # per comparison: lockstep, or why not


def run_study(
    points: list[Point],
    plugins: "MoerunPlugins",
    *,
    output: Path,
    executor: Executor,
    protocol: MeasurementProtocol | None = None,
    on_start: Callable[[int, int, Point], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    before_round: Callable[[], None] | None = None,
) -> StudyOutcome:
    """Run `points` in rounds (`moerun.protocol`), appending every per-round record to
    `output` as it finishes. Records already in `output` count as done (resume): only the
    rounds the protocol still asks for run. Without a protocol: one round of each point.
    An executor with a `lane(point)` method (the fleet's) runs each lane's rounds in order
    and different lanes in parallel."""
    if len({p.key for p in points}) != len(points):
        raise ConfigError("the study lists the same measurement twice")
    protocol = protocol or MeasurementProtocol(min_rounds=1, max_rounds=1, target=0.0)
    keys = {p.key for p in points}
    # a `retry` record is the fleet's failure (no node, node lost), not the point's: measure again
    previous = [r for r in read_results(output) if r.get("key") in keys and r.get("status") in FINISHED
                and not r.get("retry")]
    lock = threading.Lock()
    started = [0]

    def record(result: dict[str, Any]) -> None:
        with lock:
            plugins.hook.moerun_measurement_finish(point=result["point"], result=result)
            append_result(output, result)
            if on_result:
                on_result(result)

    def start(i: int, round_: int, point: Point) -> None:
        with lock:
            if on_start:
                on_start(started[0], round_, point)
            started[0] += 1

    lane_of = getattr(executor, "lane", lambda p: None)
    lanes: dict[Any, list[Point]] = {}
    for p in points:
        lanes.setdefault(lane_of(p), []).append(p)

    def run_lane(lane_points: list[Point]) -> dict[str, Any]:
        lane_keys = {p.key for p in lane_points}
        return run_rounds(lane_points, executor, protocol, previous=[r for r in previous if r["key"] in lane_keys],
                          record=record, on_start=start, before_round=before_round,
                          default_precision=lambda b: plugins.backends.get(b).capabilities.default_precision)

    if len(lanes) <= 1:
        runs = {None: run_lane(list(points))}
    else:  # one measurement at a time per lane (a machine), the lanes in parallel
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(lanes), thread_name_prefix="moerun-lane") as pool:
            futures = {lane: pool.submit(run_lane, ps) for lane, ps in lanes.items()}
            runs = {lane: f.result() for lane, f in futures.items()}
    records = [r for run in runs.values() for r in run["records"]]
    reasons = {run["stopped"] for run in runs.values()}
    stopped = reasons.pop() if len(reasons) == 1 else "; ".join(f"{lane}: {run['stopped']}"
                                                                 for lane, run in runs.items())
    folded = {r["key"]: r for r in collapse(records)}
    results = [PointResult.of(folded[p.key] if p.key in folded else base_result(p, None)) for p in points]
    scheduling = {k: v for run in runs.values() for k, v in run.get("lockstep", {}).items()}
    return StudyOutcome(results=results, records=records, stopped=stopped, scheduling=scheduling,
                        elapsed_s=max(run["elapsed_s"] for run in runs.values()))
