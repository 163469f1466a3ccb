"""What every text reporter shows, as headers and cells (strings): the results table's
columns and the verdict, baseline, iso-memory, coverage, memory-fit, maturity and breakdown
tables. The table and Markdown reporters lay these out; nothing here prints."""

from __future__ import annotations

from typing import Any, Callable

from moerun.analysis import cap_crossovers, human_count
from moerun.breakdown import CATEGORIES
from moerun.ladder import ladders
from moerun.memcap import cap_label
from moerun.records import PointResult
from moerun.routing import routing_label

Row = dict[str, Any]  # a verdict row (moerun.analysis.verdicts)
Table = tuple[list[str], list[list[str]]]  # headers, cells


def fmt(value: Any, spec: str) -> str:
    if value is None or value == "":
        return "-"
    try:
        return spec.format(value)
    except (ValueError, TypeError):
        return str(value)


def _gb(x: float | None) -> float | None:
    return None if x is None else x / 1e9


def mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def _params(r: PointResult) -> str:
    if not r.model:
        return ""
    t, a = r.model["total_params"], r.model["active_params"]
    return human_count(t) if t == a else f"{human_count(t)}/{human_count(a)}"


def _rounds(r: PointResult) -> str:
    ok = sum(1 for x in r.rounds if x.get("status") == "ok")
    return str(ok) if ok == len(r.rounds) else f"{ok}/{len(r.rounds)}"


def _spread(r: PointResult, metric: str) -> float | None:
    hw = (r.spread.get(metric) or {}).get("halfwidth")
    return hw if hw is not None and hw != float("inf") else None


def _busy(r: PointResult) -> str:
    """'k/n' rounds measured under contention, blank when none."""
    rounds = [x for x in r.rounds if x.get("status") == "ok"]
    busy = sum(1 for x in rounds if x.get("contended"))
    return f"{busy}/{len(rounds)}" if busy else ""


def _mbu(r: PointResult) -> Any:
    return "exceeds probe" if (r.metrics.get("mbu") or 0) > 1 else r.metrics.get("mbu")


Column = tuple[str, Callable[[PointResult], Any], str]  # header, getter, format
COLUMNS: list[Column] = [
    ("model", lambda r: r.model_name, "{}"),
    ("role", lambda r: r.role, "{}"),
    ("backend", lambda r: r.backend, "{}"),
    ("prec", lambda r: r.precision or "", "{}"),
    ("status", lambda r: r.status, "{}"),
    ("params", _params, "{}"),
    ("rounds", _rounds, "{}"),
    ("prefill tok/s", lambda r: r.metrics.get("prefill_tok_s"), "{:,.0f}"),
    ("decode tok/s", lambda r: r.metrics.get("decode_tok_s"), "{:,.1f}"),
    ("±", lambda r: _spread(r, "decode_tok_s"), "{:.1%}"),
    ("decode p90 ms", lambda r: (r.timings.get("decode_token_ms") or {}).get("p90"), "{:.2f}"),
    ("GB/s", lambda r: _gb(r.metrics.get("achieved_bandwidth_bytes_s")), "{:.1f}"),
    ("MBU", _mbu, "{:.0%}"),
    ("MBU now", lambda r: r.metrics.get("mbu_now"), "{:.0%}"),
    ("RSS loaded MiB", lambda r: mib(r.memory.get("rss_after_load_bytes")), "{:,.0f}"),
    ("peak MiB", lambda r: mib(r.memory.get("peak_rss_bytes")), "{:,.0f}"),
    ("busy", _busy, "{}"),
]
LEFT = ("hardware", "model", "role", "backend", "prec", "batch", "options", "status", "params")


