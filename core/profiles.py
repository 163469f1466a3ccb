"""Device profiles: the published figures of the devices `moerun predict` predicts for and
`--fit` / `--memory-cap` name (bandwidth, compute, memory, what the OS keeps, storage), each
with its source (docs/cli.md, docs/concepts.md). Data only: moerun.predict reads them."""

from __future__ import annotations

import attrs

from .errors import ConfigError


@attrs.frozen(kw_only=True)
class Hardware:
    name: str
    description: str
    bandwidth_bytes_s: float
    peak_flops: float  # dense, at the precision class the device runs LLMs at (see source)
    memory_bytes: float
    source: str
    # what the OS and its services keep out of an LLM's reach (estimates; docs/cli.md lists them)
    os_reserve_bytes: float = 0.0
    # how fast weights that do not fit come back from storage (sequential reads: a ceiling on
    # paging, which reads readahead windows at random), and where that figure comes from
    storage_bytes_s: float | None = None
    storage_source: str = ""
    # what one operation of an engine's decode graph costs beyond its bytes (a kernel launch
    # and its tail, a barrier between dependent dispatches), in seconds: a published figure
    # for the way LLM engines drive the device, its plausible range, and where both come
    # from (moerun.predict's dispatch term; docs/concepts.md, "Why the MoE is behind")
    dispatch_s: float | None = None
    dispatch_range_s: tuple[float, float] | None = None
    dispatch_source: str = ""

    @property
    def usable_bytes(self) -> float:
        return self.memory_bytes - self.os_reserve_bytes


GB = 1e9
# CUDA, one kernel after another in a stream: a 2.9 us kernel launched back to back took 3.8 us
# per kernel, 3.4 us captured as a CUDA graph (llama.cpp captures decode steps as graphs where
# it can), 9.6 us with a synchronisation after each launch (A. Gray, "Getting Started with CUDA
# Graphs", NVIDIA Technical Blog, 2019, on a V100 with an x86 host). The Jetsons' slower Arm
# hosts launch more slowly; no published per-launch figure for them was found: the range is
# the blog's, unverified on those devices.
_CUDA_DISPATCH, _CUDA_DISPATCH_RANGE = 3.8e-6, (3.4e-6, 9.6e-6)
_CUDA_SOURCE = ("CUDA: 3.8 us per back-to-back kernel launch, 3.4 us as a CUDA graph, 9.6 us synchronised "
                "(NVIDIA Technical Blog, 'Getting Started with CUDA Graphs', 2019, V100 + x86 host; unverified "
                "on this device)")
