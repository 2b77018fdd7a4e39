"""Megatron router features work per CoE pass; activation recompute of the CoE layer is exact."""

import pytest
import torch

from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from megatron_coe.models.gpt import build_coe_gpt_model
from megatron_coe.parallel import destroy_parallel, initialize_parallel
from megatron_coe.testing.configs import tiny_config
from megatron_coe.testing.distributed import run_distributed

VOCAB, SEQ, BATCH = 64, 16, 2


def _forward_backward(model):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, -1)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    loss = model(tokens, position_ids, mask, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _build(seed=5, **overrides):
    torch.manual_seed(seed)
    destroy_parallel()
    pg = initialize_parallel(seed=seed)
    return build_coe_gpt_model(tiny_config(**overrides), pg_collection=pg, vocab_size=VOCAB,
                               max_sequence_length=SEQ)


def _recompute(rank, world_size):
    common = dict(moe_shared_expert_intermediate_size=32, coe_iterations=3,
                  moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2)
    plain = _build(**common)
    recomputed = _build(recompute_granularity="selective", recompute_modules=["moe"], **common)
    recomputed.load_state_dict(plain.state_dict())
    assert recomputed.decoder.layers[0].mlp.moe_layer_recompute
    loss_a, grads_a = _forward_backward(plain)
    loss_b, grads_b = _forward_backward(recomputed)
    loads_a = plain.decoder.layers[0].mlp.tokens_per_expert_per_pass
    loads_b = recomputed.decoder.layers[0].mlp.tokens_per_expert_per_pass
    return (
        (loss_a - loss_b).abs().item(),
        max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a),
        torch.equal(loads_a, loads_b),
        loads_a.sum().item(),
    )


@pytest.mark.timeout(120)
def test_moe_recompute_gives_identical_loss_grads_and_loads():
    ((loss_diff, grad_diff, same_loads, total),) = run_distributed(_recompute, 1)
    assert loss_diff == 0.0 and grad_diff == 0.0
    assert same_loads, "recompute must count each token once per pass"
    assert total == 3 * BATCH * SEQ * 2  # C passes x tokens x topk


def _aux_tracker(rank, world_size):
    clear_aux_losses_tracker()
    model = _build(moe_router_load_balancing_type=["seq_aux_loss", "global_aux_loss"],
                   moe_aux_loss_coeff=[1e-2, 1e-2], moe_z_loss_coeff=1e-3)
    _forward_backward(model)
    return {name: entry["values"].clone() for name, entry in get_moe_layer_wise_logging_tracker().items()}


@pytest.mark.timeout(120)
def test_aux_and_z_losses_recorded_per_layer_and_pass():
    (tracker,) = run_distributed(_aux_tracker, 1)
    expected = {"seq_load_balancing_loss_pass1", "seq_load_balancing_loss_pass2",
                "global_load_balancing_loss_pass1", "global_load_balancing_loss_pass2",
                "z_loss_pass1", "z_loss_pass2"}
    assert expected <= set(tracker)
    for name in expected:
        assert tracker[name].shape == (2,) and (tracker[name] > 0).all(), (name, tracker[name])
    assert not torch.equal(tracker["z_loss_pass1"], tracker["z_loss_pass2"])


def _expert_bias(rank, world_size):
    model = _build(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                   moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                   moe_router_num_groups=2, moe_router_group_topk=1,
                   moe_router_topk_scaling_factor=2.0)
    _forward_backward(model)
    layer = model.decoder.layers[1].mlp
    return [r.local_tokens_per_expert.clone() for r in layer.routers], layer.tokens_per_expert_per_pass.clone()


@pytest.mark.timeout(120)
def test_expert_bias_counts_and_group_limited_routing_per_pass():
    ((router_counts, pass_loads),) = run_distributed(_expert_bias, 1)
    assert len(router_counts) == 2
    for pass_index, counts in enumerate(router_counts):
        torch.testing.assert_close(counts, pass_loads[pass_index], rtol=0, atol=0)
    # group-limited top-1 group out of 2: each token's experts lie in one half
    assert not torch.equal(router_counts[0], router_counts[1])


def _token_dropping(rank, world_size, pad):
    from megatron.core.transformer.moe.experts import SequentialMLP

    common = dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs",
                  moe_pad_expert_input_to_capacity=pad)
    model = _build(**common)
    loss, grads = _forward_backward(model)
    loads = [(layer.mlp.tokens_per_expert_per_pass.clone(),
              layer.mlp.dropped_tokens_per_pass.clone()) for layer in model.decoder.layers]
    # The same model with Megatron's SequentialMLP experts (GroupedSequentialMLP's parent).
    reference = _build(**common)
    reference.load_state_dict(model.state_dict())
    for layer in reference.decoder.layers:
        layer.mlp.experts.__class__ = SequentialMLP
    ref_loss, ref_grads = _forward_backward(reference)
    return (loss, ref_loss, max((grads[n] - ref_grads[n]).abs().max().item() for n in grads),
            loads)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pad", [False, True])
def test_token_dropping_per_pass(pad):
    """Capacity-based token dropping (and padding to capacity) applies in every pass."""
    ((loss, ref_loss, grad_diff, loads),) = run_distributed(_token_dropping, 1, pad=pad)
    assert torch.isfinite(loss)
    capacity = 0.5 * BATCH * SEQ * 2 / 8  # factor x tokens x topk / experts, per pass
    for layer_loads, dropped in loads:  # per pass, tokens each expert kept after dropping
        assert layer_loads.shape == (2, 8) and (layer_loads <= capacity).all()
        # per pass: (dropped choices, all choices = tokens x top-k)
        assert dropped.shape == (2, 2) and dropped[:, 1].tolist() == [BATCH * SEQ * 2] * 2
        assert (dropped[:, 0] > 0).all()  # both passes dropped tokens
        if pad:  # padded to capacity: every expert holds exactly its capacity
            assert (layer_loads == capacity).all()
        else:  # kept + dropped = chosen
            assert (layer_loads.sum(dim=1) + dropped[:, 0] == dropped[:, 1]).all()
    assert loss == ref_loss and grad_diff <= 1e-6
