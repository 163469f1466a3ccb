"""The runner: the one place that reads the clock.

`measure()` runs a `Point` (moerun.point) in this process as a few named phases
(`PointRun`): open (backend, checkpoint, preparation, load), the timed work (`Workload`),
finish (what the timings mean, from moerun.metrics; parity, moerun.parity; the engine's
breakdown, moerun.breakdown). `moerun.isolation.run_isolated` runs the same in a child
process; `moerun.lockstep` drives the timed work of several points in alternation.
"""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import memory
from .backend import LoadSettings
from .breakdown import reconcile as reconcile_breakdown
from .cache import Cache
from .checkpoint import Checkpoint
from .contention import CpuWindow
from .memcap import mark, own_usage
from .errors import BackendUnavailableError, ConfigError, MoerunError, UnsupportedError
from .metrics import bandwidth_now, derive_metrics, model_record, observed_routing, routing_stats
from .parity import PARITY_TOKENS, parity
from .point import Point, batch_token_ids, point_spec, resolve_checkpoint
from .precision import get_precision, nominal
from .predict import fits, point_fit_obstacle
from .results import base_result, now
from .spec import ModelSpec
from .stats import summarize

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins


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
        self.result.setdefault("finished_at", now())

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
        """Everything before the clock, in phases: the backend and device, the engine artifact
        (an engine file, or the checkpoint prepared), the session loaded, the workload ready."""
        backend, device = self._backend()
        t0 = time.perf_counter()
        artifact, spec, precision, ckpt, t1 = self._artifact(backend)
        capped = bool(self.point.memory_cap)
        if capped:  # the engine file's pages were dropped by the parent: this load reads storage
            mark("load")
            before_load = {**memory.paging_counters(), "charged_bytes": own_usage(),
                           "anon_bytes": memory.status().get("anon_bytes")}
        t2 = time.perf_counter()
        self.session = session = self._load(backend, artifact, spec, device, ckpt)
        t3 = time.perf_counter()
        point, result = self.point, self.result
        result["artifact"] = {"path": str(artifact.path), "size_bytes": artifact.size_bytes, **artifact.meta}
        result["phases_s"] = {"checkpoint": t1 - t0, "prepare": t2 - t1, "load": t3 - t2}
        result["session"] = session.describe()
        self.spec, self.precision, self.ckpt = spec, precision, ckpt
        self.plugins.hook.moerun_measurement_start(point=point.to_dict())
        seqs = batch_token_ids(spec.vocab_size, point.prompt_tokens + point.new_tokens, point.seed, point.batch_size,
                               point.routing)
        self.workload = Workload(session, [q[: point.prompt_tokens] for q in seqs],
                                 [q[point.prompt_tokens:] for q in seqs])
        if capped:
            self.artifact_path = artifact.path
            self.paging = _cold_start(self.workload, artifact.path, before_load, t3 - t2)
        # the timed phase starts here: trackers, the memory high-water mark, other processes' CPU
        self.trackers = _start_trackers(self.plugins)
        self.timed_memory, self.window = memory.Phase(), CpuWindow()

    def prepared_files(self) -> list[str]:
        """The checkpoint and engine file ready in the cache, nothing loaded (a capped point's
        preparation outside its cap): the files the engine will read."""
        backend, _ = self._backend()
        artifact, *_ = self._artifact(backend)
        return [str(artifact.path)]

    def _backend(self) -> tuple[Any, str]:
        """The point's backend, available here, and the device it runs on."""
        point, result = self.point, self.result
        backend_cls = self.plugins.backends.get(point.backend)
        backend_cls.check_options(point.options)
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
        return backend, device

    def _artifact(self, backend: Any) -> tuple[Any, ModelSpec, str, Checkpoint | None, float]:
        """What the engine loads: an engine file as it is (its own spec and precision), or the
        point's checkpoint prepared at its precision. Returns (artifact, spec, precision, the
        checkpoint or None for an engine file, the clock when preparation began)."""
        point, plugins, result = self.point, self.plugins, self.result
        model_path = Path(point.model)
        if model_path.is_file() and model_path.suffix in backend.capabilities.artifact_suffixes:
            artifact = backend.prepare_file(model_path)
            spec, precision = artifact.spec, artifact.precision
            if point.precision and point.precision != precision:
                raise UnsupportedError(f"{model_path.name} is {precision}; its precision cannot be changed")
            result["precision"] = precision
            result["model"] = model_record(spec, nominal(precision))
            result["model_name"] = spec.name
            started, ckpt = time.perf_counter(), None
        else:
            precision = point.precision or backend.capabilities.default_precision
            get_precision(precision)
            result["precision"] = precision
            obstacle = point_fit_obstacle(point, point_spec(point, plugins), precision)
            if obstacle:
                raise UnsupportedError(obstacle)
            ckpt = resolve_checkpoint(point, plugins, self.cache)
            spec = ckpt.spec
            result["model"] = model_record(spec, precision)
            result["model_name"] = spec.name
            backend.check(spec, precision)
            started = time.perf_counter()
            artifact = backend.prepare(ckpt, precision, self.cache)
        result["memory"] = {"prepare_peak_bytes": memory.status()["hwm_bytes"]}
        return artifact, spec, precision, ckpt, started

    def _load(self, backend: Any, artifact: Any, spec: ModelSpec, device: str, ckpt: Checkpoint | None) -> Any:
        """The session, loaded with room for the workload (and the parity workload on the same
        session); the memory the load took is recorded."""
        point, result = self.point, self.result
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
        settings = LoadSettings(
            threads=point.threads, device=device, compile=point.compile,
            max_context=max(context, sum(PARITY_TOKENS)) if point.parity else context,
            batch_size=B, options=dict(point.options), shared_cpu=self.shared_cpu,
        )
        if ckpt is not None:
            ckpt.release()
        memory.release_free()  # what preparation left behind is not the engine's
        load_phase = memory.Phase()
        session = backend.load(artifact, settings)
        loaded = load_phase.close()
        result["memory"].update(_memory_after_load(load_phase.start, loaded, memory.status()))
        return session

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
        # inside a memory cap, nothing that is not the workload may be charged to it: no second
        # context to observe routing, no bandwidth probe's buffers (the uncapped point has both)
        capped = bool(point.memory_cap)
        routing, coverage = (None, None) if capped else observed_routing(session, spec, point, prompts, follows)
        result["metrics"] = derive_metrics(spec, nominal(self.precision), point, timings,
                                           bandwidth_now(result, self.cache, probe=not capped), session, coverage)
        if counts is not None:
            result["metrics"]["expert_counts"] = np.asarray(counts).tolist()
            result["metrics"].update(routing_stats(np.asarray(counts)))
        if coverage is not None:
            result["metrics"]["expert_coverage"] = coverage
        if routing is not None:
            result["routing"] = routing
        result["fits"] = {"peak_bytes": timed["peak_bytes"], "basis": "peak RSS of the timed phase",
                          "devices": fits(timed["peak_bytes"])}
        result["memory"].update(
            peak_rss_bytes=timed["peak_bytes"],
            engine_peak_bytes=timed["peak_bytes"] - result["memory"]["rss_before_load_bytes"],
            timed_end_anon_bytes=timed.get("end_anon_bytes"), timed_end_file_bytes=timed.get("end_file_bytes"),
            timed_peak_method=timed["method"],
        )
        if point.memory_cap:
            result["paging"] = _paging_record(self.paging, self.workload, self.artifact_path, result, spec,
                                              nominal(self.precision), point)
        if point.parity:
            result["parity"] = parity(session, spec, self.ckpt, self.plugins, self.cache, point)
        if point.breakdown:
            result["breakdown"] = (reconcile_breakdown(session, prompts[0], follows[0], timings) if point.batch_size == 1 else
                                   {"available": False, "reason": "the breakdown instruments one sequence (batch 1)"})
        if point.count_ops:
            result["ops"] = decode_ops(session, prompts[0])
        result["status"] = "ok"


