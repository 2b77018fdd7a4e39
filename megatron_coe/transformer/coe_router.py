"""Per-pass router for Chain-of-Experts: Megatron's ``TopKRouter`` that logs per (layer, pass).

Routing itself is Megatron-Core's (softmax/sigmoid scores, pre-softmax, top-k scaling,
group-limited routing, aux / seq-aux / global-aux loss, z-loss, expert bias, token dropping).
The only change is where the auxiliary losses are recorded: Megatron's tracker keeps one slot
per layer and name, so C passes of one layer would be summed together. Here every name gets a
``_pass{t}`` suffix (t = 1..C), giving one tracker entry per (layer, pass).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter


def pass_metric_name(name: str, pass_number: int) -> str:
    """Tracker / TensorBoard name of a routing metric for pass ``pass_number`` (1-based)."""
    return f"{name}_pass{pass_number}"


class CoETopKRouter(TopKRouter):
    """``TopKRouter`` whose aux-loss and z-loss records carry the CoE pass number.

    ``pass_number`` is set by the owning ``ChainOfExpertsLayer`` before each call (a router shared
    by all passes in the shared-router ablation is called once per pass).
    """

    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.pass_number = 1

    def _tracker_num_layers(self) -> int:
        num_layers = self.config.num_layers
        if self.config.mtp_num_layers is not None:
            num_layers += self.config.mtp_num_layers
        return num_layers

    def attach_and_log_load_balancing_loss(
        self,
        activation,
        aux_loss_coeff,
        aux_loss,
        aux_loss_name,
        reduce_group,
        reduce_group_has_dp=False,
        valid_token_count=None,
    ):
        return super().attach_and_log_load_balancing_loss(
            activation,
            aux_loss_coeff,
            aux_loss,
            pass_metric_name(aux_loss_name, self.pass_number),
            reduce_group,
            reduce_group_has_dp=reduce_group_has_dp,
            valid_token_count=valid_token_count,
        )

    def apply_z_loss(self, logits, padding_mask: Optional[torch.Tensor] = None):
        """Megatron's z-loss (same scaling rules), recorded as ``z_loss_pass{t}``."""
        if self.config.moe_z_loss_coeff is None or not self.training or not torch.is_grad_enabled():
            return logits
        coeff = self.config.moe_z_loss_coeff / self.tp_cp_group.size()
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask)
        scaled = z_loss
        if self.calculate_per_token_loss:
            # Same correction as TopKRouter.apply_z_loss: finalize_model_grads divides by tokens.
            num_tokens = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
            scaled = z_loss * num_tokens
        logits = MoEAuxLossAutoScaler.apply(logits, scaled)
        save_to_aux_losses_tracker(
            pass_metric_name("z_loss", self.pass_number),
            z_loss / coeff,
            self.layer_number,
            self._tracker_num_layers(),
        )
        return logits
