"""What machine a measurement ran on: CPU, cores, memory, measured memory bandwidth,
versions. Captured once per study in the parent process and stored in every result."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

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


def cpu_flags() -> set[str]:
    """Every flag the CPU reports in /proc/cpuinfo (``flags`` on x86, ``Features`` on Arm);
    empty where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_flags() -> list[str]:
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "fma")
    return [w for w in wanted if w in flags]


def meminfo_bytes(field: str) -> int | None:
    """One /proc/meminfo field ("MemTotal", "MemAvailable") in bytes; None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def memory_total_bytes() -> int | None:
    total = meminfo_bytes("MemTotal")
    if total is not None:
        return total
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


READ_KERNEL = r"""
#include <stddef.h>
#include <stdint.h>
/* one stream, summed: vectorised loads, one miss stream per thread */
uint64_t moerun_read_1(const uint64_t *p, size_t n) {
    uint64_t s = 0;
    for (size_t i = 0; i < n; i++) s += p[i];
    return s;
}
/* four streams at once: more misses in flight per core */
uint64_t moerun_read_4(const uint64_t *p, size_t n) {
    size_t q = n / 4;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i < q; i++) { a += p[i]; b += p[i + q]; c += p[i + 2 * q]; d += p[i + 3 * q]; }
    return a + b + c + d;
}
"""
PROBE_BYTES = 1 << 30  # far beyond any last-level cache


def _read_kernels(cache_root: Any) -> dict[str, Callable[[np.ndarray], Any]]:
    """The probe's read kernels: numpy's reduction, and (where a C compiler exists) two
    compiled loops; every one releases the GIL so threads read in parallel."""
    kernels: dict[str, Callable[[np.ndarray], Any]] = {"numpy-sum": np.add.reduce}
    from .native import compile_library

    lib = compile_library(READ_KERNEL, "moerun_read", cache_root, flags=("-O3", "-march=native"))
    if lib is not None:
        for name in ("moerun_read_1", "moerun_read_4"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_uint64
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            kernels[f"c-{name[-1]}-stream"] = (lambda f: lambda a: f(a.ctypes.data, a.size))(fn)
    return kernels


def measure_read_bandwidth(nbytes: int = PROBE_BYTES, rounds: int = 7, threads: int | None = None,
                           cache_root: Any = None, kernels: Sequence[str] | None = None) -> dict[str, Any]:
    """Memory read bandwidth, the figure MBU divides by: the best over several kernels,
    `rounds` tries each, of a parallel read of `nbytes`, one slice per usable core. Each
    thread starts at a barrier; a round's time runs from the first start to the last end."""
    from .cache import default_cache_root

    threads = threads or usable_cores()
    buf = np.ones(nbytes // 8, dtype=np.uint64)
    parts = np.array_split(buf, threads)
    per_kernel: dict[str, float] = {}
    for name, kernel in _read_kernels(cache_root or default_cache_root()).items():
        if kernels and name not in kernels:
            continue
        best = 0.0
        for _ in range(rounds):
            barrier = threading.Barrier(threads)
            spans: list[tuple[float, float]] = []

            def read(part: np.ndarray) -> None:
                barrier.wait()
                t0 = time.perf_counter()
                kernel(part)
                spans.append((t0, time.perf_counter()))

            workers = [threading.Thread(target=read, args=(p,)) for p in parts]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = max(best, buf.nbytes / (max(e for _, e in spans) - min(s for s, _ in spans)))
        per_kernel[name] = best
    winner = max(per_kernel, key=per_kernel.get)
    return {"bandwidth_bytes_s": per_kernel[winner], "kernel": winner, "per_kernel_bytes_s": per_kernel,
            "method": f"parallel read of {nbytes >> 20} MiB on {threads} threads, best of {rounds} rounds "
                      f"x {len(per_kernel)} kernels ({', '.join(per_kernel)})"}


PROBE_TTL_S = 12 * 3600
QUICK_BYTES = 256 << 20


def quick_probe(cache_root: Any = None) -> dict[str, Any]:
    """Every kernel over 256 MiB, best of 3 (about half a second): the machine's read
    bandwidth now, to keep a cached figure a ceiling on a machine whose bandwidth moves.
    Every kernel, not only the cached winner: which kernel reads fastest moves too (measured
    here: a cached 60.9 GB/s from the one-stream loop, which now read 49-68, while the
    four-stream loop read 78.8)."""
    return measure_read_bandwidth(nbytes=QUICK_BYTES, rounds=3, cache_root=cache_root)


def bandwidth_probe(cache_root: Any = None, *, refresh: bool = False, ttl_s: float = PROBE_TTL_S) -> dict[str, Any]:
    """The machine's read bandwidth, cached per machine (host, CPU, cores, memory) for
    `ttl_s`; a probe taken while other processes kept the CPU busy is used but not cached,
    and a cached figure is replaced only by a higher one until it expires. A cached figure
    is checked with a quick probe (every kernel, 256 MiB, 3 rounds, under a second): shared
    machines' bandwidth moves, and the figure must stay a ceiling."""
    from .cache import default_cache_root
    from .contention import CpuWindow

    root = Path(cache_root or default_cache_root())
    ident = "|".join(map(str, (platform.node(), _cpu_model(), usable_cores(), memory_total_bytes())))
    path = root / "machine" / f"bandwidth-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
    cached = None
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    fresh = cached and time.time() - cached.get("measured_at", 0) < ttl_s
    window = CpuWindow()
    if fresh and not refresh:
        quick = quick_probe(root)
        if quick["bandwidth_bytes_s"] <= cached["bandwidth_bytes_s"] or window.close()["contended"]:
            return {**cached, "cached": True}
        per_kernel = {k: max(v, cached["per_kernel_bytes_s"].get(k, 0.0)) for k, v in quick["per_kernel_bytes_s"].items()}
        probe = {**cached, "bandwidth_bytes_s": quick["bandwidth_bytes_s"], "kernel": quick["kernel"],  # it saw more
                 "per_kernel_bytes_s": per_kernel, "contention": {"contended": False}}
        _write_json(path, probe)
        return {**probe, "cached": False}
    probe = measure_read_bandwidth(cache_root=root)
    probe["contention"] = window.close()
    probe["measured_at"] = time.time()
    if fresh and cached["bandwidth_bytes_s"] > probe["bandwidth_bytes_s"]:
        return {**cached, "cached": True}  # a probe only ever raises the figure within its lifetime
    if not probe["contention"]["contended"]:
        _write_json(path, probe)
    return {**probe, "cached": False}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


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
def capture(measure_bandwidth: bool = True, refresh_probe: bool = False) -> dict[str, Any]:
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
        probe = bandwidth_probe(refresh=refresh_probe)
        env["bandwidth_bytes_s"] = probe["bandwidth_bytes_s"]
        env["bandwidth_per_kernel_bytes_s"] = probe["per_kernel_bytes_s"]
        env["bandwidth_kernel"] = probe["kernel"]
        env["bandwidth_source"] = (f"{'cached' if probe['cached'] else 'measured'} probe: {probe['method']}; "
                                   f"best kernel {probe['kernel']}")
        env["bandwidth_measured_at"] = probe["measured_at"]
        if probe["contention"].get("contended"):
            env["bandwidth_contended"] = True
    override = os.environ.get("MOERUN_PEAK_GFLOPS")
    if override:
        env["peak_flops"] = float(override) * 1e9
    elif measure_bandwidth:
        env["peak_flops"] = measure_gemm_flops()
        env["peak_flops_source"] = "measured: numpy fp32 GEMM 1024^3, best of 5"
    return env
