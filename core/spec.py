"""Model shapes: `ModelSpec`, its parameter/byte/FLOP accounting and its dense twins.

A spec is pure data. It knows the Hugging Face tensor names and shapes of its family, so the
same numbers drive checkpoint writing, parameter counts and bytes-per-token predictions: a
test checks that `total_params` equals the sum over `tensor_shapes()`.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterator

import attrs

from .errors import ConfigError
from .precision import get_precision


@attrs.frozen(kw_only=True)
class Family:
    """What a model family's architecture implies (data, never `if family == ...`)."""

    name: str
    hf_model_type: str
    moe: bool
    attention_bias: bool = False
    qk_norm: str = "none"  # "none", "full" (over all heads, OLMoE), "head" (per head, Qwen3)
    shared_expert: bool = False
    # Mixtral always renormalises the top-k routing weights; others follow norm_topk_prob.
    fixed_norm_topk: bool | None = None
    dense_twin_family: str = "llama"
    description: str = ""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(name="llama", hf_model_type="llama", moe=False,
               description="dense Llama: GQA attention, RoPE, RMSNorm, SwiGLU MLP"),
        Family(name="qwen2", hf_model_type="qwen2", moe=False, attention_bias=True,
               dense_twin_family="qwen2", description="dense Qwen2: Llama with q/k/v biases"),
        Family(name="mixtral", hf_model_type="mixtral", moe=True, fixed_norm_topk=True,
               description="Mixtral: top-k softmax routing over SwiGLU experts"),
        Family(name="qwen2_moe", hf_model_type="qwen2_moe", moe=True, attention_bias=True,
               shared_expert=True, dense_twin_family="qwen2",
               description="Qwen2-MoE: routed experts plus a sigmoid-gated shared expert"),
        Family(name="olmoe", hf_model_type="olmoe", moe=True, qk_norm="full",
               description="OLMoE: many small experts, RMSNorm on full q and k"),
        Family(name="qwen3_moe", hf_model_type="qwen3_moe", moe=True, qk_norm="head",
               description="Qwen3-MoE: many small experts, per-head q/k RMSNorm"),
    ]
}

TWIN_MATCHES = ("active", "total")
# how a MoE's router chooses (docs/concepts.md, "The ablation ladder"): "learned" (its weights),
# "fixed" (every token's logits rank experts 0..k-1 first: moerun.checkpoint.fix_route),
# "none" (no router: all num_experts == top_k experts on, each weighted 1/k; the split twin)
ROUTERS = ("learned", "fixed", "none")
# the ablation ladder's rungs by role, from the active twin to the MoE; the first three are
# also the suffixes of their names (NAME:split)
LADDER = ("dense-active", "split", "fixed-route", "moe")
# the share of a memory cap an iso-cap dense twin leaves free of weights: KV cache, engine
# buffers and the harness (a margin, checked by measurement: the twin's record says whether
# it ran without paging; docs/concepts.md, "Memory caps")
FIT_RESERVE = 0.2


