"""The measurement protocol: what makes a verdict printed twice say the same thing.

- **Rounds.** The points that share a workload (one backend, precision and shape: an MoE
  model, its dense twins, the named baselines) form a *comparison*. They run in rounds;
  each round runs every side once, each in a fresh isolated process, in an order shuffled
  per round, so slow drift and neighbours hit every side alike.
- **Statistics over rounds.** A verdict pairs the sides by round: ``r_i = moe_i / twin_i``
  from the same round, and its 95 % interval is a Student-t interval on ``log r_i`` — the
  variation between processes, which is what a second run shows. Each round's value of a
  point is the median of its repetitions inside that process.
- **A precision target.** After `min_rounds`, a comparison gets another round only while a
  verdict's relative half-width exceeds `target`, until `max_rounds` or the time `budget_s`
  runs out. The budget counts from the first round and limits every round after it (a busy
  machine can make even the minimum rounds take many times longer); a verdict with fewer
  than `min_rounds` rounds, or wider than the target, is marked as having missed it.
- **Contention.** Each point records what else used the CPU during its timed phase (see
  `moerun.contention`). A round in which any side was contended is left out of a verdict
  while at least `min_rounds` quiet rounds remain; otherwise the verdict keeps them and says
  so (`contended`), and `uneven` counts rounds whose sides saw different conditions.
  `bandwidth_range` (max / min of the read bandwidth probed right after each side's timed
  phase over the rounds used) says how far the machine itself moved meanwhile.

`run_rounds` drives an executor; `collapse` folds the per-round records of a results file
into one record per point; `paired` and `spread` are the statistics.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import attrs

from . import defaults
from .comparison import Comparison, comparisons
from .errors import ConfigError
from .results import Measurement
from .stats import ratio_interval

if TYPE_CHECKING:  # pragma: no cover
    from .point import Point

BUSY_POLICIES = ("warn", "wait", "refuse")
METRICS = ("decode_tok_s", "prefill_tok_s")
# what a point measures in its first round only (none is a speed): point field -> record section
ONCE = {"breakdown": "breakdown", "parity": "parity", "observe_routing": "routing", "count_ops": "ops"}


def _check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    name = attribute.name.replace("_", "-")
    if attribute.name in ("min_rounds", "max_rounds") and value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")
    if attribute.name == "unit_s" and not 0.01 <= value <= 10:
        raise ConfigError(f"unit-s must be between 0.01 and 10 seconds, got {value:g}")
    if attribute.name in ("target", "wait_s") and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    if attribute.name == "budget_s" and value is not None and value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    if attribute.name == "if_busy" and value not in BUSY_POLICIES:
        raise ConfigError(f"if-busy must be one of {', '.join(BUSY_POLICIES)}, got {value!r}")


@attrs.frozen(kw_only=True)
class Protocol:
    """How many rounds, to what precision, within what time, and what to do on a busy machine."""

    min_rounds: int = attrs.field(default=defaults.MIN_ROUNDS, validator=_check)
    max_rounds: int = attrs.field(default=defaults.MAX_ROUNDS, validator=_check)
    target: float = attrs.field(default=defaults.TARGET, validator=_check)  # relative 95 % half-width; 0: min_rounds only
    budget_s: float | None = attrs.field(default=defaults.BUDGET_S, validator=_check)  # None: no limit
    if_busy: str = attrs.field(default=defaults.IF_BUSY, validator=_check)
    wait_s: float = attrs.field(default=defaults.WAIT_S, validator=_check)
    seed: int = 0  # the shuffle of each round's order
    # lockstep (moerun.lockstep): a comparison's sides loaded together and timed in alternation;
    # a round is then one restart of every side's process
    lockstep: bool = defaults.LOCKSTEP
    unit_s: float = attrs.field(default=defaults.UNIT_S, validator=_check)  # seconds one timed unit aims at (lockstep.UNIT_S)

    def __attrs_post_init__(self) -> None:
        if self.max_rounds < self.min_rounds:
            raise ConfigError(f"max-rounds ({self.max_rounds}) is below min-rounds ({self.min_rounds})")

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


# ------------------------------------------------------------------ statistics
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    """Two-sided 95 % Student-t quantile for `df` degrees of freedom."""
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def log_interval(values: Sequence[float]) -> dict[str, Any]:
    """Geometric mean of positive `values` with a 95 % Student-t interval on their logs;
    `halfwidth` is the interval's relative half-width (inf with one value)."""
    logs = [math.log(v) for v in values if v and v > 0]
    n = len(logs)
    if n == 0:
        return {"n": 0, "value": None, "ci95": None, "halfwidth": math.inf}
    mean = statistics.fmean(logs)
    if n == 1:
        return {"n": 1, "value": math.exp(mean), "ci95": None, "halfwidth": math.inf}
    half = t975(n - 1) * statistics.stdev(logs) / math.sqrt(n)
    return {"n": n, "value": math.exp(mean), "ci95": [math.exp(mean - half), math.exp(mean + half)],
            "halfwidth": math.expm1(half)}


