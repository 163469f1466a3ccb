#!/usr/bin/env python
"""Does ONNX Runtime's com.microsoft MoE op (CPU) care *which* experts a token picks?

The ablation ladder's first fixed-route MoE (router weights zero: the op's tie rule picks
experts 6 and 7 of 8 for every token) decoded ~2.8 ms/token slower than small-moe itself on
onnxruntime-contrib with 2 threads. This times decode steps of small-moe on the contrib
graph with the router's logits shifted by a constant that fixes the pair of experts, against
the learned router, alternating the sessions, at the engine's thread count and at one thread:
where a pair's time depends on where the pair sits, the op splits the experts between its
threads by index (a pair inside one half runs on one thread). Beside them, in the same
process: the graph with its routers' weights zero (every logit ties: how the ladder's fixed
route was first built) and the fixed route as moerun builds it now (`fix_route`: experts 0
and 1 ranked first by a constant hidden dimension, no ties).

    .venv/bin/python examples/benchmarks/bench_contrib_expert_placement.py [--threads 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import attrs
import numpy as np

from moerun import Cache, LoadSettings, get_plugin_manager, synthetic_checkpoint, token_ids

PAIRS = ([0, 1], [3, 4], [6, 7], [0, 7])


def with_fixed_pair(artifact, experts: list[int], folder: Path, num_experts: int):
    """The contrib graph with every router's logits + 10 on `experts`: the same k every token."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(artifact.path))
    bias = np.zeros(num_experts, np.float32)
    bias[experts] = 10.0
    name = "fixed_pair_bias"
    model.graph.initializer.append(numpy_helper.from_array(bias, name))
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        if node.name.endswith("_router_gate"):
            out = node.output[0]
            node.output[0] = out + "_unbiased"
            nodes.append(helper.make_node("Add", [out + "_unbiased", name], [out]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    path = folder / f"pair-{'-'.join(map(str, experts))}.onnx"
    onnx.save(model, str(path))
    return attrs.evolve(artifact, path=path)


def with_zero_router(artifact, folder: Path):
    """The contrib graph with every router's weights zero: all logits tie."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(artifact.path))
    for i, t in enumerate(model.graph.initializer):
        if t.name.endswith("gate.weight.T"):
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    path = folder / "zero-router.onnx"
    onnx.save(model, str(path))
    return attrs.evolve(artifact, path=path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the engine's choice)")
    ap.add_argument("--pairs", type=int, default=7, help="alternated repetitions (default 7)")
    args = ap.parse_args()
    plugins, cache = get_plugin_manager(entrypoints=False), Cache()
    engine = plugins.backends.get("onnxruntime-contrib")()
    spec = plugins.models.resolve("small-moe")
    artifact = engine.prepare(synthetic_checkpoint(spec, cache, seed=0), "fp32", cache)
    folder = Path(tempfile.mkdtemp(prefix="moerun-contrib-pairs-"))
    try:
        fixed = engine.prepare(synthetic_checkpoint(plugins.models.resolve("small-moe:fixed-route"), cache, seed=0),
                               "fp32", cache)
        arts = {"learned router": artifact, "zero router (ties)": with_zero_router(artifact, folder),
                "moerun fixed route": fixed}
        arts.update({f"experts {p[0]},{p[1]}": with_fixed_pair(artifact, p, folder, spec.num_experts) for p in PAIRS})
        sessions = {k: engine.load(a, LoadSettings(max_context=128, threads=args.threads)) for k, a in arts.items()}
        ids = token_ids(spec.vocab_size, 64, 0)

        def step_us(session) -> float:
            session.reset()
            session.prefill(ids[:32])
            t0 = time.perf_counter()
            for tok in ids[32:]:
                session.decode(tok)
            return (time.perf_counter() - t0) / 32 * 1e6

        for s in sessions.values():
            step_us(s)
        times = {k: [] for k in sessions}
        for _ in range(args.pairs):
            for k, s in sessions.items():
                times[k].append(step_us(s))
        ref = statistics.median(times["learned router"])
        print(f"small-moe, onnxruntime-contrib fp32, threads={args.threads or 'default'}; decode us/token, "
              f"median of {args.pairs} (min-max), ratio to the learned router's median")
        for k, v in times.items():
            print(f"  {k:16s} {statistics.median(v):8.0f} ({min(v):.0f}-{max(v):.0f})  {statistics.median(v) / ref:.2f}x")
        for s in sessions.values():
            s.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
