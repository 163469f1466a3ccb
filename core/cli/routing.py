"""`moerun routing record` (a real MoE checkpoint's expert choices over real text, as a
trace) and `moerun routing show` (what a trace, or a routing model, looks like). A trace
replays with `--routing trace:FILE` on synthetic weights of the same shape
(docs/concepts.md, "Routing")."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError


def _tokens(args: argparse.Namespace, folder: Path, vocab: int) -> tuple[list[list[int]], dict[str, Any]]:
    """The sequences to run: token ids from --token-ids, else the prompt file's paragraphs
    through the checkpoint's tokenizer.json (the `tokenizers` package)."""
    if args.token_ids:
        try:
            seqs = [[int(t) for t in line.split()] for line in Path(args.token_ids).read_text().splitlines()
                    if line.strip()]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--token-ids {args.token_ids}: whitespace-separated ids, one sequence a line ({exc})"
                              ) from None
        source = {"token_ids": Path(args.token_ids).name}
    else:
        if not args.prompt_file:
            raise ConfigError("routing record needs --prompt-file F (text) or --token-ids F")
        try:
            text = Path(args.prompt_file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read --prompt-file {args.prompt_file}: {exc.strerror}") from None
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"{folder} has no tokenizer.json: give --token-ids F (ids the model's tokenizer made)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError("reading tokenizer.json needs the tokenizers package: pip install 'moerun[routing]'"
                              ) from None
        tokenizer = Tokenizer.from_file(str(tok_file))
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        seqs = [tokenizer.encode(p).ids for p in paragraphs]
        source = {"prompt_file": Path(args.prompt_file).name,
                  "prompt_sha256": hashlib.sha256(text.encode()).hexdigest()[:16], "tokenizer": "tokenizer.json"}
    seqs = [s[: args.max_tokens] for s in seqs if s]
    if not seqs:
        raise ConfigError("no tokens to run (an empty prompt file?)")
    bad = sorted({t for s in seqs for t in s if not 0 <= t < vocab})
    if bad:
        raise ConfigError(f"token id {bad[0]} is outside the model's vocabulary ({vocab})")
    return seqs, source


def cmd_record(plugins: Any, args: argparse.Namespace) -> int:
    from ..backend import LoadSettings
    from ..cache import Cache
    from ..checkpoint import Checkpoint
    from ..routing import Model, Routing, Trace, measure

    folder = Path(args.model)
    if not folder.is_dir():
        raise ConfigError(f"routing record reads a checkpoint folder (config.json + safetensors); {folder} is not one")
    ckpt = Checkpoint.open(folder)
    spec = ckpt.spec
    if not spec.is_moe:
        raise ConfigError(f"{folder} is a dense model: it routes nothing")
    seqs, source = _tokens(args, folder, spec.vocab_size)
    backend = plugins.backends.get("torch")()
    av = backend.availability()
    if not av.available:
        raise ConfigError(f"routing record runs the torch backend, which is not available here: {av.reason}")
    precision = args.precision or backend.capabilities.default_precision
    cache = Cache()
    artifact = backend.prepare(ckpt, precision, cache)
    session = backend.load(artifact, LoadSettings(max_context=max(len(s) for s in seqs) + 1, threads=args.threads))
    try:
        observed = [session.observe_routing(s, []) for s in seqs]
    finally:
        session.close()
    starts = np.cumsum([0] + [len(o) for o in observed[:-1]])
    trace = Trace(experts=np.concatenate(observed), starts=starts, num_experts=spec.num_experts,
                  meta={"model": folder.name, "family": spec.family, "recorded_by": "moerun routing record",
                        "backend": "torch", "precision": precision, "sequences": len(seqs), **source})
    path = trace.save(args.output)
    summary = measure(trace.sequences(), Model.of(Routing("trace", path=str(path)), trace.layers, spec.num_experts,
                                                  spec.top_k), source="recorded")
    print(f"moerun: {len(trace.experts):,} tokens x {trace.layers} MoE layers x top-{trace.top_k} of "
          f"{spec.num_experts} experts from {len(seqs)} sequences -> {path} ({path.stat().st_size:,} bytes)")
    _print_summary(summary, spec.num_experts)
    return 0


def _print_summary(m: dict[str, Any], experts: int) -> None:
    ent = np.asarray(m["entropy_bits"])
    share = np.asarray(m["histogram"], float)
    share /= share.sum(axis=1, keepdims=True)
    print(f"  entropy per layer {ent.min():.2f}-{ent.max():.2f} bits of {m['max_entropy_bits']:.2f}; "
          f"most popular expert's share {share.max(axis=1).mean():.1%} on average (uniform {1 / experts:.1%})")
    r = m["reuse"]
    if r["next_token"] is not None:
        print(f"  the next token reuses {r['next_token']:.1%} of a token's experts"
              + (f"; an expert recurs after {r['mean_distance']:.1f} tokens on average" if r["mean_distance"] else ""))
    union = "  ".join(f"B={b}: {v['measured']:.1f} (uniform {v['uniform']:.1f})"
                      for b, v in m["experts_per_step"].items() if v.get("measured") is not None)
    if union:
        print(f"  distinct experts per layer and step: {union}")


def cmd_show(plugins: Any, args: argparse.Namespace) -> int:
    """A trace file's summary, or a routing model sampled for a preset's shape."""
    from ..routing import STREAMS, Model, Routing, Trace, measure

    what = args.what
    if Path(what).is_file():
        trace = Trace.load(what)
        model = Model.of(Routing("trace", path=str(Path(what).resolve())), trace.layers, trace.num_experts,
                         trace.top_k)
        summary = measure(trace.sequences(), model, source="trace")
        if args.json:
            print(json.dumps({"meta": trace.meta, "tokens": len(trace.experts), **summary}, indent=2))
            return 0
        print(f"{what}: {len(trace.experts):,} tokens in {len(trace.starts)} sequences, {trace.layers} MoE layers, "
              f"top-{trace.top_k} of {trace.num_experts} experts; {json.dumps(trace.meta, sort_keys=True)}")
        _print_summary(summary, trace.num_experts)
        return 0
    if not args.model:
        raise ConfigError(f"{what} is no trace file; to sample a routing model give -m PRESET")
    spec = plugins.models.resolve(args.model)
    if not spec.is_moe:
        raise ConfigError(f"{args.model} is a dense model: it routes nothing")
    model = Model.of(Routing.parse(what), spec.num_layers, spec.num_experts, spec.top_k)
    if not model.routing.planted:
        raise ConfigError("random routing is whatever random routers do: measure it (moerun --routing random)")
    sample = model.sample(STREAMS, args.tokens)
    summary = measure(list(sample), model, source="the model, sampled")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{model.routing} on {spec.name} ({spec.num_layers} MoE layers, top-{spec.top_k} of {spec.num_experts}), "
          f"{STREAMS} sequences of {args.tokens} tokens sampled:")
    _print_summary(summary, spec.num_experts)
    print(f"  expected: next-token reuse {model.expected_reuse():.1%}; "
          + "  ".join(f"B={b}: {model.expected_union(b):.1f}" for b in (1, 2, 4, 8)))
    return 0


def cmd_routing(plugins: Any, args: argparse.Namespace) -> int:
    if args.routing_command == "record":
        return cmd_record(plugins, args)
    if args.routing_command == "show":
        return cmd_show(plugins, args)
    raise ConfigError("moerun routing takes a command: record or show (see 'moerun routing --help')")
