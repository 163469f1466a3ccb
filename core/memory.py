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
import mmap
import os
import resource
import sys
from pathlib import Path
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


# ------------------------------------------------------------------ paging

def paging_counters() -> dict[str, int]:
    """This process's minor and major page faults (``/proc/self/stat``, fields 10 and 12: a
    minor fault maps a page already in memory, a major one waits for storage) and the bytes it
    caused to be read from storage (``/proc/self/io`` ``read_bytes``: page-cache misses,
    mmapped pages faulted in included); empty where the OS has neither."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        out["minor_faults"] = int(fields[7])  # field 10 counted from 1, after pid and (comm)
        out["major_faults"] = int(fields[9])  # field 12
    except (OSError, IndexError, ValueError):
        pass
    try:
        with open("/proc/self/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key == "read_bytes":
                    out["read_bytes"] = int(value)
    except OSError:
        pass
    return out


def counters_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if k in before}


def files_of(path: str | Path) -> list[Path]:
    """The regular files of an artifact: the file itself, or every file under a folder."""
    p = Path(path)
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []


def evict(path: str | Path) -> int:
    """Drop `path`'s pages (a file, or every file of a folder) from the page cache, written
    back first, so that the next reader reads from storage and the pages are charged to its
    cgroup (``posix_fadvise(DONTNEED)``; pages another process holds mapped stay). Returns
    the bytes it asked to drop."""
    total = 0
    for f in files_of(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def resident(path: str | Path) -> dict[str, int] | None:
    """How much of `path` (a file, or every file of a folder) sits in the page cache now, in
    bytes (``mincore`` on a fresh read-only map of each file: nothing is read or faulted);
    None where mincore is not available."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = mmap.PAGESIZE
    size = cached = 0
    for f in files_of(path):
        n = f.stat().st_size
        size += n
        if n == 0:
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            addr = libc.mmap(None, n, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                vec = (ctypes.c_ubyte * ((n + page - 1) // page))()
                if libc.mincore(addr, n, vec) != 0:
                    return None
                held = bytes(vec)  # bit 0 of each page's byte: in the page cache (the others are reserved, 0)
                cached += (len(held) - held.count(0)) * page
            finally:
                libc.munmap(addr, n)
        finally:
            os.close(fd)
    return {"bytes": size, "resident_bytes": min(cached, size)}


ADVICE = {"normal": "MADV_NORMAL", "random": "MADV_RANDOM", "sequential": "MADV_SEQUENTIAL",
          "willneed": "MADV_WILLNEED"}


def advise(path: str | Path, advice: str) -> int:
    """Give the kernel access advice (``madvise``) for every mapping of `path` in this
    process: ``random`` makes a fault read just its page instead of a readahead window,
    ``sequential`` reads ahead aggressively, ``willneed`` starts reading now, ``normal`` is
    the default. Returns the bytes advised (0: the file is not mapped here)."""
    import mmap as _mmap

    flag = getattr(_mmap, ADVICE[advice])
    target = str(Path(path).resolve())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if libc.madvise(lo, hi - lo, flag) == 0:
                    done += hi - lo
    return done
