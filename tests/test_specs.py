"""Spec selection: the local spec builds CoE modules; GPU-only paths refuse clearly on CPU."""

import pytest

from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_coe.models.specs import TransformerEngineUnavailable, get_coe_layer_spec
from megatron_coe.testing.configs import tiny_config
from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer
from megatron_coe.transformer.coe_router import CoETopKRouter
from megatron_coe.transformer.coe_transformer_layer import CoETransformerLayer
from megatron_coe.transformer.grouped_experts import GroupedSequentialMLP
from megatron_coe.transformer.local_modules import MLADotProductAttention, TorchNorm


@pytest.mark.parametrize("mla", [False, True])
def test_local_spec_uses_coe_modules(mla):
    spec = get_coe_layer_spec(tiny_config(mla=mla))
    assert spec.module is CoETransformerLayer
    assert spec.submodules.mlp.module is ChainOfExpertsLayer
    assert spec.submodules.mlp.submodules.router is CoETopKRouter
    assert spec.submodules.mlp.submodules.experts.module is GroupedSequentialMLP
    assert issubclass(GroupedSequentialMLP, SequentialMLP)  # same parameters and checkpoints
    assert spec.submodules.pre_mlp_layernorm is TorchNorm
    core = spec.submodules.self_attention.submodules.core_attention
    assert (core is MLADotProductAttention) == mla


def test_transformer_engine_spec_refused_without_gpu():
    with pytest.raises(TransformerEngineUnavailable, match="no CUDA device"):
        get_coe_layer_spec(tiny_config(), use_transformer_engine=True)


def test_fp8_refused_without_gpu():
    with pytest.raises(TransformerEngineUnavailable, match="FP8 training .--fp8-format. needs a CUDA GPU"):
        get_coe_layer_spec(tiny_config(fp8="hybrid"))


def test_grouped_gemm_needs_transformer_engine_spec():
    with pytest.raises(ValueError, match="moe_grouped_gemm"):
        get_coe_layer_spec(tiny_config(moe_grouped_gemm=True))
