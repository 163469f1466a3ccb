"""The experts llama.cpp chose (`LlamaCppSession.observe_routing`): a second context over the
session's weights whose scheduler eval callback observes every ``ffn_moe_topk-<layer>`` node
(``build_moe_ffn``'s selected experts, int32 [k, tokens]) and copies it out with
``ggml_backend_tensor_get`` (on any device). Untimed: the callback splits the graph at each
observed node, which the timed contexts never do."""

from __future__ import annotations

import ctypes
from typing import Any, Sequence

import numpy as np

from moerun.toolkit import BackendRuntimeError

from .cut import ggml_base


# struct ggml_tensor (ggml.h): enum type (4 bytes, padded to 8), buffer pointer, int64 ne[4],
# size_t nb[4]: the shape at byte 16, the strides at byte 48
_NE, _NB = 16 // 8, 48 // 8


def observe(session: Any, prompt: Sequence[int], follow: Sequence[int]) -> np.ndarray:
    lib, ggml = session.lib, ggml_base()
    get_name = ggml.ggml_get_name
    layers: dict[int, list[np.ndarray]] = {}
    errors: list[str] = []

    @lib.ggml_backend_sched_eval_callback
    def callback(tensor: Any, ask: bool, _user: Any) -> bool:
        name = get_name(tensor).decode(errors="replace")
        if not name.startswith("ffn_moe_topk-"):
            return False if ask else True
        if ask:
            return True
        try:
            words = ctypes.cast(tensor, ctypes.POINTER(ctypes.c_int64))
            k, n = words[_NE], words[_NE + 1]
            nb0, nb1 = words[_NB], words[_NB + 1]
            raw = np.empty(ggml.ggml_nbytes(tensor), dtype=np.uint8)
            ggml.ggml_backend_tensor_get(tensor, raw.ctypes.data, 0, raw.nbytes)
            ids = np.ndarray((n, k), dtype=np.int32, buffer=raw, strides=(nb1, nb0)).astype(np.int64)
            layers.setdefault(int(name.split("-")[1]), []).append(ids)
        except Exception as exc:  # never raise through C
            errors.append(f"{type(exc).__name__}: {exc}")
        return True

    with session.observed(callback):
        session.reset()
        # every position's logits: else the last layer runs its FFN for the last token only
        session.prefill(list(prompt), all_logits=True)
        for tok in follow:
            session.decode(tok)
    if errors:
        raise BackendRuntimeError(f"llama.cpp routing observation: {errors[0]}")
    if not layers:
        raise BackendRuntimeError("llama.cpp ran no ffn_moe_topk node: no routing to observe")
    return np.stack([np.concatenate(layers[i]) for i in sorted(layers)], axis=1)
