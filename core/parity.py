"""Parity: an engine's logits against the PyTorch fp32 reference on the same checkpoint
and token ids (max |difference|, top-1 agreement), the reference cached by checkpoint content."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .backend import LoadSettings
from .cache import Cache
from .checkpoint import Checkpoint
from .errors import MoerunError
from .point import Point, token_ids
from .spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from .manager import MoerunPlugins


def teacher_forced_logits(session: Any, ids: Sequence[int], n_prompt: int) -> np.ndarray:
    """Logits of every position of `ids`: a prefill of the first `n_prompt` ids with all
    logits, then one decode call per remaining id (the parity workload), [len(ids), vocab]."""
    session.reset()
    first = session.prefill(ids[:n_prompt], all_logits=True)
    rest = [session.decode(t) for t in ids[n_prompt:]]
    return np.concatenate([first, np.stack(rest)]) if rest else first



PARITY_TOKENS = (12, 4)  # prefill 12 ids with all logits, then decode 4
REFERENCE_MAX_BYTES = 4 << 30  # the fp32 reference's floor: it must fit beside the engine under test
REFERENCE_SHARE = 0.5  # at most this share of the memory available when the reference would load


def reference_budget() -> int:
    """Bytes the fp32 reference may take: half of what the machine has available right now
    (the engine under test is already loaded), never less than REFERENCE_MAX_BYTES."""
    from .environment import meminfo_bytes

    avail = meminfo_bytes("MemAvailable")
    return max(REFERENCE_MAX_BYTES, int(avail * REFERENCE_SHARE)) if avail else REFERENCE_MAX_BYTES


def parity(session: Any, spec: ModelSpec, ckpt: Checkpoint | None, plugins: "MoerunPlugins", cache: Cache,
            point: Point) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement against the PyTorch fp32 reference on the
    same checkpoint and ids; the reference logits are cached by checkpoint content."""
    if ckpt is None:
        return {"available": False, "reason": "an engine file has no checkpoint to compute the reference from"}
    budget = reference_budget()
    if spec.total_params * 4 > budget:
        return {"available": False, "reason": f"the fp32 reference of {spec.total_params / 1e9:.1f} B parameters "
                                              f"needs {spec.total_params * 4 / 2**30:.1f} GiB; "
                                              f"{budget / 2**30:.1f} GiB may be used here"}
    n_prompt, n_new = PARITY_TOKENS
    ids = token_ids(spec.vocab_size, n_prompt + n_new, point.seed + 1)
    ref_path = cache.root / "reference" / f"{ckpt.content_hash()}-{n_prompt}-{n_new}-{point.seed + 1}.npy"
    if ref_path.exists():
        ref = np.load(ref_path)
    else:
        try:
            torch_backend = plugins.backends.get("torch")()
        except MoerunError as exc:
            return {"available": False, "reason": f"no reference backend: {exc}"}
        if not torch_backend.availability().available:
            return {"available": False, "reason": "torch is not installed: no reference"}
        ref_session = torch_backend.load(torch_backend.prepare(ckpt, "fp32", cache),
                                         LoadSettings(max_context=n_prompt + n_new))
        try:
            ref = teacher_forced_logits(ref_session, ids, n_prompt)
        finally:
            ref_session.close()
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref_path.with_suffix(f".{os.getpid()}.npy")
        np.save(tmp, ref)
        os.replace(tmp, ref_path)
    got = teacher_forced_logits(session, ids, n_prompt)
    session.reset()
    out = {"available": True, "max_abs_diff": float(np.abs(got - ref).max()),
           "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean()), "positions": len(ids)}
    kernel = session.describe().get("kernel_path")  # which arithmetic ran, where the engine says
    if kernel:
        out["kernel_path"] = kernel
    return out


