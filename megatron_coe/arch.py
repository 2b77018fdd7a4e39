"""The architecture of a CoE model: ONE record, ``ModelArch``, with Megatron-Core's field names.

Every field that decides what function a model computes (shapes, attention kind, norms, RoPE,
routing, the CoE chain) is declared here once: its Megatron-Core ``TransformerConfig`` name (the
field name), its one default, its Megatron-LM flag and help text. Everything else reads it:

* the trainer's option table (``training/options.py``) takes its architecture rows from
  ``option_rows`` (the option's name is Megatron-LM's ``args`` name, e.g. ``num_experts`` for
  ``num_moe_experts``, ``layernorm_epsilon`` for ``--norm-epsilon``, ``swiglu`` for
  ``gated_linear_unit``);
* ``ModelArch.from_args`` / ``to_config_kwargs`` build the Megatron ``TransformerConfig``
  (``training/setup.build_model_config``);
* ``ModelArch.from_megatron_config`` reads a built model back (checkpoint records, export);
* FLOPs (``training/metrics.py``), the checkpoint readers and the Hugging Face translation
  (``conversion/hf_config.py``: ``config.json`` <-> this record) read it.

This module imports neither ``training`` nor ``conversion`` (both import it).

Defaults are Megatron-LM's where Megatron-LM has one; the CoE fields default to one plain
pass (``coe_iterations`` 1, inner residual on, outer off: the paper's layer with C=1).
Two fields are this project's own, for DeepSeek-V2 attention: ``qk_layernorm`` unset means
"on for multi-latent attention" (DeepSeek-V2 always normalises the q/kv latents), and
``mla_latent_norm_epsilon`` (1e-6, DeepSeek-V2's hard-coded value) is the latent norms' eps,
separate from ``layernorm_epsilon`` (``--norm-epsilon``) of the other norms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Optional

# Megatron-Core's defaults for the YaRN parameters (MLATransformerConfig) when the flag is unset.
YARN_DEFAULTS = dict(original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0)
# DeepSeek-V2's latent norm eps (hard-coded in its modeling code).
DEEPSEEK_V2_LATENT_EPS = 1e-6


def _f(default, help, *, arg=None, flag=None, type=None, choices=None, valid=None, shape=False,
       function=False, config=True):
    """One architecture field. ``arg``: the trainer option / Megatron-LM ``args`` name (default:
    the field name); ``flag``: the command-line flag (default ``--`` + arg with dashes);
    ``shape``: changes parameter shapes or state-dict keys; ``function``: changes what the model
    computes without changing a shape (a ``--load`` compares both, ``check_compatible``);
    ``config``: passed to ``TransformerConfig`` under the field's name as is."""
    if type is None:
        type = default.__class__
    return field(default=default, metadata=dict(help=help, arg=arg, flag=flag, type=type,
                                                choices=choices, valid=valid, shape=shape,
                                                function=function or shape, config=config))


