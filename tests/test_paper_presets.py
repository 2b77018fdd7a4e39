"""The presets are the paper's model (arXiv 2506.18945, its published config), field by field.

The table below is written from the paper's model configuration, not from the presets: a
DeepSeek-V2-Lite-style model with MLA (no query compression, kv rank 512, nope/rope/v head dims
128/64/128), hidden 1024, 4 layers, 8 heads, 63 routed + 1 shared experts of FFN 704, RMSNorm eps
1e-6 (latent norms always on, eps 1e-6), YaRN (factor 40, mscale 0.707, mscale_all_dim 0.707,
original context 4096, beta_fast 32, beta_slow 1, theta 10000, max positions 163840), untied
embeddings, softmax router over all experts without renormalisation, constant LR after a 10%
warmup. Every ``examples/*.yaml`` paper preset must match it; the tiny CPU presets make the same
architectural choices scaled down. ``test_paper_size_parameter_count`` builds the paper-size
presets on CPU at 1 layer and prints their parameter counts (the paper: 570.9M non-embedding
parameters for 4 layers = 544.5 x 2^20).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_coe.arch import ModelArch
from megatron_coe.training.options import parse_args

ROOT = Path(__file__).resolve().parents[1]

PAPER = dict(  # the paper's values (option names)
    num_layers=4, hidden_size=1024, num_attention_heads=8, multi_latent_attention=True,
    q_lora_rank=None, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64, v_head_dim=128,
    normalization="RMSNorm", layernorm_epsilon=1e-6, qk_layernorm=True,
    mla_latent_norm_epsilon=1e-6, swiglu=True, untie_embeddings_and_output_weights=True,
    position_embedding_type="yarn", rotary_base=10000.0, rotary_scaling_factor=40.0, mscale=0.707,
    mscale_all_dim=0.707, yarn_original_max_position_embeddings=4096, yarn_beta_fast=32.0,
    yarn_beta_slow=1.0, max_position_embeddings=163840, moe_ffn_hidden_size=704,
    moe_shared_expert_intermediate_size=704, moe_router_score_function="softmax",
    moe_router_pre_softmax=True, lr_decay_style="constant", lr_warmup_fraction=0.1,
)
# Paper vocabulary: DeepSeek-V2's tokenizer (102400 tokens). The trainer takes the vocabulary from
# the tokenizer it is given (--tokenizer-model, or the one preprocess_data.py trained for the
# data), so the presets cannot hold it: trained with DeepSeek-V2's tokenizer they have exactly
# the paper's 102400 (a multiple of 128: not padded); with the bundled GSM8K BPE tokenizer, its
# size. The parameter counts below use 102400.
PAPER_VOCAB = 102400
PRESETS = {  # file: (routed experts, top-k per pass, C, inner residual, outer residual, shared router)
    "moe_8_64": (63, 8, 1, True, False, False),  # the paper's MoE baseline: C=1, inner on, outer off
    "coe2_4_64": (63, 4, 2, True, False, False),
    "coe2_4_48": (47, 4, 2, True, False, False),
    "coe2_4_64_shared_router": (63, 4, 2, True, False, True),
    "coe2_4_64_outer_residual": (63, 4, 2, False, True, False),
    "megatron_moe_8_64": (63, 8, 1, False, True, False),  # Megatron's standard MoE, not the paper's
}
TINY = {"moe_cpu": "moe_8_64", "coe2_cpu": "coe2_4_64", "coe2_shared_router_cpu":
        "coe2_4_64_shared_router", "coe2_outer_residual_cpu": "coe2_4_64_outer_residual",
        "megatron_moe_cpu": "megatron_moe_8_64"}
SCALED = {"num_layers", "hidden_size", "num_attention_heads", "kv_lora_rank", "qk_head_dim",
          "qk_pos_emb_head_dim", "v_head_dim", "moe_ffn_hidden_size",
          "moe_shared_expert_intermediate_size"}


def _chain(args):
    return (args.num_experts, args.moe_router_topk, args.coe_iterations, args.coe_inner_residual,
            args.coe_outer_residual, args.coe_shared_router)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paper_preset_matches_the_paper(name):
    args = parse_args(["--config", str(ROOT / f"examples/{name}.yaml")])
    wrong = {k: (getattr(args, k), v) for k, v in PAPER.items() if getattr(args, k) != v}
    assert not wrong, f"{name}: (preset, paper) {wrong}"
    assert _chain(args) == PRESETS[name]
    arch = ModelArch.from_args(args)
    assert arch.latent_norms and arch.yarn == dict(
        type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
        beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)


@pytest.mark.parametrize("tiny", sorted(TINY))
def test_tiny_preset_makes_the_same_choices_scaled_down(tiny):
    args = parse_args(["--config", str(ROOT / f"examples/tiny/{tiny}.yaml")])
    paper = PRESETS[TINY[tiny]]
    wrong = {k: (getattr(args, k), v) for k, v in PAPER.items()
             if k not in SCALED and getattr(args, k) != v}
    assert not wrong, f"{tiny}: (preset, paper) {wrong}"
    assert _chain(args)[2:] == paper[2:]  # C, residuals, shared router
    assert args.moe_router_topk * args.coe_iterations == 4  # paper: 8 = C x k, halved


def _count_worker(rank, world, configs):
    import torch

    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.training.setup import build_model_config

    install_cpu_compat()
    pg = initialize_parallel()
    out = {}
    for name, argv in configs.items():
        args = parse_args(argv)
        config = build_model_config(args)
        torch.manual_seed(0)
        # vocabulary 128: the embedding and output layer are counted from the paper's vocabulary
        model = build_coe_gpt_model(config, pg_collection=pg, vocab_size=128,
                                    max_sequence_length=64,
                                    **ModelArch.from_args(args).gpt_model_kwargs())
        total = sum(p.numel() for p in model.parameters())
        emb = sum(p.numel() for n, p in model.named_parameters()
                  if "word_embeddings" in n or "output_layer" in n)
        out[name] = total - emb
    return out


@pytest.mark.timeout(300)
def test_paper_size_parameter_count():
    """Paper-size presets at 1 layer on CPU; x4 layers vs the paper's 570.9M non-embedding."""
    from megatron_coe.testing.distributed import run_distributed

    names = ["moe_8_64", "coe2_4_64", "coe2_4_48"]
    configs = {n: ["--config", str(ROOT / f"examples/{n}.yaml"), "--num-layers", "1",
                   "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1"]
               for n in names}
    counts = run_distributed(_count_worker, 1, configs=configs)[0]
    embedding = 2 * PAPER_VOCAB * PAPER["hidden_size"]  # untied input + output
    for name in names:
        one = counts[name]  # one layer + the final norm
        final_norm = PAPER["hidden_size"]
        four = 4 * (one - final_norm) + final_norm
        print(f"{name}: 1 layer {one / 1e6:.2f}M non-embedding; 4 layers {four / 1e6:.1f}M "
              f"({four / 2**20:.1f} Mi) non-embedding, {(four + embedding) / 1e6:.1f}M with the "
              f"{PAPER_VOCAB}-token untied embeddings")
        if name == "moe_8_64":
            assert abs(four / 1e6 - 570.9) < 0.5, four


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_paper_vocabulary_is_deepseek_v2s(name):
    """With DeepSeek-V2's 102400-token tokenizer a preset's padded vocabulary is exactly 102400,
    and the record counts the paper's untied embeddings (2 x 102400 x 1024) on top of the
    non-embedding parameters."""
    from megatron_coe.training.setup import padded_vocab_size

    args = parse_args(["--config", str(ROOT / f"examples/{name}.yaml")])
    assert padded_vocab_size(PAPER_VOCAB, args) == PAPER_VOCAB
    counts = ModelArch.from_args(args).num_parameters(PAPER_VOCAB)
    assert counts["embedding"] == 2 * PAPER_VOCAB * PAPER["hidden_size"]
    non_embedding = counts["total"] - counts["embedding"]
    print(f"{name}: {non_embedding / 1e6:.1f}M non-embedding ({non_embedding / 2**20:.1f} Mi), "
          f"{counts['total'] / 1e6:.1f}M with the {PAPER_VOCAB}-token untied embeddings")
    experts, _, c, _, _, shared_router = PRESETS[name]
    if experts == 63 and (c == 1 or shared_router):  # the paper's count: one router per layer
        assert abs(non_embedding / 1e6 - 570.9) < 0.5, non_embedding
