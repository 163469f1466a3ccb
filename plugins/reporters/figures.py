"""The Markdown report's figures (matplotlib, drawn off-screen): each a function of the
folded points (or the verdict rows) that returns a figure, or None when there is nothing to
draw."""

from __future__ import annotations

from typing import Any

from moerun.analysis import paired_precision
from moerun.breakdown import CATEGORIES
from moerun.records import PointResult
from moerun.routing import routing_label


def pyplot() -> Any:
    """matplotlib.pyplot on the off-screen Agg backend (reports are written, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def breakdown_figure(results: list[PointResult], phase: str = "decode"):
    """A stacked horizontal bar per (model, backend) with a breakdown: milliseconds per step
    by category, MoE models next to their twins. None when no result has a breakdown."""
    rows = [r for r in results if r.breakdown.get("available") and r.breakdown.get(phase)]
    if not rows:
        return None
    plt = pyplot()

    order = {"moe": 0, "dense-active": 1, "dense-total": 2}
    rows.sort(key=lambda r: (r.backend, r.group, order.get(r.role, 3)))
    labels = [f"{r.model_name} | {r.backend}" for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    colors = plt.get_cmap("tab10")
    for ci, cat in enumerate(CATEGORIES):
        widths = [r.breakdown[phase]["seconds"][cat] * 1e3 for r in rows]
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


def ladder_figure(results: list[PointResult]):
    """A stacked horizontal bar per (MoE, backend, phase) of the ablation ladder: each step's
    share of the MoE's gap to its active twin (shape & dispatch, routing, sparsity; a step
    that made the model faster stacks to the left of zero). None without a ladder."""
    from moerun.ladder import ladders

    bars = [(f"{row['group']} | {row['backend']} | {phase}", row[phase]) for row in ladders(results)
            for phase in ("decode", "prefill") if row.get(phase)]
    if not bars:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(bars) + 1.8))
    labels = [label for label, _ in bars]
    pos, neg = [0.0] * len(bars), [0.0] * len(bars)
    colors = {"shape": "tab:blue", "routing": "tab:orange", "sparsity": "tab:green"}
    names = {"shape": "shape & dispatch (active -> split)", "routing": "routing (split -> fixed route)",
             "sparsity": "sparsity (fixed route -> MoE)"}
    for step in ("shape", "routing", "sparsity"):
        widths = [next((s["share"] or 0.0 for s in ph["steps"] if s["step"] == step), 0.0) for _, ph in bars]
        lefts = [n if w < 0 else p for w, p, n in zip(widths, pos, neg)]
        ax.barh(labels, widths, left=lefts, label=names[step], color=colors[step])
        pos = [p + max(w, 0.0) for p, w in zip(pos, widths)]
        neg = [n + min(w, 0.0) for n, w in zip(neg, widths)]
    for i, (_, ph) in enumerate(bars):
        ax.annotate(f"gap {ph['gap_us']:+.0f} us/token ({ph['gap_ratio']:.2f}x)", (max(pos[i], 1.0), i),
                    xytext=(4, 0), textcoords="offset points", va="center", fontsize=8)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("share of the MoE's time per token over its active twin's (1 = the whole gap)")
    ax.set_title("Why the MoE is behind: the ablation ladder")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


_ROLE_ORDER = {"moe": 0, "fixed-route": 1, "split": 2, "dense-active": 3, "dense-total": 4, "dense-isomem": 5,
               "dense-fit": 6, "baseline": 7, "dense": 8, "": 9}


def cap_figure(results: list[PointResult]):
    """Decode tokens/s against the memory cap, one panel per backend and precision: each
    model a line (the iso-cap dense twins, one model per cap, as one line 'dense that fits
    the cap'), uncapped points drawn at the right edge, killed points as crosses on the
    axis. None unless some point ran under a cap."""
    capped = [r for r in results if r.memory_cap]
    if not capped:
        return None
    plt = pyplot()
    groups = {r.group for r in capped}
    mine = [r for r in results if r.group in groups or r.role == "baseline"]
    panels = sorted({(r.hardware or "", r.backend, str(paired_precision(r))) for r in mine})
    top = max(r.memory_cap for r in capped) * 1.25
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1.5, 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        lines: dict[tuple, list] = {}
        for r in mine:
            if (r.hardware or "", r.backend, str(paired_precision(r))) != panel:
                continue
            name = "dense that fits the cap" if r.role == "dense-fit" else r.model_name
            lines.setdefault((_ROLE_ORDER.get(r.role, 7), name), []).append(r)
        for (_, name), rs in sorted(lines.items()):
            pts = sorted((r.memory_cap or top, r.metrics.get("decode_tok_s")) for r in rs if r.ok)
            line = ax.plot([c / 1e9 for c, _ in pts], [v for _, v in pts], marker="o", label=name)
            killed = [r.memory_cap for r in rs if not r.ok and r.memory_cap]
            if killed:
                ax.plot([c / 1e9 for c in killed], [0.0] * len(killed), "x", color=line[0].get_color(), ms=9)
        ax.axvline(top / 1e9, color="grey", lw=0.5, ls=":")
        ax.set_xlabel("memory cap, GB (dotted line: uncapped; x: killed inside the cap)")
        ax.set_title(" ".join(x for x in panel if x), fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("decode tokens/s (median)")
    fig.tight_layout()
    return fig


def batch_figure(results: list[PointResult]):
    """Aggregate decode tokens/s against batch size, one panel per backend and MoE
    precision: the MoE and each of its twins as a line (iso-memory twins run at their own
    precision and pair with the MoE's). None unless some point decoded several sequences."""
    ok = [r for r in results if r.ok and r.metrics.get("decode_tok_s")]
    if not any(r.batch_size > 1 for r in ok):
        return None
    plt = pyplot()

    def panel_of(r: PointResult) -> tuple[str, str, str]:
        return r.hardware or "", r.backend, str(paired_precision(r))

    panels = sorted({panel_of(r) for r in ok})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [r for r in ok if panel_of(r) == panel]
        lines: dict[tuple, list] = {}
        for r in mine:
            key = (_ROLE_ORDER.get(r.role, 6), r.model_name, str(r.precision))
            lines.setdefault(key, []).append((r.batch_size, r.metrics["decode_tok_s"]))
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


def throughput_figure(results: list[PointResult], metric: str = "decode_tok_s"):
    """Grouped bars: for each backend / precision / prompt length, the median tokens/s of the
    MoE model, its twins and baselines, with the rounds' min-max as error bars."""
    ok = [r for r in results if r.ok and r.metrics.get(metric)]
    if not ok:
        return None
    plt = pyplot()

    def where(r: PointResult) -> str:
        batch = f" batch {r.batch_size}" if r.batch_size > 1 else ""
        return f"{r.backend} {r.precision}\nprompt {r.point.get('prompt_tokens')}{batch}"

    groups = sorted({where(r) for r in ok})
    models = sorted({(_ROLE_ORDER.get(r.role, 5), r.model_name) for r in ok})
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(max(9, 1.6 * len(groups) * max(1, len(models)) / 2), 4.5))
    for mi, (_, model) in enumerate(models):
        xs, ys, lo, hi = [], [], [], []
        for gi, g in enumerate(groups):
            r = next((r for r in ok if where(r) == g and r.model_name == model), None)
            if r is None:
                continue
            value = r.metrics[metric]
            reps = ([x[metric] for x in r.rounds if x.get("status") == "ok" and x.get(metric)]
                    or r.timings.get(metric + "_reps") or [value])
            xs.append(gi + (mi - (len(models) - 1) / 2) * width)
            ys.append(value)
            lo.append(value - min(reps))
            hi.append(max(reps) - value)
        ax.bar(xs, ys, width=width, label=model, yerr=[lo, hi], capsize=2)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(f"{metric.split('_')[0]} tokens/s (median, min-max over rounds)")
    ax.set_title(f"{metric.split('_')[0].capitalize()} tokens/s: MoE, its twins and baselines")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def speedup_figure(verdicts: list[dict[str, Any]]):
    """Per backend: the MoE's measured decode speed-up over its total-matched twin next to
    the bandwidth-bound ideal (the ratio of weight bytes read per token)."""
    rows = [v for v in verdicts if v.get("decode_vs_total") and v.get("ideal_decode_vs_total")]
    if not rows:
        return None
    plt = pyplot()

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


def roofline_figure(results: list[PointResult]):
    """Decode tokens/s against bytes read per token, log-log, under the bandwidth roofline
    (measured bandwidth / bytes per token): the distance below the line is what the engine
    leaves on the table."""
    ok = [r for r in results if r.ok and r.metrics.get("bytes_per_token")]
    bw = next((r.env["bandwidth_bytes_s"] for r in ok if r.env.get("bandwidth_bytes_s")), None)
    if not ok or not bw:
        return None
    import numpy as np

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 5))
    xs = [r.metrics["bytes_per_token"] / 1e6 for r in ok]
    line = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 50)
    ax.plot(line, bw / (line * 1e6), color="black", linewidth=1,
            label=f"roofline: {bw / 1e9:.1f} GB/s measured")
    markers = "os^vD<>ph*"
    for i, backend in enumerate(sorted({r.backend for r in ok})):
        rs = [r for r in ok if r.backend == backend]
        ax.scatter([r.metrics["bytes_per_token"] / 1e6 for r in rs], [r.metrics["decode_tok_s"] for r in rs],
                   marker=markers[i % len(markers)], label=backend, s=40)
        for r in rs:
            ax.annotate(r.model_name, (r.metrics["bytes_per_token"] / 1e6, r.metrics["decode_tok_s"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes read per decoded token (MB)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("Decode against the bandwidth roofline")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def routing_figure(results: list[PointResult]):
    """Per (model, routing) measured: left, each layer's measured expert shares by popularity
    rank against the requested shares; right, distinct experts per decode step and layer
    against batch size, measured, expected under the routing and under uniform routing. The
    first engine that observed it stands for the others (with a planted routing they choose
    the same experts; the routing table says how exactly). None when nothing was observed."""
    import numpy as np

    seen: dict[tuple[str, str], PointResult] = {}
    for r in results:
        if r.routing.get("histogram"):
            seen.setdefault((r.model_name, r.routing_name), r)
    if not seen:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(seen), 2, figsize=(10, 3.2 * len(seen)), squeeze=False)
    for (left, right), ((model, routing), r) in zip(axes, sorted(seen.items())):
        g = r.routing
        counts = np.asarray(g["histogram"], float)
        share = counts / counts.sum(axis=1, keepdims=True)
        ranks = np.arange(1, share.shape[1] + 1)
        for layer_share in share:
            left.plot(ranks, np.sort(layer_share)[::-1], color="tab:blue", alpha=0.35, lw=1)
        if g.get("requested_share"):
            left.plot(ranks, np.sort(np.asarray(g["requested_share"]), axis=1)[:, ::-1].mean(axis=0), "k--", lw=1.5,
                      label="requested")
            left.legend(fontsize=7)
        left.axhline(1 / share.shape[1], color="gray", lw=0.8, ls=":")
        left.set_xlabel("expert popularity rank (per layer)")
        left.set_ylabel("share of routed choices")
        left.set_title(f"{model}, {routing_label(routing)} on {r.backend}: "
                       f"{g.get('routed_token_layers', 0):,} token-layers", fontsize=8)
        steps = g.get("experts_per_step") or {}
        batches = sorted(int(b) for b in steps)
        for key, style, color, label in (("measured", "o-", "tab:blue", "measured"),
                                         ("expected", "--", "black", "expected (routing)"),
                                         ("uniform", ":", "gray", "uniform routing")):
            ys = [steps[str(b)].get(key) for b in batches]
            if all(y is not None for y in ys) and ys:
                right.plot(batches, ys, style, color=color, label=label)
        right.set_xscale("log", base=2)
        right.set_xlabel("sequences decoded together")
        right.set_ylabel("distinct experts per layer and step")
        right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figures(results: list[PointResult], verdicts: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    """(file stem, title, figure or None) of every figure the Markdown report links."""
    return [("decode-throughput", "Decode throughput", throughput_figure(results, "decode_tok_s")),
            ("decode-batch", "Decode throughput against batch size", batch_figure(results)),
            ("prefill-throughput", "Prefill throughput", throughput_figure(results, "prefill_tok_s")),
            ("speedup", "Realised versus theoretical speed-up", speedup_figure(verdicts)),
            ("roofline", "Decode against the bandwidth roofline", roofline_figure(results)),
            ("routing", "Routing: requested against measured", routing_figure(results)),
            ("memory-cap", "Decode throughput against the memory cap", cap_figure(results)),
            ("breakdown-decode", "Where decode time goes", breakdown_figure(results, "decode")),
            ("breakdown-prefill", "Where prefill time goes", breakdown_figure(results, "prefill")),
            ("ladder", "Why the MoE is behind: the ablation ladder", ladder_figure(results))]