def decode_ops(session: Any, prompt: list[int]) -> dict[str, Any]:
    """`Session.decode_ops` as a record: the count, or why there is none (never fails a point)."""
    try:
        ops = session.decode_ops(prompt)
    except Exception as exc:  # noqa: BLE001 - an instrument's failure is reported, the timing stands
        return {"available": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    if ops is None:
        return {"available": False, "reason": "this engine does not count its operations"}
    return {"available": True, **ops}


def _cold_start(work: "Workload", artifact: Path, before_load: dict[str, int], load_s: float) -> dict[str, Any]:
    """A capped point's cold start: its engine file read from storage by the load and the
    first prefill (the time to first token from a cold page cache), before any warm-up."""
    loaded = memory.paging_counters()
    resident_after_load = memory.resident(artifact)
    base = {k: before_load.pop(k) for k in ("charged_bytes", "anon_bytes")}
    mark("prefill")
    first = work.prefill() / 1e9  # before count_paging: not one of the timed prefills
    work.count_paging()
    return {"cold": {"load_s": load_s, "first_prefill_s": first, "ttft_s": load_s + first,
                     "load": memory.counters_delta(before_load, loaded),
                     "first_prefill": memory.counters_delta(loaded, memory.paging_counters())},
            "resident_after_load": resident_after_load, "before_load": base}


def _paging_record(cold: dict[str, Any], work: "Workload", artifact: Path, result: dict[str, Any], spec: ModelSpec,
                   precision: str, point: Point) -> dict[str, Any]:
    """What paging cost a capped point: the cold start, storage bytes read and major faults
    per token of the timed prefill and decode, the engine file's resident share after load
    and after the timed work, the memory the engine holds that cannot page (anonymous), and
    the prediction (moerun.predict.paged_reads) from the bytes left to the page cache."""
    from .predict import paged_reads

    out: dict[str, Any] = dict(cold)
    for phase, tally in (work.paging or {}).items():
        n = tally["tokens"] or 1
        out[phase] = {**tally, "read_bytes_per_token": tally["read_bytes"] / n,
                      "major_faults_per_token": tally["major_faults"] / n,
                      "minor_faults_per_token": tally.get("minor_faults", 0) / n}
    out["resident_after_timed"] = memory.resident(artifact)
    size = (out["resident_after_timed"] or {}).get("bytes") or result["artifact"]["size_bytes"]
    out["artifact_bytes"] = size
    mem = result["memory"]
    anon = mem.get("after_load_anon_bytes")
    out["held_anon_bytes"] = anon  # what cannot page: engine buffers, the KV cache, copied weights, the harness
    base = cold.get("before_load") or {}
    if anon is not None:
        # the room the page cache has for weights: the cap less what the harness had charged
        # before the load (its memory, its libraries' pages) and what the load added that cannot page
        taken = (base.get("charged_bytes") or base.get("anon_bytes") or 0) + max(0, anon - (base.get("anon_bytes") or 0))
        out["page_cache_room_bytes"] = max(0, point.memory_cap - taken)
        out["predicted"] = paged_reads(spec, precision, file_bytes=size, room_bytes=out["page_cache_room_bytes"],
                                       routing=point.routing, batch=point.batch_size)
        decoded = out.get("decode", {}).get("read_bytes_per_token")
        predicted = out["predicted"]["read_bytes_per_token"]
        if decoded is not None and predicted:
            out["read_amplification"] = decoded / predicted
    return out


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
        self.paging: dict[str, dict[str, int]] | None = None  # see count_paging
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

    def count_paging(self) -> None:
        """From now on (a capped point, after its cold start): storage reads and page faults of
        every timed prefill and decode, per phase (read outside the clock), and the phase
        named for an out-of-memory kill (memcap.mark)."""
        self.paging = {ph: {"tokens": 0, "read_bytes": 0, "major_faults": 0, "minor_faults": 0}
                       for ph in ("prefill", "decode")}

    def _count(self, phase: str, before: dict[str, int] | None, tokens: int) -> dict[str, int] | None:
        """Paging counters: None -> the counters now (a phase starts); counters -> the phase's
        deltas added to its tally, over `tokens` tokens."""
        if self.paging is None:
            return None
        now = memory.paging_counters()
        if before is None:
            mark(phase)
            return now
        tally = self.paging[phase]
        tally["tokens"] += tokens
        for k, v in memory.counters_delta(before, now).items():
            tally[k] = tally.get(k, 0) + v
        return None

    def prefill(self) -> int:
        """One timed prefill of the prompt on an empty cache, in ns."""
        s, clock = self.session, time.perf_counter_ns
        s.reset()
        s.synchronize()
        counted = self._count("prefill", None, 0)
        t = clock()
        self.run_prefill(self.prompt)
        s.synchronize()
        took = clock() - t
        if counted is not None:
            self._count("prefill", counted, self.B * self.n_prompt)
        return took

    def decode(self, prefilled: bool = False, steps: int | None = None) -> list[int]:
        """The decode steps after the prompt (all, or the first `steps`), each timed, in ns
        (the prompt is prefilled first, untimed, unless `prefilled`)."""
        s, clock = self.session, time.perf_counter_ns
        if not prefilled:
            s.reset()
            self.run_prefill(self.prompt)
            s.synchronize()
        counted = self._count("decode", None, 0)
        out = []
        for tok in self.steps[:steps]:
            t = clock()
            self.run_decode(tok)
            s.synchronize()
            out.append(clock() - t)
        if counted is not None:
            self._count("decode", counted, self.B * len(out))
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

