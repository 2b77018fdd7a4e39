"""The published semantics of the paper's model, pinned in this project's own plain-torch reference.

``reference_logits`` below is written from scratch from DeepSeek-V2's attention and the CoE layer
as published, over Hugging Face-named weights (the names of the published checkpoints). Its
switches are the facts a test can pin down independently; their published values are:

* ``latent_norm=True``: DeepSeek-V2 always RMS-normalises the kv latent (``kv_a_layernorm``);
* ``latent_eps=1e-6``: with eps 1e-6 hard-coded (``rms_norm_eps`` is the other norms');
* ``rope="interleaved"``: RoPE rotates adjacent pairs ``(x[2i], x[2i+1])`` (DeepSeek-V2's layout),
  not the two halves;
* ``renormalise=False``: each pass's gates are a softmax over all routed experts, top-k taken
  without renormalising the k weights;
* ``shared_every_pass=True``: the shared expert is applied in every pass of the chain;
* ``norm_every_pass=False``: the pre-MLP norm is applied once, before the chain.

The tests: (1) the reference with C=1, inner residual off, outer on equals ``transformers``'
own ``DeepseekV2ForCausalLM`` on the same weights: the reference is DeepSeek-V2; (2) a Megatron
CoE model (C=2 and C=3, inner residual; paper settings) equals the reference with the published
switches (fp32, <= 1e-4); (3) flipping any one switch moves the reference away from the Megatron
model by more than ten times that tolerance, so each fact is actually exercised.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_coe.testing.distributed import run_distributed

VOCAB, SEQ, TOL = 128, 16, 1e-4
PUBLISHED = dict(latent_norm=True, latent_eps=1e-6, rope="interleaved", renormalise=False,
                 shared_every_pass=True, norm_every_pass=False)
DEVIATIONS = {  # one published fact changed at a time
    "no latent norm": dict(latent_norm=False),
    "latent eps 1e-5": dict(latent_eps=1e-5),
    "RoPE on halves": dict(rope="halves"),
    "renormalised top-k": dict(renormalise=True),
    "shared expert in the first pass only": dict(shared_every_pass=False),
    "norm before every pass": dict(norm_every_pass=True),
}


# ====================================================================== reference (plain torch)
def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x, pos, theta, layout):
    """RoPE over the last dim of ``x`` [b, s, heads, d]; ``layout``: which elements pair up."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None].double() * inv[None]  # [s, d/2]
    cos, sin = ang.cos().float()[None, :, None], ang.sin().float()[None, :, None]
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
        return out.flatten(-2)
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def swiglu(x, w, prefix):
    return (F.silu(x @ w[prefix + "gate_proj.weight"].t()) * (x @ w[prefix + "up_proj.weight"].t())
            ) @ w[prefix + "down_proj.weight"].t()


def mla(x, w, p, cfg, f):
    """DeepSeek-V2 attention without query compression (the paper's model)."""
    b, s, _ = x.shape
    n, dn, dr, dv, r = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"],
                        cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"])
    q = (x @ w[p + "q_proj.weight"].t()).view(b, s, n, dn + dr)
    q_nope, q_pe = q[..., :dn], q[..., dn:]
    kv_a = x @ w[p + "kv_a_proj_with_mqa.weight"].t()
    latent, k_pe = kv_a[..., :r], kv_a[..., r:].view(b, s, 1, dr)
    if f["latent_norm"]:
        latent = rms_norm(latent, w[p + "kv_a_layernorm.weight"], f["latent_eps"])
    kv = (latent @ w[p + "kv_b_proj.weight"].t()).view(b, s, n, dn + dv)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    pos = torch.arange(s)
    q_pe, k_pe = rope(q_pe, pos, cfg["rope_theta"], f["rope"]), rope(k_pe, pos, cfg["rope_theta"],
                                                                      f["rope"])
    qh = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
    kh = torch.cat([k_nope, k_pe.expand(b, s, n, dr)], -1).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(dn + dr)
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    out = (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2).reshape(b, s, n * dv)
    return out @ w[p + "o_proj.weight"].t()


def coe_mlp(h, w, p, cfg, f, *, stock):
    """The CoE chain on ``x0 = norm(h)``: x_t = I_inner x_{t-1} + sum_i g_{t,i} E_i(x_{t-1}) + S."""
    eps, k, E = cfg["rms_norm_eps"], cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    C = 1 if stock else cfg["inner_iter"]
    inner = False if stock else cfg["inner_residual"]
    outer = True if stock else cfg["outer_residual"]
    norm_w = w[p + "post_attention_layernorm.weight"]
    x = rms_norm(h, norm_w, eps)
    for t in range(C):
        if f["norm_every_pass"] and t > 0:
            x = rms_norm(x, norm_w, eps)
        gate = p + ("mlp.gate.weight" if stock or not cfg["use_igate"] else f"mlp.gate.{t}.weight")
        probs = (x @ w[gate].t()).softmax(-1)  # softmax over all routed experts
        g, idx = probs.topk(k, dim=-1)
        if f["renormalise"]:
            g = g / g.sum(-1, keepdim=True)
        routed = torch.zeros_like(x)
        for e in range(E):
            sel = (idx == e)
            if sel.any():
                weight = (g * sel).sum(-1, keepdim=True)
                routed = routed + weight * swiglu(x, w, f"{p}mlp.experts.{e}.")
        shared = swiglu(x, w, p + "mlp.shared_experts.") if (
            f["shared_every_pass"] or t == 0) else 0.0
        x = (x if inner else 0.0) + routed + shared
    return x + (h if outer else 0.0)