def _positive(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{attribute.name} must be a positive integer, got {value!r}")


def _non_negative(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{attribute.name} must be a non-negative integer, got {value!r}")


def _family(instance: Any, attribute: attrs.Attribute, value: str) -> None:
    if value not in FAMILIES:
        raise ConfigError(f"unknown family {value!r}; known: {', '.join(FAMILIES)}")


@attrs.frozen(kw_only=True)
class ModelSpec:
    """The shape of a dense or MoE decoder-only transformer.

    `intermediate_size` is the dense FFN width for dense families and each routed expert's
    FFN width for MoE families.
    """

    name: str = "custom"
    family: str = attrs.field(validator=_family)
    vocab_size: int = attrs.field(validator=_positive)
    hidden_size: int = attrs.field(validator=_positive)
    num_layers: int = attrs.field(validator=_positive)
    num_heads: int = attrs.field(validator=_positive)
    num_kv_heads: int = attrs.field(validator=_positive)
    head_dim: int = attrs.field(validator=_positive)
    intermediate_size: int = attrs.field(validator=_positive)
    num_experts: int = attrs.field(default=0, validator=_non_negative)
    top_k: int = attrs.field(default=0, validator=_non_negative)
    shared_expert_intermediate_size: int = attrs.field(default=0, validator=_non_negative)
    norm_topk_prob: bool = True
    tie_word_embeddings: bool = False
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = attrs.field(default=4096, validator=_positive)
    router: str = "learned"  # ROUTERS: the ablation ladder's fixed-route MoE and split twin

    def __attrs_post_init__(self) -> None:
        fam = FAMILIES[self.family]
        where = f"model {self.name!r}"
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{where}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{where}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if fam.moe:
            if self.num_experts < 2:
                raise ConfigError(f"{where}: family {self.family} needs num_experts >= 2, got {self.num_experts}")
            if not 1 <= self.top_k <= self.num_experts:
                raise ConfigError(
                    f"{where}: top_k must be between 1 and num_experts ({self.num_experts}), got {self.top_k}"
                )
        else:
            if self.num_experts or self.top_k:
                raise ConfigError(
                    f"{where}: dense family {self.family} takes no experts "
                    f"(num_experts={self.num_experts}, top_k={self.top_k})"
                )
        if self.router not in ROUTERS:
            raise ConfigError(f"{where}: router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.router != "learned" and not fam.moe:
            raise ConfigError(f"{where}: a dense model has no router to fix or remove")
        if self.router == "none" and self.num_experts != self.top_k:
            raise ConfigError(f"{where}: without a router every expert is on: num_experts must equal top_k")
        if self.shared_expert_intermediate_size and not fam.shared_expert:
            raise ConfigError(f"{where}: family {self.family} has no shared expert")
        if fam.shared_expert and not self.shared_expert_intermediate_size:
            raise ConfigError(f"{where}: family {self.family} needs shared_expert_intermediate_size > 0")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"{where}: rms_norm_eps must be a positive number")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"{where}: rope_theta must be a positive number")

    # ------------------------------------------------------------------ traits
    @property
    def traits(self) -> Family:
        return FAMILIES[self.family]

    @property
    def is_moe(self) -> bool:
        return self.traits.moe

    @property
    def attention_bias(self) -> bool:
        return self.traits.attention_bias

    @property
    def qk_norm(self) -> str:
        return self.traits.qk_norm

    @property
    def renormalize_topk(self) -> bool:
        fixed = self.traits.fixed_norm_topk
        return self.norm_topk_prob if fixed is None else fixed

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ------------------------------------------------------------- tensors
    def layer_tensor_shapes(self, i: int) -> Iterator[tuple[str, tuple[int, ...]]]:
        """HF names and shapes of layer `i`'s tensors, in file order."""
        h, p = self.hidden_size, f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (self.q_dim, h)
        yield p + "self_attn.k_proj.weight", (self.kv_dim, h)
        yield p + "self_attn.v_proj.weight", (self.kv_dim, h)
        if self.attention_bias:
            yield p + "self_attn.q_proj.bias", (self.q_dim,)
            yield p + "self_attn.k_proj.bias", (self.kv_dim,)
            yield p + "self_attn.v_proj.bias", (self.kv_dim,)
        yield p + "self_attn.o_proj.weight", (h, self.q_dim)
        if self.qk_norm == "full":
            yield p + "self_attn.q_norm.weight", (self.q_dim,)
            yield p + "self_attn.k_norm.weight", (self.kv_dim,)
        elif self.qk_norm == "head":
            yield p + "self_attn.q_norm.weight", (self.head_dim,)
            yield p + "self_attn.k_norm.weight", (self.head_dim,)
        yield p + "post_attention_layernorm.weight", (h,)
        f = self.intermediate_size
        if not self.is_moe:
            yield p + "mlp.gate_proj.weight", (f, h)
            yield p + "mlp.up_proj.weight", (f, h)
            yield p + "mlp.down_proj.weight", (h, f)
            return
        for name, shape in self.moe_tensor_shapes(i):
            yield name, shape

    def moe_tensor_shapes(self, i: int) -> Iterator[tuple[str, tuple[int, ...]]]:
        h, f, p = self.hidden_size, self.intermediate_size, f"model.layers.{i}."
        if self.family == "mixtral":
            m = p + "block_sparse_moe."
            if self.router != "none":
                yield m + "gate.weight", (self.num_experts, h)
            for e in range(self.num_experts):
                yield m + f"experts.{e}.w1.weight", (f, h)
                yield m + f"experts.{e}.w2.weight", (h, f)
                yield m + f"experts.{e}.w3.weight", (f, h)
            return
        m = p + "mlp."
        if self.router != "none":
            yield m + "gate.weight", (self.num_experts, h)
        for e in range(self.num_experts):
            yield m + f"experts.{e}.gate_proj.weight", (f, h)
            yield m + f"experts.{e}.up_proj.weight", (f, h)
            yield m + f"experts.{e}.down_proj.weight", (h, f)
        if self.traits.shared_expert:
            s = self.shared_expert_intermediate_size
            yield m + "shared_expert.gate_proj.weight", (s, h)
            yield m + "shared_expert.up_proj.weight", (s, h)
            yield m + "shared_expert.down_proj.weight", (h, s)
            yield m + "shared_expert_gate.weight", (1, h)

    def tensor_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Every tensor of the HF checkpoint, in file order."""
        yield "model.embed_tokens.weight", (self.vocab_size, self.hidden_size)
        for i in range(self.num_layers):
            yield from self.layer_tensor_shapes(i)
        yield "model.norm.weight", (self.hidden_size,)
        if not self.tie_word_embeddings:
            yield "lm_head.weight", (self.vocab_size, self.hidden_size)

    # ------------------------------------------------------------- counts
    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        n = h * self.q_dim * 2 + h * self.kv_dim * 2
        if self.attention_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.qk_norm == "full":
            n += self.q_dim + self.kv_dim
        elif self.qk_norm == "head":
            n += 2 * self.head_dim
        return n

    @property
    def expert_params(self) -> int:
        """One routed expert (or the dense FFN for dense families)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def router_params_per_layer(self) -> int:
        return self.num_experts * self.hidden_size if self.is_moe and self.router != "none" else 0

    @property
    def shared_expert_params_per_layer(self) -> int:
        s = self.shared_expert_intermediate_size
        return 3 * self.hidden_size * s + self.hidden_size if s else 0

    def ffn_params_per_layer(self, *, active: bool) -> int:
        if not self.is_moe:
            return self.expert_params
        experts = self.top_k if active else self.num_experts
        return (
            self.router_params_per_layer
            + experts * self.expert_params
            + self.shared_expert_params_per_layer
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def _params(self, *, active: bool) -> int:
        per_layer = (
            2 * self.hidden_size  # the two RMSNorms
            + self.attention_params_per_layer
            + self.ffn_params_per_layer(active=active)
        )
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * per_layer + self.hidden_size + head

    @property
    def total_params(self) -> int:
        return self._params(active=False)

    @property
    def active_params(self) -> int:
        """Parameters used for one token (routed experts counted top_k times, not num_experts)."""
        return self._params(active=True)

    def weight_bytes_per_token(self, precision: str = "fp32") -> float:
        """Bytes of weights a single decoded token reads at `precision`.

        Dense: every weight except the embedding table, of which one row. MoE: attention,
        norms, router, the top_k routed experts, the shared expert, the output head. The
        output head reads the whole vocab x hidden matrix, tied or not.
        """
        bits = get_precision(precision).bits_per_weight
        params = self.active_params - self.embedding_params + self.hidden_size
        if self.tie_word_embeddings:
            params += self.embedding_params  # the tied table is read again as the head
        return params * bits / 8

    def experts_touched(self, batch: int) -> float:
        """Expected distinct routed experts per layer in one decode step of `batch` sequences
        under uniform routing: E·(1 − (1 − k/E)^B); k at B = 1, approaching E as B grows."""
        if not self.is_moe:
            return 0.0
        e, k = self.num_experts, self.top_k
        return e * (1.0 - (1.0 - k / e) ** batch)

    def weight_bytes_per_step(self, precision: str = "fp32", batch: int = 1,
                              experts_touched: float | None = None) -> float:
        """Bytes of weights one decode step of `batch` sequences reads: every dense weight
        once, and per layer the union of the experts the sequences chose (`experts_touched`,
        measured; by default the uniform-routing expectation). Equals
        `weight_bytes_per_token` at batch 1."""
        one = self.weight_bytes_per_token(precision)
        if not self.is_moe:
            return one
        touched = self.experts_touched(batch) if experts_touched is None else experts_touched
        bits = get_precision(precision).bits_per_weight
        return one + self.num_layers * (touched - self.top_k) * self.expert_params * bits / 8

    def kv_bytes_per_token(self, context: int, kv_bytes_per_value: float = 4.0) -> float:
        """Bytes of KV cache one decoded token reads at `context` cached positions."""
        return 2.0 * self.num_layers * self.kv_dim * context * kv_bytes_per_value

    def flops_per_token(self, context: int = 0) -> float:
        """Multiply-add FLOPs (2 per MAC) for one token attending to `context` positions."""
        matmul = 2.0 * (self.active_params - self.embedding_params
                        + (self.embedding_params if self.tie_word_embeddings else 0))
        attention = 4.0 * self.num_layers * self.q_dim * context
        return matmul + attention

    # ------------------------------------------------------------- twins
    def dense_twin(self, match: str = "active") -> "ModelSpec":
        """A dense model with this spec's attention whose parameter count matches
        this MoE's `active` or `total` count within 1 %, by solving the FFN width."""
        if match not in TWIN_MATCHES:
            raise ConfigError(f"twin match must be one of {TWIN_MATCHES}, got {match!r}")
        target = self.active_params if match == "active" else self.total_params
        return self._dense_with_params(target, f"{self.name}:dense-{match}", match)

    def isomem_twin(self, precision: str, dense_precision: str) -> "ModelSpec":
        """The iso-memory dense model: this spec's attention with the FFN width solved so
        that its weights at `dense_precision` occupy the bytes this MoE's weights occupy at
        `precision` (nominal bits, within 1 %). With a harder `dense_precision` it is a
        larger dense model quantised harder into the MoE's footprint; at the same precision
        it is the total-matched twin."""
        bits, dense_bits = (get_precision(p).bits_per_weight for p in (precision, dense_precision))
        target = round(self.total_params * bits / dense_bits)
        return self._dense_with_params(target, f"{self.name}:dense-isomem-{precision}-{dense_precision}",
                                       "iso-memory")

    def fit_twin(self, cap_bytes: int, precision: str) -> "ModelSpec":
        """The iso-cap dense model: this spec's attention with the FFN width solved so that
        its weights at `precision` (nominal bits) fill the part of a `cap_bytes` memory cap
        that `FIT_RESERVE` leaves (the rest holds the KV cache, the engine's buffers and the
        harness): the largest dense model of the family that runs under the cap without
        paging. Whether it did is measured, not assumed (its record's paging figures)."""
        bits = get_precision(precision).bits_per_weight
        target = round(cap_bytes * (1 - FIT_RESERVE) * 8 / bits)
        return self._dense_with_params(target, f"{self.name}:dense-fit-{cap_bytes // 10**6}MB-{precision}",
                                       f"{cap_bytes / 1e9:.1f} GB cap")

    def split_twin(self) -> "ModelSpec":
        """The ladder's split twin: the active twin's bytes as this MoE's `top_k` experts,
        all always on (each weighted 1/k), of its expert shape, with no router: the GEMVs
        and their dispatch of an expert FFN without routing. Shared experts stay."""
        if not self.is_moe:
            raise ConfigError(f"model {self.name!r} is dense: only MoE models have a ladder")
        return attrs.evolve(self, name=f"{self.name}:split", num_experts=self.top_k, router="none")

    def fixed_route_twin(self) -> "ModelSpec":
        """The ladder's fixed-route MoE: this MoE (its experts, router and top-k) with weights
        that send every token to experts 0..k-1 (`moerun.checkpoint.fix_route`: a constant
        hidden dimension the routers alone read): routing's operations without weights that
        change every token."""
        if not self.is_moe:
            raise ConfigError(f"model {self.name!r} is dense: only MoE models have a ladder")
        return attrs.evolve(self, name=f"{self.name}:fixed-route", router="fixed")

    def _dense_with_params(self, target: int, name: str, what: str) -> "ModelSpec":
        if not self.is_moe:
            raise ConfigError(f"model {self.name!r} is dense: only MoE models have dense twins")
        base = attrs.evolve(
            self,
            name=name,
            family=self.traits.dense_twin_family,
            intermediate_size=1,
            num_experts=0,
            top_k=0,
            shared_expert_intermediate_size=0,
            norm_topk_prob=True,
            router="learned",
        )
        fixed = base.total_params - base.expert_params
        per_unit = 3 * self.hidden_size * self.num_layers
        exact = (target - fixed) / per_unit
        if exact < 1:
            raise ConfigError(
                f"model {self.name!r}: attention and embeddings alone exceed the {what} count; "
                "no dense twin exists"
            )
        for align in (256, 128, 64, 32, 16, 8, 1):
            width = max(align, round(exact / align) * align)
            twin = attrs.evolve(base, intermediate_size=width)
            if abs(twin.total_params - target) <= 0.005 * target:
                return twin
        return attrs.evolve(base, intermediate_size=max(1, round(exact)))

    # ------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        from .convert import structure

        return structure(data, cls)

    @property
    def fingerprint(self) -> str:
        """Stable hash of the shape (the name excluded): same shape, same checkpoint."""
        d = self.to_dict()
        d.pop("name")
        if d["router"] == "learned":  # the default leaves every earlier fingerprint (cache key) as it was
            d.pop("router")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def to_hf_config(self) -> dict[str, Any]:
        """config.json as Hugging Face transformers writes it for this family."""
        fam = self.traits
        cfg: dict[str, Any] = {
            "architectures": [_HF_ARCH[self.family]],
            "model_type": fam.hf_model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "moerun_name": self.name,
        }
        if self.router != "learned":
            cfg["moerun_router"] = self.router
        if self.family == "llama":
            cfg["attention_bias"] = False
            cfg["mlp_bias"] = False
        if self.family == "mixtral":
            cfg["num_local_experts"] = self.num_experts
            cfg["num_experts_per_tok"] = self.top_k
        elif self.is_moe:
            cfg["num_experts"] = self.num_experts
            cfg["num_experts_per_tok"] = self.top_k
            cfg["norm_topk_prob"] = self.norm_topk_prob
            cfg["moe_intermediate_size"] = self.intermediate_size
            if self.family == "qwen2_moe":
                cfg["shared_expert_intermediate_size"] = self.shared_expert_intermediate_size
                cfg["decoder_sparse_step"] = 1
                cfg["mlp_only_layers"] = []
            if self.family == "qwen3_moe":
                cfg["decoder_sparse_step"] = 1
                cfg["mlp_only_layers"] = []
        return cfg

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str | None = None) -> "ModelSpec":
        """Read a Hugging Face config.json of a supported family."""
        mtype = cfg.get("model_type")
        family = next((f.name for f in FAMILIES.values() if f.hf_model_type == mtype), None)
        if family is None:
            known = ", ".join(f.hf_model_type for f in FAMILIES.values())
            raise ConfigError(f"unsupported model_type {mtype!r} in config.json; supported: {known}")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            head_dim = cfg.get("head_dim") or (hidden // heads)
            fam = FAMILIES[family]
            if fam.moe and family != "mixtral" and family != "olmoe":
                inter = int(cfg["moe_intermediate_size"])
            else:
                inter = int(cfg["intermediate_size"])
            experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 0) if fam.moe else 0
            if cfg.get("rope_scaling"):
                raise ConfigError(
                    f"config.json: rope_scaling={cfg['rope_scaling']!r} is not implemented yet; moerun would "
                    "compute different RoPE frequencies than the model was trained with"
                )
            for key in ("mlp_only_layers",):
                if cfg.get(key):
                    raise ConfigError(f"config.json: {key}={cfg[key]!r} (dense layers inside an MoE) is not supported")
            if fam.moe and int(cfg.get("decoder_sparse_step", 1)) != 1:
                raise ConfigError("config.json: decoder_sparse_step != 1 is not supported")
            return cls(
                name=name or cfg.get("moerun_name") or cfg.get("_name_or_path") or mtype,
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(head_dim),
                intermediate_size=inter,
                num_experts=experts,
                top_k=int(cfg.get("num_experts_per_tok", 0)) if fam.moe else 0,
                shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                router=str(cfg.get("moerun_router", "learned")),
            )
        except KeyError as exc:
            raise ConfigError(f"config.json of model_type {mtype!r} lacks {exc.args[0]!r}") from None


_HF_ARCH = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}
