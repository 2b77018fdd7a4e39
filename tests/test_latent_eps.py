"""The MLA latent norms keep ``mla_latent_norm_epsilon`` on the Transformer Engine spec, where
they are fused into TE's ``LayerNormColumnParallelLinear`` (``linear_q_up_proj``,
``linear_kv_up_proj``), on every Megatron-Core release.

Transformer Engine is absent on CPU, so the TE spec is built with a stand-in for TE's fused
norm+linear class, placed where Megatron-Core's TE spec puts it, and known to Megatron-Core as
the backend's fused class: ``QKNormConfigResolver`` (0.19) gets a backend whose
``column_parallel_layer_norm_linear()`` is the stand-in, as it gets TE's class on a GPU. The
stand-in takes its eps from ``config.layernorm_epsilon`` as TE's linear does. The spec then goes
through the CoE spec code (``get_coe_layer_spec(..., use_transformer_engine=True)``) and the
attention is built by Megatron-Core.

* 0.19: the resolver alone drops the spec's eps wrapper (the control: its answer is the bare
  stand-in class); the CoE attention (``compat.mla_latent_eps``) builds the latent norms with
  the latent eps.
* 0.16 (no resolver): the spec's classes are built as given; the latent norms get the latent eps.
"""

from __future__ import annotations

import pytest
import torch

from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from megatron_coe.testing.distributed import run_distributed

MAIN_EPS, LATENT_EPS = 1e-5, 1e-6
HAS_RESOLVER = hasattr(MLASelfAttention, "_resolve_qk_norm_config")  # 0.19: yes; 0.16: no


class StandInLayerNormColumnParallelLinear(torch.nn.Module):
    """Transformer Engine's ``LayerNormColumnParallelLinear`` for spec building on CPU: an RMS
    norm of the input (eps from ``config.layernorm_epsilon``, as TE reads it) and a linear."""

    def __init__(self, input_size, output_size, *, config, init_method=None, **unused):
        super().__init__()
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size))
        init_method(self.weight)

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.layer_norm_weight
        return x @ self.weight.t(), None


def _te_shaped_spec(num_experts=None, moe_grouped_gemm=False, qk_layernorm=False,
                    multi_latent_attention=False, **unused):
    """Megatron-Core's TE layer spec, as far as the MLA latent norms go: the latent norms fused
    into the up projections (the stand-in), no explicit q/kv norm modules; the rest local."""
    import dataclasses

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_coe.transformer.local_modules import MLADotProductAttention

    base = get_gpt_layer_local_spec(num_experts=num_experts, qk_layernorm=qk_layernorm,
                                    multi_latent_attention=multi_latent_attention,
                                    normalization="RMSNorm")
    attention = base.submodules.self_attention
    fused = StandInLayerNormColumnParallelLinear
    sub = dataclasses.replace(attention.submodules, linear_q_up_proj=fused,
                              linear_kv_up_proj=fused, q_layernorm=IdentityOp,
                              kv_layernorm=IdentityOp, core_attention=MLADotProductAttention)
    return dataclasses.replace(base, submodules=dataclasses.replace(
        base.submodules, self_attention=dataclasses.replace(attention, submodules=sub)))


def _worker(rank, world_size, q_lora_rank):
    from megatron.core.transformer.spec_utils import build_module

    from megatron_coe.compat import registry
    from megatron_coe.models import specs
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.testing.configs import tiny_config

    pg = initialize_parallel(seed=3)
    config = tiny_config(mla=True, qk_layernorm=True, q_lora_rank=q_lora_rank,
                         layernorm_epsilon=MAIN_EPS, mla_latent_norm_epsilon=LATENT_EPS)
    # the TE spec on a CPU: Megatron's TE layer spec replaced by the TE-shaped stand-in
    specs.require_transformer_engine = lambda what: None
    specs.get_gpt_layer_with_transformer_engine_spec = _te_shaped_spec
    spec = specs.get_coe_layer_spec(config, use_transformer_engine=True)
    attention_spec = spec.submodules.self_attention
    submodules = attention_spec.submodules
    out = dict(wrapped=[name for name in ("linear_q_up_proj", "linear_kv_up_proj")
                        if getattr(getattr(submodules, name), "latent_eps_of", None)
                        is StandInLayerNormColumnParallelLinear])

    if HAS_RESOLVER:  # the resolver sees the stand-in as the backend's fused norm+linear
        import megatron.core.transformer.mla_qk_norm_config as resolver_module
        from megatron.core.models.backends import LocalSpecProvider

        class StandInTEBackend(LocalSpecProvider):
            def column_parallel_layer_norm_linear(self):
                return StandInLayerNormColumnParallelLinear

        resolver_module.get_backend = lambda impl: StandInTEBackend()
        upstream = resolver_module.QKNormConfigResolver(config, submodules).resolve()
        out["upstream_kv_up"] = upstream["linear_kv_up_proj"].__name__

    attention = build_module(attention_spec, config=config, layer_number=1, pg_collection=pg)
    out.update(
        attention=type(attention).__name__,
        kv_up=(type(attention.linear_kv_up_proj).__name__, attention.linear_kv_up_proj.eps),
        q_up=(type(attention.linear_q_up_proj).__name__, attention.linear_q_up_proj.eps)
        if q_lora_rank else None,
        q_proj=type(attention.linear_q_proj).__name__ if q_lora_rank is None else None,
        marked="mla.latent_eps_kept" in registry.used(),
    )
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("q_lora_rank", [None, 16], ids=["no_query_compression", "q_lora"])
def test_te_fused_latent_norms_keep_latent_eps(q_lora_rank):
    (r,) = run_distributed(_worker, 1, q_lora_rank=q_lora_rank)
    fused = StandInLayerNormColumnParallelLinear.__name__
    # the CoE spec wraps the fused linears the latent norms live in (linear_q_up_proj is not
    # built without query compression)
    assert r["wrapped"] == ["linear_q_up_proj", "linear_kv_up_proj"]
    assert r["attention"] == "DeepSeekV2MLASelfAttention"
    assert r["kv_up"] == (fused, LATENT_EPS)
    if q_lora_rank is None:
        assert r["q_proj"] != fused  # DeepSeek-V2: no q norm without query compression
    else:
        assert r["q_up"] == (fused, LATENT_EPS)
    if HAS_RESOLVER:
        # control: Megatron-Core's resolver by itself replaces the wrapper by the bare class,
        # whose eps would be layernorm_epsilon (MAIN_EPS)
        assert r["upstream_kv_up"] == fused
        assert r["marked"]
    else:  # 0.16: no resolution step; the spec's wrappers are built as given
        assert not r["marked"]
