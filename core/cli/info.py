"""The commands that read: `backends`, `models`, `plugins`, `predict`, `compare` and
`report`. Each parses nothing itself (moerun.cli.parser did) and prints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .parser import batch_sizes, csv_list


def cmd_backends(plugins: Any, args: argparse.Namespace) -> int:
    rows = []
    for name in plugins.backends.primary_names():
        cls = plugins.backends.get(name)
        av = cls().availability()
        rows.append({"name": name, "aliases": list(cls.aliases), "plugin": plugins.backends.owner(name),
                     "description": cls.description, "capabilities": cls.capabilities.to_dict(),
                     "options": {k: o.help for k, o in sorted(cls.options.items())}, **av.to_dict()})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="backends", header_style="bold")
    for h in ("name", "available", "version", "precisions", "MoE", "devices", "options (-O)", "why not / install"):
        t.add_column(h)
    for r in rows:
        caps = r["capabilities"]
        why = "" if r["available"] else f"{r['reason']}; {r['install_hint']}".strip("; ")
        t.add_row(r["name"], "yes" if r["available"] else "no", escape(r["version"] or "-"),
                  ", ".join(caps["precisions"]), "yes" if caps["supports_moe"] else "no",
                  ", ".join(r["devices"] or caps["devices"]), escape(", ".join(r["options"]) or "-"), escape(why))
    console = Console(width=180)
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

    from ..analysis import human_count

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


def _predict_capped(spec: Any, hw: Any, args: argparse.Namespace, efficiency: Any) -> int:
    """`moerun predict --memory-cap`: each model under the cap (what does not fit pages from
    the device's storage), the iso-cap dense twin, and a sweep of caps for the crossover."""
    from ..memcap import cap_label, parse_cap
    from ..precision import get_precision
    from ..predict import cap_crossover, cap_sweep, predict
    from ..routing import Routing

    cap = hw.usable_bytes if args.memory_cap == "device" else parse_cap(args.memory_cap)
    routing = str(Routing.parse(args.routing))
    specs = [spec]
    if spec.is_moe:
        specs += [spec.dense_twin("active"), spec.dense_twin("total")]
        try:
            specs.append(spec.fit_twin(int(cap), args.precision))
        except ConfigError:
            pass
    rows = [predict(sp, hw, precision=args.precision, context=args.context, efficiency=efficiency,
                    routing=routing if sp is spec else "random", memory_cap=cap) for sp in specs]
    weights = spec.total_params * get_precision(args.precision).bits_per_weight / 8
    caps = sorted({weights * f for f in (1.25, 1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2)} | {float(cap)}, reverse=True)
    sweep = cap_sweep(spec, hw, precision=args.precision, caps=caps, context=args.context, efficiency=efficiency,
                      routing=routing) if spec.is_moe else []
    cross = cap_crossover(sweep) if sweep else None
    if args.json:
        print(json.dumps({"models": rows, "sweep": sweep, "crossover": cross}, indent=2))
        return 0
    print(f"{hw.name} under a {cap_label(cap)} memory cap: {hw.bandwidth_bytes_s / 1e9:.0f} GB/s memory, "
          + (f"{hw.storage_bytes_s / 1e9:.2f} GB/s storage ({hw.storage_source})" if hw.storage_bytes_s
             else "no storage figure"))
    for r in rows:
        p = r.get("paging") or {}
        if r.get("decode_tok_s") is None:
            print(f"  {r['model']:36s} {r.get('reason', 'no prediction')}")
            continue
        print(f"  {r['model']:36s} decode {r['decode_tok_s']:8.2f} tok/s  prefill {r['prefill_tok_s']:8.1f} tok/s  "
              f"{p.get('regime', '-')}: {p.get('read_bytes_per_token', 0) / 1e6:.0f} MB/token from storage "
              f"({p.get('storage_share', 0):.0%} of the step)")
    if sweep:
        print("  cap sweep (MoE against the iso-cap dense twin, which fits):")
        for r in sweep:
            ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
            print(f"    {cap_label(r['memory_cap']):>9s}  MoE {_rate(r.get('moe_decode_tok_s'))} tok/s "
                  f"({r.get('moe_regime') or '-'})  twin {_rate(r.get('fit_decode_tok_s'))} tok/s  MoE/twin {ratio}")
        if cross:
            print(f"  crossover near {cap_label(cross['memory_cap'])}: the MoE decodes faster {cross['moe_wins']} it")
        else:
            print("  crossover: none in the sweep")
    return 0


def _rate(x: float | None) -> str:
    return f"{x:8.2f}" if x else "       -"


def cmd_predict(plugins: Any, args: argparse.Namespace) -> int:
    from ..predict import HARDWARE, crossover, efficiency_from_results, get_hardware, predict, this_machine
    from ..routing import Routing, routing_label

    if args.list:
        rows = [{"name": h.name, "description": h.description, "bandwidth_gb_s": h.bandwidth_bytes_s / 1e9,
                 "peak_tflops": h.peak_flops / 1e12, "memory_gb": h.memory_bytes / 1e9, "source": h.source,
                 "storage_gb_s": h.storage_bytes_s / 1e9 if h.storage_bytes_s else None,
                 "storage_source": h.storage_source,
                 "dispatch_us": h.dispatch_s * 1e6 if h.dispatch_s else None,
                 "dispatch_range_us": [x * 1e6 for x in h.dispatch_range_s] if h.dispatch_range_s else None,
                 "dispatch_source": h.dispatch_source}
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
        from ..environment import capture

        from ..cache import Cache
        from ..storage import storage_probe

        hw = this_machine({**capture(), "storage": storage_probe(Cache().root / "machine")})
    else:
        hw = get_hardware(args.hardware)
    efficiency = None
    if args.calibrate:
        from ..records import load_results

        efficiency = efficiency_from_results(load_results([args.calibrate]), args.precision)
    spec = plugins.models.resolve(args.model)
    dense = [plugins.models.resolve(d) for d in csv_list(args.dense)]
    if any(d.is_moe for d in dense):
        raise ConfigError(f"--dense names an MoE model: {', '.join(d.name for d in dense if d.is_moe)}")
    if args.memory_cap:
        return _predict_capped(spec, hw, args, efficiency)
    if args.dispatch == "auto" and hw.name == "this-machine":
        hw = _measured_dispatch(plugins, hw, spec, args)
    specs = [spec] + ([spec.dense_twin("active"), spec.dense_twin("total")] if spec.is_moe else []) + dense
    ops = _graph_ops(plugins, specs, args) if args.dispatch == "auto" else {}
    batches = batch_sizes(args.batch_size) or [1]
    routing = str(Routing.parse(args.routing))
    by_batch = {b: [predict(sp, hw, precision=args.precision, context=args.context, efficiency=efficiency, batch=b,
                            routing=routing if sp is spec else "random", ops=ops.get(sp.name))
                    for sp in specs] for b in batches}
    cross = crossover(spec, hw, precision=args.precision, context=args.context,
                      efficiency=efficiency, routing=routing) if spec.is_moe else None
    if args.json:
        for b in batches:
            if cross is not None:
                by_batch[b][0]["crossover"] = cross  # the MoE's row
            for r in by_batch[b][1:]:
                r["published_ratio"] = _published(spec.name, r["model"], hw.name)
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
    if args.dispatch == "auto":
        print(f"dispatch: {hw.dispatch_s * 1e6:.2f} us per operation [{hw.dispatch_range_s[0] * 1e6:.2f}-"
              f"{hw.dispatch_range_s[1] * 1e6:.2f}] ({hw.dispatch_source}); operations per decode step: "
              f"{args.engine}'s graph of each model, counted" if hw.dispatch_s else
              f"dispatch: {hw.name} has no dispatch figure; roofline only")
    for b, rows in by_batch.items():
        if len(batches) > 1 or b > 1:
            touched = rows[0].get("experts_touched") if spec.is_moe else None
            print(f" batch {b}" + (f" (MoE: {touched:.1f} of {spec.num_experts} experts per layer and step, "
                                   f"{routing_label(routing) if Routing.parse(routing).planted else 'uniform'} "
                                   f"routing)" if touched else ""))
        for r in rows:
            if r["fits"] is False:
                print(f"  {r['model']:28s} does not fit: {r['reason']}")
                continue
            d = r.get("dispatch") or {}
            extra = (f"; with dispatch {r['decode_tok_s']:7.1f} [{r['decode_tok_s_range'][0]:.1f}-"
                     f"{r['decode_tok_s_range'][1]:.1f}] ({d['ops_per_step']:.0f} ops/step, "
                     f"{d['share']:.0%} of the step)" if d.get("applied") else "")
            print(f"  {r['model']:28s} decode {r['roofline_decode_tok_s']:8.1f} tok/s roofline{extra}  "
                  f"prefill {r['prefill_tok_s']:9.1f} tok/s  ({r['bytes_per_token'] / 1e6:.0f} MB/token, "
                  f"{r['memory_needed_bytes'] / 1e9:.1f} GB, {r['decode_bound']}-bound)")
        if spec.is_moe and rows[0].get("decode_tok_s"):
            for r in rows[1:]:
                if not r.get("decode_tok_s"):
                    continue
                line = f"  MoE / {r['model']:22s} roofline {rows[0]['roofline_decode_tok_s'] / r['roofline_decode_tok_s']:.2f}x"
                if (rows[0].get("dispatch") or {}).get("applied") and (r.get("dispatch") or {}).get("applied"):
                    lo = rows[0]["decode_tok_s_range"][0] / r["decode_tok_s_range"][0]
                    hi = rows[0]["decode_tok_s_range"][1] / r["decode_tok_s_range"][1]
                    line += (f", with dispatch {rows[0]['decode_tok_s'] / r['decode_tok_s']:.2f}x "
                             f"[{min(lo, hi):.2f}-{max(lo, hi):.2f}]")
                published = _published(spec.name, r["model"], hw.name)
                if published:
                    line += f"; published {published['ratio']:.2f}x ({published['source']})"
                print(line)
    if cross is not None:
        if cross["batch"]:
            print(f"  crossover: from batch {cross['batch']} the MoE decodes less than {cross['advantage']:.1f}x its "
                  f"total twin ({cross['ratio']:.2f}x): its sequences' experts cover most of its weights")
        else:
            closest = (f"; closest {cross['closest_ratio']:.2f}x at batch {cross['closest_batch']}, where the "
                       f"total twin turns compute-bound" if cross.get("closest_ratio") else "")
            print(f"  crossover: none below {cross['advantage']:.1f}x ({cross['why']}{closest})")
    return 0



def _published(moe: str, dense: str, device: str) -> dict[str, Any] | None:
    from ..profiles import PUBLISHED_RATIOS

    found = PUBLISHED_RATIOS.get((moe, dense, device))
    return {"ratio": found[0], "source": found[1]} if found else None


def _graph_ops(plugins: Any, specs: list[Any], args: argparse.Namespace) -> dict[str, float | None]:
    """Operations per decode step of each model on --engine's real graph
    (moerun.ladder.graph_ops, cached per graph: twins of one width-free graph count once); a
    one-line error where the engine cannot count them."""
    from ..ladder import graph_ops

    out: dict[str, float | None] = {}
    for spec in specs:
        got = graph_ops(plugins, spec, args.engine)
        if not got.get("available"):
            raise ConfigError(f"cannot count {spec.name}'s operations on {args.engine}: {got.get('reason')} "
                              f"(--dispatch off for the roofline alone)")
        out[spec.name] = got["ops"]
    return out


def _measured_dispatch(plugins: Any, hw: Any, spec: Any, args: argparse.Namespace) -> Any:
    """this-machine's dispatch cost on --engine: measured by the ablation ladder in the
    --calibrate results where they hold one clearly above zero (moerun.ladder.ladders), else
    by the tiny-graph probe of `spec` here and now (moerun.ladder.dispatch_probe)."""
    import statistics

    import attrs

    from ..ladder import dispatch_probe, ladders
    from ..records import load_results

    # a ladder's figure where its interval is above zero (decode noise can swamp a few dozen
    # added operations), else the probe, which times hundreds of them where bytes do not count
    found = [row["dispatch"] for row in (ladders(load_results([args.calibrate])) if args.calibrate else [])
             if row["backend"] == args.engine and row["dispatch"].get("available")
             and (row["dispatch"]["us_per_op_ci95"] or [0.0])[0] > 0]
    if found:
        per_op = statistics.median(d["us_per_op"] for d in found)
        lo = min((d["us_per_op_ci95"] or [d["us_per_op"]] * 2)[0] for d in found)
        hi = max((d["us_per_op_ci95"] or [d["us_per_op"]] * 2)[1] for d in found)
        source = f"measured by the ablation ladder in {args.calibrate} ({args.engine}, {len(found)} comparison(s))"
    else:
        probe = dispatch_probe(plugins, args.engine, spec)
        if not probe["available"]:
            return hw
        per_op, (lo, hi) = probe["us_per_op"], probe["us_per_op_range"]
        source = f"measured here: {probe['method']} ({args.engine})"
    return attrs.evolve(hw, dispatch_s=max(per_op, 0.0) * 1e-6,
                        dispatch_range_s=(max(lo, 0.0) * 1e-6, max(hi, 0.0) * 1e-6), dispatch_source=source)


def cmd_compare(plugins: Any, args: argparse.Namespace) -> int:
    import csv

    from ..analysis import machine_label, verdicts
    from ..records import load_results
    from ..routing import routing_label

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
                             "precision": r.precision, "routing": r.routing_name, "status": r.status,
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
    routed = any(r["routing"] != "random" for r in rows)  # a routing column when one was requested
    t = Table(title="results by machine", header_style="bold")
    for h in ("machine", "model", "backend", "prec", *(["routing"] if routed else []), "status", "decode tok/s",
              "prefill tok/s", "MBU"):
        t.add_column(h, justify="right" if h in ("decode tok/s", "prefill tok/s", "MBU") else "left")
    for r in sorted(rows, key=lambda r: (str(r["model"]), str(r["backend"]), r["routing"], r["machine"])):
        t.add_row(escape(r["machine"]), escape(str(r["model"])), escape(str(r["backend"])),
                  escape(str(r["precision"] or "")), *([escape(routing_label(r["routing"]))] if routed else []),
                  r["status"] or "",
                  f"{r['decode_tok_s']:,.1f}" if r["decode_tok_s"] else "-",
                  f"{r['prefill_tok_s']:,.0f}" if r["prefill_tok_s"] else "-",
                  f"{r['mbu']:.0%}" if r["mbu"] else "-")
    console.print(t)
    if verdict_rows:
        v = Table(title="MoE / dense twin by machine (decode and prefill tokens/s ratios)", header_style="bold")
        for h in ("machine", "model", "backend", "prec", *(["routing"] if routed else []), "decode vs active",
                  "prefill vs active", "decode vs total"):
            v.add_column(h)
        for row in verdict_rows:
            v.add_row(escape(row["machine"]), escape(str(row["group"])), escape(str(row["backend"])),
                      escape(str(row["precision"] or "")),
                      *([escape(routing_label(row.get("routing")))] if routed else []),
                      *[f"{row[k]:.2f}x" if row.get(k) else "-" for k in
                        ("decode_vs_active", "prefill_vs_active", "decode_vs_total")])
        console.print(v)
    return 0


def cmd_dispatch(plugins: Any, args: argparse.Namespace) -> int:
    """moerun.ladder.dispatch_probe per engine, for the model and (an MoE's) active twin."""
    from ..grid import select_backends
    from ..ladder import dispatch_probe

    backends, skipped = select_backends(plugins, csv_list(args.backend) or None)
    spec = plugins.models.resolve(args.model)
    specs = [spec] + ([spec.dense_twin("active")] if spec.is_moe else [])
    rows = [dispatch_probe(plugins, b, s) for b in backends for s in specs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        if not r["available"]:
            print(f"{r['backend']:20s} not measured: {r['reason']}")
            continue
        lo, hi = r["us_per_op_range"]
        print(f"{r['backend']:20s} {r['spec']:24s} {r['us_per_op']:7.2f} us per operation [{lo:.2f}-{hi:.2f} over "
              f"{r['pairs']} pairs]  ({r['ops'][0]} -> {r['ops'][1]} operations, {r['step_us'][0]:.0f} -> "
              f"{r['step_us'][1]:.0f} us per step; {r['unit']})")
    for name, why in skipped:
        print(f"{name:20s} not available: {why}")
    return 0


BAR = 48  # characters of the text bar that stand for the whole gap


def cmd_explain(plugins: Any, args: argparse.Namespace) -> int:
    """The ablation ladder's rows (moerun.ladder) as text: per comparison and phase the gap,
    each step with its interval and share, a stacked bar, operations and dispatch cost."""
    from ..ladder import ladders
    from ..records import load_results

    results = load_results(args.results)
    rows = ladders(results)
    if not rows:
        raise ConfigError("the results hold no ablation ladder: an MoE with its active twin and at least its split "
                          "twin or fixed-route MoE, measured ok (run with --ladder)")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    marks = {"shape": "#", "routing": "=", "sparsity": "~"}
    print("steps: shape & dispatch (#) active twin -> split twin; routing (=) split -> fixed-route MoE; "
          "sparsity (~) fixed route -> MoE; us per token [95 % interval], share of the gap")
    for row in rows:
        print(f"\n{row['group']} on {row['backend']} at {row['precision'] or 'default'}, batch {row['batch_size']}, "
              f"prompt {row['prompt_tokens']}, {row['new_tokens']} new tokens")
        for phase in ("decode", "prefill"):
            ph = row.get(phase)
            if not ph:
                continue
            ci = ph["gap_us_ci95"]
            print(f"  {phase}: the MoE takes {ph['gap_us']:+.0f} us/token"
                  + (f" [{ci[0]:+.0f}, {ci[1]:+.0f}]" if ci else "")
                  + f" over its active twin ({ph['gap_ratio']:.2f}x its time; {ph['restarts']} restart(s), "
                  f"{ph['units']} units: {ph['method']})")
            bar = ""
            positive = sum(max(st["share"] or 0.0, 0.0) for st in ph["steps"])
            scale = BAR / max(1.0, positive)  # steps that overshoot the gap (others negative) fit the frame
            for st in ph["steps"]:
                sci, share = st["us_ci95"], st["share"]
                print(f"    {st['label']:17s} {st['us']:+8.0f} us"
                      + (f" [{sci[0]:+.0f}, {sci[1]:+.0f}]" if sci else "")
                      + (f"  {share:+.0%} of the gap" if share is not None else "")
                      + (f" [{st['share_ci95'][0]:+.0%}, {st['share_ci95'][1]:+.0%}]" if st.get("share_ci95") else ""))
                if share is not None and share > 0:
                    bar += marks.get(st["step"], "?") * round(share * scale)
            print(f"    |{bar:<{BAR}}| " + ("(the frame is the gap)" if positive <= 1 else
                                            f"(the steps that add time sum to {positive:.0%} of the gap: the others "
                                            f"save time; the frame is their sum)"))
        d = row["dispatch"]
        ops = ", ".join(f"{r['role']} {r['ops'] if r['ops'] is not None else '-'}" for r in row["rungs"])
        print(f"  operations per decode step: {ops}" + (f" ({d['unit']})" if d.get("unit") else ""))
        if d.get("available"):
            ci = d["us_per_op_ci95"]
            print(f"  dispatch: {d['us_per_op']:.2f} us per operation" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
                  + f" ({d['added_ops']} operations the split twin adds)")
        else:
            print(f"  dispatch: not measured ({d['reason']})")
        b = row.get("breakdown")
        if b:
            routing = next((s for s in (row.get("decode") or {}).get("steps", ()) if s["step"] == "routing"), None)
            print(f"  --breakdown ({b['instrument']}): router {b['router_us']:.0f} us/token"
                  + (f" = {b['router_share_of_gap']:.0%} of the gap" if b.get("router_share_of_gap") is not None else "")
                  + (f"; the ladder's routing step: {routing['us']:+.0f} us/token" if routing else ""))
    return 0


def cmd_report(plugins: Any, args: argparse.Namespace) -> int:
    from ..analysis import verdicts
    from ..records import load_results

    results = load_results(args.results)
    out = args.out or Path("moerun-report")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "report.md", "w") as stream:
        plugins.reporters.get("markdown")(results, verdicts(results), stream, assets_dir=out)
    print(f"moerun: report in {out / 'report.md'}", file=sys.stderr)
    return 0
