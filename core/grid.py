"""The one grid builder: a `StudySpec` (from a study file, a preset or `moerun`'s flags)
becomes points. Each MoE model comes with its twins (active, total; the iso-memory twin after
each MoE point), each named dense baseline once, x backends x precisions x prompt lengths x
generation lengths x threads x batch sizes x hardware labels x the values of any option given
as a list. `build_grid` also chooses the backends and checks every model input before
anything is prepared or measured."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import attrs

from .errors import BackendUnavailableError, ConfigError
from .point import Point
from .routing import CodeLayout, Routing
from .spec import LADDER
from .routing import Model as RoutingModel
from .precision import get_precision, harder_precision
from .studyfile import StudySpec

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins

@attrs.frozen
class Grid:
    """The points of a study, the backends left out with why, and notes for the user (twins
    not added, and why)."""

    points: list[Point]
    skipped: list[tuple[str, str]] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)


def build_grid(plugins: "MoerunPlugins", study: StudySpec, *, here: bool = True) -> Grid:
    """The study's points on the backends it names (else every available one), every model
    input checked (`preflight`). `here`: the points run on this machine (not a fleet's nodes,
    which judge their own availability, CPUs and files)."""
    backends, skipped = select_backends(plugins, study.backends, here=here)
    if not backends:
        raise ConfigError("no backend is available here; see 'moerun backends'")
    notes: list[str] = []
    points = grid_points(plugins, study, backends, notes=notes, here=here)  # resolves every preset named
    preflight(plugins, points, local_files=here)
    return Grid(points=points, skipped=skipped, notes=notes)


def grid_points(plugins: "MoerunPlugins", study: StudySpec, backends: list[str], *,
                notes: list[str] | None = None, here: bool | None = None) -> list[Point]:
    """The study's grid over `backends` (already chosen) as points; see the module's text.
    `here` (default: no hardware labels) decides whether the iso-memory twin is dropped at a
    precision this machine only emulates."""
    fields = dict(repetitions=study.repetitions, warmup=study.warmup, seed=study.seed,
                  checkpoint_dtype=study.checkpoint_dtype, router_skew=study.router_skew, device=study.device,
                  compile=study.compile, timeout_s=study.timeout_s, memory_limit_mb=study.memory_limit_mb,
                  fit=study.fit, breakdown=study.breakdown, parity=study.parity)
    # an option given as a list is a grid dimension: options = { n_cpu_moe = [0, 4, 8] }
    swept = {k: v for k, v in study.options.items() if isinstance(v, list)}
    for k, v in swept.items():
        if not v:
            raise ConfigError(f"study option {k!r} sweeps an empty list")
    option_sets = [{**study.options, **dict(zip(swept, values))}
                   for values in itertools.product(*swept.values())] or [dict(study.options)]
    models: list[tuple[str, str, str, list[str]]] = []  # name, role, group, the backends that load it
    for m in study.models:
        takers = _file_backends(plugins, m, backends)
        models += [(*named, takers) for named in model_with_twins(plugins, m, study.twins, study.ladder)]
    for d in study.dense:
        spec = plugins.models.resolve(d)
        if spec.is_moe:
            raise ConfigError(f"dense baseline {d!r} is an MoE model")
        models.append((d, "baseline", "", backends))
    for p in [*study.precisions, *(q for qs in study.backend_precisions.values() for q in qs)]:
        get_precision(p)  # unknown names fail before anything runs
    if not study.routing:
        raise ConfigError("routing lists no routing (give e.g. routing = [\"uniform\", \"zipf:1.0\"])")
    from .memcap import parse_cap

    if not study.memory_caps:
        raise ConfigError("memory_caps lists no cap (give e.g. memory_caps = [\"none\", \"3GB\"])")
    caps = [None if c in (None, "none", "") else parse_cap(c) for c in study.memory_caps]
    if not study.batch_sizes or any(not isinstance(b, int) or b < 1 for b in study.batch_sizes):
        raise ConfigError(f"batch_sizes must list whole numbers >= 1, got {study.batch_sizes}")
    points = []
    if study.ladder:
        fields["count_ops"] = True
    precisions = {b: study.backend_precisions.get(b) or study.precisions or [None] for b in backends}
    for label, options, (name, role, group, takers) in itertools.product(study.hardware or [None], option_sets,
                                                                         models):
        for backend in takers:
            inner = itertools.product(precisions[backend], study.prompt_tokens, study.new_tokens,
                                      study.threads or [None], study.batch_sizes, study.routing, caps)
            for precision, prompt, new, threads, batch, routing, cap in inner:
                points.append(Point(model=name, backend=backend, precision=precision, role=role, group=group,
                                    prompt_tokens=prompt, new_tokens=new, threads=threads, hardware=label,
                                    batch_size=batch, routing=routing, memory_cap=cap, options=dict(options),
                                    **fields))
    # the split twin and the fixed-route MoE compute other functions than any reference (no
    # parity), and the ladder sets the MoE's breakdown beside its steps (theirs is not read)
    points = [attrs.evolve(p, parity=False, breakdown=False) if p.role in ("split", "fixed-route") else p
              for p in points]
    isomem = study.twins if study.isomem is None else study.isomem
    if here is None:
        here = not any(study.hardware or ())
    points = _with_isomem(plugins, points, notes, here=here) if isomem else points
    fit = study.twins if study.fit_twin is None else study.fit_twin
    return _with_fit_twins(plugins, points, notes) if fit else points


def _with_fit_twins(plugins: "MoerunPlugins", points: list[Point], notes: list[str] | None = None) -> list[Point]:
    """After each capped MoE point, its iso-cap dense twin (`ModelSpec.fit_twin`: the largest
    dense model of the family whose weights fit the cap), once per comparison; none where
    the attention alone outgrows the cap (said in `notes`)."""
    out: list[Point] = []
    for p in points:
        out.append(p)
        if p.role != "moe" or not p.memory_cap or Path(p.model).exists():
            continue
        precision = p.precision or plugins.backends.get(p.backend).capabilities.default_precision
        try:  # its name (NAME:dense-fit-CAPMB-P) resolves back to the same spec in the worker
            twin = plugins.models.resolve(p.model).fit_twin(p.memory_cap, precision)
        except ConfigError as exc:
            if notes is not None:
                notes.append(f"no iso-cap twin for {p.model} under {p.memory_cap / 1e9:.1f} GB: {exc}")
            continue
        out.append(attrs.evolve(p, model=twin.name, role="dense-fit", parity=False, breakdown=False))
    return out


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


def model_with_twins(plugins: "MoerunPlugins", model: str, twins: bool = True,
                     ladder: bool = False) -> list[tuple[str, str, str]]:
    """[(model name, role, group)]: an MoE preset and its two dense twins, or one model. A
    twin named on its own (`NAME:dense-active`, `NAME:dense-total`, `NAME:split`,
    `NAME:fixed-route`) keeps its role in NAME's group, so it pairs with NAME's MoE point in
    the verdicts (`-m NAME -m NAME:dense-active --no-twins` skips only the total twin, which
    at real shapes is the largest model). With `ladder` an MoE also brings the ablation
    ladder's rungs: its active twin (with or without `twins`), split twin and fixed-route MoE."""
    if Path(model).exists():
        return [(model, "", model)]
    if ":" in model:
        base, _, kind = model.partition(":")
        return [(model, kind, base)] if kind in LADDER[:3] or kind == "dense-total" else [(model, "", model)]
    spec = plugins.models.resolve(model)
    if not spec.is_moe or not (twins or ladder):
        return [(model, "moe" if spec.is_moe else "dense", model)]
    out = [(model, "moe", model), (f"{model}:dense-active", "dense-active", model)]
    if twins:
        out.append((f"{model}:dense-total", "dense-total", model))
    if ladder:
        out += [(f"{model}:split", "split", model), (f"{model}:fixed-route", "fixed-route", model)]
    return out


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


