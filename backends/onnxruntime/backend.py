"""The ONNX Runtime backend: graphs from the shared builder (backends/onnxgraph), the KV
cache kept in ONNX Runtime's own OrtValues between steps (IO binding), two MoE
formulations: ``grouped`` standard ops (backend onnxruntime) and ONNX Runtime's contrib MoE
op (backend onnxruntime-contrib).

Precisions: fp32; int8 (every weight MatMul per-channel symmetric int8 through
DynamicQuantizeLinear + MatMulInteger, the pattern quantize_dynamic emits, written by the
builder itself so that it reaches the experts inside If branches too, as u8 codes on CPUs
whose u8 x s8 kernel saturates (int8.py); QMoE 8-bit experts in the contrib formulation); int4 (blocks of 32 through opset 21's DequantizeLinear, which
onnxruntime fuses into MatMulNBits; QMoE 4-bit experts in the contrib formulation). Routers
stay fp32 in every precision, as llama.cpp keeps them. The builder quantises and writes each
tensor as it goes, into external data for models of 1 GiB of fp32 and more: preparing
OLMoE-1B-7B holds a layer's weights, not the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moerun.toolkit import (
    Artifact,
    Availability,
    Backend,
    BackendRuntimeError,
    Cache,
    Capabilities,
    Checkpoint,
    CheckpointError,
    ConfigError,
    LoadSettings,
    Option,
    Session,
    check_step,
    UnsupportedError,
)
from moerun.toolkit import release_free

from .binding import OPT_LEVELS, bind_step
from .int8 import SESSION_OPTION as INT8_SESSION_OPTION, int8_kernel, weights_for_cpu

BUILD_VERSION = "onnx-builder-5"  # 4: a batch dimension; 5: opset 21, quantised and streamed by the builder
DISPATCH_BYTES = 64 << 10  # what one If dispatch costs, in bytes copied (~2 us at ~30 GB/s)
# moerun device -> execution provider, and why a missing one is missing
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "coreml": "CoreMLExecutionProvider"}
MISSING_PROVIDER = {
    "cuda": "on NVIDIA GPUs install the GPU package instead: pip uninstall -y onnxruntime && "
            "pip install onnxruntime-gpu (CUDA 12 and cuDNN 9 on the machine)",
    "tensorrt": "TensorrtExecutionProvider comes with onnxruntime-gpu and needs NVIDIA's TensorRT libraries "
                "on the library path",
    "coreml": "CoreMLExecutionProvider is in onnxruntime's macOS wheels only (Apple hardware)",
}


def provider_devices(available: Sequence[str]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The moerun devices the installed onnxruntime serves, and why the others are absent."""
    devices = tuple(d for d, ep in PROVIDERS.items() if ep in available)
    notes = {d: f"this onnxruntime has no {PROVIDERS[d]} (providers: {', '.join(available)}); {why}"
             for d, why in MISSING_PROVIDER.items() if d not in devices}
    return devices, notes


def node_placement(profile_path: str) -> dict[str, Any]:
    """Which execution provider ran each node, from an ONNX Runtime profile: node kernels
    per provider, and per provider the op types it ran."""
    import json

    with open(profile_path) as f:
        events = json.load(f)
    nodes: dict[str, str] = {}
    ops: dict[str, set[str]] = {}
    for e in events:
        args = e.get("args") or {}
        if e.get("cat") == "Node" and args.get("provider"):
            name = e.get("name", "").removesuffix("_kernel_time")
            nodes[name] = args["provider"]
            ops.setdefault(args["provider"], set()).add(args.get("op_name", "?"))
    counts: dict[str, int] = {}
    for provider in nodes.values():
        counts[provider] = counts.get(provider, 0) + 1
    return {"measured": True, "nodes_by_provider": counts,
            "op_types_by_provider": {k: sorted(v) for k, v in ops.items()}}


