"""Cut timing for llama.cpp (`LlamaCppSession.breakdown`): node names to categories, and a
scheduler eval callback that lets the graph run unobserved up
to node k, observes node k, and ends the graph there (returning false from an observation
stops ``ggml_backend_sched_compute_splits``).

The callback is asked about every node of every step, so it has to cost nothing: it is a
dozen lines of C, compiled once with the system C compiler into moerun's cache. Where no
compiler is found the same logic runs as a ctypes (Python) callback, which costs about
0.2 us per node; the breakdown then says so in its instrument line."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any, Sequence

from moerun.toolkit import BackendRuntimeError, Cache, ConfigError, compile_library, cut_points, cut_timing


SOURCE = r"""
#include <stdbool.h>
static long n_asked, cut_at = -1;
void moerun_cut_arm(long cut) { n_asked = 0; cut_at = cut; }
long moerun_cut_asked(void) { return n_asked; }
bool moerun_cut_eval(void *tensor, bool ask, void *user_data) {
    (void)tensor; (void)user_data;
    if (ask) return n_asked++ == cut_at;  /* observe only the cut node */
    return false;                         /* observed it: end the graph here */
}
"""


class CutCallback:
    """arm(k) before a step: the step's graph stops after node k (k < 0: runs whole).
    asked(): nodes the scheduler asked about in the last step (k + 1 when the cut held)."""

    def __init__(self, callback_type: Any, cache_root: Path) -> None:
        self.native = False
        lib = self._compile(cache_root)
        if lib is not None:
            lib.moerun_cut_arm.argtypes = [ctypes.c_long]
            lib.moerun_cut_asked.restype = ctypes.c_long
            self._lib = lib
            self.arm, self.asked = lib.moerun_cut_arm, lib.moerun_cut_asked
            self.callback = ctypes.cast(lib.moerun_cut_eval, callback_type)
            self.native = True
            return
        state = {"n": 0, "cut": -1}

        def arm(cut: int) -> None:
            state["n"], state["cut"] = 0, cut

        @callback_type
        def observe(_tensor: Any, ask: bool, _user: Any) -> bool:
            if ask:
                n = state["n"]
                state["n"] = n + 1
                return n == state["cut"]
            return False

        self.arm, self.asked, self.callback = arm, lambda: state["n"], observe

    @staticmethod
    def _compile(cache_root: Path) -> Any | None:
        return compile_library(SOURCE, "moerun_cut", cache_root)


_ROUTER_NODES = {"ffn_moe_logits", "ffn_moe_probs", "ffn_moe_probs_biased", "ffn_moe_argsort", "ffn_moe_topk",
                 "ffn_moe_weights", "ffn_moe_weights_sum", "ffn_moe_weights_norm", "ffn_moe_weights_scaled",
                 "ffn_moe_weights_softmax", "ffn_moe_group_topk", "ffn_moe_logits_biased",
                 "ffn_moe_weights_sum_clamped"}
_DENSE_FFN_NODES = {"ffn_gate", "ffn_up", "ffn_down", "ffn_swiglu", "ffn_silu", "ffn_gate_par", "ffn_act"}


def categorize_node(name: str, moe: bool = True) -> str:
    """A llama.cpp graph node name (``ffn_moe_topk-3``, ``Qcur-0 (reshaped)``) -> category.

    ``ffn_out`` is the FFN's last node renamed by the model builder: the down projection of
    a dense FFN, the experts' weighted sum (plus the shared expert) of an MoE one."""
    base = name.split(" (", 1)[0]
    base = base.rsplit("-", 1)[0] if base.rsplit("-", 1)[-1].isdigit() else base
    if base == "ffn_out":
        return "experts" if moe else "dense_ffn"
    if base in _ROUTER_NODES:
        return "router"
    if base.startswith("ffn_moe"):
        return "experts"
    if base.startswith("ffn_shexp"):
        return "shared_expert"
    if base in _DENSE_FFN_NODES:
        return "dense_ffn"
    if base in ("attn_norm", "ffn_norm", "result_norm", "norm", "attn_post_norm", "ffn_post_norm"):
        return "norm"
    if base in ("inp_embd", "inp_scaled", "embd"):
        return "embedding"
    if base == "result_output":
        return "head"
    if base.startswith(("Qcur", "Kcur", "Vcur", "kq", "kqv", "attn_", "cache_", "k_cache", "v_cache", "fattn",
                        "__fattn__", "q", "k", "v")) and base not in ("ffn_inp",):
        return "attention"
    return "other"


