"""Per-pass router for Chain-of-Experts: Megatron's ``TopKRouter`` that logs per (layer, pass).

Routing and every loss are the installed Megatron-Core's own (softmax/sigmoid scores,
pre-softmax, top-k scaling, group-limited routing, aux / seq-aux / global-aux loss, z-loss and
their scaling, expert bias, token dropping): ``forward`` is ``TopKRouter.forward`` unchanged.
The only difference is where the losses are *recorded*: Megatron's tracker keeps one slot per
layer and name, so C passes of one layer would be summed together. The forward runs inside
``compat.router_losses.metric_names_suffixed("_pass{t}")`` (t = 1..C), giving one tracker entry
per (layer, pass): ``load_balancing_loss_pass1``, ``z_loss_pass2``, ...

Initialisation: Megatron's (``init_method``), or with ``coe_router_init_method='kaiming_uniform'``
``torch.nn.Linear``'s default, as the paper's published code builds its gates.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron.core.transformer.moe.router import TopKRouter

from megatron_coe.compat.moe_specs_and_signatures import supported_kwargs
from megatron_coe.compat.router_losses import metric_names_suffixed


def pass_metric_name(name: str, pass_number: int) -> str:
    """Tracker / TensorBoard name of a routing metric for pass ``pass_number`` (1-based)."""
    return f"{name}_pass{pass_number}"


class CoETopKRouter(TopKRouter):
    """``TopKRouter`` whose aux-loss and z-loss records carry the CoE pass number.

    ``pass_number`` is set by the owning ``ChainOfExpertsLayer`` before each call (a router shared
    by all passes in the shared-router ablation is called once per pass). Constructor keywords
    newer releases pass (``is_mtp_layer``) are forwarded where the installed ``TopKRouter``
    takes them.
    """

    def __init__(self, config, pg_collection=None, **kwargs) -> None:
        super().__init__(config=config, pg_collection=pg_collection,
                         **supported_kwargs(TopKRouter.__init__, kwargs))
        self.pass_number = 1

    def reset_parameters(self):
        """Megatron's initialisation; ``kaiming_uniform`` then redraws the weight as
        ``torch.nn.Linear`` does (U(+-1/sqrt(hidden)))."""
        super().reset_parameters()
        if (self.config.perform_initialization
                and getattr(self.config, "coe_router_init_method", "normal") == "kaiming_uniform"):
            with torch.no_grad():
                weight = torch.empty_like(self.weight, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
                self.weight.copy_(weight)

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        with metric_names_suffixed(pass_metric_name("", self.pass_number)):
            return super().forward(input, padding_mask)
