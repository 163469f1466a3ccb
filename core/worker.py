"""Child-process entry points.

``python -m moerun.worker JOB.json RESULT.json`` runs one measurement point and writes its
result; the parent treats a missing result file (crash, kill) or a timeout as the point's
failure.

``python -m moerun.worker --prepare JOB.json OUT.json`` prepares a capped point outside its
cap (moerun.isolation.Worker).

``python -m moerun.worker --serve JOB.json RESULT.json CMD_FD REPLY_FD`` is one side of a
lockstep comparison (`moerun.lockstep`): it opens the point (checkpoint, preparation, load),
says ``ready``, then runs timed units on command, one JSON line each way, blocked on its
command pipe in between (no work, no clock), until ``finish`` writes the result.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the study process dies (even by SIGKILL), so a killed study
    leaves no orphaned measurement behind (the child runs in its own session)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _limit_memory(megabytes: int | None) -> None:
    if megabytes:
        import resource

        limit = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _write(out_path: Path, result: dict) -> None:
    from .results import dumps

    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(dumps(result))
    os.replace(tmp, out_path)


def serve(job: dict, out_path: Path, cmd_fd: int, reply_fd: int) -> int:
    """One lockstep side: commands ``warm``, ``calibrate``, ``unit`` (phase, reps) and
    ``finish``; each reply is one JSON line. Any failure ends the side with its result
    written (status and error), as a plain worker's would be."""
    from .cache import Cache
    from .contention import CpuTally
    from .manager import get_plugin_manager
    from .point import Point
    from .runner import PointRun

    commands = os.fdopen(cmd_fd, "r")
    replies = os.fdopen(reply_fd, "w", buffering=1)

    def reply(**msg: object) -> None:
        replies.write(json.dumps(msg) + "\n")
        replies.flush()

    point = Point.from_dict(job["point"])
    run = PointRun(point, get_plugin_manager(), Cache(job["cache"]), job.get("env") or {}, shared_cpu=True)
    with run:
        if not run.guarded(run.open):
            run.close()
            _write(out_path, {**run.result, "isolated": True})
            reply(event="ready", ok=False, error=run.result.get("error"))
            return 0
        work = run.workload
        run.pause_trackers()  # they count this side's timed units only
        reply(event="ready", ok=True)
        warm_ns: list[int] = []
        prefill_ns: list[int] = []
        decode_reps: list[list[int]] = []
        tally = CpuTally()
        prefilled = [False]  # the cache holds the prompt from the last prefill unit: decode goes on from it
        for line in commands:
            cmd = json.loads(line)
            kind = cmd["cmd"]
            out: dict = {}

            def phase() -> None:
                if kind == "warm":
                    warm_ns.extend(work.warm() for _ in range(max(1, point.warmup)))
                elif kind == "calibrate":
                    prefilled[0] = False
                    # medians, so that one hiccup does not size every unit (pyperf calibrates likewise)
                    out.update(prefill_ns=statistics.median(work.prefill() for _ in range(3)),
                               step_ns=statistics.median(work.decode()) if work.n_new else 0)
                elif kind == "unit":
                    reps, tokens = int(cmd["reps"]), 0
                    run.resume_trackers()
                    tally.start()
                    if cmd["phase"] == "prefill":
                        unit = [work.prefill() for _ in range(reps)]
                        prefill_ns.extend(unit)
                        total, tokens = sum(unit), work.B * work.n_prompt * reps
                        prefilled[0] = True
                    else:
                        total, count, first = 0, 0, int(cmd.get("steps") or work.n_new)
                        for _ in range(reps):  # each pass after a prefill: the prefill unit's, else untimed
                            steps = work.decode(prefilled=prefilled[0], steps=first)
                            prefilled[0] = False
                            decode_reps.append(steps)
                            total += sum(steps)
                            count += len(steps)
                        tokens = work.B * count
                    tally.stop()
                    run.pause_trackers()
                    out.update(ns=total, tok_s=tokens / (total / 1e9))
                elif kind == "finish":
                    timings = work.timings(prefill_ns, decode_reps, warm_ns)
                    run.finish(timings, tally.close())
                else:
                    raise ValueError(f"unknown lockstep command {kind!r}")

            if not run.guarded(phase) or kind == "finish":
                run.close()
                _write(out_path, {**run.result, "isolated": True})
                reply(event="done", ok=run.ok, error=run.result.get("error"))
                return 0
            reply(event=kind, ok=True, **out)
    return 0  # the parent closed the pipe: abandoned, no result


def prepare(job: dict, out_path: Path) -> int:
    """A capped point's preparation, outside its cap: checkpoint and engine file into the
    cache, nothing loaded. Writes status ``prepared`` and the files the engine will read
    (which the parent drops from the page cache), or the point's result where it ends here."""
    from .cache import Cache
    from .manager import get_plugin_manager
    from .point import Point
    from .runner import PointRun

    point = Point.from_dict(job["point"])
    run = PointRun(point, get_plugin_manager(), Cache(job["cache"]), job.get("env") or {})
    files: list[str] = []

    def stage() -> None:
        files.extend(run.prepared_files())

    with run:
        ok = run.guarded(stage)
    _write(out_path, {**run.result, "status": "prepared", "files": files} if ok else {**run.result, "isolated": True})
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--prepare":
        _die_with_parent()
        return prepare(json.loads(Path(argv[1]).read_text()), Path(argv[2]))
    if argv and argv[0] == "--serve":
        _die_with_parent()
        job = json.loads(Path(argv[1]).read_text())
        _limit_memory(job["point"].get("memory_limit_mb"))
        return serve(job, Path(argv[2]), int(argv[3]), int(argv[4]))
    job_path, out_path = Path(argv[0]), Path(argv[1])
    _die_with_parent()
    job = json.loads(job_path.read_text())
    _limit_memory(job["point"].get("memory_limit_mb"))

    from .cache import Cache
    from .manager import get_plugin_manager
    from .point import Point
    from .runner import measure

    point = Point.from_dict(job["point"])
    plugins = get_plugin_manager()
    result = measure(point, plugins, Cache(job["cache"]), job.get("env") or {})
    result["isolated"] = True
    _write(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