def categorize_nodes(names: Sequence[str], moe: bool = True) -> list[str]:
    """Categories of one graph's nodes in order. An unnamed node (``node_21``: llama.cpp
    leaves the attention kernel itself unnamed) takes its neighbours' category when the
    nodes either side of it agree, else ``other``; a view (``ffn_norm-0 (reshaped)``, the
    experts' input) takes the category of the next named node, which reads it."""
    cats = [categorize_node(n, moe) for n in names]
    # unnamed nodes and views cost next to nothing: they join their neighbours rather than
    # split a stretch into two cut points
    named = [not (n.startswith("node_") or n.endswith(_VIEW_SUFFIXES)) for n in names]
    for j, name in enumerate(names):
        if named[j]:
            continue
        before = next((cats[i] for i in range(j - 1, -1, -1) if named[i]), None)
        after = next((cats[i] for i in range(j + 1, len(names)) if named[i]), None)
        if names[j].endswith(_VIEW_SUFFIXES):
            cats[j] = after or cats[j]  # a view belongs to what reads it
        elif before is not None and before == after:
            cats[j] = before
        else:
            cats[j] = "other"
    return cats


_VIEW_SUFFIXES = (" (view)", " (reshaped)", " (permuted)", " (transposed)")
_GGML_BASE = None


def ggml_base() -> Any:
    """The ggml-base library llama-cpp-python ships (node names, op names and tensor reads for
    the eval callbacks of cut timing, routing observation and op counting), loaded once."""
    global _GGML_BASE
    if _GGML_BASE is None:
        import llama_cpp

        libdir = Path(llama_cpp.__file__).parent / "lib"
        lib = ctypes.CDLL(str(next(libdir.glob("libggml-base.*"))))
        lib.ggml_get_name.restype = ctypes.c_char_p
        lib.ggml_get_name.argtypes = [ctypes.c_void_p]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.restype = None
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        _GGML_BASE = lib
    return _GGML_BASE


# ops ggml-cpu skips (ggml_op_is_empty): shape-only nodes, no kernel runs for them
_EMPTY_OPS = frozenset({"NONE", "RESHAPE", "VIEW", "PERMUTE", "TRANSPOSE"})
_OP = 80 // 4  # struct ggml_tensor (ggml.h): enum ggml_op after type, buffer, ne[4] and nb[4], at byte 80


def count_ops(session: Any, prompt: Sequence[int]) -> dict[str, Any]:
    """`LlamaCppSession.decode_ops`: every node of one decode step's graph, asked once by the
    scheduler's eval callback (which answers "no": no split, nothing observed), by ggml op."""
    lib, ggml = session.lib, ggml_base()
    counting, ops, errors = [False], {}, []

    @lib.ggml_backend_sched_eval_callback
    def callback(tensor: Any, ask: bool, _user: Any) -> bool:
        if ask and counting[0]:
            try:
                op = ggml.ggml_op_name(ctypes.cast(tensor, ctypes.POINTER(ctypes.c_int32))[_OP]).decode()
                ops[op] = ops.get(op, 0) + 1
            except Exception as exc:  # never raise through C
                errors.append(f"{type(exc).__name__}: {exc}")
        return not ask

    with session.observed(callback):
        session.reset()
        session.prefill(list(prompt))
        counting[0] = True
        session.decode(prompt[-1])
        counting[0] = False
    if errors or not ops:
        raise BackendRuntimeError(f"llama.cpp op count: {errors[0] if errors else 'no node was asked'}")
    return {"ops": sum(n for op, n in ops.items() if op not in _EMPTY_OPS), "nodes": sum(ops.values()),
            "by_op": dict(sorted(ops.items())),
            "unit": "ggml graph nodes that run a kernel (views, reshapes and permutes left out), one decode step"}


