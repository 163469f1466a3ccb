"""What a moerun ONNX graph's session needs step by step, shared by the backend's session
and the cut timing (moerun.backends.onnxruntime.cut): the optimisation levels an option may
name and one step's IO binding."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

OPT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
              "none": "ORT_DISABLE_ALL"}  # -O opt_level -> onnxruntime.GraphOptimizationLevel


def bind_step(sess: Any, ids: Sequence[int], logits_from: int, past: dict[str, Any], outputs: Sequence[str],
              device: str) -> Any:
    """One step's IO binding for a moerun graph: the token ids, the first position whose
    logits are wanted, the past KV as OrtValues, and `outputs` bound afresh (the cache grows
    every step, so their shapes change)."""
    io = sess.io_binding()
    rows = ids if ids and isinstance(ids[0], (list, tuple)) else [ids]  # one sequence, or B of one length
    io.bind_cpu_input("input_ids", np.asarray(rows, dtype=np.int64))
    io.bind_cpu_input("logits_from", np.asarray([logits_from], dtype=np.int64))
    for name, value in past.items():
        io.bind_ortvalue_input(name, value)
    for name in outputs:
        io.bind_output(name, device)
    return io
