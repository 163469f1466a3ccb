"""Child-process entry point: ``python -m moerun.worker JOB.json RESULT.json``.

Runs one measurement point and writes its result; the parent treats a missing result
file (crash, kill) or a timeout as the point's failure.
"""

from __future__ import annotations

import json
import os
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_path, out_path = Path(argv[0]), Path(argv[1])
    _die_with_parent()
    job = json.loads(job_path.read_text())
    _limit_memory(job["point"].get("memory_limit_mb"))

    from .cache import Cache
    from .manager import get_plugin_manager
    from .results import dumps
    from .runner import Point, measure

    point = Point.from_dict(job["point"])
    plugins = get_plugin_manager()
    result = measure(point, plugins, Cache(job["cache"]), job.get("env") or {})
    result["isolated"] = True
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(dumps(result))
    os.replace(tmp, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