EXTERNAL_DATA_BYTES = 1 << 30  # protobuf stops at 2 GiB: larger models keep weights beside the graph


OPTIONS = {  # -O NAME=VALUE (docs/backends.md, ONNX Runtime)
    "provider": Option(help="the execution provider, overriding the one --device maps to", kinds=(str,)),
    "placement": Option(help="one profiled step at load records which provider ran each node", kinds=(bool,)),
    "profile": Option(help="ONNX Runtime's profiler on for the whole session", kinds=(bool,)),
    "opt_level": Option(help="graph optimisation level", choices=tuple(OPT_LEVELS)),
    "spinning": Option(help="intra-op threads spin between runs", kinds=(bool,)),
    "breakdown": Option(help="the --breakdown instrument: cut timing or the profiler", choices=("cut", "profile")),
}


class OnnxRuntimeBackend(Backend):
    """MoE as standard ONNX ops (what any runtime, TensorRT included, accepts)."""

    name = "onnxruntime"
    aliases = ("ort",)
    formulation = "grouped"
    attention = "plain"
    description = ("ONNX Runtime, MoE as standard ONNX ops: TopK, then per expert an If that runs it on its own "
                   "tokens (no weight copies)")
    capabilities = Capabilities(precisions=("fp32", "int8", "int4"), default_precision="fp32", supports_moe=True,
                                devices=tuple(PROVIDERS), max_batch=None)
    install_hint = "pip install 'moerun[onnxruntime]'"
    options = OPTIONS

    def availability(self) -> Availability:
        try:
            import onnx  # noqa: F401
            import onnxruntime as ort
        except Exception as exc:  # noqa: BLE001
            return Availability(available=False, reason=f"onnxruntime or onnx not importable ({exc})",
                                install_hint=self.install_hint)
        devices, notes = provider_devices(ort.get_available_providers())
        return Availability(available=True, version=ort.__version__, devices=devices, device_notes=notes)

    # ------------------------------------------------------------------ artifacts
    def moe_formulation(self, spec: Any) -> str:
        """`grouped` (one If per expert, no weight copies) unless the experts are so small that
        the per-expert dispatch costs more than copying the k chosen experts would: one If
        executes in about 2 us here, as long as copying ~DISPATCH_BYTES. Measured decode per
        token, grouped against gather: 128 experts of 512x64 (top-2) 777-808 us against
        241-283 us; 4 experts of 512x1024, 665-808 us against 1129-1217 us
        (tests/test_breakdown.py's shapes; docs/backends.md)."""
        if self.formulation != "grouped" or not spec.is_moe:
            return self.formulation
        expert_bytes = 4 * 3 * spec.hidden_size * spec.intermediate_size
        return "grouped" if spec.top_k * expert_bytes >= spec.num_experts * DISPATCH_BYTES else "standard"

    def prepare(self, checkpoint: Checkpoint, precision: str, cache: Cache) -> Artifact:
        spec = checkpoint.spec
        formulation = self.moe_formulation(spec)
        expert_bits = None
        if spec.is_moe and precision in ("int8", "int4"):
            if formulation == "contrib":
                if not spec.renormalize_topk:
                    raise UnsupportedError(
                        "onnxruntime 1.32's QMoE CPU kernel renormalises the top-k weights whatever "
                        "normalize_routing_weights says (measured against the MoE op); this family does not")
                expert_bits = 8 if precision == "int8" else 4
        # int8: weight codes this CPU's integer kernel multiplies exactly (int8.py); one folder per format
        int8_weights = weights_for_cpu() if precision == "int8" else None
        tag = precision + ("-u8" if int8_weights == "u8" else "")
        folder = cache.artifact_dir(self.name, BUILD_VERSION, checkpoint.content_hash(), formulation, tag)
        target = folder / "model.onnx"
        if not target.exists():
            with cache.building(folder) as tmp:
                self._build(checkpoint, tmp / "model.onnx", precision, formulation, expert_bits, int8_weights)
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        return Artifact(backend=self.name, precision=precision, spec=spec, path=target, size_bytes=size,
                        meta={"format": "onnx", "moe_formulation": formulation if spec.is_moe else None,
                              "attention": self.attention,
                              "expert_weights": (f"int{expert_bits} (QMoE)" if expert_bits else
                                                 None if not spec.is_moe else
                                                 "int8 (MatMulInteger)" if precision == "int8" else
                                                 "int4 (blocked DequantizeLinear)" if precision == "int4" else "fp32"),
                              "external_data": target.with_name("model.onnx.data").exists(),
                              "int8_weights": int8_weights,
                              "bits_per_weight": size * 8 / spec.total_params})

    def _build(self, ckpt: Checkpoint, path: Path, precision: str, formulation: str, expert_bits: int | None,
               int8_weights: str | None = None) -> None:
        """Build, quantise and write in one pass (backends/onnxgraph/builder.py): with 1 GiB of
        fp32 weights or more the initializers stream into `model.onnx.data` as they are made."""
        import onnx

        from moerun.backends.onnxgraph.builder import build_onnx

        weight_bits = {"fp32": None, "int8": 8, "int4": 4}[precision]
        external = path.with_name(path.name + ".data") if ckpt.spec.total_params * 4 >= EXTERNAL_DATA_BYTES else None
        model = build_onnx(ckpt, formulation=formulation, expert_bits=expert_bits, weight_bits=weight_bits,
                           attention=self.attention, external_data=external, int8_weights=int8_weights or "s8")
        if external is None:
            onnx.checker.check_model(model)
        onnx.save_model(model, str(path))

    # ------------------------------------------------------------------ loading
    def load(self, artifact: Artifact, settings: LoadSettings) -> Session:
        return OnnxRuntimeSession(artifact, settings)