def preflight(plugins: "MoerunPlugins", points: Iterable[Point], local_files: bool = True) -> None:
    """Check every model input here, before any probe or child process: presets resolve,
    checkpoint folders hold a valid config, engine files parse for a backend that takes
    them. A bad one raises a one-line MoerunError (exit 2). Without `local_files` (points
    measured on other machines) paths are the nodes' to check; presets still resolve here."""
    from .checkpoint import Checkpoint
    from .errors import CheckpointError, MoerunError

    seen: set[tuple[str, str]] = set()
    planted: set[tuple[str, str, int]] = set()
    for p in points:
        plugins.backends.get(p.backend).check_options(p.options)  # declared options only (Backend.options)
        path = Path(p.model)
        routing = Routing.parse(p.routing)
        if routing.planted and path.exists():
            raise ConfigError(f"routing {routing.label} is planted in synthetic weights; {p.model} brings its own "
                              f"(use a preset, or --routing random)")
        if routing.planted and not path.exists() and (p.model, p.routing, p.seed) not in planted:
            planted.add((p.model, p.routing, p.seed))
            spec = plugins.models.resolve(p.model)
            if spec.is_moe:  # the shape admits the plan: a trace of this shape, room for the code
                RoutingModel.of(routing, spec.num_layers, spec.num_experts, spec.top_k, p.seed)
                CodeLayout.of(spec.hidden_size, spec.num_layers, spec.num_experts, p.seed)
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
