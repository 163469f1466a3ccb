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
when ONNX Runtime runs under ``qemu-x86_64 -cpu Haswell`` (docs/backends.md). The remedy
ONNX Runtime ships is the session option ``session.x64quantprecision=1``: a graph
transformer rewrites s8 weights to u8 (+128, zero point 128) and MLAS runs its u8 x u8
kernel, which widens to 16 bits before multiplying and never saturates. Its integer results
equal the VNNI kernel's exactly, so an int8 verdict computes the same numbers on every x86.
It is not free where VNNI exists (the transformer fires there too, and the u8 x u8 kernel
gave up ~15 % of dense prefill and 3-5 % of decode on an AVX512-VNNI EPYC), so moerun turns
it on only for CPUs without AVX512-VNNI. AVX-VNNI alone (some laptop CPUs) is treated as
no VNNI: a slower exact kernel rather than a trusted guess.

`int8_kernel()` makes the choice and says why; `saturating_u8s8` is the pre-VNNI kernel in
numpy, so a test on any machine can show what that kernel would compute.
"""

from __future__ import annotations

import platform
from typing import Any, Mapping

import numpy as np

KERNELS = ("auto", "u8s8", "u8u8")
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


def int8_kernel(choice: str = "auto", features: Mapping[str, bool] | None = None,
                machine: str | None = None) -> dict[str, Any]:
    """The int8 GEMM path for a session: ``kernel`` (u8s8 or u8u8), ``exact`` (whether the
    integer products can be clipped), ``session_option`` (the value of
    session.x64quantprecision to set, None to leave it) and ``why``. `choice` forces a
    kernel (the -O int8_kernel option); `features` and `machine` default to this CPU's."""
    if choice not in KERNELS:
        from moerun import ConfigError

        raise ConfigError(f"onnxruntime: int8_kernel must be one of {', '.join(KERNELS)}, got {choice!r}")
    if not _x86(machine):
        return {"kernel": "u8s8", "exact": True, "session_option": None,
                "why": f"{machine or platform.machine()}: ONNX Runtime's int8 kernels here have no 16-bit saturating step"}
    features = cpu_features() if features is None else features
    vnni = bool(features.get("AVX512VNNI"))
    if choice == "u8u8" or (choice == "auto" and not vnni):
        why = ("forced (-O int8_kernel=u8u8)" if choice == "u8u8" else
               "no AVX512-VNNI: MLAS's u8 x s8 kernel (vpmaddubsw) saturates 16-bit pair sums; "
               "u8 x u8 is exact (session.x64quantprecision=1)")
        return {"kernel": "u8u8", "exact": True, "session_option": "1", "why": why}
    if vnni:
        why = "forced (-O int8_kernel=u8s8)" if choice == "u8s8" else "AVX512-VNNI: vpdpbusd sums u8 x s8 in 32 bits"
        return {"kernel": "u8s8", "exact": True, "session_option": "0", "why": why}
    return {"kernel": "u8s8", "exact": False, "session_option": "0",
            "why": "forced (-O int8_kernel=u8s8) without AVX512-VNNI: 16-bit pair sums saturate (vpmaddubsw)"}


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