def columns(results: list[PointResult]) -> list[Column]:
    """COLUMNS, led by the fleet label when any result was measured on a labelled node, with
    a batch column when any point decoded several sequences, and the backend options after
    the precision when they differ between results (a sweep)."""
    out = list(COLUMNS)
    if any(r.batch_size > 1 for r in results):
        out.insert([h for h, _, _ in out].index("prec") + 1, ("batch", lambda r: r.batch_size, "{}"))
    if len({r.options_text for r in results}) > 1:
        out.insert([h for h, _, _ in out].index("prec") + 1, ("options", lambda r: r.options_text, "{}"))
    if any(r.routing_name != "random" for r in results):
        out.insert([h for h, _, _ in out].index("prec") + 1, ("routing", lambda r: routing_label(r.routing_name), "{}"))
    if any(r.memory_cap for r in results):
        out.insert([h for h, _, _ in out].index("prec") + 1, ("cap", lambda r: cap_label(r.memory_cap), "{}"))
    if any(r.hardware for r in results):
        out.insert(0, ("hardware", lambda r: r.hardware or "", "{}"))
    return out


def results_table(results: list[PointResult]) -> Table:
    cols = columns(results)
    return [h for h, _, _ in cols], [[fmt(get(r), spec) for _, get, spec in cols] for r in results]


def failures(results: list[PointResult]) -> list[tuple[str, str]]:
    """(status, 'model on backend @ label: error') of every point that did not run."""
    return [(r.status, f"{r.model_name} on {r.backend}{f' @ {r.hardware}' if r.hardware else ''}: {r.error}")
            for r in results if not r.ok]


def _batched(rows: list[Row]) -> bool:
    """Whether any verdict row decoded several sequences (tables then show a batch column)."""
    return any((row.get("batch_size") or 1) > 1 for row in rows)


TWIN_KEYS = ("decode_vs_active", "prefill_vs_active", "decode_vs_total", "prefill_vs_total")
ISOMEM_KEYS = ("decode_vs_isomem", "prefill_vs_isomem")
FIT_KEYS = ("decode_vs_fit", "prefill_vs_fit")


def _capped(rows: list[Row]) -> bool:
    """Whether any verdict row was measured under a memory cap (tables then show it)."""
    return any(row.get("memory_cap") for row in rows)


def _cap_cells(rows: list[Row], row: Row) -> list[str]:
    return [cap_label(row.get("memory_cap"))] if _capped(rows) else []


def _routed(rows: list[Row]) -> bool:
    """Whether any verdict row was measured under a requested routing (tables then show it)."""
    return any((row.get("routing") or "random") != "random" for row in rows)


def _routing_cells(rows: list[Row], row: Row) -> list[str]:
    return [routing_label(row.get("routing"))] if _routed(rows) else []


def _lead(rows: list[Row]) -> list[str]:
    """The 'hardware' header for verdict-like rows from a fleet, else nothing."""
    return ["hardware"] if any(row.get("hardware") for row in rows) else []


def _lead_cells(rows: list[Row], row: Row) -> list[str]:
    return [str(row.get("hardware") or "")] if _lead(rows) else []


def _model_cell(rows: list[Row], row: Row) -> str:
    """A verdict's model, with its options when the rows differ in them (a sweep)."""
    if len({r.get("options") or "" for r in rows}) > 1 and row.get("options"):
        return f"{row['group']} [{row['options']}]"
    return str(row["group"])


def _ratio(row: Row, key: str) -> str:
    value, ci = row.get(key), row.get(key + "_ci95")
    if value is None:
        return "-"
    return f"{value:.2f}x" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")


BANDWIDTH_MOVED = 1.5  # max / min read bandwidth over a verdict's rounds that the flags mention


def _precision_cell(halfwidth: float | None, missed: bool) -> str:
    """The verdict's achieved half-width, marked when it missed the target."""
    if halfwidth is None:
        return "-"
    text = "no interval" if halfwidth == float("inf") else f"±{halfwidth:.1%}"
    return text + (" MISSED" if missed else "")