def nested_interval(groups: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Geometric mean and 95 % interval of ratios measured in cycles nested in restarts
    (`groups`: one list of log-ratios per restart), under a one-way random-effects model:
    log r = mu + restart effect + cycle noise.

    The grand mean is the mean of the restart means. Its variance is estimated as
    (MS_within + max(0, MS_between - MS_within)) / N, with N cycles in all: the cycle noise
    alone when restarts agree beyond it, plus the between-restart component when they do
    not. Degrees of freedom by Satterthwaite's approximation over the two parts: many (from
    the cycles) when restarts agree, falling to restarts - 1 as the between-restart part
    dominates. So the interval is as tight as all cycles allow when fresh processes measure
    alike, and as wide as the spread of restarts says when they do not (two runs' intervals
    then overlap where one-level intervals did not)."""
    groups = [list(g) for g in groups if len(g)]
    R = len(groups)
    N = sum(len(g) for g in groups)
    if R == 0:
        return {"n": 0, "value": None, "ci95": None, "halfwidth": math.inf}
    means = [statistics.fmean(g) for g in groups]
    mean = statistics.fmean(means)
    df_w = N - R
    ss_w = sum((x - m) ** 2 for g, m in zip(groups, means) for x in g)
    ms_w = ss_w / df_w if df_w > 0 else 0.0
    n_bar = N / R
    ms_b = n_bar * statistics.variance(means) if R > 1 else 0.0
    within = ms_w / N
    between = max(0.0, ms_b - ms_w) / N if R > 1 else 0.0
    var = within + between
    if var <= 0 or (df_w <= 0 and R < 2):
        return {"n": R, "cycles": N, "value": math.exp(mean), "ci95": None, "halfwidth": math.inf if var <= 0 and N < 2
                else 0.0}
    parts = [(within, df_w), (between, R - 1)]
    df = var ** 2 / sum(v ** 2 / d for v, d in parts if v > 0 and d > 0)
    half = t975(max(1, int(df))) * math.sqrt(var)
    return {"n": R, "cycles": N, "value": math.exp(mean), "ci95": [math.exp(mean - half), math.exp(mean + half)],
            "halfwidth": math.expm1(half), "df": df, "between_share": between / var}


def _quiet_rounds(rounds: dict[int, dict[str, Any]], min_rounds: int) -> tuple[list[int], bool]:
    """The rounds a statistic uses: the quiet ones while at least `min_rounds` of them exist,
    else all (the flag says contended rounds were kept)."""
    quiet = [i for i, r in rounds.items() if not r.get("contended")]
    if len(quiet) >= min(min_rounds, len(rounds)) and quiet:
        return sorted(quiet), False
    return sorted(rounds), any(r.get("contended") for r in rounds.values())


def paired(a: dict[str, Any], b: dict[str, Any], metric: str, min_rounds: int = 3) -> dict[str, Any]:
    """a / b for `metric` from two collapsed records, paired by round.

    Rounds measured in lockstep (both sides' processes alive together, timed units
    alternated) give one ratio per cycle; a round's value is the geometric mean of its
    cycles' ratios, and with two rounds or more the interval is Student-t over rounds, so it
    holds both levels: the cycles' noise is inside each round's value, the spread between
    fresh processes is what the interval measures. One lockstep round: a t interval over its
    cycles (the between-process level is not in it, and the method says so). One round of
    separate processes: the ratio of the two medians with the bootstrap interval over their
    repetitions."""
    ra, rb = round_values(a, metric), round_values(b, metric)
    both = {i: {"contended": ra[i]["contended"] or rb[i]["contended"]} for i in ra.keys() & rb.keys()}
    uneven = sum(1 for i in both if ra[i]["contended"] != rb[i]["contended"])
    used, kept_contended = _quiet_rounds(both, min_rounds)
    cycles = {i: _cycle_log_ratios(ra[i], rb[i]) for i in used}
    lockstep = bool(used) and all(cycles[i] for i in used)
    if lockstep:
        out = nested_interval([cycles[i] for i in used])
        out["method"] = ("lockstep: a ratio per cycle, restarts as a random effect" if out["n"] > 1 else
                         "lockstep, one restart: cycles in one set of processes (the between-process spread "
                         "is not in it)")
    else:
        out = log_interval([ra[i]["value"] / rb[i]["value"] for i in used])
        out["method"] = "paired rounds (between processes)"
    out.update(rounds=len(both), used_rounds=len(used), contended=kept_contended, uneven=uneven,
               bandwidth_range=_bandwidth_range(ra, rb, rounds=used))
    if out["n"] == 1 and not lockstep:
        ci = ratio_interval(_reps(a, metric), _reps(b, metric))
        out.update(ci95=ci, method="one round: bootstrap over repetitions inside one process (understates spread)")
        if ci:
            out["halfwidth"] = max(ci[1] / out["value"] - 1, 1 - ci[0] / out["value"])
    return out


def _cycle_log_ratios(a: dict[str, Any], b: dict[str, Any]) -> list[float]:
    """log(a / b) per lockstep cycle where both sides ran in the same lockstep session ([]
    otherwise); a side that died mid-way pairs up to its last cycle."""
    ca, cb = a.get("cycles"), b.get("cycles")
    if not ca or not cb or ca.get("session") != cb.get("session"):
        return []
    return [math.log(x / y) for x, y in zip(ca["values"], cb["values"]) if x and y]


def spread(record: dict[str, Any], metric: str, min_rounds: int = 3) -> dict[str, Any]:
    """One point's `metric` over its rounds: geometric mean and 95 % interval."""
    rv = round_values(record, metric)
    used, kept_contended = _quiet_rounds(rv, min_rounds)
    return {**log_interval([rv[i]["value"] for i in used]), "rounds": len(rv), "contended": kept_contended}


