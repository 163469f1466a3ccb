"""Memory caps: a point's worker runs inside a memory cgroup made for it, so that it sees
the memory of a smaller device (`--memory-cap 3GB`, `--memory-cap jetson-orin-nano-8gb`).

The cgroup is a child of moerun's own (`/proc/self/cgroup`): moerun never moves itself or
any other process out of the cgroup it started in; only the worker, at its start (between
fork and exec), joins the child made for it. File pages (mmapped weights) are charged to
the cgroup that faults them in, so the cap covers the page cache a model streams through;
anonymous memory cannot page (no swap is allowed inside the cap), so an engine that copies
its weights into its own buffers must hold them all, and the kernel's out-of-memory killer
ends it when they do not fit.

- cgroup v1 (`memory.limit_in_bytes`, with `memory.memsw.limit_in_bytes` set alike where
  swap accounting exists): verified on these machines (writable as root).
- cgroup v2 (`memory.max`, `memory.swap.max = 0`) where moerun's own cgroup delegates the
  memory controller to its children; otherwise, where `systemd-run` is found, the worker
  starts in a transient user scope (`systemd-run --user --scope -p MemoryMax=...`). Neither
  v2 path has run on these (v1) machines: unverified.

Where no cap can be made the point is `unsupported`, with the reason and what would make it
possible (`CapUnavailable`); it never runs uncapped. `MOERUN_CGROUP_FS` names another
cgroup mount point (the tests simulate a machine without cgroups through it).
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import attrs

from .errors import ConfigError, UnsupportedError

GB = 1e9
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")
MIN_CAP = 64 * 2**20  # below this the harness itself (Python, numpy) cannot start


def parse_cap(value: Any) -> int:
    """A memory cap in bytes from `3GB`, `2.5GiB`, `3000MB`, a number of bytes, or the name
    of a `moerun predict` device profile (its usable memory: memory less the OS's share).
    A one-line ConfigError for anything else."""
    if isinstance(value, bool):
        raise ConfigError(f"memory cap {value!r}: give a size (3GB, 2.5GiB) or a device profile")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        text = str(value).strip()
        m = _SIZE.fullmatch(text)
        if m and m.group(2).lower() in _UNITS:
            n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        else:
            from .profiles import HARDWARE

            if text not in HARDWARE:
                raise ConfigError(f"memory cap {text!r}: give a size (3GB, 2.5GiB, 3000MB) or a device profile "
                                  f"({', '.join(HARDWARE)})")
            n = int(HARDWARE[text].usable_bytes)
    if n < MIN_CAP:
        raise ConfigError(f"memory cap {n} bytes is below {MIN_CAP // 2**20} MiB, less than the harness itself needs")
    return n


def cap_label(cap: int | None) -> str:
    """`3.0 GB` (decimal gigabytes, as device memory is sold), or `none`."""
    if not cap:
        return "none"
    return f"{cap / GB:.2f} GB".replace(".00 GB", ".0 GB") if cap % 10**8 else f"{cap / GB:.1f} GB"


def _fs() -> Path:
    return Path(os.environ.get("MOERUN_CGROUP_FS", "/sys/fs/cgroup"))


def _own(controllers: str) -> str | None:
    """This process's cgroup path in the hierarchy holding `controllers` ("memory"; "" for
    the v2 unified one), from /proc/self/cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, ctrl, path = line.split(":", 2)
        if (controllers and controllers in ctrl.split(",")) or (not controllers and ctrl == "" and _.strip() == "0"):
            return path
    return None


HOW_V1 = ("run moerun as a user who may write its memory cgroup "
          "(cgroup v1: {path}; root, or a cgroup delegated to you)")
HOW_V2 = ("run moerun inside a cgroup that delegates the memory controller, e.g. "
          "'systemd-run --user --scope -p Delegate=yes moerun ...', or install systemd-run")


@attrs.define
class Cap:
    """One worker's memory cgroup: made before the worker starts, read after it ends, removed."""

    limit: int
    kind: str  # "v1", "v2" or "systemd"
    path: Path | None = None  # the cgroup's folder (None for "systemd": the scope is systemd's)

    @property
    def describe(self) -> dict[str, Any]:
        return {"bytes": self.limit, "label": cap_label(self.limit), "cgroup": self.kind,
                "path": str(self.path) if self.path else None,
                "verified": self.kind == "v1"}

    def command(self, argv: list[str]) -> list[str]:
        """The worker's command line: as it is, or behind systemd-run's transient scope."""
        if self.kind != "systemd":
            return argv
        return ["systemd-run", "--user", "--scope", "--quiet", "--collect", "-p", f"MemoryMax={self.limit}",
                "-p", "MemorySwapMax=0", "--", *argv]

    def preexec(self) -> Callable[[], None] | None:
        """What the worker runs between fork and exec: join the cgroup (writing 0 moves the
        writer), so that nothing it allocates is charged elsewhere."""
        if self.path is None:
            return None
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write("0")

        return join

    def stats(self) -> dict[str, Any]:
        """The cgroup's own figures: peak memory charged, out-of-memory kills, major faults
        and reclaim, from its files (what exists on this kernel)."""
        if self.path is None or not self.path.exists():
            return {}
        out: dict[str, Any] = {}
        if self.kind == "v1":
            out["peak_bytes"] = _int(self.path / "memory.max_usage_in_bytes")
            out["limit_hits"] = _int(self.path / "memory.failcnt")
            out["oom_kills"] = _keyed(self.path / "memory.oom_control").get("oom_kill")
            stat = _keyed(self.path / "memory.stat")
            out.update(major_faults=stat.get("total_pgmajfault", stat.get("pgmajfault")),
                       file_bytes=stat.get("total_cache", stat.get("cache")),
                       anon_bytes=stat.get("total_rss", stat.get("rss")),
                       mapped_file_bytes=stat.get("total_mapped_file", stat.get("mapped_file")))
        else:
            out["peak_bytes"] = _int(self.path / "memory.peak")
            events = _keyed(self.path / "memory.events")
            out["limit_hits"], out["oom_kills"] = events.get("max"), events.get("oom_kill")
            stat = _keyed(self.path / "memory.stat")
            out.update(major_faults=stat.get("pgmajfault"), file_bytes=stat.get("file"),
                       anon_bytes=stat.get("anon"), mapped_file_bytes=stat.get("file_mapped"))
        return {k: v for k, v in out.items() if v is not None}

    def remove(self) -> None:
        """Remove the cgroup once its worker has gone (v1 hands what remains charged, the
        page cache, to the parent). Retried briefly: an exiting process leaves it late."""
        if self.path is None or self.kind == "systemd":
            return
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)


