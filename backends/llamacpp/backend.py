"""The llama.cpp backend, through llama-cpp-python's low-level (ctypes) API.

Token ids go in through llama_batch, logits come out of llama_get_logits_ith: no
tokenizer, no sampling, no Python-level wrapper between moerun's clock and llama_decode.

Quantized weights and the AMX repack crash: on CPUs with AMX, llama.cpp 0.3.36 repacks
quantized weights into "extra" buffer types and segfaults in ggml_backend_amx_mul_mat for
every type except Q8_0. moerun loads with ``use_extra_bufts=False`` (llama-bench's
``--repack 0``) by default, records the setting in every result, and ``-O repack=true``
turns repacking back on where it works.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator, Sequence

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
    advise,
)

from . import devices as dv
from .log import capture_log, init_llama, library, log_tail
from .gguf_export import unsupported_reason, write_gguf

# moerun precision -> (GGUF file type written by moerun, or llama.cpp quantize ftype name)
FLOAT_TYPES = {"f32": "f32", "fp32": "f32", "f16": "f16", "fp16": "f16", "bf16": "bf16"}
QUANT_TYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
EXPORT_VERSION = "gguf-export-1"
KEEP_BASE_BYTES = 2 << 30  # float GGUFs built only to quantize from are deleted above this size
_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2, "bf16": 30}
OPTIONS = {  # -O NAME=VALUE (docs/backends.md, llama.cpp)
    "repack": Option(help="let llama.cpp repack weights for its CPU kernels (off: the AMX repack crash)",
                     kinds=(bool,)),
    "flash_attn": Option(help="flash attention: auto, true or false", choices=("auto", True, False)),
    "type_k": Option(help="KV cache type of the keys", choices=tuple(_KV_TYPES)),
    "type_v": Option(help="KV cache type of the values", choices=tuple(_KV_TYPES)),
    "mmap": Option(help="map the GGUF file instead of reading it into memory", kinds=(bool,)),
    "advice": Option(help="access advice (madvise) for the mapped GGUF once loaded: random makes a page fault "
                          "read one page instead of a readahead window (paging under --memory-cap)",
                     choices=("normal", "random", "sequential", "willneed")),
    "n_batch": Option(help="tokens per llama_decode call (and micro-batch)", kinds=(int,)),
    "n_gpu_layers": Option(help="layers offloaded to a GPU device (-1: all)", kinds=(int,)),
    "n_cpu_moe": Option(help="keep the expert tensors of the first N layers on the CPU", kinds=(int,)),
}


def check_gguf_file(path: Path) -> None:
    """Refuse files llama.cpp would choke on, with a one-line reason: not GGUF, or
    truncated (tensor data beyond the end of the file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from None
    if len(head) < 8 or head[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (bad magic {head[:4]!r})")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise CheckpointError(f"{path}: unsupported GGUF version {version}")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on bad files
        raise CheckpointError(f"{path}: corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from None
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(f"{path}: truncated GGUF: tensor data needs {end} bytes, file has {size}")


class LlamaCppBackend(Backend):
    name = "llamacpp"
    aliases = ("llama.cpp", "llama-cpp")
    description = "llama.cpp through llama-cpp-python's low-level API (GGUF; llama.cpp's own quantizer)"
    capabilities = Capabilities(
        precisions=tuple(FLOAT_TYPES) + tuple(QUANT_TYPES),
        default_precision="f16",
        supports_moe=True,
        devices=("cpu", "cuda", "metal", "vulkan", "gpu"),
        artifact_suffixes=(".gguf",),
        max_batch=None,
    )
    install_hint = "pip install 'moerun[llamacpp]'"
    options = OPTIONS

    def availability(self) -> Availability:
        try:
            import gguf  # noqa: F401
            import llama_cpp
        except Exception as exc:  # noqa: BLE001
            return Availability(available=False, reason=f"llama-cpp-python or gguf not importable ({exc})",
                                install_hint=self.install_hint)
        init_llama()
        found = dv.registered_devices()
        present = dv.moerun_devices(found)
        return Availability(available=True, version=getattr(llama_cpp, "__version__", "?"), devices=present,
                            device_notes=dv.absent_notes(present, bool(llama_cpp.llama_supports_gpu_offload()),
                                                         found))

    def check(self, spec, precision):
        super().check(spec, precision)
        reason = unsupported_reason(spec)
        if reason:
            raise UnsupportedError(reason)

    # ------------------------------------------------------------------ artifacts
    def _base_path(self, checkpoint: Checkpoint, base_type: str, cache: Cache) -> Path:
        folder = cache.artifact_dir(self.name, EXPORT_VERSION, checkpoint.content_hash(), base_type)
        return folder / f"model-{base_type}.gguf"

    def _base(self, checkpoint: Checkpoint, base_type: str, cache: Cache) -> Path:
        target = self._base_path(checkpoint, base_type, cache)
        folder = target.parent
        if not target.exists():
            with cache.building(folder) as tmp:
                write_gguf(checkpoint, tmp / target.name, base_type)
        return target

    def prepare(self, checkpoint: Checkpoint, precision: str, cache: Cache) -> Artifact:
        if precision in FLOAT_TYPES:
            path = self._base(checkpoint, FLOAT_TYPES[precision], cache)
            return self._artifact(checkpoint, precision, path, {"gguf_type": FLOAT_TYPES[precision]})
        # quantize from a float GGUF: bf16 where the checkpoint is bf16 (nothing to gain
        # from f32), f32 otherwise
        with open(checkpoint.path / "config.json") as f:
            import json

            stored = json.load(f).get("torch_dtype", "float32")
        base_type = "bf16" if stored == "bfloat16" else "f32"
        folder = cache.artifact_dir(self.name, EXPORT_VERSION, checkpoint.content_hash(), base_type, precision)
        target = folder / f"model-{precision}.gguf"
        if not target.exists():  # the float base is needed only to quantize
            had_base = self._base_path(checkpoint, base_type, cache).exists()
            base = self._base(checkpoint, base_type, cache)
            with cache.building(folder) as tmp:
                self._quantize(base, tmp / target.name, precision)
            if not had_base and base.stat().st_size > KEEP_BASE_BYTES:
                # a multi-GB float GGUF built only to quantize from is not kept: OLMoE-1B-7B's
                # is 13.8 GB, and disk on an edge device (or here) is the scarcer resource
                shutil.rmtree(base.parent, ignore_errors=True)
        return self._artifact(checkpoint, precision, target, {"gguf_type": precision, "quantized_from": base_type})

    def _artifact(self, checkpoint: Checkpoint, precision: str, path: Path, meta: dict[str, Any]) -> Artifact:
        size = path.stat().st_size
        return Artifact(backend=self.name, precision=precision, spec=checkpoint.spec, path=path,
                        size_bytes=size, meta={"format": "gguf", "bits_per_weight": size * 8 / checkpoint.spec.total_params,
                                               **meta})

    def _quantize(self, src: Path, dst: Path, precision: str) -> None:
        lib = library()
        init_llama()
        params = lib.llama_model_quantize_default_params()
        params.ftype = getattr(lib, QUANT_TYPES[precision])
        params.nthread = os.cpu_count() or 1
        rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0 or not dst.exists():
            raise BackendRuntimeError(f"llama.cpp failed to quantize to {precision} (code {rc}): {log_tail()}")

    def prepare_file(self, path: Path) -> Artifact:
        """An existing GGUF file as an artifact (its spec read from the metadata)."""
        from .gguf_import import spec_from_gguf

        check_gguf_file(path)
        spec, gguf_type = spec_from_gguf(path)
        size = path.stat().st_size
        return Artifact(backend=self.name, precision=gguf_type, spec=spec, path=path, size_bytes=size,
                        meta={"format": "gguf", "gguf_type": gguf_type, "external": True,
                              "bits_per_weight": size * 8 / spec.total_params})

    # ------------------------------------------------------------------ loading
    def load(self, artifact: Artifact, settings: LoadSettings) -> Session:
        check_gguf_file(artifact.path)
        return LlamaCppSession(artifact, settings)




class LlamaCppSession(Session):
    def __init__(self, artifact: Artifact, settings: LoadSettings) -> None:
        lib = self.lib = library()
        init_llama()
        opts = settings.options
        self.spec = artifact.spec
        self.repack = bool(opts.get("repack", False))
        self.device = settings.device
        mparams = lib.llama_model_default_params()
        self.offload_request = self._place(mparams, settings)
        mparams.use_extra_bufts = self.repack
        mparams.load_mode = lib.LLAMA_LOAD_MODE_MMAP if opts.get("mmap", True) else lib.LLAMA_LOAD_MODE_NONE
        self.ctx = None
        self.batch = None
        with capture_log() as load_log:
            self.model = lib.llama_model_load_from_file(str(artifact.path).encode(), mparams)
        if not self.model:
            raise BackendRuntimeError(f"llama.cpp could not load {artifact.path}: {log_tail()}")
        self.advice, self.advised_bytes = opts.get("advice"), None
        if self.advice:  # on the engine's own mapping of the file, in this process
            self.advised_bytes = advise(artifact.path, self.advice)
        try:
            n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
            if n_vocab != self.spec.vocab_size:
                raise BackendRuntimeError(f"llama.cpp sees {n_vocab} tokens, the spec says {self.spec.vocab_size}")
            cparams = lib.llama_context_default_params()
            self.n_ctx = max(256, settings.max_context)  # per sequence
            self.n_seq = settings.batch_size
            total_ctx = self.n_ctx * self.n_seq
            self.n_batch = int(opts.get("n_batch", max(512, min(total_ctx, 4096))))
            cparams.n_ctx = total_ctx  # a KV stream of n_ctx cells per sequence (kv_unified off)
            cparams.n_batch = self.n_batch
            cparams.n_ubatch = self.n_batch
            cparams.n_seq_max = self.n_seq
            self.threads = settings.threads or len(os.sched_getaffinity(0))
            cparams.n_threads = self.threads
            cparams.n_threads_batch = self.threads
            fa = opts.get("flash_attn", "auto")
            cparams.flash_attn_type = {"auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO, True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                       False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED}[fa]
            self.kv_types = (opts.get("type_k", "f16"), opts.get("type_v", "f16"))
            cparams.type_k, cparams.type_v = (_KV_TYPES[t] for t in self.kv_types)
            cparams.no_perf = False
            self.flash_attn = fa
            self.cparams = cparams
            with capture_log() as context_log:
                self.ctx = lib.llama_init_from_model(self.model, cparams)
            self.offload = None if os.environ.get("MOERUN_LLAMA_LOG") else dv.read_back(load_log + context_log)
            if not self.ctx:
                raise BackendRuntimeError(f"llama.cpp could not create a context: {log_tail()}")
            self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
            # numpy views of the batch arrays: a prefill fills them with three vector writes;
            # every token belongs to sequence 0, set once
            b, n = self.batch, self.n_batch
            self._tok = np.ctypeslib.as_array(b.token, shape=(n,))
            self._pos = np.ctypeslib.as_array(b.pos, shape=(n,))
            self._out = np.ctypeslib.as_array(b.logits, shape=(n,))
            np.ctypeslib.as_array(b.n_seq_id, shape=(n,))[:] = 1
            for i in range(n):
                b.seq_id[i][0] = 0
            self._seqs_dirty = False  # a batched step wrote other sequence ids
        except BaseException:
            self.close()
            raise
        self.vocab = n_vocab
        self._logit_bytes = 4 * n_vocab
        self.pos = 0
        self.kv_bytes_per_value = 4.0 if self.kv_types[0] == "f32" else 2.0

    def _place(self, mparams: Any, settings: LoadSettings) -> dict[str, Any]:
        """Devices, GPU layers and expert overrides into the model params. On a GPU device all
        layers are offloaded unless `n_gpu_layers` says otherwise; on the CPU `n_gpu_layers`
        (default 0) is passed as given, so a CPU-only build shows it offloaded nothing.
        `n_cpu_moe` keeps the experts of the first N layers in CPU memory."""
        opts = settings.options
        found = dv.registered_devices()
        gpu = self.device.split(":")[0] != "cpu"
        chosen = dv.select(self.device, found) if gpu else []
        if gpu and not chosen:
            present = dv.moerun_devices(found)
            note = dv.absent_notes(present, bool(self.lib.llama_supports_gpu_offload()), found).get(
                self.device.split(":")[0], f"devices here: {', '.join(d['name'] for d in found)}")
            raise UnsupportedError(f"llama.cpp has no {self.device} device: {note}")
        try:
            n_gpu = int(opts.get("n_gpu_layers", -1 if gpu else 0))
            n_cpu_moe = int(opts.get("n_cpu_moe", 0))
        except (TypeError, ValueError):
            raise ConfigError("llamacpp: n_gpu_layers and n_cpu_moe take whole numbers") from None
        mparams.n_gpu_layers = n_gpu
        if chosen:  # offload to these devices only (NULL-terminated ggml_backend_dev_t array)
            self._devices = (ctypes.c_void_p * (len(chosen) + 1))(*[d["_handle"] for d in chosen], None)
            mparams.devices = ctypes.cast(self._devices, ctypes.c_void_p)
        if n_cpu_moe:
            self._overrides, self._patterns = dv.expert_overrides(n_cpu_moe, self.spec.num_layers, found)
            mparams.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
        return {"device": self.device, "ggml_devices": [d["name"] for d in chosen] or ["CPU"],
                "n_gpu_layers": n_gpu, "n_cpu_moe": n_cpu_moe,
                "registered": dv.public(found)}

    # ------------------------------------------------------------------ running
    def _decode(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        n = check_step([ids], vocab=self.vocab, cached=self.pos, max_context=self.n_ctx)
        lib, b = self.lib, self.batch
        out = []
        for start in range(0, n, self.n_batch):
            chunk = ids[start : start + self.n_batch]
            m = len(chunk)
            last_chunk = start + m == n
            b.n_tokens = m
            self._tok[:m] = chunk
            self._pos[:m] = np.arange(self.pos, self.pos + m, dtype=np.int32)
            self._out[:m] = 1 if all_logits else 0
            if last_chunk:
                self._out[m - 1] = 1
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise BackendRuntimeError(f"llama_decode returned {rc}: {log_tail()}")
            self.pos += len(chunk)
            rows = range(len(chunk)) if all_logits else ([len(chunk) - 1] if last_chunk else [])
            for i in rows:
                row = np.empty(self.vocab, dtype=np.float32)
                ctypes.memmove(row.ctypes.data, lib.llama_get_logits_ith(self.ctx, i), self._logit_bytes)
                out.append(row)
        return np.stack(out)

    def prefill(self, token_ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        self._single_sequence()
        return self._decode([int(t) for t in token_ids], all_logits)

    def _single_sequence(self) -> None:
        if self._seqs_dirty:
            for i in range(self.n_batch):
                self.batch.seq_id[i][0] = 0
            self._seqs_dirty = False

    def _step_batch(self, rows: list[list[int]]) -> np.ndarray:
        """B sequences of n tokens each in one llama_batch (sequence i is seq_id i, all at
        positions pos..pos+n-1; chunked by whole positions where B*n exceeds n_batch);
        returns each sequence's last-position logits [B, vocab]."""
        n = check_step(rows, vocab=self.vocab, cached=self.pos, max_context=self.n_ctx, max_batch=self.n_seq)
        B = len(rows)
        lib, b = self.lib, self.batch
        per = max(1, self.n_batch // B)  # positions per chunk
        seq = b.seq_id
        self._seqs_dirty = True
        ids = np.asarray(rows, dtype=np.int32)
        out = np.empty((B, self.vocab), dtype=np.float32)
        for start in range(0, n, per):
            c = min(per, n - start)
            m = B * c
            b.n_tokens = m
            self._tok[:m] = ids[:, start : start + c].reshape(-1)
            self._pos[:m] = np.tile(np.arange(self.pos + start, self.pos + start + c, dtype=np.int32), B)
            last = start + c == n
            self._out[:m] = 0
            if last:
                self._out[c - 1 : m : c] = 1
            for i in range(m):
                seq[i][0] = i // c
            rc = lib.llama_decode(self.ctx, b)
            if rc != 0:
                raise BackendRuntimeError(f"llama_decode returned {rc}: {log_tail()}")
        for s_ in range(B):
            ctypes.memmove(out[s_].ctypes.data, lib.llama_get_logits_ith(self.ctx, s_ * c + c - 1), self._logit_bytes)
        self.pos += n
        return out

    def prefill_batch(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        return self._step_batch([[int(t) for t in p] for p in prompts])

    def decode_batch(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._step_batch([[int(t)] for t in token_ids])

    def decode(self, token_id: int) -> np.ndarray:
        """One token, on a lean path: per-call Python work is what moerun adds on top of
        llama.cpp's own time here (examples/benchmarks/bench_llamacpp_overhead.py)."""
        tok = int(token_id)
        if self._seqs_dirty:
            self._single_sequence()
        check_step([[tok]], vocab=self.vocab, cached=self.pos, max_context=self.n_ctx)
        b = self.batch
        b.n_tokens = 1
        self._tok[0] = tok
        self._pos[0] = self.pos
        self._out[0] = 1
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise BackendRuntimeError(f"llama_decode returned {rc}: {log_tail()}")
        self.pos += 1
        out = np.empty(self.vocab, dtype=np.float32)
        ctypes.memmove(out.ctypes.data, self.lib.llama_get_logits_ith(self.ctx, 0), self._logit_bytes)
        return out

    def reset(self) -> None:
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        lib.llama_perf_context_reset(self.ctx)
        self.pos = 0

    def synchronize(self) -> None:
        # Nothing to wait for: prefill() and decode() return only after reading the logits,
        # and llama_get_logits_ith waits for the computation (llama_context::synchronize).
        pass

    def breakdown(self, prompt: Sequence[int], follow: Sequence[int]) -> dict[str, Any]:
        """Cut timing through the scheduler's eval callback (``moerun.breakdown.cut_timing``),
        on a second context over the same weights: a recording step lists the graph's
        nodes and names (``ffn_moe_topk-3``, ``Qcur-0``, ...); each timed step then runs
        unobserved up to one category boundary and ends there. Node 0's interval (graph
        set-up included) counts as ``other``. Decode cuts run the same tokens at the same
        positions as the timed decode, then drop those positions from the KV cache; like the
        timed steps, each measured prefill follows a decode step and each decode run a prefill
        (llama.cpp rebuilds its graph when the batch shape changes)."""
        from .cut import cut_time

        return cut_time(self, prompt, follow)

    def observe_routing(self, prompt: Sequence[int], follow: Sequence[int]) -> np.ndarray | None:
        """The experts every ``ffn_moe_topk`` node selected, on a second context (route.py)."""
        if not self.spec.is_moe:
            return None
        from .route import observe

        return observe(self, prompt, follow)

    def decode_ops(self, prompt: Sequence[int]) -> dict[str, Any]:
        """The ggml graph nodes one decode step computes (cut.count_ops)."""
        from .cut import count_ops

        return count_ops(self, prompt)

    @contextlib.contextmanager
    def observed(self, callback: Any) -> Iterator[None]:
        """Steps inside run on a second context over the same weights whose eval callback is
        `callback` (cut timing's node list, routing observation); the session's own context is
        back afterwards, the second one freed, the cache reset."""
        ctx = self._context(callback)
        main_ctx, self.ctx = self.ctx, ctx
        try:
            yield
        finally:
            self.ctx = main_ctx
            self.lib.llama_free(ctx)
            self.reset()

    def _context(self, callback: Any) -> Any:
        """A second context over the same weights, with `callback` as its eval callback."""
        lib = self.lib
        cparams = lib.llama_context_default_params()
        ctypes.pointer(cparams)[0] = self.cparams
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        ctx = lib.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise BackendRuntimeError(f"llama.cpp could not create a profiling context: {log_tail()}")
        return ctx

    def describe(self) -> dict[str, Any]:
        lib = self.lib
        return {"repack": self.repack, "use_extra_bufts": self.repack, "threads": self.threads,
                "n_ctx": self.n_ctx, "n_batch": self.n_batch, "flash_attn": self.flash_attn,
                "type_k": self.kv_types[0], "type_v": self.kv_types[1],
                "model_size_bytes": lib.llama_model_size(self.model),
                "model_n_params": lib.llama_model_n_params(self.model),
                "moe_formulation": ("llama.cpp build_moe_ffn: stacked ffn_*_exps, mul_mat_id"
                                    if self.spec.is_moe else None),
                "placement": {**self.offload_request, "read_back": self.offload},
                **({"advice": self.advice, "advised_bytes": self.advised_bytes} if self.advice else {})}

    def engine_timings(self) -> dict[str, Any] | None:
        d = self.lib.llama_perf_context(self.ctx)
        return {"prompt_eval_ms": d.t_p_eval_ms, "prompt_tokens": d.n_p_eval,
                "eval_ms": d.t_eval_ms, "eval_tokens": d.n_eval}

    def close(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None
