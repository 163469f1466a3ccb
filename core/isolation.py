"""Process isolation: a point in a child process (`python -m moerun.worker`) with a
timeout, so that a segfault, hang or out-of-memory kill becomes that point's `failed` result
and the caller's process is never at risk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .cache import Cache
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

