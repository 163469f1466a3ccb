"""Cut timing for llama.cpp: a scheduler eval callback that lets the graph run unobserved up
to node k, observes node k, and ends the graph there (returning false from an observation
stops ``ggml_backend_sched_compute_splits``).

The callback is asked about every node of every step, so it has to cost nothing: it is a
dozen lines of C, compiled once with the system C compiler into moerun's cache. Where no
compiler is found the same logic runs as a ctypes (Python) callback, which costs about
0.2 us per node; the breakdown then says so in its instrument line."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from moerun.toolkit import compile_library

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