def _flags(row: Row) -> str:
    flags = []
    if row.get("contended"):
        flags.append("contended")
    if row.get("uneven_rounds"):
        flags.append(f"uneven x{row['uneven_rounds']}")
    if (row.get("method") or "").startswith("one round"):
        flags.append("one round")
    if (row.get("bandwidth_range") or 1.0) >= BANDWIDTH_MOVED:
        flags.append(f"bandwidth moved x{row['bandwidth_range']:.2f}")
    return ", ".join(flags)


def twin_rows(rows: list[Row]) -> list[Row]:
    """The verdict rows with a twin (not only named baselines)."""
    return [row for row in rows if any(row.get(k) is not None for k in TWIN_KEYS + ISOMEM_KEYS + FIT_KEYS)]


def verdict_table(rows: list[Row]) -> Table:
    """The verdict: a batch column when any row decodes several sequences, the iso-memory
    ratios when any row has an iso-memory twin."""
    rows = twin_rows(rows)
    batch = _batched(rows)
    keys = (TWIN_KEYS + (ISOMEM_KEYS if any(row.get("isomem") for row in rows) else ())
            + (FIT_KEYS if any(row.get("fit_twin") for row in rows) else ()))
    headers = [*_lead(rows), "model", "backend", "precision", *(["routing"] if _routed(rows) else []),
               *(["cap"] if _capped(rows) else []), "prompt",
               *(["batch"] if batch else []), *(k.replace("_", " ") for k in keys), "ideal decode vs total",
               "realised", "rounds", "precision got", "flags"]
    cells = []
    for row in rows:
        cells.append([*_lead_cells(rows, row), _model_cell(rows, row), row["backend"], row["precision"] or "",
                      *_routing_cells(rows, row), *_cap_cells(rows, row),
                      str(row.get("prompt_tokens") or ""), *([str(row.get("batch_size") or 1)] if batch else []),
                      *[_ratio(row, k) for k in keys], fmt(row.get("ideal_decode_vs_total"), "{:.2f}x"),
                      fmt(row.get("realised_share_decode"), "{:.0%}"), str(row.get("rounds") or "-"),
                      _precision_cell(row.get("halfwidth"), bool(row.get("missed_target"))), _flags(row)])
    return headers, cells


def baseline_table(rows: list[Row]) -> Table:
    """MoE over each named dense baseline of the same backend, precision and workload."""
    based = [(row, name, b) for row in rows for name, b in (row.get("baselines") or {}).items()]
    based_rows = [row for row, _, _ in based]
    batch = _batched(based_rows)
    headers = [*_lead(based_rows), "model", "baseline", "backend", "precision",
               *(["routing"] if _routed(based_rows) else []), *(["cap"] if _capped(based_rows) else []), "prompt",
               *(["batch"] if batch else []), "decode", "prefill", "precision got"]
    cells = []
    for row, name, b in based:
        hw = max((b[k] for k in ("decode_hw", "prefill_hw") if b.get(k) is not None), default=None)
        missed = bool(row.get("target")) and hw is not None and hw > row["target"]
        cells.append([*_lead_cells(based_rows, row), str(row["group"]), name, row["backend"], row["precision"] or "",
                      *_routing_cells(based_rows, row), *_cap_cells(based_rows, row), str(row.get("prompt_tokens") or ""), *([str(row.get("batch_size") or 1)] if batch else []),
                      _ratio(b, "decode"), _ratio(b, "prefill"), _precision_cell(hw, missed)])
    return headers, cells


