"""A study: a list of points, run one at a time (isolated by default), appended to a
JSONL file, resumable. The Executor is the seam where a distributed engine could later
place points on other machines; points are self-contained and serialisable for that."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol

import attrs

from .cache import Cache
from .errors import BackendUnavailableError, ConfigError
from .precision import get_precision
from .results import append_result, completed_keys, read_results
from .runner import Point, measure, run_isolated

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins

ROLES = ("moe", "dense-active", "dense-total")


def model_with_twins(plugins: "MoerunPlugins", model: str, twins: bool = True) -> list[tuple[str, str, str]]:
    """[(model name, role, group)]: an MoE preset and its two dense twins, or one model."""
    if Path(model).exists() or ":" in model:
        return [(model, "", model)]
    spec = plugins.models.resolve(model)
    if not spec.is_moe or not twins:
        return [(model, "moe" if spec.is_moe else "dense", model)]
    return [(model, "moe", model), (f"{model}:dense-active", "dense-active", model),
            (f"{model}:dense-total", "dense-total", model)]


def select_backends(plugins: "MoerunPlugins", names: Iterable[str] | None) -> tuple[list[str], list[tuple[str, str]]]:
    """Explicit names must exist and be available (else a one-line error); with none,
    every available backend runs and the others are returned with their reasons."""
    if names:
        chosen = []
        for name in names:
            cls = plugins.backends.get(name)  # UnknownBackendError lists the rest
            av = cls().availability()
            if not av.available:
                hint = f"; install: {av.install_hint}" if av.install_hint else ""
                raise BackendUnavailableError(f"backend {cls.name} is unavailable here: {av.reason}{hint}")
            if cls.name not in chosen:
                chosen.append(cls.name)
        return chosen, []
    chosen, skipped = [], []
    for name in plugins.backends.primary_names():
        cls = plugins.backends.get(name)
        if not cls.capabilities.in_default_study:
            continue
        av = cls().availability()
        if av.available:
            chosen.append(name)
        else:
            skipped.append((name, av.reason))
    return chosen, skipped


def build_points(plugins: "MoerunPlugins", *, models: list[str], backends: list[str],
                 precisions: list[str | None], twins: bool = True, **fields: Any) -> list[Point]:
    for p in precisions:
        if p is not None:
            get_precision(p)  # unknown names fail before anything runs
    points = []
    for model in models:
        for name, role, group in model_with_twins(plugins, model, twins):
            for backend in backends:
                for precision in precisions:
                    points.append(Point(model=name, backend=backend, precision=precision, role=role,
                                        group=group, **fields))
    return points


def points_from_study(plugins: "MoerunPlugins", study: Any, backends: list[str]) -> list[Point]:
    """The study's grid as points: each MoE model with its twins (or alone), each named dense
    baseline once, x backends x precisions x prompt lengths x generation lengths x threads."""
    import itertools

    fields = dict(repetitions=study.repetitions, warmup=study.warmup, seed=study.seed,
                  checkpoint_dtype=study.checkpoint_dtype, timeout_s=study.timeout_s, breakdown=study.breakdown,
                  parity=study.parity,
                  options=dict(study.options))
    models: list[tuple[str, str, str]] = []
    for m in study.models:
        models += model_with_twins(plugins, m, study.twins)
    for d in study.dense:
        spec = plugins.models.resolve(d)
        if spec.is_moe:
            raise ConfigError(f"dense baseline {d!r} is an MoE model")
        models.append((d, "baseline", ""))
    for p in study.precisions:
        get_precision(p)
    points = []
    grid = itertools.product(models, backends, study.precisions or [None], study.prompt_tokens,
                             study.new_tokens, study.threads or [None])
    for (name, role, group), backend, precision, prompt, new, threads in grid:
        points.append(Point(model=name, backend=backend, precision=precision, role=role, group=group,
                            prompt_tokens=prompt, new_tokens=new, threads=threads, **fields))
    return points


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
        if self.isolate:
            return run_isolated(point, cache=self.cache, env=self.env)
        result = measure(point, self.plugins, self.cache, self.env)
        result["isolated"] = False
        return result


def run_study(
    points: list[Point],
    plugins: "MoerunPlugins",
    *,
    output: Path,
    executor: Executor,
    on_start: Callable[[int, Point], None] | None = None,
    on_result: Callable[[int, Point, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every point not already in `output`, appending each result as it finishes.

    Returns the results of all `points` in order (reused ones included).
    """
    if len({p.key for p in points}) != len(points):
        raise ConfigError("the study lists the same measurement twice")
    previous = {r["key"]: r for r in read_results(output)}
    done = completed_keys(previous.values())
    results = []
    for i, point in enumerate(points):
        if point.key in done:
            result = dict(previous[point.key], resumed=True)
        else:
            if on_start:
                on_start(i, point)
            t0 = time.perf_counter()
            result = executor.run(point)
            result["wall_s"] = time.perf_counter() - t0
            plugins.hook.moerun_measurement_finish(point=point.to_dict(), result=result)
            append_result(output, result)
        results.append(result)
        if on_result:
            on_result(i, point, result)
    return results
