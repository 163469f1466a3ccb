"""The TensorRT backend (TensorRT 10 Python API). UNVERIFIED: no machine this project runs
on has TensorRT (PyPI ships only the bindings; the runtime libraries come from NVIDIA's
own index), so this code is written against the documented API and exercised only as far
as the installed packages allow; tests cover its ONNX input and its availability report.

- Engine: the engine-neutral ONNX graph (backends/onnxgraph, standard-op MoE) through
  ``trt.OnnxParser``; two optimisation profiles (prefill: T in [1, max_prompt]; decode:
  T = 1) with the past length in [0, max_context]; fp16 / bf16 builder flags; a timing
  cache per GPU; the serialized engine cached by checkpoint content, precision, GPU model
  and TensorRT version.
- Run: torch CUDA tensors bound with ``set_tensor_address``; ``execute_async_v3`` on a
  torch stream; one execution context per profile; the KV cache ping-pongs between two
  device buffers per layer (present of one step is the past of the next, never copied to
  the host); ``logits_from`` is a shape tensor and lives in host memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from moerun.toolkit import (
    Artifact,
    Availability,
    Backend,
    BackendRuntimeError,
    BackendUnavailableError,
    Cache,
    Capabilities,
    Checkpoint,
    ConfigError,
    LoadSettings,
    Session,
    check_step,
    UnsupportedError,
)

BUILD_VERSION = "trt-engine-2"  # 2: profiles over batch
MAX_CONTEXT = 4096
MAX_PROMPT = 2048
MAX_BATCH = 16  # the optimisation profiles cover batch 1..MAX_BATCH (prefill tokens: MAX_PROMPT in all)
INSTALL_HINT = ("pip install 'moerun[tensorrt]' on a Linux machine with an NVIDIA GPU and driver "
                "(the runtime wheels come from NVIDIA's package index)")


def _trt_and_torch():
    try:
        import tensorrt as trt
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken native library
        raise BackendUnavailableError(f"tensorrt not importable ({type(exc).__name__}: {exc})") from None
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailableError(f"torch (for CUDA buffers) not importable ({exc})") from None
    return trt, torch


def availability_report() -> Availability:
    """Why TensorRT can or cannot run here, in the order a user would fix it."""
    try:
        trt, torch = _trt_and_torch()
    except BackendUnavailableError as exc:
        return Availability(available=False, reason=str(exc), install_hint=INSTALL_HINT)
    version = getattr(trt, "__version__", "?")
    major = int(version.split(".")[0]) if version[:1].isdigit() else 0
    if major < 10:
        return Availability(available=False, reason=f"TensorRT {version} found; moerun needs TensorRT 10 or newer",
                            install_hint=INSTALL_HINT, version=version)
    if not torch.cuda.is_available():
        why = "no CUDA device visible to torch"
        if torch.version.cuda is None:
            why += f" (torch {torch.__version__} is a CPU-only build)"
        return Availability(available=False, reason=why, install_hint=INSTALL_HINT, version=version)
    return Availability(available=True, version=version, devices=("cuda",))


class TensorRTBackend(Backend):
    name = "tensorrt"
    aliases = ("trt",)
    description = "TensorRT 10 engines from the shared ONNX graph (standard-op MoE); UNVERIFIED here"
    capabilities = Capabilities(precisions=("fp32", "fp16", "bf16"), default_precision="fp16", supports_moe=True,
                                max_batch=MAX_BATCH,
                                devices=("cuda",))
    install_hint = INSTALL_HINT

    def availability(self) -> Availability:
        return availability_report()

    def check(self, spec, precision):
        super().check(spec, precision)
        if spec.max_position_embeddings < 2:
            raise UnsupportedError("model context too short")

    def prepare(self, checkpoint: Checkpoint, precision: str, cache: Cache) -> Artifact:
        trt, torch = _trt_and_torch()
        import onnx

        from moerun.backends.onnxgraph.builder import build_onnx

        spec = checkpoint.spec
        gpu = torch.cuda.get_device_name(0)
        key = (BUILD_VERSION, checkpoint.content_hash(), precision, gpu, trt.__version__)
        folder = cache.artifact_dir(self.name, *key)
        engine_path = folder / "model.engine"
        if not engine_path.exists():
            with cache.building(folder) as tmp:
                onnx_path = tmp / "model.onnx"
                # streamed: the weights go to model.onnx.data as the builder makes them
                model = build_onnx(checkpoint, formulation="standard", external_data=tmp / "model.onnx.data")
                onnx.save_model(model, str(onnx_path))
                del model
                timing = cache.root / "tensorrt" / f"timing-{hashlib.sha256(gpu.encode()).hexdigest()[:12]}.cache"
                (tmp / "model.engine").write_bytes(build_engine(trt, onnx_path, spec, precision, timing))
        return Artifact(backend=self.name, precision=precision, spec=spec, path=engine_path,
                        size_bytes=engine_path.stat().st_size,
                        meta={"format": "tensorrt-engine", "gpu": gpu, "tensorrt": trt.__version__,
                              "max_context": min(MAX_CONTEXT, spec.max_position_embeddings)})

    def load(self, artifact: Artifact, settings: LoadSettings) -> Session:
        if not settings.device.startswith("cuda"):
            raise UnsupportedError("TensorRT runs on CUDA devices only")
        return TensorRTSession(artifact, settings)


def build_engine(trt: Any, onnx_path: Path, spec: Any, precision: str, timing_cache: Path) -> bytes:
    """Parse the ONNX graph and build a serialized engine with prefill and decode profiles."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendRuntimeError(f"TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    timing = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing, ignore_mismatch=False)
    max_ctx = min(MAX_CONTEXT, spec.max_position_embeddings)
    max_prompt = min(MAX_PROMPT, max_ctx)
    kv = (spec.num_kv_heads, spec.head_dim)
    # prefill: B x T <= MAX_PROMPT tokens (opt: one sequence); decode: B x 1 (opt: batch 1)
    for t_min, t_opt, t_max, b_max in ((1, min(128, max_prompt), max_prompt, MAX_BATCH), (1, 1, 1, MAX_BATCH)):
        profile = builder.create_optimization_profile()
        profile.set_shape("input_ids", (1, t_min), (1, t_opt), (b_max, t_max))
        profile.set_shape_input("logits_from", [0], [t_opt - 1], [t_max - 1])
        for i in range(spec.num_layers):
            for kind in ("key", "value"):
                profile.set_shape(f"past_{kind}_{i}", (1, kv[0], 0, kv[1]), (1, kv[0], max_ctx // 2, kv[1]),
                                  (b_max, kv[0], max_ctx - t_min, kv[1]))
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendRuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(serialized)


class TensorRTSession(Session):
    def __init__(self, artifact: Artifact, settings: LoadSettings) -> None:
        trt, torch = _trt_and_torch()
        self.trt, self.torch = trt, torch
        self.spec = s = artifact.spec
        self.device = torch.device(settings.device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(artifact.path.read_bytes())
        if self.engine is None:
            raise BackendRuntimeError(f"TensorRT could not deserialize {artifact.path} (another GPU or version?)")
        self.stream = torch.cuda.Stream(device=self.device)
        self.contexts = []
        for profile in (0, 1):  # prefill, decode
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.max_context = min(settings.max_context, artifact.meta["max_context"])
        self.max_prompt = min(MAX_PROMPT, self.max_context)
        self.batch_size = B = settings.batch_size
        if B > MAX_BATCH:
            raise UnsupportedError(f"the engine's profiles cover batch sizes up to {MAX_BATCH}, not {B}")
        kv_shape = (B, s.num_kv_heads, self.max_context, s.head_dim)
        # two buffers per cache tensor: step n reads one and writes the other
        self.kv = {f"{kind}_{i}": [torch.empty(kv_shape, dtype=torch.float32, device=self.device) for _ in range(2)]
                   for i in range(s.num_layers) for kind in ("key", "value")}
        self.logits = torch.empty((B, self.max_prompt, s.vocab_size), dtype=torch.float32, device=self.device)
        self.ids = torch.empty((B, self.max_prompt), dtype=torch.int64, device=self.device)
        self.logits_from = np.zeros(1, dtype=np.int64)  # a shape tensor: host memory
        self.kv_bytes_per_value = 4.0
        self.reset()

    def reset(self) -> None:
        self.pos = 0
        self.flip = 0

    def _run(self, ids: Sequence[int], all_logits: bool, rows: list[list[int]] | None = None) -> np.ndarray:
        """One sequence (`ids`: [n, vocab] or [1, vocab]) or B of one length (`rows`: [B, vocab],
        each one's last position). UNVERIFIED: no TensorRT here."""
        batch = rows if rows is not None else [[int(t) for t in ids]]
        T = check_step(batch, vocab=self.spec.vocab_size, cached=self.pos, max_context=self.max_context,
                       max_batch=self.batch_size)
        B = len(batch)
        if B * T > self.max_prompt:
            raise ConfigError(f"{B} x {T} tokens exceed the engine's prefill profile (batch x prompt <= "
                              f"{self.max_prompt})")
        if rows is not None:
            all_logits = False
        ctx = self.contexts[1 if T == 1 else 0]
        s, P = self.spec, self.pos
        # a [B, T] view at the start of the buffer: contiguous, as the engine reads it
        ids_view = self.ids.view(-1)[: B * T].view(B, T)
        ids_view.copy_(self.torch.tensor(batch, dtype=self.torch.int64), non_blocking=True)
        ctx.set_input_shape("input_ids", (B, T))
        ctx.set_tensor_address("input_ids", ids_view.data_ptr())
        self.logits_from[0] = 0 if all_logits else T - 1
        ctx.set_tensor_address("logits_from", self.logits_from.ctypes.data)
        src, dst = self.flip, 1 - self.flip
        for i in range(s.num_layers):
            for kind in ("key", "value"):
                bufs = self.kv[f"{kind}_{i}"]
                ctx.set_input_shape(f"past_{kind}_{i}", (B, s.num_kv_heads, P, s.head_dim))
                ctx.set_tensor_address(f"past_{kind}_{i}", bufs[src].data_ptr())
                ctx.set_tensor_address(f"present_{kind}_{i}", bufs[dst].data_ptr())
        ctx.set_tensor_address("logits", self.logits.data_ptr())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise BackendRuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        n = T if all_logits else 1
        self.pos += T
        self.flip = dst
        # present is [B, kv, P+T, hd] written contiguously at the start of the buffer, which is
        # exactly how the next step reads its past; logits [B, n, vocab] likewise
        logits = self.logits.view(-1)[: B * n * s.vocab_size].view(B, n, s.vocab_size).cpu().numpy()
        return logits[:, -1] if rows is not None else logits[0]

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        return self._run((), False, [[int(t) for t in p] for p in prompts])

    def decode_batch(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._run((), False, [[int(t)] for t in token_ids])

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        return self._run(token_ids, all_logits)

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([token_id], False)[0]

    def synchronize(self) -> None:
        self.stream.synchronize()

    def breakdown(self, prompt: Sequence[int], follow: Sequence[int]) -> dict[str, Any]:
        """TensorRT's IProfiler (per-layer times; UNVERIFIED here). Layers are named after
        the ONNX nodes they came from, whose names carry the category ("router:l3_..."); a
        fused layer ("a + b") takes its first node's category."""
        from moerun.backends.onnxgraph.builder import node_category
        from moerun.toolkit import empty_breakdown as empty, time_phases

        trt = self.trt

        class Profiler(trt.IProfiler):
            def __init__(self) -> None:
                trt.IProfiler.__init__(self)
                self.cats = empty()

            def report_layer_time(self, layer_name: str, ms: float) -> None:
                first = layer_name.split(" + ", 1)[0].lstrip("{").strip()
                self.cats[node_category(first)] += ms / 1e3

        profilers = [Profiler(), Profiler()]
        for ctx, prof in zip(self.contexts, profilers):
            ctx.profiler = prof
        n = max(1, len(follow))
        try:
            prefill_wall, decode_wall = time_phases(self, prompt, follow)
        finally:
            for ctx in self.contexts:
                ctx.profiler = None
            self.reset()
        return {"instrument": "TensorRT IProfiler (per-layer times)", "prefill": profilers[0].cats,
                "prefill_wall_s": prefill_wall, "decode": {c: v / n for c, v in profilers[1].cats.items()},
                "decode_wall_s": decode_wall}

    def describe(self) -> dict[str, Any]:
        return {"tensorrt": self.trt.__version__, "gpu": self.torch.cuda.get_device_name(self.device),
                "profiles": ["prefill", "decode"], "max_context": self.max_context,
                "moe_formulation": "standard (ONNX gather of the k selected experts; all experts for a prompt)"}

    def close(self) -> None:
        self.contexts = []
        self.engine = None
        self.kv = {}