def paging_table(results: list[PointResult]) -> Table:
    """Every capped point: speed under the cap, the cold start (engine file evicted: load and
    first prefill), storage bytes and major faults per decoded token against the prediction
    (moerun.predict.paged_reads), the engine file's resident share after the timed work, the
    memory that cannot page, the cgroup's peak, and whether it ran or was killed."""
    rows = [r for r in results if r.memory_cap]
    lead = any(r.hardware for r in rows)
    options = len({r.options_text for r in rows}) > 1
    headers = [*(["hardware"] if lead else []), "model", "role", "backend", "precision", *(["options"] if options else []),
               "cap", "outcome",
               "decode tok/s", "prefill tok/s", "cold TTFT s", "storage MB/token", "predicted MB/token",
               "read ampl.", "faults/token", "file resident", "anon MiB", "cgroup peak MiB"]
    cells = []
    for r in rows:
        p, c = r.paging, r.cap
        dec = p.get("decode") or {}
        res = p.get("resident_after_timed") or {}
        share = res["resident_bytes"] / res["bytes"] if res.get("bytes") else None
        outcome = c.get("outcome") or ("killed" if "killed" in (r.error or "") else r.status)
        cells.append([*([r.hardware or ""] if lead else []), r.model_name, r.role, r.backend, str(r.precision or ""),
                      *([r.options_text] if options else []), cap_label(r.memory_cap), outcome if r.ok or outcome != "ran" else r.status,
                      fmt(r.metrics.get("decode_tok_s"), "{:,.2f}"), fmt(r.metrics.get("prefill_tok_s"), "{:,.1f}"),
                      fmt((p.get("cold") or {}).get("ttft_s"), "{:.2f}"),
                      fmt(_mb(dec.get("read_bytes_per_token")), "{:,.1f}"),
                      fmt(_mb((p.get("predicted") or {}).get("read_bytes_per_token")), "{:,.1f}"),
                      fmt(p.get("read_amplification"), "{:.2f}x"), fmt(dec.get("major_faults_per_token"), "{:,.1f}"),
                      fmt(share, "{:.0%}"), fmt(mib(p.get("held_anon_bytes")), "{:,.0f}"),
                      fmt(mib(c.get("peak_bytes")), "{:,.0f}")])
    return headers, cells


def _mb(x: float | None) -> float | None:
    return None if x is None else x / 1e6


def crossover_table(crossings: list[Row]) -> Table:
    """Per MoE and backend measured under several caps (moerun.analysis.cap_crossovers): its
    decode ratio against the iso-cap dense twin at each cap and where it crosses 1."""
    headers = ["model", "backend", "precision", "decode vs iso-cap twin, by cap", "crossover"]
    cells = []
    for c in crossings:
        by_cap = ", ".join(f"{cap_label(cap)}: {ratio:.2f}x" for cap, ratio in zip(c["caps"], c["ratios"]))
        x = c["crossover"]
        where = (f"near {cap_label(x['memory_cap'])}: the MoE decodes faster {x['moe_wins']} it" if x else
                 ("none: the MoE is faster at every cap" if all(v > 1 for v in c["ratios"]) else
                  "none: the dense twin is faster at every cap"))
        cells.append([str(c["group"]), c["backend"], str(c["precision"] or ""), by_cap, where])
    return headers, cells


def fit_table(results: list[PointResult]) -> Table:
    """Per measured point: its peak RSS in the timed phase and, for each `moerun predict`
    device profile, whether that fits the profile's usable memory (its memory minus the OS
    share; docs/cli.md). Preparation's peak is beside it: it happens once, anywhere."""
    rows = [r for r in results if r.ok and r.fits.get("devices")]
    devices = list(rows[0].fits["devices"]) if rows else []
    headers = ["model", "backend", "precision", "batch", "prepare peak MiB", "timed peak MiB", *devices]
    cells = []
    for r in rows:
        cells.append([r.model_name, r.backend, str(r.precision or ""), str(r.batch_size),
                      fmt(mib(r.memory.get("prepare_peak_bytes")), "{:,.0f}"),
                      fmt(mib(r.fits["peak_bytes"]), "{:,.0f}"),
                      *("fits" if r.fits["devices"].get(d) else "no" for d in devices)])
    return headers, cells


