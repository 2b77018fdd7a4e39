"""GroupedSequentialMLP: SequentialMLP's parameters and numbers, computed with grouped GEMMs.

The local (CPU) spec's routed experts must give bit-identical outputs and gradients to
Megatron-Core's ``SequentialMLP`` with the same weights (that is what keeps the CoE layer at C=1
bit-identical to Megatron's stock MoE layer), and keep its state-dict and checkpoint layout.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_coe.models.specs import get_coe_layer_spec
from megatron_coe.testing.configs import tiny_config
from megatron_coe.testing.distributed import run_distributed
from megatron_coe.transformer.grouped_experts import GroupedSequentialMLP, grouped_compute_blockers

HIDDEN, EXPERTS = 16, 6


def _pair(**overrides):
    """(SequentialMLP, GroupedSequentialMLP) with identical weights, from the local spec."""
    from megatron_coe.parallel import destroy_parallel, initialize_parallel

    destroy_parallel()
    pg = initialize_parallel(seed=3)
    config = tiny_config(hidden_size=HIDDEN, num_moe_experts=EXPERTS, moe_ffn_hidden_size=12,
                         **overrides)
    submodules = get_coe_layer_spec(config).submodules.mlp.submodules.experts.submodules
    torch.manual_seed(0)
    reference = SequentialMLP(EXPERTS, config, submodules, pg_collection=pg)
    grouped = GroupedSequentialMLP(EXPERTS, config, submodules, pg_collection=pg)
    grouped.load_state_dict(reference.state_dict())
    return reference, grouped


def _run(module, x, counts, probs, grad):
    x = x.clone().requires_grad_(True)
    probs = probs.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out, bias = module(x, counts, probs)
    assert bias is None
    out.backward(grad)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in module.named_parameters()}
    return out.detach(), x.grad, probs.grad, grads


def _same(a, b, exact):
    if exact:
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def _compare(rank, world_size, counts, threads=None, exact=True, **overrides):
    """Both modules on the same rows; asserts bit-identity (or, ``exact=False``, agreement to
    fp32 rounding); returns the output's abs sum."""
    if threads is not None:
        torch.set_num_threads(threads)
    reference, grouped = _pair(**overrides)
    assert grouped.grouped_compute
    counts = torch.tensor(counts)
    gen = torch.Generator().manual_seed(1)
    rows = int(counts.sum())
    x = torch.randn(rows, HIDDEN, generator=gen)
    probs = torch.rand(rows, generator=gen)
    grad = torch.randn(rows, HIDDEN, generator=gen)
    a = _run(reference, x, counts, probs, grad)
    b = _run(grouped, x, counts, probs, grad)
    for t_a, t_b in zip(a[:3], b[:3]):
        assert _same(t_a, t_b, exact), ((t_a - t_b).abs().max(), t_a.shape)
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        assert _same(a[3][name], b[3][name], exact), name
    return a[0].abs().sum().item()


# Groups of every kind: empty first/middle/last experts, one-token experts, large experts.
COUNTS = [0, 5, 1, 0, 23, 0]


@pytest.mark.parametrize("threads", [1, 2])
def test_gelu_experts_bit_identical_to_sequential_mlp(threads):
    assert run_distributed(_compare, 1, counts=COUNTS, threads=threads)[0] > 0


def test_swiglu_bit_identical():
    assert run_distributed(_compare, 1, counts=[7, 0, 3, 9, 2, 4], gated_linear_unit=True,
                           activation_func=F.silu)[0] > 0


def test_swiglu_with_clamp_and_offset_matches():
    """Clamping makes the SiLU input contiguous, and torch's vectorised SiLU rounds a tensor's
    SIMD tail differently from its body: 1-ulp differences, because the loop and the grouped
    path cut the rows into different tensors -- not because of the grouping arithmetic."""
    assert run_distributed(_compare, 1, counts=[7, 0, 3, 9, 2, 4], exact=False,
                           gated_linear_unit=True, activation_func=F.silu,
                           activation_func_clamp_value=0.5, glu_linear_offset=1.0)[0] > 0