def cut_time(session: Any, prompt: Sequence[int], follow: Sequence[int]) -> dict[str, Any]:
    """`LlamaCppSession.breakdown`: cut timing through the scheduler's eval callback on a
    second context over the session's weights (the method's docstring says how)."""
    lib = session.lib
    get_name = ggml_base().ggml_get_name
    moe = session.spec.is_moe
    cut = CutCallback(lib.ggml_backend_sched_eval_callback, Cache().root)
    names: list[str] = []

    @lib.ggml_backend_sched_eval_callback
    def record(tensor: Any, ask: bool, _user: Any) -> bool:
        if ask:
            names.append(get_name(tensor).decode(errors="replace"))
        return False

    def graph_nodes(run: Any) -> list[str]:
        """Node names of one step, from a context whose callback records them."""
        names.clear()
        with session.observed(record):
            run()
        return list(names)

    if len(prompt) > session.n_batch:
        raise ConfigError(f"breakdown: the prompt ({len(prompt)} tokens) must fit one batch (n_batch {session.n_batch})")
    follow = list(follow) or [prompt[-1]]

    def decode_steps() -> None:
        session.prefill(prompt)
        for tok in follow:
            session.decode(tok)

    prefill_nodes = graph_nodes(lambda: session.prefill(prompt))
    decode_nodes = graph_nodes(decode_steps)[len(prefill_nodes):]
    if not prefill_nodes or len(decode_nodes) % len(follow):
        raise BackendRuntimeError("llama.cpp's graph changed between decode steps; cannot cut-time it")
    decode_nodes = decode_nodes[: len(decode_nodes) // len(follow)]

    cut_ctx = session._context(cut.callback)
    main_ctx = session.ctx
    pos = {main_ctx: 0, cut_ctx: 0}  # each context's own KV position

    def use(ctx: Any) -> Any:
        pos[session.ctx] = session.pos
        session.ctx, session.pos = ctx, pos[ctx]
        return lib.llama_get_memory(ctx)

    def checked(node: int | None) -> None:
        if node is not None and cut.asked() != node + 1:
            raise BackendRuntimeError(
                f"llama.cpp kept computing after the cut at node {node} ({cut.asked()} nodes asked): "
                "the graph has several scheduler splits; cut timing needs one")

    def prefill_step(k: int | None, ctx: Any = cut_ctx) -> float:
        node = None if k is None else prefill_points[k]
        use(ctx)
        session.reset()
        cut.arm(-1)
        session.decode(prompt[0])  # as in the timed runs: the last graph was a decode step's
        session.reset()
        cut.arm(-1 if node is None else node)
        t0 = time.perf_counter()
        session.prefill(prompt)
        dt = time.perf_counter() - t0
        checked(node)
        return dt

    def decode_step(k: int | None, ctx: Any = cut_ctx) -> float:
        node = None if k is None else decode_points[k]
        mem = use(ctx)
        start = session.pos
        cut.arm(-1)
        session.prefill(prompt[:2])  # as in the timed runs: the last graph was a prefill's
        lib.llama_memory_seq_rm(mem, 0, start, -1)
        session.pos = start
        t0 = time.perf_counter()
        for tok in follow:
            cut.arm(-1 if node is None else node)
            session.decode(tok)
        dt = (time.perf_counter() - t0) / len(follow)
        checked(node)
        lib.llama_memory_seq_rm(mem, 0, start, -1)
        session.pos = start
        return dt

    try:
        prefill_points, prefill_labels = cut_points(categorize_nodes(prefill_nodes, moe))
        decode_points, decode_labels = cut_points(categorize_nodes(decode_nodes, moe))
        for ctx in (main_ctx, cut_ctx):
            use(ctx)
            session.reset()
            cut.arm(-1)
            session.prefill(prompt[:2])  # untimed: first-run allocations
        prefill, p_info = cut_timing(prefill_step, prefill_labels,
                                     plain=lambda: prefill_step(None, main_ctx))
        for ctx in (main_ctx, cut_ctx):
            use(ctx)
            session.reset()
            cut.arm(-1)
            session.prefill(prompt)
            decode_step(None, ctx)  # untimed warm-up
        decode, d_info = cut_timing(decode_step, decode_labels, plain=lambda: decode_step(None, main_ctx))
    finally:
        session.ctx = main_ctx
        lib.llama_free(cut_ctx)
        session.reset()
    how = "a C callback" if cut.native else "a Python callback (no C compiler found: ~0.2 us per node)"
    return {"instrument": f"llama.cpp scheduler eval callback, cut timing ({how})",
            "prefill": prefill, "prefill_wall_s": p_info["armed_step_s"],
            "prefill_plain_s": p_info["plain_step_s"],
            "decode": decode, "decode_wall_s": d_info["armed_step_s"], "decode_plain_s": d_info["plain_step_s"],
            "detail": {"prefill": {**p_info, "nodes": len(prefill_nodes)},
                       "decode": {**d_info, "nodes": len(decode_nodes)}}}
