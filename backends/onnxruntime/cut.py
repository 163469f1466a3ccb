"""Cut timing for ONNX Runtime (moerun.breakdown.cut_timing), which cannot stop a run
midway: a run executes its whole plan whatever outputs are asked for. So cut k is a pruned
session: the nodes up to and including node k that its output depends on (and the graph's
own outputs made on the way, the present KV), with that output as the session's output.

It runs in a fresh process of its own, where every session shares one process-wide thread
pool. With a pool per session (ONNX Runtime's default, and the timed session's setting), a
pool still spinning for the session timed last, or one woken from parking, slowed tiny
models' steps 1.5-3x and moved the stretches between cuts by hundreds of microseconds from
run to run; with one shared pool they repeat within a few microseconds. ONNX Runtime fixes
that choice for the whole process when its first session is made, hence the process. The
un-instrumented reference is a full session in that process, timed between the cuts.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np


def _subgraph_names(node: Any) -> set[str]:
    """Every tensor name a control-flow node's subgraphs read (outer-scope values included)."""
    names: set[str] = set()
    for attr in node.attribute:
        for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= _subgraph_names(n)
    return names


def prefix_model(model: Any, node_index: int, elem_types: dict[str, int]) -> Any:
    """The model computing node `node_index`'s first output and only what it (and the graph
    outputs made by nodes up to it) depend on; that output first among the outputs."""
    import onnx
    from onnx import helper

    g = model.graph
    nodes = list(g.node)
    target = nodes[node_index].output[0]
    graph_outputs = {o.name for o in g.output}
    needed = {target} | {o for n in nodes[: node_index + 1] for o in n.output if o in graph_outputs}
    keep = []
    for node in reversed(nodes[: node_index + 1]):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed |= _subgraph_names(node)
    keep.reverse()
    made = {o for n in keep for o in n.output}
    outputs = [helper.make_tensor_value_info(target, elem_types.get(target, onnx.TensorProto.FLOAT), None)]
    outputs += [o for o in g.output if o.name in made and o.name != target]
    graph = helper.make_graph(keep, f"{g.name}_cut{node_index}", list(g.input), outputs,
                              initializer=[t for t in g.initializer if t.name in needed])
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def elem_types(model: Any) -> dict[str, int]:
    """Element types of the graph's tensors as far as ONNX shape inference knows them
    (outputs of contrib ops it cannot type default to float in `prefix_model`)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a convenience here
        return {}
    values = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.HasField("tensor_type")}


def run_cut_timing(path: str, provider: str, threads: int, opt_level: str, kv_shape: tuple[int, int],
                   prompt: list[int], follow: list[int], int8_option: str | None = None) -> dict[str, Any]:
    """The whole cut-timing breakdown; meant to run in a fresh (spawned) process.
    `int8_option`: session.x64quantprecision as the measured session set it (int8.py)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.capi import _pybind_state

    from moerun.backends.onnxgraph.builder import node_category
    from moerun.toolkit import cut_points, cut_timing

    from .binding import OPT_LEVELS, bind_step
    from .int8 import SESSION_OPTION as INT8_SESSION_OPTION

    _pybind_state.set_global_thread_pool_sizes(threads, 1)  # before the first session

    def session(model: Any) -> Any:
        so = ort.SessionOptions()
        so.use_per_session_threads = False
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
        so.log_severity_level = 3
        if int8_option is not None:
            so.add_session_config_entry(INT8_SESSION_OPTION, int8_option)
        return ort.InferenceSession(model, sess_options=so, providers=[provider])

    model = onnx.load(path)
    names = [n.name for n in model.graph.node]
    points, labels = cut_points([node_category(n) for n in names])
    types = elem_types(model)
    reference = session(path)
    sessions, kept, dropped = [], [], 0
    for j, label in zip(points, labels):
        try:
            sessions.append(session(prefix_model(model, j, types).SerializeToString()))
            kept.append(label)
        except Exception:  # noqa: BLE001 - a cut tensor's type inference missed: its stretch joins the next
            dropped += 1
    del model
    out_names = [[o.name for o in s.get_outputs()] for s in sessions]
    ref_outs = [o.name for o in reference.get_outputs()]
    past_names = [i.name for i in reference.get_inputs() if i.name.startswith("past_")]
    empty = np.zeros((1, kv_shape[0], 0, kv_shape[1]), np.float32)
    empty_past = {n: ort.OrtValue.ortvalue_from_numpy(empty) for n in past_names}

    def run(sess: Any, outs: list[str], ids: Sequence[int], logits_from: int, past: dict[str, Any]) -> dict[str, Any]:
        io = bind_step(sess, ids, logits_from, past, outs, "cpu")
        sess.run_with_iobinding(io)
        values = io.get_outputs()
        values[0].numpy()  # the timed session reads its logits too
        return dict(zip(outs, values))

    # the KV cache at every decoded position, from the reference session
    follow = list(follow) or [prompt[-1]]
    got = run(reference, ref_outs, prompt, len(prompt) - 1, empty_past)
    states = []
    for tok in follow:
        past = {n: got[n.replace("past_", "present_")] for n in past_names}
        states.append((tok, past))
        got = run(reference, ref_outs, [tok], 0, past)

    def target(k: int | None) -> tuple[Any, list[str]]:
        return (reference, ref_outs) if k is None else (sessions[k], out_names[k])

    def prefill_step(k: int | None) -> float:
        sess, outs = target(k)
        run(sess, outs, prompt, len(prompt) - 1, empty_past)  # untimed: this session's last run, as when timed
        t0 = time.perf_counter()
        run(sess, outs, prompt, len(prompt) - 1, empty_past)
        return time.perf_counter() - t0

    def decode_step(k: int | None) -> float:
        sess, outs = target(k)
        run(sess, outs, [states[0][0]], 0, states[0][1])  # untimed, as above
        t0 = time.perf_counter()
        for tok, past in states:
            run(sess, outs, [tok], 0, past)
        return (time.perf_counter() - t0) / len(states)

    for k in [None, *range(len(sessions))]:  # first-run allocations
        prefill_step(k)
        decode_step(k)
    prefill, p_info = cut_timing(prefill_step, kept, plain=lambda: prefill_step(None))
    decode, d_info = cut_timing(decode_step, kept, plain=lambda: decode_step(None))
    for info in (p_info, d_info):
        info.update(nodes=len(names), dropped_cuts=dropped, thread_pool="process-wide")
    return {"prefill": prefill, "prefill_wall_s": p_info["armed_step_s"], "prefill_plain_s": p_info["plain_step_s"],
            "decode": decode, "decode_wall_s": d_info["armed_step_s"], "decode_plain_s": d_info["plain_step_s"],
            "detail": {"prefill": p_info, "decode": d_info}}
