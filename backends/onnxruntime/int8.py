"""Which int8 GEMM ONNX Runtime's CPU provider runs here, and how moerun keeps it exact.

The int8 graphs multiply u8 activations (DynamicQuantizeLinear: the step's min..max mapped
onto 0..255) by s8 per-channel weights (MatMulInteger, fused into DynamicQuantizeMatMul).
ONNX Runtime's x86 kernels (MLAS) compute that product in one of two ways:

- with AVX512-VNNI, ``vpdpbusd`` adds four u8 x s8 products straight into 32 bits: exact;
- without it (AVX2, and AVX-512 without VNNI), ``vpmaddubsw`` adds each *pair* of adjacent
  u8 x s8 products into a signed 16-bit lane that saturates at +-32767; 255 x 127 x 2 =
  64770 does not fit, so large activations meeting large weights of the same sign are
  clipped before the 32-bit sum.

On an AVX2 EPYC that clipping took tiny-dense int8 from 96 % top-1 agreement with the fp32
reference (max |diff| 0.33) to 79 % (3.02); the same figures appear on this AVX-512 machine
when ONNX Runtime runs under ``qemu-x86_64 -cpu Haswell`` (docs/backends.md). MLAS's u8 x u8
kernel widens to 16 bits before multiplying and never saturates, and with u8 weights (the
s8 codes + 128, zero point 128) it computes exactly the integers the VNNI kernel does, so
an int8 verdict computes the same numbers on every x86. ONNX Runtime's own remedy, the
session option ``session.x64quantprecision=1`` (a rewrite of s8 weights to u8), reaches only
the main graph: the grouped formulation's experts inside If branches kept saturating under
emulation (tiny-moe grouped max |diff| 2.12 against 0.19). So the ONNX builder writes u8
weights itself where the CPU needs them. They are not free where VNNI exists (on an
AVX512-VNNI EPYC the u8 x u8 kernel gave up ~15 % of dense prefill and 3-5 % of decode), so
moerun builds them only for CPUs without AVX512-VNNI; the artifact cache keeps the two
formats apart. AVX-VNNI alone (some laptop CPUs) is treated as no VNNI: a slower exact
kernel rather than a trusted guess.

`weights_for_cpu()` picks the weight format the ONNX builder writes; `int8_kernel()` says
what a session runs and why; `saturating_u8s8` is the pre-VNNI kernel in numpy, so a test on
any machine can show what that kernel would compute.
"""

from __future__ import annotations

import platform
from typing import Any, Mapping

import numpy as np

SESSION_OPTION = "session.x64quantprecision"


def cpu_features() -> dict[str, bool]:
    """The CPU's features as its CPUID reports them (numpy reads CPUID, as MLAS does, so the
    answer holds under an emulator too, where /proc/cpuinfo shows the host)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__  # type: ignore[no-redef]
    return dict(__cpu_features__)


def _x86(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def saturates(features: Mapping[str, bool] | None = None, machine: str | None = None) -> bool:
    """Whether ONNX Runtime's u8 x s8 kernel on this CPU sums pairs in saturating 16-bit
    lanes: x86 without AVX512-VNNI (AVX-VNNI alone counts as without: a slower exact
    kernel rather than a guess)."""
    if not _x86(machine):
        return False
    features = cpu_features() if features is None else features
    return not features.get("AVX512VNNI")


def weights_for_cpu(features: Mapping[str, bool] | None = None, machine: str | None = None) -> str:
    """The MatMulInteger weight format to build for this CPU: ``u8`` where u8 x s8
    saturates (MLAS then runs u8 x u8, exact), else ``s8``."""
    return "u8" if saturates(features, machine) else "s8"


def int8_kernel(weights: str | None, features: Mapping[str, bool] | None = None,
                machine: str | None = None) -> dict[str, Any]:
    """The int8 GEMM path a session runs, for a graph whose MatMulInteger weights are
    `weights` (``u8``, ``s8``, or None for a graph moerun did not build): ``kernel``,
    ``exact`` (True, False, or None for unknown), ``session_option`` (the value of
    session.x64quantprecision to set, None to leave it) and ``why``."""
    if weights == "u8":
        return {"kernel": "u8u8", "exact": True, "session_option": None,
                "why": "u8 weights (zero point 128): u8 x u8 widens to 16 bits before multiplying, never saturates"
                       + ("" if saturates(features, machine) else
                          "; this CPU has AVX512-VNNI, where s8 weights would run faster")}
    if not saturates(features, machine):
        why = ("AVX512-VNNI: vpdpbusd sums u8 x s8 in 32 bits" if _x86(machine) else
               f"{machine or platform.machine()}: ONNX Runtime's int8 kernels here have no 16-bit saturating step")
        return {"kernel": "u8s8", "exact": True, "session_option": None, "why": why}
    # s8 weights on a CPU whose u8 x s8 kernel saturates (a graph built elsewhere): ONNX
    # Runtime's own rewrite to u8 covers the main graph's weights, not those inside If branches
    return {"kernel": "u8u8", "exact": None, "session_option": "1",
            "why": "s8 weights without AVX512-VNNI: session.x64quantprecision rewrites the main graph's to u8; "
                   "weights inside If branches (grouped experts) would keep the saturating u8 x s8 kernel"}


def saturating_u8s8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A [M, K] uint8 @ B [K, N] int8 as MLAS's pre-VNNI x86 kernel computes it: products of
    adjacent k pairs (0-1, 2-3, ...) summed and clipped to int16 (vpmaddubsw), then the pair
    sums added in int32 (vpmaddwd by ones). An odd K is padded with a zero."""
    a = np.asarray(a, np.int32)
    b = np.asarray(b, np.int32)
    if a.shape[1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        b = np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]  # [M, K/2, N]
    return np.clip(pairs, -32768, 32767).sum(axis=1, dtype=np.int64).astype(np.int32)