def test_probs_on_input_bit_identical():
    assert run_distributed(_compare, 1, counts=[4, 4, 0, 2, 1, 3], moe_router_topk=1, moe_router_pre_softmax=True,
                           moe_apply_probs_on_input=True)[0] > 0


def test_detects_a_wrong_grouping():
    """The comparison can fail: grouping the same rows differently changes the result."""
    def body(rank, world_size):
        reference, grouped = _pair()
        x = torch.randn(12, HIDDEN)
        probs = torch.rand(12)
        with torch.no_grad():
            a, _ = reference(x, torch.tensor([2, 2, 2, 2, 2, 2]), probs)
            b, _ = grouped(x, torch.tensor([3, 1, 2, 2, 2, 2]), probs)
        return (a - b).abs().max().item()

    assert run_distributed(body, 1)[0] > 1e-3


def test_zero_tokens_and_blocked_configs():
    def body(rank, world_size):
        _, grouped = _pair()
        x = torch.zeros(0, HIDDEN, requires_grad=True)
        out, _ = grouped(x, torch.zeros(EXPERTS, dtype=torch.long), torch.zeros(0))
        out.sum().backward()  # zero rows: every group empty
        _, fused = _pair(bias_activation_fusion=True, gated_linear_unit=True,
                         activation_func=F.silu)
        return tuple(out.shape), fused.grouped_compute

    shape, fused_grouped = run_distributed(body, 1)[0]
    assert shape == (0, HIDDEN)
    assert fused_grouped is False
    assert grouped_compute_blockers(tiny_config(add_bias_linear=True)) == ["add_bias_linear"]
    assert grouped_compute_blockers(tiny_config()) == []


def test_same_state_dict_and_checkpoint_keys():
    def body(rank, world_size):
        reference, grouped = _pair()
        sharded = [set(m.sharded_state_dict(prefix="experts.").keys()) for m in (reference, grouped)]
        return list(reference.state_dict()), list(grouped.state_dict()), sharded

    keys_a, keys_b, (sharded_a, sharded_b) = run_distributed(body, 1)[0]
    assert keys_a == keys_b and "local_experts.0.linear_fc1.weight" in keys_a
    assert sharded_a == sharded_b


def _chained(rank, world_size, passes, scoped=True, backwards=1):
    """``passes`` chained calls (a CoE layer's use): inside ``chain_scope`` the grouped module
    computes the weight gradients of all calls at once, after the last call's backward."""
    reference, grouped = _pair()
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(24, HIDDEN, generator=gen)
    counts = [torch.tensor(c) for c in ([4, 0, 9, 3, 6, 2], [0, 12, 1, 5, 0, 6], [4] * 6)][:passes]
    probs = [torch.rand(24, generator=gen) for _ in counts]
    grad = torch.randn(24, HIDDEN, generator=gen)

    def run(module, scope):
        module.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with scope():
            h = x
            for c, p in zip(counts, probs):
                h = h + module(h, c, p)[0]
        for i in range(backwards):  # gradients accumulate over repeated backwards
            h.backward(grad, retain_graph=i + 1 < backwards)
        return [x.grad] + [p.grad for p in module.parameters()]

    a = run(reference, contextlib.nullcontext)
    b = run(grouped, grouped.chain_scope if scoped else contextlib.nullcontext)
    assert all(g is not None for g in b), "a weight gradient was lost"
    return max((u - v).abs().max().item() for u, v in zip(a, b)), max(u.abs().max().item() for u in a)


@pytest.mark.parametrize("passes,scoped,backwards", [(2, True, 1), (3, True, 1), (3, False, 1),
                                                     (2, True, 2)])
def test_chained_calls_sum_weight_gradients(passes, scoped, backwards):
    diff, scale = run_distributed(_chained, 1, passes=passes, scoped=scoped,
                                  backwards=backwards)[0]
    assert scale > 1e-3 and diff <= 1e-6 * scale