class CapUnavailable(UnsupportedError):
    """No memory cgroup can be made here; the message says why and what would allow it."""


def make_cap(limit: int) -> Cap:
    """A fresh memory cgroup of `limit` bytes under moerun's own, or CapUnavailable."""
    fs = _fs()
    v1 = _own("memory")
    if v1 is not None and (fs / "memory").is_dir():
        parent = fs / "memory" / v1.lstrip("/")
        if not (parent / "memory.limit_in_bytes").exists():
            raise CapUnavailable(f"no memory cap: the memory cgroup {parent} is not visible here; "
                                 + HOW_V1.format(path=parent))
        child = parent / f"moerun-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            child.mkdir()
            (child / "memory.limit_in_bytes").write_text(str(limit))
            if (child / "memory.memsw.limit_in_bytes").exists():  # no swap inside the cap
                (child / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError as exc:
            _rmdir(child)
            raise CapUnavailable(f"no memory cap: cannot make a memory cgroup under {parent} "
                                 f"({exc.strerror}); " + HOW_V1.format(path=parent)) from None
        return Cap(limit=limit, kind="v1", path=child)
    v2 = _own("")
    if v2 is not None and (fs / "cgroup.controllers").exists():
        parent = fs / v2.lstrip("/")
        delegated = "memory" in _read(parent / "cgroup.subtree_control").split()
        if delegated:
            child = parent / f"moerun-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                child.mkdir()
                (child / "memory.max").write_text(str(limit))
                if (child / "memory.swap.max").exists():
                    (child / "memory.swap.max").write_text("0")
                return Cap(limit=limit, kind="v2", path=child)
            except OSError:
                _rmdir(child)
        if shutil.which("systemd-run"):
            return Cap(limit=limit, kind="systemd")
        raise CapUnavailable(f"no memory cap: cgroup v2 at {parent} does not delegate the memory controller "
                             f"to moerun and systemd-run is not installed; " + HOW_V2)
    raise CapUnavailable(f"no memory cap: no memory cgroup found under {fs} (neither cgroup v1's memory "
                         f"controller nor cgroup v2); a memory cap needs Linux with cgroups: " + HOW_V2)


def cap_support() -> dict[str, Any]:
    """Whether a cap can be made here (one is made and removed at once), and how or why not."""
    try:
        cap = make_cap(MIN_CAP)
    except CapUnavailable as exc:
        return {"available": False, "reason": str(exc)}
    cap.remove()
    return {"available": True, "cgroup": cap.kind, "verified": cap.kind == "v1"}


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _int(path: Path) -> int | None:
    text = _read(path).strip()
    return int(text) if text.isdigit() else None


def _keyed(path: Path) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


PHASE_FILE = "MOERUN_PHASE_FILE"
_phase = [""]


def mark(phase: str) -> None:
    """A capped worker says which phase it is in (load, prefill, decode), so that an
    out-of-memory kill can say where it struck; nothing where no phase file was asked for
    (uncapped points). Called outside the clock; a repeated phase writes nothing."""
    path = os.environ.get(PHASE_FILE)
    if not path or _phase[0] == phase:
        return
    _phase[0] = phase
    with open(path, "w") as f:
        f.write(phase)


def last_phase(path: Path) -> str | None:
    text = _read(path).strip()
    return text or None


def own_usage() -> int | None:
    """The memory charged to this process's own memory cgroup now (a capped worker: what the
    harness and its libraries hold before the engine loads), or None where it is not visible
    (a systemd scope under cgroup v2 included, which `_own` finds as well)."""
    fs, v1, v2 = _fs(), _own("memory"), _own("")
    if v1 is not None and (fs / "memory").is_dir():
        return _int(fs / "memory" / v1.lstrip("/") / "memory.usage_in_bytes")
    if v2 is not None and (fs / "cgroup.controllers").exists():
        return _int(fs / v2.lstrip("/") / "memory.current")
    return None