def reference_logits(tokens, w, cfg, stock=False, **changes):
    f = dict(PUBLISHED, **changes)
    eps = cfg["rms_norm_eps"]
    h = w["model.embed_tokens.weight"][tokens]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = h + mla(rms_norm(h, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", cfg, f)
        h = coe_mlp(h, w, p, cfg, f, stock=stock)
    h = rms_norm(h, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].t()


# ====================================================================== Megatron side
PAPER_TINY = dict(qk_layernorm=True, moe_router_pre_softmax=True, gated_linear_unit=True,
                  activation_func=F.silu, moe_shared_expert_intermediate_size=32,
                  layernorm_epsilon=1e-6, mla_latent_norm_epsilon=1e-6, q_lora_rank=None,
                  qk_pos_emb_head_dim=8)
CASES = {
    "C2": dict(coe_iterations=2),
    "C3": dict(coe_iterations=3),
    "stock": dict(coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True),
}


def _worker(rank, world, cases, root, tokens):
    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.conversion.export import export_model
    from megatron_coe.conversion import hf_config
    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.testing.configs import tiny_config

    install_cpu_compat()
    pg = initialize_parallel()
    out = {}
    for name, overrides in cases.items():
        config = tiny_config(mla=True, **dict(PAPER_TINY, **overrides))
        spec = hf_config.from_megatron_config(config, vocab_size=VOCAB, max_position_embeddings=SEQ)
        torch.manual_seed(0)
        model = build_coe_gpt_model(config, pg_collection=pg, vocab_size=VOCAB,
                                    max_sequence_length=SEQ)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # norms away from 1; small latents so the latent eps matters
            for pname, prm in model.named_parameters():
                if prm.dim() == 1:
                    prm.add_(0.1 * torch.randn(prm.shape, generator=g))
                else:
                    prm.mul_(1 + 2.0 * torch.rand(prm.shape, generator=g))
                if "linear_kv_down_proj" in pname:  # the latent rows; the RoPE rows stay large
                    prm[: config.kv_lora_rank].mul_(0.02)
        model.eval()
        export_model(model, spec, f"{root}/{name}", show_progress=False, log=lambda _: None)
        s = tokens.shape[1]
        with torch.no_grad():
            out[name] = model(tokens, torch.arange(s)[None].expand(tokens.shape[0], -1),
                              torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    logits = run_distributed(_worker, 1, cases=CASES, root=str(root), tokens=tokens)[0]
    return root, tokens, logits


def _load(path):
    import json

    from safetensors.torch import load_file

    w = {}
    for f in sorted(path.glob("*.safetensors")):
        w.update(load_file(str(f)))
    return w, json.loads((path / "config.json").read_text())


@pytest.mark.timeout(300)
def test_reference_is_transformers_deepseek_v2(exported):
    """C=1, inner off, outer on: the reference equals transformers' DeepseekV2ForCausalLM."""
    from transformers import DeepseekV2ForCausalLM

    root, tokens, _ = exported
    w, cfg = _load(root / "stock")
    assert cfg["model_type"] == "deepseek_v2"
    hf = DeepseekV2ForCausalLM.from_pretrained(str(root / "stock")).eval()
    with torch.no_grad():
        want = hf(tokens).logits
        got = reference_logits(tokens, w, cfg, stock=True)
    diff = (got - want).abs().max().item()
    print(f"reference vs transformers DeepseekV2ForCausalLM: {diff:.3g}")
    assert diff <= TOL


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["C2", "C3", "stock"])
def test_megatron_model_computes_the_published_function(exported, case):
    root, tokens, logits = exported
    w, cfg = _load(root / case)
    stock = cfg["model_type"] == "deepseek_v2"
    assert cfg["model_type"] == ("deepseek_v2" if case == "stock" else "coe_deepseekv2")
    with torch.no_grad():
        diff = (reference_logits(tokens, w, cfg, stock=stock) - logits[case]).abs().max().item()
    print(f"[{case}] Megatron vs published reference: {diff:.3g}")
    assert diff <= TOL


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fact", sorted(DEVIATIONS))
def test_each_published_fact_is_exercised(exported, fact):
    """Changing one fact of the reference moves it far from the Megatron model (C=2; the shared
    expert and per-pass norm facts need C > 1), so the comparison above pins every fact."""
    root, tokens, logits = exported
    w, cfg = _load(root / "C2")
    with torch.no_grad():
        diff = (reference_logits(tokens, w, cfg, **DEVIATIONS[fact]) - logits["C2"]).abs().max()
    print(f"[{fact}] Megatron vs the changed reference: {diff.item():.3g}")
    assert diff.item() > 10 * TOL, fact
