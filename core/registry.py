"""Registries filled by the ``moerun_register_*`` hooks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator

import attrs

from .errors import ConfigError, DuplicateRegistrationError, UnknownBackendError, UnknownModelError
from .spec import TWIN_MATCHES, ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from .backend import Backend


class _Registry:
    kind = "item"

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}
        self._owners: dict[str, str] = {}
        self.current_plugin = "<direct>"

    def _put(self, name: str, item: Any) -> None:
        if not name or not isinstance(name, str):
            raise ConfigError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if name in self._items:
            raise DuplicateRegistrationError(
                f"{self.kind} {name!r} registered twice: by plugin {self._owners[name]!r} "
                f"and by plugin {self.current_plugin!r}"
            )
        self._items[name] = item
        self._owners[name] = self.current_plugin

    def owner(self, name: str) -> str:
        return self._owners[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class BackendRegistry(_Registry):
    kind = "backend"

    def add(self, cls: "type[Backend]") -> None:
        """Register a :class:`moerun.Backend` subclass under its ``name``."""
        from .backend import Backend

        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            raise ConfigError(f"plugin {self.current_plugin!r}: registry.add() takes a Backend subclass, got {cls!r}")
        for alias in (cls.name, *cls.aliases):
            self._put(alias, cls)

    def get(self, name: str) -> "type[Backend]":
        if name not in self._items:
            raise UnknownBackendError(f"unknown backend {name!r}; {self.describe()}")
        return self._items[name]

    def primary_names(self) -> list[str]:
        """Backend names without aliases."""
        return [n for n, cls in self._items.items() if cls.name == n]

    def describe(self) -> str:
        """'available: a, b; unavailable: c (reason)' for error messages."""
        ok, bad = [], []
        for name in self.primary_names():
            av = self._items[name]().availability()
            (ok if av.available else bad).append(name if av.available else f"{name} ({av.reason})")
        parts = [f"available: {', '.join(ok) or 'none'}"]
        if bad:
            parts.append(f"unavailable: {'; '.join(bad)}")
        return "; ".join(parts)


@attrs.frozen(kw_only=True)
class Preset:
    spec: ModelSpec
    description: str = ""
    published_total_params: int | None = None
    published_active_params: int | None = None
    source: str = ""


class ModelRegistry(_Registry):
    kind = "model preset"

    def add(
        self,
        spec: ModelSpec,
        *,
        description: str = "",
        published_total_params: int | None = None,
        published_active_params: int | None = None,
        source: str = "",
    ) -> None:
        """Register a preset; ``published_*`` are the counts its authors published."""
        if not isinstance(spec, ModelSpec):
            raise ConfigError(f"plugin {self.current_plugin!r}: registry.add() takes a ModelSpec, got {spec!r}")
        if ":" in spec.name:
            raise ConfigError(f"preset name {spec.name!r} must not contain ':' (reserved for twins)")
        self._put(
            spec.name,
            Preset(
                spec=spec,
                description=description,
                published_total_params=published_total_params,
                published_active_params=published_active_params,
                source=source,
            ),
        )

    def preset(self, name: str) -> Preset:
        if name not in self._items:
            raise UnknownModelError(f"unknown model preset {name!r}; see 'moerun models'")
        return self._items[name]

    def resolve(self, name: str) -> ModelSpec:
        """A preset name, ``NAME:dense-active`` / ``NAME:dense-total`` for a twin, or
        ``NAME:dense-isomem-P-Q`` for the dense model that holds at precision Q the bytes
        the MoE holds at precision P, ``NAME:dense-fit-CAPMB-P`` for the largest dense model
        whose weights at P fit a memory cap of CAP megabytes (moerun.memcap), ``NAME:split``
        and ``NAME:fixed-route`` for the ablation ladder's split twin and fixed-route MoE."""
        base, sep, twin = name.partition(":")
        spec = self.preset(base).spec
        if not sep:
            return spec
        if twin == "split":
            return spec.split_twin()
        if twin == "fixed-route":
            return spec.fixed_route_twin()
        if twin.startswith("dense-fit-"):
            size, _, precision = twin.removeprefix("dense-fit-").partition("-")
            if size.endswith("MB") and size[:-2].isdigit() and precision:
                return spec.fit_twin(int(size[:-2]) * 10**6, precision)
        if twin.startswith("dense-isomem-"):
            parts = twin.removeprefix("dense-isomem-").split("-")
            if len(parts) == 2 and all(parts):
                return spec.isomem_twin(*parts)
        match = twin.removeprefix("dense-")
        if match not in TWIN_MATCHES or not twin.startswith("dense-"):
            raise UnknownModelError(
                f"unknown twin {twin!r} of {base!r}; use {base}:dense-active, {base}:dense-total, "
                f"{base}:dense-isomem-PRECISION-DENSEPRECISION, {base}:dense-fit-CAPMB-PRECISION, "
                f"{base}:split or {base}:fixed-route"
            )
        return spec.dense_twin(match)


class TrackerRegistry(_Registry):
    kind = "tracker"

    def add(self, name: str, factory: Callable[[], Any]) -> None:
        self._put(name, factory)

    def get(self, name: str) -> Callable[[], Any]:
        if name not in self._items:
            raise ConfigError(f"unknown tracker {name!r}; known: {', '.join(self._items) or 'none'}")
        return self._items[name]


class ReporterRegistry(_Registry):
    kind = "reporter"

    def add(self, name: str, func: Callable[..., None]) -> None:
        self._put(name, func)

    def get(self, name: str) -> Callable[..., None]:
        if name not in self._items:
            raise ConfigError(f"unknown reporter {name!r}; known: {', '.join(self._items) or 'none'}")
        return self._items[name]