def round_values(record: dict[str, Any], metric: str) -> dict[int, dict[str, Any]]:
    """Per ok round of a folded record: its `metric` value, contention, bandwidth and, for a
    lockstep round, its session and per-cycle values (`cycles`; None otherwise)."""
    out = {}
    for r in record.get("rounds") or ():
        if r.get("status") == "ok" and r.get(metric):
            lock = r.get("lockstep") or {}
            cycles = {"session": lock.get("session"), "values": lock[metric]} if lock.get(metric) else None
            out[r["round"]] = {"value": r[metric], "contended": bool(r.get("contended")),
                               "bandwidth": r.get("bandwidth_bytes_s"), "cycles": cycles}
    return out


def _bandwidth_range(*sides: dict[int, dict[str, Any]], rounds: Iterable[int]) -> float | None:
    """max / min of the read bandwidth measured right after each side's timed phase over
    `rounds`: how far the machine itself moved while the verdict was measured."""
    seen = [side[i]["bandwidth"] for side in sides for i in rounds if side[i].get("bandwidth")]
    return max(seen) / min(seen) if len(seen) > 1 else None


def _reps(record: dict[str, Any], metric: str) -> list[float]:
    m = Measurement.of(record)
    return list(m.timings.get(f"{metric}_reps") or []) if m.ok else []


