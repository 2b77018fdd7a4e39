"""Routed experts of the local (CPU) spec: ``SequentialMLP`` weights, grouped-GEMM compute.

Megatron-Core's local spec runs its experts with ``SequentialMLP``: a Python loop over every
local expert, each a full ``MLP`` call (two parallel linears, activation, scaling; ~50 aten and
autograd ops). That per-expert cost does not depend on how many tokens the expert received, and
a CoE layer pays it once per pass, so on CPU the loop -- not the arithmetic -- dominated CoE's
overhead over MoE (see ``tools/bench_coe_layer.py --profile``).

``GroupedSequentialMLP`` keeps everything of ``SequentialMLP`` that the rest of the system sees
-- the ``local_experts.{i}.linear_fc1/linear_fc2`` parameters, their initialisation,
``sharded_state_dict`` (global expert indices, EP/expert-TP resharding), Hugging Face name
mapping -- and replaces only ``forward``: the local experts' weights are stacked and each linear
becomes one ``torch._grouped_mm`` over the permuted tokens (groups = tokens per expert). The
activation and the router-probability scaling are row-wise, so they run once on all rows.

On CPU ``torch._grouped_mm`` computes each group with the same matmul as ``F.linear`` does, so
outputs and gradients are bit-identical to ``SequentialMLP`` (``tests/test_grouped_experts.py``
asserts this, and ``tests/test_megatron_equivalence.py`` still compares bit-exactly against
Megatron's stock MoE layer).

Where the grouped path does not apply, ``forward`` is ``SequentialMLP.forward`` unchanged (same
numbers, only slower): for an empty token batch, a single local expert, tensors not on the CPU
(GPU runs use the Transformer Engine spec and ``TEGroupedMLP``), and for configs listed by
``grouped_compute_blockers`` (FP8/FP4, expert biases, fused or TE activations, fused gradient
accumulation). ``grouped_compute`` says which path the config selects.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP


def grouped_compute_blockers(config) -> list[str]:
    """Config settings that make ``GroupedSequentialMLP`` use ``SequentialMLP``'s loop instead."""
    checks = {
        "fp8/fp4": bool(config.fp8 or getattr(config, "fp4", None)),
        "add_bias_linear": bool(config.add_bias_linear),
        "bias_activation_fusion": bool(config.bias_activation_fusion),
        "use_te_activation_func": bool(getattr(config, "use_te_activation_func", False)),
        "gradient_accumulation_fusion": bool(config.gradient_accumulation_fusion),
    }
    return [name for name, on in checks.items() if on]


class GroupedSequentialMLP(SequentialMLP):
    """``SequentialMLP`` whose local experts run as two grouped GEMMs (see the module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.grouped_compute = not grouped_compute_blockers(self.config)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        if (not self.grouped_compute or x.device.type != "cpu" or self.num_local_experts == 1
                or x.shape[0] == 0):  # torch._grouped_mm's backward rejects zero rows
            return super().forward(x, tokens_per_expert, permuted_probs)

        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: scale inputs, probs -> 1
            assert self.config.moe_router_topk == 1, (
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            )
            x = (permuted_probs.unsqueeze(-1) * x).to(x.dtype)
            permuted_probs = torch.ones_like(permuted_probs)

        offsets = torch.cumsum(tokens_per_expert.to(device=x.device, dtype=torch.int64), dim=0)
        offsets = offsets.to(torch.int32)
        experts = self.local_experts
        # [E, in, out] views of the stacked [E, out, in] weights, as F.linear multiplies x @ W^T.
        w_fc1 = torch.stack([e.linear_fc1.weight for e in experts]).transpose(1, 2)
        w_fc2 = torch.stack([e.linear_fc2.weight for e in experts]).transpose(1, 2)

        intermediate = torch._grouped_mm(x, w_fc1, offs=offsets)
        intermediate = self._activation(intermediate)
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(intermediate.dtype)
        output = torch._grouped_mm(intermediate, w_fc2, offs=offsets)
        return output, None

    def _activation(self, x):
        """``MLP.forward``'s unfused activation (gated or not), applied to all rows at once."""
        config = self.config
        if not config.gated_linear_unit:
            return config.activation_func(x)
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if (clamp := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=clamp)
            x_linear = x_linear.clamp(min=-clamp, max=clamp)
        return config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)


__all__ = ["GroupedSequentialMLP", "grouped_compute_blockers"]
