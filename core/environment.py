"""What machine a measurement ran on: CPU, cores, memory, measured memory bandwidth,
versions. Captured once per study in the parent process and stored in every result."""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from functools import lru_cache
from typing import Any

import numpy as np


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "fma")
                    return [w for w in wanted if w in flags]
    except OSError:
        pass
    return []


def memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def measure_read_bandwidth(nbytes: int = 512 << 20, rounds: int = 5, threads: int | None = None,
                           samples: list[float] | None = None) -> float:
    """Memory read bandwidth in bytes/s: the best of `rounds` parallel reductions over a
    buffer much larger than any cache, one slice per usable core (numpy releases the GIL).
    Each round's figure is appended to `samples` when given."""
    threads = threads or usable_cores()
    buf = np.ones(nbytes // 8, dtype=np.float64)
    parts = np.array_split(buf, threads)
    best = 0.0
    for _ in range(rounds):
        workers = [threading.Thread(target=np.add.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        rate = buf.nbytes / (time.perf_counter() - t0)
        if samples is not None:
            samples.append(rate)
        best = max(best, rate)
    return best


def measure_gemm_flops(n: int = 1024, rounds: int = 5) -> float:
    """fp32 FLOP/s of numpy's BLAS on an n x n matrix product, best of `rounds`: the
    achievable compute peak that FLOP utilisation is measured against."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2.0 * n**3 / (time.perf_counter() - t0))
    return best


@lru_cache(maxsize=1)
def capture(measure_bandwidth: bool = True) -> dict[str, Any]:
    """The environment record stored with each result."""
    from . import __version__

    env: dict[str, Any] = {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "cores": usable_cores(),
        "memory_bytes": memory_total_bytes(),
        "python": sys.version.split()[0],
        "moerun": __version__,
        "numpy": np.__version__,
    }
    override = os.environ.get("MOERUN_BANDWIDTH_GBPS")
    if override:
        env["bandwidth_bytes_s"] = float(override) * 1e9
        env["bandwidth_source"] = "MOERUN_BANDWIDTH_GBPS"
    elif measure_bandwidth:
        samples: list[float] = []
        env["bandwidth_bytes_s"] = measure_read_bandwidth(samples=samples)
        env["bandwidth_samples_bytes_s"] = samples
        env["bandwidth_source"] = "measured: parallel numpy reduction over 512 MiB, best of 5"
    override = os.environ.get("MOERUN_PEAK_GFLOPS")
    if override:
        env["peak_flops"] = float(override) * 1e9
    elif measure_bandwidth:
        env["peak_flops"] = measure_gemm_flops()
        env["peak_flops_source"] = "measured: numpy fp32 GEMM 1024^3, best of 5"
    return env
