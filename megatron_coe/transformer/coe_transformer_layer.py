"""Transformer layer for CoE models: Megatron's ``TransformerLayer`` owning the outer residual.

The CoE formula ends with ``y = x_C + I_outer * h``, where ``h`` is the residual stream entering
the pre-MLP layernorm. In Megatron that add is the layer's ``mlp_bda`` (bias-dropout-add). With
``coe_outer_residual=False`` this layer uses bias-dropout *without* the add, so its output is
``x_C`` exactly; with it on (and C=1, inner residual off) the layer is Megatron's standard MoE
transformer layer, unchanged.

It also hands the process-group collection to the CoE MLP explicitly: Megatron's
``TransformerLayer`` only does so for the exact class ``MoELayer``.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer


class _KnownCoEMLPFilter(logging.Filter):
    """Drop TransformerLayer's "Unknown MLP type" warning: this layer passes pg_collection itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownCoEMLPFilter())


def get_bias_dropout(training: bool, fused: bool):
    """``mlp_bda`` without the residual add: ``dropout(x + bias)``; the residual is ignored."""
    del fused  # nothing to fuse without the add

    def bias_dropout(x_with_bias, residual, prob):
        del residual
        x, bias = x_with_bias
        if bias is not None:
            x = x + bias
        return torch.nn.functional.dropout(x, p=prob, training=training)

    return bias_dropout


class CoETransformerLayer(TransformerLayer):
    """``TransformerLayer`` whose MLP residual follows ``config.coe_outer_residual``."""

    def __init__(self, config, submodules, layer_number=1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        mlp = submodules.mlp
        if isinstance(mlp, ModuleSpec) and isinstance(mlp.module, type) and issubclass(
            mlp.module, MoELayer
        ) and mlp.module is not MoELayer:
            params = dict(mlp.params or {}, pg_collection=pg_collection)
            submodules = dataclasses.replace(submodules, mlp=dataclasses.replace(mlp, params=params))
        if not getattr(config, "coe_outer_residual", True):
            submodules = dataclasses.replace(submodules, mlp_bda=get_bias_dropout)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage)
