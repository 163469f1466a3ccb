"""The `moerun` argument parser and the parsers of its values: one-line errors (exit 2) for
bad input, help texts that quote moerun.defaults."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from .. import __version__, defaults
from ..errors import ConfigError

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


def csv_list(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or ():
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def fit_device(name: str | None) -> str | None:
    if name is None:
        return None
    from ..predict import get_hardware

    return get_hardware(name).name  # an unknown profile is a one-line error listing the known ones


def routings(values: Sequence[str] | None) -> list[str]:
    """--routing values, each checked (a one-line error for a bad one)."""
    from ..routing import Routing

    return list(dict.fromkeys(str(Routing.parse(text)) for text in csv_list(values)))


def memory_caps(values: Sequence[str] | None) -> list[int | None]:
    """--memory-cap values in bytes (None for 'none'), each checked (a one-line error)."""
    from ..memcap import parse_cap

    return list(dict.fromkeys(None if t.lower() == "none" else parse_cap(t) for t in csv_list(values)))


def batch_sizes(values: Sequence[str] | None) -> list[int]:
    out = []
    for text in csv_list(values):
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


def backend_options(items: Sequence[str]) -> dict[str, Any]:
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
    ex = _subcommand(sub, "explain", "take the MoE's gap apart from a --ladder run's results",
                     description="why the MoE is behind: from results of a run with --ladder, each comparison's "
                                 "gap between the MoE and its active twin, per phase, split into shape & dispatch "
                                 "(active -> split twin), routing (split -> fixed-route MoE) and sparsity "
                                 "(fixed route -> MoE), in microseconds per token with 95 %% intervals and as a "
                                 "stacked bar; the dispatch cost per operation; --breakdown's routing time beside. "
                                 "'moerun report' draws the bars as a figure")
    ex.add_argument("results", nargs="+", type=Path, metavar="RESULTS.jsonl")
    ex.add_argument("--json", action="store_true", help="print JSON for scripts")
    dp = _subcommand(sub, "dispatch", "measure each engine's cost per decode operation on this machine",
                     description="time decode steps of a model's graph at tiny widths (weights of a few kilobytes a "
                                 "layer) with 2 and 8 layers on each engine, count the operations each step runs, "
                                 "and print the cost per operation: the dispatch term of 'moerun predict'")
    dp.add_argument("-b", "--backend", action="append", metavar="NAME",
                    help="engine (repeatable or comma-separated; default: every available one)")
    dp.add_argument("-m", "--model", default="small-moe", metavar="NAME",
                    help="whose graph (default: small-moe; its active twin is probed too)")
    dp.add_argument("--json", action="store_true", help="print JSON for scripts")
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
    st.add_argument("--routing", action="append", metavar="ROUTING",
                    help="override the study's routing; repeatable or comma-separated")
    st.add_argument("--memory-cap", action="append", metavar="SIZE",
                    help="override the study's memory_caps (3GB, a device profile, none); repeatable or "
                         "comma-separated")
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
    pre.add_argument("--routing", default=defaults.ROUTING, metavar="ROUTING",
                     help="the routing whose expected union of experts a batched step reads (uniform, zipf:ALPHA, "
                          "sticky:P, trace:FILE; random: uniform's expectation)")
    pre.add_argument("--memory-cap", metavar="SIZE",
                     help="predict under a memory cap (3GB, 2.5GiB, or 'device': the profile's usable memory): "
                          "weights that do not fit page from the device's storage; adds the iso-cap dense twin and "
                          "a sweep of caps with the MoE/twin crossover")
    pre.add_argument("--calibrate", type=Path, metavar="RESULTS.jsonl",
                     help="take the efficiency from these results (median MBU / FLOP utilisation) instead of "
                          "assuming 80 %% / 50 %%")
    pre.add_argument("--dense", action="append", metavar="NAME",
                     help="dense model to compare the MoE with, beside its twins (repeatable or comma-separated), "
                          "e.g. llama-3.2-1b; where a published ratio exists it is printed next to the prediction")
    pre.add_argument("--dispatch", choices=("auto", "off"), default="auto",
                     help="auto (default): add each decode step's operations (counted on --engine's real graph of "
                          "the model) x the device's dispatch cost per operation (its published figure; "
                          "this-machine: measured by a --ladder run given as --calibrate); off: the roofline only")
    pre.add_argument("--engine", default="llamacpp", metavar="BACKEND",
                     help="whose graph's operations count (default: llamacpp, the engine of the published study)")
    pre.add_argument("--list", action="store_true", help="list the device profiles")
    pre.add_argument("--json", action="store_true", help="print JSON for scripts")
    rt = _subcommand(sub, "routing", "record a real MoE checkpoint's routing as a trace, or show a trace",
                     description="routing traces: 'record' runs a Hugging Face MoE checkpoint folder (torch) over "
                                 "text and writes each token's experts per layer; 'show' summarises a trace or "
                                 "a routing model. A trace replays with --routing trace:FILE")
    rsub = rt.add_subparsers(dest="routing_command", metavar="COMMAND")
    rec = _subcommand(rsub, "record", "run a checkpoint folder over text and write its expert choices",
                      "run a Hugging Face MoE checkpoint folder with the torch backend over the paragraphs of a "
                      "text file (its tokenizer.json) and write each token's experts per layer as a trace")
    rec.add_argument("-m", "--model", required=True, metavar="HF_DIR", help="checkpoint folder (config.json, "
                                                                            "safetensors, tokenizer.json)")
    rec.add_argument("--prompt-file", type=Path, metavar="F", help="text; each paragraph (blank-line separated) "
                                                                   "is one sequence")
    rec.add_argument("--token-ids", type=Path, metavar="F", help="instead of text: token ids, whitespace-separated, "
                                                                 "one sequence a line")
    rec.add_argument("-o", "--output", required=True, type=Path, metavar="TRACE", help="trace file (.npz)")
    rec.add_argument("--max-tokens", type=_positive_int, default=512, metavar="N",
                     help="tokens per sequence at most (default: 512)")
    rec.add_argument("-p", "--precision", metavar="NAME", help="torch precision (default: the backend's)")
    rec.add_argument("--threads", type=_positive_int, metavar="N", help="threads (default: torch's choice)")
    show = _subcommand(rsub, "show", "summarise a trace file or a routing model",
                       "summarise a trace file (histogram entropy, reuse, experts per step at batch 1-8), or "
                       "sample a routing model (uniform, zipf:A, sticky:P) for a preset's shape (-m)")
    show.add_argument("what", metavar="TRACE|ROUTING")
    show.add_argument("-m", "--model", metavar="NAME", help="preset whose shape a routing model is sampled for")
    show.add_argument("--tokens", type=_positive_int, default=512, metavar="N",
                      help="tokens per sampled sequence (default: 512)")
    show.add_argument("--json", action="store_true", help="print JSON for scripts")
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
    run.add_argument("--routing", action="append", metavar="ROUTING",
                     help="which experts the tokens choose, planted in the synthetic weights and token ids: "
                          "uniform, zipf:ALPHA (popularity ~ rank^-ALPHA), sticky:P (each expert kept by the next "
                          "token with probability P), trace:FILE (recorded by 'moerun routing record'), or random "
                          f"(random routers, nothing planted); repeatable or comma-separated: a grid dimension "
                          f"(default: {defaults.ROUTING})")
    run.add_argument("--router-skew", type=float, default=defaults.ROUTER_SKEW, metavar="S",
                     help=f"unequal expert popularity in synthetic routers, 0 = none; zipf:ALPHA is the "
                          f"controlled form (default: {defaults.ROUTER_SKEW:g})")
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
    run.add_argument("--ladder", action="store_true",
                     help="the ablation ladder: with each MoE also its active twin, split twin (NAME:split: the "
                          "active bytes as k always-on experts, no router) and fixed-route MoE (NAME:fixed-route: "
                          "weights that send every token to experts 0..k-1), each decode step's operations "
                          "counted; 'moerun explain' takes the gap apart")
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
    run.add_argument("--memory-cap", action="append", metavar="SIZE",
                     help="run each point inside a memory cgroup of SIZE (3GB, 2.5GiB, 3000MB, or a 'moerun predict' "
                          "device profile: its usable memory), page cache included, so weights that do not fit page "
                          "from storage; 'none' for uncapped; repeatable or comma-separated: a grid dimension. A "
                          "capped MoE point adds its iso-cap dense twin; a point killed inside the cap is recorded "
                          "as not fitting (default: none)")
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
