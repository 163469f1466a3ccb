"""The measuring commands: `moerun` with flags and `moerun study`. Both make a StudySpec and
measure it the same way: the grid (moerun.grid), the machine prepared (moerun.prepare), the
rounds (moerun.study), then the reporter and a summary."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .. import defaults
from ..errors import ConfigError
from ..results import Measurement
from ..studyfile import StudySpec
from .parser import backend_options, batch_sizes, csv_list, fit_device, memory_caps, routings


def cmd_run(plugins: Any, args: argparse.Namespace) -> int:
    """`moerun` with flags: the flags make a StudySpec, measured like a study file's."""
    study = StudySpec(
        name="run", models=csv_list(args.model) or [defaults.MODEL], twins=not args.no_twins,
        isomem=False if args.no_isomem else None, backends=csv_list(args.backend),
        precisions=csv_list(args.precision), prompt_tokens=[args.prompt_tokens], new_tokens=[args.new_tokens],
        threads=[args.threads] if args.threads else [], batch_sizes=batch_sizes(args.batch_size) or [defaults.BATCH_SIZE],
        repetitions=args.repetitions, warmup=args.warmup, seed=args.seed, checkpoint_dtype=args.checkpoint_dtype,
        router_skew=args.router_skew, routing=routings(args.routing) or [defaults.ROUTING],
        memory_caps=memory_caps(args.memory_cap) or [None], device=args.device, compile=args.compile, timeout_s=args.timeout,
        memory_limit_mb=args.memory_limit, fit=fit_device(args.fit), breakdown=args.breakdown, parity=args.parity,
        ladder=args.ladder, options=backend_options(args.option), hardware=_hardware_labels(args, []), budget_s=defaults.BUDGET_S)
    return _measure(plugins, study, args)


def cmd_study(plugins: Any, args: argparse.Namespace) -> int:
    """A study file or preset, with the flags that override it."""
    import attrs

    from ..studyfile import PRESETS, load_study

    if args.list:
        for name, d in PRESETS.items():
            print(f"{name:26s} {d['description']}")
        return 0
    study = load_study(args.file, args.preset)
    study = attrs.evolve(study, backends=csv_list(args.backend) or study.backends,
                         hardware=_hardware_labels(args, study.hardware),
                         batch_sizes=batch_sizes(args.batch_size) or study.batch_sizes,
                         routing=routings(args.routing) or study.routing,
                         memory_caps=memory_caps(args.memory_cap) or study.memory_caps,
                         memory_limit_mb=args.memory_limit or study.memory_limit_mb,
                         fit=fit_device(args.fit) or study.fit, ladder=args.ladder or study.ladder)
    return _measure(plugins, study, args)


def _hardware_labels(args: argparse.Namespace, from_study: Sequence[str]) -> list[str]:
    """The fleet labels the grid runs on: --hardware over the study file's; 'all' is every
    label the Ray cluster offers. Labels need the ray executor, and the ray executor needs labels."""
    given = csv_list(args.hardware) or list(from_study)
    if args.executor != "ray":
        if given:
            raise ConfigError(f"hardware labels ({', '.join(given)}) place points on a fleet's nodes: "
                              f"add --executor ray")
        return []
    from ..fleet import RayExecutor, describe_labels

    labels = RayExecutor(address=args.ray_address).labels()
    if "all" in given:
        given = [g for g in given if g != "all"] + [x for x in sorted(labels) if x not in given]
    if not given:
        raise ConfigError(f"the ray executor places points by hardware label: give --hardware LABEL (or 'all'), "
                          f"or hardware = [...] in the study file; labels on the cluster: {describe_labels(labels)}")
    return list(dict.fromkeys(given))


def _protocol(args: argparse.Namespace, study: StudySpec) -> Any:
    """The protocol from the command line, over the study's (moerun.defaults' where not given)."""
    import math

    from ..protocol import Protocol

    given = {"min_rounds": args.min_rounds, "max_rounds": args.max_rounds, "target": args.target,
             "budget_s": args.budget, "if_busy": args.if_busy, "lockstep": args.lockstep, "unit_s": args.unit_s}
    given = {k: v for k, v in given.items() if v is not None}
    fields = {**study.protocol_fields(), **given}
    if fields["budget_s"] is not None and math.isinf(fields["budget_s"]):
        fields["budget_s"] = None
    if "min_rounds" in given and "max_rounds" not in given:
        fields["max_rounds"] = max(given["min_rounds"], fields["max_rounds"])
    return Protocol(wait_s=args.wait_limit, **fields)


