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
        (dict(moe_layer_freq=[0, 1, 1]), "moe_layer_freq (--moe-layer-freq) has 3 entries for num_layers=2"),
        (dict(moe_layer_freq=[0, 0]), "makes no layer a CoE layer"),
        (dict(moe_layer_freq=0), "an integer moe_layer_freq must be >= 1"),
        (dict(moe_layer_freq="[0]*1+[2]*1"), "non-empty list of 0 (dense) / 1 (MoE)"),
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


def _cuda_graph_settings():
    """Every way the installed Megatron-Core lets a user capture part of a MoE layer: its current
    field (``cuda_graph_scope`` < 0.18, ``cuda_graph_modules`` >= 0.18) and, from 0.18, the
    deprecated alias; as a string and as a list."""
    from megatron_coe.compat.transformer_config import cuda_graph_fields

    return [
        dict(cuda_graph_impl=impl, **{field: value})
        for field in cuda_graph_fields()
        for impl in ("transformer_engine", "local")
        for value in ("moe_router", ["moe_router", "moe_preprocess"], ["moe"])
    ]


@pytest.mark.parametrize("settings", _cuda_graph_settings(), ids=str)
def test_partial_moe_cuda_graph_refused_through_the_installed_field(settings):
    with pytest.raises(CoEConfigError, match="captures part of a MoE layer") as err:
        tiny_config(coe_iterations=2, **settings)
    from megatron_coe.compat.transformer_config import cuda_graph_field

    assert str(err.value).startswith(f"{cuda_graph_field()}=")  # names the field to change


def test_installed_cuda_graph_field_is_the_one_megatron_reads():
    """The guard's notion of the current field matches the installed TransformerConfig: after
    Megatron's own __post_init__, a partial capture is visible in exactly that field."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_coe.compat.transformer_config import cuda_graph_capture_modules, cuda_graph_field
    from megatron_coe.compat.versions import mcore_in
    from megatron_coe.testing.configs import CPU_SAFE, TINY

    fields = {k: v for k, v in {**CPU_SAFE, **TINY}.items() if not k.startswith("coe_")}
    field = cuda_graph_field()
    assert field == ("cuda_graph_scope" if mcore_in("<0.18") else "cuda_graph_modules")
    cfg = TransformerConfig(cuda_graph_impl="transformer_engine", **{field: ["moe_router"]}, **fields)
    assert cuda_graph_capture_modules(cfg) == ["moe_router"]


@pytest.mark.parametrize("settings", [dict(cuda_graph_impl="transformer_engine"),
                                      dict(cuda_graph_impl="none")], ids=str)
def test_whole_layer_cuda_graphs_allowed_with_several_passes(settings):
    assert tiny_config(coe_iterations=2, **settings).coe_iterations == 2
