"""A `Point`: one self-contained, serialisable measurement (a model on a backend at a
precision with a workload shape), the token ids every backend runs for it, and what a point
resolves to before anything is measured (its spec, its checkpoint).

Everything above it (studies, protocols, executors, the runner) passes points; this module
imports nothing of theirs."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs
import numpy as np

from . import defaults
from .cache import Cache
from .checkpoint import Checkpoint, synthetic_checkpoint
from .convert import structure, unstructure
from .errors import ConfigError
from .routing import Routing, stream_ids
from .spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be >= 1, got {value}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be >= 0, got {value}")


HARDWARE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _routing(value: str) -> str:
    """One spelling per routing (zipf:1.0 and zipf:1 are one point); a one-line ConfigError
    for a bad one."""
    return str(Routing.parse(value))


def _memory_cap(value: Any) -> int | None:
    """A cap in bytes (`3GB`, `2.5GiB`, a device profile: moerun.memcap.parse_cap), or None."""
    if value is None:
        return None
    from .memcap import parse_cap

    return parse_cap(value)


def _hardware_label(instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not HARDWARE_LABEL.fullmatch(value):
        raise ConfigError(f"hardware label {value!r}: use letters, digits, '.', '_' and '-' (at most 63), "
                          f"e.g. jetson-orin-nano-8gb")


@attrs.frozen(kw_only=True)
class Point:
    """One measurement: a model on a backend at a precision with a workload shape."""

    model: str
    backend: str
    precision: str | None = None  # None: the backend's default
    prompt_tokens: int = attrs.field(default=defaults.PROMPT_TOKENS, validator=_positive)
    new_tokens: int = attrs.field(default=defaults.NEW_TOKENS, validator=_non_negative)
    batch_size: int = attrs.field(default=defaults.BATCH_SIZE, validator=_positive)  # sequences decoded in lock step
    repetitions: int = attrs.field(default=defaults.REPETITIONS, validator=_positive)
    warmup: int = attrs.field(default=defaults.WARMUP, validator=_non_negative)
    seed: int = defaults.SEED
    threads: int | None = None
    device: str | None = None  # None: cpu where the backend runs there, else its first device
    compile: bool = False
    router_skew: float = defaults.ROUTER_SKEW
    # which experts the tokens choose (moerun.routing): planted in the weights and token ids
    routing: str = attrs.field(default=defaults.ROUTING, converter=_routing)
    observe_routing: bool = True  # record the engine's expert choices (untimed; a point's first round)
    count_ops: bool = False  # count the operations a decode step executes (untimed; the ablation ladder)
    breakdown: bool = False  # also run the engine's own per-op instrument (separate from timing)
    parity: bool = False  # also compare logits with the PyTorch fp32 reference
    checkpoint_dtype: str = defaults.CHECKPOINT_DTYPE
    role: str = ""  # "moe", "dense-active", "dense-total", "split", "fixed-route", ... "" (table grouping only)
    group: str = ""  # the MoE model a twin belongs to
    timeout_s: float = defaults.TIMEOUT_S
    memory_limit_mb: int | None = None  # address-space limit of the isolated child (RLIMIT_AS)
    # the memory the worker may use, page cache included, in bytes (a cgroup: moerun.memcap);
    # None: uncapped. Capped, weights stream from storage once they no longer fit.
    memory_cap: int | None = attrs.field(default=None, converter=_memory_cap)
    # the fleet label of the machine that measures (the ray executor places points by it)
    hardware: str | None = attrs.field(default=None, validator=_hardware_label)
    # a `moerun predict` device profile: a point whose weights and KV cache exceed its usable
    # memory is `unsupported` before anything is prepared (--fit)
    fit: str | None = None
    options: dict[str, Any] = attrs.field(factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return unstructure(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Point":
        return structure(data, cls, where="point")

    @property
    def key(self) -> str:
        """Identity for resume: everything that changes what is measured."""
        d = self.to_dict()
        for k in ("timeout_s", "role", "group", "memory_limit_mb", "fit", "observe_routing", "count_ops"):
            d.pop(k)
        if d.get("hardware") is None:  # keys of points measured before fleets existed stay the same
            d.pop("hardware", None)
        if d.get("batch_size") == 1:  # likewise before batches
            d.pop("batch_size", None)
        if d.get("routing") == "random":  # likewise before routing models
            d.pop("routing", None)
        if d.get("memory_cap") is None:  # likewise before memory caps
            d.pop("memory_cap", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def token_ids(vocab_size: int, count: int, seed: int) -> list[int]:
    """The workload's token ids: the same for every backend given (vocab, count, seed)."""
    rng = np.random.default_rng([seed, 0x6D6F65])
    return rng.integers(0, vocab_size, size=count).tolist()


def batch_token_ids(vocab_size: int, count: int, seed: int, batch: int,
                    routing: str = defaults.ROUTING) -> list[list[int]]:
    """One id sequence per batch member: sequence 0 is `token_ids` (so batch 1 is today's
    workload), the others seeded apart so that their routing differs. Under a planted
    routing each sequence walks one of the vocabulary's token streams instead
    (`moerun.routing.stream_ids`: the ids whose planted experts follow the routing's process)."""
    if Routing.parse(routing).planted:
        return stream_ids(vocab_size, seed, count, batch)
    out = [token_ids(vocab_size, count, seed)]
    for b in range(1, batch):
        rng = np.random.default_rng([seed, 0x6D6F65, b])
        out.append(rng.integers(0, vocab_size, size=count).tolist())
    return out


def point_spec(point: Point, plugins: "MoerunPlugins") -> ModelSpec:
    """The spec a point measures, without writing its checkpoint (a folder: its config; a
    path that does not exist: a one-line error, not an unknown preset)."""
    path = Path(point.model)
    if path.is_dir():
        return Checkpoint.open(path).spec
    if (path.suffix in (".json", ".safetensors") or os.sep in point.model) and not path.exists():
        raise ConfigError(f"model path {point.model} does not exist")
    return plugins.models.resolve(point.model)


def resolve_checkpoint(point: Point, plugins: "MoerunPlugins", cache: Cache,
                       progress: Callable[[int, int], None] | None = None) -> Checkpoint:
    """A preset / twin name -> its synthetic checkpoint (written into `cache` if missing,
    `progress(bytes done, bytes in all)` while it is); a folder -> that checkpoint."""
    path = Path(point.model)
    if path.is_dir():
        return Checkpoint.open(path)
    return synthetic_checkpoint(point_spec(point, plugins), cache, seed=point.seed, dtype=point.checkpoint_dtype,
                                router_skew=point.router_skew, routing=point.routing, progress=progress)


