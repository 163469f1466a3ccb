"""Built-in trackers, run around the timed phase inside the measurement's process.

- ``rss``: resident memory sampled every 5 ms by a background thread (peak and mean during
  the timed prefill/decode, which ``ru_maxrss`` cannot separate from loading).
- ``rapl``: CPU package energy from Linux powercap (``/sys/class/powercap/intel-rapl:*``),
  joules per timed phase; "not available" with the reason where the counter is absent or
  unreadable (most VMs, non-root on recent kernels).
- ``nvml``: NVIDIA board energy and memory in use (nvidia-ml-py).
- ``torch_cuda``: torch's peak CUDA memory.
- ``torch_mps``: torch's memory on Apple's GPU (MPS): allocated by tensors and by the driver.
- ``tegrastats``: Jetson board input power (VDD_IN), integrated.
- ``powermetrics``: macOS CPU+GPU+ANE power (root), integrated.

Each reports ``{"available": False, "reason": ...}`` where it cannot work. Those that
integrate over time also have ``pause()`` and ``resume()``: a lockstep worker
(`moerun.lockstep`) calls them around each of its timed units, so that they cover this
side's units, not the other sides' (and a paused RSS sampler costs the others nothing).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from moerun import hookimpl

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class RssTracker:
    interval_s = 0.005

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._running = threading.Event()  # cleared while paused: the thread sleeps on it
        self._running.set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if _rss_bytes() is None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._running.wait()
            value = _rss_bytes()
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, Any]:
        if self._thread is None:
            return {"available": False, "reason": "/proc/self/statm is not readable on this system"}
        self._stop.set()
        self._running.set()
        self._thread.join()
        if not self.samples:
            self.samples.append(_rss_bytes() or 0)
        return {"available": True, "peak_bytes": max(self.samples), "mean_bytes": sum(self.samples) / len(self.samples),
                "samples": len(self.samples)}


def read_rapl(root: str = "/sys/class/powercap") -> tuple[dict[str, tuple[int, int]], str | None]:
    """{zone name: (energy_uj, max_energy_range_uj)} for top-level package zones, or a reason."""
    zones = sorted(glob.glob(os.path.join(root, "intel-rapl:[0-9]")))
    if not zones:
        return {}, f"no RAPL powercap zones under {root}"
    out = {}
    for z in zones:
        try:
            with open(os.path.join(z, "name")) as f:
                name = f.read().strip()
            with open(os.path.join(z, "energy_uj")) as f:
                energy = int(f.read())
            try:
                with open(os.path.join(z, "max_energy_range_uj")) as f:
                    wrap = int(f.read())
            except OSError:
                wrap = 0
        except PermissionError:
            return {}, f"{z}/energy_uj is not readable (needs root on recent kernels)"
        except (OSError, ValueError) as exc:
            return {}, f"{z}: {exc}"
        out[f"{name}:{os.path.basename(z)}"] = (energy, wrap)
    return out, None


class RaplTracker:
    def __init__(self, root: str = "/sys/class/powercap") -> None:
        self.root = root
        self.before: dict[str, tuple[int, int]] = {}
        self.reason: str | None = None
        self.t0 = 0.0

    def start(self) -> None:
        self.before, self.reason = read_rapl(self.root)
        self.t0 = time.perf_counter()
        self.joules: dict[str, float] = {}
        self.seconds = 0.0

    def pause(self) -> None:
        """Add the stretch since start/resume; energy is counted only while running."""
        if self.reason or not self.before:
            return
        after, reason = read_rapl(self.root)
        if reason:
            self.reason = reason
            return
        for zone, (e0, wrap) in self.before.items():
            e1 = after[zone][0]
            delta = e1 - e0 if e1 >= e0 else e1 + wrap - e0  # the counter wrapped
            self.joules[zone] = self.joules.get(zone, 0.0) + delta / 1e6
        self.seconds += time.perf_counter() - self.t0
        self.before = {}

    def resume(self) -> None:
        if self.reason:
            return
        self.before, self.reason = read_rapl(self.root)
        self.t0 = time.perf_counter()

    def stop(self) -> dict[str, Any]:
        self.pause()
        if self.reason:
            return {"available": False, "reason": self.reason}
        seconds, joules = self.seconds, self.joules
        total = sum(joules.values())
        return {"available": True, "joules": total, "zones_joules": joules, "seconds": seconds,
                "watts": total / seconds if seconds else None}




# ---------------------------------------------------------------- power from sampling tools
_TEGRA_RAIL = re.compile(r"\b(VDD_[A-Z0-9_]+|POM_5V_[A-Z0-9_]+|VIN_SYS_5V0)\s+(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?")
_POWERMETRICS = re.compile(r"^(Combined Power \(CPU \+ GPU \+ ANE\)|CPU Power|GPU Power|ANE Power):\s*([\d.]+)\s*mW",
                           re.M)
# the rail that is the whole board's input, in order of preference
_TEGRA_TOTAL = ("VDD_IN", "POM_5V_IN", "VIN_SYS_5V0")


def parse_tegrastats(line: str) -> dict[str, float]:
    """Instantaneous power per rail in mW from one tegrastats line: Orin's
    ``VDD_IN 4396mW/4396mW``, Xavier's ``VDD_IN 5113/5113``, Nano's ``POM_5V_IN 1138/1138``
    (current/average; the current reading is taken)."""
    return {m.group(1): float(m.group(2)) for m in _TEGRA_RAIL.finditer(line)}


def parse_powermetrics(text: str) -> dict[str, float]:
    """Power in mW from one macOS ``powermetrics --samplers cpu_power`` sample."""
    return {m.group(1): float(m.group(2)) for m in _POWERMETRICS.finditer(text)}


class _SampledPower:
    """Runs a sampling tool, integrates its power readings over the timed phase."""

    command: tuple[str, ...] = ()
    total_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.readings: list[tuple[float, float]] = []  # (time, mW)
        self.reason: str | None = None
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None

    def parse(self, chunk: str) -> dict[str, float]:
        raise NotImplementedError

    paused = False

    def pause(self) -> None:
        self.paused = True
        self.readings.append((time.perf_counter(), float("nan")))  # a gap: not integrated across

    def resume(self) -> None:
        self.paused = False

    def feed(self, chunk: str, now: float) -> None:
        if self.paused:
            return
        values = self.parse(chunk)
        total = next((values[k] for k in self.total_keys if k in values), None)
        if total is not None:
            self.readings.append((now, total))

    def start(self) -> None:
        exe = shutil.which(self.command[0])
        if exe is None:
            self.reason = f"{self.command[0]} not found on PATH"
            return
        try:
            self.proc = subprocess.Popen([exe, *self.command[1:]], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
        except OSError as exc:
            self.reason = f"{self.command[0]} could not start: {exc}"
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.feed(line, time.perf_counter())

    def stop(self) -> dict[str, Any]:
        if self.reason:
            return {"available": False, "reason": self.reason}
        assert self.proc is not None
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            err = ""
        if self.thread:
            self.thread.join(timeout=5)
        return integrate(self.readings, err)


def integrate(readings: list[tuple[float, float]], err: str = "") -> dict[str, Any]:
    """Energy from (time s, power mW) samples: trapezoids between samples; a NaN power marks
    a gap (a paused stretch), which is not integrated across."""
    pairs = [((t0, p0), (t1, p1)) for (t0, p0), (t1, p1) in zip(readings, readings[1:]) if p0 == p0 and p1 == p1]
    if not pairs:
        why = err.strip().splitlines()[-1] if err and err.strip() else "fewer than 2 power samples"
        return {"available": False, "reason": why}
    joules = sum((t1 - t0) * (p0 + p1) / 2 / 1000 for (t0, p0), (t1, p1) in pairs)
    seconds = sum(t1 - t0 for (t0, _), (t1, _) in pairs)
    readings = [r for r in readings if r[1] == r[1]]
    return {"available": True, "joules": joules, "seconds": seconds, "watts": joules / seconds if seconds else None,
            "samples": len(readings)}


class TegrastatsTracker(_SampledPower):
    """Jetson boards: the board's input rail (VDD_IN) sampled every 100 ms."""

    command = ("tegrastats", "--interval", "100")
    total_keys = _TEGRA_TOTAL

    def parse(self, chunk: str) -> dict[str, float]:
        return parse_tegrastats(chunk)