HARDWARE: dict[str, Hardware] = {h.name: h for h in [
    Hardware(name="jetson-orin-nano-8gb", description="NVIDIA Jetson Orin Nano 8GB (the published study's edge device)",
             bandwidth_bytes_s=68 * GB, peak_flops=10e12, memory_bytes=8 * GB,
             source="NVIDIA: 68 GB/s LPDDR5, 8 GB; 40 INT8 TOPS sparse -> ~10 TFLOPS dense FP16",
             os_reserve_bytes=1.5 * GB, storage_bytes_s=104e6,
             storage_source="microSD UHS-I SDR104 bus maximum, 104 MB/s (SD Association), the developer kit's "
                            "boot medium; an NVMe SSD in its M.2 Key M slot (PCIe Gen3) reads ~30x faster",
             dispatch_s=_CUDA_DISPATCH, dispatch_range_s=_CUDA_DISPATCH_RANGE, dispatch_source=_CUDA_SOURCE),
    Hardware(name="jetson-agx-orin-64gb", description="NVIDIA Jetson AGX Orin 64GB",
             bandwidth_bytes_s=204.8 * GB, peak_flops=68e12, memory_bytes=64 * GB,
             source="NVIDIA: 204.8 GB/s LPDDR5, 64 GB; 275 INT8 TOPS sparse -> ~68 TFLOPS dense FP16",
             os_reserve_bytes=2 * GB, storage_bytes_s=400e6,
             storage_source="64 GB eMMC 5.1 (NVIDIA), HS400 bus maximum 400 MB/s (JEDEC JESD84-B51)",
             dispatch_s=_CUDA_DISPATCH, dispatch_range_s=_CUDA_DISPATCH_RANGE, dispatch_source=_CUDA_SOURCE),
    Hardware(name="apple-m2-pro-16gb", description="Apple M2 Pro, 16 GB (the published study's laptop)",
             bandwidth_bytes_s=200 * GB, peak_flops=6.8e12, memory_bytes=16 * GB,
             source="Apple: 200 GB/s unified memory; 19-core GPU ~6.8 TFLOPS FP32",
             os_reserve_bytes=4 * GB, storage_bytes_s=5.3e9,
             storage_source="internal SSD, Blackmagic Disk Speed Test: 5,293-5,372 MB/s read on M2 Pro MacBook Pros "
                            "(Tom's Guide, Macworld; MacRumors 2023-01-24)",
             dispatch_s=5.16e-6, dispatch_range_s=(2.4e-6, 5.16e-6),
             dispatch_source="M2 Pro, Metal: 832 inert dependent dispatches injected into a decode step added "
                             "4.30 ms of GPU time, 5.16 us each, and 0.61 us of host time each (ferrox issue #149, "
                             "2026-09-07, MTLCommandBuffer GPU timestamps); low end: a chain of 3,200 tiny dependent "
                             "kernels ran in 7.7 ms, 2.4 us each, on an M3 Ultra at 200 ops per command buffer "
                             "(mlx issue #4521, 2026-09-16)"),
    Hardware(name="raspberry-pi-5-8gb", description="Raspberry Pi 5, 8 GB",
             bandwidth_bytes_s=17 * GB, peak_flops=0.15e12, memory_bytes=8 * GB,
             source="LPDDR4X-4267 on a 32-bit bus ~17 GB/s; 4x Cortex-A76 @ 2.4 GHz NEON ~150 GFLOPS FP32",
             os_reserve_bytes=0.5 * GB, storage_bytes_s=104e6,
             storage_source="microSD UHS-I SDR104 bus maximum, 104 MB/s (Raspberry Pi 5 product brief: SDR104 mode)"),
    Hardware(name="rtx-4090", description="NVIDIA GeForce RTX 4090",
             bandwidth_bytes_s=1008 * GB, peak_flops=165e12, memory_bytes=24 * GB,
             source="NVIDIA: 1008 GB/s GDDR6X, 24 GB; 165 TFLOPS FP16 tensor, dense",
             os_reserve_bytes=1 * GB,
             dispatch_s=_CUDA_DISPATCH, dispatch_range_s=_CUDA_DISPATCH_RANGE, dispatch_source=_CUDA_SOURCE),
    Hardware(name="h200", description="NVIDIA H200 SXM",
             bandwidth_bytes_s=4800 * GB, peak_flops=989e12, memory_bytes=141 * GB,
             source="NVIDIA: 4.8 TB/s HBM3e, 141 GB; 989 TFLOPS BF16 dense",
             os_reserve_bytes=1 * GB,
             dispatch_s=_CUDA_DISPATCH, dispatch_range_s=_CUDA_DISPATCH_RANGE, dispatch_source=_CUDA_SOURCE),
]}


def get_hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ConfigError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")
    return HARDWARE[name]


# Decode-speed ratios measured by others, which predictions are checked against (never fitted
# to): (MoE preset, dense preset, device profile) -> (MoE / dense decode tokens/s, source)
PUBLISHED_RATIOS: dict[tuple[str, str, str], tuple[float, str]] = {
    ("olmoe-1b-7b", "llama-3.2-1b", "apple-m2-pro-16gb"): (
        0.90, "arXiv 2606.21428: OLMoE-1B-7B ~10 % behind the same-active dense Llama-3.2-1B, Q4_K_M, llama.cpp"),
    ("olmoe-1b-7b", "llama-3.2-1b", "jetson-orin-nano-8gb"): (
        0.69, "arXiv 2606.21428: OLMoE-1B-7B ~31 % behind the same-active dense Llama-3.2-1B, Q4_K_M, llama.cpp"),
}
