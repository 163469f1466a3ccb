"""Built-in reporters: table (rich), json, csv, markdown. A plugin like any other."""

from __future__ import annotations

import csv as _csv
import json as _json
from typing import Any, TextIO

from moerun import hookimpl
from moerun.analysis import hardware, human_count, maturity, options_text, verdicts

COLUMNS = [
    # (header, getter, format)
    ("model", lambda r: r.get("model_name", ""), "{}"),
    ("role", lambda r: r.get("role", ""), "{}"),
    ("backend", lambda r: r.get("backend", ""), "{}"),
    ("prec", lambda r: r.get("precision") or "", "{}"),
    ("status", lambda r: r.get("status", ""), "{}"),
    ("params", lambda r: _params(r), "{}"),
    ("rounds", lambda r: _rounds(r), "{}"),
    ("prefill tok/s", lambda r: _m(r, "prefill_tok_s"), "{:,.0f}"),
    ("decode tok/s", lambda r: _m(r, "decode_tok_s"), "{:,.1f}"),
    ("±", lambda r: _spread(r, "decode_tok_s"), "{:.1%}"),
    ("decode p90 ms", lambda r: r.get("timings", {}).get("decode_token_ms", {}).get("p90"), "{:.2f}"),
    ("GB/s", lambda r: _gb(_m(r, "achieved_bandwidth_bytes_s")), "{:.1f}"),
    ("MBU", lambda r: "exceeds probe" if (_m(r, "mbu") or 0) > 1 else _m(r, "mbu"), "{:.0%}"),
    ("MBU now", lambda r: _m(r, "mbu_now"), "{:.0%}"),
    ("RSS loaded MiB", lambda r: _mib((r.get("memory") or {}).get("rss_after_load_bytes")), "{:,.0f}"),
    ("peak MiB", lambda r: _mib((r.get("memory") or {}).get("peak_rss_bytes")), "{:,.0f}"),
    ("busy", lambda r: _busy(r), "{}"),
]


def _columns(results: list[dict[str, Any]]) -> list[tuple]:
    """COLUMNS, led by the fleet label when any result was measured on a labelled node, and
    with the backend options after the precision when they differ between results (a sweep)."""
    columns = list(COLUMNS)
    if any(_batch(r) > 1 for r in results):
        at = [h for h, _, _ in columns].index("prec") + 1
        columns.insert(at, ("batch", _batch, "{}"))
    if len({options_text(r) for r in results}) > 1:
        at = [h for h, _, _ in columns].index("prec") + 1
        columns.insert(at, ("options", options_text, "{}"))
    if any(hardware(r) for r in results):
        columns.insert(0, ("hardware", lambda r: hardware(r) or "", "{}"))
    return columns


def _batch(r: dict[str, Any]) -> int:
    return (r.get("point") or {}).get("batch_size") or 1


def _batched(rows: list[dict[str, Any]]) -> bool:
    """Whether any verdict row decoded several sequences (tables then show a batch column)."""
    return any((row.get("batch_size") or 1) > 1 for row in rows)


TWIN_KEYS = ("decode_vs_active", "prefill_vs_active", "decode_vs_total", "prefill_vs_total")
ISOMEM_KEYS = ("decode_vs_isomem", "prefill_vs_isomem")


