"""The reference decoder in NumPy: a backend written only against moerun.toolkit, the surface
moerun publishes for engine plugins."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from moerun.toolkit import (
    Artifact,
    Availability,
    Backend,
    Capabilities,
    Checkpoint,
    LoadSettings,
    ModelSpec,
    Session,
    UnsupportedError,
    check_step,
)


class NumpyBackend(Backend):
    name = "numpy"
    description = "example third-party backend: the reference model in plain NumPy (fp32)"
    capabilities = Capabilities(precisions=("fp32",), default_precision="fp32", supports_moe=True,
                                devices=("cpu",), in_default_study=False)
    install_hint = "pip install -e examples/moerun-example-backend"

    def availability(self) -> Availability:
        return Availability(available=True, version=np.__version__, devices=("cpu",))

    def prepare(self, checkpoint, precision, cache) -> Artifact:
        # NumPy reads the HF checkpoint as it is: nothing to convert.
        return Artifact(backend=self.name, precision=precision, spec=checkpoint.spec, path=checkpoint.path,
                        size_bytes=checkpoint.size_bytes, meta={"format": "hf-safetensors"})

    def load(self, artifact: Artifact, settings: LoadSettings) -> Session:
        if settings.device != "cpu":
            raise UnsupportedError("the NumPy backend runs on the CPU only")
        return NumpySession(Checkpoint.open(artifact.path, name=artifact.spec.name), settings.max_context)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


class NumpySession(Session):
    def __init__(self, ckpt: Checkpoint, max_context: int) -> None:
        self.spec: ModelSpec = ckpt.spec
        self.w = {name: ckpt.read(name) for name, _ in self.spec.tensor_shapes()}
        s = self.spec
        half = s.head_dim // 2
        inv = 1.0 / s.rope_theta ** (np.arange(half) / half)
        ang = np.outer(np.arange(max_context), inv)
        self.cos = np.cos(np.concatenate([ang, ang], -1)).astype(np.float32)
        self.sin = np.sin(np.concatenate([ang, ang], -1)).astype(np.float32)
        self.k = np.zeros((s.num_layers, s.num_kv_heads, max_context, s.head_dim), np.float32)
        self.v = np.zeros_like(self.k)
        self.max_context = max_context
        self.pos = 0

    # -- pieces -------------------------------------------------------------
    def _rope(self, x: np.ndarray, pos: int) -> np.ndarray:  # x [heads, T, hd]
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        t = slice(pos, pos + x.shape[1])
        return x * self.cos[t] + rot * self.sin[t]

    def _attention(self, i: int, x: np.ndarray, pos: int) -> np.ndarray:
        s, w, p = self.spec, self.w, f"model.layers.{i}.self_attn."
        T = x.shape[0]
        q, k, v = (x @ w[p + f"{n}_proj.weight"].T for n in "qkv")
        if s.attention_bias:
            q, k, v = q + w[p + "q_proj.bias"], k + w[p + "k_proj.bias"], v + w[p + "v_proj.bias"]
        if s.qk_norm == "full":
            q, k = _rms(q, w[p + "q_norm.weight"], s.rms_norm_eps), _rms(k, w[p + "k_norm.weight"], s.rms_norm_eps)
        q = q.reshape(T, s.num_heads, s.head_dim).transpose(1, 0, 2)
        k = k.reshape(T, s.num_kv_heads, s.head_dim).transpose(1, 0, 2)
        v = v.reshape(T, s.num_kv_heads, s.head_dim).transpose(1, 0, 2)
        if s.qk_norm == "head":
            q, k = _rms(q, w[p + "q_norm.weight"], s.rms_norm_eps), _rms(k, w[p + "k_norm.weight"], s.rms_norm_eps)
        q, k = self._rope(q, pos), self._rope(k, pos)
        self.k[i, :, pos : pos + T], self.v[i, :, pos : pos + T] = k, v
        keys = np.repeat(self.k[i, :, : pos + T], s.num_heads // s.num_kv_heads, axis=0)
        vals = np.repeat(self.v[i, :, : pos + T], s.num_heads // s.num_kv_heads, axis=0)
        scores = q @ keys.transpose(0, 2, 1) / np.sqrt(s.head_dim)
        causal = np.arange(pos + T)[None, :] > (pos + np.arange(T))[:, None]
        scores = np.where(causal, -np.inf, scores)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        out = (scores / scores.sum(-1, keepdims=True)) @ vals
        return out.transpose(1, 0, 2).reshape(T, s.q_dim) @ w[p + "o_proj.weight"].T

    def _mlp(self, x: np.ndarray, gate: str, up: str, down: str) -> np.ndarray:
        w = self.w
        return (_silu(x @ w[gate].T) * (x @ w[up].T)) @ w[down].T

    def _ffn(self, i: int, x: np.ndarray) -> np.ndarray:
        s, w = self.spec, self.w
        if not s.is_moe:
            m = f"model.layers.{i}.mlp."
            return self._mlp(x, m + "gate_proj.weight", m + "up_proj.weight", m + "down_proj.weight")
        m = f"model.layers.{i}.block_sparse_moe." if s.family == "mixtral" else f"model.layers.{i}.mlp."
        names = (("w1", "w3", "w2") if s.family == "mixtral" else ("gate_proj", "up_proj", "down_proj"))
        logits = x @ w[m + "gate.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, axis=-1, kind="stable")[:, : s.top_k]
        weights = np.take_along_axis(probs, top, -1)
        if s.renormalize_topk:
            weights /= weights.sum(-1, keepdims=True)
        out = np.zeros_like(x)
        for t in range(x.shape[0]):  # only each token's own experts
            for e, g in zip(top[t], weights[t]):
                out[t] += g * self._mlp(x[t : t + 1], *(f"{m}experts.{e}.{n}.weight" for n in names))[0]
        if s.shared_expert_intermediate_size:
            sh = m + "shared_expert."
            gate = 1.0 / (1.0 + np.exp(-(x @ w[m + "shared_expert_gate.weight"].T)))
            out += gate * self._mlp(x, sh + "gate_proj.weight", sh + "up_proj.weight", sh + "down_proj.weight")
        return out

    # -- Session ------------------------------------------------------------
    def _forward(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        s, w = self.spec, self.w
        ids = [int(t) for t in ids]
        check_step([ids], vocab=s.vocab_size, cached=self.pos, max_context=self.max_context)
        x = w["model.embed_tokens.weight"][ids]
        for i in range(s.num_layers):
            p = f"model.layers.{i}."
            x = x + self._attention(i, _rms(x, w[p + "input_layernorm.weight"], s.rms_norm_eps), self.pos)
            x = x + self._ffn(i, _rms(x, w[p + "post_attention_layernorm.weight"], s.rms_norm_eps))
        self.pos += len(ids)
        x = _rms(x if all_logits else x[-1:], w["model.norm.weight"], s.rms_norm_eps)
        head = w["model.embed_tokens.weight"] if s.tie_word_embeddings else w["lm_head.weight"]
        return (x @ head.T).astype(np.float32)

    def prefill(self, token_ids, *, all_logits=False):
        return self._forward(token_ids, all_logits)

    def decode(self, token_id):
        return self._forward([token_id], False)[0]

    def reset(self):
        self.pos = 0

    def close(self):
        self.w = {}
