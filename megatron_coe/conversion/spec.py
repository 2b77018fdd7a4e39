"""The architecture of a CoE model, independent of Megatron and Hugging Face: ``ArchSpec``.

Both directions of the conversion go through it:

    checkpoint record (ModelArch) --from_arch--> ArchSpec --to_hf_config--> config.json
    Megatron TransformerConfig --from_megatron_config--> ArchSpec   (in-memory models)
    config.json --from_hf_config--> ArchSpec --to_arch / to_option_values / to_megatron_config-->
        the trainer's record and options, Megatron

``ArchSpec`` is the Hugging Face side's view of ``megatron_coe.arch.ModelArch`` (the one
architecture record, which trainer checkpoints store): ``from_arch`` / ``to_arch`` translate, and
this package never imports the trainer (``megatron_coe.training``).

Everything a converter cannot express is refused here with a ``ConversionError`` that names the
setting (biases, token dropping, sinkhorn routing, an activation without an HF name, ...).

Hugging Face ``model_type`` values:

* ``coe_deepseekv2``: CoE with DeepSeek-V2 multi-latent attention (the published CoE layout);
* ``coe_gpt``: CoE with standard multi-head / grouped-query attention and rotary embeddings
  (Megatron's ``GPTModel`` attention; Llama-style ``q_proj``/``k_proj``/``v_proj`` weights);
* ``deepseek_v2``: stock ``transformers`` DeepSeek-V2, written only for a standard MoE (C=1,
  inner residual off, outer residual on) that it can express exactly (see ``stock_deepseek_v2_problems``);
* ``coe_megatron``: this project's own type for an MLA model that the published
  ``coe_deepseekv2`` semantics would compute differently (``published_problems``: no latent norms,
  latent eps other than DeepSeek-V2's 1e-6, LayerNorm, ...). Its remote code computes exactly what
  Megatron computes; the borrowed names are never written for a model they do not describe.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch.nn.functional as F

from megatron_coe.arch import (DEEPSEEK_V2_LATENT_EPS, ModelArch, compact_moe_layer_freq,
                               first_k_dense, hf_moe_layer_pattern, moe_layer_pattern)


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says why and what to change."""


MODEL_TYPE_MLA = "coe_deepseekv2"
MODEL_TYPE_GPT = "coe_gpt"
MODEL_TYPE_STOCK = "deepseek_v2"
MODEL_TYPE_OWN_MLA = "coe_megatron"
COE_MODEL_TYPES = (MODEL_TYPE_MLA, MODEL_TYPE_GPT, MODEL_TYPE_OWN_MLA)

_ACTIVATIONS = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu"}


