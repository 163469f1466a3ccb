"""The process's memory as the kernel sees it: current resident set (anonymous and
file-backed apart) and a high-water mark that can be reset.

Linux keeps a resident-set high-water mark per process (``VmHWM``) and resets it to the
current RSS when ``5`` is written to ``/proc/self/clear_refs``. Resetting it right before a
phase makes the mark that phase's peak, with nothing earlier (imports, preparation, the
harness's own allocations) folded in. Elsewhere the only mark is ``ru_maxrss``, which never
resets; the record then says so (`method`).
"""

from __future__ import annotations

import ctypes
import gc
import resource
import sys
from typing import Any

_FIELDS = {"VmRSS": "rss_bytes", "VmHWM": "hwm_bytes", "RssAnon": "anon_bytes", "RssFile": "file_bytes",
           "RssShmem": "shmem_bytes"}


def status() -> dict[str, int]:
    """Current RSS, the high-water mark, and RSS by kind, in bytes, from /proc/self/status;
    on other systems the rusage high-water mark only."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in _FIELDS:
                    out[_FIELDS[key]] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if "hwm_bytes" not in out:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["hwm_bytes"] = rss if sys.platform == "darwin" else rss * 1024
    return out


def release_free() -> None:
    """Hand the heap's free memory back to the OS (glibc's malloc_trim), so that what an
    earlier step freed (preparation, conversion) stops counting as resident."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False where the OS cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Phase:
    """The peak of one phase: `Phase()` resets the mark, `.close()` reads it with the RSS at
    the end. With no reset available the peak covers the whole process so far."""

    def __init__(self) -> None:
        self.reset = reset_peak()
        self.start = status()

    def close(self) -> dict[str, Any]:
        end = status()
        out: dict[str, Any] = {
            "peak_bytes": end["hwm_bytes"],
            "start_rss_bytes": self.start.get("rss_bytes"),
            "end_rss_bytes": end.get("rss_bytes"),
            "method": "VmHWM reset through /proc/self/clear_refs at the phase start" if self.reset
                      else "ru_maxrss: the process's high-water mark since it started (no reset here)",
        }
        for kind in ("anon_bytes", "file_bytes"):
            if kind in end:
                out[f"end_{kind}"] = end[kind]
        return out
