"""Lockstep: the sides of one comparison measured in the same seconds.

A shared machine's bandwidth, frequency and neighbours move by 1.5-2x over minutes, so two
sides measured minutes apart see different machines. In lockstep every side of a comparison
(the MoE, its twins, the named baselines) is loaded at once, each in its own worker process
(`moerun.worker --serve`: crash isolation and per-engine memory as before), and then timed
in *cycles*: in each cycle every side runs one timed *unit* of prefill, then every side one
of decode, each phase in a freshly shuffled order, while the others wait blocked on their
command pipe. A ratio is formed within each cycle from units run within a second or so of
each other, so drift hits both sides alike and cancels.

- **Units sized to the machine.** After a warm-up, each side times three prefills and a
  decode pass (medians); its prefill unit is then as many prefills as fill about `unit_s`
  seconds (pyperf calibrates its loops the same way), never fewer than one. A decode unit
  is the first `steps` decode steps after the prompt its prefill unit just filled, the same
  `steps` for every side (as many as the slowest side's `unit_s` holds), or whole passes of
  the point's new tokens where one pass is shorter than `unit_s`.
- **Cycles until the restart is precise.** At least `min_cycles`, then until every pair's
  within-restart 95 % interval (Student-t over the cycles' log-ratios) is within half the
  protocol's target, or `max_cycles`.
- **Idle partners cost nothing.** A waiting worker is blocked in a pipe read; before each
  unit the parent pauses `settle_s` so that thread pools that spin after their work (ONNX
  Runtime's, OpenMP's) have parked. docs/concepts.md has the measurement.
- **Restarts.** One call is one restart: fresh processes, fresh allocation and page
  placement. `moerun.protocol` runs restarts as rounds and forms the interval over them.

`run_together` runs one restart and returns one result record per side, each with its
per-cycle unit rates under ``lockstep``.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from . import defaults
from .cache import Cache
from .comparison import pairs_of
from .contention import CpuWindow
from .isolation import Worker, kill_group
from .point import Point

MIN_CYCLES = 8
MAX_CYCLES = 16
SETTLE_S = 0.02  # spin tails after a partner's unit: torch and llama.cpp prefill paid 4-5 % at 5 ms, none at 20 ms
PHASES = (("prefill", "prefill_tok_s"), ("decode", "decode_tok_s"))


class Side:
    """One side's worker process and its command pipe."""

    def __init__(self, point: Point, cache: Cache, env: dict[str, Any], folder: Path, python: str | None) -> None:
        self.point, self.env = point, env
        cmd_r, cmd_w = os.pipe()
        reply_r, reply_w = os.pipe()
        # inside its memory cap where the point has one (moerun.isolation.Worker)
        self.worker = Worker(point, cache, env, folder, python, mode=("--serve",),
                             extra=(str(cmd_r), str(reply_w)), pass_fds=(cmd_r, reply_w))
        os.close(cmd_r)
        os.close(reply_w)
        self.commands = os.fdopen(cmd_w, "w", buffering=1)
        self.replies, self.buffer = reply_r, b""
        self.alive, self.reason = self.proc is not None, None
        self.reps: dict[str, int] = {}
        self.rates: dict[str, list[float]] = {"prefill_tok_s": [], "decode_tok_s": []}

    @property
    def proc(self) -> subprocess.Popen | None:
        """The side's worker process (None where the point ended before one started)."""
        return self.worker.proc

    def receive(self, timeout: float) -> dict[str, Any] | None:
        """The next reply line, or None (marked dead) on a timeout or a worker gone."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                self.dead(f"timed out after {timeout:g} s (hung or too slow); killed")
                return None
            ready, _, _ = select.select([self.replies], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.replies, 65536)
            if not chunk:
                self.dead(None)  # exited: its result file, or the crash, says why
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def call(self, timeout: float, **cmd: Any) -> dict[str, Any] | None:
        """Send a command, wait for its reply; None when the side ended (done or dead)."""
        if not self.alive:
            return None
        try:
            self.commands.write(json.dumps(cmd) + "\n")
            self.commands.flush()
        except (BrokenPipeError, OSError):
            self.dead(None)
            return None
        msg = self.receive(timeout)
        if msg is not None and msg.get("event") == "done" and cmd.get("cmd") != "finish":
            self.alive = False  # the unit failed: the worker wrote its result and left
            return None
        return msg

    def dead(self, reason: str | None) -> None:
        self.alive = False
        if reason:
            self.reason = reason
            self.worker.kill()

    def close(self) -> None:
        try:
            self.commands.close()
        except OSError:
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_group(self.proc)
        os.close(self.replies)

    def result(self) -> dict[str, Any]:
        return self.worker.result(self.reason)


def _halfwidth(logs: Sequence[float]) -> float:
    from .protocol import log_interval

    return log_interval([math.exp(x) for x in logs])["halfwidth"]


def precise_enough(sides: Sequence[Side], target: float) -> bool:
    """Every pair's (or, without pairs, every side's) within-restart interval, per phase,
    within `target`; sides that died are out of it."""
    by_key = {s.point.key: s for s in sides if s.alive}
    pairs = [(by_key[p.moe], by_key[p.other]) for p in pairs_of([s.point for s in sides])
             if p.moe in by_key and p.other in by_key]
    for _, metric in PHASES:
        series = ([[math.log(x / y) for x, y in zip(a.rates[metric], b.rates[metric]) if x and y] for a, b in pairs]
                  if pairs else [[math.log(x) for x in s.rates[metric] if x] for s in by_key.values()])
        if any(logs and _halfwidth(logs) > target for logs in series):
            return False
    return True


def _ready(side: Side) -> None:
    msg = side.receive(side.point.timeout_s)
    if msg is not None and not msg.get("ok"):
        side.alive = False  # unsupported, unavailable or failed: its result says which


def run_together(points: Sequence[Point], *, cache: Cache, env: dict[str, Any], unit_s: float = defaults.UNIT_S,
                 target: float = defaults.TARGET, seed: int = 0, min_cycles: int = MIN_CYCLES, max_cycles: int = MAX_CYCLES,
                 settle_s: float = SETTLE_S, load_together: bool = False,
                 python: str | None = None) -> list[dict[str, Any]]:
    """One restart of a comparison in lockstep; one result record per point, in order.
    `load_together`: start every side's process at once (else one after another)."""
    rng = random.Random(seed)
    session = uuid.uuid4().hex[:12]
    spent: dict[str, float] = {}  # seconds by stage, for the record
    window = CpuWindow(include_children=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moerun-lockstep-") as tmp:
        sides: list[Side] = []
        try:
            # one at a time, load times are each engine's own; together (later restarts, whose
            # load figures the first restart already has), the loads overlap on the machine's cores
            for i, p in enumerate(points):
                folder = Path(tmp) / str(i)
                folder.mkdir()
                sides.append(Side(p, cache, env, folder, python))
                if not load_together:
                    _ready(sides[-1])
            if load_together:
                for side in sides:
                    _ready(side)
            spent["load"] = time.monotonic() - started
            live = [s for s in sides if s.alive]
            for s in live:
                s.call(s.point.timeout_s, cmd="warm")
            cal = {}
            for s in live:
                msg = s.call(s.point.timeout_s, cmd="calibrate")
                if msg is not None:
                    cal[s.point.key] = msg
            spent["warm_calibrate"] = time.monotonic() - started - spent["load"]
            # decode: every side decodes the same first `steps` positions after the prompt (as many
            # as the slowest side's unit_s holds), or whole passes where one pass is shorter than that
            n_new = points[0].new_tokens
            slowest = max((c["step_ns"] for c in cal.values()), default=0) / 1e9
            steps = min(n_new, max(1, round(unit_s / slowest))) if slowest else 0
            for s in sides:
                c = cal.get(s.point.key)
                if c is None or not s.alive:
                    continue
                passes = 0
                if steps:
                    passes = 1 if steps < n_new else max(1, round(unit_s / max(n_new * c["step_ns"] / 1e9, 1e-6)))
                s.reps = {"prefill": max(1, round(unit_s / max(c["prefill_ns"] / 1e9, 1e-6))), "decode": passes,
                          "decode_steps": steps}
                s.unit_timeout = max(60.0, 50 * unit_s + 20 * (c["prefill_ns"] + n_new * c["step_ns"]) / 1e9)
            cycles = 0
            cycling = time.monotonic()
            while any(s.alive for s in sides):
                for phase, metric in PHASES:
                    order = [s for s in sides if s.alive and s.reps.get(phase)]
                    rng.shuffle(order)
                    for s in order:
                        time.sleep(settle_s)  # a partner's spinning thread pool parks meanwhile
                        msg = s.call(s.unit_timeout, cmd="unit", phase=phase, reps=s.reps[phase],
                                     steps=s.reps.get("decode_steps"))
                        if msg is not None:
                            s.rates[metric].append(msg["tok_s"])
                cycles += 1
                if cycles >= max_cycles or (cycles >= min_cycles and precise_enough(sides, target / 2)):
                    break
            cycling = time.monotonic() - cycling
            finishing = time.monotonic()
            for s in sides:
                if s.alive:
                    s.call(s.point.timeout_s, cmd="finish")
            spent["finish"] = time.monotonic() - finishing
        except BaseException:  # Ctrl-C: take every worker down with us
            for s in sides:
                s.worker.kill()
            raise
        finally:
            for s in sides:
                s.close()
        contention = window.close()
        wall = time.monotonic() - started
        out = []
        for s in sides:
            r = s.result()
            r["isolated"] = True
            r.setdefault("contention", {})["point"] = contention
            r["lockstep"] = {"session": session, "sides": len(points), "cycles": cycles, "unit_s": unit_s,
                             "loaded": "together" if load_together else "one at a time",
                             "unit_reps": s.reps, "settle_s": settle_s, "restart_wall_s": wall,
                             "stages_s": {**spent, "cycles": cycling},
                             **s.rates}
            out.append(r)
        return out
