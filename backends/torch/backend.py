"""The PyTorch backend. torch is imported lazily: `import moerun` never loads it."""

from __future__ import annotations

import os
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
    LoadSettings,
    Option,
    Session,
    check_step,
    UnsupportedError,
)
from moerun.toolkit import release_free

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_devices(torch: Any) -> tuple[tuple[str, ...], dict[str, str]]:
    """The devices this torch can use, and why the others are absent."""
    devices, notes = ["cpu"], {}
    if torch.cuda.is_available():
        devices.append("cuda")
    elif torch.version.cuda is None:
        notes["cuda"] = (f"this torch ({torch.__version__}) is a build without CUDA; on NVIDIA install a CUDA "
                         f"build (pip install torch --index-url https://download.pytorch.org/whl/cu128)")
    else:
        notes["cuda"] = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device or driver"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    elif mps is None or not mps.is_built():
        notes["mps"] = "this torch was built without MPS: MPS is Apple's GPU on Apple silicon, macOS builds only"
    else:
        notes["mps"] = "torch has MPS but no usable device (needs Apple silicon and macOS 12.3 or later)"
    return tuple(devices), notes


class TorchBackend(Backend):
    name = "torch"
    aliases = ("pytorch",)
    description = "PyTorch eager (optionally torch.compile); the fp32 numerical reference"
    capabilities = Capabilities(
        precisions=("fp32", "bf16", "fp16"),
        default_precision="fp32",
        supports_moe=True,
        devices=("cpu", "cuda", "mps"),
        routing_stats=True,
        max_batch=None,
    )
    install_hint = "pip install 'moerun[torch]'"
    options = {  # -O NAME=VALUE (docs/backends.md, PyTorch)
        "compile_mode": Option(help="torch.compile's mode with --compile", kinds=(str,)),
        "breakdown": Option(help="the --breakdown instrument: cut timing or torch.profiler", choices=("cut", "profiler")),
    }

    def availability(self) -> Availability:
        try:
            import torch
        except Exception as exc:  # noqa: BLE001 - a broken install is "unavailable"
            return Availability(available=False, reason=f"torch not importable ({exc})", install_hint=self.install_hint)
        devices, notes = torch_devices(torch)
        return Availability(available=True, version=torch.__version__, devices=devices, device_notes=notes)

    def emulated(self, precision: str, device: str | None = None) -> str | None:
        """bf16 / fp16 on a CPU without the instructions: oneDNN converts through fp32, and
        bf16 GEMMs ran 10-20x slower in prefill on an AVX2 EPYC (docs/backends.md)."""
        if (device or "cpu").split(":")[0] != "cpu" or precision not in ("bf16", "fp16"):
            return None
        import platform

        from moerun.toolkit import cpu_flags

        flags = cpu_flags()
        if platform.machine().lower() in ("x86_64", "amd64"):
            native = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}[precision]
            if any(f in flags for f in native):
                return None
            return (f"this CPU has no native {precision} ({' or '.join(native)}): torch would emulate it through "
                    f"fp32, which measures the missing instructions")
        if platform.machine().lower() in ("aarch64", "arm64"):
            native = {"bf16": ("bf16",), "fp16": ("fphp", "asimdhp")}[precision]
            if flags and not any(f in flags for f in native):
                return f"this CPU has no native {precision} ({' or '.join(native)}): torch would emulate it"
        return None

    def prepare(self, checkpoint: Checkpoint, precision: str, cache: Cache) -> Artifact:
        # torch reads the HF checkpoint directly: the artifact is the checkpoint itself.
        bytes_per = {"fp32": 4, "bf16": 2, "fp16": 2}[precision]
        return Artifact(
            backend=self.name, precision=precision, spec=checkpoint.spec, path=checkpoint.path,
            size_bytes=checkpoint.spec.total_params * bytes_per,
            meta={"format": "hf-safetensors", "in_memory_bytes": checkpoint.spec.total_params * bytes_per},
        )

    def load(self, artifact: Artifact, settings: LoadSettings) -> Session:
        import torch

        from .model import Model

        device = settings.device
        present, notes = torch_devices(torch)
        if device.split(":")[0] not in present:
            raise UnsupportedError(notes.get(device.split(":")[0], f"torch here has no {device} device"))
        if settings.threads:
            torch.set_num_threads(int(settings.threads))
        dtype = getattr(torch, _DTYPES[artifact.precision])
        ckpt = Checkpoint.open(artifact.path, name=artifact.spec.name)
        try:
            # inductor cannot lower oneDNN-packed weights: compiled models keep plain ones
            model = Model(ckpt.spec, ckpt, dtype=dtype, device=torch.device(device),
                          max_context=settings.max_context, pack=not settings.compile,
                          batch=settings.batch_size)
        except RuntimeError as exc:
            raise BackendRuntimeError(f"torch could not load {artifact.path}: {exc}") from exc
        # the load staged every tensor through float32 numpy and torch buffers; glibc keeps the
        # freed ones in its heap (its mmap threshold rises after the first large free), which
        # held OLMoE-1B-7B bf16 at 1.28x its weights. Handing them back costs nothing later.
        release_free()
        instrument = settings.options.get("breakdown", "cut")
        return TorchSession(model, compile=settings.compile, compile_mode=settings.options.get("compile_mode"),
                            breakdown=instrument)


