"""Built-in trackers, run around the timed phase inside the measurement's process.

- ``rss``: resident memory sampled every 5 ms by a background thread (peak and mean during
  the timed prefill/decode, which ``ru_maxrss`` cannot separate from loading).
- ``rapl``: CPU package energy from Linux powercap (``/sys/class/powercap/intel-rapl:*``),
  joules per timed phase; "not available" with the reason where the counter is absent or
  unreadable (most VMs, non-root on recent kernels).
"""

from __future__ import annotations

import glob
import os
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
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if _rss_bytes() is None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            value = _rss_bytes()
            if value is not None:
                self.samples.append(value)
            self._stop.wait(self.interval_s)

    def stop(self) -> dict[str, Any]:
        if self._thread is None:
            return {"available": False, "reason": "/proc/self/statm is not readable on this system"}
        self._stop.set()
        self._thread.join()
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

    def stop(self) -> dict[str, Any]:
        if self.reason:
            return {"available": False, "reason": self.reason}
        after, reason = read_rapl(self.root)
        if reason:
            return {"available": False, "reason": reason}
        seconds = time.perf_counter() - self.t0
        joules = {}
        for zone, (e0, wrap) in self.before.items():
            e1 = after[zone][0]
            delta = e1 - e0 if e1 >= e0 else e1 + wrap - e0  # the counter wrapped
            joules[zone] = delta / 1e6
        total = sum(joules.values())
        return {"available": True, "joules": total, "zones_joules": joules, "seconds": seconds,
                "watts": total / seconds if seconds else None}


@hookimpl
def moerun_register_trackers(registry):
    registry.add("rss", RssTracker)
    registry.add("rapl", RaplTracker)
