"""Tiny CoE configs for CPU tests and benchmarks (fp32, no fusions, no dropout)."""

from __future__ import annotations

from megatron_coe.config import CPU_UNFUSED, CoEMLATransformerConfig, CoETransformerConfig

CPU_SAFE = dict(
    CPU_UNFUSED,
    add_bias_linear=False,  # bias + SequentialMLP at TP=1 hits an in-place-on-view error (mlp.py:247)
    gradient_accumulation_fusion=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
)

TINY = dict(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=64,
    num_moe_experts=8,
    moe_router_topk=2,
    moe_ffn_hidden_size=32,
    moe_token_dispatcher_type="alltoall",
    normalization="RMSNorm",
    coe_iterations=2,
)

TINY_MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4,
                v_head_dim=8, rope_type="rope")


def tiny_config(mla: bool = False, **overrides):
    """A tiny CoE config; ``overrides`` replace any field (Megatron/CoE names)."""
    fields = dict(CPU_SAFE, **TINY)
    cls = CoETransformerConfig
    if mla:
        fields.update(TINY_MLA)
        cls = CoEMLATransformerConfig
    fields.update(overrides)
    return cls(**fields)