def _parity_cell(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    if not p.get("available"):
        return "n/a"
    kernel = f" ({p['kernel_path']})" if p.get("kernel_path") else ""
    return f"{p['max_abs_diff']:.1e} / {p['top1_agreement']:.0%}{kernel}"


def isomem_table(rows: list[Row]) -> Table:
    """Per MoE point with an iso-memory twin: which dense point was chosen, its parameters
    and bytes against the MoE's, the speed ratios and both sides' parity (max |diff| / top-1
    against the PyTorch fp32 reference)."""
    iso = [row for row in rows if row.get("isomem")]
    batch = _batched(iso)
    headers = [*_lead(iso), "model", "backend", "precision", *(["routing"] if _routed(iso) else []),
               *(["batch"] if batch else []), "iso-memory dense",
               "its precision", "params (MoE)", "bytes (MoE)", "bytes ratio", "decode vs isomem",
               "prefill vs isomem", "parity MoE", "parity dense"]
    cells = []
    for row in iso:
        f = row["isomem"]
        cells.append([*_lead_cells(iso, row), str(row["group"]), row["backend"], row["precision"] or "",
                      *_routing_cells(iso, row), *([str(row.get("batch_size") or 1)] if batch else []),
                      str(f.get("model") or "").split(":")[-1]
                      + ("" if f.get("status") == "ok" else f" ({f.get('status')})"),
                      str(f.get("precision") or ""),
                      f"{human_count(f['total_params'])} ({human_count(f['moe_total_params'])})"
                      if f.get("total_params") and f.get("moe_total_params") else "-",
                      f"{mib(f['bytes']):,.0f} MiB ({mib(f['moe_bytes']):,.0f} MiB)"
                      if f.get("bytes") and f.get("moe_bytes") else "-",
                      fmt(f.get("bytes_ratio"), "{:.2f}"), _ratio(row, "decode_vs_isomem"),
                      _ratio(row, "prefill_vs_isomem"), _parity_cell(f.get("moe_parity")),
                      _parity_cell(f.get("parity"))])
    return headers, cells


def coverage_table(results: list[PointResult]) -> Table:
    """Distinct experts per decode step and layer (measured from the engine's expert choices)
    next to the requested routing's expectation and uniform routing's E·(1 − (1 − k/E)^B)."""
    rows = [r for r in results if r.metrics.get("expert_coverage")]
    lead = any(r.hardware for r in rows)
    headers = [*(["hardware"] if lead else []), "model", "backend", "precision", "routing", "batch",
               "experts / step (mean)", "min-max", "expected", "uniform expectation", "experts", "top-k"]
    cells = []
    for r in rows:
        c = r.metrics["expert_coverage"]
        cells.append([*([r.hardware or ""] if lead else []), r.model_name, r.backend, str(r.precision or ""),
                      routing_label(r.routing_name), str(int(c["batch_size"])), f"{c['experts_per_step_mean']:.2f}",
                      f"{c['experts_per_step_min']:g}-{c['experts_per_step_max']:g}", fmt(c.get("expected"), "{:.2f}"),
                      f"{c['uniform_expectation']:.2f}", str(int(c["num_experts"])), str(int(c["top_k"]))])
    return headers, cells


def _mean(values: Any) -> float | None:
    return sum(values) / len(values) if values else None


def routing_table(results: list[PointResult]) -> Table:
    """Requested against measured routing, from each MoE point's observed expert choices:
    total variation distance of the per-layer histogram from the requested shares (mean over
    layers, and the distance a fresh sample of the same size shows), entropy, the share of
    experts the next token chooses again, the union at batch 8, and the share of token-layers
    that chose exactly the planted experts."""
    rows = [r for r in results if r.routing.get("histogram")]
    lead = any(r.hardware for r in rows)
    headers = [*(["hardware"] if lead else []), "model", "backend", "precision", "routing", "token-layers",
               "TV (floor)", "entropy bits (requested)", "reuse next (expected)", "experts / step @8 (expected)",
               "planted match"]
    cells = []
    for r in rows:
        g = r.routing
        tv = f"{_mean(g['tv']):.3f} ({_mean(g['tv_sampling_floor']):.3f})" if g.get("tv") else (
            f"{_mean(g['tv_from_uniform']):.3f} from uniform" if g.get("tv_from_uniform") else "-")
        ent = fmt(_mean(g.get("entropy_bits")), "{:.2f}") + (
            f" ({_mean(g['requested_entropy_bits']):.2f})" if g.get("requested_entropy_bits") else "")
        reuse = fmt((g.get("reuse") or {}).get("next_token"), "{:.3f}") + (
            f" ({g['expected_reuse_next_token']:.3f})" if g.get("expected_reuse_next_token") is not None else "")
        at8 = (g.get("experts_per_step") or {}).get("8") or {}
        union = fmt(at8.get("measured"), "{:.2f}") + (f" ({at8['expected']:.2f})" if at8.get("expected") else "")
        cells.append([*([r.hardware or ""] if lead else []), r.model_name, r.backend, str(r.precision or ""),
                      routing_label(r.routing_name), f"{g.get('routed_token_layers', 0):,}", tv, ent, reuse, union,
                      fmt(g.get("planted_match"), "{:.1%}")])
    return headers, cells


def maturity_table(matrix: list[Row]) -> Table:
    """The framework maturity matrix (moerun.analysis.maturity); empty below two cells."""
    if len(matrix) < 2:
        return [], []
    headers = [*_lead(matrix), "backend", "model kind", "precision", "verdict", "ok / points", "max |diff|",
               "top-1", "decode tok/s"]
    cells = [[*_lead_cells(matrix, m), str(m["backend"]), m["kind"], str(m["precision"] or ""), m["verdict"],
              f"{m['ok']} / {m['points']}", fmt(m["max_abs_diff"], "{:.1e}"), fmt(m["min_top1"], "{:.0%}"),
              fmt(m["decode_tok_s"], "{:,.1f}")] for m in matrix]
    return headers, cells


def breakdown_table(results: list[PointResult]) -> Table:
    """Decode (else prefill) time by category, as shares of the instrumented sum."""
    rows = [r for r in results if r.breakdown.get("available")]
    headers = ["model", "backend", *CATEGORIES, "sum / plain", "router / MoE block"]
    cells = []
    for r in rows:
        d = r.breakdown.get("decode") or r.breakdown["prefill"]
        cells.append([r.model_name, r.backend, *[fmt(d["shares"][c], "{:.0%}") for c in CATEGORIES],
                      fmt(d.get("sum_over_plain"), "{:.2f}"), fmt(d.get("router_share_of_moe_block"), "{:.1%}")])
    return headers, cells


def _us(value: float | None, ci: list[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.0f}" + (f" [{ci[0]:+.0f}, {ci[1]:+.0f}]" if ci else "")


def _share(step: dict[str, Any]) -> str:
    ci = step.get("share_ci95")
    return fmt(step.get("share"), "{:.0%}") + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if ci else "")


def ladder_table(ladder_rows: list[Row]) -> Table:
    """The ablation ladder (moerun.ladder): per comparison and phase, the MoE's gap to its
    active twin in microseconds per token and each step's part of it, with 95 % intervals;
    the operations per decode step of the rungs and the dispatch cost they imply."""
    headers = ["model", "backend", "precision", "batch", "phase", "gap us/token", "shape & dispatch",
               "share", "routing", "share", "sparsity", "share", "ops active/split/fixed/MoE", "us / op",
               "breakdown router / gap"]
    cells = []
    for row in ladder_rows:
        ops = "/".join("-" if r["ops"] is None else str(r["ops"]) for r in row["rungs"])
        d = row["dispatch"]
        for phase in ("decode", "prefill"):
            ph = row.get(phase)
            if not ph:
                continue
            steps = {s["step"]: s for s in ph["steps"]}
            out = [row["group"], row["backend"], row["precision"] or "-", str(row["batch_size"]), phase,
                   _us(ph["gap_us"], ph["gap_us_ci95"])]
            for name in ("shape", "routing", "sparsity"):
                st = steps.get(name)
                out += [_us(st["us"], st["us_ci95"]), _share(st)] if st else ["-", "-"]
            first = phase == "decode"
            out += [ops if first else "", (_us(d["us_per_op"], d["us_per_op_ci95"]).lstrip("+")
                                           if first and d.get("available") else "-"),
                    fmt((row.get("breakdown") or {}).get("router_share_of_gap"), "{:.0%}") if first else ""]
            cells.append(out)
    return headers, cells


def machine_line(results: list[PointResult]) -> str | None:
    """The machine and the bandwidth MBU divides by, from the first result that has them."""
    env = next((r.env for r in results if r.env), None)
    if not env or not env.get("bandwidth_bytes_s"):
        return None
    return (f"machine: {env.get('cpu_model')}, {env.get('cores')} cores, read bandwidth "
            f"{env['bandwidth_bytes_s'] / 1e9:.1f} GB/s (MBU = achieved / the larger of this and a quick probe right "
            f"after each point; {env.get('bandwidth_source', '')})")


RIGHT = ("prompt", "batch", "decode", "prefill", "ok / points", "max |diff|", "top-1", "decode tok/s", "token-layers",
         "prefill tok/s", "cold TTFT s", "storage MB/token", "predicted MB/token", "read ampl.", "faults/token",
         "file resident", "anon MiB", "cgroup peak MiB",
         *(k.replace("_", " ") for k in TWIN_KEYS + ISOMEM_KEYS + FIT_KEYS), "ideal decode vs total", "realised", "rounds",
         "precision got", *CATEGORIES, "sum / plain", "router / MoE block")


def sections(results: list[PointResult], rows: list[Row], matrix: list[Row]) -> list[tuple[str, Table]]:
    """Every table after the results table, titled, in the order reporters show them (empty
    ones included: a reporter skips those). The memory-fit table is there when a point asked
    for --fit."""
    target = next((row["target"] for row in twin_rows(rows) if row.get("target")), None)
    return [
        ("MoE / dense twin (tokens/s ratio, geometric mean over rounds [95 % interval between processes]; "
         "> 1 means the MoE is faster" + (f"; target ±{target:.0%})" if target else ")"), verdict_table(rows)),
        ("MoE / named dense baseline (tokens/s ratio; > 1 means the MoE is faster)", baseline_table(rows)),
        ("Iso-memory: the MoE against the dense model holding its bytes at a harder precision "
         "(parity: max |diff| / top-1 against PyTorch fp32)", isomem_table(rows)),
        ("Experts touched per decode step and layer (the union over the batch) against the requested routing's "
         "expectation and uniform routing's", coverage_table(results)),
        ("Routing: requested against measured (the engine's expert choices in an untimed pass)",
         routing_table(results)),
        ("Memory caps: paging under each point's cap (cold TTFT: the engine file evicted, load + first prefill; "
         "predicted: moerun.predict.paged_reads; read ampl.: measured / predicted)", paging_table(results)),
        ("Memory caps: where the MoE and the largest dense model that fits the cap trade places",
         crossover_table(cap_crossovers(rows))),
        ("Memory: does the measured peak fit each device profile (its memory minus the OS share)",
         fit_table(results) if any(r.point.get("fit") for r in results) else ([], [])),
        ("Framework maturity: does it run, does it agree with PyTorch fp32, how fast", maturity_table(matrix)),
        ("Decode time by category (share of the instrumented sum; the engine's own instrument)",
         breakdown_table(results)),
        ("Why the MoE is behind: the ablation ladder (active twin -> split twin -> fixed-route MoE -> MoE), "
         "microseconds per token each step adds [95 % interval] and its share of the gap; us / op: the dispatch "
         "cost the split twin's extra operations imply", ladder_table(ladders(results))),
    ]
