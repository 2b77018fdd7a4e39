"""Exports never compute a different function under a borrowed name.

For each variant (C in {1, 2, 3}, shared router, inner + outer residual, YaRN, no latent norms,
latent eps other than DeepSeek-V2's 1e-6, Megatron's standard MoE) a tiny Megatron model with
non-trivial weights is exported in memory; the export, loaded by the code of its declared model
type, gives the Megatron model's logits (fp32, max abs diff <= 1e-4), and where it claims stock
``deepseek_v2``, ``transformers``' own ``DeepseekV2ForCausalLM`` does too. The model type is the
borrowed one (``coe_deepseekv2`` / ``deepseek_v2``) only when the published semantics compute the
model exactly; otherwise it is this project's own type and the spec says why.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megatron_coe.testing.distributed import run_distributed

VOCAB, SEQ = 128, 16
PAPER_TINY = dict(qk_layernorm=True, moe_router_pre_softmax=True, gated_linear_unit=True,
                  activation_func=F.silu, moe_shared_expert_intermediate_size=32,
                  layernorm_epsilon=1e-6, mla_latent_norm_epsilon=1e-6)
YARN = dict(rope_type="yarn", rotary_scaling_factor=40.0, mscale=0.707, mscale_all_dim=0.707,
            original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0)
CASES = {  # name: (config overrides, expected model type)
    "C1": (dict(coe_iterations=1), "coe_deepseekv2"),
    "C2": (dict(coe_iterations=2), "coe_deepseekv2"),
    "C3": (dict(coe_iterations=3), "coe_deepseekv2"),
    "shared_router": (dict(coe_iterations=2, coe_shared_router=True), "coe_deepseekv2"),
    "inner_outer": (dict(coe_iterations=2, coe_outer_residual=True), "coe_deepseekv2"),
    "yarn": (dict(coe_iterations=2, **YARN), "coe_deepseekv2"),
    "no_latent_norms": (dict(coe_iterations=2, qk_layernorm=False), "coe_megatron"),
    "latent_eps_1e-5": (dict(coe_iterations=2, mla_latent_norm_epsilon=1e-5), "coe_megatron"),
    "layernorm": (dict(coe_iterations=2, normalization="LayerNorm"), "coe_megatron"),
    # a dense first layer (first_k_dense_replace 1): the published code loads it but its decoder
    # layer calls self.mlp(h, _iter) on the dense MLP too, which fails (it was coe_deepseekv2)
    "dense_first": (dict(coe_iterations=2, moe_layer_freq=[0, 1]), "coe_megatron"),
    "megatron_moe": (dict(coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True),
                     "deepseek_v2"),
    # main norms' eps 1e-5 (rms_norm_eps), latent norms DeepSeek-V2's 1e-6: still exact
    "megatron_moe_norm_eps_1e-5": (dict(coe_iterations=1, coe_inner_residual=False,
                                        coe_outer_residual=True, layernorm_epsilon=1e-5),
                                   "deepseek_v2"),
}


def _export_worker(rank, world, overrides, save, tokens):
    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.conversion.export import export_model
    from megatron_coe.conversion import hf_config
    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.testing.configs import tiny_config

    install_cpu_compat()
    pg = initialize_parallel()
    config = tiny_config(mla=True, **dict(PAPER_TINY, **overrides))
    spec = hf_config.from_megatron_config(config, vocab_size=VOCAB, max_position_embeddings=SEQ)
    model = build_coe_gpt_model(config, pg_collection=pg, vocab_size=VOCAB, max_sequence_length=SEQ)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms away from 1; latents scaled down so the norm eps matters
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(1 + 2.0 * torch.rand(p.shape, generator=g))
            if "linear_kv_down_proj" in name or "linear_q_down_proj" in name:
                p.mul_(0.02)
    model.eval()
    lines = []
    result = export_model(model, spec, save, show_progress=False, log=lines.append)
    s = tokens.shape[1]
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    with torch.no_grad():
        logits = model(tokens, torch.arange(s)[None].expand(tokens.shape[0], -1), mask)
    return (logits, result.format, hf_config.published_problems(spec),
            hf_config.stock_deepseek_v2_problems(spec), lines)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_computes_the_megatron_function_under_its_declared_type(case, tmp_path):
    from transformers import AutoModelForCausalLM, DeepseekV2ForCausalLM

    overrides, want_type = CASES[case]
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    logits, fmt, published, stock, lines = run_distributed(
        _export_worker, 1, overrides=overrides, save=str(tmp_path / "hf"), tokens=tokens)[0]
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert cfg["model_type"] == want_type, (case, published, stock)
    notes = [line for line in lines if line.startswith("note: exporting as")]
    if want_type == "coe_megatron":
        assert published, "the own type is used only with a reason"
        assert notes == [f"note: exporting as this project's own model type 'coe_megatron' "
                         f"(remote code), not 'coe_deepseekv2': {published[0]}"], lines
    else:
        assert not notes, lines
    if case == "dense_first":
        assert (cfg["first_k_dense_replace"], cfg["moe_layer_freq"]) == (1, 1)
        assert published == ["the published CoE code runs no dense layer (its decoder layer passes "
                             "the CoE iteration to every MLP); this model has dense layer(s) [0] "
                             "(--moe-layer-freq)"]
    if want_type == "coe_deepseekv2":
        assert not published and cfg["qk_layernorm"] and cfg["latent_norm_eps"] == 1e-6
    if want_type == "deepseek_v2":
        model = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"),
                                                     trust_remote_code=True).eval()
        assert model.config.model_type == want_type
    with torch.no_grad():
        diff = (model(tokens).logits - logits).abs().max().item()
    print(f"[{case}] {want_type}: max abs logit diff {diff:.3g}")
    assert diff <= 1e-4, f"{case}: max abs logit diff {diff}"


def test_borrowed_type_refused_for_a_model_it_does_not_describe():
    """Forcing stock deepseek_v2 for a model without latent norms is refused with the reason."""
    from megatron_coe.conversion.export import choose_format
    from megatron_coe.conversion import hf_config
    from megatron_coe.conversion.hf_config import ConversionError
    from megatron_coe.testing.configs import tiny_config

    config = tiny_config(mla=True, **dict(PAPER_TINY, **CASES["megatron_moe"][0],
                                          qk_layernorm=False))
    spec = hf_config.from_megatron_config(config, vocab_size=VOCAB, max_position_embeddings=SEQ)
    with pytest.raises(ConversionError, match="latents"):
        choose_format(spec, "deepseek_v2")
    eps = hf_config.from_megatron_config(
        tiny_config(mla=True, **dict(PAPER_TINY, **CASES["megatron_moe"][0],
                                     mla_latent_norm_epsilon=1e-5)),
        vocab_size=VOCAB, max_position_embeddings=SEQ)
    with pytest.raises(ConversionError, match="eps 1e-06"):
        choose_format(eps, "deepseek_v2")
    odd = spec.replace(qk_layernorm=True, mla_latent_norm_epsilon=1e-6,
                       moe_shared_expert_intermediate_size=48)
    assert any("not a multiple" in p for p in hf_config.published_problems(odd))
    assert hf_config.model_type(odd) == "coe_megatron"
