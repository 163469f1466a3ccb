"""The built-in reporters, a plugin like any other: `table`, `json`, `csv` and `markdown`.

A reporter is `func(results, verdicts, stream)`: `results` the folded points
(moerun.records.PointResult), `verdicts` the rows of moerun.analysis.verdicts; `moerun
report` calls the markdown reporter with `assets_dir` too (docs/plugins.md).

- `cells`: what the text reporters show, as headers and cells;
- `text`: the four reporters;
- `figures`: the Markdown report's matplotlib figures."""

from moerun import hookimpl

from .figures import (batch_figure, breakdown_figure, cap_figure, ladder_figure, roofline_figure, routing_figure,
                      speedup_figure, throughput_figure)
from .text import csv_report, json_report, markdown_report, table

__all__ = ["batch_figure", "breakdown_figure", "cap_figure", "csv_report", "json_report", "ladder_figure",
           "markdown_report", "roofline_figure",
           "routing_figure", "speedup_figure", "table", "throughput_figure"]


@hookimpl
def moerun_register_reporters(registry):
    registry.add("table", table)
    registry.add("json", json_report)
    registry.add("csv", csv_report)
    registry.add("markdown", markdown_report)