class PowermetricsTracker(_SampledPower):
    """macOS: CPU + GPU + ANE power from powermetrics (needs root), sampled every 100 ms."""

    command = ("powermetrics", "-i", "100", "--samplers", "cpu_power")
    total_keys = ("Combined Power (CPU + GPU + ANE)", "CPU Power")

    def start(self) -> None:
        if sys.platform != "darwin":
            self.reason = "powermetrics exists on macOS only"
            return
        if os.geteuid() != 0:
            self.reason = "powermetrics needs root (run moerun with sudo for energy on macOS)"
            return
        super().start()

    def parse(self, chunk: str) -> dict[str, float]:
        return parse_powermetrics(chunk)


class NvmlTracker:
    """NVIDIA GPUs: board energy counter and memory in use, through NVML (nvidia-ml-py)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.handle = None
        self.e0 = 0

    def start(self) -> None:
        try:
            import pynvml
        except ImportError:
            self.reason = "pynvml not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.t0 = time.perf_counter()
            self.mj, self.seconds, self.paused = 0, 0.0, False
        except pynvml.NVMLError as exc:
            self.reason = f"NVML: {exc}"

    def pause(self) -> None:
        if self.reason or self.paused:
            return
        import pynvml

        self.mj += pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self.e0
        self.seconds += time.perf_counter() - self.t0
        self.paused = True

    def resume(self) -> None:
        if self.reason or not self.paused:
            return
        import pynvml

        self.e0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        self.t0 = time.perf_counter()
        self.paused = False

    def stop(self) -> dict[str, Any]:
        if self.reason:
            return {"available": False, "reason": self.reason}
        import pynvml

        self.pause()
        mem = pynvml.nvmlDeviceGetMemoryInfo(self.handle)
        seconds = self.seconds
        joules = self.mj / 1000
        return {"available": True, "joules": joules, "seconds": seconds, "watts": joules / seconds if seconds else None,
                "device_memory_used_bytes": mem.used}


class TorchCudaMemoryTracker:
    """Peak device memory allocated by torch on CUDA during the timed phase."""

    def start(self) -> None:
        torch = sys.modules.get("torch")  # never import an engine just to look
        self.torch = torch if torch is not None and torch.cuda.is_available() else None
        if self.torch is not None:
            self.torch.cuda.reset_peak_memory_stats()

    def stop(self) -> dict[str, Any]:
        if self.torch is None:
            return {"available": False, "reason": "no CUDA device in use by torch in this measurement"}
        return {"available": True, "peak_allocated_bytes": self.torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": self.torch.cuda.max_memory_reserved()}


class TorchMpsMemoryTracker:
    """Memory on Apple's GPU through torch.mps counters. MPS keeps no peak, so the tracker
    samples every 5 ms during the timed phase and reports the largest values seen."""

    def start(self) -> None:
        torch = sys.modules.get("torch")  # never import an engine just to look
        mps = getattr(getattr(torch, "backends", None), "mps", None) if torch is not None else None
        self.torch = torch if mps is not None and mps.is_available() and torch.mps.current_allocated_memory() else None
        self.peak = [0, 0]
        if self.torch is None:
            return
        self.done = threading.Event()

        def sample() -> None:
            while not self.done.is_set():
                self.peak[0] = max(self.peak[0], self.torch.mps.current_allocated_memory())
                self.peak[1] = max(self.peak[1], self.torch.mps.driver_allocated_memory())
                self.done.wait(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def stop(self) -> dict[str, Any]:
        if self.torch is None:
            return {"available": False, "reason": "no MPS memory in use by torch in this measurement"}
        self.done.set()
        self.thread.join(timeout=1)
        return {"available": True, "peak_allocated_bytes": self.peak[0], "peak_driver_bytes": self.peak[1],
                "method": "torch.mps counters sampled every 5 ms"}


@hookimpl
def moerun_register_trackers(registry):
    registry.add("rss", RssTracker)
    registry.add("rapl", RaplTracker)
    registry.add("nvml", NvmlTracker)
    registry.add("torch_cuda", TorchCudaMemoryTracker)
    registry.add("torch_mps", TorchMpsMemoryTracker)
    registry.add("tegrastats", TegrastatsTracker)
    registry.add("powermetrics", PowermetricsTracker)
