"""The one preparation step before points are measured on a machine, the same for `moerun`
on this machine and for each node of a fleet (moerun.fleet): look at the machine (warn, wait
for quiet or refuse, `--if-busy`), capture its environment (CPU, memory bandwidth probe), and
write the synthetic checkpoints the points need into its cache, so that a point's child
process finds them ready and every machine measures byte-identical weights.

It prints nothing itself: what the user should hear goes to `say` (one line each)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable

import attrs

from .cache import Cache
from .errors import MoerunError
from .point import Point, point_spec, resolve_checkpoint
from .predict import point_fit_obstacle

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins

Say = Callable[[str], None]
# a progress display for one checkpoint: (label, bytes) -> a context manager giving a
# callback (bytes done, bytes in all), or None where nothing is shown
ShowProgress = Callable[[str, int], ContextManager[Callable[[int, int], None] | None]]


class BusyError(MoerunError):
    """The machine is busy and `--if-busy refuse` was asked for."""


@attrs.frozen
class Prepared:
    """What the machine was like before measuring (the results' `env`) and the cache the
    checkpoints were written to."""

    env: dict[str, Any]
    cache: Cache
    checkpoint_s: float = 0.0


def look_at_machine(if_busy: str, wait_s: float, say: Say = lambda line: None) -> dict[str, Any]:
    """Look before measuring: warn, wait for quiet (at most `wait_s`), or refuse (BusyError);
    the last look is returned for the environment record."""
    from .contention import describe, look, wait_for_quiet

    sample = look()
    if not sample.get("contended"):
        return sample
    what = describe(sample)
    if if_busy == "refuse":
        raise BusyError(f"the machine is busy ({what}); not measuring (--if-busy refuse)")
    if if_busy == "wait":
        say(f"busy ({what}); waiting up to {wait_s:g} s for quiet")
        ok, sample = wait_for_quiet(wait_s)
        if not ok:
            say(f"warning: still busy after {wait_s:g} s ({describe(sample)}); measuring anyway, "
                f"contended points are flagged")
        return sample
    say(f"warning: the machine is busy ({what}); points measured under contention are flagged ('busy' column) "
        f"and left out of verdicts while enough quiet rounds exist (--if-busy wait to wait for quiet)")
    return sample


def write_checkpoints(plugins: "MoerunPlugins", points: Iterable[Point], cache: Cache,
                      show: ShowProgress | None = None) -> None:
    """Write the synthetic checkpoints `points` need and the cache lacks (a folder or an
    engine file needs none; nor does a point that cannot fit its `--fit` device)."""
    seen = set()
    for p in points:
        if Path(p.model).exists():
            continue
        key = (p.model, p.seed, p.checkpoint_dtype, p.router_skew)
        if key in seen:
            continue
        spec = point_spec(p, plugins)
        if p.fit:
            precision = p.precision or plugins.backends.get(p.backend).capabilities.default_precision
            if point_fit_obstacle(p, spec, precision):
                continue
        seen.add(key)
        size = spec.total_params * (2 if p.checkpoint_dtype == "bfloat16" else 4)
        label = f"checkpoint {p.model} ({size / 1e9:.1f} GB, {p.checkpoint_dtype})"
        with (show(label, size) if show else contextlib.nullcontext()) as progress:
            resolve_checkpoint(p, plugins, cache, progress)


def prepare_machine(plugins: "MoerunPlugins", points: Iterable[Point], *, if_busy: str, wait_s: float,
                    refresh_probe: bool = False, cache: Cache | None = None, say: Say = lambda line: None,
                    show: ShowProgress | None = None) -> Prepared:
    """Look at the machine, capture its environment, write the checkpoints: everything a
    machine does before its first point is timed."""
    import time

    from .environment import capture

    before = look_at_machine(if_busy, wait_s, say)
    env = {**capture(refresh_probe=refresh_probe), "contention_before": before}
    cache = cache or Cache()
    points = list(points)
    if any(p.memory_cap for p in points):  # weights past a cap come back from the disk the cache is on
        from .storage import storage_probe

        env["storage"] = storage_probe(cache.root / "machine", refresh=refresh_probe)
    started = time.perf_counter()
    write_checkpoints(plugins, points, cache, show)
    return Prepared(env=env, cache=cache, checkpoint_s=time.perf_counter() - started)
