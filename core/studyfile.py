"""Study definitions: a grid over models (with their dense twins and named dense
baselines), backends, precisions, prompt and generation lengths and threads, from a TOML
file or a built-in preset. Unknown keys are errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

from . import defaults
from .convert import structure
from .errors import ConfigError


@attrs.frozen(kw_only=True)
class StudySpec:
    """What to measure, however it was asked for: a study file, a preset or the flags of
    `moerun` (which build one of these too). `moerun.grid` turns it into points; its
    defaults are `moerun.defaults`'."""

    name: str = "study"
    description: str = ""
    models: list[str] = attrs.field(factory=lambda: [defaults.MODEL])
    dense: list[str] = attrs.field(factory=list)  # named dense baselines compared with every MoE model
    twins: bool = True
    isomem: bool | None = None  # the iso-memory dense twin (same weight bytes, harder precision); None: as twins
    backends: list[str] = attrs.field(factory=list)  # empty: every available backend
    precisions: list[str] = attrs.field(factory=list)  # empty: each backend's default
    # per backend, replacing `precisions` for it: { llamacpp = ["q4_k_m"], torch = ["bf16"] }
    backend_precisions: dict[str, list[str]] = attrs.field(factory=dict)
    prompt_tokens: list[int] = attrs.field(factory=lambda: [defaults.PROMPT_TOKENS])
    new_tokens: list[int] = attrs.field(factory=lambda: [defaults.NEW_TOKENS])
    threads: list[int] = attrs.field(factory=list)  # empty: the engine's choice
    batch_sizes: list[int] = attrs.field(factory=lambda: [defaults.BATCH_SIZE])  # sequences decoded together
    repetitions: int = defaults.REPETITIONS
    warmup: int = defaults.WARMUP
    seed: int = defaults.SEED
    checkpoint_dtype: str = defaults.CHECKPOINT_DTYPE
    router_skew: float = defaults.ROUTER_SKEW
    # routings to measure under (moerun.routing): a grid dimension; a study file may give one string
    routing: list[str] = attrs.field(factory=lambda: [defaults.ROUTING])
    # memory caps to measure under (moerun.memcap: "3GB", a device profile; None: uncapped): a
    # grid dimension; a study file may give one value
    memory_caps: list[Any] = attrs.field(factory=lambda: [None])
    fit_twin: bool | None = None  # under a cap, the iso-cap dense twin; None: as twins
    # the ablation ladder (docs/concepts.md): each MoE's active twin, split twin and fixed-route
    # MoE, with the operations a decode step executes counted on every rung
    ladder: bool = False
    device: str | None = None  # None: cpu where the backend runs there, else its first device
    compile: bool = False
    timeout_s: float = defaults.TIMEOUT_S
    memory_limit_mb: int | None = None  # address-space limit of each isolated point
    fit: str | None = None  # a `moerun predict` profile: points that cannot fit it are unsupported
    breakdown: bool = False
    parity: bool = False
    options: dict[str, Any] = attrs.field(factory=dict)
    hardware: list[str] = attrs.field(factory=list)  # fleet labels to run the grid on (--executor ray)
    # the measurement protocol (moerun.protocol; the command line overrides these)
    min_rounds: int = defaults.MIN_ROUNDS
    max_rounds: int = defaults.MAX_ROUNDS
    target: float = defaults.TARGET  # relative 95 % half-width of every verdict; 0: min_rounds only
    budget_s: float | None = defaults.STUDY_BUDGET_S  # seconds the rounds after the first may take
    lockstep: bool = defaults.LOCKSTEP  # the sides of a comparison loaded together, timed in alternating cycles
    unit_s: float = defaults.UNIT_S  # seconds one timed lockstep unit aims at

    def protocol_fields(self) -> dict[str, Any]:
        """The protocol this study asks for (moerun.protocol.Protocol's fields)."""
        return {k: getattr(self, k) for k in ("min_rounds", "max_rounds", "target", "budget_s", "lockstep", "unit_s")}


