"""The ``moerun`` command line.

``moerun`` alone runs the default study: the `small-moe` preset and its two dense twins on
every available backend. Errors print one line and exit with code 2 (``--debug`` for the
traceback); a study in which some point failed exits with code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import __version__, defaults
from .errors import ConfigError, MoerunError
from .studyfile import StudySpec

DESCRIPTION = """\
Does Mixture-of-Experts actually help inference on this hardware? moerun runs identical
dense and MoE workloads (same shapes, weights and token ids) on every installed engine and
reports speed, memory and MoE-versus-dense ratios.

With no command it measures: by default the small-moe preset and its active- and
total-matched dense twins on every available backend.
"""

EPILOG = """\
examples:
  moerun
  moerun --backend torch --model tiny-moe --precision bf16 --prompt-tokens 128 --new-tokens 64
  moerun --model olmoe-1b-7b --no-twins --precision bf16
  moerun models --json

exit codes: 0 all points ran (or are unsupported), 1 some point failed, 2 bad input.
"""


def _csv_list(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def _fit_device(name: str | None) -> str | None:
    if name is None:
        return None
    from .predict import get_hardware

    return get_hardware(name).name  # an unknown profile is a one-line error listing the known ones


def _batch_sizes(values: Sequence[str] | None) -> list[int]:
    out = []
    for text in _csv_list(values):
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"batch size must be a whole number >= 1, got {text!r}")
        out.append(n)
    return list(dict.fromkeys(out))


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int, _non_negative_int = _int_at_least(1), _int_at_least(0)


def _options(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option takes KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"moerun: error: {message} (see 'moerun --help')\n")


def _subcommand(sub: Any, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A subcommand parser that also takes --debug (after the command name too)."""
    p = sub.add_parser(name, help=help_text, description=description)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    return p


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not 0 <= value < 100:
        raise argparse.ArgumentTypeError(f"must be between 0 and 100, got {value:g}")
    return value / 100


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


def _protocol_options(parser: argparse.ArgumentParser | Any, budget_default: str, sub: bool = False) -> None:
    """The measurement protocol's options (docs/concepts.md, 'The measurement protocol'). On a
    subcommand (`sub`) an option not given leaves the main parser's value alone, so it may be
    given before or after the subcommand's name."""
    d = (lambda value: argparse.SUPPRESS) if sub else (lambda value: value)
    g = parser.add_argument_group("protocol: rounds, precision target, busy machine")
    g.add_argument("--min-rounds", type=_positive_int, default=d(None), metavar="N",
                   help="rounds every point runs, each in a fresh process (in lockstep: restarts of the "
                        f"comparison), unless --budget runs out first (default: {defaults.MIN_ROUNDS})")
    g.add_argument("--max-rounds", type=_positive_int, default=d(None), metavar="N",
                   help=f"rounds a comparison may reach while chasing the target (default: {defaults.MAX_ROUNDS})")
    g.add_argument("--target", type=_percent, default=d(None), metavar="PCT",
                   help="add rounds until every verdict's 95 %% interval is within +-PCT %% "
                        f"(default: {defaults.TARGET * 100:g}; 0: run --min-rounds only)")
    g.add_argument("--budget", type=_seconds, default=d(None), metavar="S",
                   help=f"seconds the rounds after the first may take, counted from the first round "
                        f"({budget_default}; 'inf': no limit)")
    g.add_argument("--lockstep", action=argparse.BooleanOptionalAction, default=d(None),
                   help="load the sides of each comparison together and time them in alternating cycles, the "
                        "ratio formed within each cycle (default: on; off, or sides that do not fit in memory "
                        "together: one process after another per round)")
    g.add_argument("--unit-s", type=_seconds, default=d(None), metavar="S",
                   help="seconds one timed lockstep unit aims at: that many prefills, or decode passes, at least "
                        f"one (default: {defaults.UNIT_S:g})")
    g.add_argument("--if-busy", choices=("warn", "wait", "refuse"), default=d(None),
                   help="other processes using the CPU: warn and flag (default), wait for quiet (up to "
                        "--wait-limit, before the study and after any contended point) or refuse to measure")
    g.add_argument("--wait-limit", type=_seconds, default=d(defaults.WAIT_S), metavar="S",
                   help=f"longest wait for a quiet machine with --if-busy wait (default: {defaults.WAIT_S:g})")
    g.add_argument("--reprobe", action="store_true", default=d(False),
                   help="measure the memory bandwidth again instead of using this machine's cached probe")


