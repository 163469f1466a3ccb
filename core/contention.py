"""What else is using the machine: other processes' CPU time, steal, load, frequency.

A measurement is only as good as the machine was quiet. `CpuWindow` brackets a stretch of
time (the timed phase of a point, or a preflight look) and says how many cores *other*
processes kept busy during it: all CPUs' busy time from ``/proc/stat`` minus this process's
own CPU time (``getrusage``, every thread), divided by the wall time. Steal (a hypervisor
running someone else on our virtual CPUs) is counted apart. Where ``/proc/stat`` does not
exist (macOS), the window reports only the load average and says so.

A window is *contended* when other processes used at least `BUSY_CORES` cores on average
or steal took at least `BUSY_STEAL` of the CPU time; these thresholds are documented in
docs/concepts.md ("The busy-machine guard").
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

BUSY_CORES = 0.25  # other processes' average CPU use, in cores, that flags a window
BUSY_STEAL = 0.05  # share of CPU time stolen by the hypervisor that flags a window
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat() -> tuple[float, float, int] | None:
    """(busy seconds of all CPUs, steal seconds, number of CPUs) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    cpus = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
    return (user + nice + system + irq + softirq) / _TICK, steal / _TICK, cpus


def _own_cpu_s(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _mhz() -> float | None:
    """Mean current CPU frequency where the OS shows it (cpufreq, else /proc/cpuinfo)."""
    values = []
    base = "/sys/devices/system/cpu"
    try:
        for name in os.listdir(base):
            path = f"{base}/{name}/cpufreq/scaling_cur_freq"
            if name.startswith("cpu") and name[3:].isdigit() and os.path.exists(path):
                with open(path) as f:
                    values.append(int(f.read()) / 1000)
    except OSError:
        pass
    if not values:
        try:
            with open("/proc/cpuinfo") as f:
                values = [float(ln.split(":")[1]) for ln in f if ln.startswith("cpu MHz")]
        except (OSError, ValueError, IndexError):
            values = []
    return sum(values) / len(values) if values else None


class CpuWindow:
    """Brackets a stretch of time: `CpuWindow()` starts it, `.close()` returns the record.

    `include_children`: count the CPU time of this process's waited-for children as its own
    (the parent's view of an isolated point)."""

    def __init__(self, include_children: bool = False) -> None:
        self.children = include_children
        self.t0 = time.monotonic()
        self.stat0 = _proc_stat()
        self.own0 = self._own()
        self.mhz0 = _mhz()

    def _own(self) -> float:
        own = _own_cpu_s()
        return own + (_own_cpu_s(resource.RUSAGE_CHILDREN) if self.children else 0.0)

    def close(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        stat1, own1, mhz1 = _proc_stat(), self._own(), _mhz()
        mhz = [m for m in (self.mhz0, mhz1) if m]
        if self.stat0 is None or stat1 is None:
            return _record(wall, None, mhz)
        return _record(wall, (stat1[0] - self.stat0[0], stat1[1] - self.stat0[1], own1 - self.own0, stat1[2]), mhz,
                       source="/proc/stat busy time minus this process's own CPU time")


def _record(wall: float, deltas: tuple[float, float, float, int] | None, mhz: list[float],
            source: str = "", **extra: Any) -> dict[str, Any]:
    """A window's record from its wall time and its (busy, steal, own CPU seconds, CPUs)
    deltas (None: no /proc/stat): other processes' cores, steal, and whether it was contended."""
    out: dict[str, Any] = {"window_s": wall, "load_avg_1m": _loadavg(), **extra}
    if mhz:
        out["cpu_mhz"] = sum(mhz) / len(mhz)
    if deltas is None or wall <= 0:
        out["source"] = "load average only (no /proc/stat)"
        out["contended"] = bool(out["load_avg_1m"] and out["load_avg_1m"] > _cores() + BUSY_CORES)
        return out
    busy, steal, own, cpus = deltas
    cpus = cpus or _cores()
    # /proc/stat counts in clock ticks per CPU: below that resolution, others read as 0
    others = max(0.0, busy - own) / wall
    resolution = cpus / _TICK / wall
    out.update(source=source, others_cores=others, own_cores=own / wall, steal_share=steal / (wall * cpus),
               resolution_cores=resolution)
    out["contended"] = bool(others - resolution >= BUSY_CORES or out["steal_share"] >= BUSY_STEAL)
    return out


class CpuTally:
    """Several stretches of time added up, reported as one `CpuWindow` over their total: the
    timed units of a lockstep worker, between which the other sides of its comparison ran
    (their CPU time belongs to no unit of this one). `start()` and `stop()` bracket each."""

    def __init__(self) -> None:
        self.wall = self.busy = self.steal = self.own = 0.0
        self.cpus = 0
        self.stat_ok = True
        self._t0: float | None = None

    def start(self) -> None:
        self._t0, self._stat0, self._own0 = time.monotonic(), _proc_stat(), _own_cpu_s()

    def stop(self) -> None:
        if self._t0 is None:
            return
        self.wall += time.monotonic() - self._t0
        stat1, own1 = _proc_stat(), _own_cpu_s()
        if self._stat0 is None or stat1 is None:
            self.stat_ok = False
        else:
            self.busy += stat1[0] - self._stat0[0]
            self.steal += stat1[1] - self._stat0[1]
            self.cpus = stat1[2]
        self.own += own1 - self._own0
        self._t0 = None

    def close(self) -> dict[str, Any]:
        mhz = _mhz()
        return _record(self.wall, (self.busy, self.steal, self.own, self.cpus) if self.stat_ok else None,
                       [mhz] if mhz else [], source="/proc/stat busy time minus this process's own CPU time, "
                       "over its timed units", stretches="timed units only")


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def look(seconds: float = 0.5) -> dict[str, Any]:
    """Sample the machine for `seconds` while this process sleeps; with the busiest other
    processes named (from /proc/PID/stat) when it is contended."""
    before = _process_cpu()
    window = CpuWindow()
    time.sleep(seconds)
    out = window.close()
    if out.get("contended") and before:
        after = _process_cpu()
        me = os.getpid()
        top = sorted(((after[p][1] - before[p][1], p, after[p][0]) for p in after.keys() & before.keys()
                      if p != me), reverse=True)[:3]
        out["top"] = [{"pid": pid, "name": name, "cores": round(cpu / out["window_s"], 2)}
                      for cpu, pid, name in top if cpu > 0]
    return out


def _process_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (command name, CPU seconds)} of every process /proc shows."""
    out = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        name, rest = raw[raw.index("(") + 1: raw.rindex(")")], raw[raw.rindex(")") + 2:].split()
        out[pid] = (name, (int(rest[11]) + int(rest[12])) / _TICK)
    return out


def describe(sample: dict[str, Any]) -> str:
    """One line: what kept the machine busy."""
    if "others_cores" not in sample:
        return f"load average {sample.get('load_avg_1m')}"
    text = f"other processes used {sample['others_cores']:.2f} of {_cores()} cores"
    if sample.get("steal_share", 0) >= BUSY_STEAL:
        text += f", steal {sample['steal_share']:.0%}"
    if sample.get("top"):
        text += " (busiest: " + ", ".join(f"{t['name']} pid {t['pid']} {t['cores']:.2f}" for t in sample["top"]) + ")"
    return text


def wait_for_quiet(limit_s: float) -> tuple[bool, dict[str, Any]]:
    """Look until two looks in a row are quiet or `limit_s` passes; (quiet?, last look)."""
    deadline = time.monotonic() + limit_s
    quiet_in_a_row = 0
    sample = look()
    while True:
        quiet_in_a_row = 0 if sample["contended"] else quiet_in_a_row + 1
        if quiet_in_a_row >= 2:
            return True, sample
        if time.monotonic() >= deadline:
            return False, sample
        sample = look(1.0)