def verdict_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The verdict as headers and cells (shared by the table and Markdown reporters): a
    batch column when any row decodes several sequences, the iso-memory ratios when any
    row has an iso-memory twin."""
    batch = _batched(rows)
    keys = TWIN_KEYS + (ISOMEM_KEYS if any(row.get("isomem") for row in rows) else ())
    headers = [*_lead(rows), "model", "backend", "precision", "prompt", *(["batch"] if batch else []),
               *(k.replace("_", " ") for k in keys), "ideal decode vs total", "realised", "rounds",
               "precision got", "flags"]
    cells = []
    for row in rows:
        cells.append([*_lead_cells(rows, row), _model_cell(rows, row), row["backend"], row["precision"] or "",
                      str(row.get("prompt_tokens") or ""), *([str(row.get("batch_size") or 1)] if batch else []),
                      *[_ratio(row, k) for k in keys], _fmt(row.get("ideal_decode_vs_total"), "{:.2f}x"),
                      _fmt(row.get("realised_share_decode"), "{:.0%}"), str(row.get("rounds") or "-"),
                      _precision_cell(row), _flags(row)])
    return headers, cells


def baseline_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """MoE over each named dense baseline of the same backend, precision and workload."""
    based = [(row, name, b) for row in rows for name, b in (row.get("baselines") or {}).items()]
    based_rows = [row for row, _, _ in based]
    batch = _batched(based_rows)
    headers = [*_lead(based_rows), "model", "baseline", "backend", "precision", "prompt",
               *(["batch"] if batch else []), "decode", "prefill", "precision got"]
    cells = []
    for row, name, b in based:
        hw = max((b[k] for k in ("decode_hw", "prefill_hw") if b.get(k) is not None), default=None)
        cells.append([*_lead_cells(based_rows, row), str(row["group"]), name, row["backend"], row["precision"] or "",
                      str(row.get("prompt_tokens") or ""), *([str(row.get("batch_size") or 1)] if batch else []),
                      _ratio(b, "decode"), _ratio(b, "prefill"),
                      _precision_cell({"halfwidth": hw, "missed_target": bool(row.get("target")) and hw is not None
                                       and hw > row["target"]})])
    return headers, cells


def fit_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per measured point: its peak RSS in the timed phase and, for each `moerun predict`
    device profile, whether that fits the profile's usable memory (its memory minus the OS
    share; docs/cli.md). Preparation's peak is beside it: it happens once, anywhere."""
    rows = [r for r in results if r.get("status") == "ok" and (r.get("fits") or {}).get("devices")]
    devices = list(rows[0]["fits"]["devices"]) if rows else []
    headers = ["model", "backend", "precision", "batch", "prepare peak MiB", "timed peak MiB", *devices]
    cells = []
    for r in rows:
        mem = r.get("memory") or {}
        cells.append([str(r.get("model_name")), str(r.get("backend")), str(r.get("precision") or ""), str(_batch(r)),
                      _fmt(_mib(mem.get("prepare_peak_bytes")), "{:,.0f}"),
                      _fmt(_mib(r["fits"]["peak_bytes"]), "{:,.0f}"),
                      *("fits" if r["fits"]["devices"].get(d) else "no" for d in devices)])
    return headers, cells