def _measure(plugins: Any, study: StudySpec, args: argparse.Namespace) -> int:
    """The study's grid (moerun.grid), the machine prepared (moerun.prepare; a fleet's nodes
    prepare themselves), the points in rounds (moerun.study) into --output, then the summary."""
    from ..grid import build_grid
    from ..prepare import prepare_machine
    from ..study import LocalExecutor, run_study

    output = args.output or Path(defaults.OUTPUT_DIR) / f"{study.name}-{datetime.now():%Y%m%d-%H%M%S}.jsonl"
    if output.exists() and output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a .jsonl file path")
    reporter = plugins.reporters.get("json" if args.json else args.report)
    err = sys.stderr
    fleet = args.executor == "ray"
    protocol = _protocol(args, study)  # bad protocol options fail before any input is read
    grid = build_grid(plugins, study, here=not fleet)
    for name, reason in grid.skipped:
        print(f"moerun: skipping backend {name}: {reason}", file=err)
    for note in grid.notes:
        print(f"moerun: {note}", file=err)
    if fleet:
        # each node looks at its own contention, probes its own bandwidth and writes its own checkpoints
        from ..fleet import RayExecutor, describe_labels

        executor: Any = RayExecutor(address=args.ray_address, if_busy=protocol.if_busy, wait_s=protocol.wait_s)
        if not args.quiet:
            print(f"moerun: Ray cluster labels: {describe_labels(executor.labels())}", file=err)
    else:
        prepared = prepare_machine(plugins, grid.points, if_busy=protocol.if_busy, wait_s=protocol.wait_s,
                                   refresh_probe=args.reprobe, say=lambda line: print(f"moerun: {line}", file=err,
                                                                                      flush=True),
                                   show=None if args.quiet else _checkpoint_progress)
        env = prepared.env
        if not args.quiet:
            print(f"moerun: read bandwidth {env.get('bandwidth_bytes_s', 0) / 1e9:.1f} GB/s "
                  f"({env.get('bandwidth_source', '')})", file=err)
        executor = LocalExecutor(plugins=plugins, cache=prepared.cache, env=env, isolate=not args.no_isolate)
    last: dict[str, Any] = {}

    def before_round() -> None:
        if protocol.if_busy == "wait" and last.get("contended") and not fleet:  # a node waits for itself
            from ..contention import wait_for_quiet

            wait_for_quiet(protocol.wait_s)

    def on_result(record: dict[str, Any]) -> None:
        last["contended"] = Measurement.of(record).timed_contention.get("contended")

    points = grid.points
    with _Progress(len(points) * protocol.min_rounds, enabled=not args.quiet) as progress:
        outcome = run_study(list(points), plugins, output=output, executor=executor, protocol=protocol,
                            on_start=progress.start, on_result=on_result, before_round=before_round)
    from ..analysis import verdicts

    rows = verdicts(outcome.results)
    reporter(outcome.results, rows, sys.stdout)
    _summary(outcome, rows, protocol, output, err)
    return 1 if any(r.status == "failed" or r.record.get("round_errors") for r in outcome.results) else 0


def _summary(outcome: Any, rows: list[dict[str, Any]], protocol: Any, output: Path, err: Any) -> None:
    rounds = len({r.get("round") for r in outcome.records})
    print(f"moerun: {len(outcome.results)} points, {len(outcome.records)} measurements in {rounds} rounds "
          f"({outcome.elapsed_s:.0f} s); rounds stopped: {outcome.stopped}", file=err)
    ways: dict[str, int] = {}
    for way in outcome.scheduling.values():
        ways[way] = ways.get(way, 0) + 1
    if ways:
        print("moerun: comparisons measured: " + "; ".join(f"{n} {way}" for way, n in ways.items()), file=err)
    missed = [r for r in rows if r.get("missed_target")]
    if missed and protocol.target:
        print(f"moerun: {len(missed)} of {len(rows)} verdicts missed the ±{protocol.target:.0%} target "
              f"({', '.join(r['group'] + ' on ' + r['backend'] for r in missed)}); more rounds "
              f"(--budget, --max-rounds) or a quieter machine narrow them", file=err)
    busy = [r for r in outcome.results if r.contended]
    if busy:
        print(f"moerun: warning: {len(busy)} points had rounds measured under contention ('busy' column)",
              file=err)
    print(f"moerun: results in {output}", file=err)


@contextlib.contextmanager
def _checkpoint_progress(label: str, size: int) -> Iterator[Callable[[int, int], None] | None]:
    """A checkpoint being written (real shapes take minutes; a child process would show
    nothing): a rich bar on a terminal, else one line; nothing for small ones."""
    if size < (256 << 20):
        yield None
    elif sys.stderr.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task(label, total=size)
            yield lambda done, total: bar.update(task, completed=done)
    else:
        print(f"moerun: writing {label} if not cached", file=sys.stderr, flush=True)
        yield None


class _Progress:
    """A rich progress bar on stderr: the point being run and an estimate of time left."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled and sys.stderr.isatty()  # total: an estimate
        self.plain = enabled and not self.enabled
        self.t0 = time.perf_counter()

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def start(self, i: int, round_: int, point: Any) -> None:
        """Before measurement `i` (round `round_`); the total grows when rounds are added."""
        label = f"round {round_ + 1}: {point.model} on {point.backend} {point.precision or ''}".strip()
        if point.hardware:
            label += f" @ {point.hardware}"
        self.total = max(self.total, i + 1)
        if self.enabled:
            self.bar.update(self.task, description=label, completed=i, total=self.total)
        elif self.plain:
            print(f"moerun: [{i + 1}/{self.total}+] {label}", file=sys.stderr, flush=True)
