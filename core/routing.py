"""Routing models: which experts the tokens of a workload choose, as a workload dimension.

A routing is requested (`--routing`), realised through the synthetic checkpoint's weights and
the workload's token ids (so every engine chooses the same experts for the same token), and
measured where an engine exposes its choices. docs/concepts.md, "Routing", says what each
model is; this module holds the models, their expectations, the plan planted in the weights,
the trace format and the measured metrics.

- ``random`` (the default, what moerun always did): random router weights choose; nothing is
  planted and nothing requested (measured: near-uniform popularity, no locality).
- ``uniform``: every token and layer chooses k distinct experts uniformly.
- ``zipf:A``: expert popularity falls as rank^-A (a random rank order per layer); an expert's
  inclusion probability k·p is capped at 1 (no expert is chosen twice by one token), the
  excess spread over the others in proportion (water-filling).
- ``sticky:P``: each of a token's experts is kept by the next token with probability P; the
  freed slots are filled uniformly from the experts not kept.
- ``trace:FILE``: the expert choices a real model made (`moerun routing record`), replayed.

How it is planted (`CodeLayout`): the last n·E dimensions of the hidden state carry a code,
E per block of layers: token t's embedding is `ALPHA` at the dimensions of the experts it
chooses and 0 at the others; every attention output and expert down-projection writes 0 to
those dimensions, so the residual stream carries the code unchanged to every layer; layer l's
router reads only its block (`BETA` at one dimension per expert). The chosen experts' logits
are then positive and all others exactly 0, on every engine and precision. Where the model has
more MoE layers than blocks fit in half of the hidden size, later layers reuse a block through
a fixed permutation of the experts (recorded as `shared_blocks`).
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import attrs
import numpy as np

from .errors import ConfigError

KINDS = ("random", "uniform", "zipf", "sticky", "trace")
STREAMS = 8  # the vocabulary is cut into this many token streams, one per batch sequence
ALPHA = 2.0  # the code's value in the embedding (exact in bf16 and fp16)
BETA = 3.0  # the router's weight on its code dimension
TRACE_FORMAT = "moerun-routing-trace/1"


@attrs.frozen
class Routing:
    """A requested routing: `kind`, its parameter (zipf's exponent, sticky's probability) or
    the trace file it replays."""

    kind: str = "random"
    param: float | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str | None) -> "Routing":
        """`uniform`, `zipf:1.0`, `sticky:0.8`, `trace:FILE`, `random`; a one-line
        ConfigError otherwise."""
        text = (text or "random").strip()
        kind, _, arg = text.partition(":")
        if kind not in KINDS:
            raise ConfigError(f"routing {text!r}: use one of random, uniform, zipf:ALPHA, sticky:P, trace:FILE")
        if kind in ("random", "uniform"):
            if arg:
                raise ConfigError(f"routing {kind} takes no parameter, got {text!r}")
            return cls(kind)
        if kind == "trace":
            if not arg:
                raise ConfigError("routing trace needs a file: trace:FILE")
            if not Path(arg).is_file():
                raise ConfigError(f"routing trace file {arg} does not exist")
            return cls(kind, path=str(Path(arg).resolve()))
        try:
            value = float(arg)
        except ValueError:
            raise ConfigError(f"routing {text!r}: {kind} needs a number, e.g. {kind}:{'1.0' if kind == 'zipf' else '0.8'}"
                              ) from None
        if kind == "zipf" and not (0 <= value <= 8 and math.isfinite(value)):
            raise ConfigError(f"routing {text!r}: the zipf exponent must be in [0, 8]")
        if kind == "sticky" and not 0 <= value < 1:
            raise ConfigError(f"routing {text!r}: the sticky probability must be in [0, 1)")
        return cls(kind, param=value)

    def __str__(self) -> str:
        if self.kind == "trace":
            return f"trace:{self.path}"
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    @property
    def planted(self) -> bool:
        return self.kind != "random"

    @property
    def label(self) -> str:
        """Short, for tables: the trace by file name."""
        return f"trace:{Path(self.path).name}" if self.kind == "trace" else str(self)

    def cache_key(self) -> str:
        """What the planted weights depend on (a trace by its content)."""
        if self.kind == "trace":
            return "trace-" + hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:12]
        return str(self).replace(":", "")


def routing_label(text: str | None) -> str:
    """A routing as tables show it (a trace by its file name), without reading the file."""
    text = text or "random"
    return f"trace:{Path(text[6:]).name}" if text.startswith("trace:") else text


def routing_of(value: "str | Routing | None") -> Routing:
    return value if isinstance(value, Routing) else Routing.parse(value)


# ------------------------------------------------------------------ the trace format
@attrs.frozen
class Trace:
    """Recorded expert choices: `experts` [tokens, MoE layers, k] (uint16), `starts` the row
    where each sequence begins, and what recorded them."""

    experts: np.ndarray
    starts: np.ndarray
    num_experts: int
    meta: dict[str, Any] = attrs.field(factory=dict)

    @property
    def layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    def sequences(self) -> list[np.ndarray]:
        ends = list(self.starts[1:]) + [len(self.experts)]
        return [self.experts[a:b] for a, b in zip(self.starts, ends) if b > a]

    def save(self, path: str | Path) -> Path:
        """An .npz (numpy's zip of arrays): `experts`, `starts` and `meta` (JSON text)."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        meta = {"format": TRACE_FORMAT, "num_experts": self.num_experts, "layers": self.layers,
                "top_k": self.top_k, **self.meta}
        with open(path, "wb") as f:
            np.savez_compressed(f, experts=self.experts.astype(np.uint16), starts=self.starts.astype(np.int64),
                                meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        try:
            with np.load(path, allow_pickle=False) as z:
                experts, starts = z["experts"], z["starts"]
                meta = json.loads(bytes(z["meta"]).decode())
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{path}: not a moerun routing trace ({exc})") from None
        if meta.get("format") != TRACE_FORMAT or experts.ndim != 3 or starts.ndim != 1:
            raise ConfigError(f"{path}: not a {TRACE_FORMAT} file")
        E = int(meta["num_experts"])
        if experts.size and int(experts.max()) >= E:
            raise ConfigError(f"{path}: an expert id is >= num_experts ({E})")
        return cls(experts=experts.astype(np.int64), starts=starts, num_experts=E,
                   meta={k: v for k, v in meta.items() if k not in ("format", "num_experts", "layers", "top_k")})


# ------------------------------------------------------------------ the models
def _cap(pi: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities summing to k with none above 1: the capped ones at 1, the rest
    rescaled in proportion (water-filling)."""
    pi = pi * (k / pi.sum())
    capped = np.zeros(len(pi), bool)
    while (pi > 1 + 1e-12).any():
        capped |= pi > 1
        free = ~capped
        pi = np.where(capped, 1.0, pi)
        pi[free] *= (k - capped.sum()) / pi[free].sum()
    return pi


@attrs.frozen
class Model:
    """A routing realised for one shape: per MoE layer the inclusion probabilities, and a
    sampler of sequences of choices."""

    routing: Routing
    layers: int
    num_experts: int
    top_k: int
    seed: int
    trace: Trace | None = None

    @classmethod
    def of(cls, routing: Routing, layers: int, num_experts: int, top_k: int, seed: int = 0) -> "Model":
        trace = None
        if routing.kind == "trace":
            trace = Trace.load(routing.path)
            if (trace.layers, trace.num_experts, trace.top_k) != (layers, num_experts, top_k):
                raise ConfigError(
                    f"routing trace {Path(routing.path).name} has {trace.layers} MoE layers x {trace.num_experts} "
                    f"experts, top-{trace.top_k}; the model has {layers} x {num_experts}, top-{top_k}")
            if len(trace.experts) < 2:
                raise ConfigError(f"routing trace {Path(routing.path).name} holds fewer than 2 tokens")
        return cls(routing, layers, num_experts, top_k, seed, trace)

    def inclusion(self) -> np.ndarray | None:
        """[layers, E]: the probability that a token chooses each expert (sums to k per layer);
        None for `random`, whose routing nobody requested."""
        L, E, k, kind = self.layers, self.num_experts, self.top_k, self.routing.kind
        if kind == "random":
            return None
        if kind in ("uniform", "sticky"):
            return np.full((L, E), k / E)
        if kind == "zipf":
            rng = np.random.default_rng([self.seed, 0x7A1F])
            out = np.empty((L, E))
            weights = np.arange(1, E + 1, dtype=float) ** -float(self.routing.param)
            for layer in range(L):
                out[layer, rng.permutation(E)] = _cap(weights, k)
            return out
        counts = expert_histogram([self.trace.experts], E)
        return counts / counts.sum(axis=1, keepdims=True) * k

    def expected_reuse(self) -> float | None:
        """The chance that an expert a token chose is chosen again by the next token."""
        pi, k, E = self.inclusion(), self.top_k, self.num_experts
        if pi is None:
            return None
        if self.routing.kind == "sticky":
            P = float(self.routing.param)
            # kept (P) or, dropped, drawn again among the experts the others did not keep
            others = np.arange(k)
            binom = np.array([math.comb(k - 1, j) * P**j * (1 - P) ** (k - 1 - j) for j in others])
            return P + (1 - P) * float((binom * (k - others) / (E - others)).sum())
        if self.routing.kind == "trace":
            return reuse(self.trace.sequences())["next_token"]
        return float((pi**2).sum(axis=1).mean() / k)

    def expected_union(self, batch: int) -> float | None:
        """Distinct experts per layer one decode step of `batch` independent sequences reads:
        sum over experts of 1 - (1 - pi)^B, averaged over layers (uniform: E·(1 − (1 − k/E)^B))."""
        pi = self.inclusion()
        if pi is None:
            return None
        return float((1.0 - (1.0 - pi) ** batch).sum(axis=1).mean())

    def miss_rate(self, resident: int) -> float | None:
        """The share of routed expert reads that miss when the `resident` most popular experts
        of each layer are held (the others read from slower memory)."""
        pi = self.inclusion()
        if pi is None:
            return None
        top = np.sort(pi, axis=1)[:, ::-1][:, :max(0, resident)].sum(axis=1)
        return float(1.0 - (top / self.top_k).mean())

    def sample(self, streams: int, length: int, salt: int = 0) -> np.ndarray:
        """[streams, length, layers, k] choices, each stream one sequence of the process (a
        trace: stretches of it, from evenly spaced offsets, or random ones for a `salt`)."""
        L, E, k = self.layers, self.num_experts, self.top_k
        out = np.empty((streams, length, L, k), dtype=np.int64)
        if self.routing.kind == "trace":
            rows = self.trace.experts
            draw = np.random.default_rng([self.seed, 0x7ACE, salt]) if salt else None
            for s in range(streams):  # each stream replays the trace from its own offset (a random one: a fresh sample)
                at = int(draw.integers(len(rows))) if draw is not None else (s * len(rows)) // streams
                out[s] = rows[(at + np.arange(length)) % len(rows)]
            return out
        pi = self.inclusion()
        rng = np.random.default_rng([self.seed, 0x5EED, salt])
        if self.routing.kind == "sticky":  # a chain along each stream, all streams and layers at once
            P = float(self.routing.param)
            prev = None
            for t in range(length):
                score = rng.random((streams, L, E))
                if prev is not None:  # kept experts first, then the others in random order
                    kept = rng.random((streams, L, k)) < P
                    np.put_along_axis(score, prev, np.where(kept, 2.0, np.take_along_axis(score, prev, 2)), 2)
                prev = np.argpartition(-score, k - 1, axis=2)[..., :k]
                out[:, t] = prev
            return out
        for layer in range(L):  # independent tokens: systematic sampling over a random order each
            n = streams * length
            order = np.argsort(rng.random((n, E)), axis=1)
            cum = np.cumsum(pi[layer][order], axis=1)
            cum *= k / cum[:, -1:]
            u = rng.random(n)[:, None] + np.arange(k)
            picks = np.minimum((cum[:, None, :] <= u[:, :, None]).sum(axis=2), E - 1)
            out[:, :, layer] = np.take_along_axis(order, picks, axis=1).reshape(streams, length, k)
        return out


# ------------------------------------------------------------------ planting
@attrs.frozen
class CodeLayout:
    """Where the routing code lives in the hidden state: `blocks` blocks of E dimensions at
    `base`; MoE layer l reads block l % blocks through the expert permutation `perm[l]`."""

    hidden: int
    layers: int
    num_experts: int
    blocks: int
    perm: np.ndarray  # [layers, E]: layer l's expert e reads dimension base + block·E + perm[l, e]

    @classmethod
    def of(cls, hidden: int, layers: int, num_experts: int, seed: int = 0) -> "CodeLayout":
        blocks = min(layers, (hidden // 2) // num_experts)
        if blocks < 1:
            raise ConfigError(f"a planted routing needs hidden_size >= 2 x num_experts "
                              f"({hidden} < 2 x {num_experts})")
        rng = np.random.default_rng([seed, 0xB10C])
        perm = np.stack([np.arange(num_experts) if l < blocks else rng.permutation(num_experts)
                         for l in range(layers)])
        return cls(hidden, layers, num_experts, blocks, perm)

    @property
    def base(self) -> int:
        return self.hidden - self.blocks * self.num_experts

    @property
    def dims(self) -> slice:
        return slice(self.base, self.hidden)

    def dim(self, layer: int, experts: np.ndarray) -> np.ndarray:
        return self.base + (layer % self.blocks) * self.num_experts + self.perm[layer, experts]

    def tie(self, plans: np.ndarray) -> np.ndarray:
        """Plans [..., layers, k] as the weights realise them: a layer that reuses a block
        chooses what the block's first layer chose, through its permutation."""
        out = plans.copy()
        inverse = np.argsort(self.perm, axis=1)
        for layer in range(self.blocks, self.layers):
            first = layer % self.blocks
            out[..., layer, :] = inverse[layer][self.perm[first][plans[..., first, :]]]
        return out


@attrs.frozen
class Plan:
    """A routing planted for one model: every token id's experts per MoE layer (`table`
    [vocab, layers, k]) and the token streams the workload's sequences walk."""

    model: Model
    layout: CodeLayout
    table: np.ndarray
    streams: np.ndarray  # [STREAMS, length] token ids

    def describe(self) -> dict[str, Any]:
        return {"routing": str(self.model.routing), "code_dims": self.layout.blocks * self.layout.num_experts,
                "shared_blocks": self.layout.layers > self.layout.blocks, "blocks": self.layout.blocks,
                "stream_length": int(self.streams.shape[1]), "streams": int(self.streams.shape[0])}


def token_streams(vocab: int, seed: int) -> np.ndarray:
    """[STREAMS, vocab // STREAMS] distinct token ids: a seeded permutation of the vocabulary
    (depends on nothing but the vocabulary size and seed, so a dense twin walks the same ids)."""
    n = max(1, vocab // STREAMS)
    perm = np.random.default_rng([seed, 0x57AE]).permutation(vocab)
    if vocab < STREAMS:
        return np.resize(perm, (STREAMS, 1))
    return perm[: STREAMS * n].reshape(STREAMS, n)


def stream_ids(vocab: int, seed: int, count: int, batch: int) -> list[list[int]]:
    """The workload's token ids under a planted routing: sequence b walks stream b % STREAMS
    from position 0 (later rounds of streams from half-way), wrapping at its end."""
    streams = token_streams(vocab, seed)
    n = streams.shape[1]
    out = []
    for b in range(batch):
        at = (b // STREAMS) * (n // 2)
        out.append(streams[b % STREAMS][(at + np.arange(count)) % n].tolist())
    return out


_PLANS: dict[tuple, Plan] = {}


def plan_for(spec: Any, routing: Routing, seed: int = 0) -> Plan:
    """The plan a planted routing puts into `spec`'s synthetic weights (memoised)."""
    key = (spec.fingerprint, routing.cache_key(), seed)
    if key not in _PLANS:
        L, E, k = spec.num_layers, spec.num_experts, spec.top_k
        model = Model.of(routing, L, E, k, seed)
        layout = CodeLayout.of(spec.hidden_size, L, E, seed)
        streams = token_streams(spec.vocab_size, seed)
        table = np.empty((spec.vocab_size, L, k), dtype=np.int64)
        table[streams.reshape(-1)] = model.sample(*streams.shape).reshape(-1, L, k)
        rest = np.setdiff1d(np.arange(spec.vocab_size), streams.reshape(-1))
        if len(rest):  # ids on no stream (the vocabulary's remainder): independent draws
            table[rest] = Model.of(Routing("uniform") if routing.kind == "sticky" else routing, L, E, k, seed
                                   ).sample(1, len(rest), salt=1)[0]
        _PLANS[key] = Plan(model, layout, layout.tie(table), streams)
    return _PLANS[key]


def plant(name: str, shape: tuple[int, ...], start: int, x: np.ndarray, plan: Plan) -> None:
    """Adjust one block of a synthetic tensor's flat float32 values (elements start.. of
    `name`) so that the model routes as `plan` says (module text)."""
    lay = plan.layout
    if name == "model.embed_tokens.weight":
        h = shape[1]
        idx = np.arange(start, start + len(x))
        x[idx % h >= lay.base] = 0.0
        r0, r1 = start // h, (start + len(x) - 1) // h + 1
        rows = np.arange(r0, r1)
        dims = np.concatenate([lay.dim(l, plan.table[r0:r1, l]) for l in range(lay.blocks)], axis=1)
        flat = (rows[:, None] * h + dims - start).reshape(-1)
        x[flat[(flat >= 0) & (flat < len(x))]] = ALPHA
        return
    if name.endswith(("self_attn.o_proj.weight", ".w2.weight", "down_proj.weight")):
        cols = shape[1]
        rows = np.arange(start, start + len(x)) // cols
        x[rows >= lay.base] = 0.0
        return
    if name.endswith(".gate.weight") and len(shape) == 2 and shape[0] == lay.num_experts:
        layer = int(name.split(".")[2])
        h = shape[1]
        idx = np.arange(start, start + len(x))
        rows, cols = idx // h, idx % h
        x[:] = 0.0
        x[cols == lay.dim(layer, rows)] = BETA


# ------------------------------------------------------------------ measured
def expert_histogram(sequences: Iterable[np.ndarray], num_experts: int) -> np.ndarray:
    """[layers, E] counts of choices over sequences of [tokens, layers, k]."""
    total = None
    for seq in sequences:
        seq = np.asarray(seq)
        counts = np.stack([np.bincount(seq[:, l].reshape(-1), minlength=num_experts) for l in range(seq.shape[1])])
        total = counts if total is None else total + counts
    return total


def reuse(sequences: Sequence[np.ndarray]) -> dict[str, Any]:
    """Locality: `next_token`, the share of choices whose expert the next token chooses again
    in the same layer; `mean_distance`, tokens until a chosen expert is chosen again (over the
    choices that recur within their sequence)."""
    again = pairs = 0
    dists: list[np.ndarray] = []
    for seq in sequences:
        seq = np.asarray(seq)
        T, L, k = seq.shape
        if T < 2:
            continue
        E = int(seq.max()) + 1
        hot = np.zeros((T, L, E), bool)
        np.put_along_axis(hot, seq, True, axis=2)
        again += int((hot[:-1] & hot[1:]).sum())
        pairs += (T - 1) * L * k
        t, layer, e = np.nonzero(hot)
        order = np.lexsort((t, e, layer))
        t, layer, e = t[order], layer[order], e[order]
        same = (layer[1:] == layer[:-1]) & (e[1:] == e[:-1])
        dists.append((t[1:] - t[:-1])[same])
    d = np.concatenate(dists) if dists else np.zeros(0)
    return {"next_token": again / pairs if pairs else None,
            "mean_distance": float(d.mean()) if len(d) else None, "recurrences": int(len(d))}


def distinct_per_step(group: Sequence[np.ndarray]) -> np.ndarray:
    """[steps, layers]: distinct experts each step reads when the sequences of `group`
    ([tokens, layers, k] each) decode together, step t of each (up to the shortest)."""
    T = min(len(s) for s in group)
    stacked = np.concatenate([np.asarray(s)[:T] for s in group], axis=2)  # [T, L, B·k]
    return np.array([[len(np.unique(stacked[t, l])) for l in range(stacked.shape[1])] for t in range(T)], dtype=float)


def union_per_step(sequences: Sequence[np.ndarray], batch: int) -> float | None:
    """Distinct experts per layer and step when `batch` of the sequences decode together
    (consecutive groups of them), averaged."""
    groups = [sequences[i:i + batch] for i in range(0, len(sequences) - batch + 1, batch)]
    vals = [distinct_per_step(group).reshape(-1) for group in groups]
    return float(np.concatenate(vals).mean()) if vals else None


def entropy_bits(counts: np.ndarray) -> np.ndarray:
    p = counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=-1)


def measure(sequences: Sequence[np.ndarray], model: Model, *, source: str,
            batches: Sequence[int] = (1, 2, 4, 8), decode_from: int = 0) -> dict[str, Any]:
    """What a set of observed sequences ([tokens, layers, k] each) shows, beside what the
    requested routing expects: per-layer histogram, its total variation distance from the
    requested shares (and the distance a fresh sample of the model of the same size shows:
    the floor sampling alone gives), entropy, reuse (the mean recurrence distance beside the
    fresh sample's), and the distinct experts per decode step at each batch size (over the
    tokens from `decode_from` on)."""
    E, k = model.num_experts, model.top_k
    counts = expert_histogram(sequences, E)
    share = counts / counts.sum(axis=1, keepdims=True)
    pi = model.inclusion()
    routed = int(counts.sum() // k)
    out: dict[str, Any] = {
        "routing": str(model.routing), "source": source, "routed_token_layers": routed,
        "histogram": counts.tolist(), "entropy_bits": entropy_bits(counts).tolist(),
        "max_entropy_bits": math.log2(E), "load_imbalance": float((share.max(axis=1) * E).mean()),
        "reuse": reuse(sequences),
    }
    decode = [np.asarray(s)[decode_from:] for s in sequences]
    out["experts_per_step"] = {str(b): {"measured": union_per_step(decode, b), "expected": model.expected_union(b),
                                        "uniform": E * (1 - (1 - k / E) ** b)}
                               for b in batches if b <= len(sequences)}
    if pi is None:
        uniform = np.full(E, 1.0 / E)
        out["tv_from_uniform"] = (0.5 * np.abs(share - uniform).sum(axis=1)).tolist()
        return out
    want = pi / k
    out["requested_share"] = want.tolist()
    out["requested_entropy_bits"] = entropy_bits(want).tolist()
    out["tv"] = (0.5 * np.abs(share - want).sum(axis=1)).tolist()
    fresh = model.sample(len(sequences), max(len(s) for s in sequences), salt=99)
    fresh_counts = expert_histogram([fresh[i, :len(s)] for i, s in enumerate(sequences)], E)
    out["tv_sampling_floor"] = (0.5 * np.abs(fresh_counts / fresh_counts.sum(axis=1, keepdims=True) - want
                                             ).sum(axis=1)).tolist()
    out["expected_reuse_next_token"] = model.expected_reuse()
    # the recurrence distance depends on the sequences' lengths: its expectation is the fresh sample's
    out["expected_mean_distance"] = reuse([fresh[i, :len(s)] for i, s in enumerate(sequences)])["mean_distance"]
    return out
