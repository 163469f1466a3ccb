"""The plugin manager factory and a typed facade over it.

Order: hookspecs, in-tree default plugins, ``MOERUN_PLUGINS`` modules, the ``moerun``
entry-point group, then registration. A plugin that fails to import, fails validation or
raises while registering is recorded in `load_errors` (shown by ``moerun plugins``) and
left out; it never takes the CLI down unless strict mode asks for that.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from typing import Iterable

import attrs
import pluggy

from . import hookspecs
from .errors import DuplicateRegistrationError, PluginLoadError
from .registry import BackendRegistry, ModelRegistry, ReporterRegistry, TrackerRegistry

PROJECT = "moerun"
ENTRY_POINT_GROUP = "moerun"

#: In-tree plugins, registered exactly as a third-party one would be.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "moerun.presets",
    "moerun.backends.torch",
    "moerun.backends.llamacpp",
    "moerun.backends.onnxruntime",
    "moerun.backends.tensorrt",
    "moerun.plugins.reporters",
    "moerun.plugins.trackers",
)


@attrs.frozen(kw_only=True)
class PluginInfo:
    name: str
    source: str  # "default", "env", "entrypoint"
    distribution: str = ""
    version: str = ""
    hooks: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class PluginLoadRecord:
    name: str
    source: str
    error: str


def _blocked_from_env() -> set[str]:
    raw = os.environ.get("MOERUN_DISABLE_PLUGINS", "")
    return {x.strip() for x in raw.split(",") if x.strip()}


class MoerunPlugins:
    """The plugin manager plus the registries its plugins filled."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.backends = BackendRegistry()
        self.models = ModelRegistry()
        self.trackers = TrackerRegistry()
        self.reporters = ReporterRegistry()
        self.plugins: list[PluginInfo] = []
        self.load_errors: list[PluginLoadRecord] = []

    @property
    def hook(self) -> pluggy.HookRelay:
        """The hooks of moerun.hookspecs, called with keyword arguments."""
        return self.pm.hook

    def _register(self, plugin: object, name: str, source: str, dist: str = "", version: str = "") -> None:
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            self.load_errors.append(PluginLoadRecord(name=name, source=source, error=f"{type(exc).__name__}: {exc}"))
            return
        callers = self.pm.get_hookcallers(plugin) or []
        unknown = sorted(c.name for c in callers if c.spec is None)
        if unknown:
            self.pm.unregister(plugin)
            self.load_errors.append(PluginLoadRecord(
                name=name, source=source, error=f"implements unknown hook(s): {', '.join(unknown)}"))
            return
        hooks = tuple(sorted(c.name for c in callers))
        self.plugins.append(PluginInfo(name=name, source=source, distribution=dist, version=version, hooks=hooks))

    def _fill(self) -> None:
        for hookname, registry in (
            ("moerun_register_backends", self.backends),
            ("moerun_register_models", self.models),
            ("moerun_register_trackers", self.trackers),
            ("moerun_register_reporters", self.reporters),
        ):
            caller = getattr(self.pm.hook, hookname)
            for impl in caller.get_hookimpls():  # registration order (pluggy calls LIFO)
                registry.current_plugin = impl.plugin_name
                try:
                    impl.function(registry=registry)
                except DuplicateRegistrationError as exc:  # the first owner keeps the name
                    self.load_errors.append(PluginLoadRecord(name=impl.plugin_name, source="register", error=str(exc)))
                except Exception as exc:  # noqa: BLE001 - one plugin must not break the rest
                    self.load_errors.append(PluginLoadRecord(
                        name=impl.plugin_name, source="register", error=f"{hookname}: {type(exc).__name__}: {exc}"))
            registry.current_plugin = "<direct>"


def get_plugin_manager(
    *, entrypoints: bool = True, blocked: Iterable[str] = (), defaults: Iterable[str] = DEFAULT_PLUGINS,
    strict: bool | None = None,
) -> MoerunPlugins:
    """Build a fresh plugin manager with the registries filled.

    :param entrypoints: load the ``moerun`` entry-point group (tests turn this off).
    :param blocked: plugin names to skip, added to ``MOERUN_DISABLE_PLUGINS``.
    :param defaults: in-tree plugin modules to load first.
    :param strict: raise PluginLoadError on any load error (default: ``MOERUN_STRICT_PLUGINS``).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    plugins = MoerunPlugins(pm)
    blocked = set(blocked) | _blocked_from_env()
    for name in blocked:
        pm.set_blocked(name)

    def load_module(modname: str, source: str) -> None:
        if modname in blocked:
            return
        try:
            module = importlib.import_module(modname)
        except Exception as exc:  # noqa: BLE001
            plugins.load_errors.append(PluginLoadRecord(name=modname, source=source, error=f"{type(exc).__name__}: {exc}"))
            return
        plugins._register(module, modname, source)

    for modname in defaults:
        load_module(modname, "default")
    for modname in filter(None, (x.strip() for x in os.environ.get("MOERUN_PLUGINS", "").split(","))):
        load_module(modname, "env")
    if entrypoints:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in blocked or pm.is_blocked(ep.name) or pm.has_plugin(ep.name):
                continue
            dist = getattr(ep, "dist", None)
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001
                plugins.load_errors.append(PluginLoadRecord(
                    name=ep.name, source="entrypoint", error=f"{type(exc).__name__}: {exc}"))
                continue
            plugins._register(plugin, ep.name, "entrypoint",
                              dist.metadata["Name"] if dist else "", dist.version if dist else "")
    pm.check_pending()
    plugins._fill()
    if strict is None:
        strict = os.environ.get("MOERUN_STRICT_PLUGINS", "") not in ("", "0")
    if strict and plugins.load_errors:
        first = plugins.load_errors[0]
        raise PluginLoadError(f"plugin {first.name!r} ({first.source}) failed to load: {first.error}")
    return plugins
