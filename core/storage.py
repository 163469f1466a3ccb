"""Storage as a measured resource: how fast this machine reads the disk its engine files sit
on, with the page cache out of the way, next to the memory bandwidth probe.

Weights that no longer fit a memory cap are read back from storage as the engine touches
them (moerun.memcap), in the device's readahead windows (``read_ahead_kb``: 128 KiB by
default, 8 MiB on these machines' virtual disk) rather than in long sequential runs, so the
probe reads sequential 1 MiB blocks, random 128 KiB blocks, random 4 KiB pages and random
blocks of the readahead window. Reads bypass the page cache (``O_DIRECT``); where the
filesystem refuses that, the probe file's pages are dropped first (``posix_fadvise``) and
the record says so. The figure is cached per machine and folder for a day;
``MOERUN_STORAGE_GBPS`` fixes it instead.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

PROBE_FILE_BYTES = 256 * 2**20
BLOCKS = {"sequential_1m": 2**20, "random_128k": 128 * 2**10, "random_4k": 4 * 2**10}
TTL_S = 24 * 3600.0
BUDGET_S = 2.0  # per pattern, at most (a slow SD card reads little in that time: still a figure)


def _probe_file(folder: Path) -> Path:
    path = folder / "storage-probe.bin"
    if path.exists() and path.stat().st_size == PROBE_FILE_BYTES:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    rng = random.Random(0)
    with open(tmp, "wb") as f:  # incompressible, so no layer below can cheat
        chunk = rng.randbytes(2**20)
        for i in range(PROBE_FILE_BYTES // 2**20):
            f.write(chunk[i % 7:] + chunk[: i % 7])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _open(path: Path) -> tuple[int, str]:
    """A descriptor that reads past the page cache: O_DIRECT, else a plain one whose pages
    are dropped before each pattern."""
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), "O_DIRECT"
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), "buffered after posix_fadvise(DONTNEED)"


def readahead_bytes(folder: Path) -> int | None:
    """The readahead window of the block device holding `folder` (``read_ahead_kb``): what
    one major fault on a mapped file reads at most under the default access advice."""
    st = os.stat(folder)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for queue in (dev / "queue", dev / ".." / "queue"):  # a partition's queue is its disk's
        try:
            return int((queue / "read_ahead_kb").read_text()) * 1024
        except (OSError, ValueError):
            continue
    return None


def measure(folder: Path, seed: int = 0) -> dict[str, Any]:
    """Read rates of the disk under `folder` (bytes/s) for each pattern of `BLOCKS`, and
    random reads of the device's readahead window (`readahead_bytes`) where it differs."""
    path = _probe_file(folder)
    fd, method = _open(path)
    rng = random.Random(seed)
    rates: dict[str, float] = {}
    window = readahead_bytes(folder)
    blocks = dict(BLOCKS)
    if window and window not in blocks.values() and 4096 <= window <= 16 * 2**20:
        blocks["random_readahead"] = window
    try:
        buf = mmap.mmap(-1, max(blocks.values()))  # page-aligned, as O_DIRECT wants
        for name, block in blocks.items():
            if method != "O_DIRECT":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            view = memoryview(buf)[:block]
            slots = PROBE_FILE_BYTES // block
            order = range(slots) if name.startswith("sequential") else rng.sample(range(slots), slots)
            done, started = 0, time.perf_counter()
            for i in order:
                done += os.preadv(fd, [view], i * block)
                if time.perf_counter() - started > BUDGET_S:
                    break
            rates[name] = done / (time.perf_counter() - started)
            view.release()
        buf.close()
    finally:
        os.close(fd)
    return {"read_bytes_s": rates, "method": method, "file_bytes": PROBE_FILE_BYTES, "folder": str(folder),
            "readahead_bytes": window, "measured_at": time.time()}


def storage_probe(folder: Path, *, refresh: bool = False) -> dict[str, Any]:
    """The storage read rates of the disk holding `folder` (moerun's cache: where engine files
    live), cached per machine and folder for `TTL_S`. ``paging_read_bytes_s`` is the rate
    paging meets: random reads of the device's readahead window."""
    override = os.environ.get("MOERUN_STORAGE_GBPS")
    if override:  # a fixed figure (the tests': a figure, not a measurement)
        rate = float(override) * 1e9
        return {"read_bytes_s": {name: rate for name in BLOCKS}, "paging_read_bytes_s": rate,
                "method": "MOERUN_STORAGE_GBPS", "cached": False}
    ident = "|".join((platform.node(), str(Path(folder).resolve())))
    record = Path(folder) / f"storage-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    if not refresh:
        try:
            cached = json.loads(record.read_text())
            if time.time() - cached.get("measured_at", 0) < TTL_S:
                return {**cached, "cached": True}
        except (OSError, ValueError):
            pass
    probe = measure(Path(folder))
    probe["paging_read_bytes_s"] = probe["read_bytes_s"].get("random_readahead", probe["read_bytes_s"]["random_128k"])
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(probe))
    os.replace(tmp, record)
    return {**probe, "cached": False}
