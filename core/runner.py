"""The runner: the one place that reads the clock.

A `Point` is a self-contained, serialisable description of one measurement. `measure()`
runs it in this process; `run_isolated()` runs it in a child process with a timeout so a
crash, hang or out-of-memory kill becomes that point's `failed` result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import attrs
import numpy as np

from .backend import LoadSettings
from . import memory
from .cache import Cache
from .checkpoint import Checkpoint, synthetic_checkpoint
from .contention import CpuWindow
from .convert import structure, unstructure
from .errors import BackendUnavailableError, ConfigError, MoerunError, UnsupportedError
from .precision import get_precision
from .predict import fit_obstacle, fits
from .results import SCHEMA_VERSION
from .spec import ModelSpec
from .stats import summarize

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be >= 1, got {value}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{attribute.name.replace('_', '-')} must be >= 0, got {value}")


HARDWARE_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


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
    prompt_tokens: int = attrs.field(default=64, validator=_positive)
    new_tokens: int = attrs.field(default=32, validator=_non_negative)
    batch_size: int = attrs.field(default=1, validator=_positive)  # sequences decoded in lock step
    repetitions: int = attrs.field(default=5, validator=_positive)
    warmup: int = attrs.field(default=1, validator=_non_negative)
    seed: int = 0
    threads: int | None = None
    device: str | None = None  # None: cpu where the backend runs there, else its first device
    compile: bool = False
    router_skew: float = 0.0
    breakdown: bool = False  # also run the engine's own per-op instrument (separate from timing)
    parity: bool = False  # also compare logits with the PyTorch fp32 reference
    checkpoint_dtype: str = "float32"
    role: str = ""  # "moe", "dense-active", "dense-total", "" (table grouping only)
    group: str = ""  # the MoE model a twin belongs to
    timeout_s: float = 600.0
    memory_limit_mb: int | None = None  # address-space limit of the isolated child (RLIMIT_AS)
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
        for k in ("timeout_s", "role", "group", "memory_limit_mb", "fit"):
            d.pop(k)
        if d.get("hardware") is None:  # keys of points measured before fleets existed stay the same
            d.pop("hardware", None)
        if d.get("batch_size") == 1:  # likewise before batches
            d.pop("batch_size", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def teacher_forced_logits(session: Any, ids: Sequence[int], n_prompt: int) -> np.ndarray:
    """Logits of every position of `ids`: a prefill of the first `n_prompt` ids with all
    logits, then one decode call per remaining id (the parity workload), [len(ids), vocab]."""
    session.reset()
    first = session.prefill(ids[:n_prompt], all_logits=True)
    rest = [session.decode(t) for t in ids[n_prompt:]]
    return np.concatenate([first, np.stack(rest)]) if rest else first


def _nominal(precision: str) -> str:
    """The precision whose nominal bits predict bytes per token (an unknown file type: f16)."""
    from .precision import PRECISIONS

    return precision if precision in PRECISIONS else "f16"


def token_ids(vocab_size: int, count: int, seed: int) -> list[int]:
    """The workload's token ids: the same for every backend given (vocab, count, seed)."""
    rng = np.random.default_rng([seed, 0x6D6F65])
    return rng.integers(0, vocab_size, size=count).tolist()


def batch_token_ids(vocab_size: int, count: int, seed: int, batch: int) -> list[list[int]]:
    """One id sequence per batch member: sequence 0 is `token_ids` (so batch 1 is today's
    workload), the others seeded apart so that their routing differs."""
    out = [token_ids(vocab_size, count, seed)]
    for b in range(1, batch):
        rng = np.random.default_rng([seed, 0x6D6F65, b])
        out.append(rng.integers(0, vocab_size, size=count).tolist())
    return out


def point_spec(point: Point, plugins: "MoerunPlugins") -> ModelSpec:
    """The spec a point measures, without writing its checkpoint (a folder: its config)."""
    path = Path(point.model)
    if path.is_dir():
        return Checkpoint.open(path).spec
    return plugins.models.resolve(point.model)


def point_fit_obstacle(point: Point, spec: ModelSpec, precision: str) -> str | None:
    """Why `point` (at `precision`) cannot fit its `--fit` device, or None (no device named,
    or it fits): its weights at nominal bits and every sequence's KV cache."""
    if not point.fit:
        return None
    return fit_obstacle(spec, _nominal(precision), point.fit, batch=point.batch_size,
                        context=point.prompt_tokens + point.new_tokens)