class TorchSession(Session):
    def __init__(self, model: Any, *, compile: bool = False, compile_mode: str | None = None,
                 breakdown: str = "cut") -> None:
        import torch

        self.breakdown_instrument = breakdown
        self.torch = torch
        self.model = model
        self.pos = 0
        self.kv_bytes_per_value = model.k_cache[0].element_size()
        self._forward = model.forward
        self.compiled = compile
        if compile:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "moerun", "inductor"))
            self._forward = torch.compile(model.forward, dynamic=True, mode=compile_mode)

    def _run(self, rows: list[list[int]], all_logits: bool) -> np.ndarray:
        """One step of B sequences of n tokens each (B = 1 for prefill and decode)."""
        n = check_step(rows, vocab=self.model.spec.vocab_size, cached=self.pos,
                       max_context=self.model.max_context, max_batch=self.model.batch)
        t = self.torch.tensor(rows, dtype=self.torch.long, device=self.model.device)
        logits = self._forward(t, self.pos, all_logits=all_logits)
        self.pos += n
        return logits.cpu().numpy()

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        return self._run([[int(t) for t in token_ids]], all_logits)

    def decode(self, token_id: int) -> np.ndarray:
        return self._run([[int(token_id)]], False)[0]

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        return self._run([[int(t) for t in p] for p in prompts], False)

    def decode_batch(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._run([[int(t)] for t in token_ids], False)

    def reset(self) -> None:
        self.pos = 0
        self.model.reset()

    def synchronize(self) -> None:
        """Wait for the device: moerun's clock reads only after the queued kernels ran."""
        if self.model.device.type == "cuda":
            self.torch.cuda.synchronize(self.model.device)
        elif self.model.device.type == "mps":
            self.torch.mps.synchronize()

    def describe(self) -> dict[str, Any]:
        return {"linear_kernel": self.model.linear_kernel, "threads": self.torch.get_num_threads(),
                "moe_formulation": ("grouped: decode runs the k chosen experts' own Linears; prefill groups "
                                    "tokens per expert (index_select, one GEMM per used expert, index_add_)"
                                    if self.model.spec.is_moe else None),
                "dtype": str(self.model.dtype).removeprefix("torch."), "device": str(self.model.device),
                "compiled": self.compiled}

    def breakdown(self, prompt: Sequence[int], follow: Sequence[int]) -> dict[str, Any]:
        """Cut timing over the labelled regions of the model code (moerun.breakdown.cut_timing):
        every region entry and exit is a cut point; a timed step runs to one of them and
        stops (after a device synchronize). Without an armed cut a region costs a counter
        increment, so the instrument adds next to nothing to a step. Runs the eager model
        (a compiled session's graph cannot stop midway). Session option
        ``breakdown=profiler`` uses torch.profiler's inclusive region times instead: its
        per-op cost (~0.5 us per recorded op here) inflates small models' steps."""
        if self.breakdown_instrument == "profiler":
            return self._profiler_breakdown(prompt, follow)
        import time

        from moerun.toolkit import cut_timing

        from .model import Cuts, StepCut

        model, torch = self.model, self.torch
        forward = model.forward  # eager, even in a compiled session
        cuts = Cuts(self.synchronize)
        follow = list(follow) or [prompt[-1]]

        def run(ids: Sequence[int], cut: int, *, all_logits: bool = False) -> None:
            cuts.arm(cut)
            t = torch.tensor(list(ids), dtype=torch.long, device=model.device)
            try:
                forward(t, self.pos, all_logits=all_logits).cpu()
            except StepCut:
                pass
            self.pos += len(ids)

        def prefill_step(k: int | None) -> float:
            self.reset()
            t0 = time.perf_counter()
            run(prompt, -1 if k is None else k)
            return time.perf_counter() - t0

        def decode_step(k: int | None) -> float:
            start = self.pos
            t0 = time.perf_counter()
            for tok in follow:
                run([tok], -1 if k is None else k)
            dt = (time.perf_counter() - t0) / len(follow)
            self.pos = start
            return dt

        def plain(step: Any) -> Any:
            def timed() -> float:
                model.instrument = None
                try:
                    return step(None)
                finally:
                    model.instrument = cuts
            return timed

        model.instrument = cuts
        try:
            self.reset()
            cuts.arm(record=True)
            forward(torch.tensor(list(prompt), dtype=torch.long, device=model.device), 0, all_logits=False)
            prefill_labels = cuts.labels
            cuts.arm(record=True)
            forward(torch.tensor([follow[0]], dtype=torch.long, device=model.device), len(prompt), all_logits=False)
            decode_labels = cuts.labels
            prefill, p_info = cut_timing(prefill_step, prefill_labels, plain=plain(prefill_step))
            self.reset()
            run(prompt, -1)
            decode, d_info = cut_timing(decode_step, decode_labels, plain=plain(decode_step))
        finally:
            model.instrument = None
            self.reset()
        return {"instrument": "cut timing over moerun's labelled model regions (eager PyTorch)",
                "prefill": prefill, "prefill_wall_s": p_info["armed_step_s"], "prefill_plain_s": p_info["plain_step_s"],
                "decode": decode, "decode_wall_s": d_info["armed_step_s"], "decode_plain_s": d_info["plain_step_s"],
                "detail": {"prefill": p_info, "decode": d_info}}

    def _profiler_breakdown(self, prompt: Sequence[int], follow: Sequence[int]) -> dict[str, Any]:
        """torch.profiler over the labelled regions (each region's inclusive CPU time); time
        outside every region (residual adds, Python glue) is left unattributed."""
        import time

        from moerun.toolkit import empty_breakdown as empty

        torch = self.torch
        activities = [torch.profiler.ProfilerActivity.CPU]

        def categories(prof: Any, steps: int) -> dict[str, float]:
            cats = empty()
            for evt in prof.key_averages():
                if evt.key.startswith("moerun::"):
                    cats[evt.key[len("moerun::"):]] += evt.cpu_time_total / 1e6
            return {c: v / steps for c, v in cats.items()}

        self.reset()
        self.model.instrument = "profiler"
        try:
            with torch.profiler.profile(activities=activities):  # the profiler's own start-up, untimed
                self.prefill(prompt[:2])
            self.reset()
            with torch.profiler.profile(activities=activities) as prof:
                t0 = time.perf_counter()
                self.prefill(prompt)
                self.synchronize()
                prefill_wall = time.perf_counter() - t0
            with torch.profiler.profile(activities=activities) as prof2:
                t0 = time.perf_counter()
                for tok in follow:
                    self.decode(tok)
                self.synchronize()
                decode_wall = (time.perf_counter() - t0) / max(1, len(follow))
        finally:
            self.model.instrument = None
            self.reset()
        return {"instrument": "torch.profiler (record_function regions)",
                "prefill": categories(prof, 1), "prefill_wall_s": prefill_wall,
                "decode": categories(prof2, max(1, len(follow))),
                "decode_wall_s": decode_wall}

    def decode_ops(self, prompt: Sequence[int]) -> dict[str, Any] | None:
        """The aten operators one eager decode step calls (a TorchDispatchMode counts every
        call that reaches the dispatcher's Python key, views included: each is a dispatch).
        None for a compiled session: its fused kernels are not the eager calls."""
        if self.compiled:
            return None
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        ops: dict[str, int] = {}

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                name = str(func.overloadpacket.__name__)
                ops[name] = ops.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self.reset()
        self.prefill(list(prompt))
        with torch.no_grad(), Count():
            self.decode(prompt[-1])
        self.reset()
        return {"ops": sum(ops.values()), "by_op": dict(sorted(ops.items())),
                "unit": "aten operator calls (eager), one decode step"}

    def expert_counts(self) -> np.ndarray | None:
        return self.model.expert_counts.copy() if self.model.spec.is_moe else None

    def observe_routing(self, prompt: Sequence[int], follow: Sequence[int]) -> np.ndarray | None:
        """The ids `route` chose in every MoE layer, logged outside any compiled graph."""
        model = self.model
        if not model.spec.is_moe:
            return None
        self.reset()
        model.route_log = [[] for _ in range(model.spec.num_layers)]
        try:
            self.prefill(prompt)
            for tok in follow:
                self.decode(tok)
            log = model.route_log
        finally:
            model.route_log = None
            self.reset()
        return np.stack([np.concatenate(per) for per in log], axis=1)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
