"""A study: a list of points, run one at a time (isolated by default), appended to a
JSONL file, resumable. The Executor is the seam that places points: `LocalExecutor` on this
machine, `moerun.fleet.RayExecutor` on a Ray cluster's labelled nodes (points are
self-contained and serialisable for that)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, Sequence

import attrs

from .cache import Cache
from .errors import BackendUnavailableError, ConfigError
from .precision import get_precision, harder_precision
from .protocol import Protocol as MeasurementProtocol
from .protocol import collapse, run_rounds
from .results import FINISHED, append_result, read_results
from .runner import Point, base_result, measure, run_isolated

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins

ROLES = ("moe", "dense-active", "dense-total", "dense-isomem")


def isomem_twin(plugins: "MoerunPlugins", model: str, backend: str, precision: str | None) -> tuple[str, str] | None:
    """(twin model name, its precision) of the iso-memory dense point for an MoE point: a
    dense model that holds, at the precision one step harder than the MoE's on this backend
    (`moerun.precision.harder_precision`), the bytes the MoE holds at its own. None where
    the backend offers no harder precision."""
    caps = plugins.backends.get(backend).capabilities
    p = precision or caps.default_precision
    q = harder_precision(caps.precisions, p)
    return (f"{model}:dense-isomem-{p}-{q}", q) if q else None


def _with_isomem(plugins: "MoerunPlugins", points: list[Point], notes: list[str] | None = None,
                 here: bool = True) -> list[Point]:
    """After each MoE point, its iso-memory dense point (parity on for both: the accuracy the
    harder quantisation costs belongs beside the speed); none where that precision would be
    emulated on this machine (`here`: the points run on this machine), said in `notes`."""
    check = here and os.environ.get("MOERUN_EMULATED_TWINS", "") in ("", "0")  # 1: twins at emulated precisions too
    out: list[Point] = []
    said: set[tuple[str, str]] = set()
    for p in points:
        twin = isomem_twin(plugins, p.model, p.backend, p.precision) if p.role == "moe" else None
        why = plugins.backends.get(p.backend)().emulated(twin[1], p.device) if twin and check else None
        if why:
            if notes is not None and (p.model, p.backend) not in said:
                said.add((p.model, p.backend))
                notes.append(f"no iso-memory twin for {p.model} on {p.backend} at {twin[1]}: {why}")
            twin = None
        if twin is None:
            out.append(p)
            continue
        out.append(attrs.evolve(p, parity=True))
        out.append(attrs.evolve(p, model=twin[0], precision=twin[1], role="dense-isomem", parity=True))
    return out


def model_with_twins(plugins: "MoerunPlugins", model: str, twins: bool = True) -> list[tuple[str, str, str]]:
    """[(model name, role, group)]: an MoE preset and its two dense twins, or one model. A
    twin named on its own (`NAME:dense-active`, `NAME:dense-total`) keeps its role in NAME's
    group, so it pairs with NAME's MoE point in the verdicts (`-m NAME -m NAME:dense-active
    --no-twins` skips only the total twin, which at real shapes is the largest model)."""
    if Path(model).exists():
        return [(model, "", model)]
    if ":" in model:
        base, _, kind = model.partition(":")
        return [(model, kind, base)] if kind in ("dense-active", "dense-total") else [(model, "", model)]
    spec = plugins.models.resolve(model)
    if not spec.is_moe or not twins:
        return [(model, "moe" if spec.is_moe else "dense", model)]
    return [(model, "moe", model), (f"{model}:dense-active", "dense-active", model),
            (f"{model}:dense-total", "dense-total", model)]


def select_backends(plugins: "MoerunPlugins", names: Iterable[str] | None,
                    here: bool = True) -> tuple[list[str], list[tuple[str, str]]]:
    """Explicit names must exist and be available (else a one-line error); with none,
    every available backend runs and the others are returned with their reasons. With
    `here` off (points measured on other machines) only the names are checked: each node
    reports its own availability per point."""
    if names:
        chosen = []
        for name in names:
            cls = plugins.backends.get(name)  # UnknownBackendError lists the rest
            av = cls().availability() if here else None
            if av is not None and not av.available:
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
        if not here:
            chosen.append(name)
            continue
        av = cls().availability()
        if av.available:
            chosen.append(name)
        else:
            skipped.append((name, av.reason))
    return chosen, skipped


def build_points(plugins: "MoerunPlugins", *, models: list[str], backends: list[str],
                 precisions: list[str | None], twins: bool = True, hardware: Sequence[str | None] = (None,),
                 batch_sizes: Sequence[int] = (1,), isomem: bool = True, notes: list[str] | None = None,
                 **fields: Any) -> list[Point]:
    """Each model (with its twins; with `isomem`, the iso-memory twin too) x backends x
    precisions x batch sizes x `hardware` labels."""
    for p in precisions:
        if p is not None:
            get_precision(p)  # unknown names fail before anything runs
    points = []
    for label in hardware or (None,):
        for model in models:
            takers = _file_backends(plugins, model, backends)
            for name, role, group in model_with_twins(plugins, model, twins):
                for backend in takers:
                    for precision in precisions:
                        for batch in batch_sizes:
                            points.append(Point(model=name, backend=backend, precision=precision, role=role,
                                                group=group, hardware=label, batch_size=batch, **fields))
    here = all(label is None for label in hardware or (None,))  # else each node is its own machine
    return _with_isomem(plugins, points, notes, here) if twins and isomem else points


def _file_backends(plugins: "MoerunPlugins", model: str, backends: list[str]) -> list[str]:
    """The backends that can run `model`: all of them, unless it is an engine file, which only
    the backends listing its suffix load (none: a one-line error)."""
    path = Path(model)
    if not path.is_file():
        return backends
    takers = [b for b in backends if path.suffix in plugins.backends.get(b).capabilities.artifact_suffixes]
    if not takers:
        raise ConfigError(f"{path}: none of the backends {', '.join(backends)} loads a {path.suffix or 'suffix-less'} "
                          f"file; give a checkpoint folder or a preset")
    return takers


def points_from_study(plugins: "MoerunPlugins", study: Any, backends: list[str],
                      notes: list[str] | None = None) -> list[Point]:
    """The study's grid as points: each MoE model with its twins (or alone; the iso-memory
    twin after each MoE point), each named dense baseline once, x backends x precisions x
    prompt lengths x generation lengths x threads x batch sizes (x hardware labels x the
    values of any option given as a list)."""
    import itertools

    fields = dict(repetitions=study.repetitions, warmup=study.warmup, seed=study.seed,
                  checkpoint_dtype=study.checkpoint_dtype, timeout_s=study.timeout_s, breakdown=study.breakdown,
                  parity=study.parity)
    # an option given as a list is a grid dimension: options = { n_cpu_moe = [0, 4, 8] }
    swept = {k: v for k, v in study.options.items() if isinstance(v, list)}
    for k, v in swept.items():
        if not v:
            raise ConfigError(f"study option {k!r} sweeps an empty list")
    option_sets = [{**study.options, **dict(zip(swept, values))}
                   for values in itertools.product(*swept.values())] or [dict(study.options)]
    models: list[tuple[str, str, str]] = []
    for m in study.models:
        models += model_with_twins(plugins, m, study.twins)
    for d in study.dense:
        spec = plugins.models.resolve(d)
        if spec.is_moe:
            raise ConfigError(f"dense baseline {d!r} is an MoE model")
        models.append((d, "baseline", ""))
    for p in [*study.precisions, *(q for qs in study.backend_precisions.values() for q in qs)]:
        get_precision(p)
    if not study.batch_sizes or any(not isinstance(b, int) or b < 1 for b in study.batch_sizes):
        raise ConfigError(f"batch_sizes must list whole numbers >= 1, got {study.batch_sizes}")
    points = []
    precisions = {b: study.backend_precisions.get(b) or study.precisions or [None] for b in backends}
    outer = itertools.product(study.hardware or [None], option_sets, models, backends)
    for label, options, (name, role, group), backend in outer:
        inner = itertools.product(precisions[backend], study.prompt_tokens, study.new_tokens,
                                  study.threads or [None], study.batch_sizes)
        for precision, prompt, new, threads, batch in inner:
            points.append(Point(model=name, backend=backend, precision=precision, role=role, group=group,
                                prompt_tokens=prompt, new_tokens=new, threads=threads, hardware=label,
                                batch_size=batch, options=dict(options), **fields))
    isomem = study.twins if study.isomem is None else study.isomem
    return _with_isomem(plugins, points, notes, here=not any(study.hardware or ())) if isomem else points


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
        from .runner import point_spec

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
                            target=protocol.target or 0.03, seed=seed, load_together=not first)


@attrs.frozen
class StudyOutcome:
    """What a study run returns: one collapsed record per point (input order), every
    per-round record, why rounds stopped and the seconds they took."""

    results: list[dict[str, Any]]
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
    results = [folded[p.key] if p.key in folded else base_result(p, None) for p in points]
    scheduling = {k: v for run in runs.values() for k, v in run.get("lockstep", {}).items()}
    return StudyOutcome(results=results, records=records, stopped=stopped, scheduling=scheduling,
                        elapsed_s=max(run["elapsed_s"] for run in runs.values()))


def preflight(plugins: "MoerunPlugins", points: Iterable[Point], local_files: bool = True) -> None:
    """Check every model input here, before any probe or child process: presets resolve,
    checkpoint folders hold a valid config, engine files parse for a backend that takes
    them. A bad one raises a one-line MoerunError (exit 2). Without `local_files` (points
    measured on other machines) paths are the nodes' to check; presets still resolve here."""
    from .checkpoint import Checkpoint
    from .errors import CheckpointError, MoerunError

    seen: set[tuple[str, str]] = set()
    for p in points:
        path = Path(p.model)
        if not local_files and (path.exists() or os.sep in p.model):
            continue
        if (p.model, p.backend if path.is_file() else "") in seen:
            continue
        seen.add((p.model, p.backend if path.is_file() else ""))
        if path.is_dir():
            Checkpoint.open(path)
        elif path.is_file():
            backend = plugins.backends.get(p.backend)()
            takes = backend.capabilities.artifact_suffixes
            if path.suffix not in takes:
                known = sorted({s for n in plugins.backends.primary_names()
                                for s in plugins.backends.get(n).capabilities.artifact_suffixes})
                raise ConfigError(f"{path}: backend {backend.name} loads no {path.suffix or 'suffix-less'} file "
                                  f"(give a checkpoint folder or a preset; engine files: {', '.join(known) or 'none'})")
            try:
                backend.prepare_file(path)
            except MoerunError as exc:
                raise CheckpointError(str(exc).splitlines()[0]) from None
            except Exception as exc:  # noqa: BLE001 - a file the engine's reader chokes on
                raise CheckpointError(f"{path}: unreadable as a {backend.name} input "
                                      f"({type(exc).__name__}: {exc})") from None
        elif os.sep in p.model or path.suffix in (".json", ".safetensors", ".gguf", ".onnx"):
            raise ConfigError(f"model path {p.model} does not exist")
        else:
            plugins.models.resolve(p.model)