class OnnxRuntimeContribBackend(OnnxRuntimeBackend):
    """ONNX Runtime's own com.microsoft kernels: MoE / QMoE for the experts and
    GroupQueryAttention for attention. On a dense twin the two ONNX Runtime backends differ
    only in attention, so the twins measure the attention path and the MoE models both."""

    name = "onnxruntime-contrib"
    aliases = ("ort-contrib",)
    formulation = "contrib"
    attention = "gqa"
    description = "ONNX Runtime with its com.microsoft kernels: MoE / QMoE experts, GroupQueryAttention"


class OnnxRuntimeSession(Session):
    def __init__(self, artifact: Artifact, settings: LoadSettings) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.artifact, self.settings = artifact, settings
        opts = settings.options
        self.threads = settings.threads or len(os.sched_getaffinity(0))
        self.profile = bool(opts.get("profile", False))
        # int8 graphs: which integer GEMM runs them on this CPU, and whether it is exact (int8.py)
        self.int8 = int8_kernel(artifact.meta.get("int8_weights")) if artifact.precision == "int8" else None
        device = settings.device
        provider = opts.get("provider") or PROVIDERS.get(device.split(":")[0], "CPUExecutionProvider")
        if provider not in ort.get_available_providers():
            _, notes = provider_devices(ort.get_available_providers())
            why = next((notes[d] for d, ep in PROVIDERS.items() if ep == provider and d in notes), None)
            raise UnsupportedError(why or f"onnxruntime here has no {provider} (available: "
                                          f"{', '.join(ort.get_available_providers())})")
        # where nodes ran: ONNX Runtime falls back to the CPU node by node, so on any other
        # provider (or with -O placement=true) one profiled step at load says which ran what
        self.placement_wanted = not self.profile and (provider != "CPUExecutionProvider"
                                                      or bool(opts.get("placement", False)))
        placement_dir = tempfile.mkdtemp(prefix="moerun-ort-placement-") if self.placement_wanted else None
        prefix = (str(artifact.path.with_name("profile")) if self.profile else
                  os.path.join(placement_dir, "placement") if placement_dir else None)
        so = self._session_options(profile_prefix=prefix)
        try:
            self.sess = ort.InferenceSession(str(artifact.path), sess_options=so,
                                             providers=[provider] + (["CPUExecutionProvider"]
                                                                     if provider != "CPUExecutionProvider" else []))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"onnxruntime could not load {artifact.path}: {msg}") from None
        # graph transformation and weight prepacking free their staging buffers into glibc's
        # heap; handing them back took small-moe int4 from 161 to 101 MB over its 68 MB file
        release_free()
        self.provider = provider
        self.spec = artifact.spec
        # KV cache and outputs live where the provider computes: CUDA memory for CUDA and TensorRT
        self.device = "cuda" if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.output_names = [o.name for o in self.sess.get_outputs()]
        self.gqa = artifact.meta.get("attention") == "gqa"
        self.kv_names = [n for n in self.output_names if n.startswith("present_")]
        self.max_context = settings.max_context
        self.batch_size = settings.batch_size
        self.kv_bytes_per_value = 4.0
        self.profile_file: str | None = None
        self.reset()
        self.placement: dict[str, Any] = {"measured": False, "providers": self.sess.get_providers(),
                                          "why": "only the CPU provider is registered: every node runs there"}
        if placement_dir:
            try:
                self._run([0, 1], False)  # one step whose profile names each node's provider
                self.placement = node_placement(self.sess.end_profiling())
                self.placement["providers"] = self.sess.get_providers()
                counts = self.placement["nodes_by_provider"]
                fallen = counts.get("CPUExecutionProvider", 0) if provider != "CPUExecutionProvider" else 0
                self.placement["cpu_fallback_nodes"] = fallen
                if fallen:
                    cpu_ops = self.placement["op_types_by_provider"]["CPUExecutionProvider"]
                    self.placement["note"] = (f"{fallen} of {sum(counts.values())} nodes fell back to the CPU "
                                              f"(op types: {', '.join(cpu_ops)})")
            finally:
                shutil.rmtree(placement_dir, ignore_errors=True)
                self.reset()

    def _session_options(self, profile_prefix: str | None = None) -> Any:
        ort, opts = self.ort, self.settings.options
        so = ort.SessionOptions()
        level = opts.get("opt_level", "all")
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
        so.log_severity_level = 3  # errors only: unused-initializer notes are not news
        so.intra_op_num_threads = self.threads
        # spinning on: turning it off cost 0.7-2 ms per decode step here (ENGINE-NOTES)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if opts.get("spinning", True) else "0")
        if self.settings.shared_cpu:  # lockstep: park the pool when a run returns, not 20-50 ms later
            so.add_session_config_entry("session.force_spinning_stop", "1")
        if self.int8 and self.int8["session_option"] is not None:
            so.add_session_config_entry(INT8_SESSION_OPTION, self.int8["session_option"])
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
        return so

    def reset(self, batch: int | None = None) -> None:
        """Empty caches for `batch` sequences (default: as many as the last step ran; a step
        of another count on an empty cache resets to its own)."""
        s = self.spec
        self.rows = batch = batch or getattr(self, "rows", 1)
        empty = np.zeros((batch, s.num_kv_heads, 0, s.head_dim), np.float32)
        self.past = {n.replace("present_", "past_"): self.ort.OrtValue.ortvalue_from_numpy(empty, self.device)
                     for n in self.kv_names}
        self.pos = 0

    def _run(self, ids: Sequence[int], all_logits: bool, rows: list[list[int]] | None = None) -> np.ndarray:
        """One step of one sequence (`ids`), or of B sequences of one length (`rows`):
        logits [B, L, vocab] for rows, [L, vocab] otherwise."""
        batch = rows if rows is not None else [[int(t) for t in ids]]
        n = check_step(batch, vocab=self.spec.vocab_size, cached=self.pos, max_context=self.max_context,
                       max_batch=self.batch_size)
        if len(batch) != self.rows:
            if self.pos:
                raise ConfigError(f"{len(batch)} sequences: {self.rows} are cached (reset first)")
            self.reset(len(batch))
        io = bind_step(self.sess, batch, 0 if all_logits else n - 1, self.past, self.output_names, self.device)
        try:
            self.sess.run_with_iobinding(io)
        except Exception as exc:  # noqa: BLE001
            raise BackendRuntimeError(f"onnxruntime run failed: {str(exc).splitlines()[0]}") from exc
        outs = dict(zip(self.output_names, io.get_outputs()))
        self.past = {n.replace("present_", "past_"): outs[n] for n in self.kv_names}
        self.pos += n
        logits = outs["logits"].numpy()
        return logits if rows is not None else logits[0]

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        return self._run(token_ids, all_logits)

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        return self._run((), False, [[int(t) for t in p] for p in prompts])[:, -1]

    def decode_batch(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._run((), False, [[int(t)] for t in token_ids])[:, -1]

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([token_id], False)[0]

    def breakdown(self, prompt: Sequence[int], follow: Sequence[int]) -> dict[str, Any]:
        """Cut timing (backends/onnxruntime/cut.py: one pruned session per cut point, in a
        process of its own with one shared thread pool); ONNX Runtime's session profiling
        with ``-O breakdown=profile``, or where cut timing cannot run (weights in external
        data, too large to hold once per cut point, the child process failing), saying why."""
        why = None
        if self.settings.options.get("breakdown", "cut") == "cut":
            why = self._cut_obstacle()
            if why is None:
                try:
                    return self._cut_breakdown(prompt, follow)
                except Exception as exc:  # noqa: BLE001 - any failure there falls back, with its reason
                    why = f"its process failed: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
        out = self._profile_breakdown(prompt, follow)
        if why:
            out["instrument"] += f" (cut timing not used: {why})"
        return out

    CUT_MEMORY_BYTES = 4 << 30  # the pruned sessions of one cut-timing process, together

    def _cut_obstacle(self) -> str | None:
        path = self.artifact.path
        if path.with_name(path.name + ".data").exists():
            return "the model keeps its weights in external data"
        if self.device != "cpu":
            return "cut timing here covers the CPU provider"
        cuts = 2 + 8 * self.spec.num_layers  # about; each pruned session holds the weights up to its cut
        if self.artifact.size_bytes * cuts / 2 > self.CUT_MEMORY_BYTES:
            return f"about {cuts} pruned sessions of this model would pass {self.CUT_MEMORY_BYTES >> 30} GiB"
        return None

    def _cut_breakdown(self, prompt: Sequence[int], follow: Sequence[int]) -> dict[str, Any]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from .cut import run_cut_timing

        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out = pool.submit(run_cut_timing, str(self.artifact.path), self.provider, self.threads,
                              self.settings.options.get("opt_level", "all"),
                              (self.spec.num_kv_heads, self.spec.head_dim),
                              [int(t) for t in prompt], [int(t) for t in follow],
                              self.int8["session_option"] if self.int8 else None).result()
        out["instrument"] = ("cut timing, one pruned onnxruntime session per cut point (own process, "
                             "one shared thread pool)")
        return out

    def _profiled(self, run: Any) -> tuple[Any, list[dict[str, Any]]]:
        """`run(session)` on a second session of this model with profiling on (the timed
        session is never instrumented): what it returned and the profile's events, the
        profile file removed."""
        import json

        import attrs

        profiled = OnnxRuntimeSession(self.artifact, attrs.evolve(
            self.settings, options={**self.settings.options, "profile": True}))
        try:
            out = run(profiled)
        finally:
            profiled.close()
        events = json.loads(Path(profiled.profile_file).read_text())
        Path(profiled.profile_file).unlink(missing_ok=True)
        return out, events

    def decode_ops(self, prompt: Sequence[int]) -> dict[str, Any]:
        """The kernels one decode step runs: ONNX Runtime's profile of the step on a second
        session with profiling on (after its graph optimisations and fusions; the nodes of an
        ``If`` branch that ran are counted, and the ``If`` itself)."""
        def step(profiled: "OnnxRuntimeSession") -> None:
            profiled.prefill(list(prompt))
            profiled.decode(prompt[-1])

        _, events = self._profiled(step)
        self.reset()
        last = max((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                   key=lambda e: e["ts"])
        ops: dict[str, int] = {}
        for e in events:
            if (e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")
                    and last["ts"] <= e["ts"] <= last["ts"] + last["dur"]):
                op = e.get("args", {}).get("op_name", "?")
                ops[op] = ops.get(op, 0) + 1
        return {"ops": sum(ops.values()), "by_op": dict(sorted(ops.items())),
                "unit": "onnxruntime kernels run (its profile), one decode step"}

    def _profile_breakdown(self, prompt: Sequence[int], follow: Sequence[int]) -> dict[str, Any]:
        """ONNX Runtime's own per-node profile, from a second session with profiling on (the
        timed session is never instrumented). Node names carry their category
        ("router:l3_router_topk"); time between kernels is left unattributed. The profiler
        costs a few microseconds per node inside each recorded duration: on tiny models,
        whose nodes take about one, the sum overshoots the plain step severalfold."""
        import statistics

        from moerun.backends.onnxgraph.builder import node_category
        from moerun.toolkit import empty_breakdown as empty, time_phases

        def phases(profiled: "OnnxRuntimeSession") -> tuple[float, float]:
            profiled.prefill(prompt[:2])  # first-run allocations, untimed
            return time_phases(profiled, prompt, follow)

        (prefill_wall, decode_wall), events = self._profiled(phases)
        plain = [time_phases(self, prompt, follow) for _ in range(5)]  # the reference, same moments
        self.reset()
        runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                      key=lambda e: e["ts"])[1:]  # the untimed warm-up run is first
        per_run = [empty() for _ in runs]
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            if e.get("args", {}).get("op_name") in ("If", "Loop", "Scan"):
                continue  # a control-flow node's time is its subgraph's nodes, counted already
            for r, cats in zip(runs, per_run):
                if r["ts"] <= e["ts"] <= r["ts"] + r["dur"]:
                    cats[node_category(e["name"])] += e["dur"] / 1e6
                    break
        decode = empty()
        for cats in per_run[1:]:
            for c, v in cats.items():
                decode[c] += v / max(1, len(per_run) - 1)
        return {"instrument": "onnxruntime session profiling (per-node kernel times)",
                "prefill": per_run[0] if per_run else empty(), "prefill_wall_s": prefill_wall,
                "prefill_plain_s": statistics.median(p for p, _ in plain),
                "decode": decode, "decode_wall_s": decode_wall,
                "decode_plain_s": statistics.median(d for _, d in plain)}

    def describe(self) -> dict[str, Any]:
        return {"provider": self.provider, "placement": self.placement, "threads": self.threads,
                "moe_formulation": self.artifact.meta.get("moe_formulation"), "profile": self.profile,
                "kv_cache": "OrtValues via IO binding",
                "spinning": ("off" if not self.settings.options.get("spinning", True) else
                             "on, stopped when each run returns (lockstep)" if self.settings.shared_cpu else "on"),
                "attention": "GroupQueryAttention" if self.gqa else "plain ops",
                **({"int8_kernel": self.int8, "kernel_path": f"int8 {self.int8['kernel']}"} if self.int8 else {})}

    def close(self) -> None:
        if getattr(self, "sess", None) is not None:
            if self.profile:
                self.profile_file = self.sess.end_profiling()
            self.sess = None
            self.past = {}
