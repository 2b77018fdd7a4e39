"""Router initialisation: Megatron's by default; ``kaiming_uniform`` is torch.nn.Linear's default
(the paper's published gates), an initialisation-only change (protocol 3's router-init arm)."""

import math

import torch

from megatron_coe.models.gpt import build_coe_gpt_model
from megatron_coe.parallel import destroy_parallel, initialize_parallel
from megatron_coe.testing.configs import tiny_config
from megatron_coe.testing.distributed import run_distributed

HIDDEN, EXPERTS = 128, 32


def _build_routers(rank, world_size, seed, overrides):
    torch.manual_seed(seed)
    destroy_parallel()
    pg = initialize_parallel(seed=seed)
    cfg = tiny_config(hidden_size=HIDDEN, num_moe_experts=EXPERTS, num_layers=1, **overrides)
    model = build_coe_gpt_model(cfg, pg_collection=pg, vocab_size=64, max_sequence_length=16)
    out = {n: p.detach().clone() for n, p in model.named_parameters() if ".routers." in n}
    destroy_parallel()
    return out


def _routers(seed, **overrides):
    (weights,) = run_distributed(_build_routers, 1, seed=seed, overrides=overrides)
    return weights


def test_default_router_init_is_megatrons_normal_init():
    weights = _routers(3)
    assert len(weights) == 2  # one router per pass (C=2)
    for w in weights.values():
        assert w.shape == (EXPERTS, HIDDEN)
        assert abs(w.std().item() - 0.02) < 0.002, w.std()


def test_kaiming_uniform_router_init_matches_torch_linear_default():
    weights = _routers(3, coe_router_init_method="kaiming_uniform")
    bound = 1 / math.sqrt(HIDDEN)
    linear = torch.nn.Linear(HIDDEN, EXPERTS, bias=False)  # the paper's gate: nn.Linear default
    for w in weights.values():
        assert w.abs().max().item() <= bound
        assert w.abs().max().item() > 0.95 * bound  # uniform over the whole interval
        # std of U(-b, b) = b / sqrt(3) = 0.051 at hidden 128 (2.5x Megatron's 0.02)
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.004
        assert abs(w.std().item() - linear.weight.std().item()) < 0.006
    # the two passes' routers are drawn independently
    a, b = weights.values()
    assert not torch.equal(a, b)


def test_router_init_method_changes_only_the_routers_init():
    """Same seed, same shapes and names; only router weights differ in distribution."""
    normal = _routers(4)
    kaiming = _routers(4, coe_router_init_method="kaiming_uniform")
    assert normal.keys() == kaiming.keys()
    for name in normal:
        assert normal[name].shape == kaiming[name].shape
        assert kaiming[name].std() > 2 * normal[name].std()