@dataclass
class ModelArch:
    # ------------------------------------------------------------------ transformer
    num_layers: Optional[int] = _f(None, "Number of transformer layers (required).", type=int,
                                   valid=">= 1", shape=True)
    hidden_size: Optional[int] = _f(None, "Transformer hidden size (required).", type=int,
                                    valid=">= 1", shape=True)
    num_attention_heads: Optional[int] = _f(None, "Number of attention heads (required).",
                                            type=int, valid=">= 1", shape=True)
    num_query_groups: Optional[int] = _f(
        None, "Key/value head groups of standard attention (grouped-query attention; default: "
        "one per head).", type=int, valid=">= 1", shape=True)
    kv_channels: Optional[int] = _f(None, "Attention head dim (default hidden/heads; MLA: "
                                    "v_head_dim).", type=int, valid=">= 1", shape=True)
    ffn_hidden_size: Optional[int] = _f(None, "Dense FFN size (default 4 x hidden); the routed "
                                        "experts' size when --moe-ffn-hidden-size is unset.",
                                        type=int, valid=">= 1", shape=True)
    normalization: str = _f("LayerNorm", "Norm layer.", choices=["LayerNorm", "RMSNorm"],
                            shape=True)
    layernorm_epsilon: float = _f(1e-5, "Epsilon of the input, pre-MLP and final norms.",
                                  flag="--norm-epsilon", valid="> 0", function=True)
    gated_linear_unit: bool = _f(False, "SwiGLU expert/FFN activation (gated SiLU; off: GeLU).",
                                 arg="swiglu", shape=True, config=False)
    # ------------------------------------------------------------------ attention
    multi_latent_attention: bool = _f(False, "DeepSeek-V2 multi-latent attention (MLA).",
                                      shape=True, config=False)
    qk_layernorm: Optional[bool] = _f(
        None, "Norm on queries and keys; with MLA the RMSNorms of the q/kv latents (DeepSeek-V2's "
        "q_a_layernorm/kv_a_layernorm). Default: on with MLA (DeepSeek-V2 always applies them), "
        "off otherwise.", type=bool, shape=True, config=False)
    mla_latent_norm_epsilon: float = _f(
        DEEPSEEK_V2_LATENT_EPS, "Epsilon of the MLA latent norms (DeepSeek-V2 hard-codes 1e-6; "
        "--norm-epsilon is the other norms').", valid="> 0", config=False, function=True)
    q_lora_rank: Optional[int] = _f(None, "MLA query low-rank dim (unset: no q compression).",
                                    type=int, valid=">= 1", shape=True, config=False)
    kv_lora_rank: int = _f(32, "MLA key/value low-rank dim.", valid=">= 1", shape=True,
                           config=False)
    qk_head_dim: int = _f(128, "MLA query/key head dim (without the RoPE part).", valid=">= 1",
                          shape=True, config=False)
    qk_pos_emb_head_dim: int = _f(64, "MLA RoPE head dim of query/key.", valid=">= 1",
                                  shape=True, config=False)
    v_head_dim: int = _f(128, "MLA value head dim.", valid=">= 1", shape=True, config=False)
    # ------------------------------------------------------------------ positions
    position_embedding_type: str = _f("rope", "Position embedding: rope, or yarn (YaRN-scaled "
                                      "RoPE; multi-latent attention only).",
                                      choices=["rope", "yarn"], config=False, function=True)
    rotary_base: float = _f(10000.0, "RoPE base (theta).", valid="> 0", config=False, function=True)
    rotary_percent: float = _f(1.0, "Fraction of the head dim that gets RoPE (standard "
                               "attention).", valid="(0, 1]", config=False, function=True)
    rotary_scaling_factor: float = _f(1.0, "YaRN scaling factor.", valid=">= 1", config=False,
                                      function=True)
    mscale: float = _f(1.0, "YaRN mscale (multi-latent attention).", valid=">= 0", config=False,
                       function=True)
    mscale_all_dim: float = _f(0.0, "YaRN mscale_all_dim (multi-latent attention).",
                               valid=">= 0", config=False, function=True)
    original_max_position_embeddings: Optional[int] = _f(
        None, "YaRN: the original context length (default 4096).", type=int, valid=">= 1",
        arg="yarn_original_max_position_embeddings", config=False, function=True)
    beta_fast: Optional[float] = _f(None, "YaRN beta_fast (default 32).", type=float,
                                    valid="> 0", arg="yarn_beta_fast", config=False, function=True)
    beta_slow: Optional[float] = _f(None, "YaRN beta_slow (default 1).", type=float,
                                    valid="> 0", arg="yarn_beta_slow", config=False, function=True)
    max_position_embeddings: Optional[int] = _f(
        None, "Context length the model is declared for (exported as max_position_embeddings; "
        "default --seq-length).", type=int, valid=">= 1", config=False)
    untie_embeddings_and_output_weights: bool = _f(
        False, "Separate input embedding and output layer weights (default: tied, as in "
        "Megatron-LM).", shape=True, config=False)
    # ------------------------------------------------------------------ experts and router
    num_moe_experts: Optional[int] = _f(None, "Routed experts per layer (required: this trainer "
                                         "builds MoE/CoE layers only).", arg="num_experts",
                                         type=int, valid=">= 1", shape=True)
    moe_router_topk: int = _f(2, "Experts per token in each CoE pass.", valid=">= 1", function=True)
    moe_ffn_hidden_size: Optional[int] = _f(None, "Routed expert FFN size (default "
                                            "ffn_hidden_size).", type=int, valid=">= 1",
                                            shape=True)
    moe_shared_expert_intermediate_size: Optional[int] = _f(
        None, "Total FFN size of the shared expert(s); unset = no shared expert.", type=int,
        valid=">= 1", shape=True)
    moe_router_score_function: str = _f("softmax", "Router score function.",
                                        choices=["softmax", "sigmoid"], function=True)
    moe_router_pre_softmax: bool = _f(False, "Softmax over all experts before top-k (no "
                                      "renormalisation of the top-k weights).", function=True)
    moe_router_topk_scaling_factor: Optional[float] = _f(
        None, "Multiply the routing weights by this (DeepSeek's routed_scaling_factor).",
        type=float, valid="> 0", function=True)
    moe_router_num_groups: Optional[int] = _f(None, "Group-limited routing: expert groups.",
                                              type=int, valid=">= 1", function=True)
    moe_router_group_topk: Optional[int] = _f(None, "Group-limited routing: groups selected "
                                              "per token.", type=int, valid=">= 1", function=True)
    moe_router_enable_expert_bias: bool = _f(False, "Aux-loss-free expert bias (updated once "
                                             "per step in finalize_model_grads).", shape=True)
    moe_layer_freq: object = _f(
        1, "Which layers are MoE (CoE) layers, the rest dense MLPs of --ffn-hidden-size: an "
        "integer N (one MoE layer every N layers, from layer 0) or a 0/1 list with one entry per "
        "layer, e.g. '[0]*1+[1]*3' (DeepSeek's first_k_dense_replace=1 of 4 layers).",
        type=lambda v: parse_moe_layer_freq(v), shape=True)
    # ------------------------------------------------------------------ chain of experts
    coe_iterations: int = _f(1, "C: chained routing passes per CoE layer (1 = one pass).",
                             valid=">= 1", shape=True)
    coe_inner_residual: bool = _f(True, "Residual around each CoE pass (paper: on).", function=True)
    coe_outer_residual: bool = _f(False, "Residual around the whole CoE layer (paper: off; "
                                  "Megatron's standard MoE: on).", function=True)
    coe_shared_router: bool = _f(False, "One router shared by all passes (ablation).",
                                 shape=True)
    # ------------------------------------------------------------------ not options
    vocab_size: Optional[int] = field(default=None, metadata=dict(option=False))
    """Padded vocabulary of the built model (from the tokenizer; recorded, not an option)."""

    # ------------------------------------------------------------------ derived
    @property
    def latent_norms(self) -> bool:
        """Whether the MLA q/kv latents are normalised (qk_layernorm, default on with MLA)."""
        return self.multi_latent_attention and self.qk_layernorm_on

    @property
    def qk_layernorm_on(self) -> bool:
        return self.multi_latent_attention if self.qk_layernorm is None else bool(self.qk_layernorm)

    @property
    def activation(self) -> str:
        return "silu" if self.gated_linear_unit else "gelu"

    @property
    def yarn(self) -> Optional[dict]:
        """YaRN parameters (Hugging Face ``rope_scaling`` keys) or None for plain RoPE."""
        if self.position_embedding_type != "yarn":
            return None
        return dict(type="yarn", factor=float(self.rotary_scaling_factor),
                    original_max_position_embeddings=int(
                        self.original_max_position_embeddings
                        or YARN_DEFAULTS["original_max_position_embeddings"]),
                    beta_fast=float(self.beta_fast or YARN_DEFAULTS["beta_fast"]),
                    beta_slow=float(self.beta_slow or YARN_DEFAULTS["beta_slow"]),
                    mscale=float(self.mscale), mscale_all_dim=float(self.mscale_all_dim))

    def moe_layer_pattern(self) -> list:
        """[1 (CoE layer) / 0 (dense MLP)] per layer (``--moe-layer-freq``)."""
        return moe_layer_pattern(self.moe_layer_freq, self.num_layers or 0)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.moe_layer_pattern()[layer_idx])

    @property
    def num_routers(self) -> int:
        """Routers per CoE layer: one per pass, or one shared by all passes."""
        return 1 if self.coe_shared_router else self.coe_iterations

    def is_standard_moe(self) -> bool:
        """Megatron's standard MoE layer: one pass, ``h + MoE(LN(h))``."""
        return (self.coe_iterations == 1 and not self.coe_inner_residual
                and self.coe_outer_residual)

    def replace(self, **changes) -> "ModelArch":
        return dataclasses.replace(self, **changes)

    def normalized(self) -> "ModelArch":
        """The one record of this model: every size that equals what leaving it unset builds is
        unset (``kv_channels``, ``num_query_groups``, ``ffn_hidden_size``,
        ``moe_ffn_hidden_size``), ``qk_layernorm`` written out and ``moe_layer_freq`` in its
        shortest form; two records of one model compare equal after this."""
        a = self.resolve_defaults()
        a = a.replace(moe_layer_freq=compact_moe_layer_freq(a.moe_layer_pattern()))
        if a.multi_latent_attention:
            a = a.replace(num_query_groups=None,
                          kv_channels=None if a.kv_channels == a.v_head_dim else a.kv_channels)
        for name in ("kv_channels", "num_query_groups", "moe_ffn_hidden_size", "ffn_hidden_size"):
            value = getattr(a, name)
            if value is not None and a.replace(**{name: None}).resolved(name) == value:
                a = a.replace(**{name: None})
        return a

    # ------------------------------------------------------------------ trainer options
    @classmethod
    def from_args(cls, args, vocab_size: Optional[int] = None) -> "ModelArch":
        """The record of a trainer run (``TrainArgs`` or any object with the option names)."""
        kw = {f.name: getattr(args, arg_name(f)) for f in option_fields()}
        if kw["max_position_embeddings"] is None and hasattr(args, "seq_length"):
            kw["max_position_embeddings"] = args.seq_length
        return cls(vocab_size=vocab_size, **kw).resolve_defaults()

    def resolve_defaults(self) -> "ModelArch":
        """This record with the defaults that depend on other fields written out
        (``qk_layernorm``: on with MLA), so that two records of one model are equal."""
        return self.replace(qk_layernorm=self.qk_layernorm_on)

    def to_option_values(self) -> dict:
        """{trainer option name: value} of this record (the inverse of ``from_args``)."""
        return {arg_name(f): getattr(self, f.name) for f in option_fields()}

    def check(self) -> list:
        """Rules between architecture fields; a list of one-line problems naming the flags."""
        p = []
        if self.position_embedding_type == "yarn" and not self.multi_latent_attention:
            p.append("--position-embedding-type yarn needs --multi-latent-attention (Megatron-Core "
                     "implements YaRN for MLA); use rope for standard attention")
        if self.multi_latent_attention and self.num_query_groups not in (None,
                                                                          self.num_attention_heads):
            p.append("--num-query-groups (grouped-query attention) does not apply to "
                     "--multi-latent-attention; leave it unset")
        if self.num_query_groups and self.num_attention_heads % self.num_query_groups:
            p.append(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                     f"--num-query-groups {self.num_query_groups}")
        if isinstance(self.moe_layer_freq, list) and len(self.moe_layer_freq) != self.num_layers:
            p.append(f"--moe-layer-freq has {len(self.moe_layer_freq)} entries for --num-layers "
                     f"{self.num_layers}; give one 0/1 entry per layer")
        elif self.num_layers and 1 not in self.moe_layer_pattern():
            p.append(f"--moe-layer-freq {self.moe_layer_freq} makes no layer a MoE layer")
        if (self.multi_latent_attention and self.position_embedding_type == "rope"
                and self.mscale_all_dim and self.rotary_scaling_factor > 1):
            p.append(f"--mscale-all-dim {self.mscale_all_dim:g} with --position-embedding-type "
                     f"rope and --rotary-scaling-factor {self.rotary_scaling_factor:g}: "
                     "Megatron-Core scales MLA attention by YaRN's mscale whatever the RoPE "
                     "type, so the model would be neither plain RoPE nor YaRN; for plain RoPE "
                     "set --mscale-all-dim 0 (or --rotary-scaling-factor 1), else use "
                     "--position-embedding-type yarn")
        if self.multi_latent_attention and self.rotary_percent != 1.0:
            p.append("--rotary-percent applies to standard attention only (MLA has "
                     "--qk-pos-emb-head-dim); leave it at 1.0")
        return p

    # ------------------------------------------------------------------ Megatron
    def to_config_kwargs(self) -> dict:
        """``TransformerConfig`` / ``MLATransformerConfig`` fields of this architecture."""
        import torch.nn.functional as F

        kw = {f.name: getattr(self, f.name) for f in option_fields() if f.metadata["config"]}
        if kw["ffn_hidden_size"] is None:
            kw["ffn_hidden_size"] = 4 * self.hidden_size
        if kw["moe_ffn_hidden_size"] is None:
            kw["moe_ffn_hidden_size"] = kw["ffn_hidden_size"]
        kw.update(gated_linear_unit=self.gated_linear_unit,
                  activation_func=F.silu if self.gated_linear_unit else F.gelu,
                  qk_layernorm=self.qk_layernorm_on)
        if self.num_query_groups is None:
            kw.pop("num_query_groups")
        if self.multi_latent_attention:
            kw.pop("num_query_groups", None)
            kw.update(q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                      qk_head_dim=self.qk_head_dim, qk_pos_emb_head_dim=self.qk_pos_emb_head_dim,
                      v_head_dim=self.v_head_dim, rotary_base=self.rotary_base,
                      mla_latent_norm_epsilon=self.mla_latent_norm_epsilon,
                      rope_type="yarn" if self.position_embedding_type == "yarn" else "rope",
                      rotary_scaling_factor=self.rotary_scaling_factor, mscale=self.mscale,
                      mscale_all_dim=self.mscale_all_dim)
            if self.position_embedding_type == "yarn":
                y = self.yarn
                kw.update(original_max_position_embeddings=y["original_max_position_embeddings"],
                          beta_fast=y["beta_fast"], beta_slow=y["beta_slow"])
        return kw

    def gpt_model_kwargs(self) -> dict:
        """``GPTModel`` arguments that are architecture (``build_coe_gpt_model``)."""
        return dict(share_embeddings_and_output_weights=not self.untie_embeddings_and_output_weights,
                    rotary_base=self.rotary_base, rotary_percent=self.rotary_percent)

    @classmethod
    def from_megatron_config(cls, config, vocab_size: Optional[int] = None,
                             max_position_embeddings: Optional[int] = None,
                             untie_embeddings_and_output_weights: bool = True,
                             rotary_base: Optional[float] = None,
                             rotary_percent: float = 1.0) -> "ModelArch":
        """The record of a built ``CoE*TransformerConfig`` (+ the ``GPTModel`` arguments)."""
        c = config
        mla = bool(getattr(c, "multi_latent_attention", False))
        kw = {}
        for f in option_fields():
            if f.metadata["config"] and hasattr(c, f.name):
                kw[f.name] = getattr(c, f.name)
        # the activation is derived (gated: silu, else gelu); converters refuse any other
        # (``conversion/hf_config.from_megatron_config``)
        kw["gated_linear_unit"] = bool(c.gated_linear_unit)
        kw.update(multi_latent_attention=mla, qk_layernorm=bool(c.qk_layernorm),
                  max_position_embeddings=max_position_embeddings,
                  untie_embeddings_and_output_weights=bool(untie_embeddings_and_output_weights),
                  rotary_percent=float(rotary_percent))
        if not mla and kw.get("num_query_groups") in (None, c.num_attention_heads):
            kw["num_query_groups"] = None
        if mla:
            kw.update(q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
                      qk_head_dim=c.qk_head_dim, qk_pos_emb_head_dim=c.qk_pos_emb_head_dim,
                      v_head_dim=c.v_head_dim, rotary_base=float(c.rotary_base),
                      num_query_groups=None,
                      mla_latent_norm_epsilon=float(getattr(c, "mla_latent_norm_epsilon",
                                                            c.layernorm_epsilon)))
            if c.kv_channels == c.v_head_dim:
                kw["kv_channels"] = None
            if c.rope_type == "yarn":
                kw.update(position_embedding_type="yarn",
                          rotary_scaling_factor=float(c.rotary_scaling_factor),
                          mscale=float(c.mscale), mscale_all_dim=float(c.mscale_all_dim),
                          original_max_position_embeddings=int(c.original_max_position_embeddings),
                          beta_fast=float(c.beta_fast), beta_slow=float(c.beta_slow))
        elif rotary_base is not None:
            kw["rotary_base"] = float(rotary_base)
        if kw.get("kv_channels") == c.hidden_size // c.num_attention_heads and not mla:
            kw["kv_channels"] = None
        return cls(vocab_size=vocab_size, **kw)

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArch":
        """A recorded record; fields it lacks (older checkpoints) keep their defaults."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_option_values(cls, values: dict, vocab_size: Optional[int] = None) -> "ModelArch":
        """The record of a recorded ``args`` dict (trainer option names), for checkpoints written
        before the record existed. An option the dict lacks was added since; it gets the value
        the code of that time built (``LEGACY_VALUES``: untied embeddings, latent norms with the
        main norms' eps), else its default."""
        kw = {}
        for f in option_fields():
            name = arg_name(f)
            if name in values:
                kw[f.name] = values[name]
            elif f.name in LEGACY_VALUES:
                kw[f.name] = LEGACY_VALUES[f.name](values)
        if kw.get("max_position_embeddings") is None and values.get("seq_length"):
            kw["max_position_embeddings"] = values["seq_length"]
        return cls(vocab_size=vocab_size, **kw).resolve_defaults()

    @classmethod
    def from_checkpoint_meta(cls, meta: dict) -> "ModelArch":
        """The model of a checkpoint: its record (``meta[RECORD_KEY]``), or for checkpoints
        without one, rebuilt from the recorded ``args`` (``from_option_values``)."""
        if isinstance(meta.get(RECORD_KEY), dict):
            return cls.from_dict(meta[RECORD_KEY])
        return cls.from_option_values(meta.get("args") or {}, meta.get("vocab_size"))

    # ------------------------------------------------------------------ shapes
    def resolved(self, name: str):
        """Field ``name`` with an unset size replaced by what it builds (``kv_channels`` hidden /
        heads, ``ffn_hidden_size`` 4 x hidden, ...), so that a record holding the resolved number
        (Megatron-LM's args do) equals one leaving it unset."""
        value = getattr(self, name)
        if name == "qk_layernorm":
            return self.qk_layernorm_on
        if name == "moe_layer_freq":  # 2 and [1, 0, 1, 0] are one model
            return tuple(self.moe_layer_pattern())
        if value is not None:
            return value
        if name == "kv_channels" and not self.multi_latent_attention:
            return self.hidden_size // self.num_attention_heads
        if name == "num_query_groups":
            return self.num_attention_heads
        if name == "ffn_hidden_size":
            return 4 * self.hidden_size
        if name == "moe_ffn_hidden_size":
            return self.resolved("ffn_hidden_size")
        return value

    def shape_differences(self, other: "ModelArch") -> list:
        """``[(option name, flag, self's value, other's value)]`` of the fields that change
        parameter shapes or state-dict keys (``shape`` in the field's metadata) and differ."""
        mla_only = {"q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                    "v_head_dim"}
        mla = self.multi_latent_attention or other.multi_latent_attention
        out = []
        for f in option_fields():
            if not f.metadata["shape"]:
                continue
            if (f.name in mla_only and not mla) or (
                    f.name in ("kv_channels", "num_query_groups") and mla):
                continue
            a, b = self.resolved(f.name), other.resolved(f.name)
            if a != b:
                out.append((arg_name(f), flag_of(f), getattr(self, f.name),
                            getattr(other, f.name)))
        return out

    def function_differences(self, other: "ModelArch") -> list:
        """``[(option name, flag, self's value, other's value)]`` of the fields that change what
        the model computes but no shape (``function`` and not ``shape`` in the field's metadata:
        residuals, norm eps, RoPE/YaRN, routing) and differ. A field the built model does not use
        on either side is not compared (YaRN without MLA, ``--rotary-percent`` with MLA, the
        latent-norm eps without latent norms, the YaRN window without YaRN); an unset value
        equals the value it builds (YaRN defaults, no top-k scaling = 1)."""
        mla = self.multi_latent_attention or other.multi_latent_attention
        yarn = "yarn" in (self.position_embedding_type, other.position_embedding_type)
        unused = set()
        if not mla:
            unused |= {"rotary_scaling_factor", "mscale", "mscale_all_dim"}
        else:
            unused.add("rotary_percent")
        if not yarn:
            unused |= {"original_max_position_embeddings", "beta_fast", "beta_slow"}
        if not (self.latent_norms or other.latent_norms):
            unused.add("mla_latent_norm_epsilon")
        out = []
        for f in option_fields():
            if not f.metadata["function"] or f.metadata["shape"] or f.name in unused:
                continue
            a, b = self.function_value(f.name), other.function_value(f.name)
            if a != b:
                out.append((arg_name(f), flag_of(f), getattr(self, f.name),
                            getattr(other, f.name)))
        return out

    def function_value(self, name: str):
        """The value of function field ``name`` as the model builds it (an unset YaRN field or
        top-k scaling factor is its default)."""
        value = getattr(self, name)
        if value is None and name in ("original_max_position_embeddings", "beta_fast",
                                      "beta_slow"):
            return float(YARN_DEFAULTS[name])
        if value is None and name == "moe_router_topk_scaling_factor":
            return 1.0
        return value

    def parameter_tensors(self, vocab_size: Optional[int] = None) -> dict:
        """The parameter tensors of the built model, unsplit: ``{"moe_layer", "dense_layer",
        "final_norm": [(name, numel, split)], "embedding": numel, "vocab": padded vocabulary}``.
        ``split`` says how a tensor is divided over ranks (``training/memory.py``): ``"tp"``
        (column / row parallel linear, split over tensor-parallel ranks), ``"replicated"``
        (norms, routers), ``"expert"`` (one routed expert's linear, split over expert-TP ranks;
        each EP rank holds experts / EP of them), ``"mla_down"`` (the MLA down projections:
        column parallel in the local layers, duplicated in Transformer Engine's).
        ``num_parameters`` sums these: one formula for counts and per-rank memory."""
        h, n = self.hidden_size, self.num_attention_heads
        norm = [("norm.weight", h, "replicated")]
        if self.normalization == "LayerNorm":
            norm.append(("norm.bias", h, "replicated"))

        def small_norm(name, size):
            out = [(f"{name}.weight", size, "replicated")]
            if self.normalization == "LayerNorm":
                out.append((f"{name}.bias", size, "replicated"))
            return out

        attn = []
        if self.multi_latent_attention:
            dq, dr, dv = self.qk_head_dim, self.qk_pos_emb_head_dim, self.v_head_dim
            r, rq = self.kv_lora_rank, self.q_lora_rank
            if rq:
                attn += [("linear_q_down_proj", h * rq, "mla_down"),
                         ("linear_q_up_proj", rq * n * (dq + dr), "tp")]
            else:
                attn.append(("linear_q_proj", h * n * (dq + dr), "tp"))
            attn += [("linear_kv_down_proj", h * (r + dr), "mla_down"),
                     ("linear_kv_up_proj", r * n * (dq + dv), "tp"),
                     ("linear_proj", n * dv * h, "tp")]
            if self.latent_norms:
                attn += small_norm("kv_layernorm", r) + (small_norm("q_layernorm", rq) if rq
                                                         else [])
        else:
            d = self.kv_channels or h // n
            g = self.num_query_groups or n
            attn += [("linear_qkv", h * (n + 2 * g) * d, "tp"), ("linear_proj", n * d * h, "tp")]
            if self.qk_layernorm_on:
                attn += small_norm("q_layernorm", d) + small_norm("k_layernorm", d)
        gated = 2 if self.gated_linear_unit else 1
        routed = self.resolved("moe_ffn_hidden_size")
        shared = self.moe_shared_expert_intermediate_size or 0
        moe = [("router", h * self.num_moe_experts, "replicated")] * self.num_routers
        moe += [("expert.linear_fc1", gated * routed * h, "expert"),
                ("expert.linear_fc2", routed * h, "expert")] * self.num_moe_experts
        if shared:
            moe += [("shared_experts.linear_fc1", gated * shared * h, "tp"),
                    ("shared_experts.linear_fc2", shared * h, "tp")]
        ffn = self.resolved("ffn_hidden_size")
        dense = [("linear_fc1", gated * ffn * h, "tp"), ("linear_fc2", ffn * h, "tp")]
        vocab = self.vocab_size if vocab_size is None else vocab_size
        return dict(moe_layer=norm + attn + norm + moe, dense_layer=norm + attn + norm + dense,
                    final_norm=list(norm), embedding=(vocab or 0) * h, vocab=vocab or 0)

    def num_parameters(self, vocab_size: Optional[int] = None) -> dict:
        """Parameter counts of the built model (``GPTModel`` from ``build_coe_gpt_model``):
        ``{"layer": one transformer layer, "final_norm", "embedding": input + output layer,
        "total"}``. ``vocab_size`` defaults to the record's."""
        t = self.parameter_tensors(vocab_size)
        layer = sum(numel for _, numel, _ in t["moe_layer"])
        dense = sum(numel for _, numel, _ in t["dense_layer"])
        norm = sum(numel for _, numel, _ in t["final_norm"])
        emb = t["embedding"] * (2 if self.untie_embeddings_and_output_weights else 1)
        n_moe = sum(self.moe_layer_pattern())
        return dict(layer=layer, final_norm=norm, embedding=emb,
                    total=n_moe * layer + (self.num_layers - n_moe) * dense + norm + emb)


def parse_moe_layer_freq(value):
    """Megatron-LM's ``--moe-layer-freq``: an int >= 1, a 0/1 list, or its text (``'2'``,
    ``'[0,1,1]'``, ``'[0]*1+[1]*3'``: list literals, ``*`` by an int and ``+`` only, never
    ``eval``). Raises ``ValueError`` saying what is accepted."""
    import ast

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError("not an integer or a 0/1 list")

    if isinstance(value, str):
        try:
            value = ev(ast.parse(value.strip(), mode="eval").body)
        except (SyntaxError, ValueError, TypeError):
            raise ValueError(f"expected an integer >= 1 or a 0/1 list such as '[0]*1+[1]*3', "
                             f"got {value!r}") from None
    if isinstance(value, bool):
        raise ValueError(f"expected an integer >= 1 or a 0/1 list, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"an integer moe_layer_freq must be >= 1, got {value}")
        return value
    if isinstance(value, (list, tuple)) and value and all(
            type(v) is int and v in (0, 1) for v in value):
        return list(value)
    raise ValueError(f"expected an integer >= 1 or a non-empty list of 0 (dense) / 1 (MoE), "
                     f"got {value!r}")


def moe_layer_pattern(freq, num_layers: int) -> list:
    """[1 (MoE/CoE layer) or 0 (dense MLP)] per layer of Megatron's ``moe_layer_freq`` (an int N:
    layers 0, N, 2N, ... are MoE; a list: itself, one entry per layer)."""
    if isinstance(freq, int) and not isinstance(freq, bool):
        return [1 if i % freq == 0 else 0 for i in range(num_layers)]
    return [int(v) for v in freq]


def compact_moe_layer_freq(pattern: list):
    """The shortest ``moe_layer_freq`` of a 0/1 per-layer pattern: 1 (all MoE), an int N, or the
    list itself."""
    pattern = [int(v) for v in pattern]
    for n in range(1, len(pattern) + 1):
        if moe_layer_pattern(n, len(pattern)) == pattern:
            return n
    return pattern


def hf_moe_layer_pattern(num_layers: int, first_k_dense_replace=0, moe_layer_freq=1) -> list:
    """DeepSeek's rule for which layers are MoE: ``layer >= first_k_dense_replace and layer %
    moe_layer_freq == 0`` (an int); a 0/1 list ``moe_layer_freq`` is the pattern itself."""
    if isinstance(moe_layer_freq, (list, tuple)):
        return [int(v) for v in moe_layer_freq]
    k, n = int(first_k_dense_replace or 0), int(moe_layer_freq or 1)
    return [1 if i >= k and i % n == 0 else 0 for i in range(num_layers)]


def first_k_dense(pattern: list):
    """DeepSeek's ``first_k_dense_replace`` k if ``pattern`` is k dense layers then only MoE
    layers, else None."""
    k = pattern.index(1) if 1 in pattern else len(pattern)
    return k if all(pattern[k:]) and k < len(pattern) else None


# The key of the record in a checkpoint's metadata (``coe_checkpoint.json``).
RECORD_KEY = "arch"

# Values of options added after the first checkpoints were written, as that code built the
# model (for ``from_option_values`` of an args record that lacks the option).
LEGACY_VALUES = {
    # embeddings were untied (build_coe_gpt_model's default) before the option existed
    "untie_embeddings_and_output_weights": lambda values: True,
    # Megatron-Core's latent norms use the main norms' eps (1e-5 unless set)
    "mla_latent_norm_epsilon": lambda values: values.get("layernorm_epsilon", 1e-5),
}


def default_of(name: str):
    """The one default of architecture field ``name`` (``ModelArch``'s), for the classes that
    declare the same field for Megatron-Core (``config.CoEConfigMixin``)."""
    return ModelArch.__dataclass_fields__[name].default


def option_fields() -> list:
    """The record's fields that are trainer options, in declaration order."""
    return [f for f in fields(ModelArch) if f.metadata.get("option", True)]


def arg_name(f) -> str:
    """The trainer option / Megatron-LM ``args`` name of an architecture field."""
    return f.metadata["arg"] or f.name


def flag_of(f) -> str:
    """The command-line flag of an architecture field."""
    return f.metadata["flag"] or "--" + arg_name(f).replace("_", "-")


def option_rows(opt) -> list:
    """``(name, type, dataclasses.field)`` rows of the trainer's option table, made with the
    table's own ``opt(default, help, ...)`` declaration (``training/options.py``)."""
    rows = []
    for f in option_fields():
        m = f.metadata
        kw = dict(type=m["type"], choices=m["choices"], shape=m["shape"], group="model",
                  valid=m["valid"], arch=f.name)
        if m["flag"]:
            kw["flag"] = m["flag"]
        kind = Optional[m["type"]] if f.default is None else m["type"]
        rows.append((arg_name(f), kind, opt(f.default, m["help"], **kw)))
    return rows


def flops_per_token(arch: ModelArch, seq_length: int, vocab_size: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add),
    counting ``coe_iterations x topk`` routed experts, the shared expert and the router in every
    pass, attention with a causal mask (half the keys on average) and the output layer."""
    a = arch
    h, n = a.hidden_size, a.num_attention_heads
    s_attn = seq_length / 2
    if a.multi_latent_attention:
        dq, dr, dv = a.qk_head_dim, a.qk_pos_emb_head_dim, a.v_head_dim
        q = h * a.q_lora_rank + a.q_lora_rank * n * (dq + dr) if a.q_lora_rank \
            else h * n * (dq + dr)
        kv = h * (a.kv_lora_rank + dr) + a.kv_lora_rank * n * (dq + dv)
        attn = q + kv + n * dv * h + n * (dq + dr) * s_attn + n * dv * s_attn
    else:
        d = a.kv_channels or h // n
        g = a.num_query_groups or n
        attn = 2 * h * n * d + 2 * h * g * d + 2 * n * d * s_attn
    mats = 3 if a.gated_linear_unit else 2
    routed = a.moe_ffn_hidden_size or a.ffn_hidden_size or 4 * h
    shared = a.moe_shared_expert_intermediate_size or 0
    per_pass = h * a.num_moe_experts + a.moe_router_topk * mats * h * routed + mats * h * shared
    layer = attn + a.coe_iterations * per_pass
    n_moe = sum(moe_layer_pattern(a.moe_layer_freq, a.num_layers))
    dense = attn + mats * h * (a.ffn_hidden_size or 4 * h)
    macs = n_moe * layer + (a.num_layers - n_moe) * dense + h * vocab_size
    return 3 * 2 * macs