@dataclass
class ArchSpec:
    # transformer
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int = 4096
    attention: str = "mha"  # "mha" (standard, GQA) or "mla"
    num_query_groups: Optional[int] = None  # mha
    head_dim: Optional[int] = None  # mha (Megatron kv_channels)
    q_lora_rank: Optional[int] = None  # mla
    kv_lora_rank: Optional[int] = None
    qk_nope_head_dim: Optional[int] = None
    qk_rope_head_dim: Optional[int] = None
    v_head_dim: Optional[int] = None
    qk_layernorm: bool = False
    latent_norm_eps: Optional[float] = None  # MLA latent norms (None: norm_eps, older records)
    rope_theta: float = 10000.0
    rope_interleaved: bool = False
    rotary_percent: float = 1.0
    rope_scaling: Optional[dict] = None  # yarn (MLA only)
    normalization: str = "RMSNorm"
    norm_eps: float = 1e-5
    activation: str = "gelu"
    gated: bool = False
    ffn_hidden_size: Optional[int] = None
    tie_word_embeddings: bool = False
    # MoE routing
    num_experts: int = 8
    topk: int = 2
    moe_ffn_hidden_size: int = 64
    shared_expert_size: Optional[int] = None
    score_function: str = "softmax"
    pre_softmax: bool = False
    scaling_factor: Optional[float] = None
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    expert_bias: bool = False
    moe_layer_freq: object = 1  # Megatron's: int N or a 0/1 list (dense layers: ffn_hidden_size)
    # CoE
    coe_iterations: int = 1
    inner_residual: bool = True
    outer_residual: bool = False
    shared_router: bool = False
    # provenance (not architecture)
    dtype: str = "float32"
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ derived
    @property
    def latent_eps(self) -> float:
        return self.norm_eps if self.latent_norm_eps is None else self.latent_norm_eps

    def moe_pattern(self) -> list:
        """[1 (MoE/CoE layer) / 0 (dense MLP)] per layer."""
        return moe_layer_pattern(self.moe_layer_freq, self.num_layers)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.moe_pattern()[layer_idx])

    @property
    def num_routers(self) -> int:
        return 1 if self.shared_router else self.coe_iterations

    @property
    def kv_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def mha_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def replace(self, **changes) -> "ArchSpec":
        return dataclasses.replace(self, **changes)

    def is_standard_moe(self) -> bool:
        return self.coe_iterations == 1 and not self.inner_residual and self.outer_residual

    # ------------------------------------------------------------------ the architecture record
    @classmethod
    def from_arch(cls, arch: ModelArch, dtype: str = "float32") -> "ArchSpec":
        """The spec of a recorded model (``ModelArch``, e.g. a trainer checkpoint's ``arch``);
        the same spec ``from_megatron_config`` gives for the model built from it. Refuses, as
        ``from_megatron_config`` does, what Hugging Face cannot express."""
        a = arch
        problems = list(a.check())
        mla = a.multi_latent_attention
        if mla:
            if a.kv_channels not in (None, a.v_head_dim):
                problems.append("MLA with kv_channels != v_head_dim is not supported")
            if (a.position_embedding_type == "rope" and a.mscale_all_dim
                    and a.rotary_scaling_factor > 1):
                problems.append("mscale_all_dim with rope_type='rope' (softmax scale mscale) is "
                                "not supported")
        if a.vocab_size is None:
            problems.append("the record has no vocab_size")
        if problems:
            raise ConversionError("cannot convert this Megatron model:\n  - "
                                  + "\n  - ".join(problems))
        spec = cls(
            num_layers=a.num_layers, hidden_size=a.hidden_size,
            num_attention_heads=a.num_attention_heads, vocab_size=int(a.vocab_size),
            max_position_embeddings=int(a.max_position_embeddings or 4096),
            attention="mla" if mla else "mha", normalization=a.normalization,
            norm_eps=float(a.layernorm_epsilon), activation=a.activation,
            gated=bool(a.gated_linear_unit), ffn_hidden_size=a.resolved("ffn_hidden_size"),
            qk_layernorm=a.qk_layernorm_on,
            tie_word_embeddings=not a.untie_embeddings_and_output_weights,
            num_experts=a.num_moe_experts, topk=a.moe_router_topk,
            moe_ffn_hidden_size=a.resolved("moe_ffn_hidden_size"),
            shared_expert_size=a.moe_shared_expert_intermediate_size or None,
            score_function=a.moe_router_score_function,
            pre_softmax=bool(a.moe_router_pre_softmax),
            scaling_factor=a.moe_router_topk_scaling_factor, num_groups=a.moe_router_num_groups,
            group_topk=a.moe_router_group_topk,
            expert_bias=bool(a.moe_router_enable_expert_bias),
            moe_layer_freq=compact_moe_layer_freq(a.moe_layer_pattern()),
            coe_iterations=a.coe_iterations, inner_residual=bool(a.coe_inner_residual),
            outer_residual=bool(a.coe_outer_residual), shared_router=bool(a.coe_shared_router),
            dtype=dtype)
        if mla:
            return spec.replace(q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
                                qk_nope_head_dim=a.qk_head_dim,
                                qk_rope_head_dim=a.qk_pos_emb_head_dim, v_head_dim=a.v_head_dim,
                                rope_theta=float(a.rotary_base), rope_scaling=a.yarn,
                                latent_norm_eps=float(a.mla_latent_norm_epsilon))
        return spec.replace(num_query_groups=a.resolved("num_query_groups"),
                            head_dim=a.resolved("kv_channels"), rope_theta=float(a.rotary_base),
                            rotary_percent=float(a.rotary_percent))

    # ------------------------------------------------------------------ Megatron
    @classmethod
    def from_megatron_config(cls, config, vocab_size: int, max_position_embeddings: int = 4096,
                             rotary_base: float = 10000.0, rotary_percent: float = 1.0,
                             tie_word_embeddings: bool = False) -> "ArchSpec":
        """Spec of a model built by ``build_coe_gpt_model(config, ...)``; refuses what HF cannot express.

        ``rotary_base`` / ``rotary_percent`` are ``GPTModel`` arguments (standard attention;
        ``build_coe_gpt_model`` uses 10000 / 1.0); MLA uses ``config.rotary_base``.
        """
        c = config
        problems = []
        if getattr(c, "add_bias_linear", False) or getattr(c, "add_qkv_bias", False):
            problems.append("linear biases (add_bias_linear / add_qkv_bias) are not supported")
        if getattr(c, "moe_expert_capacity_factor", None) is not None:
            problems.append("token dropping (moe_expert_capacity_factor) changes inference results and "
                            "is not supported")
        if getattr(c, "moe_router_load_balancing_type", "aux_loss") == "sinkhorn":
            problems.append("sinkhorn routing is not supported")
        if getattr(c, "moe_shared_expert_gate", False):
            problems.append("moe_shared_expert_gate is not supported")
        if getattr(c, "mtp_num_layers", None):
            problems.append("multi-token prediction layers (mtp_num_layers) are not supported")
        if getattr(c, "layernorm_zero_centered_gamma", False):
            problems.append("layernorm_zero_centered_gamma is not supported")
        if getattr(c, "apply_residual_connection_post_layernorm", False):
            problems.append("apply_residual_connection_post_layernorm is not supported")
        if getattr(c, "qk_l2_norm", False):
            problems.append("qk_l2_norm is not supported")
        unsupported = dict(moe_apply_probs_on_input=False, moe_latent_size=None, window_size=None,
                           attention_output_gate=False, experimental_attention_variant=None,
                           apply_query_key_layer_scaling=False, glu_linear_offset=0.0,
                           activation_func_clamp_value=None, moe_router_force_load_balancing=False)
        for name, default in unsupported.items():
            if getattr(c, name, default) != default:
                problems.append(f"{name}={getattr(c, name)!r} is not supported")
        if getattr(c, "softmax_type", "vanilla") != "vanilla":
            problems.append(f"softmax_type={c.softmax_type!r} is not supported")
        act = _ACTIVATIONS.get(c.activation_func)
        if act is None:
            problems.append(f"activation_func {getattr(c.activation_func, '__name__', c.activation_func)} "
                            f"has no Hugging Face name (supported: {sorted(_ACTIVATIONS.values())})")
        mla = bool(getattr(c, "multi_latent_attention", False))
        rope_scaling = None
        if mla:
            if c.rope_type == "yarn":
                rope_scaling = dict(type="yarn", factor=float(c.rotary_scaling_factor),
                                    original_max_position_embeddings=int(c.original_max_position_embeddings),
                                    beta_fast=float(c.beta_fast), beta_slow=float(c.beta_slow),
                                    mscale=float(c.mscale), mscale_all_dim=float(c.mscale_all_dim))
            elif c.rope_type != "rope":
                problems.append(f"rope_type {c.rope_type!r} is not supported")
            elif c.mscale_all_dim and c.rotary_scaling_factor > 1:
                problems.append("mscale_all_dim with rope_type='rope' (softmax scale mscale) is not supported")
            if c.rotary_interleaved:
                problems.append("rotary_interleaved with multi-latent attention is not supported")
            if getattr(c, "kv_channels", None) not in (None, c.v_head_dim):
                problems.append("MLA with kv_channels != v_head_dim is not supported")
        if problems:
            raise ConversionError("cannot convert this Megatron model:\n  - " + "\n  - ".join(problems))
        dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(str(c.params_dtype), "float32")
        spec = cls(
            num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
            vocab_size=int(vocab_size), max_position_embeddings=int(max_position_embeddings),
            attention="mla" if mla else "mha",
            normalization=c.normalization, norm_eps=float(c.layernorm_epsilon),
            activation=act, gated=bool(c.gated_linear_unit), ffn_hidden_size=c.ffn_hidden_size,
            qk_layernorm=bool(c.qk_layernorm), tie_word_embeddings=bool(tie_word_embeddings),
            num_experts=c.num_moe_experts, topk=c.moe_router_topk,
            moe_ffn_hidden_size=c.moe_ffn_hidden_size,
            shared_expert_size=c.moe_shared_expert_intermediate_size or None,
            score_function=c.moe_router_score_function, pre_softmax=bool(c.moe_router_pre_softmax),
            scaling_factor=c.moe_router_topk_scaling_factor, num_groups=c.moe_router_num_groups,
            group_topk=c.moe_router_group_topk, expert_bias=bool(c.moe_router_enable_expert_bias),
            moe_layer_freq=compact_moe_layer_freq(
                moe_layer_pattern(getattr(c, "moe_layer_freq", 1), c.num_layers)),
            coe_iterations=getattr(c, "coe_iterations", 1),
            inner_residual=bool(getattr(c, "coe_inner_residual", False)),
            outer_residual=bool(getattr(c, "coe_outer_residual", True)),
            shared_router=bool(getattr(c, "coe_shared_router", False)),
            dtype=dtype,
        )
        if mla:
            spec = spec.replace(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
                                qk_nope_head_dim=c.qk_head_dim, qk_rope_head_dim=c.qk_pos_emb_head_dim,
                                v_head_dim=c.v_head_dim, rope_theta=float(c.rotary_base),
                                rope_scaling=rope_scaling,
                                latent_norm_eps=float(getattr(c, "mla_latent_norm_epsilon",
                                                              c.layernorm_epsilon)))
        else:
            spec = spec.replace(num_query_groups=c.num_query_groups or c.num_attention_heads,
                                head_dim=c.kv_channels, rope_theta=float(rotary_base),
                                rope_interleaved=bool(c.rotary_interleaved),
                                rotary_percent=float(rotary_percent))
        return spec

    def megatron_config_overrides(self) -> dict:
        """``TransformerConfig`` fields (beyond ``TrainArgs``) that reproduce this spec exactly."""
        out = dict(layernorm_epsilon=self.norm_eps, moe_router_topk_scaling_factor=self.scaling_factor,
                   moe_router_num_groups=self.num_groups, moe_router_group_topk=self.group_topk)
        if self.attention == "mla":
            out["rotary_base"] = self.rope_theta
            out["mla_latent_norm_epsilon"] = self.latent_eps
            if self.rope_scaling:
                rs = self.rope_scaling
                out.update(rope_type="yarn", rotary_scaling_factor=rs["factor"],
                           original_max_position_embeddings=rs["original_max_position_embeddings"],
                           beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"], mscale=rs["mscale"],
                           mscale_all_dim=rs["mscale_all_dim"])
        else:
            if self.rotary_percent != 1.0 or self.rope_theta != 10000.0:
                raise ConversionError("build_coe_gpt_model uses rotary_percent 1.0 and rotary base "
                                      "10000 for standard attention; this model differs")
            out.update(num_query_groups=self.kv_groups, rotary_interleaved=self.rope_interleaved)
        return out

    # ------------------------------------------------------------------ Hugging Face
    def hf_model_type(self, stock: bool = False) -> str:
        """``deepseek_v2`` (``stock``), ``coe_deepseekv2`` where the published semantics compute
        this model exactly, else this project's own ``coe_megatron`` (MLA) / ``coe_gpt``."""
        if stock:
            return MODEL_TYPE_STOCK
        if self.attention != "mla":
            return MODEL_TYPE_GPT
        return MODEL_TYPE_OWN_MLA if self.published_problems() else MODEL_TYPE_MLA

    def published_problems(self) -> list[str]:
        """Why code written for ``coe_deepseekv2`` (the published CoE model: DeepSeek-V2 attention
        and experts, CoE chain) would compute a different function than this model; [] if none."""
        p = []
        if self.attention != "mla":
            p.append("coe_deepseekv2 is multi-latent attention; this model has standard attention")
            return p
        if not self.qk_layernorm:
            p.append("DeepSeek-V2 attention always normalises the q/kv latents "
                     "(q_a_layernorm/kv_a_layernorm); this model has no latent norms "
                     "(trained with --no-qk-layernorm or before latent norms were the default)")
        elif self.latent_eps != DEEPSEEK_V2_LATENT_EPS:
            p.append(f"DeepSeek-V2 hard-codes eps {DEEPSEEK_V2_LATENT_EPS:g} for the latent norms; "
                     f"this model uses {self.latent_eps:g}")
        if self.normalization != "RMSNorm":
            p.append(f"DeepSeek-V2 uses RMSNorm; this model uses {self.normalization}")
        if not (self.gated and self.activation == "silu"):
            p.append("DeepSeek-V2 experts are SwiGLU; this model's are not (--swiglu)")
        if self.score_function != "softmax" or not self.pre_softmax:
            p.append("DeepSeek-V2 routes with a softmax over all routed experts and no "
                     "renormalisation of the top-k weights (--moe-router-score-function softmax "
                     "--moe-router-pre-softmax); this model does not")
        if self.num_groups or self.group_topk:
            p.append("group-limited routing is not part of the published CoE model")
        if self.expert_bias:
            p.append("DeepSeek-V2 has no expert bias (--moe-router-enable-expert-bias)")
        if isinstance(self.hf_dense_layer_keys()["moe_layer_freq"], list):
            p.append("the published CoE model places dense layers by first_k_dense_replace and an "
                     "integer moe_layer_freq; this model's pattern needs a list")
        if self.shared_expert_size and self.shared_expert_size % self.moe_ffn_hidden_size:
            p.append(f"DeepSeek-V2 counts shared experts in units of the routed expert size "
                     f"({self.moe_ffn_hidden_size}); the shared expert size "
                     f"{self.shared_expert_size} is not a multiple of it")
        return p

    def stock_deepseek_v2_problems(self) -> list[str]:
        """Why stock ``transformers`` ``DeepseekV2ForCausalLM`` cannot run this model exactly."""
        p = []
        if self.attention != "mla":
            p.append("stock DeepSeek-V2 needs multi-latent attention (--multi-latent-attention)")
        if not self.is_standard_moe():
            p.append("stock DeepSeek-V2 is a standard MoE: needs coe_iterations=1, inner residual off, "
                     "outer residual on")
        if self.score_function != "softmax" or not self.pre_softmax:
            p.append("stock DeepSeek-V2 routes with softmax over all experts and no renormalisation of "
                     "the top-k weights: needs moe_router_score_function=softmax and "
                     "moe_router_pre_softmax=True")
        if self.num_groups and self.group_topk and self.topk // self.group_topk != 1:
            p.append("stock group-limited routing scores a group by its best expert: needs "
                     "moe_router_topk == moe_router_group_topk")
        if not (self.gated and self.activation == "silu"):
            p.append("stock DeepSeek-V2 experts are SwiGLU: needs --swiglu")
        if self.normalization != "RMSNorm":
            p.append("stock DeepSeek-V2 uses RMSNorm")
        if not self.qk_layernorm:
            p.append("stock DeepSeek-V2 always normalises the q/kv latents: needs --qk-layernorm")
        elif self.attention == "mla" and self.latent_eps != DEEPSEEK_V2_LATENT_EPS:
            p.append(f"stock DeepSeek-V2 hard-codes eps {DEEPSEEK_V2_LATENT_EPS:g} for the latent "
                     f"norms; this model uses {self.latent_eps:g}")
        if self.rope_scaling is not None:
            p.append("YaRN export to stock DeepSeek-V2 is not supported (use the CoE remote-code export)")
        if self.shared_expert_size and self.shared_expert_size % self.moe_ffn_hidden_size:
            p.append("stock DeepSeek-V2 needs the shared-expert size to be a multiple of the expert size")
        if not self.shared_expert_size:
            p.append("stock DeepSeek-V2 always has shared experts: needs "
                     "--moe-shared-expert-intermediate-size")
        if self.expert_bias:
            p.append("stock DeepSeek-V2 has no expert bias")
        if first_k_dense(self.moe_pattern()) is None:
            p.append(f"stock DeepSeek-V2 has dense layers only before the MoE layers "
                     f"(first_k_dense_replace); this model's pattern is {self.moe_pattern()}")
        return p

    def to_hf_config(self, stock: bool = False, token_ids: Optional[dict] = None) -> dict:
        """``config.json`` content (without ``auto_map``/``architectures``, see ``export``)."""
        token_ids = token_ids or {}
        n_shared = None
        if self.shared_expert_size and self.shared_expert_size % self.moe_ffn_hidden_size == 0:
            n_shared = self.shared_expert_size // self.moe_ffn_hidden_size
        topk_method = "group_limited_greedy" if (self.num_groups and self.group_topk) else "greedy"
        cfg = dict(
            model_type=self.hf_model_type(stock),
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size or 4 * self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads if self.attention == "mla" else self.kv_groups,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.activation, rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
            attention_bias=False, mlp_bias=False, attention_dropout=0.0,
            tie_word_embeddings=self.tie_word_embeddings, initializer_range=0.02, use_cache=True,
            n_routed_experts=self.num_experts, num_experts_per_tok=self.topk,
            moe_intermediate_size=self.moe_ffn_hidden_size, n_shared_experts=n_shared,
            scoring_func=self.score_function,
            norm_topk_prob=(not self.pre_softmax) if self.score_function == "softmax" else self.topk > 1,
            routed_scaling_factor=float(self.scaling_factor or 1.0),
            topk_method=topk_method, n_group=self.num_groups, topk_group=self.group_topk,
            **self.hf_dense_layer_keys(),
            bos_token_id=token_ids.get("bos"), eos_token_id=token_ids.get("eos"),
            pad_token_id=token_ids.get("pad"), dtype=self.dtype,
        )
        if self.attention == "mla":
            cfg.update(q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                       qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                       v_head_dim=self.v_head_dim)
        if stock:
            cfg["rope_parameters"] = dict(rope_type="default", rope_theta=self.rope_theta)
            return cfg
        cfg.update(
            attention_type=self.attention, qk_layernorm=self.qk_layernorm,
            latent_norm_eps=self.latent_eps if self.attention == "mla" else None,
            rope_scaling=self.rope_scaling, norm_type=self.normalization.lower(), mlp_gated=self.gated,
            shared_expert_intermediate_size=self.shared_expert_size, router_expert_bias=self.expert_bias,
            inner_iter=self.coe_iterations, use_igate=not self.shared_router,
            inner_residual=self.inner_residual, outer_residual=self.outer_residual,
        )
        if self.attention == "mha":
            cfg.update(head_dim=self.mha_head_dim, rope_interleaved=self.rope_interleaved,
                       partial_rotary_factor=self.rotary_percent)
        return cfg

    def hf_dense_layer_keys(self) -> dict:
        """``first_k_dense_replace`` / ``moe_layer_freq`` of ``config.json`` (DeepSeek's rule:
        layer l is MoE iff ``l >= first_k_dense_replace and l % moe_layer_freq == 0``; any other
        pattern as a 0/1 list in ``moe_layer_freq``, read by this project's remote code only)."""
        pattern = self.moe_pattern()
        k = first_k_dense(pattern)
        if k is not None:
            return dict(first_k_dense_replace=k, moe_layer_freq=1)
        freq = compact_moe_layer_freq(pattern)
        return dict(first_k_dense_replace=0, moe_layer_freq=freq)

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ArchSpec":
        """Spec of an HF ``config.json`` of type ``coe_deepseekv2``, ``coe_gpt`` or ``deepseek_v2``."""
        model_type = cfg.get("model_type")
        if model_type not in COE_MODEL_TYPES + (MODEL_TYPE_STOCK,):
            raise ConversionError(
                f"unsupported Hugging Face model_type {model_type!r}: supported are "
                f"{list(COE_MODEL_TYPES) + [MODEL_TYPE_STOCK]} (the CoE exports of this project and "
                "stock DeepSeek-V2 MoE checkpoints)")
        stock = model_type == MODEL_TYPE_STOCK
        problems = []

        def get(key, default=None):
            return cfg.get(key, default)

        if stock:
            if get("moe_layer_freq", 1) != 1:
                problems.append("moe_layer_freq != 1 is not supported (stock DeepSeek-V2 ignores it)")
            rope = get("rope_parameters") or {}
            rope_type = rope.get("rope_type", "default")
            if rope_type not in ("default", None) or get("rope_scaling"):
                problems.append(f"rope type {rope_type!r} / rope_scaling is not supported for stock "
                                "DeepSeek-V2 import")
        if get("attention_bias") or get("mlp_bias"):
            problems.append("attention_bias / mlp_bias are not supported")
        if get("num_key_value_heads") not in (None, get("num_attention_heads")) and \
                (stock or get("attention_type", "mla") == "mla"):
            problems.append("MLA with num_key_value_heads != num_attention_heads is not supported")
        if problems:
            raise ConversionError("cannot convert this Hugging Face model:\n  - " + "\n  - ".join(problems))
        attention = "mla" if stock else get("attention_type", "mla" if model_type == MODEL_TYPE_MLA else "mha")
        rope_theta = get("rope_theta")
        if rope_theta is None:
            rope_theta = (get("rope_parameters") or {}).get("rope_theta", 10000.0)
        moe_size = get("moe_intermediate_size")
        shared = get("shared_expert_intermediate_size")
        if shared is None and get("n_shared_experts"):
            shared = get("n_shared_experts") * moe_size
        scoring = get("scoring_func", "softmax")
        norm_topk = bool(get("norm_topk_prob", False))
        topk_method = get("topk_method", "greedy")
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ConversionError(f"topk_method {topk_method!r} is not supported")
        if stock:
            # transformers' DeepseekV2TopkRouter ignores norm_topk_prob: softmax, top-k, no renorm.
            pre_softmax = True
            if scoring != "softmax":
                raise ConversionError("stock DeepSeek-V2 import supports scoring_func='softmax' only")
        else:
            pre_softmax = not norm_topk if scoring == "softmax" else False
        if get("residual") is not None and get("inner_residual") is None:
            inner = get("residual") in ("inner", "inner+outer")
            outer = get("residual") in ("outer", "inner+outer")
        else:
            inner, outer = get("inner_residual", not stock), get("outer_residual", stock)
        if stock:
            inner, outer = False, True
        scaling = get("routed_scaling_factor", 1.0)
        spec = cls(
            num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
            num_attention_heads=get("num_attention_heads"), vocab_size=get("vocab_size"),
            max_position_embeddings=get("max_position_embeddings", 4096), attention=attention,
            qk_layernorm=True if stock else bool(get("qk_layernorm", True)),
            latent_norm_eps=(None if attention != "mla"
                             else DEEPSEEK_V2_LATENT_EPS if stock or model_type == MODEL_TYPE_MLA
                             else float(get("latent_norm_eps") or DEEPSEEK_V2_LATENT_EPS)),
            rope_theta=float(rope_theta), rope_scaling=None if stock else get("rope_scaling"),
            normalization="LayerNorm" if get("norm_type", "rmsnorm") == "layernorm" else "RMSNorm",
            norm_eps=float(get("rms_norm_eps", 1e-6)), activation=get("hidden_act", "silu"),
            gated=True if stock else bool(get("mlp_gated", True)),
            ffn_hidden_size=get("intermediate_size"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            num_experts=get("n_routed_experts"), topk=get("num_experts_per_tok"),
            moe_ffn_hidden_size=moe_size, shared_expert_size=shared or None,
            score_function=scoring, pre_softmax=pre_softmax,
            scaling_factor=None if scaling in (None, 1, 1.0) else float(scaling),
            num_groups=get("n_group") if topk_method == "group_limited_greedy" else None,
            group_topk=get("topk_group") if topk_method == "group_limited_greedy" else None,
            expert_bias=bool(get("router_expert_bias", False)),
            moe_layer_freq=compact_moe_layer_freq(hf_moe_layer_pattern(
                get("num_hidden_layers"), get("first_k_dense_replace", 0),
                1 if stock else get("moe_layer_freq", 1))),
            coe_iterations=1 if stock else int(get("inner_iter", 1)),
            inner_residual=bool(inner), outer_residual=bool(outer),
            shared_router=False if stock else not get("use_igate", True),
            dtype=str(get("dtype") or get("torch_dtype") or "float32").replace("torch.", ""),
        )
        if attention == "mla":
            spec = spec.replace(q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
                                qk_nope_head_dim=get("qk_nope_head_dim"),
                                qk_rope_head_dim=get("qk_rope_head_dim"), v_head_dim=get("v_head_dim"))
        else:
            spec = spec.replace(num_query_groups=get("num_key_value_heads") or get("num_attention_heads"),
                                head_dim=get("head_dim"), rope_interleaved=bool(get("rope_interleaved", False)),
                                rotary_percent=float(get("partial_rotary_factor", 1.0)))
        return spec

    # ------------------------------------------------------------------ the architecture record
    def to_arch(self) -> ModelArch:
        """The trainer's architecture record (``megatron_coe.arch.ModelArch``) of this model.

        Raises ``ConversionError`` for what the record (and so the trainer) cannot express."""
        p = []
        if self.gated and self.activation != "silu":
            p.append(f"gated {self.activation} has no trainer option (only --swiglu)")
        if not self.gated and self.activation != "gelu":
            p.append(f"activation {self.activation} has no trainer option (gelu, or silu with --swiglu)")
        if self.score_function == "sigmoid" and self.pre_softmax:
            p.append("pre_softmax with sigmoid scores")
        if self.rope_interleaved:
            p.append("interleaved RoPE (rope_interleaved) has no trainer option")
        if self.attention == "mla" and self.kv_groups != self.num_attention_heads:
            p.append("MLA with num_key_value_heads != num_attention_heads")
        if p:
            raise ConversionError("this model cannot be trained with megatron_coe.train as is:\n  - "
                                  + "\n  - ".join(p))
        mla = self.attention == "mla"
        ffn = None if self.ffn_hidden_size in (None, 4 * self.hidden_size) else self.ffn_hidden_size
        kv = None if mla or self.head_dim in (None, self.hidden_size // self.num_attention_heads) \
            else self.head_dim
        rs = self.rope_scaling or {}
        kw = dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads, ffn_hidden_size=ffn, kv_channels=kv,
            num_query_groups=None if mla or self.kv_groups == self.num_attention_heads else self.kv_groups,
            normalization=self.normalization, layernorm_epsilon=self.norm_eps,
            gated_linear_unit=self.gated, multi_latent_attention=mla,
            qk_layernorm=self.qk_layernorm,
            position_embedding_type="yarn" if rs else "rope", rotary_base=self.rope_theta,
            rotary_percent=self.rotary_percent,
            max_position_embeddings=self.max_position_embeddings,
            untie_embeddings_and_output_weights=not self.tie_word_embeddings,
            num_moe_experts=self.num_experts, moe_router_topk=self.topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=self.shared_expert_size,
            moe_router_score_function=self.score_function, moe_router_pre_softmax=self.pre_softmax,
            moe_router_topk_scaling_factor=self.scaling_factor,
            moe_router_num_groups=self.num_groups, moe_router_group_topk=self.group_topk,
            moe_router_enable_expert_bias=self.expert_bias, moe_layer_freq=self.moe_layer_freq,
            coe_iterations=self.coe_iterations, coe_inner_residual=self.inner_residual,
            coe_outer_residual=self.outer_residual, coe_shared_router=self.shared_router,
            vocab_size=self.vocab_size,
        )
        if mla:
            kw.update(q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                      qk_head_dim=self.qk_nope_head_dim, qk_pos_emb_head_dim=self.qk_rope_head_dim,
                      v_head_dim=self.v_head_dim, mla_latent_norm_epsilon=self.latent_eps)
        if rs:
            kw.update(rotary_scaling_factor=float(rs["factor"]), mscale=float(rs.get("mscale", 1.0)),
                      mscale_all_dim=float(rs.get("mscale_all_dim", 0.0)),
                      original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                      beta_fast=float(rs.get("beta_fast", 32)), beta_slow=float(rs.get("beta_slow", 1)))
        return ModelArch(**kw)

    def to_option_values(self) -> dict:
        """{trainer option: value} that build exactly this model (``megatron_coe.train``), and
        ``seq_length``: the context the model was trained at (YaRN: its original context, e.g.
        4096 for the paper's model declared for 163840 positions; else the declared length)."""
        values = self.to_arch().to_option_values()
        rs = self.rope_scaling or {}
        values["seq_length"] = int(rs.get("original_max_position_embeddings")
                                   or self.max_position_embeddings)
        return values

    def train_args_warnings(self) -> list:
        """Settings the trainer's options cannot set (none left: every field has an option)."""
        return []

    def to_megatron_config(self, **overrides):
        """The CoE ``TransformerConfig`` of this spec (CPU-safe settings; ``overrides`` win).

        Built from the architecture record (``to_arch().to_config_kwargs()``: the fields the
        trainer builds its model from), so an import is the model the trainer builds; only a
        model the record cannot express (``to_arch`` refuses it) is built field by field here."""
        import torch

        from megatron_coe.config import CoEMLATransformerConfig, CoETransformerConfig

        runtime = dict(
            moe_token_dispatcher_type="alltoall", add_bias_linear=False,
            params_dtype=getattr(torch, self.dtype), use_cpu_initialization=True,
            gradient_accumulation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
            apply_rope_fusion=False, persist_layer_norm=False, bias_activation_fusion=False,
            hidden_dropout=0.0, attention_dropout=0.0)
        try:
            arch = self.to_arch()
        except ConversionError:
            arch = None
        if arch is not None:
            kw = dict(arch.to_config_kwargs(), **runtime)
            kw.update(overrides)
            cls = CoEMLATransformerConfig if arch.multi_latent_attention else CoETransformerConfig
            return cls(**kw)
        kw = dict(
            num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.ffn_hidden_size or 4 * self.hidden_size,
            num_moe_experts=self.num_experts, moe_router_topk=self.topk,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=self.shared_expert_size,
            moe_router_score_function=self.score_function, moe_router_pre_softmax=self.pre_softmax,
            moe_router_enable_expert_bias=self.expert_bias, normalization=self.normalization,
            moe_layer_freq=self.moe_layer_freq,
            qk_layernorm=self.qk_layernorm, gated_linear_unit=self.gated,
            activation_func={"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[self.activation],
            coe_iterations=self.coe_iterations, coe_inner_residual=self.inner_residual,
            coe_outer_residual=self.outer_residual, coe_shared_router=self.shared_router,
            moe_token_dispatcher_type="alltoall", add_bias_linear=False,
            params_dtype=getattr(torch, self.dtype), use_cpu_initialization=True,
            gradient_accumulation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
            apply_rope_fusion=False, persist_layer_norm=False, bias_activation_fusion=False,
            hidden_dropout=0.0, attention_dropout=0.0,
        )
        kw.update(self.megatron_config_overrides())
        if self.attention == "mla":
            kw.update(q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                      qk_head_dim=self.qk_nope_head_dim, qk_pos_emb_head_dim=self.qk_rope_head_dim,
                      v_head_dim=self.v_head_dim)
            kw.setdefault("rope_type", "rope")
            kw.update(overrides)
            return CoEMLATransformerConfig(**kw)
        kw.update(kv_channels=self.head_dim)
        kw.update(overrides)
        return CoETransformerConfig(**kw)

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ArchSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
