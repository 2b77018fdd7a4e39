"""Every invalid CoE configuration is refused once, at construction, with a message naming the fix."""

import pytest

from megatron_coe.config import CoEConfigError, CoETransformerConfig, CoEMLATransformerConfig
from megatron_coe.testing.configs import tiny_config


def test_valid_paper_default_and_moe_baseline_build():
    coe = tiny_config(coe_iterations=2, coe_inner_residual=True, coe_outer_residual=False)
    moe = tiny_config(coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True)
    assert (coe.coe_iterations, moe.coe_iterations) == (2, 1)
    assert isinstance(coe, CoETransformerConfig)
    assert isinstance(tiny_config(mla=True), CoEMLATransformerConfig)


def test_mla_config_defaults_kv_channels_to_v_head_dim():
    assert tiny_config(mla=True).kv_channels == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(coe_iterations=0), "coe_iterations (--coe-iterations) must be an integer >= 1"),
        (dict(coe_iterations=-3), "coe_iterations (--coe-iterations) must be an integer >= 1"),
        (dict(moe_router_topk=9), "moe_router_topk (--moe-router-topk) is the top-k of each CoE pass"),
        (dict(moe_router_topk=0), "must be in [1, num_moe_experts=8]"),
        (dict(num_moe_experts=None), "num_moe_experts (--num-experts) must be set"),
        (dict(expert_model_parallel_size=3), "not divisible by expert_model_parallel_size=3"),
        (dict(coe_inner_residual=False, coe_outer_residual=False), "both off"),
        (dict(overlap_moe_expert_parallel_comm=True), "overlap_moe_expert_parallel_comm is not supported"),
        (dict(delay_wgrad_compute=True), "delay_wgrad_compute is not supported"),
        (dict(moe_enable_routing_replay=True), "moe_enable_routing_replay is not supported"),
        (dict(moe_layer_freq=2), "moe_layer_freq is not supported"),
        (
            dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="moe_router"),
            "captures part of a MoE layer",
        ),
        (dict(coe_iterations=1, coe_shared_router=True), "coe_shared_router only makes sense"),
    ],
)
def test_config_rejects_with_actionable_message(overrides, message):
    with pytest.raises(CoEConfigError) as err:
        tiny_config(**overrides)
    assert message in str(err.value)


def test_single_pass_features_are_allowed_at_one_iteration():
    # One routing pass per layer is exactly what these Megatron features assume.
    cfg = tiny_config(coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True,
                      moe_enable_routing_replay=True)
    assert cfg.moe_enable_routing_replay
