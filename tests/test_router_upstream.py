"""A CoE router (C=1) is the installed Megatron-Core's ``TopKRouter``, bit for bit, at TP=2.

Same weights and input shard on each of 2 tensor-parallel ranks (sequence parallel): routing
probabilities, routing map, the input and weight gradients (which carry the aux-loss and z-loss
gradients, with their per-token and TP scaling) and every recorded loss value must be equal to
upstream's; only the recorded names differ (``<name>_pass1``). The CoE router contains no copy
of a loss computation, so this holds on every supported release: a copy of 0.16.1's
``apply_z_loss`` fails here on 0.19 (upstream rescaled the per-token z-loss by the TP size).
"""

import pytest
import torch

from megatron_coe.testing.distributed import run_distributed

TOKENS, BATCH, HIDDEN = 6, 2, 32


def _compare(rank, world_size, *, balancing, per_token):
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_coe.compat.router_losses import clear_recorded_metrics, recorded_metrics
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.testing.configs import tiny_config
    from megatron_coe.transformer.coe_router import CoETopKRouter

    pg = initialize_parallel(tensor_model_parallel_size=2, seed=11)
    config = tiny_config(
        coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True,
        tensor_model_parallel_size=2, sequence_parallel=True, hidden_size=HIDDEN,
        moe_router_load_balancing_type=balancing, moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3, calculate_per_token_loss=per_token,
        moe_router_pre_softmax=balancing == "global_aux_loss",
    )
    results = {}
    state = None
    for kind, cls in (("upstream", TopKRouter), ("coe", CoETopKRouter)):
        router = cls(config=config, pg_collection=pg)
        if state is None:
            state = {k: v.clone() for k, v in router.state_dict().items()}
        router.load_state_dict(state)
        router.set_layer_number(1)
        router.train()
        gen = torch.Generator().manual_seed(100 + rank)  # this rank's sequence shard
        x = torch.randn(TOKENS, BATCH, HIDDEN, generator=gen).requires_grad_()
        weights = torch.randn(TOKENS * BATCH, config.num_moe_experts, generator=gen)
        clear_recorded_metrics()
        probs, routing_map = router(x)
        (probs * weights).sum().backward()
        metrics = {name: values.clone() for name, values in recorded_metrics().items()
                   if values.any()}  # a clear keeps names, zeroed
        results[kind] = dict(probs=probs.detach(), routing_map=routing_map, x_grad=x.grad,
                             w_grad=router.weight.grad.clone(), metrics=metrics)
    clear_recorded_metrics()

    up, coe = results["upstream"], results["coe"]
    for key in ("probs", "routing_map", "x_grad", "w_grad"):
        assert torch.equal(up[key], coe[key]), (rank, key, (up[key].float() - coe[key].float()).abs().max())
    assert {f"{n}_pass1" for n in up["metrics"]} == set(coe["metrics"]), (up["metrics"], coe["metrics"])
    assert "z_loss" in up["metrics"] and len(up["metrics"]) == 2, up["metrics"]
    for name, values in up["metrics"].items():
        assert torch.equal(values, coe["metrics"][f"{name}_pass1"]), (rank, name)
    return sorted(coe["metrics"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("balancing", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_coe_router_equals_upstream_topk_router_at_tp2(balancing, per_token):
    names = run_distributed(_compare, 2, timeout=90, balancing=balancing, per_token=per_token)
    assert names[0] == names[1] and "z_loss_pass1" in names[0]
