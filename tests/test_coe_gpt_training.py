"""A tiny CoE GPT (C=2) trains at world size 2 with EP=2: the loss falls, replicas stay in sync."""

import pytest
import torch

from megatron.core import parallel_state

from megatron_coe.models.gpt import build_coe_gpt_model
from megatron_coe.parallel import initialize_parallel
from megatron_coe.testing.configs import tiny_config
from megatron_coe.testing.distributed import run_distributed

VOCAB, SEQ, BATCH, STEPS = 64, 16, 4, 30


def _batch(rank, step):
    """Learnable data: each sequence counts upward mod VOCAB from a random start."""
    gen = torch.Generator().manual_seed(1000 * step + rank)  # different data per rank
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
    tokens = (start + torch.arange(SEQ + 1)) % VOCAB
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _train(rank, world_size, mla):
    pg = initialize_parallel(expert_model_parallel_size=2, seed=3)
    config = tiny_config(
        mla=mla, expert_model_parallel_size=2, moe_shared_expert_intermediate_size=32,
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-3,
        moe_router_pre_softmax=True,
    )
    model = build_coe_gpt_model(config, pg_collection=pg, vocab_size=VOCAB, max_sequence_length=SEQ)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    dp_group = parallel_state.get_data_parallel_group()  # replicas of non-expert params
    expert_dp_group = parallel_state.get_expert_data_parallel_group()
    position_ids = torch.arange(SEQ).expand(BATCH, -1)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    losses = []
    for step in range(STEPS):
        tokens, labels = _batch(rank, step)
        optimizer.zero_grad()
        loss = model(tokens, position_ids, mask, labels=labels).mean()
        loss.backward()
        for param in model.parameters():
            group = dp_group if getattr(param, "allreduce", True) else expert_dp_group
            torch.distributed.all_reduce(param.grad, group=group)
            param.grad /= torch.distributed.get_world_size(group)
        optimizer.step()
        reduced = loss.detach().clone()
        torch.distributed.all_reduce(reduced)
        losses.append(reduced.item() / world_size)
    router = model.decoder.layers[0].mlp.routers[1].weight.detach().clone()
    return losses, router


@pytest.mark.timeout(240)
@pytest.mark.parametrize("mla", [False, True], ids=["mha", "mla"])
def test_tiny_coe_gpt_trains_with_expert_parallelism(mla):
    (losses, router0), (losses1, router1) = run_distributed(_train, 2, mla=mla)
    assert losses == losses1
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.5, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    torch.testing.assert_close(router0, router1, rtol=0, atol=0)  # replicated params in sync