def _fleet_options(parser: argparse.ArgumentParser | Any, sub: bool = False) -> None:
    """Where points run (docs/fleet.md); `sub` as for `_protocol_options`."""
    d = (lambda value: argparse.SUPPRESS) if sub else (lambda value: value)
    g = parser.add_argument_group("fleet: measure on other machines (Ray)")
    g.add_argument("--executor", choices=("local", "ray"), default=d("local"),
                   help="local: this machine (default); ray: the nodes of a Ray cluster, placed by --hardware "
                        "label, one point at a time per node, labels in parallel (pip install 'moerun[ray]')")
    g.add_argument("--ray-address", metavar="ADDR", default=d(None),
                   help="the Ray cluster to join (default: $RAY_ADDRESS, else the one 'ray start' left here)")
    g.add_argument("--hardware", action="append", default=d(None), metavar="LABEL",
                   help="run the grid on the nodes with this label (Ray resource moerun-hw:LABEL); repeatable or "
                        "comma-separated; 'all': every label on the cluster (overrides a study file's hardware)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moerun", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moerun {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    for name, help_text in (("backends", "list backends: installed, available, why not"),
                            ("models", "list model presets with total/active parameters"),
                            ("plugins", "list loaded plugins and plugins that failed to load")):
        p = _subcommand(sub, name, help_text, help_text)
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
    rep = _subcommand(sub, "report", "write a Markdown report with figures from results files",
                         description="write a Markdown report (tables, verdict, breakdown figures) from JSONL results")
    rep.add_argument("results", nargs="+", type=Path, metavar="RESULTS.jsonl")
    rep.add_argument("--out", type=Path, metavar="DIR", help="report folder (default: moerun-report)")
    st = _subcommand(sub, "study", "run a study: a grid from a TOML file or a preset",
                        description="run a study: MoE models with their twins and named dense baselines x backends "
                                    "x precisions x prompt/generation lengths x threads, from a TOML file (a "
                                    "[study] table) or a built-in preset; resumable with --output")
    st.add_argument("file", nargs="?", type=Path, metavar="STUDY.toml")
    st.add_argument("--preset", metavar="NAME", help="built-in study (--list to see them)")
    st.add_argument("--list", action="store_true", help="list the built-in studies")
    st.add_argument("-b", "--backend", action="append", metavar="NAME", help="override the study's backends")
    st.add_argument("--batch-size", action="append", metavar="N",
                    help="override the study's batch_sizes; repeatable or comma-separated")
    st.add_argument("-o", "--output", type=Path, metavar="PATH", help="results JSONL (an existing one is resumed)")
    st.add_argument("--report", default="table", metavar="NAME", help="reporter for the summary (default: table)")
    st.add_argument("--json", action="store_true", help="shorthand for --report json")
    st.add_argument("--no-isolate", action="store_true", help="run points in this process")
    st.add_argument("--memory-limit", type=_positive_int, default=None, metavar="MB", help="per-point memory cap")
    st.add_argument("--fit", metavar="DEVICE", help="skip, as unsupported with the reason, points whose weights and "
                                                    "KV cache exceed DEVICE's usable memory (a 'moerun predict' "
                                                    "profile)")
    st.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    _protocol_options(st, f"default: the study file's budget_s, else {defaults.STUDY_BUDGET_S:g}", sub=True)
    _fleet_options(st, sub=True)
    pre = _subcommand(sub, "predict", "roofline prediction of a model on a device (published specs)",
                         description="predict decode and prefill tokens/s of a model (and its dense twins) on a "
                                     "device from its published bandwidth, compute and memory, scaled by the "
                                     "efficiency measured on this machine")
    pre.add_argument("--hardware", metavar="NAME", help="device profile (--list for all), or 'this-machine'")
    pre.add_argument("--model", "-m", metavar="NAME", help="model preset (its dense twins are added)")
    pre.add_argument("--precision", "-p", default="q4_k_m", metavar="NAME", help="precision (default: q4_k_m)")
    pre.add_argument("--context", type=_positive_int, default=512, metavar="N", help="context length (default: 512)")
    pre.add_argument("--batch-size", action="append", metavar="N",
                     help="sequences decoded together: an MoE step reads the union of their experts; repeatable "
                          "or comma-separated (default: 1). The MoE/total-twin crossover batch is printed too")
    pre.add_argument("--calibrate", type=Path, metavar="RESULTS.jsonl",
                     help="take the efficiency from these results (median MBU / FLOP utilisation) instead of "
                          "assuming 80 %% / 50 %%")
    pre.add_argument("--list", action="store_true", help="list the device profiles")
    pre.add_argument("--json", action="store_true", help="print JSON for scripts")
    cmp_ = _subcommand(sub, "compare", "merge results from several machines into one table keyed by hardware",
                          description="merge results files (one per machine) into one table keyed by hardware")
    cmp_.add_argument("results", nargs="+", type=Path, metavar="RESULTS.jsonl")
    cmp_.add_argument("--json", action="store_true", help="print JSON for scripts")
    cmp_.add_argument("--csv", type=Path, metavar="PATH", help="also write the merged rows as CSV")

    run = parser.add_argument_group("measuring (the default command)")
    run.add_argument("-b", "--backend", action="append", metavar="NAME",
                     help="backend(s) to run, repeatable or comma-separated (default: every available one)")
    run.add_argument("-m", "--model", action="append", metavar="NAME",
                     help=f"preset, twin (NAME:dense-active, NAME:dense-total) or checkpoint folder; "
                          f"repeatable (default: {defaults.MODEL})")
    run.add_argument("-p", "--precision", action="append", metavar="NAME",
                     help="precision(s), repeatable or comma-separated (default: each backend's own)")
    run.add_argument("--prompt-tokens", type=_positive_int, default=defaults.PROMPT_TOKENS, metavar="N",
                     help=f"prompt length for the timed prefill (default: {defaults.PROMPT_TOKENS})")
    run.add_argument("--new-tokens", type=_non_negative_int, default=defaults.NEW_TOKENS, metavar="N",
                     help=f"tokens decoded one at a time after the prefill (default: {defaults.NEW_TOKENS})")
    run.add_argument("--repetitions", type=_positive_int, default=defaults.REPETITIONS, metavar="N",
                     help="sequential rounds: timed repetitions of prefill + decode inside each round's "
                          f"process, a round's value their median (default: {defaults.REPETITIONS}; lockstep sizes its units by "
                          "--unit-s instead)")
    run.add_argument("--warmup", type=_non_negative_int, default=defaults.WARMUP, metavar="N",
                     help=f"untimed warm-up runs of the whole workload (default: {defaults.WARMUP}; lockstep: at least 1)")
    run.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                     help="engine threads (default: the engine's choice)")
    run.add_argument("--device", default=None, metavar="DEV",
                     help="cpu, cuda (cuda:N), mps (torch), metal/vulkan/gpu (llama.cpp), tensorrt/coreml "
                          "(onnxruntime); a device the installed engine lacks records 'unsupported' with why "
                          "(default: cpu, or the backend's only device)")
    run.add_argument("--seed", type=int, default=defaults.SEED,
                     help=f"seed of the synthetic weights and token ids (default: {defaults.SEED})")
    run.add_argument("--checkpoint-dtype", choices=("float32", "bfloat16"), default=defaults.CHECKPOINT_DTYPE,
                     help="dtype of synthetic checkpoints; bfloat16 halves the disk for real shapes "
                          f"(default: {defaults.CHECKPOINT_DTYPE})")
    run.add_argument("--router-skew", type=float, default=defaults.ROUTER_SKEW, metavar="S",
                     help=f"unequal expert popularity in synthetic routers, 0 = none "
                          f"(default: {defaults.ROUTER_SKEW:g})")
    run.add_argument("--compile", action="store_true", help="torch.compile where the backend supports it")
    run.add_argument("-O", "--option", action="append", metavar="KEY=VALUE", default=[],
                     help="backend option, repeatable; VALUE is read as JSON when it parses (e.g. -O repack=true)")
    run.add_argument("--batch-size", action="append", metavar="N",
                     help="sequences prefilled together and decoded in lock step (each its own seeded ids, so "
                          "routing differs); repeatable or comma-separated, each a grid value (default: 1)")
    run.add_argument("--no-twins", action="store_true", help="do not add the dense twins of MoE models")
    run.add_argument("--no-isomem", action="store_true",
                     help="do not add the iso-memory twin: the dense model holding the MoE's weight bytes at "
                          "the backend's next harder precision (NAME:dense-isomem-P-Q)")
    run.add_argument("--parity", action="store_true",
                     help="also compare each point's logits with the PyTorch fp32 reference (16 positions)")
    run.add_argument("--breakdown", action="store_true",
                     help="also time each op category with the engine's own instrument (cut timing; "
                          "TensorRT: its profiler), in separate runs reconciled with the plain step")
    run.add_argument("-o", "--output", type=Path, metavar="PATH",
                     help=f"results JSONL; an existing file is resumed, finished points are not rerun "
                          f"(default: {defaults.OUTPUT_DIR}/run-DATE-TIME.jsonl)")
    run.add_argument("--report", default="table", metavar="NAME",
                     help="reporter for the summary: table, json, csv, markdown or a plugin's (default: table)")
    run.add_argument("--json", action="store_true", help="shorthand for --report json")
    run.add_argument("--timeout", type=float, default=defaults.TIMEOUT_S, metavar="S",
                     help=f"seconds before a point is killed and recorded as failed; it prepares its engine "
                          f"files inside that time (default: {defaults.TIMEOUT_S:g})")
    run.add_argument("--memory-limit", type=_positive_int, default=None, metavar="MB",
                     help="address-space limit for each isolated point; past it the point fails with "
                          "'out of memory' instead of the machine swapping")
    run.add_argument("--fit", metavar="DEVICE",
                     help="skip, as unsupported with the reason, points whose weights (nominal bits) and KV cache "
                          "exceed the usable memory of DEVICE, a 'moerun predict' profile (its memory minus an OS "
                          "share); every result records which profiles its measured peak fits")
    run.add_argument("--no-isolate", action="store_true",
                     help="run points in this process (no crash isolation or timeout)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    _protocol_options(parser, f"default: {defaults.BUDGET_S:g}")
    _fleet_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        from .manager import get_plugin_manager

        plugins = get_plugin_manager()
        args = build_parser().parse_args(argv)
        commands = {"backends": cmd_backends, "models": cmd_models, "plugins": cmd_plugins, "report": cmd_report,
                    "compare": cmd_compare, "predict": cmd_predict, "study": cmd_study}
        return commands.get(args.command, cmd_run)(plugins, args)
    except MoerunError as exc:
        if debug:
            raise
        print(f"moerun: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moerun: interrupted; finished points are saved, rerun with the same --output to resume",
              file=sys.stderr)
        return 130


# ------------------------------------------------------------------ listing commands
def cmd_backends(plugins: Any, args: argparse.Namespace) -> int:
    rows = []
    for name in plugins.backends.primary_names():
        cls = plugins.backends.get(name)
        av = cls().availability()
        rows.append({"name": name, "aliases": list(cls.aliases), "plugin": plugins.backends.owner(name),
                     "description": cls.description, "capabilities": cls.capabilities.to_dict(),
                     **av.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="backends", header_style="bold")
    for h in ("name", "available", "version", "precisions", "MoE", "devices", "why not / install"):
        t.add_column(h)
    for r in rows:
        caps = r["capabilities"]
        why = "" if r["available"] else f"{r['reason']}; {r['install_hint']}".strip("; ")
        t.add_row(r["name"], "yes" if r["available"] else "no", escape(r["version"] or "-"),
                  ", ".join(caps["precisions"]), "yes" if caps["supports_moe"] else "no",
                  ", ".join(r["devices"] or caps["devices"]), escape(why))
    console = Console(width=140)
    console.print(t)
    notes = [(r["name"], dev, note) for r in rows if r["available"]
             for dev, note in (r.get("device_notes") or {}).items()]
    if notes:
        console.print("devices a backend knows but cannot use here:", highlight=False)
        for name, dev, note in notes:
            console.print(escape(f"  {name} {dev}: {note}"), highlight=False)
    return 0


def cmd_models(plugins: Any, args: argparse.Namespace) -> int:
    rows = []
    for name in plugins.models.names():
        pre = plugins.models.preset(name)
        s = pre.spec
        rows.append({"name": name, "family": s.family, "moe": s.is_moe, "total_params": s.total_params,
                     "active_params": s.active_params, "layers": s.num_layers, "hidden": s.hidden_size,
                     "experts": s.num_experts, "top_k": s.top_k,
                     "published_total_params": pre.published_total_params, "description": pre.description,
                     "spec": s.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    from .analysis import human_count

    t = Table(title="model presets (twins: NAME:dense-active, NAME:dense-total)", header_style="bold")
    for h in ("name", "family", "total", "active", "layers", "hidden", "experts", "description"):
        t.add_column(h, justify="right" if h in ("total", "active", "layers", "hidden") else "left")
    for r in rows:
        t.add_row(r["name"], r["family"], human_count(r["total_params"]), human_count(r["active_params"]),
                  str(r["layers"]), str(r["hidden"]),
                  f"{r['experts']} top-{r['top_k']}" if r["moe"] else "-", escape(r["description"]))
    Console(width=160).print(t)
    return 0


def cmd_plugins(plugins: Any, args: argparse.Namespace) -> int:
    ok = [{"name": p.name, "source": p.source, "distribution": p.distribution, "version": p.version,
           "hooks": list(p.hooks)} for p in plugins.plugins]
    bad = [{"name": e.name, "source": e.source, "error": e.error} for e in plugins.load_errors]
    if args.json:
        print(json.dumps({"plugins": ok, "errors": bad}, indent=2))
        return 0
    for p in ok:
        dist = f" ({p['distribution']} {p['version']})" if p["distribution"] else ""
        print(f"{p['name']}{dist} [{p['source']}]: {', '.join(p['hooks'])}")
    for e in bad:
        print(f"FAILED {e['name']} [{e['source']}]: {e['error']}")
    return 0


def cmd_predict(plugins: Any, args: argparse.Namespace) -> int:
    from .predict import HARDWARE, crossover, efficiency_from_results, get_hardware, predict, this_machine

    if args.list:
        rows = [{"name": h.name, "description": h.description, "bandwidth_gb_s": h.bandwidth_bytes_s / 1e9,
                 "peak_tflops": h.peak_flops / 1e12, "memory_gb": h.memory_bytes / 1e9, "source": h.source}
                for h in HARDWARE.values()]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(f"{r['name']:22s} {r['bandwidth_gb_s']:7.1f} GB/s {r['peak_tflops']:7.2f} TFLOPS "
                      f"{r['memory_gb']:5.0f} GB  {r['source']}")
        return 0
    if not args.hardware or not args.model:
        raise ConfigError("predict needs --hardware and --model (or --list)")
    if args.hardware == "this-machine":
        from .environment import capture

        hw = this_machine(capture())
    else:
        hw = get_hardware(args.hardware)
    efficiency = None
    if args.calibrate:
        from .records import load_results

        efficiency = efficiency_from_results(load_results([args.calibrate]), args.precision)
    spec = plugins.models.resolve(args.model)
    specs = [spec] + ([spec.dense_twin("active"), spec.dense_twin("total")] if spec.is_moe else [])
    batches = _batch_sizes(args.batch_size) or [1]
    by_batch = {b: [predict(sp, hw, precision=args.precision, context=args.context, efficiency=efficiency, batch=b)
                    for sp in specs] for b in batches}
    cross = crossover(spec, hw, precision=args.precision, context=args.context,
                      efficiency=efficiency) if spec.is_moe else None
    if args.json:
        for b in batches:
            if cross is not None:
                by_batch[b][0]["crossover"] = cross  # the MoE's row
        print(json.dumps([r for b in batches for r in by_batch[b]], indent=2))
        return 0
    basis = (f"efficiency from {args.calibrate}: decode {efficiency['decode']:.0%} of bandwidth, prefill "
             f"{efficiency['prefill']:.0%} of peak FLOP/s"
             f"{'' if efficiency['prefill_measured'] else ' (assumed: no prefill FLOP figure in the results)'}"
             f" ({efficiency['n']} results)" if efficiency else
             "assumed efficiency: decode 80 % of bandwidth, prefill 50 % of peak FLOP/s (--calibrate to measure)")
    print(f"{hw.name}: {hw.bandwidth_bytes_s / 1e9:.0f} GB/s, {hw.peak_flops / 1e12:.2f} TFLOPS, "
          f"{hw.memory_bytes / 1e9:.0f} GB ({hw.source})")
    print(basis)
    for b, rows in by_batch.items():
        if len(batches) > 1 or b > 1:
            touched = rows[0].get("experts_touched") if spec.is_moe else None
            print(f" batch {b}" + (f" (MoE: {touched:.1f} of {spec.num_experts} experts per layer and step, "
                                   f"uniform routing)" if touched else ""))
        for r in rows:
            if r["fits"] is False:
                print(f"  {r['model']:28s} does not fit: {r['reason']}")
            else:
                print(f"  {r['model']:28s} decode {r['decode_tok_s']:8.1f} tok/s  "
                      f"prefill {r['prefill_tok_s']:9.1f} tok/s  ({r['bytes_per_token'] / 1e6:.0f} MB/token, "
                      f"{r['memory_needed_bytes'] / 1e9:.1f} GB, {r['decode_bound']}-bound)")
        if len(rows) == 3 and all(r.get("decode_tok_s") for r in rows):
            active, total = (rows[0]["decode_tok_s"] / rows[i]["decode_tok_s"] for i in (1, 2))
            print(f"  predicted MoE decode vs active twin {active:.2f}x, vs total twin {total:.2f}x "
                  f"(roofline: no dispatch cost)")
    if cross is not None:
        if cross["batch"]:
            print(f"  crossover: from batch {cross['batch']} the MoE decodes less than {cross['advantage']:.1f}x its "
                  f"total twin ({cross['ratio']:.2f}x): its sequences' experts cover most of its weights")
        else:
            closest = (f"; closest {cross['closest_ratio']:.2f}x at batch {cross['closest_batch']}, where the "
                       f"total twin turns compute-bound" if cross.get("closest_ratio") else "")
            print(f"  crossover: none below {cross['advantage']:.1f}x ({cross['why']}{closest})")
    return 0



def cmd_compare(plugins: Any, args: argparse.Namespace) -> int:
    import csv

    from .analysis import machine_label, verdicts
    from .records import load_results

    rows, verdict_rows = [], []
    for path in args.results:
        by_machine: dict[str, list] = {}
        for r in load_results([path]):  # a fleet's merged file: keyed by hardware label, the node's machine beside it
            machine = machine_label(r.env)
            by_machine.setdefault(f"{r.hardware}: {machine}" if r.hardware else machine, []).append(r)
        for machine, rs in by_machine.items():
            for r in rs:
                rows.append({"machine": machine, "hardware": r.hardware, "node": r.node.get("hostname"),
                             "file": str(path), "model": r.model_name, "role": r.role, "backend": r.backend,
                             "precision": r.precision, "status": r.status,
                             "decode_tok_s": r.metrics.get("decode_tok_s"),
                             "prefill_tok_s": r.metrics.get("prefill_tok_s"), "mbu": r.metrics.get("mbu")})
            verdict_rows += [{"machine": machine, **v} for v in verdicts(rs)]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["machine"], lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
    if args.json:
        print(json.dumps({"results": rows, "verdicts": verdict_rows}, indent=2, default=str))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=200 if not sys.stdout.isatty() else None)
    t = Table(title="results by machine", header_style="bold")
    for h in ("machine", "model", "backend", "prec", "status", "decode tok/s", "prefill tok/s", "MBU"):
        t.add_column(h, justify="right" if h in ("decode tok/s", "prefill tok/s", "MBU") else "left")
    for r in sorted(rows, key=lambda r: (str(r["model"]), str(r["backend"]), r["machine"])):
        t.add_row(escape(r["machine"]), escape(str(r["model"])), escape(str(r["backend"])),
                  escape(str(r["precision"] or "")), r["status"] or "",
                  f"{r['decode_tok_s']:,.1f}" if r["decode_tok_s"] else "-",
                  f"{r['prefill_tok_s']:,.0f}" if r["prefill_tok_s"] else "-",
                  f"{r['mbu']:.0%}" if r["mbu"] else "-")
    console.print(t)
    if verdict_rows:
        v = Table(title="MoE / dense twin by machine (decode and prefill tokens/s ratios)", header_style="bold")
        for h in ("machine", "model", "backend", "prec", "decode vs active", "prefill vs active", "decode vs total"):
            v.add_column(h)
        for row in verdict_rows:
            v.add_row(escape(row["machine"]), escape(str(row["group"])), escape(str(row["backend"])),
                      escape(str(row["precision"] or "")),
                      *[f"{row[k]:.2f}x" if row.get(k) else "-" for k in
                        ("decode_vs_active", "prefill_vs_active", "decode_vs_total")])
        console.print(v)
    return 0


def cmd_report(plugins: Any, args: argparse.Namespace) -> int:
    from .analysis import verdicts
    from .records import load_results

    results = load_results(args.results)
    out = args.out or Path("moerun-report")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "report.md", "w") as stream:
        plugins.reporters.get("markdown")(results, verdicts(results), stream, assets_dir=out)
    print(f"moerun: report in {out / 'report.md'}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ measuring
def cmd_run(plugins: Any, args: argparse.Namespace) -> int:
    """`moerun` with flags: the flags make a StudySpec, measured like a study file's."""
    study = StudySpec(
        name="run", models=_csv_list(args.model) or [defaults.MODEL], twins=not args.no_twins,
        isomem=False if args.no_isomem else None, backends=_csv_list(args.backend),
        precisions=_csv_list(args.precision), prompt_tokens=[args.prompt_tokens], new_tokens=[args.new_tokens],
        threads=[args.threads] if args.threads else [], batch_sizes=_batch_sizes(args.batch_size) or [defaults.BATCH_SIZE],
        repetitions=args.repetitions, warmup=args.warmup, seed=args.seed, checkpoint_dtype=args.checkpoint_dtype,
        router_skew=args.router_skew, device=args.device, compile=args.compile, timeout_s=args.timeout,
        memory_limit_mb=args.memory_limit, fit=_fit_device(args.fit), breakdown=args.breakdown, parity=args.parity,
        options=_options(args.option), hardware=_hardware_labels(args, []), budget_s=defaults.BUDGET_S)
    return _measure(plugins, study, args)


def cmd_study(plugins: Any, args: argparse.Namespace) -> int:
    """A study file or preset, with the flags that override it."""
    import attrs

    from .studyfile import PRESETS, load_study

    if args.list:
        for name, d in PRESETS.items():
            print(f"{name:26s} {d['description']}")
        return 0
    study = load_study(args.file, args.preset)
    study = attrs.evolve(study, backends=_csv_list(args.backend) or study.backends,
                         hardware=_hardware_labels(args, study.hardware),
                         batch_sizes=_batch_sizes(args.batch_size) or study.batch_sizes,
                         memory_limit_mb=args.memory_limit or study.memory_limit_mb,
                         fit=_fit_device(args.fit) or study.fit)
    return _measure(plugins, study, args)


def _hardware_labels(args: argparse.Namespace, defaults: Sequence[str]) -> list[str]:
    """The fleet labels the grid runs on: --hardware over the study file's; 'all' is every
    label the Ray cluster offers. Labels need the ray executor, and the ray executor needs labels."""
    given = _csv_list(args.hardware) or list(defaults)
    if args.executor != "ray":
        if given:
            raise ConfigError(f"hardware labels ({', '.join(given)}) place points on a fleet's nodes: "
                              f"add --executor ray")
        return []
    from .fleet import RayExecutor, describe_labels

    labels = RayExecutor(address=args.ray_address).labels()
    if "all" in given:
        given = [g for g in given if g != "all"] + [x for x in sorted(labels) if x not in given]
    if not given:
        raise ConfigError(f"the ray executor places points by hardware label: give --hardware LABEL (or 'all'), "
                          f"or hardware = [...] in the study file; labels on the cluster: {describe_labels(labels)}")
    return list(dict.fromkeys(given))


def _protocol(args: argparse.Namespace, study: StudySpec) -> Any:
    """The protocol from the command line, over the study's (moerun.defaults' where not given)."""
    import math

    from .protocol import Protocol

    given = {"min_rounds": args.min_rounds, "max_rounds": args.max_rounds, "target": args.target,
             "budget_s": args.budget, "if_busy": args.if_busy, "lockstep": args.lockstep, "unit_s": args.unit_s}
    given = {k: v for k, v in given.items() if v is not None}
    fields = {**study.protocol_fields(), **given}
    if fields["budget_s"] is not None and math.isinf(fields["budget_s"]):
        fields["budget_s"] = None
    if "min_rounds" in given and "max_rounds" not in given:
        fields["max_rounds"] = max(given["min_rounds"], fields["max_rounds"])
    return Protocol(wait_s=args.wait_limit, **fields)


def _measure(plugins: Any, study: StudySpec, args: argparse.Namespace) -> int:
    """The study's grid (moerun.grid), the machine prepared (moerun.prepare; a fleet's nodes
    prepare themselves), the points in rounds (moerun.study) into --output, then the summary."""
    from .grid import build_grid
    from .prepare import prepare_machine
    from .study import LocalExecutor, run_study

    output = args.output or Path(defaults.OUTPUT_DIR) / f"{study.name}-{datetime.now():%Y%m%d-%H%M%S}.jsonl"
    if output.exists() and output.is_dir():
        raise ConfigError(f"--output {output} is a folder; give a .jsonl file path")
    reporter = plugins.reporters.get("json" if args.json else args.report)
    err = sys.stderr
    fleet = args.executor == "ray"
    grid = build_grid(plugins, study, here=not fleet)
    protocol = _protocol(args, study)
    for name, reason in grid.skipped:
        print(f"moerun: skipping backend {name}: {reason}", file=err)
    for note in grid.notes:
        print(f"moerun: {note}", file=err)
    if fleet:
        # each node looks at its own contention, probes its own bandwidth and writes its own checkpoints
        from .fleet import RayExecutor, describe_labels

        executor: Any = RayExecutor(address=args.ray_address, if_busy=protocol.if_busy, wait_s=protocol.wait_s)
        if not args.quiet:
            print(f"moerun: Ray cluster labels: {describe_labels(executor.labels())}", file=err)
    else:
        prepared = prepare_machine(plugins, grid.points, if_busy=protocol.if_busy, wait_s=protocol.wait_s,
                                   refresh_probe=args.reprobe, say=lambda line: print(f"moerun: {line}", file=err,
                                                                                      flush=True),
                                   show=None if args.quiet else _checkpoint_progress)
        env = prepared.env
        if not args.quiet:
            print(f"moerun: read bandwidth {env.get('bandwidth_bytes_s', 0) / 1e9:.1f} GB/s "
                  f"({env.get('bandwidth_source', '')})", file=err)
        executor = LocalExecutor(plugins=plugins, cache=prepared.cache, env=env, isolate=not args.no_isolate)
    last: dict[str, Any] = {}

    def before_round() -> None:
        if protocol.if_busy == "wait" and last.get("contended") and not fleet:  # a node waits for itself
            from .contention import wait_for_quiet

            wait_for_quiet(protocol.wait_s)

    def on_result(record: dict[str, Any]) -> None:
        last["contended"] = ((record.get("contention") or {}).get("timed") or {}).get("contended")

    points = grid.points
    with _Progress(len(points) * protocol.min_rounds, enabled=not args.quiet) as progress:
        outcome = run_study(list(points), plugins, output=output, executor=executor, protocol=protocol,
                            on_start=progress.start, on_result=on_result, before_round=before_round)
    from .analysis import verdicts

    rows = verdicts(outcome.results)
    reporter(outcome.results, rows, sys.stdout)
    _summary(outcome, rows, protocol, output, err)
    return 1 if any(r.status == "failed" or r.record.get("round_errors") for r in outcome.results) else 0


def _summary(outcome: Any, rows: list[dict[str, Any]], protocol: Any, output: Path, err: Any) -> None:
    rounds = len({r.get("round") for r in outcome.records})
    print(f"moerun: {len(outcome.results)} points, {len(outcome.records)} measurements in {rounds} rounds "
          f"({outcome.elapsed_s:.0f} s); rounds stopped: {outcome.stopped}", file=err)
    ways: dict[str, int] = {}
    for way in outcome.scheduling.values():
        ways[way] = ways.get(way, 0) + 1
    if ways:
        print("moerun: comparisons measured: " + "; ".join(f"{n} {way}" for way, n in ways.items()), file=err)
    missed = [r for r in rows if r.get("missed_target")]
    if missed and protocol.target:
        print(f"moerun: {len(missed)} of {len(rows)} verdicts missed the ±{protocol.target:.0%} target "
              f"({', '.join(r['group'] + ' on ' + r['backend'] for r in missed)}); more rounds "
              f"(--budget, --max-rounds) or a quieter machine narrow them", file=err)
    busy = [r for r in outcome.results if r.contended]
    if busy:
        print(f"moerun: warning: {len(busy)} points had rounds measured under contention ('busy' column)",
              file=err)
    print(f"moerun: results in {output}", file=err)


@contextlib.contextmanager
def _checkpoint_progress(label: str, size: int) -> Iterator[Callable[[int, int], None] | None]:
    """A checkpoint being written (real shapes take minutes; a child process would show
    nothing): a rich bar on a terminal, else one line; nothing for small ones."""
    if size < (256 << 20):
        yield None
    elif sys.stderr.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                      transient=True) as bar:
            task = bar.add_task(label, total=size)
            yield lambda done, total: bar.update(task, completed=done)
    else:
        print(f"moerun: writing {label} if not cached", file=sys.stderr, flush=True)
        yield None


class _Progress:
    """A rich progress bar on stderr: the point being run and an estimate of time left."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled and sys.stderr.isatty()  # total: an estimate
        self.plain = enabled and not self.enabled
        self.t0 = time.perf_counter()

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task("starting", total=self.total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(*exc)

    def start(self, i: int, round_: int, point: Any) -> None:
        """Before measurement `i` (round `round_`); the total grows when rounds are added."""
        label = f"round {round_ + 1}: {point.model} on {point.backend} {point.precision or ''}".strip()
        if point.hardware:
            label += f" @ {point.hardware}"
        self.total = max(self.total, i + 1)
        if self.enabled:
            self.bar.update(self.task, description=label, completed=i, total=self.total)
        elif self.plain:
            print(f"moerun: [{i + 1}/{self.total}+] {label}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