def _parity_cell(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    if not p.get("available"):
        return "n/a"
    kernel = f" ({p['kernel_path']})" if p.get("kernel_path") else ""
    return f"{p['max_abs_diff']:.1e} / {p['top1_agreement']:.0%}{kernel}"


def isomem_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per MoE point with an iso-memory twin: which dense point was chosen, its parameters
    and bytes against the MoE's, the speed ratios and both sides' parity (max |diff| / top-1
    against the PyTorch fp32 reference)."""
    iso = [row for row in rows if row.get("isomem")]
    batch = _batched(iso)
    headers = [*_lead(iso), "model", "backend", "precision", *(["batch"] if batch else []), "iso-memory dense",
               "its precision", "params (MoE)", "bytes (MoE)", "bytes ratio", "decode vs isomem",
               "prefill vs isomem", "parity MoE", "parity dense"]
    cells = []
    for row in iso:
        f = row["isomem"]
        cells.append([*_lead_cells(iso, row), str(row["group"]), row["backend"], row["precision"] or "",
                      *([str(row.get("batch_size") or 1)] if batch else []),
                      str(f.get("model") or "").split(":")[-1]
                      + ("" if f.get("status") == "ok" else f" ({f.get('status')})"),
                      str(f.get("precision") or ""),
                      f"{human_count(f['total_params'])} ({human_count(f['moe_total_params'])})"
                      if f.get("total_params") and f.get("moe_total_params") else "-",
                      f"{_mib(f['bytes']):,.0f} MiB ({_mib(f['moe_bytes']):,.0f} MiB)"
                      if f.get("bytes") and f.get("moe_bytes") else "-",
                      _fmt(f.get("bytes_ratio"), "{:.2f}"), _ratio(row, "decode_vs_isomem"),
                      _ratio(row, "prefill_vs_isomem"), _parity_cell(f.get("moe_parity")),
                      _parity_cell(f.get("parity"))])
    return headers, cells


def coverage_table(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Distinct experts per decode step and layer (measured from the engine's routing) next
    to the uniform-routing expectation E·(1 − (1 − k/E)^B)."""
    rows = [r for r in results if (r.get("metrics") or {}).get("expert_coverage")]
    headers = [*(["hardware"] if any(hardware(r) for r in rows) else []), "model", "backend", "precision", "batch",
               "experts / step (mean)", "min-max", "uniform expectation", "experts", "top-k"]
    cells = []
    for r in rows:
        c = r["metrics"]["expert_coverage"]
        cells.append([*([str(hardware(r) or "")] if headers[0] == "hardware" else []), str(r.get("model_name")),
                      str(r.get("backend")), str(r.get("precision") or ""), str(c["batch_size"]),
                      f"{c['experts_per_step_mean']:.2f}", f"{c['experts_per_step_min']}-{c['experts_per_step_max']}",
                      f"{c['uniform_expectation']:.2f}", str(c["num_experts"]), str(c["top_k"])])
    return headers, cells


def _model_cell(rows: list[dict[str, Any]], row: dict[str, Any]) -> str:
    """A verdict's model, with its options when the rows differ in them (a sweep)."""
    if len({r.get("options") or "" for r in rows}) > 1 and row.get("options"):
        return f"{row['group']} [{row['options']}]"
    return str(row["group"])


def _lead(rows: list[dict[str, Any]]) -> list[str]:
    """The 'hardware' header for verdict-like rows from a fleet, else nothing."""
    return ["hardware"] if any(row.get("hardware") for row in rows) else []


def _lead_cells(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[str]:
    return [str(row.get("hardware") or "")] if _lead(rows) else []


def _rounds(r: dict[str, Any]) -> str:
    rounds = r.get("rounds") or []
    ok = sum(1 for x in rounds if x.get("status") == "ok")
    return str(ok) if ok == len(rounds) else f"{ok}/{len(rounds)}"


def _spread(r: dict[str, Any], metric: str) -> float | None:
    hw = ((r.get("spread") or {}).get(metric) or {}).get("halfwidth")
    return hw if hw is not None and hw != float("inf") else None


def _busy(r: dict[str, Any]) -> str:
    """'k/n' rounds measured under contention, blank when none."""
    rounds = [x for x in r.get("rounds") or [] if x.get("status") == "ok"]
    busy = sum(1 for x in rounds if x.get("contended"))
    return f"{busy}/{len(rounds)}" if busy else ""


def _m(r: dict[str, Any], key: str) -> Any:
    return r.get("metrics", {}).get(key)


def _gb(x: float | None) -> float | None:
    return None if x is None else x / 1e9


def _mib(x: float | None) -> float | None:
    return None if x is None else x / 2**20


def _params(r: dict[str, Any]) -> str:
    m = r.get("model")
    if not m:
        return ""
    t, a = m["total_params"], m["active_params"]
    return human_count(t) if t == a else f"{human_count(t)}/{human_count(a)}"


def _fmt(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _ratio(row: dict[str, Any], key: str) -> str:
    value, ci = row.get(key), row.get(key + "_ci95")
    if value is None:
        return "-"
    return f"{value:.2f}x" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")


BANDWIDTH_MOVED = 1.5  # max / min read bandwidth over a verdict's rounds that the flags mention


def _precision_cell(row: dict[str, Any]) -> str:
    """The verdict's achieved half-width, marked when it missed the target."""
    hw = row.get("halfwidth")
    if hw is None:
        return "-"
    text = "no interval" if hw == float("inf") else f"±{hw:.1%}"
    return text + (" MISSED" if row.get("missed_target") else "")


def _flags(row: dict[str, Any]) -> str:
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


def table(results: list[dict[str, Any]], stream: TextIO) -> None:
    """Results and the MoE-vs-dense verdict as rich tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from moerun.protocol import collapse

    results = collapse(results)
    console = Console(file=stream, width=220 if not stream.isatty() else None)
    t = Table(title="moerun results (medians over rounds; ± = 95 % half-width of decode tok/s over rounds)",
              header_style="bold")
    columns = _columns(results)
    left = [h for h, _, _ in columns].index("params") + 1
    for i, (header, _, _) in enumerate(columns):
        t.add_column(header, justify="left" if i < left else "right", no_wrap=i < left)
    for r in results:
        t.add_row(*[escape(_fmt(get(r), fmt)) for _, get, fmt in columns])
    console.print(t)
    failures = [r for r in results if r.get("status") not in ("ok",)]
    for r in failures:
        where = f" @ {hardware(r)}" if hardware(r) else ""
        console.print(f"[bold]{r.get('status')}[/]: "
                      + escape(f"{r.get('model_name')} on {r.get('backend')}{where}: {r.get('error')}"),
                      highlight=False)
    rows = verdicts(results)
    twin_rows = [row for row in rows if any(row.get(k) is not None for k in TWIN_KEYS + ISOMEM_KEYS)]
    if twin_rows:
        target = next((row["target"] for row in twin_rows if row.get("target")), None)
        v = Table(title="MoE / dense twin (tokens/s ratio, geometric mean over rounds [95 % interval between "
                        "processes]; > 1 means the MoE is faster"
                        + (f"; target ±{target:.0%})" if target else ")"), header_style="bold")
        headers, cells = verdict_table(twin_rows)
        for h in headers:
            v.add_column(h, justify="left" if h in ("hardware", "model", "backend", "precision", "flags") else "right")
        for c in cells:
            v.add_row(*[escape(x) for x in c])
        console.print(v)
    for title, (headers, cells) in (
            ("iso-memory: the MoE against the dense model holding its bytes at a harder precision "
             "(parity: max |diff| / top-1 against PyTorch fp32)", isomem_table(rows)),
            ("experts touched per decode step and layer (the union over the batch) against uniform routing",
             coverage_table(results)),
            ("memory: does the measured peak fit each device profile (its memory minus the OS share)",
             fit_table(results) if any((r.get("point") or {}).get("fit") for r in results) else ([], []))):
        if cells:
            it = Table(title=title, header_style="bold")
            for h in headers:
                it.add_column(h)
            for c in cells:
                it.add_row(*[escape(x) for x in c])
            console.print(it)
    matrix = maturity(results)
    if len(matrix) > 1:
        mt = Table(title="framework maturity: does it run, does it agree with PyTorch fp32, how fast",
                   header_style="bold")
        for h in (*_lead(matrix), "backend", "model kind", "precision", "verdict", "ok / points", "max |diff|",
                  "top-1", "decode tok/s"):
            mt.add_column(h, justify="right" if h in ("ok / points", "max |diff|", "top-1", "decode tok/s") else "left")
        for m in matrix:
            mt.add_row(*_lead_cells(matrix, m), escape(str(m["backend"])), m["kind"], escape(str(m["precision"] or "")), m["verdict"],
                       f"{m['ok']} / {m['points']}", _fmt(m["max_abs_diff"], "{:.1e}"), _fmt(m["min_top1"], "{:.0%}"),
                       _fmt(m["decode_tok_s"], "{:,.1f}"))
        console.print(mt)
    headers, cells = baseline_table(rows)
    if cells:
        bt = Table(title="MoE / named dense baseline (tokens/s ratio; > 1 means the MoE is faster)",
                   header_style="bold")
        for h in headers:
            bt.add_column(h, justify="right" if h in ("prompt", "batch", "decode", "prefill") else "left")
        for c in cells:
            bt.add_row(*[escape(x) for x in c])
        console.print(bt)
    with_breakdown = [r for r in results if (r.get("breakdown") or {}).get("available")]
    if with_breakdown:
        from moerun.breakdown import CATEGORIES

        b = Table(title="decode time by category (share of the instrumented sum; engine's own instrument)",
                  header_style="bold")
        for h in ("model", "backend", *CATEGORIES, "sum / plain", "router / MoE block"):
            b.add_column(h, justify="left" if h in ("model", "backend") else "right")
        for r in with_breakdown:
            d = r["breakdown"].get("decode") or r["breakdown"]["prefill"]
            b.add_row(escape(str(r.get("model_name"))), escape(str(r.get("backend"))),
                      *[_fmt(d["shares"][c], "{:.0%}") for c in CATEGORIES],
                      _fmt(d.get("sum_over_plain"), "{:.2f}"), _fmt(d.get("router_share_of_moe_block"), "{:.1%}"))
        console.print(b)
    env = next((r.get("env") for r in results if r.get("env")), None)
    if env and env.get("bandwidth_bytes_s"):
        console.print(f"machine: {env.get('cpu_model')}, {env.get('cores')} cores, read bandwidth "
                      f"{env['bandwidth_bytes_s'] / 1e9:.1f} GB/s (MBU = achieved / the larger of this and a quick "
                      f"probe right after each point; "
                      f"{escape(str(env.get('bandwidth_source', '')))})", highlight=False)


def json_report(results: list[dict[str, Any]], stream: TextIO) -> None:
    """Results (one record per point, rounds folded) and verdicts as one JSON document."""
    from moerun.protocol import collapse

    results = collapse(results)
    _json.dump({"results": results, "verdicts": verdicts(results)}, stream, indent=2, default=str)
    stream.write("\n")


CSV_FIELDS = ["model_name", "role", "group", "backend", "precision", "status", "total_params", "active_params",
              "prefill_tok_s", "decode_tok_s", "decode_p50_ms", "decode_p90_ms", "decode_p99_ms",
              "bytes_per_token", "achieved_bandwidth_bytes_s", "mbu", "mbu_now", "peak_rss_bytes", "error", "hardware"]


def csv_report(results: list[dict[str, Any]], stream: TextIO) -> None:
    """One row per result with the headline metrics, for spreadsheets and pandas."""
    from moerun.protocol import collapse

    w = _csv.DictWriter(stream, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in collapse(results):
        m, tok = r.get("metrics", {}), r.get("timings", {}).get("decode_token_ms", {})
        w.writerow({
            "model_name": r.get("model_name"), "role": r.get("role"), "group": r.get("group"),
            "backend": r.get("backend"), "precision": r.get("precision"), "status": r.get("status"),
            "total_params": (r.get("model") or {}).get("total_params"),
            "active_params": (r.get("model") or {}).get("active_params"),
            "prefill_tok_s": m.get("prefill_tok_s"), "decode_tok_s": m.get("decode_tok_s"),
            "decode_p50_ms": tok.get("median"), "decode_p90_ms": tok.get("p90"), "decode_p99_ms": tok.get("p99"),
            "bytes_per_token": m.get("bytes_per_token"),
            "achieved_bandwidth_bytes_s": m.get("achieved_bandwidth_bytes_s"), "mbu": m.get("mbu"),
            "mbu_now": m.get("mbu_now"), "peak_rss_bytes": (r.get("memory") or {}).get("peak_rss_bytes"), "error": r.get("error"),
            "hardware": hardware(r),
        })


def breakdown_figure(results: list[dict[str, Any]], phase: str = "decode"):
    """A stacked horizontal bar per (model, backend) with a breakdown: milliseconds per step
    by category, MoE models next to their twins. None when no result has a breakdown."""
    from moerun.breakdown import CATEGORIES

    rows = [r for r in results if (r.get("breakdown") or {}).get("available") and r["breakdown"].get(phase)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = {"moe": 0, "dense-active": 1, "dense-total": 2}
    rows.sort(key=lambda r: (r.get("backend", ""), r.get("group", ""), order.get(r.get("role", ""), 3)))
    labels = [f"{r.get('model_name')} | {r.get('backend')}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    colors = plt.get_cmap("tab10")
    for ci, cat in enumerate(CATEGORIES):
        widths = [r["breakdown"][phase]["seconds"][cat] * 1e3 for r in rows]
        if not any(widths):
            continue
        ax.barh(labels, widths, left=left, label=cat, color=colors(ci))
        left = [a + b for a, b in zip(left, widths)]
    ax.invert_yaxis()
    ax.set_xlabel(f"{phase} time per {'token' if phase == 'decode' else 'prefill'} (ms), engine's own instrument")
    ax.set_title(f"Where {phase} time goes, by category")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


_ROLE_ORDER = {"moe": 0, "dense-active": 1, "dense-total": 2, "dense-isomem": 3, "baseline": 4, "dense": 5, "": 6}


def batch_figure(results: list[dict[str, Any]]):
    """Aggregate decode tokens/s against batch size, one panel per backend and MoE
    precision: the MoE and each of its twins as a line (iso-memory twins run at their own
    precision and pair with the MoE's). None unless some point decoded several sequences."""
    from moerun.analysis import paired_precision
    from moerun.protocol import collapse

    ok = [r for r in collapse(results) if r.get("status") == "ok" and (r.get("metrics") or {}).get("decode_tok_s")]
    if not any(_batch(r) > 1 for r in ok):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(str(hardware(r) or ""), str(r.get("backend")), str(paired_precision(r))) for r in ok})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in ok if (str(hardware(r) or ""), str(r.get("backend")), str(paired_precision(r))) == panel]
        lines: dict[tuple, list] = {}
        for r in mine:
            key = (_ROLE_ORDER.get(r.get("role", ""), 6), str(r.get("model_name")), str(r.get("precision")))
            lines.setdefault(key, []).append((_batch(r), r["metrics"]["decode_tok_s"]))
        for (_, name, prec), pts in sorted(lines.items()):
            pts.sort()
            ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=f"{name} ({prec})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (sequences decoded together)")
        ax.set_title(" ".join(x for x in panel if x), fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("decode tokens/s, all sequences (median)")
    fig.tight_layout()
    return fig


def throughput_figure(results: list[dict[str, Any]], metric: str = "decode_tok_s"):
    """Grouped bars: for each backend / precision / prompt length, the median tokens/s of the
    MoE model, its twins and baselines, with the rounds' min-max as error bars."""
    from moerun.protocol import collapse

    results = collapse(results)
    ok = [r for r in results if r.get("status") == "ok" and (r.get("metrics") or {}).get(metric)]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def where(r: dict[str, Any]) -> str:
        p = r.get("point") or {}
        batch = f" batch {p['batch_size']}" if (p.get("batch_size") or 1) > 1 else ""
        return f"{r.get('backend')} {r.get('precision')}\nprompt {p.get('prompt_tokens')}{batch}"

    groups = sorted({where(r) for r in ok})
    models = sorted({(_ROLE_ORDER.get(r.get("role", ""), 5), r.get("model_name")) for r in ok})
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(9, 1.6 * len(groups) * max(1, len(models)) / 2), 4.5))
    for mi, (_, model) in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for gi, g in enumerate(groups):
            r = next((r for r in ok if where(r) == g and r.get("model_name") == model), None)
            if r is None:
                continue
            reps = ([x[metric] for x in r.get("rounds") or () if x.get("status") == "ok" and x.get(metric)]
                    or r["timings"].get(metric + "_reps") or [r["metrics"][metric]])
            xs.append(gi + (mi - (len(models) - 1) / 2) * width)
            ys.append(r["metrics"][metric])
            lo.append(r["metrics"][metric] - min(reps))
            hi.append(max(reps) - r["metrics"][metric])
        ax.bar(xs, ys, width=width, label=model, yerr=[lo, hi], capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(f"{metric.split('_')[0]} tokens/s (median, min-max over rounds)")
    ax.set_title(f"{metric.split('_')[0].capitalize()} tokens/s: MoE, its twins and baselines")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def speedup_figure(results: list[dict[str, Any]]):
    """Per backend: the MoE's measured decode speed-up over its total-matched twin next to
    the bandwidth-bound ideal (the ratio of weight bytes read per token)."""
    rows = [v for v in verdicts(results) if v.get("decode_vs_total") and v.get("ideal_decode_vs_total")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{v['group']}\n{v['backend']} {v['precision']}" for v in rows]
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(rows) + 2), 4.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [v["ideal_decode_vs_total"] for v in rows], width=0.4, label="ideal (bytes ratio)")
    ax.bar([x + 0.2 for x in xs], [v["decode_vs_total"] for v in rows], width=0.4, label="measured")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("decode speed-up over the total-matched dense twin (x)")
    ax.set_title("Realised versus theoretical MoE decode speed-up")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def roofline_figure(results: list[dict[str, Any]]):
    """Decode tokens/s against bytes read per token, log-log, under the bandwidth roofline
    (measured bandwidth / bytes per token): the distance below the line is what the engine
    leaves on the table."""
    ok = [r for r in results if r.get("status") == "ok" and (r.get("metrics") or {}).get("bytes_per_token")]
    bw = next((r["env"].get("bandwidth_bytes_s") for r in ok if (r.get("env") or {}).get("bandwidth_bytes_s")), None)
    if not ok or not bw:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(9, 5))
    xs = [r["metrics"]["bytes_per_token"] / 1e6 for r in ok]
    line = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 50)
    ax.plot(line, bw / (line * 1e6), color="black", linewidth=1,
            label=f"roofline: {bw / 1e9:.1f} GB/s measured")
    markers = "os^vD<>ph*"
    for i, backend in enumerate(sorted({r["backend"] for r in ok})):
        rs = [r for r in ok if r["backend"] == backend]
        ax.scatter([r["metrics"]["bytes_per_token"] / 1e6 for r in rs], [r["metrics"]["decode_tok_s"] for r in rs],
                   marker=markers[i % len(markers)], label=backend, s=40)
        for r in rs:
            ax.annotate(str(r.get("model_name")), (r["metrics"]["bytes_per_token"] / 1e6, r["metrics"]["decode_tok_s"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes read per decoded token (MB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode against the bandwidth roofline")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def markdown_report(results: list[dict[str, Any]], stream: TextIO, assets_dir: Any = None) -> None:
    """GitHub-flavoured Markdown: the results table, failures and the verdict table; with
    `assets_dir`, breakdown figures are drawn there as PNG and linked."""
    from moerun.protocol import collapse

    def row(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n"

    results = collapse(results)

    stream.write("## moerun results\n\n")
    columns = _columns(results)
    stream.write(row([h for h, _, _ in columns]))
    stream.write(row(["---"] * len(columns)))
    for r in results:
        stream.write(row([_fmt(get(r), fmt) for _, get, fmt in columns]))
    failures = [r for r in results if r.get("status") != "ok"]
    if failures:
        stream.write("\n")
        for r in failures:
            where = f" @ {hardware(r)}" if hardware(r) else ""
            stream.write(f"- **{r.get('status')}**: {r.get('model_name')} on {r.get('backend')}{where}: "
                         f"{r.get('error')}\n")
    rows = verdicts(results)
    sections = [("MoE / dense twin (tokens/s ratio; > 1 means the MoE is faster)", verdict_table(rows)),
                ("MoE / named dense baseline (tokens/s ratio; > 1 means the MoE is faster)", baseline_table(rows)),
                ("Iso-memory: the MoE against the dense model holding its bytes at a harder precision "
                 "(parity: max |diff| / top-1 against PyTorch fp32)", isomem_table(rows)),
                ("Experts touched per decode step and layer (the union over the batch) against uniform routing",
                 coverage_table(results)),
                ("Memory: does the measured peak fit each device profile (its memory minus the OS share)",
                 fit_table(results))]
    for title, (headers, cells) in sections:
        if not cells:
            continue
        stream.write(f"\n## {title}\n\n")
        stream.write(row(headers))
        stream.write(row(["---"] * len(headers)))
        for c in cells:
            stream.write(row(c))
    if assets_dir is not None:
        from pathlib import Path

        figures = [("decode-throughput", "Decode throughput", throughput_figure(results, "decode_tok_s")),
                   ("decode-batch", "Decode throughput against batch size", batch_figure(results)),
                   ("prefill-throughput", "Prefill throughput", throughput_figure(results, "prefill_tok_s")),
                   ("speedup", "Realised versus theoretical speed-up", speedup_figure(results)),
                   ("roofline", "Decode against the bandwidth roofline", roofline_figure(results)),
                   ("breakdown-decode", "Where decode time goes", breakdown_figure(results, "decode")),
                   ("breakdown-prefill", "Where prefill time goes", breakdown_figure(results, "prefill"))]
        for stem, title, fig in figures:
            if fig is None:
                continue
            path = Path(assets_dir) / f"{stem}.png"
            fig.savefig(path, dpi=110)
            import matplotlib.pyplot as plt

            plt.close(fig)
            stream.write(f"\n## {title}\n\n![{title}]({path.name})\n")


@hookimpl
def moerun_register_reporters(registry):
    registry.add("table", table)
    registry.add("json", json_report)
    registry.add("csv", csv_report)
    registry.add("markdown", markdown_report)