PRESETS: dict[str, dict[str, Any]] = {
    "paper-olmoe": dict(
        name="paper-olmoe",
        description="arXiv 2606.21428's comparison with synthetic weights of the real shapes: OLMoE-1B-7B "
                    "against Llama-3.2-1B, Qwen2.5-1.5B and a Gemma-2-2B-shaped dense model at Q4_K_M on "
                    "llama.cpp (about 25 GB of disk and tens of minutes here)",
        models=["olmoe-1b-7b"], dense=["llama-3.2-1b", "qwen2.5-1.5b", "gemma-2-2b-shape"], twins=False,
        backends=["llamacpp"], precisions=["q4_k_m"], prompt_tokens=[64], new_tokens=[32], repetitions=3,
        checkpoint_dtype="bfloat16", options={"mmap": False}),
    "paper-olmoe-all-backends": dict(
        name="paper-olmoe-all-backends",
        description="the published shapes on every CPU engine at the precisions that fit a laptop: llama.cpp "
                    "q4_k_m, ONNX Runtime int4 and int8 (both formulations), torch bf16; OLMoE-1B-7B against "
                    "the three dense baselines (about 60 GB of disk while preparing, an hour here)",
        models=["olmoe-1b-7b"], dense=["llama-3.2-1b", "qwen2.5-1.5b", "gemma-2-2b-shape"], twins=False,
        backends=["llamacpp", "onnxruntime", "onnxruntime-contrib", "torch"],
        backend_precisions={"llamacpp": ["q4_k_m"], "onnxruntime": ["int4", "int8"],
                            "onnxruntime-contrib": ["int4", "int8"], "torch": ["bf16"]},
        prompt_tokens=[32], new_tokens=[16], repetitions=2, checkpoint_dtype="bfloat16", parity=True,
        options={}, min_rounds=1, max_rounds=2, timeout_s=3600.0),
    "paper-olmoe-batch": dict(
        name="paper-olmoe-batch",
        description="OLMoE-1B-7B against Llama-3.2-1B and its iso-memory dense twin (8.7 B at Q3_K_M, the bytes "
                    "of OLMoE at Q4_K_M) on llama.cpp, one and eight sequences (about 45 GB of disk while preparing)",
        models=["olmoe-1b-7b"], dense=["llama-3.2-1b"], twins=False, isomem=True, batch_sizes=[1, 8],
        backends=["llamacpp"], precisions=["q4_k_m"], prompt_tokens=[32], new_tokens=[16], repetitions=2,
        checkpoint_dtype="bfloat16", options={"mmap": False}, min_rounds=2, max_rounds=3, budget_s=600.0),
    "routing": dict(
        name="routing",
        description="small-moe with its twins on every available backend at batch 8 under uniform, zipf:1.0 and "
                    "sticky:0.8 routing: the verdict as the routing moves (minutes)",
        models=["small-moe"], twins=True, isomem=False, batch_sizes=[8], routing=["uniform", "zipf:1.0", "sticky:0.8"]),
    "paper-olmoe-routing": dict(
        name="paper-olmoe-routing",
        description="OLMoE-1B-7B with its active and total twins at Q4_K_M on llama.cpp, batch 1 and 8, under "
                    "uniform, zipf:1.0 and sticky:0.8 routing (one planted checkpoint per routing: about 80 GB of "
                    "disk while preparing)",
        models=["olmoe-1b-7b"], twins=True, isomem=False, batch_sizes=[1, 8], backends=["llamacpp"],
        precisions=["q4_k_m"], prompt_tokens=[32], new_tokens=[16], repetitions=2, checkpoint_dtype="bfloat16",
        options={"mmap": False}, routing=["uniform", "zipf:1.0", "sticky:0.8"], min_rounds=2, max_rounds=3,
        budget_s=600.0),
    "paper-olmoe-capped": dict(
        name="paper-olmoe-capped",
        description="the published study's escape clause, measured: OLMoE-1B-7B at Q4_K_M on llama.cpp uncapped and "
                    "under 3 GB and 2 GB memory caps (its file is 4.2 GB), against Llama-3.2-1B, its total twin and "
                    "the largest dense model that fits each cap (Llama-3.2-1B, 1.24 B, stands in for the 1.28 B active "
                    "twin); weights mapped with llama.cpp's own access advice (about 70 GB of disk while preparing)",
        models=["olmoe-1b-7b", "olmoe-1b-7b:dense-total"], dense=["llama-3.2-1b"], twins=False, isomem=False,
        fit_twin=True, backends=["llamacpp"], precisions=["q4_k_m"], memory_caps=["none", "3GB", "2GB"], prompt_tokens=[32], new_tokens=[8],
        repetitions=1, checkpoint_dtype="bfloat16", options={"mmap": True}, min_rounds=1,
        max_rounds=2, budget_s=900.0, timeout_s=3600.0),
    "capped": dict(
        name="capped",
        description="small-moe with its twins on llama.cpp at f16, uncapped and under 200 MB and 150 MB memory caps "
                    "(its file is 177 MB): paging from storage and the iso-cap dense twin (minutes)",
        models=["small-moe"], twins=True, isomem=False, backends=["llamacpp"], memory_caps=["none", "200MB", "150MB"],
        options={"advice": "random"}, new_tokens=[16]),
    "ladder": dict(
        name="ladder",
        description="why the MoE is behind: small-moe's ablation ladder (active twin, split twin, fixed-route MoE, "
                    "MoE) on every available backend, with the MoE's breakdown beside it ('moerun explain')",
        models=["small-moe"], twins=False, isomem=False, ladder=True, breakdown=True, min_rounds=3),
    "scaled": dict(
        name="scaled",
        description="a minutes-long version: small-moe with its twins on every available backend, two prompt lengths",
        models=["small-moe"], twins=True, prompt_tokens=[32, 128], new_tokens=[32], repetitions=5),
}


def load_study(path: Path | None = None, preset: str | None = None) -> StudySpec:
    if (path is None) == (preset is None):
        raise ConfigError("give a study file or --preset (not both)")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown study preset {preset!r}; known: {', '.join(PRESETS)}")
        return structure(PRESETS[preset], StudySpec, where=f"preset {preset}")
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read study file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    if set(data) != {"study"}:
        raise ConfigError(f"{path}: expected a single [study] table, found {', '.join(sorted(data)) or 'nothing'}")
    table = data["study"]
    if "memory_caps" in table and not isinstance(table["memory_caps"], list):
        table["memory_caps"] = [table["memory_caps"]]
    if isinstance(table.get("routing"), str):
        table["routing"] = [table["routing"]]
    if isinstance(table.get("routing"), list):  # a trace's path is relative to the study file
        table["routing"] = [_relative_trace(r, Path(path).parent) for r in table["routing"]]
    return structure(table, StudySpec, where=f"{path}: [study]")


def _relative_trace(text: Any, folder: Path) -> Any:
    if isinstance(text, str) and text.startswith("trace:") and not Path(text[6:]).is_absolute():
        return f"trace:{folder / text[6:]}"
    return text
