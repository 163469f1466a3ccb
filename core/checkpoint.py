"""Checkpoints in Hugging Face layout: config.json + safetensors with HF tensor names.

A synthetic checkpoint and a real local one are the same thing to every backend. The
safetensors format is small enough to write and read here directly, which lets synthetic
weights stream to disk (peak memory near one block, never the whole model) and lets the
core read bf16 without an engine.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import attrs
import numpy as np

from .errors import CheckpointError, ConfigError
from .routing import Plan, Routing, plan_for, plant, routing_of
from .spec import ModelSpec

if TYPE_CHECKING:  # pragma: no cover
    from .cache import Cache

_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2)}
_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_BLOCK = 1 << 22  # elements per RNG block: output bytes never depend on memory limits
SHARD_BYTES = 2 << 30


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even)."""
    u = x.astype(np.float32, copy=False).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _bf16_bits_to_f32(u: np.ndarray) -> np.ndarray:
    return (u.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- synthetic init
# the fixed-route MoE's scale for the weights its constant dimension must outweigh (fix_route)
FIX_EPS = np.float32(0.01)


def init_std(name: str, shape: tuple[int, ...], spec: ModelSpec) -> tuple[str, float]:
    """How a synthetic tensor is drawn: ("normal", std) or ("ones+normal", std).

    Scaled so activations keep unit scale through every layer (std = 1/sqrt(fan_in)),
    the logits have a spread of a few units (clear top-1 margins for parity checks) and
    router logits are O(1) (routing neither uniform nor collapsed). Norm weights are
    1 + noise so that a backend that ignores them fails parity.
    """
    if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
        return "ones+normal", 0.1
    if name.endswith(".bias"):
        return "normal", 0.1
    if name == "model.embed_tokens.weight":
        return "normal", 1.0
    if name == "lm_head.weight":
        return "normal", 3.0 / np.sqrt(shape[1])
    return "normal", 1.0 / np.sqrt(shape[-1])


def _router_row_scale(spec: ModelSpec, skew: float) -> np.ndarray:
    e = np.arange(spec.num_experts, dtype=np.float64)
    return np.exp(-skew * e / max(1, spec.num_experts - 1)).astype(np.float32)


def synthetic_tensor_blocks(
    name: str, shape: tuple[int, ...], spec: ModelSpec, seed: int, router_skew: float = 0.0,
    plan: "Plan | None" = None,
) -> Iterator[np.ndarray]:
    """The tensor's float32 values, flat, in blocks of at most `_BLOCK` elements.

    Each block has its own generator keyed by (seed, crc32(name), block index), so the
    values depend on nothing but those (and a planted routing's `plan`, which then sets the
    embedding's code, the routers and zeroes what would overwrite the code: moerun.routing).
    A fixed-route spec's weights route every token to experts 0..k-1 (`fix_route`).
    """
    kind, std = init_std(name, shape, spec)
    n = int(np.prod(shape))
    key = zlib.crc32(name.encode())
    is_router = name.endswith(".gate.weight") and spec.is_moe and router_skew > 0
    row_scale = _router_row_scale(spec, router_skew) if is_router else None
    for b, start in enumerate(range(0, n, _BLOCK)):
        count = min(_BLOCK, n - start)
        rng = np.random.default_rng([seed, key, b])
        x = rng.standard_normal(count, dtype=np.float32)
        x *= np.float32(std)
        if kind == "ones+normal":
            x += np.float32(1.0)
        if row_scale is not None:
            rows = (np.arange(start, start + count) // shape[1])
            x *= row_scale[rows]
        if plan is not None:
            plant(name, shape, start, x, plan)
        if spec.router == "fixed":
            fix_route(name, shape, start, x, spec)
        yield x


def fix_route(name: str, shape: tuple[int, ...], start: int, x: np.ndarray, spec: ModelSpec) -> None:
    """The fixed-route MoE's weights (`ModelSpec.fixed_route_twin`), one block at a time: the
    last hidden dimension carries a constant (ALPHA in every token's embedding; the attention
    and FFN output rows that write into it scaled by FIX_EPS), and each router reads that
    dimension with weight BETA x (k - j - 1/2) / k for expert j, its other weights scaled by
    FIX_EPS. Every token's logits rank the experts in the same order on every engine, experts
    0..k-1 first and apart from the rest by BETA x ALPHA / k over the hidden state's RMS: no
    tie for a top-k to break. No weight is made zero: ONNX Runtime's contrib graph decoded a
    fifth slower with zero router weights (docs/concepts.md, "The ablation ladder")."""
    from .routing import ALPHA, BETA

    h, c = spec.hidden_size, spec.hidden_size - 1
    idx = np.arange(start, start + len(x))
    if name == "model.embed_tokens.weight":
        x[idx % h == c] = ALPHA
    elif name.endswith(("self_attn.o_proj.weight", ".w2.weight", "down_proj.weight")):
        x[idx // shape[1] == c] *= FIX_EPS
    elif name.endswith(".gate.weight") and len(shape) == 2 and shape[0] == spec.num_experts:
        rows, cols = idx // h, idx % h
        x *= FIX_EPS
        on = cols == c
        x[on] += np.float32(BETA) * (spec.top_k - rows[on] - 0.5) / spec.top_k


# ---------------------------------------------------------------- safetensors I/O
def _header(entries: list[tuple[str, tuple[int, ...]]], dtype: str) -> tuple[bytes, int]:
    size = _DTYPES[dtype][1]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = int(np.prod(shape)) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offset


def _shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, limit: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in entries:
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_synthetic(
    spec: ModelSpec,
    path: str | os.PathLike,
    *,
    seed: int = 0,
    dtype: str = "float32",
    router_skew: float = 0.0,
    routing: "str | Routing | None" = None,
    shard_bytes: int = SHARD_BYTES,
    progress: Callable[[int, int], None] | None = None,
) -> "Checkpoint":
    """Write a deterministic synthetic checkpoint of `spec` to the new folder `path`.

    `progress(bytes_written, total_bytes)` is called as tensor data is written. A planted
    `routing` (moerun.routing; an MoE only) makes every token id choose the experts its plan
    says in every layer.

    Same (spec, seed, dtype, router_skew, routing) -> byte-identical files. Written to a
    temporary sibling folder first and renamed, so an interrupted write leaves nothing
    half-made.
    """
    if dtype not in _NAMES:
        raise ConfigError(f"checkpoint dtype must be one of {', '.join(_NAMES)}, got {dtype!r}")
    if router_skew < 0:
        raise ConfigError(f"router_skew must be >= 0, got {router_skew}")
    routing = routing_of(routing)
    # a planted routing sets the routers: not those of the ladder's fixed route or split twin
    plan = plan_for(spec, routing, seed) if routing.planted and spec.is_moe and spec.router == "learned" else None
    if plan is not None and router_skew:
        raise ConfigError(f"router skew and routing {routing} both set the routers: use one (zipf:A for skew)")
    path = Path(path)
    if path.exists():
        raise CheckpointError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        st = _NAMES[dtype]
        entries = list(spec.tensor_shapes())
        shards = _shards(entries, _DTYPES[st][1], shard_bytes)
        files = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        weight_map, total, done = {}, 0, 0
        grand_total = sum(int(np.prod(shape)) for _, shape in entries) * _DTYPES[st][1]
        for fname, shard in zip(files, shards):
            head, nbytes = _header(shard, st)
            total += nbytes
            with open(tmp / fname, "wb") as f:
                f.write(head)
                for name, shape in shard:
                    weight_map[name] = fname
                    for block in synthetic_tensor_blocks(name, shape, spec, seed, router_skew, plan):
                        if st == "BF16":
                            block = to_bf16_bits(block)
                        elif st == "F16":
                            block = block.astype(np.float16)
                        f.write(block.tobytes())
                        done += block.nbytes
                        if progress:
                            progress(done, grand_total)
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        config = spec.to_hf_config()
        config["torch_dtype"] = dtype
        config["moerun_synthetic"] = {"seed": seed, "router_skew": router_skew}
        if plan is not None:
            config["moerun_synthetic"]["routing"] = plan.describe()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Checkpoint.open(path)


class _SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
                (hlen,) = struct.unpack("<Q", raw)
                if hlen > min(size - 8, 100 << 20):
                    raise CheckpointError(f"{path}: corrupt safetensors header (length {hlen}, file {size} bytes)")
                header = json.loads(f.read(hlen))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file: {exc}") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + hlen
        self.tensors: dict[str, dict] = header
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self.data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensors need {self.data_start + end} bytes, file has {size}"
            )
        self._mm: mmap.mmap | None = None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        t = self.tensors[name]
        if t["dtype"] not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {t['dtype']}")
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        np_dtype, size = _DTYPES[t["dtype"]]
        start, end = t["data_offsets"]
        shape = list(t["shape"])
        if (end - start) // size != int(np.prod(shape)):
            raise CheckpointError(f"{self.path}: tensor {name}: offsets do not match shape {t['shape']}")
        if rows is not None:  # rows [lo, hi) of the first axis: a contiguous stretch of the file
            lo, hi = rows
            if not shape or not 0 <= lo <= hi <= shape[0]:
                raise CheckpointError(f"{self.path}: tensor {name} {t['shape']} has no rows {lo}:{hi}")
            row = int(np.prod(shape[1:])) * size
            start, end, shape[0] = start + lo * row, start + hi * row, hi - lo
        count = (end - start) // size
        raw = np.frombuffer(self._mm, dtype=np_dtype, count=count, offset=self.data_start + start)
        if t["dtype"] == "BF16":
            out = _bf16_bits_to_f32(raw)
        else:
            out = raw.astype(np.float32)  # a copy: nothing returned points into the map
        del raw
        self._drop(self.data_start + start, end - start)
        return out.reshape(shape)

    def _drop(self, offset: int, length: int) -> None:
        """Unmap the pages a read touched (MADV_DONTNEED; they stay in the page cache): the
        caller holds its own float32 copy, and a mapped page would count in this process's
        RSS a second time, so reading a 13.8 GB checkpoint tensor by tensor would end up
        with all of it resident on top of what the engine built from it."""
        advise = getattr(self._mm, "madvise", None)
        flag = getattr(mmap, "MADV_DONTNEED", None)
        if advise is None or flag is None or length <= 0:
            return
        page = mmap.PAGESIZE
        lo, hi = (offset // page) * page, min(len(self._mm), -(-(offset + length) // page) * page)
        if hi > lo:
            advise(flag, lo, hi - lo)


@attrs.define
class Checkpoint:
    """A checkpoint folder: its spec (from config.json) and lazily opened tensor files."""

    path: Path
    spec: ModelSpec
    weight_map: dict[str, str]
    _files: dict[str, _SafetensorsFile] = attrs.field(factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, *, name: str | None = None) -> "Checkpoint":
        """Open a HF-layout folder; CheckpointError/ConfigError if it is not a usable one."""
        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint folder)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{cfg_path}: invalid JSON: {exc}") from None
        spec = ModelSpec.from_hf_config(cfg, name=name)
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: invalid index: {exc}") from None
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{path}: no .safetensors files")
            weight_map = {}
            for fname in files:
                for tname in _SafetensorsFile(path / fname).tensors:
                    weight_map[tname] = fname
        ckpt = cls(path=path, spec=spec, weight_map=weight_map)
        ckpt.validate()
        return ckpt

    def validate(self) -> None:
        """Every tensor the spec needs is present with its shape, and files are whole."""
        for name, shape in self.spec.tensor_shapes():
            if name not in self.weight_map:
                raise CheckpointError(f"{self.path}: missing tensor {name}")
            got = tuple(self._file(name).tensors[name]["shape"])
            if got != shape:
                raise CheckpointError(f"{self.path}: tensor {name} has shape {got}, config.json implies {shape}")

    def _file(self, name: str) -> _SafetensorsFile:
        fname = self.weight_map.get(name)
        if fname is None:
            raise CheckpointError(f"{self.path}: no tensor {name}")
        if fname not in self._files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"{self.path}: missing file {fname}")
            self._files[fname] = _SafetensorsFile(fpath)
        return self._files[fname]

    def release(self) -> None:
        """Drop the memory maps of the weight files (reopened on the next read): their pages
        stop counting as this process's memory once no array read from them is alive."""
        self._files.clear()

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """One tensor as a float32 array (bf16/fp16 converted); with `rows` (lo, hi) only those
        rows of its first axis, read without the rest (a 256 k-token embedding in parts)."""
        return self._file(name).read(name, rows)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file header (nothing read)."""
        return tuple(self._file(name).tensors[name]["shape"])

    def files(self) -> list[Path]:
        return sorted({self.path / f for f in self.weight_map.values()}) + [self.path / "config.json"]

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files())

    def content_hash(self) -> str:
        """sha256 over config.json and the tensor files (memoised by path, size and mtime)."""
        stat_key = hashlib.sha256()
        for p in self.files():
            st = p.stat()
            stat_key.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        memo = self.path / ".moerun-content-hash"
        try:
            saved_key, saved = memo.read_text().split()
            if saved_key == stat_key.hexdigest():
                return saved
        except (OSError, ValueError):
            pass
        h = hashlib.sha256()
        for p in self.files():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        digest = h.hexdigest()[:32]
        try:
            memo.write_text(f"{stat_key.hexdigest()} {digest}\n")
        except OSError:
            pass
        return digest


def synthetic_checkpoint(
    spec: ModelSpec,
    cache: "Cache",
    *,
    seed: int = 0,
    dtype: str = "float32",
    router_skew: float = 0.0,
    routing: "str | Routing | None" = None,
    progress: Callable[[int, int], None] | None = None,
) -> Checkpoint:
    """The synthetic checkpoint of (spec, seed, dtype, skew, routing) in the cache, written
    if absent. A dense model's weights do not depend on the routing (one checkpoint)."""
    routing = routing_of(routing)
    key = f"{spec.fingerprint}-s{seed}-{dtype}" + (f"-skew{router_skew:g}" if router_skew else "")
    if routing.planted and spec.is_moe:
        key += f"-{routing.cache_key()}"
    path = cache.root / "checkpoints" / key
    if path.is_dir():
        return Checkpoint.open(path, name=spec.name)
    try:
        write_synthetic(spec, path, seed=seed, dtype=dtype, router_skew=router_skew, routing=routing,
                        progress=progress)
    except CheckpointError:
        if not path.is_dir():  # another process finished it first: fine
            raise
    return Checkpoint.open(path, name=spec.name)