# ------------------------------------------------------------------ folding rounds
def _median_tree(values: list[Any]) -> Any:
    """The median of numbers; dicts folded key by key; anything else: the last value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, bool) for v in present):
        return any(present)
    if all(isinstance(v, (int, float)) for v in present):
        return statistics.median(present)
    if all(isinstance(v, dict) for v in present):
        keys = dict.fromkeys(k for v in present for k in v)
        return {k: _median_tree([v.get(k) for v in present]) for k in keys}
    return present[-1]


def round_summary(m: Measurement) -> dict[str, Any]:
    """What a collapsed record keeps of one round."""
    contention = m.timed_contention
    return {"round": m.round, "status": m.status, "error": m.error,
            "decode_tok_s": m.metrics.get("decode_tok_s"), "prefill_tok_s": m.metrics.get("prefill_tok_s"),
            "rss_after_load_bytes": m.memory.get("rss_after_load_bytes"),
            "bandwidth_bytes_s": m.bandwidth_after_timed.get("bytes_s"),
            "contended": bool(contention.get("contended")), "others_cores": contention.get("others_cores"),
            "steal_share": contention.get("steal_share"), "wall_s": m.wall_s,
            "started_at": m.started_at, "resumed": m.resumed,
            **({"lockstep": _lockstep_summary(m.lockstep)} if m.lockstep else {})}


def _lockstep_summary(lock: dict[str, Any]) -> dict[str, Any]:
    """What a collapsed record keeps of a lockstep round: the session it shared with the
    other sides and its per-cycle unit rates (what the verdict's ratios are made of)."""
    return {"session": lock.get("session"), "decode_tok_s": lock.get("decode_tok_s"),
            "prefill_tok_s": lock.get("prefill_tok_s")}


def collapse(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per point (first-seen order) from per-round records: metrics and memory are
    medians over the point's ok rounds, `rounds` lists every round, `spread` gives each
    speed's interval over rounds. Already-collapsed records pass through. A `retry` record
    (the fleet could not measure the point) gives way once the point has any other."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    out_order: list[Any] = []
    for r in records:
        if "rounds" in r:
            out_order.append(r)
            continue
        key = r.get("key")
        if key not in by_key:
            by_key[key] = []
            out_order.append(key)
        by_key[key].append(r)
    out = []
    for item in out_order:
        if isinstance(item, dict):
            out.append(item)
            continue
        rs = sorted((Measurement.of(r) for r in by_key[item]), key=lambda m: m.round)
        rs = [m for m in rs if not m.retry] or rs  # the fleet's failures, once measured again
        ok = [m for m in rs if m.ok]
        base = dict((ok or rs)[-1].record)
        base.pop("round", None)
        base["rounds"] = [round_summary(m) for m in rs]
        base["resumed"] = all(m.resumed for m in rs)
        if ok and ok[0].phases_s:  # later lockstep restarts load side by side
            base["phases_s"] = ok[0].phases_s
        for extra in ONCE.values():  # measured in a point's first round only
            found = next((m.record[extra] for m in rs if m.record.get(extra) is not None), None)
            if found is not None:
                base[extra] = found
        if ok:
            base["metrics"] = _median_tree([m.record.get("metrics") for m in ok])
            base["memory"] = _median_tree([m.record.get("memory") for m in ok])
            for name in ("paging", "cap"):  # a capped point: each round evicts, loads cold, pages
                if any(m.record.get(name) for m in ok):
                    base[name] = _median_tree([m.record.get(name) for m in ok])
            base["contended"] = any(r["contended"] for r in base["rounds"] if r["status"] == "ok")
            errors = [f"round {m.round + 1}: {m.error}" for m in rs if not m.ok]
            if errors:
                base["round_errors"] = errors
            min_rounds = (base.get("protocol") or {}).get("min_rounds", 3)
            base["spread"] = {m: spread(base, m, min_rounds) for m in METRICS if base["metrics"].get(m)}
        out.append(base)
    return out


# ------------------------------------------------------------------ scheduling
@attrs.define
class _State:
    """Per point key: its per-round records so far (folded on demand)."""

    records: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        self.records.setdefault(record["key"], []).append(record)

    def folded(self, key: str) -> dict[str, Any] | None:
        rs = self.records.get(key)
        return collapse(rs)[0] if rs else None

    def rounds(self, key: str) -> int:
        return len(self.records.get(key, ()))

    def first_failed(self, key: str) -> bool:
        rs = sorted(self.records.get(key, ()), key=lambda r: r.get("round", 0))
        return bool(rs) and rs[0].get("status") != "ok"


def _needs_round(comp: Comparison, state: _State, protocol: Protocol, limits: bool = True) -> set[str]:
    """Keys of the comparison's points that another round would help (`limits`: and that
    max-rounds still allows). With a target of 0 only min-rounds counts."""
    def runnable(p: "Point") -> bool:
        return not state.first_failed(p.key) and (not limits or state.rounds(p.key) < protocol.max_rounds)

    if protocol.target <= 0:
        return {p.key for p in comp.sides if runnable(p) and state.rounds(p.key) < protocol.min_rounds}

    by_key = {p.key: p for p in comp.sides}
    need: set[str] = set()
    for pair in comp.pairs:
        moe, other = by_key[pair.moe], by_key[pair.other]
        if not (runnable(moe) and runnable(other)):
            continue
        a, b = state.folded(moe.key), state.folded(other.key)
        if a is None or b is None or a.get("status") != "ok" or b.get("status") != "ok":
            if state.rounds(moe.key) < protocol.min_rounds or state.rounds(other.key) < protocol.min_rounds:
                need |= {moe.key, other.key}
            continue
        stats = [paired(a, b, m, protocol.min_rounds) for m in METRICS if a["metrics"].get(m)]
        if any(s["used_rounds"] < protocol.min_rounds or s["halfwidth"] > protocol.target for s in stats):
            need |= {moe.key, other.key}
    for p in comp.sides:
        if p.key in comp.paired_keys or not runnable(p):
            continue
        rec = state.folded(p.key)
        if rec is None or state.rounds(p.key) < protocol.min_rounds:
            need.add(p.key)
        elif rec.get("status") == "ok" and any(
                s["n"] < protocol.min_rounds or s["halfwidth"] > protocol.target for s in rec["spread"].values()):
            need.add(p.key)
    return need


def run_rounds(points: Sequence["Point"], executor: Any, protocol: Protocol, *,
               previous: Iterable[dict[str, Any]] = (),
               record: Callable[[dict[str, Any]], None] = lambda r: None,
               on_start: Callable[[int, int, "Point"], None] | None = None,
               before_round: Callable[[], None] | None = None,
               default_precision: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Run `points` in rounds until the protocol is satisfied; every new per-round record
    goes to `record` as it finishes. `previous` records (a resumed file) count as done.

    A comparison (`moerun.comparison`) whose executor can hold its sides together
    (`executor.together(points)` says why not) runs each round in lockstep
    (`executor.run_together`): every side of the comparison that still runs, at once;
    else its sides run one after another in a shuffled order. Returns {"records": every
    per-round record, "stopped": why rounds stopped, "elapsed_s", "lockstep": why each
    comparison ran as it did}."""
    state = _State()
    for r in previous:
        state.add({**r, "round": r.get("round", 0), "resumed": True})
    comps = comparisons(points, default_precision)
    rng = random.Random(protocol.seed)
    next_round = 1 + max((r.get("round", 0) for rs in state.records.values() for r in rs), default=-1)
    t0 = time.monotonic()
    stopped = "every verdict met the target" if protocol.target > 0 else f"{protocol.min_rounds} rounds"
    done_count = 0
    together: dict[tuple, bool] = {}  # per comparison: lockstep, else sequential rounds
    how: dict[tuple, str] = {}  # and in words, for the closing lines
    for comp in comps:
        ok, why = (executor.together(list(comp.sides)) if protocol.lockstep and hasattr(executor, "together")
                   else (False, "lockstep off" if not protocol.lockstep else "this executor runs points one by one"))
        together[comp.key] = ok
        how[comp.key] = "lockstep" if ok else f"sequential rounds ({why})"

    def stamp(result: dict[str, Any], p: "Point", wall: float) -> None:
        result["wall_s"] = wall
        result["key"], result["point"] = p.key, p.to_dict()
        result["round"] = next_round
        result["protocol"] = protocol.to_dict()
        state.add(result)
        record(result)

    while True:
        plan = [(c, _needs_round(c, state, protocol)) for c in comps]
        plan = [(c, need) for c, need in plan if need]
        if not plan:
            break
        rng.shuffle(plan)
        ran = False
        for comp, need in plan:
            lockstep = together[comp.key]
            runnable = [p for p in comp.sides if not state.first_failed(p.key)
                        and state.rounds(p.key) < protocol.max_rounds]
            todo = runnable if lockstep else [p for p in comp.sides if p.key in need]
            opening = any(state.rounds(p.key) == 0 for p in todo)  # round 1 always runs in full
            if not opening and protocol.budget_s is not None:
                projected = sum(_last_wall(state, p.key) for p in todo)
                if time.monotonic() - t0 + projected > protocol.budget_s:
                    stopped = f"the time budget ({protocol.budget_s:g} s) ran out"
                    continue
            rng.shuffle(todo)
            if before_round:
                before_round()
            def this_round(p: "Point") -> "Point":  # breakdown and parity run in a point's first round only
                return p if state.rounds(p.key) == 0 else attrs.evolve(p, **{k: False for k in ONCE})

            if lockstep and len(todo) > 1:
                for p in todo:
                    if on_start:
                        on_start(done_count, next_round, p)
                    done_count += 1
                started = time.perf_counter()
                results = executor.run_together([this_round(p) for p in todo], protocol=protocol,
                                                seed=rng.randrange(1 << 30), first=opening)
                wall = (time.perf_counter() - started) / len(todo)
                for p, result in zip(todo, results):
                    stamp(result, p, wall)
            else:
                for p in todo:
                    if on_start:
                        on_start(done_count, next_round, p)
                    started = time.perf_counter()
                    result = executor.run(this_round(p))
                    stamp(result, p, time.perf_counter() - started)
                    done_count += 1
            ran = True
        if not ran:
            break
        next_round += 1
    if "budget" not in stopped and any(_needs_round(c, state, protocol, limits=False) for c in comps):
        stopped = f"max-rounds ({protocol.max_rounds}) reached"
    return {"records": [r for rs in state.records.values() for r in rs], "stopped": stopped,
            "elapsed_s": time.monotonic() - t0, "lockstep": how}


def _last_wall(state: _State, key: str) -> float:
    walls = [r.get("wall_s") for r in state.records.get(key, ()) if r.get("wall_s")]
    return walls[-1] if walls else 0.0
