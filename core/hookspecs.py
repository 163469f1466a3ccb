"""The moerun hook specifications (pluggy project name ``moerun``).

Hooks are for discovery and coarse lifecycle only. Loading, prefill and decode are plain
method calls on :class:`moerun.Backend` / :class:`moerun.Session`, never hook calls.
Every hook is documented in docs/plugins.md; tests/test_docs.py checks the two agree.
Call hooks with keyword arguments only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .registry import BackendRegistry, ModelRegistry, ReporterRegistry, TrackerRegistry

hookspec = pluggy.HookspecMarker("moerun")


@hookspec
def moerun_register_backends(registry: "BackendRegistry") -> None:
    """Register inference backends.

    Called once when the plugin manager is built, for every plugin, in load order (in-tree
    defaults first, then entry points). Each implementation calls ``registry.add(cls)`` for
    every :class:`moerun.Backend` subclass it provides. Registering a name another plugin
    already registered raises :class:`moerun.errors.DuplicateRegistrationError` naming both.

    :param registry: the :class:`moerun.registry.BackendRegistry` to add backend classes to.
    :return: nothing; return values are ignored.
    """


@hookspec
def moerun_register_models(registry: "ModelRegistry") -> None:
    """Register model presets (named :class:`moerun.ModelSpec` shapes).

    Called once when the plugin manager is built. Each implementation calls
    ``registry.add(spec, published_total_params=None, description="")`` for each preset.
    Dense twins of MoE presets are derived on demand (``NAME:dense-active``,
    ``NAME:dense-total``) and need no registration. Duplicate names are an error.

    :param registry: the :class:`moerun.registry.ModelRegistry` to add presets to.
    :return: nothing; return values are ignored.
    """


@hookspec
def moerun_register_trackers(registry: "TrackerRegistry") -> None:
    """Register measurement trackers (memory, energy, ...).

    Called once when the plugin manager is built. Each implementation calls
    ``registry.add(name, factory)`` where ``factory()`` returns an object with
    ``start()`` and ``stop() -> dict`` used around every measured phase inside the
    measurement's own process. A tracker that cannot work on this machine returns
    ``{"available": False, "reason": ...}`` from ``stop()`` rather than raising.

    :param registry: the :class:`moerun.registry.TrackerRegistry` to add trackers to.
    :return: nothing; return values are ignored.
    """


@hookspec
def moerun_register_reporters(registry: "ReporterRegistry") -> None:
    """Register result reporters (table, JSON, CSV, Markdown, ...).

    Called once when the plugin manager is built. Each implementation calls
    ``registry.add(name, func)`` where ``func(results, verdicts, stream)`` writes a report to
    a text stream: ``results`` is a list of :class:`moerun.records.PointResult` (one per
    point, its rounds folded), ``verdicts`` the rows of :func:`moerun.analysis.verdicts`.
    ``moerun report`` calls the ``markdown`` reporter with a keyword argument more,
    ``assets_dir``, the folder for its figures.

    :param registry: the :class:`moerun.registry.ReporterRegistry` to add reporters to.
    :return: nothing; return values are ignored.
    """


@hookspec
def moerun_measurement_start(point: dict[str, Any]) -> None:
    """A measurement is about to run.

    Called in the process that runs the measurement (the child process when isolated),
    after the backend is loaded and before warm-up.

    :param point: the measurement point as a dict (model, backend, precision, shapes,
        settings); treat it as read-only.
    :return: nothing; return values are ignored.
    """


@hookspec
def moerun_measurement_finish(point: dict[str, Any], result: dict[str, Any]) -> None:
    """A measurement finished (successfully or not).

    Called in the parent process once per round of a point (``result["round"]`` numbers it),
    when that round's result is final and before it is appended to the results file.
    Implementations may add keys under
    ``result["extra"]``; other keys must not be changed.

    :param point: the measurement point as a dict; read-only.
    :param result: the result dict about to be written.
    :return: nothing; return values are ignored.
    """
