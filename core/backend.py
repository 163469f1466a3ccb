"""The backend contract: Backend (prepare, load) and Session (prefill, decode).

Token ids in, logits out: benchmarks need no tokenizer. These are plain method calls,
never pluggy hook calls. Engine libraries are imported lazily inside the methods.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import attrs

from .errors import ConfigError, UnsupportedError
from .precision import get_precision
from .spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .cache import Cache
    from .checkpoint import Checkpoint


@attrs.frozen(kw_only=True)
class Availability:
    """Whether a backend can run here, and if not why and how to fix it."""

    available: bool
    reason: str = ""
    install_hint: str = ""
    version: str = ""
    devices: tuple[str, ...] = ()  # the devices usable here (a subset of Capabilities.devices)
    # why a device the backend knows is not usable here, and how to get it: {"cuda": "...; rebuild ..."}
    device_notes: dict[str, str] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class Capabilities:
    """What a backend supports, as data (never ``if name == ...``)."""

    precisions: tuple[str, ...]
    default_precision: str
    supports_moe: bool = True
    families: tuple[str, ...] | None = None  # None: every family moerun knows
    devices: tuple[str, ...] = ("cpu",)
    routing_stats: bool = False  # Session.expert_counts() returns data
    artifact_suffixes: tuple[str, ...] = ()  # engine files `prepare_file` accepts (".gguf")
    in_default_study: bool = True  # False: runs only when named with --backend (examples)
    # the most sequences one Session decodes together (Session.prefill_batch/decode_batch);
    # None: no fixed limit (memory permitting)
    max_batch: int | None = 1

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen(kw_only=True)
class Option:
    """One backend option (`-O NAME=VALUE`, a study file's `options`), declared as data on the
    backend (`Backend.options`): what it means, the kinds of value it takes (values are read
    as JSON, so `-O repack=true` is a bool) and, where it is a choice, the choices. The core
    checks every point's options against these before anything is prepared."""

    help: str
    kinds: tuple[type, ...] = (object,)
    choices: tuple[Any, ...] = ()

    def check(self, backend: str, name: str, value: Any) -> None:
        if self.choices and not any(value == c and type(value) is type(c) for c in self.choices):
            raise ConfigError(f"backend {backend}: option {name} must be one of "
                              f"{', '.join(map(_show, self.choices))}, got {_show(value)}")
        if not isinstance(value, self.kinds) or (isinstance(value, bool) and bool not in self.kinds
                                                 and object not in self.kinds):
            kinds = " or ".join(k.__name__ for k in self.kinds)
            raise ConfigError(f"backend {backend}: option {name} takes {kinds}, got {_show(value)}")


def _show(value: Any) -> str:
    return "true" if value is True else "false" if value is False else repr(value)


def check_step(rows: Sequence[Sequence[int]], *, vocab: int, cached: int, max_context: int,
               max_batch: int | None = None) -> int:
    """The input check of one prefill or decode step, the same for every backend: `rows` are
    the step's B sequences (one for prefill and decode), each at least one id, all of one
    length, B within what the session was loaded for, every id a token of the vocabulary,
    and the context not overrun. Returns the step's length; a bad step is a ConfigError."""
    if len(rows) == 1 and len(rows[0]) == 1:  # a decode step: the common case, kept to ~0.2 us
        tok = rows[0][0]
        if 0 <= tok < vocab and cached < max_context:
            return 1
    n = len(rows[0]) if rows else 0
    if not n or any(len(r) != n for r in rows):
        raise ConfigError("a step needs at least one token id per sequence (the same count for every sequence)")
    if max_batch is not None and len(rows) > max_batch:
        raise ConfigError(f"{len(rows)} sequences: the session was loaded for batch size {max_batch}")
    lo, hi = min(map(min, rows)), max(map(max, rows))
    if lo < 0 or hi >= vocab:
        raise ConfigError(f"token ids must be in [0, {vocab}), got {lo}..{hi}")
    if cached + n > max_context:
        raise ConfigError(f"context full: {cached} cached + {n} new tokens > {max_context}")
    return n


@attrs.frozen(kw_only=True)
class LoadSettings:
    """How to load an artifact: threads, device, and backend-specific options."""

    threads: int | None = None
    device: str = "cpu"
    max_context: int = 4096
    compile: bool = False
    batch_size: int = 1  # sequences decoded together: the KV cache is sized for all of them
    options: dict[str, Any] = attrs.field(factory=dict, hash=False)
    # lockstep (moerun.lockstep): other engines run between this session's timed units, so a
    # backend whose thread pool keeps spinning after a call should let it park once the call
    # returns (ONNX Runtime: session.force_spinning_stop); within a call nothing changes
    shared_cpu: bool = False


@attrs.frozen(kw_only=True, eq=False)
class Artifact:
    """What `Backend.prepare` built: a file or folder the engine loads, and facts about it."""

    backend: str
    precision: str
    spec: ModelSpec
    path: Path
    size_bytes: int
    meta: dict[str, Any] = attrs.field(factory=dict)


class Session(abc.ABC):
    """A loaded model with its KV cache. Logits are float32 numpy arrays."""

    @abc.abstractmethod
    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> "np.ndarray":
        """Append `token_ids` to the cache; return logits [len(token_ids), vocab] if
        `all_logits`, else the last position's logits as [1, vocab]."""

    @abc.abstractmethod
    def decode(self, token_id: int) -> "np.ndarray":
        """Append one token; return its logits [vocab]."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Empty the KV cache of every sequence (positions restart at 0)."""

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> "np.ndarray":
        """Prefill B prompts of equal length as sequences 0..B-1 in one step; return each
        sequence's last-position logits, [B, vocab]. B is at most the `batch_size` the
        session was loaded with. Backends that batch override this and `decode_batch`; the
        default runs B = 1 through `prefill`."""
        if len(prompts) != 1:
            raise UnsupportedError(f"{type(self).__name__} decodes one sequence at a time")
        return self.prefill(prompts[0])

    def decode_batch(self, token_ids: Sequence[int]) -> "np.ndarray":
        """Append one token to each of the B sequences in one step; return [B, vocab]."""
        if len(token_ids) != 1:
            raise UnsupportedError(f"{type(self).__name__} decodes one sequence at a time")
        return self.decode(token_ids[0])[None]

    def synchronize(self) -> None:
        """Wait for queued device work; the runner calls it before reading the clock."""

    def close(self) -> None:
        """Release engine resources. Idempotent."""

    def expert_counts(self) -> "np.ndarray | None":
        """Tokens routed to each expert since the last reset, [layers, experts] (all
        sequences together); None if the backend does not expose routing."""
        return None

    def observe_routing(self, prompt: "Sequence[int]", follow: "Sequence[int]") -> "np.ndarray | None":
        """Prefill `prompt` and decode `follow` as one sequence, untimed, and return the
        experts each token chose in each MoE layer, [len(prompt) + len(follow), MoE layers,
        k] in token order (the order within a row does not matter); None where the engine
        does not expose its choices. Leaves the cache reset."""
        return None

    def breakdown(self, prompt: "Sequence[int]", follow: "Sequence[int]") -> dict[str, Any] | None:
        """Time the prefill of `prompt` and the decode of `follow` under the engine's own
        instrument; None if the backend has none. Returns ``{"prefill": {category: s},
        "decode": {category: s per token}, "prefill_wall_s": s, "decode_wall_s": s per token}``
        (wall: the instrumented step) with categories from :data:`moerun.breakdown.CATEGORIES`,
        optionally ``"prefill_plain_s"`` / ``"decode_plain_s"`` (the un-instrumented step timed
        at the same moments: the reconciliation's reference), ``"instrument"`` (one line) and
        ``"detail"``. :func:`moerun.breakdown.cut_timing` does the timing for engines that can
        stop a step at a cut point. Leaves the cache reset."""
        return None

    def decode_ops(self, prompt: "Sequence[int]") -> dict[str, Any] | None:
        """The operations one decode step executes after `prompt` (the engine's graph nodes or
        kernels: what it dispatches one by one), counted on an untimed step, as {"ops": n,
        "unit": what was counted, "by_op": {kind: n}}; None where the engine cannot count
        them. Leaves the cache reset. The ablation ladder divides time by these
        (moerun.ladder: the dispatch cost per operation)."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts about how the engine runs this model (kernels, threads, options), stored
        with the result. A ``kernel_path`` entry (a short string, e.g. ``"int8 u8u8"``) names
        the arithmetic that ran where it depends on the machine; parity records carry it."""
        return {}

    def engine_timings(self) -> dict[str, Any] | None:
        """The engine's own perf counters for the calls since the last reset(), if it has any;
        the runner reads them after every repetition."""
        return None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(abc.ABC):
    """An inference engine. Subclasses set `name`, `capabilities` and `install_hint`."""

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]
    install_hint: ClassVar[str] = ""
    # the options `load` understands, as data; the core checks a point's options against
    # them (`check_options`) before anything is prepared
    options: ClassVar[dict[str, Option]] = {}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """A one-line ConfigError for an option this backend does not declare, or a value of
        the wrong kind; called by the core, so `load` receives only declared options."""
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            known = ", ".join(sorted(cls.options)) or "none"
            raise ConfigError(f"backend {cls.name}: unknown option(s) {', '.join(unknown)}; known: {known}")
        for name, value in options.items():
            cls.options[name].check(cls.name, name, value)

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Is the engine importable and a device present? Never raises."""

    def check(self, spec: ModelSpec, precision: str) -> None:
        """Raise UnsupportedError if this backend cannot run `spec` at `precision`."""
        get_precision(precision)  # unknown names are a ConfigError, not "unsupported"
        caps = self.capabilities
        if precision not in caps.precisions:
            raise UnsupportedError(
                f"backend {self.name} does not support precision {precision!r} "
                f"(supported: {', '.join(caps.precisions)})"
            )
        if spec.is_moe and not caps.supports_moe:
            raise UnsupportedError(f"backend {self.name} does not support MoE models")
        if caps.families is not None and spec.family not in caps.families:
            raise UnsupportedError(
                f"backend {self.name} does not support family {spec.family!r} "
                f"(supported: {', '.join(caps.families)})"
            )

    def emulated(self, precision: str, device: str | None = None) -> str | None:
        """Why `precision` would run by emulation on `device` of this machine (e.g. bf16 on a
        CPU without bf16 instructions), or None where it runs natively or nobody knows. The
        study then picks no twin at that precision: its speed would measure the missing
        instructions, not the model."""
        return None

    @abc.abstractmethod
    def prepare(self, checkpoint: "Checkpoint", precision: str, cache: "Cache") -> Artifact:
        """Convert a checkpoint into what the engine loads (cached by content hash)."""

    def prepare_file(self, path: Path) -> Artifact:
        """An existing engine file (one of `capabilities.artifact_suffixes`) as an artifact,
        its spec read from the file. Backends without such files do not override this."""
        raise UnsupportedError(f"backend {self.name} cannot load {path.name} directly")

    @abc.abstractmethod
    def load(self, artifact: Artifact, settings: LoadSettings) -> Session:
        """Load an artifact into a ready Session."""
