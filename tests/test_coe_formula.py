"""The CoE layer computes exactly the paper's formula, forward and backward.

With ``x0 = LN(h)``::

    x_t = I_inner * x_{t-1} + sum_i g_{t,i} E_i(x_{t-1}) + S(x_{t-1})      t = 1..C
    y   = x_C + I_outer * h

The layer under test is built the production way (``get_coe_layer_spec`` ->
``CoETransformerLayer`` with the pre-MLP norm, ``ChainOfExpertsLayer`` and the outer-residual
``mlp_bda``); only attention is replaced by identities so the layer's output is the MLP half.
The reference below is written from scratch in plain torch (its own norm, router matmul, top-k,
softmax/sigmoid, per-token expert MLPs, shared experts, residuals, seq-aux loss) on leaf copies
of the layer's parameters. Output, dL/dh and the gradient of every named parameter must agree
to 1e-5 (fp32) under a random upstream gradient.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_coe.testing.distributed import run_distributed

TOL = 1e-5
# smallest accepted gaps between the k-th and (k+1)-th logit / routing score of any token
MIN_LOGIT_GAP, MIN_SCORE_GAP = 1e-4, 1e-6
FC2_SCALE = 0.5  # routed/shared experts' fc2 init scale, see randomize_parameters
S, B = 8, 2  # sequence length, micro-batch size: T = 16 tokens


# ====================================================================== reference (plain torch)
def ref_norm(x, weight, bias, kind, eps):
    if kind == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps) * weight + bias


def ref_activation(pre, glu, act):
    if glu:  # fc1 output = [gate; up]: act(gate) * up
        gate, up = pre.chunk(2, dim=-1)
        return act(gate) * up
    return act(pre)


def ref_mlp(x, w1, w2, glu, act):
    """Dense MLP without bias: ``w2 @ act(w1 @ x)`` (weights are [out, in])."""
    return ref_activation(x @ w1.t(), glu, act) @ w2.t()


def ref_route(logits, topk, score_function, pre_softmax, scaling_factor):
    """Top-k indices ``[T, k]``, gates ``[T, k]`` and how unambiguous the choice is.

    Every score function is monotonic in the logits, so the choice is the top-k of the logits;
    ``(logit_gap, score_gap)`` are the smallest gaps between the k-th and (k+1)-th logit and
    selection score over all tokens (fp32 rounding cannot flip a choice with clear gaps).
    """
    if score_function == "softmax":
        if pre_softmax:  # softmax over all experts, keep the top-k probabilities as they are
            select_scores = torch.softmax(logits, dim=-1)
            gates, idx = torch.topk(select_scores, topk, dim=-1)
        else:  # top-k on logits, softmax over the k chosen
            select_scores = logits
            top_logits, idx = torch.topk(logits, topk, dim=-1)
            gates = torch.softmax(top_logits, dim=-1)
    else:  # sigmoid: top-k of sigmoid scores, renormalised over the k when k > 1
        select_scores = torch.sigmoid(logits)
        top, idx = torch.topk(select_scores, topk, dim=-1)
        gates = top / top.sum(dim=-1, keepdim=True) if topk > 1 else top
    if scaling_factor:
        gates = gates * scaling_factor
    def gap(values):
        ranked = values.detach().sort(dim=-1, descending=True).values
        return (ranked[:, topk - 1] - ranked[:, topk]).min().item()

    return idx, gates, (gap(logits), gap(select_scores))


def ref_routed_experts(x, idx, gates, w1, w2, glu, act):
    """``sum_j g[n, j] * E_{idx[n, j]}(x[n])`` for every token n, each expert evaluated per token.

    ``w1``/``w2``: stacked expert weights ``[E, F1, H]`` / ``[E, H, F]``; gathering them per
    (token, slot) evaluates exactly the chosen experts on exactly that token.
    """
    pre = torch.einsum("tkfh,th->tkf", w1[idx], x)
    out = torch.einsum("tkhf,tkf->tkh", w2[idx], ref_activation(pre, glu, act))
    return (gates.unsqueeze(-1) * out).sum(dim=1)


def ref_seq_aux_loss(logits, topk, score_function, num_experts, coeff, s, b):
    """DeepSeek's sequence-level balance loss, averaged over the b sequences of the micro-batch.

    Per sequence: ``E * coeff / (k * s^2) * sum_i (sum_n p_{n,i}) * (#tokens routed to i)``, with
    p the full score distribution (softmax, or sigmoid normalised over all experts) and the
    routing counted by top-k of p. Tokens are laid out [s, b] (token n = pos * b + seq).
    """
    if score_function == "softmax":
        p = torch.softmax(logits, dim=-1)
    else:
        p = torch.sigmoid(logits)
        p = p / p.sum(dim=-1, keepdim=True)
    chosen = torch.zeros_like(p).scatter(1, torch.topk(p, topk, dim=-1).indices, 1.0)
    p_seq = p.view(s, b, num_experts).sum(dim=0)  # [b, E]
    count_seq = chosen.view(s, b, num_experts).sum(dim=0).detach()  # [b, E]
    per_seq = (p_seq * count_seq).sum(dim=-1) * num_experts * coeff / (topk * s * s)
    return per_seq.mean()


def reference_forward(h, params, cfg, reuse_first_routing=False, aux_passes=None):
    """The CoE formula on leaf tensors ``params`` (named like the layer's parameters).

    Returns ``(y, aux_loss, routing, gaps)``: ``routing[t]`` = expert indices ``[T, k]`` of
    pass t, ``gaps`` the smallest (logit, score) top-k gaps over all tokens and passes.
    ``reuse_first_routing`` is a deliberate bug, used to prove the comparison can fail;
    ``aux_passes`` (default: all) the passes whose seq-aux loss is added, to prove each counts.
    """
    s, b, hidden = h.shape
    act = cfg["activation"]
    glu = cfg["gated_linear_unit"]
    E, k = cfg["num_moe_experts"], cfg["moe_router_topk"]
    x = ref_norm(h, params["pre_mlp_layernorm.weight"], params.get("pre_mlp_layernorm.bias"),
                 cfg["normalization"], cfg["layernorm_epsilon"]).reshape(s * b, hidden)
    w1 = torch.stack([params[f"mlp.experts.local_experts.{i}.linear_fc1.weight"] for i in range(E)])
    w2 = torch.stack([params[f"mlp.experts.local_experts.{i}.linear_fc2.weight"] for i in range(E)])
    aux_loss = h.new_zeros(())
    routing, gaps = [], (math.inf, math.inf)
    for t in range(cfg["coe_iterations"]):
        router_w = params[f"mlp.routers.{0 if cfg['coe_shared_router'] else t}.weight"]
        logits = x @ router_w.t()
        idx, gates, pass_gaps = ref_route(
            logits, k, cfg["moe_router_score_function"], cfg["moe_router_pre_softmax"],
            cfg["moe_router_topk_scaling_factor"])
        gaps = tuple(map(min, gaps, pass_gaps))
        if reuse_first_routing:
            if t == 0:
                first_routing = idx, gates
            idx, gates = first_routing
        routing.append(idx)
        if cfg["seq_aux_coeff"] and (aux_passes is None or t in aux_passes):
            aux_loss = aux_loss + ref_seq_aux_loss(logits, k, cfg["moe_router_score_function"], E,
                                                   cfg["seq_aux_coeff"], s, b)
        x_next = ref_routed_experts(x, idx, gates, w1, w2, glu, act)
        if cfg["shared"]:
            x_next = x_next + ref_mlp(x, params["mlp.shared_experts.linear_fc1.weight"],
                                      params["mlp.shared_experts.linear_fc2.weight"], glu, act)
        if cfg["coe_inner_residual"]:
            x_next = x_next + x
        x = x_next
    y = x.reshape(s, b, hidden)
    if cfg["coe_outer_residual"]:
        y = y + h
    return y, aux_loss, routing, gaps


# ====================================================================== the layer (Megatron)
def build_layer(overrides, pg_collection):
    """``CoETransformerLayer`` from ``get_coe_layer_spec``, attention replaced by identities."""
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import build_module

    from megatron_coe.models.specs import get_coe_layer_spec
    from megatron_coe.testing.configs import tiny_config
    from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer
    from megatron_coe.transformer.coe_transformer_layer import CoETransformerLayer

    config = tiny_config(**overrides)
    spec = get_coe_layer_spec(config)
    spec = dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            spec.submodules,
            input_layernorm=IdentityOp,
            self_attention=IdentityOp,
            self_attn_bda=IdentityFuncOp,
        ),
    )
    layer = build_module(spec, config=config, layer_number=1, pg_collection=pg_collection)
    assert isinstance(layer, CoETransformerLayer) and isinstance(layer.mlp, ChainOfExpertsLayer)
    layer.train()
    return config, layer


def randomize_parameters(layer, gen):
    """O(1)-scale weights (Megatron's 0.02 init makes every pass nearly the identity)."""
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "layernorm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # [out, in]: O(1) outputs for O(1) inputs; experts' fc2 a bit smaller so
                # that C chained passes keep activations (and fp32 rounding) around unit scale
                scale = FC2_SCALE if "linear_fc2" in name else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _reference_config(config):
    """What the reference needs to know, read off the Megatron config."""
    seq_aux = config.moe_aux_loss_coeff if config.moe_router_load_balancing_type == "seq_aux_loss" else 0.0
    cfg = dict(
        activation=F.silu if config.gated_linear_unit else F.gelu,
        gated_linear_unit=config.gated_linear_unit,
        normalization=config.normalization,
        layernorm_epsilon=config.layernorm_epsilon,
        num_moe_experts=config.num_moe_experts,
        moe_router_topk=config.moe_router_topk,
        moe_router_score_function=config.moe_router_score_function,
        moe_router_pre_softmax=config.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
        coe_iterations=config.coe_iterations,
        coe_inner_residual=config.coe_inner_residual,
        coe_outer_residual=config.coe_outer_residual,
        coe_shared_router=config.coe_shared_router,
        shared=config.moe_shared_expert_intermediate_size is not None,
        seq_aux_coeff=seq_aux,
    )
    # The activation the reference hard-codes must be the one the layer was configured with.
    assert config.activation_func is cfg["activation"], config.activation_func
    return cfg


def _case(rank, world_size, overrides, seed, check_reuse_bug=False):
    """Worker: run layer and reference on the same weights; return every discrepancy."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_coe.parallel import initialize_parallel

    pg = initialize_parallel()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # aux-loss gradient scale 1 (default)
    config, layer = build_layer(overrides, pg)
    cfg = _reference_config(config)

    # Weights and input: the first seed from ``seed`` on whose routing decisions are unambiguous
    # (clear top-k gaps in every pass), so fp32 rounding cannot flip an expert choice.
    for candidate in range(seed, seed + 100):
        gen = torch.Generator().manual_seed(candidate)
        randomize_parameters(layer, gen)
        h = torch.randn(S, B, config.hidden_size, generator=gen)
        # dL/dy of a token-mean loss: keeps gradients O(1) so the absolute tolerance is tight
        upstream = torch.randn(S, B, config.hidden_size, generator=gen) / (S * B)
        with torch.no_grad():
            params = {n: p.detach() for n, p in layer.named_parameters()}
            logit_gap, score_gap = reference_forward(h, params, cfg)[3]
            if logit_gap > MIN_LOGIT_GAP and score_gap > MIN_SCORE_GAP:
                break
    else:
        raise AssertionError("no seed with unambiguous routing found")
    h.requires_grad_(True)

    # ---- layer
    layer.mlp.reset_routing_stats()
    y, _ = layer(hidden_states=h, attention_mask=None)
    assert y.shape == h.shape
    y.backward(upstream)  # aux losses (if any) inject their own gradient via MoEAuxLossAutoScaler
    layer_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                   for n, p in layer.named_parameters()}
    layer_routing_counts = layer.mlp.tokens_per_expert_per_pass.clone()

    # ---- reference on leaf copies of the same weights
    def run_reference(**kw):
        params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}
        h_ref = h.detach().clone().requires_grad_(True)
        y_ref, aux, routing, _ = reference_forward(h_ref, params, cfg, **kw)
        ((y_ref * upstream).sum() + aux).backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in params.items()}
        return y_ref, h_ref.grad, grads, routing

    y_ref, dh_ref, ref_grads, routing = run_reference()
    result = dict(
        names=sorted(layer_grads),
        out=_max_diff(y, y_ref),
        dh=_max_diff(h.grad, dh_ref),
        params={n: _max_diff(layer_grads[n], ref_grads[n]) for n in layer_grads},
        # parameters the reference never used (zero gradient): only experts no pass chose
        unused_in_ref=sorted(n for n, g in ref_grads.items() if not g.abs().sum() > 0),
        param_grad_scale=max(g.abs().max().item() for g in ref_grads.values()),
        out_scale=y_ref.abs().max().item(),
        layer_counts=layer_routing_counts.tolist(),
        ref_counts=[torch.bincount(idx.flatten(), minlength=config.num_moe_experts).float().tolist()
                    for idx in routing],
        # tokens whose chosen expert set differs between pass 1 and pass t (t = 2..C)
        tokens_rerouted=[
            int((idx.sort(dim=-1).values != routing[0].sort(dim=-1).values).any(dim=-1).sum())
            for idx in routing[1:]
        ],
    )
    if cfg["seq_aux_coeff"]:
        # Not vacuous: leaving out any single pass's aux loss must move some gradient by far
        # more than the tolerance.
        result["grad_change_without_aux_of_pass"] = []
        for t in range(config.coe_iterations):
            _, dh_wo, grads_wo, _ = run_reference(
                aux_passes=set(range(config.coe_iterations)) - {t})
            result["grad_change_without_aux_of_pass"].append(max(
                [_max_diff(h.grad, dh_wo)] + [_max_diff(layer_grads[n], grads_wo[n]) for n in layer_grads]
            ))
    if check_reuse_bug:
        y_bug, _, _, _ = run_reference(reuse_first_routing=True)
        result["out_with_reused_routing"] = _max_diff(y, y_bug)
    return result


def run_case(overrides, seed=0, **kw):
    return run_distributed(_case, 1, overrides=overrides, seed=seed, **kw)[0]


def assert_matches(r, overrides):
    C = overrides.get("coe_iterations", 2)
    assert r["out"] <= TOL, f"forward output differs by {r['out']:.3e} (|y| up to {r['out_scale']:.2f})"
    assert r["dh"] <= TOL, f"input gradient differs by {r['dh']:.3e}"
    bad = {n: d for n, d in r["params"].items() if not d <= TOL}
    assert not bad, f"parameter gradients differ: {bad} (|grad| up to {r['param_grad_scale']:.2f})"
    # Every parameter is a router, a norm, a shared expert or a routed expert of the formula.
    expected = {"pre_mlp_layernorm.weight"}
    if overrides.get("normalization") == "LayerNorm":
        expected.add("pre_mlp_layernorm.bias")
    num_routers = 1 if overrides.get("coe_shared_router") else C
    expected |= {f"mlp.routers.{t}.weight" for t in range(num_routers)}
    num_experts = len(r["ref_counts"][0])
    for i in range(num_experts):
        expected |= {f"mlp.experts.local_experts.{i}.linear_fc{j}.weight" for j in (1, 2)}
    if overrides.get("moe_shared_expert_intermediate_size"):
        expected |= {"mlp.shared_experts.linear_fc1.weight", "mlp.shared_experts.linear_fc2.weight"}
    assert set(r["names"]) == expected
    # Only routed experts that no pass selected may have a zero reference gradient.
    chosen = {i for i in range(num_experts) if any(c[i] > 0 for c in r["ref_counts"])}
    allowed_unused = {f"mlp.experts.local_experts.{i}.linear_fc{j}.weight"
                      for i in set(range(num_experts)) - chosen for j in (1, 2)}
    assert set(r["unused_in_ref"]) <= allowed_unused, r["unused_in_ref"]
    # The layer routed exactly the tokens the reference routed, pass by pass.
    assert r["layer_counts"] == r["ref_counts"], (r["layer_counts"], r["ref_counts"])
    # Non-vacuous: later passes really route differently from pass 1.
    assert len(r["tokens_rerouted"]) == C - 1
    assert all(n > 0 for n in r["tokens_rerouted"]), r["tokens_rerouted"]


# ====================================================================== tests
RESIDUALS = [(True, False), (False, True), (True, True)]
ROUTERS = {
    "softmax": dict(moe_router_score_function="softmax", moe_router_pre_softmax=False),
    "softmax_pre": dict(moe_router_score_function="softmax", moe_router_pre_softmax=True),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
}


def _main_cases():
    """The full cross product (54 cases; each runs in a fraction of a second)."""
    cases = []
    for C in (1, 2, 3):
        for inner, outer in RESIDUALS:
            for shared in (None, 32):
                for router in ROUTERS:
                    cases.append(pytest.param(
                        C, inner, outer, shared, router, 1000 + 10 * len(cases),
                        id=f"C{C}-inner{int(inner)}-outer{int(outer)}-shared{int(bool(shared))}-{router}",
                    ))
    return cases


@pytest.mark.parametrize("C, inner, outer, shared, router, seed", _main_cases())
def test_forward_and_grads_match_formula(C, inner, outer, shared, router, seed):
    """C in {1,2,3} x residuals x shared experts on/off x softmax/pre-softmax/sigmoid routers.

    (C=1, inner off, outer on is Megatron's standard MoE layer.)
    """
    overrides = dict(
        coe_iterations=C, coe_inner_residual=inner, coe_outer_residual=outer,
        moe_shared_expert_intermediate_size=shared, moe_aux_loss_coeff=0.0, **ROUTERS[router],
    )
    assert_matches(run_case(overrides, seed=seed), overrides)


@pytest.mark.parametrize("C", [1, 3])
def test_swiglu_experts_match_formula(C):
    """DeepSeek-style experts: SwiGLU, sigmoid router with top-k scaling, shared expert."""
    overrides = dict(
        coe_iterations=C, coe_inner_residual=True, coe_outer_residual=True,
        gated_linear_unit=True, activation_func=F.silu,
        moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=2.5,
        moe_shared_expert_intermediate_size=32, moe_aux_loss_coeff=0.0,
    )
    assert_matches(run_case(overrides, seed=7), overrides)


def test_layernorm_model_matches_formula():
    """LayerNorm (weight and bias) pre-MLP norm; pre-softmax router with top-k scaling."""
    overrides = dict(coe_iterations=2, normalization="LayerNorm", moe_aux_loss_coeff=0.0,
                     moe_router_score_function="softmax", moe_router_pre_softmax=True,
                     moe_router_topk_scaling_factor=1.5)
    assert_matches(run_case(overrides, seed=11), overrides)


def test_shared_router_uses_one_weight_for_every_pass():
    """coe_shared_router: one router parameter; the reference routes every pass with it."""
    overrides = dict(coe_iterations=3, coe_shared_router=True, moe_aux_loss_coeff=0.0,
                     moe_shared_expert_intermediate_size=32)
    assert_matches(run_case(overrides, seed=5), overrides)


@pytest.mark.parametrize("C, score_function", [(2, "softmax"), (3, "sigmoid")])
def test_seq_aux_loss_gradient_matches_per_pass_formula(C, score_function):
    """Each pass adds Megatron's sequence-level aux loss (gradient scale 1) to the loss."""
    overrides = dict(coe_iterations=C, moe_router_load_balancing_type="seq_aux_loss",
                     moe_aux_loss_coeff=1e-2, moe_router_score_function=score_function,
                     moe_shared_expert_intermediate_size=32)
    r = run_case(overrides, seed=3)
    assert_matches(r, overrides)
    assert min(r["grad_change_without_aux_of_pass"]) > 5 * TOL, r["grad_change_without_aux_of_pass"]


def test_comparison_detects_a_layer_that_reuses_first_pass_routing():
    """The check is sharp: a reference with pass 1's routing reused disagrees with the layer."""
    overrides = dict(coe_iterations=2, moe_aux_loss_coeff=0.0)
    r = run_case(overrides, seed=17, check_reuse_bug=True)
    assert_matches(r, overrides)
    assert r["out_with_reused_routing"] > 1e-2, r["out_with_reused_routing"]
