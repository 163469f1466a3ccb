"""Process isolation: a point in a child process (`python -m moerun.worker`) with a
timeout, so that a segfault, hang or out-of-memory kill becomes that point's `failed` result
and the caller's process is never at risk.

A point with a memory cap (`Point.memory_cap`, moerun.memcap) is prepared first in an
uncapped worker (checkpoint and engine file: preparation is not what the cap is about),
its engine file's pages are dropped from the page cache (so the capped worker reads it from
storage and is charged for it), and its worker starts inside a memory cgroup of the cap. An
out-of-memory kill inside the cap is a result: the point is `unsupported`, "does not fit
under 3.0 GB: killed in decode"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .cache import Cache
from .memcap import PHASE_FILE, Cap, CapUnavailable, cap_label, last_phase, make_cap
from .memory import evict
from .point import Point
from .results import base_result, now

_SIGNAL_HINTS = {
    signal.SIGSEGV: "segmentation fault",
    signal.SIGKILL: "killed (the out-of-memory killer, or a kill from outside)",
    signal.SIGABRT: "aborted",
    signal.SIGBUS: "bus error",
    signal.SIGILL: "illegal instruction (a binary built for another CPU?)",
    signal.SIGFPE: "floating-point exception",
}


class Worker:
    """One worker process for `point` in `folder` (its job, result and stderr files), plain
    or inside its memory cap. `extra` follows the job and result paths on the command line
    (`--serve` and its pipes for a lockstep side). Where the point ends before any worker
    starts (no cap can be made here, preparation failed), `proc` is None and `result()`
    says why."""

    def __init__(self, point: Point, cache: Cache, env: dict[str, Any] | None, folder: Path,
                 python: str | None = None, mode: Sequence[str] = (), extra: Sequence[str] = (),
                 pass_fds: Sequence[int] = ()) -> None:
        self.point, self.env, self.folder = point, env, folder
        self.job, self.out, self.errlog = folder / "job.json", folder / "result.json", folder / "stderr.txt"
        self.phase_file = folder / "phase"
        self.job.write_text(json.dumps({"point": point.to_dict(), "cache": str(cache.root), "env": env or {}}))
        self.python = python or sys.executable
        self.cap: Cap | None = None
        self.prepared: dict[str, Any] = {}
        self.evicted: dict[str, int] = {}
        self.early: dict[str, Any] | None = None
        self.proc: subprocess.Popen | None = None
        child_env = None
        if point.memory_cap:
            self.early = self._ready_for_cap(cache)
            if self.early is not None:
                return
            child_env = {**os.environ, PHASE_FILE: str(self.phase_file)}
        argv = [self.python, "-m", "moerun.worker", *mode, str(self.job), str(self.out), *extra]
        with open(self.errlog, "wb") as err:
            self.proc = subprocess.Popen(
                self.cap.command(argv) if self.cap else argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True, pass_fds=tuple(pass_fds), env=child_env,
                preexec_fn=self.cap.preexec() if self.cap else None)

    def _ready_for_cap(self, cache: Cache) -> dict[str, Any] | None:
        """Prepare uncapped, drop the engine file's pages, make the cgroup; a result where
        the point ends here (preparation failed; no cap can be made: unsupported)."""
        prep = self.folder / "prepared.json"
        with open(self.errlog, "wb") as err:
            proc = subprocess.Popen([self.python, "-m", "moerun.worker", "--prepare", str(self.job), str(prep)],
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=self.point.timeout_s)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                return child_result(self.point, self.env, proc, prep, self.errlog,
                                    f"preparing outside the cap timed out after {self.point.timeout_s:g} s; killed")
            except BaseException:
                kill_group(proc)
                raise
        prepared = child_result(self.point, self.env, proc, prep, self.errlog)
        if prepared.get("status") != "prepared":
            return prepared
        self.prepared = prepared
        try:
            self.cap = make_cap(self.point.memory_cap)
        except CapUnavailable as exc:
            result = base_result(self.point, self.env)
            result.update(status="unsupported", error=str(exc), finished_at=now())
            return result
        self.evicted = {str(p): evict(p) for p in prepared["files"]}  # read from storage, charged to the cap
        return None

    def wait(self) -> str | None:
        """Wait for a plain worker with the point's timeout: None, or why it was killed."""
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=self.point.timeout_s)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            return f"timed out after {self.point.timeout_s:g} s (hung or too slow); killed"
        except BaseException:  # Ctrl-C: take the child down with us
            kill_group(self.proc)
            raise
        return None

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)

    def result(self, reason: str | None = None) -> dict[str, Any]:
        """The worker's result (child_result), with its cap's figures; an out-of-memory kill
        inside the cap is the point not fitting (`unsupported`), not a failure. The cgroup is
        removed."""
        if self.proc is None:
            return self.early or child_result(self.point, self.env, None, self.out, self.errlog, reason)
        result = child_result(self.point, self.env, self.proc, self.out, self.errlog, reason)
        if self.cap is None:
            return result
        for k in ("precision", "model", "model_name", "artifact", "backend", "backend_version", "device"):
            if result.get(k) is None and self.prepared.get(k) is not None:  # killed before its own record
                result[k] = self.prepared[k]
        stats = self.cap.stats()  # a systemd scope is gone with its process: none
        self.cap.remove()
        phase = last_phase(self.phase_file)
        oom = stats.get("oom_kills") if self.cap.path else self.proc.poll() == -signal.SIGKILL
        killed = bool(oom) and result.get("status") == "failed"
        result["cap"] = {**self.cap.describe, **stats, "evicted_bytes": sum(self.evicted.values()),
                                "outcome": "killed" if killed else "ran", "last_phase": phase}
        if killed:
            result["status"] = "unsupported"
            result["error"] = (f"does not fit under {cap_label(self.cap.limit)}: killed by the out-of-memory "
                               f"killer in {phase or 'start-up'}")
            result.pop("traceback", None)
        return result


def run_isolated(point: Point, *, cache: Cache | None = None, env: dict[str, Any] | None = None,
                 python: str | None = None) -> dict[str, Any]:
    """Run `point` in a child process (`python -m moerun.worker`) with `point.timeout_s`,
    inside its memory cap where it has one (`Worker`).

    A segfault, hang or kill becomes a `failed` result with the reason and the tail of the
    child's stderr; the caller's process is never at risk.
    """
    cache = cache or Cache()
    with tempfile.TemporaryDirectory(prefix="moerun-point-") as tmp:
        worker = Worker(point, cache, env, Path(tmp), python)
        return worker.result(worker.wait())


def child_result(point: Point, env: dict[str, Any] | None, proc: subprocess.Popen | None, out: Path, errlog: Path,
                 reason: str | None = None) -> dict[str, Any]:
    """A worker's result file, or, where it left none (crash, kill, timeout: `reason`), a
    `failed` result saying why, with the tail of its stderr."""
    if reason is None and out.exists():
        return json.loads(out.read_text())
    result = base_result(point, env)
    if reason is None and proc is not None:
        rc = proc.poll()
        if rc is not None and rc < 0:
            sig = signal.Signals(-rc)
            reason = f"crashed: {_SIGNAL_HINTS.get(sig, 'signal')} ({sig.name})"
        else:
            reason = f"worker exited with code {rc} without a result"
    tail = _tail(errlog)
    result["error"] = reason + (f"; stderr: {tail}" if tail else "")
    result["finished_at"] = now()
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

