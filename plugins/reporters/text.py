"""The built-in reporters: table (rich), json, csv and markdown. Each receives the folded
points (moerun.records.PointResult) and the verdict rows (moerun.analysis.verdicts) and
writes to a text stream; the cells come from `cells`, the figures from `figures`."""

from __future__ import annotations

import csv as _csv
import json as _json
from typing import Any, TextIO

from moerun.analysis import maturity
from moerun.records import PointResult

from . import cells
from .figures import figures


def table(results: list[PointResult], verdicts: list[dict[str, Any]], stream: TextIO) -> None:
    """Results and the MoE-vs-dense verdict as rich tables."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=stream, width=220 if not stream.isatty() else None)

    def show(title: str, headers: list[str], rows: list[list[str]], right: Any = cells.RIGHT,
             wrap: bool = True) -> None:
        """One rich table: numbers right-aligned, the rest left-aligned (unwrapped unless `wrap`)."""
        t = Table(title=title, header_style="bold")
        for h in headers:
            t.add_column(h, justify="right" if h in right else "left", no_wrap=not wrap and h not in right)
        for row in rows:
            t.add_row(*[escape(x) for x in row])
        console.print(t)

    headers, rows = cells.results_table(results)
    show("moerun results (medians over rounds; ± = 95 % half-width of decode tok/s over rounds)", headers, rows,
         right=set(headers) - set(cells.LEFT), wrap=False)
    for status, what in cells.failures(results):
        console.print(f"[bold]{status}[/]: " + escape(what), highlight=False)
    for title, (headers, rows) in cells.sections(results, verdicts, maturity(results)):
        if rows:
            show(title, headers, rows)
    line = cells.machine_line(results)
    if line:
        console.print(escape(line), highlight=False)


def json_report(results: list[PointResult], verdicts: list[dict[str, Any]], stream: TextIO) -> None:
    """Results (one record per point, rounds folded, as written) and verdicts as one JSON document."""
    _json.dump({"results": [r.record for r in results], "verdicts": verdicts}, stream, indent=2, default=str)
    stream.write("\n")


CSV_FIELDS = ["model_name", "role", "group", "backend", "precision", "status", "total_params", "active_params",
              "prefill_tok_s", "decode_tok_s", "decode_p50_ms", "decode_p90_ms", "decode_p99_ms",
              "bytes_per_token", "achieved_bandwidth_bytes_s", "mbu", "mbu_now", "peak_rss_bytes", "error", "hardware"]


def csv_report(results: list[PointResult], verdicts: list[dict[str, Any]], stream: TextIO) -> None:
    """One row per point with the headline metrics, for spreadsheets and pandas."""
    w = _csv.DictWriter(stream, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results:
        m, tok = r.metrics, r.timings.get("decode_token_ms") or {}
        w.writerow({
            "model_name": r.model_name, "role": r.role, "group": r.group, "backend": r.backend,
            "precision": r.precision, "status": r.status, "total_params": r.model.get("total_params"),
            "active_params": r.model.get("active_params"), "prefill_tok_s": m.get("prefill_tok_s"),
            "decode_tok_s": m.get("decode_tok_s"), "decode_p50_ms": tok.get("median"), "decode_p90_ms": tok.get("p90"),
            "decode_p99_ms": tok.get("p99"), "bytes_per_token": m.get("bytes_per_token"),
            "achieved_bandwidth_bytes_s": m.get("achieved_bandwidth_bytes_s"), "mbu": m.get("mbu"),
            "mbu_now": m.get("mbu_now"), "peak_rss_bytes": r.memory.get("peak_rss_bytes"), "error": r.error,
            "hardware": r.hardware,
        })


def markdown_report(results: list[PointResult], verdicts: list[dict[str, Any]], stream: TextIO,
                    assets_dir: Any = None) -> None:
    """GitHub-flavoured Markdown: the results table, failures and every table the `table`
    reporter shows; with `assets_dir`, the figures are drawn there as PNG and linked."""
    def row(values: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in values) + " |\n"

    def section(headers: list[str], rows: list[list[str]]) -> None:
        stream.write(row(headers))
        stream.write(row(["---"] * len(headers)))
        for r in rows:
            stream.write(row(r))

    stream.write("## moerun results\n\n")
    section(*cells.results_table(results))
    failed = cells.failures(results)
    if failed:
        stream.write("\n")
        for status, what in failed:
            stream.write(f"- **{status}**: {what}\n")
    for title, (headers, rows) in cells.sections(results, verdicts, maturity(results)):
        if rows:
            stream.write(f"\n## {title}\n\n")
            section(headers, rows)
    line = cells.machine_line(results)
    if line:
        stream.write(f"\n{line}\n")
    if assets_dir is not None:
        from pathlib import Path

        from .figures import pyplot

        for stem, title, fig in figures(results, verdicts):
            if fig is None:
                continue
            path = Path(assets_dir) / f"{stem}.png"
            fig.savefig(path, dpi=110)
            pyplot().close(fig)
            stream.write(f"\n## {title}\n\n![{title}]({path.name})\n")