def resolve_checkpoint(point: Point, plugins: "MoerunPlugins", cache: Cache) -> Checkpoint:
    """A preset / twin name -> its synthetic checkpoint; a folder -> that checkpoint."""
    path = Path(point.model)
    if path.is_dir():
        return Checkpoint.open(path)
    if path.suffix in (".json", ".safetensors") or os.sep in point.model:
        if not path.exists():
            raise ConfigError(f"model path {point.model} does not exist")
    spec = plugins.models.resolve(point.model)
    return synthetic_checkpoint(
        spec, cache, seed=point.seed, dtype=point.checkpoint_dtype, router_skew=point.router_skew
    )


def model_record(spec: ModelSpec, precision: str) -> dict[str, Any]:
    return {
        "spec": spec.to_dict(),
        "is_moe": spec.is_moe,
        "total_params": spec.total_params,
        "active_params": spec.active_params,
        "weight_bytes_per_token": spec.weight_bytes_per_token(precision),
        "flops_per_token": spec.flops_per_token(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _memory_after_load(before: dict[str, int], load: dict[str, Any], after: dict[str, int]) -> dict[str, Any]:
    """The engine's memory once loaded: current RSS (anonymous and file-backed apart), what
    loading added to the harness's own RSS, and the peak while loading."""
    out: dict[str, Any] = {
        "rss_before_load_bytes": before.get("rss_bytes", before["hwm_bytes"]),
        "rss_after_load_bytes": after.get("rss_bytes", after["hwm_bytes"]),
        "load_peak_bytes": load["peak_bytes"],
    }
    out["engine_rss_bytes"] = out["rss_after_load_bytes"] - out["rss_before_load_bytes"]
    for kind in ("anon_bytes", "file_bytes"):
        if kind in after:
            out[f"after_load_{kind}"] = after[kind]
    return out


def base_result(point: Point, env: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "key": point.key,
        "point": point.to_dict(),
        "backend": point.backend,
        "model_name": point.model,
        "role": point.role,
        "group": point.group,
        "precision": point.precision,
        "hardware": point.hardware,
        "status": "failed",
        "error": None,
        "env": env or {},
        "started_at": _now(),
    }


def measure(point: Point, plugins: "MoerunPlugins", cache: Cache | None = None,
            env: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `point` in this process and return its result dict (never raises MoerunError:
    unsupported/unavailable/failed are statuses): open, the timed repetitions, finish."""
    run = PointRun(point, plugins, cache, env)
    with run:
        if run.guarded(run.open):
            run.guarded(lambda: run.finish(run.workload.time(point.repetitions, point.warmup)))
    return run.result


class PointRun:
    """One point in phases, so that the sequential runner (`measure`) and the lockstep worker
    (`moerun.worker --serve`) share everything but the timed work itself:

    - `open()`: backend, checkpoint, preparation, load; `workload` is then ready;
    - the timed work: `workload.time(...)` here, or units on a lockstep worker's command;
    - `finish(timings, contention)`: metrics, memory, parity, breakdown, the status.

    Every phase runs through `guarded`, which turns an error into the point's status. Used as
    a context manager it closes the session and stamps `finished_at`."""

    def __init__(self, point: Point, plugins: "MoerunPlugins", cache: Cache | None = None,
                 env: dict[str, Any] | None = None, shared_cpu: bool = False) -> None:
        self.point, self.plugins, self.cache = point, plugins, cache or Cache()
        self.shared_cpu = shared_cpu  # LoadSettings.shared_cpu: a lockstep worker
        self.result = base_result(point, env)
        self.session: Any = None
        self.workload: "Workload | None" = None
        self.ok = True

    def __enter__(self) -> "PointRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.session is not None:
            try:
                self.session.close()
            except Exception:  # noqa: BLE001 - closing must not mask the result
                pass
            self.session = None
        self.result.setdefault("finished_at", _now())

    def guarded(self, phase: Any) -> bool:
        """Run `phase()`; an error becomes the point's status and error. True if it ran."""
        point, result = self.point, self.result
        try:
            phase()
            return True
        except UnsupportedError as exc:
            result["status"], result["error"] = "unsupported", str(exc)
        except BackendUnavailableError as exc:
            result["status"], result["error"] = "unavailable", str(exc)
        except MoerunError as exc:
            result["status"], result["error"] = "failed", str(exc)
        except MemoryError:
            limit = f" (memory limit {point.memory_limit_mb} MB)" if point.memory_limit_mb else ""
            result["status"], result["error"] = "failed", f"out of memory{limit}"
        except Exception as exc:  # an engine's own error: recorded, the study goes on
            result["status"] = "failed"
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc(limit=8)
        self.ok = False
        return False

    def open(self) -> None:
        """Backend, checkpoint, engine artifact and session: everything before the clock."""
        point, plugins, cache, result = self.point, self.plugins, self.cache, self.result
        backend_cls = plugins.backends.get(point.backend)
        backend = backend_cls()
        av = backend.availability()
        result["backend"] = backend.name
        result["backend_version"] = av.version
        if not av.available:
            raise BackendUnavailableError(f"backend {backend.name} unavailable: {av.reason}. {av.install_hint}".strip())
        devices = backend.capabilities.devices
        device = point.device or ("cpu" if "cpu" in devices else devices[0])
        result["device"] = device
        if device.split(":")[0] not in devices:
            raise UnsupportedError(f"backend {backend.name} does not run on {device} (devices: {', '.join(devices)})")
        if av.devices and device.split(":")[0] not in av.devices:
            note = av.device_notes.get(device.split(":")[0])
            raise UnsupportedError(f"no {device} device here for backend {backend.name} "
                                   f"(present: {', '.join(av.devices)})" + (f": {note}" if note else ""))
        model_path = Path(point.model)
        ckpt: Checkpoint | None = None  # None when the model is an engine file
        t0 = time.perf_counter()
        if model_path.is_file() and model_path.suffix in backend.capabilities.artifact_suffixes:
            # an engine file (e.g. a GGUF): its own spec and precision
            artifact = backend.prepare_file(model_path)
            spec, precision = artifact.spec, artifact.precision
            if point.precision and point.precision != precision:
                raise UnsupportedError(f"{model_path.name} is {precision}; its precision cannot be changed")
            result["precision"] = precision
            result["model"] = model_record(spec, _nominal(precision))
            result["model_name"] = spec.name
            t1 = t2 = time.perf_counter()
        else:
            precision = point.precision or backend.capabilities.default_precision
            get_precision(precision)
            result["precision"] = precision
            obstacle = point_fit_obstacle(point, point_spec(point, plugins), precision)
            if obstacle:
                raise UnsupportedError(obstacle)
            ckpt = resolve_checkpoint(point, plugins, cache)
            spec = ckpt.spec
            result["model"] = model_record(spec, precision)
            result["model_name"] = spec.name
            backend.check(spec, precision)
            t1 = time.perf_counter()
            artifact = backend.prepare(ckpt, precision, cache)
            t2 = time.perf_counter()
        result["memory"] = {"prepare_peak_bytes": memory.status()["hwm_bytes"]}
        context = point.prompt_tokens + point.new_tokens
        if context > spec.max_position_embeddings:
            raise ConfigError(
                f"prompt-tokens + new-tokens = {context} exceeds the model's "
                f"max_position_embeddings ({spec.max_position_embeddings})"
            )
        B = point.batch_size
        limit = backend.capabilities.max_batch
        if limit is not None and B > limit:
            raise UnsupportedError(f"backend {backend.name} decodes at most {limit} sequence"
                                   f"{'s' if limit > 1 else ''} together (batch size {B} asked)")
        settings = LoadSettings(  # the parity workload runs on the same session: room for it too
            threads=point.threads, device=device, compile=point.compile,
            max_context=max(context, sum(PARITY_TOKENS)) if point.parity else context,
            batch_size=B, options=dict(point.options), shared_cpu=self.shared_cpu,
        )
        if ckpt is not None:
            ckpt.release()
        memory.release_free()  # what preparation left behind is not the engine's
        load_phase = memory.Phase()
        self.session = session = backend.load(artifact, settings)
        t3 = time.perf_counter()
        loaded = load_phase.close()
        after_load = memory.status()
        result["memory"].update(_memory_after_load(load_phase.start, loaded, after_load))
        result["artifact"] = {"path": str(artifact.path), "size_bytes": artifact.size_bytes, **artifact.meta}
        result["phases_s"] = {"checkpoint": t1 - t0, "prepare": t2 - t1, "load": t3 - t2}
        result["session"] = session.describe()
        self.spec, self.precision, self.ckpt = spec, precision, ckpt
        plugins.hook.moerun_measurement_start(point=point.to_dict())
        seqs = batch_token_ids(spec.vocab_size, context, point.seed, B)
        self.workload = Workload(session, [q[: point.prompt_tokens] for q in seqs],
                                 [q[point.prompt_tokens:] for q in seqs])
        # the timed phase starts here: trackers, the memory high-water mark, other processes' CPU
        self.trackers = _start_trackers(plugins)
        self.timed_memory, self.window = memory.Phase(), CpuWindow()

    def pause_trackers(self) -> None:
        """Between a lockstep worker's units: trackers with `pause()` stop counting."""
        for tracker in self.trackers.values():
            if not isinstance(tracker, Exception) and hasattr(tracker, "pause"):
                tracker.pause()

    def resume_trackers(self) -> None:
        for tracker in self.trackers.values():
            if not isinstance(tracker, Exception) and hasattr(tracker, "resume"):
                tracker.resume()

    def finish(self, timings: dict[str, Any], contention: dict[str, Any] | None = None) -> None:
        """After the timed work: what other processes did meanwhile (`contention`, else this
        run's own window), trackers, metrics, memory, parity and breakdown; status ok."""
        point, result, session, spec = self.point, self.result, self.session, self.spec
        window = self.window.close()
        result["contention"] = {"timed": contention or window}
        timed = self.timed_memory.close()
        result["trackers"] = _stop_trackers(self.trackers)
        if self.shared_cpu:  # a lockstep worker: say what each tracker's figures cover
            for name, tracker in self.trackers.items():
                if isinstance(result["trackers"].get(name), dict) and result["trackers"][name].get("available"):
                    result["trackers"][name]["covers"] = (
                        "this side's timed units" if hasattr(tracker, "pause") else
                        "the whole lockstep, other sides' units included (the tracker has no pause())")
        result["timings"] = timings
        prompts, follows = self.workload.prompts, self.workload.follows
        counts = session.expert_counts()
        coverage = expert_coverage(session, spec, prompts, follows)
        result["metrics"] = derive_metrics(spec, _nominal(self.precision), point, timings,
                                           _bandwidth_now(result, self.cache), session, coverage)
        if counts is not None:
            result["metrics"]["expert_counts"] = np.asarray(counts).tolist()
            result["metrics"].update(routing_stats(np.asarray(counts)))
        if coverage is not None:
            result["metrics"]["expert_coverage"] = coverage
        result["fits"] = {"peak_bytes": timed["peak_bytes"], "basis": "peak RSS of the timed phase",
                          "devices": fits(timed["peak_bytes"])}
        result["memory"].update(
            peak_rss_bytes=timed["peak_bytes"],
            engine_peak_bytes=timed["peak_bytes"] - result["memory"]["rss_before_load_bytes"],
            timed_end_anon_bytes=timed.get("end_anon_bytes"), timed_end_file_bytes=timed.get("end_file_bytes"),
            timed_peak_method=timed["method"],
        )
        if point.parity:
            result["parity"] = _parity(session, spec, self.ckpt, self.plugins, self.cache, point)
        if point.breakdown:
            result["breakdown"] = (_breakdown(session, prompts[0], follows[0], timings) if point.batch_size == 1 else
                                   {"available": False, "reason": "the breakdown instruments one sequence (batch 1)"})
        result["status"] = "ok"


def _start_trackers(plugins: "MoerunPlugins") -> dict[str, Any]:
    """Instantiate and start every registered tracker; one that fails is reported, not fatal."""
    started: dict[str, Any] = {}
    for name in plugins.trackers:
        try:
            tracker = plugins.trackers.get(name)()
            tracker.start()
            started[name] = tracker
        except Exception as exc:  # noqa: BLE001
            started[name] = exc
    return started


def _stop_trackers(started: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, tracker in started.items():
        if isinstance(tracker, Exception):
            out[name] = {"available": False, "reason": f"start failed: {type(tracker).__name__}: {tracker}"}
            continue
        try:
            out[name] = tracker.stop()
        except Exception as exc:  # noqa: BLE001
            out[name] = {"available": False, "reason": f"stop failed: {type(exc).__name__}: {exc}"}
    return out


class Workload:
    """The timed work of one point on an open session: the prompts and the predetermined ids
    every backend decodes (not the argmax, so every backend and precision runs exactly the
    same token sequence whatever its numerics). With B > 1 sequences the B prompts prefill in
    one step and the B sequences decode in lock step (Session.prefill_batch / decode_batch).
    Every timed call is bracketed by `synchronize()`."""

    def __init__(self, session: Any, prompts: list[list[int]], follows: list[list[int]]) -> None:
        self.session, self.prompts, self.follows = session, prompts, follows
        self.B, self.n_prompt, self.n_new = len(prompts), len(prompts[0]), len(follows[0])
        if self.B > 1:
            self.prompt: Any = prompts
            self.steps: list[Any] = [list(step) for step in zip(*follows)]
            self.run_prefill, self.run_decode = session.prefill_batch, session.decode_batch
        else:
            self.prompt, self.steps = prompts[0], follows[0]
            self.run_prefill, self.run_decode = session.prefill, session.decode

    def warm(self) -> int:
        """The whole workload once, untimed in effect (ns returned for the record): the first
        timed repetition must not be the one that warms."""
        s, clock = self.session, time.perf_counter_ns
        s.reset()
        s.synchronize()
        t = clock()
        self.run_prefill(self.prompt)
        for tok in self.steps:
            self.run_decode(tok)
        s.synchronize()
        return clock() - t

    def prefill(self) -> int:
        """One timed prefill of the prompt on an empty cache, in ns."""
        s, clock = self.session, time.perf_counter_ns
        s.reset()
        s.synchronize()
        t = clock()
        self.run_prefill(self.prompt)
        s.synchronize()
        return clock() - t

    def decode(self, prefilled: bool = False, steps: int | None = None) -> list[int]:
        """The decode steps after the prompt (all, or the first `steps`), each timed, in ns
        (the prompt is prefilled first, untimed, unless `prefilled`)."""
        s, clock = self.session, time.perf_counter_ns
        if not prefilled:
            s.reset()
            self.run_prefill(self.prompt)
            s.synchronize()
        out = []
        for tok in self.steps[:steps]:
            t = clock()
            self.run_decode(tok)
            s.synchronize()
            out.append(clock() - t)
        return out

    def time(self, reps: int, warmup: int) -> dict[str, Any]:
        """Warm-up (excluded, reported), then `reps` x (timed prefill, per-step timed decode)."""
        warm_ns = [self.warm() for _ in range(warmup)]
        prefill_ns, decode_reps, engine_reps = [], [], []
        for _ in range(reps):
            prefill_ns.append(self.prefill())
            decode_reps.append(self.decode(prefilled=True))
            engine = self.session.engine_timings()  # the engine's own counters for this repetition
            if engine:
                engine_reps.append({**engine, "moerun_prefill_ms": prefill_ns[-1] / 1e6,
                                    "moerun_decode_ms": sum(decode_reps[-1]) / 1e6})
        return self.timings(prefill_ns, decode_reps, warm_ns, engine_reps)

    def timings(self, prefill_ns: list[int], decode_reps: list[list[int]], warm_ns: Sequence[int] = (),
                engine_reps: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """The timings record from timed prefills and decode repetitions (per-step ns). Rates
        are aggregate tokens/s over the batch; ``decode_seq_tok_s`` is one sequence's."""
        B, n_prompt, n_new = self.B, self.n_prompt, self.n_new
        out: dict[str, Any] = {
            "batch_size": B,
            "warmup_s": [w / 1e9 for w in warm_ns],
            "prefill_ms": summarize([x / 1e6 for x in prefill_ns]),
            "prefill_tok_s": summarize([B * n_prompt / (x / 1e9) for x in prefill_ns]),
            "prefill_tok_s_reps": [B * n_prompt / (x / 1e9) for x in prefill_ns],
            "ttft_ms": float(np.median(prefill_ns) / 1e6),
        }
        if engine_reps:
            out["engine_per_rep"] = list(engine_reps)
        if n_new and decode_reps:  # a repetition's steps: all n_new, or a lockstep unit's first few
            rates = [B * len(r) / (sum(r) / 1e9) for r in decode_reps]
            out["decode_token_ms"] = summarize([x / 1e6 for r in decode_reps for x in r])  # one step, all sequences
            out["decode_tok_s"] = summarize(rates)
            out["decode_tok_s_reps"] = rates
            if B > 1:
                out["decode_seq_tok_s"] = summarize([x / B for x in rates])
        return out


def expert_coverage(session: Any, spec: ModelSpec, prompts: list[list[int]],
                    follows: list[list[int]]) -> dict[str, Any] | None:
    """Distinct experts each decode step touches per layer (the union over the batch's
    sequences), from the engine's own routing counters in an untimed pass after the timed
    repetitions; beside it the uniform-routing expectation E·(1 − (1 − k/E)^B). None for
    dense models and backends that do not expose routing."""
    if not spec.is_moe or not follows[0] or session.expert_counts() is None:
        return None
    B = len(prompts)
    session.reset()
    session.prefill_batch(prompts)  # at B = 1 the base Session runs prefill / decode
    before = np.asarray(session.expert_counts())
    per_step = []
    for step in zip(*follows):
        session.decode_batch(list(step))
        now = np.asarray(session.expert_counts())
        per_step.append(((now - before) > 0).sum(axis=1))  # [layers]
        before = now
    session.reset()
    touched = np.stack(per_step).astype(float)  # [steps, layers]
    return {"batch_size": B, "experts_per_step_mean": float(touched.mean()),
            "experts_per_step_min": int(touched.min()), "experts_per_step_max": int(touched.max()),
            "per_layer_mean": touched.mean(axis=0).tolist(), "steps": len(per_step),
            "uniform_expectation": spec.experts_touched(B), "num_experts": spec.num_experts,
            "top_k": spec.top_k, "source": "the engine's routing counters (untimed pass)"}


PARITY_TOKENS = (12, 4)  # prefill 12 ids with all logits, then decode 4
REFERENCE_MAX_BYTES = 4 << 30  # the fp32 reference's floor: it must fit beside the engine under test
REFERENCE_SHARE = 0.5  # at most this share of the memory available when the reference would load


def reference_budget() -> int:
    """Bytes the fp32 reference may take: half of what the machine has available right now
    (the engine under test is already loaded), never less than REFERENCE_MAX_BYTES."""
    from .environment import meminfo_bytes

    avail = meminfo_bytes("MemAvailable")
    return max(REFERENCE_MAX_BYTES, int(avail * REFERENCE_SHARE)) if avail else REFERENCE_MAX_BYTES


def _parity(session: Any, spec: ModelSpec, ckpt: Checkpoint | None, plugins: "MoerunPlugins", cache: Cache,
            point: Point) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement against the PyTorch fp32 reference on the
    same checkpoint and ids; the reference logits are cached by checkpoint content."""
    if ckpt is None:
        return {"available": False, "reason": "an engine file has no checkpoint to compute the reference from"}
    budget = reference_budget()
    if spec.total_params * 4 > budget:
        return {"available": False, "reason": f"the fp32 reference of {spec.total_params / 1e9:.1f} B parameters "
                                              f"needs {spec.total_params * 4 / 2**30:.1f} GiB; "
                                              f"{budget / 2**30:.1f} GiB may be used here"}
    n_prompt, n_new = PARITY_TOKENS
    ids = token_ids(spec.vocab_size, n_prompt + n_new, point.seed + 1)
    ref_path = cache.root / "reference" / f"{ckpt.content_hash()}-{n_prompt}-{n_new}-{point.seed + 1}.npy"
    if ref_path.exists():
        ref = np.load(ref_path)
    else:
        try:
            torch_backend = plugins.backends.get("torch")()
        except MoerunError as exc:
            return {"available": False, "reason": f"no reference backend: {exc}"}
        if not torch_backend.availability().available:
            return {"available": False, "reason": "torch is not installed: no reference"}
        ref_session = torch_backend.load(torch_backend.prepare(ckpt, "fp32", cache),
                                         LoadSettings(max_context=n_prompt + n_new))
        try:
            ref = teacher_forced_logits(ref_session, ids, n_prompt)
        finally:
            ref_session.close()
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref_path.with_suffix(f".{os.getpid()}.npy")
        np.save(tmp, ref)
        os.replace(tmp, ref_path)
    got = teacher_forced_logits(session, ids, n_prompt)
    session.reset()
    out = {"available": True, "max_abs_diff": float(np.abs(got - ref).max()),
           "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()), "positions": len(ids)}
    kernel = session.describe().get("kernel_path")  # which arithmetic ran, where the engine says
    if kernel:
        out["kernel_path"] = kernel
    return out


def _breakdown(session: Any, prompt: list[int], follow: list[int], timings: dict[str, Any]) -> dict[str, Any]:
    """The engine's own per-category times, after (never during) the timed repetitions.
    The category sum is reconciled with the un-instrumented step timed at the same moments
    by the instrument's run where the backend provides it (these machines are shared and
    drift), else with this run's timed medians; both references are kept."""
    from .breakdown import summarize

    raw = session.breakdown(prompt, follow[: max(1, min(len(follow), 16))])
    if raw is None:
        return {"available": False, "reason": "this backend exposes no per-op instrument"}
    out: dict[str, Any] = {"available": True, "instrument": raw.get("instrument", "")}
    timed = {"prefill": timings["prefill_ms"]["median"] / 1e3}
    if follow and raw.get("decode"):
        timed["decode"] = timings["decode_token_ms"]["median"] / 1e3
    for phase, timed_s in timed.items():
        same_moment = raw.get(f"{phase}_plain_s")
        d = summarize(raw[phase], raw[f"{phase}_wall_s"], same_moment or timed_s)
        d["plain_reference"] = "interleaved with the instrumented steps" if same_moment else "timed repetitions"
        d["timed_plain_s"] = timed_s
        d["sum_over_timed"] = d["sum_s"] / timed_s if timed_s else None
        out[phase] = d
    if raw.get("detail"):
        out["detail"] = raw["detail"]
    return out


def _bandwidth_now(result: dict[str, Any], cache: Cache) -> dict[str, Any]:
    """The environment MBU divides by: the study's probe, raised to the machine's read bandwidth
    measured right after this point's timed phase when that is higher (a shared machine's
    bandwidth moves over minutes; the ceiling must hold for this point). Recorded as
    `bandwidth_after_timed`; a fixed figure (MOERUN_BANDWIDTH_GBPS) is left alone."""
    env = result["env"]
    if not env.get("bandwidth_bytes_s") or not env.get("bandwidth_kernel"):
        return env
    from .environment import quick_probe

    now = quick_probe(cache.root)
    result["bandwidth_after_timed"] = {"bytes_s": now["bandwidth_bytes_s"], "kernel": now["kernel"]}
    return {**env, "bandwidth_bytes_s": max(env["bandwidth_bytes_s"], now["bandwidth_bytes_s"]),
            "bandwidth_now_bytes_s": now["bandwidth_bytes_s"]}


def derive_metrics(spec: ModelSpec, precision: str, point: Point, timings: dict[str, Any],
                   env: dict[str, Any], session: Any, coverage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bandwidth and MBU: bytes actually read per decode step x steps/s. A step of B
    sequences reads the dense weights once, per layer the union of the experts the
    sequences chose (measured where the engine exposes routing, else the uniform-routing
    expectation) and B sequences' KV cache; per decoded token that is a B-th of it."""
    m: dict[str, Any] = {
        "prefill_tok_s": timings["prefill_tok_s"]["median"],
        "weight_bytes_per_token": spec.weight_bytes_per_token(precision),
    }
    peak = env.get("peak_flops")
    if peak:  # MoE-CAP's S-MFU: FLOPs of the active parameters only
        m["s_mfu_prefill"] = m["prefill_tok_s"] * spec.flops_per_token(point.prompt_tokens // 2) / peak
    if "decode_tok_s" not in timings:
        return m
    tok_s = timings["decode_tok_s"]["median"]
    B = point.batch_size
    mean_context = point.prompt_tokens + (point.new_tokens - 1) / 2
    kv = spec.kv_bytes_per_token(mean_context, getattr(session, "kv_bytes_per_value", 2.0))
    touched = coverage["experts_per_step_mean"] if coverage else None
    step_weights = spec.weight_bytes_per_step(precision, B, touched)
    bytes_per_token = step_weights / B + kv
    m.update(
        decode_tok_s=tok_s,
        kv_bytes_per_token=kv,
        bytes_per_token=bytes_per_token,
        achieved_bandwidth_bytes_s=bytes_per_token * tok_s,
        decode_flops_s=spec.flops_per_token(int(mean_context)) * tok_s,
    )
    if B > 1:
        m.update(batch_size=B, decode_seq_tok_s=timings["decode_seq_tok_s"]["median"],
                 weight_bytes_per_step=step_weights,
                 experts_touched_per_step=touched if touched is not None else spec.experts_touched(B),
                 experts_touched_source="measured" if touched is not None else "uniform-routing expectation")
    bw = env.get("bandwidth_bytes_s")
    if bw:
        # S-MBU (MoE-CAP): bytes the token actually reads (active experts, their union over a
        # batch); 'mbu_dense' counts every weight as a dense model would, which overstates an
        # MoE's bandwidth use
        m["mbu"] = bytes_per_token * tok_s / bw
        m["mbu_reference_bytes_s"] = bw
        if m["mbu"] > 1.0:  # the probe is no ceiling for this engine: say so, never print MBU > 100 %
            m["mbu_exceeds_probe"] = True
        dense_bytes = spec.total_params * get_precision(precision).bits_per_weight / 8 / B + kv
        m["mbu_dense"] = dense_bytes * tok_s / bw
    if env.get("bandwidth_now_bytes_s"):
        # against the bandwidth of the same minutes alone: the ceiling above is the highest
        # figure the machine showed within the probe's lifetime, and a shared machine's moves
        # 2x within the hour (measured here: 42-48 GB/s, 86, then 39-43)
        m["mbu_now"] = bytes_per_token * tok_s / env["bandwidth_now_bytes_s"]
    if peak:
        m["s_mfu"] = m["decode_flops_s"] / peak
    return m


def routing_stats(counts: np.ndarray) -> dict[str, Any]:
    """Load imbalance over experts: max/mean tokens per expert, averaged over layers."""
    if counts.ndim != 2 or counts.sum() == 0:
        return {}
    per_layer = counts.max(axis=1) / np.maximum(counts.mean(axis=1), 1e-12)
    share = counts.sum(axis=0) / counts.sum()
    return {"load_imbalance": float(per_layer.mean()), "expert_share": share.tolist()}


# ------------------------------------------------------------------ isolation
_SIGNAL_HINTS = {
    signal.SIGSEGV: "segmentation fault",
    signal.SIGKILL: "killed (the out-of-memory killer, or a kill from outside)",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
    signal.SIGILL: "illegal instruction (a binary built for another CPU?)",
    signal.SIGFPE: "floating-point exception",
}


def run_isolated(point: Point, *, cache: Cache | None = None, env: dict[str, Any] | None = None,
                 python: str | None = None) -> dict[str, Any]:
    """Run `point` in a child process (`python -m moerun.worker`) with `point.timeout_s`.

    A segfault, hang or kill becomes a `failed` result with the reason and the tail of the
    child's stderr; the caller's process is never at risk.
    """
    cache = cache or Cache()
    with tempfile.TemporaryDirectory(prefix="moerun-point-") as tmp:
        job = Path(tmp) / "job.json"
        out = Path(tmp) / "result.json"
        errlog = Path(tmp) / "stderr.txt"
        job.write_text(json.dumps({"point": point.to_dict(), "cache": str(cache.root), "env": env or {}}))
        with open(errlog, "wb") as err:
            proc = subprocess.Popen(
                [python or sys.executable, "-m", "moerun.worker", str(job), str(out)],
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True,
            )
            reason = None
            try:
                proc.wait(timeout=point.timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                reason = f"timed out after {point.timeout_s:g} s (hung or too slow); killed"
            except BaseException:  # Ctrl-C: take the child down with us
                kill_group(proc)
                raise
        return child_result(point, env, proc, out, errlog, reason)


def child_result(point: Point, env: dict[str, Any] | None, proc: subprocess.Popen, out: Path, errlog: Path,
                 reason: str | None = None) -> dict[str, Any]:
    """A worker's result file, or, where it left none (crash, kill, timeout: `reason`), a
    `failed` result saying why, with the tail of its stderr."""
    if reason is None and out.exists():
        return json.loads(out.read_text())
    result = base_result(point, env)
    if reason is None:
        rc = proc.poll()
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc)
            reason = f"crashed: {_SIGNAL_HINTS.get(sig, 'signal')} ({sig.name})"
        else:
            reason = f"worker exited with code {rc} without a result"
    tail = _tail(errlog)
    result["error"] = reason + (f"; stderr: {tail}" if tail else "")
    result["finished_at"] = _now()
    return result


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: Path, limit: int = 600) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-4:])[-limit:]
