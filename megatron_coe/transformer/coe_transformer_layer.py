"""Transformer layer for CoE models: Megatron's ``TransformerLayer`` owning the outer residual.

The CoE formula ends with ``y = x_C + I_outer * h``, where ``h`` is the residual stream entering
the pre-MLP layernorm. In Megatron that add is the layer's ``mlp_bda`` (bias-dropout-add). With
``coe_outer_residual=False`` this layer uses bias-dropout *without* the add, so its output is
``x_C`` exactly; with it on (and C=1, inner residual off) the layer is Megatron's standard MoE
transformer layer, unchanged.

The layer's ``pg_collection`` (given by the ``TransformerBlock``, which got it from ``GPTModel``)
reaches the CoE MLP on every supported release: ``compat.moe_specs_and_signatures.
mlp_spec_with_process_groups`` puts it into the MLP spec where the installed ``TransformerLayer``
would not pass it to a ``MoELayer`` subclass (< 0.18).
"""

from __future__ import annotations

import dataclasses

import torch

from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_coe.compat.moe_specs_and_signatures import (
    mlp_spec_with_process_groups,
    supported_kwargs,
)


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
                 pg_collection=None, vp_stage=None, **kwargs):
        # kwargs: keywords newer releases pass (e.g. is_mtp_layer, name), forwarded where the
        # installed TransformerLayer takes them.
        replace = dict(mlp=mlp_spec_with_process_groups(submodules.mlp, pg_collection))
        if not getattr(config, "coe_outer_residual", True):
            replace["mlp_bda"] = get_bias_dropout
        submodules = dataclasses.replace(submodules, **replace)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage, **supported_kwargs(TransformerLayer.__init__, kwargs))
