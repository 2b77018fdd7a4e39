"""C=1, inner residual off, outer residual on is exactly Megatron-Core's MoE transformer layer.

The stock model is Megatron's own ``GPTModel`` with ``get_gpt_layer_local_spec`` (``MoELayer``
inside ``TransformerLayer``); the CoE model comes from ``build_coe_gpt_model``. Both are built
from the same seed and the stock weights are loaded into the CoE model (router key
``mlp.router`` -> ``mlp.routers.0``); outputs and every gradient must agree.
"""

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_coe.models.gpt import build_coe_gpt_model
from megatron_coe.parallel import initialize_parallel
from megatron_coe.testing.configs import CPU_SAFE, TINY, tiny_config
from megatron_coe.testing.distributed import run_distributed

VOCAB, SEQ, BATCH = 64, 16, 2
COE_FIELDS = ("coe_iterations", "coe_inner_residual", "coe_outer_residual", "coe_shared_router")


def _stock_to_coe_key(key: str) -> str:
    return key.replace("mlp.router.", "mlp.routers.0.")


def _run(rank, world_size, ep, dispatcher, shared_expert, capacity=None):
    pg = initialize_parallel(expert_model_parallel_size=ep, seed=7)
    moe = dict(
        moe_token_dispatcher_type=dispatcher,
        expert_model_parallel_size=ep,
        moe_shared_expert_intermediate_size=32 if shared_expert else None,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3,
        **(capacity or {}),
    )
    coe_cfg = tiny_config(coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True, **moe)
    stock_fields = {k: v for k, v in {**CPU_SAFE, **TINY, **moe}.items() if k not in COE_FIELDS}
    stock_cfg = TransformerConfig(**stock_fields)

    torch.manual_seed(0)
    stock = GPTModel(
        config=stock_cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(num_experts=8, normalization="RMSNorm"),
        vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope",
    )
    coe = build_coe_gpt_model(coe_cfg, pg_collection=pg, vocab_size=VOCAB, max_sequence_length=SEQ)

    stock_sd = {k: v for k, v in stock.state_dict().items() if "_extra_state" not in k}
    coe_sd = {_stock_to_coe_key(k): v for k, v in stock_sd.items()}
    missing, unexpected = coe.load_state_dict(coe_sd, strict=False)
    assert not [k for k in missing if "_extra_state" not in k], missing
    assert not unexpected, unexpected

    gen = torch.Generator().manual_seed(123)  # same tokens on every rank
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, -1)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    labels = torch.roll(tokens, -1, 1)

    results = {}
    for name, model in (("stock", stock), ("coe", coe)):
        model.train()
        losses = model(tokens, position_ids, mask, labels=labels)
        losses.float().mean().backward()
        results[name] = (
            losses.detach().clone(),
            {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        )

    (stock_out, stock_grads), (coe_out, coe_grads) = results["stock"], results["coe"]
    out_diff = (stock_out - coe_out).abs().max().item()
    grad_diff = max(
        (stock_grads[n] - coe_grads[_stock_to_coe_key(n)]).abs().max().item() for n in stock_grads
    )
    assert set(map(_stock_to_coe_key, stock_grads)) == set(coe_grads)
    return out_diff, grad_diff, len(stock_grads)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "world_size, ep, dispatcher, shared_expert",
    [(1, 1, "alltoall", False), (1, 1, "alltoall", True), (2, 2, "alltoall", True),
     (2, 2, "allgather", False)],
)
def test_one_iteration_matches_megatron_moe_layer(world_size, ep, dispatcher, shared_expert):
    for out_diff, grad_diff, num_params in run_distributed(
        _run, world_size, ep=ep, dispatcher=dispatcher, shared_expert=shared_expert
    ):
        assert num_params > 10
        assert out_diff == 0.0, f"per-token losses differ by {out_diff}"
        assert grad_diff == 0.0, f"gradients differ by {grad_diff}"


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "world_size, ep, capacity",
    [(2, 2, dict(moe_expert_capacity_factor=0.5, moe_token_drop_policy="probs")),
     (1, 1, dict(moe_expert_capacity_factor=0.75, moe_token_drop_policy="position",
                 moe_pad_expert_input_to_capacity=True))],
)
def test_token_dropping_matches_megatron_moe_layer(world_size, ep, capacity):
    """Capacity factor, drop policy and padding to capacity: C=1 is MoELayer bit for bit."""
    for out_diff, grad_diff, num_params in run_distributed(
        _run, world_size, ep=ep, dispatcher="alltoall", shared_expert=True, capacity=capacity
    ):
        assert num_params > 10
        assert out_diff == 0.0 and grad_diff == 0.0, (out_diff, grad_diff)
