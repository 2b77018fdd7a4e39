"""Routed experts of the local (CPU) spec: ``SequentialMLP`` weights, one autograd node per linear.

Megatron-Core's local spec runs its experts with ``SequentialMLP``: a Python loop over every
local expert, each a full ``MLP`` module call (two parallel linears with their autograd
functions, activation, scaling; ~50 aten and autograd ops per expert). That per-expert cost does
not depend on how many tokens the expert received, and a CoE layer pays it once per pass.

``GroupedSequentialMLP`` keeps everything of ``SequentialMLP`` that the rest of the system sees
-- the ``local_experts.{i}.linear_fc1/linear_fc2`` parameters, their initialisation,
``sharded_state_dict`` (global expert indices, EP/expert-TP resharding), Hugging Face name
mapping -- and replaces only ``forward``: each linear of all local experts is one autograd node
(``_GroupedLinear``) that runs the experts' GEMMs straight into their rows of one buffer (a
grouped GEMM as a loop of plain ``mm`` calls: no weight stacking, which at the paper's shape
would copy 2 x 184 MB per call). The activation and the router-probability scaling are
row-wise, so they run once on all rows.

A CoE layer calls its experts once per pass. Inside ``chain_scope()`` (entered by
``ChainOfExpertsLayer.chain``) the weight gradients wait until every pass has run backward and
are then computed as one GEMM per expert over all passes' rows (``dW_e = [dY_e]^T [X_e]`` with
the passes stacked along K) and handed to autograd once per weight. A weight-gradient GEMM per
pass would have only the pass's few rows per expert and write every full-size ``dW_e`` C times
-- memory-bound on CPU, the largest part of CoE's overhead at the paper's shape. The cost:
each pass's ``dY`` is kept until the chain's backward ends.

The per-expert GEMMs are the ones Megatron's linears run (``x @ W^T``, ``dY @ W``,
``dY^T @ X``), so for one call (C=1) outputs and gradients are bit-identical to
``SequentialMLP`` (``tests/test_grouped_experts.py``; ``tests/test_megatron_equivalence.py``
still compares bit-exactly against Megatron's stock MoE layer). Exceptions, at fp32 rounding
level: a clamped SwiGLU (torch's vectorised SiLU rounds a tensor's SIMD tail differently, and
the loop cuts the rows into different tensors), and weight gradients over C > 1 passes (one
GEMM over all passes' rows instead of autograd's sum of per-pass GEMMs).

Where this path does not apply, ``forward`` is ``SequentialMLP.forward`` unchanged (same
numbers, only slower): a single local expert, tensors not on the CPU (GPU runs use the
Transformer Engine spec and ``TEGroupedMLP``), and configs listed by
``grouped_compute_blockers`` (FP8/FP4, expert biases, fused or TE activations, fused gradient
accumulation). ``grouped_compute`` says which path the config selects.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_coe.compat.moe_specs_and_signatures import supported_kwargs


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


class _WeightGrads:
    """Weight gradients of one expert linear over the calls (CoE passes) of one
    ``GroupedSequentialMLP.chain_scope()``: computed once, when the last call's backward ran."""

    def __init__(self):
        self.calls = 0  # calls recorded in the autograd graph
        self.parts = []  # (dY, X) split by expert, one entry per call whose backward ran

    def register(self):
        self.calls += 1

    def add(self, dy_split, x_split):
        """Record one call's ``(dY_e, X_e)``; returns the ``dW_e`` list after the last call."""
        self.parts.append((dy_split, x_split))
        if len(self.parts) < self.calls:
            return None
        parts, self.parts = self.parts, []  # ready for another backward (retain_graph)
        # dW_e = sum over calls of dY_e^T X_e = one GEMM over the calls' rows stacked along K:
        # a pass's rows per expert are few, and a GEMM per pass would write every full-size
        # dW_e C times (memory-bound) where MoE writes it once.
        grads = []
        for e in range(len(parts[0][0])):
            dy_e, x_e = ([p[i][e] for p in parts] for i in (0, 1))
            if len(parts) > 1:
                dy_e, x_e = torch.cat(dy_e), torch.cat(x_e)
            else:  # one call: its own rows, no copy
                dy_e, x_e = dy_e[0], x_e[0]
            grads.append(dy_e.t().mm(x_e))
        return grads


class _GroupedLinear(torch.autograd.Function):
    """``out[rows_e] = x[rows_e] @ W_e^T`` for all local experts ``e`` as one autograd node.

    Inputs: ``x`` ``[T, in]`` (rows grouped by expert), the ``_WeightGrads``, the group sizes,
    then the expert weights (so autograd delivers their gradients). Forward and ``grad_x`` write
    each expert's GEMM straight into its rows of one output buffer. The weight gradients wait
    until every call of the scope has run backward, and the last one returns them: one
    ``dW_e`` GEMM and one ``AccumulateGrad`` per weight and step, as with one pass.
    """

    @staticmethod
    def forward(ctx, x, weight_grads, splits, *weights):
        ctx.weight_grads, ctx.splits = weight_grads, splits
        ctx.save_for_backward(x, *weights)
        out = x.new_empty(x.shape[0], weights[0].shape[0])
        for w, x_e, out_e in zip(weights, x.split(splits), out.split(splits)):
            if x_e.shape[0]:
                torch.mm(x_e, w.t(), out=out_e)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, *weights = ctx.saved_tensors
        splits = ctx.splits
        dy = grad_out.contiguous().split(splits)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            for w, dy_e, dx_e in zip(weights, dy, grad_x.split(splits)):
                if dy_e.shape[0]:
                    torch.mm(dy_e, w, out=dx_e)
        grad_w = None
        if any(ctx.needs_input_grad[3:]):
            grad_w = ctx.weight_grads.add(dy, x.split(splits))
        return (grad_x, None, None, *(grad_w or [None] * len(weights)))


class GroupedSequentialMLP(SequentialMLP):
    """``SequentialMLP`` whose local experts run as two grouped linears (see the module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None, **kwargs):
        # kwargs: keywords newer releases pass (name >= 0.18), forwarded where the installed
        # SequentialMLP takes them (compat.moe_specs_and_signatures).
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection,
                         **supported_kwargs(SequentialMLP.__init__, kwargs))
        self.grouped_compute = not grouped_compute_blockers(self.config)
        self._weight_grads = None  # {"linear_fc1": _WeightGrads, ...} inside chain_scope()

    @contextlib.contextmanager
    def chain_scope(self):
        """Calls inside this context (a CoE layer's C passes) compute their weight gradients
        together, once all of them ran backward (see ``_GroupedLinear``)."""
        self._weight_grads = {}
        try:
            yield
        finally:
            self._weight_grads = None

    def _grouped_linear(self, name, x, splits):
        weights = [getattr(e, name).weight for e in self.local_experts]
        if self._weight_grads is None:
            weight_grads = _WeightGrads()
        else:
            weight_grads = self._weight_grads.setdefault(name, _WeightGrads())
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            weight_grads.register()
        return _GroupedLinear.apply(x, weight_grads, splits, *weights)

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        if not self.grouped_compute or x.device.type != "cpu" or self.num_local_experts == 1:
            return super().forward(x, tokens_per_expert, permuted_probs)

        if self.config.moe_apply_probs_on_input:  # as SequentialMLP: scale inputs, probs -> 1
            assert self.config.moe_router_topk == 1, (
                "`moe_apply_probs_on_input` only works with `moe_router_topk`=1."
            )
            x = (permuted_probs.unsqueeze(-1) * x).to(x.dtype)
            permuted_probs = torch.ones_like(permuted_probs)

        splits = [int(n) for n in tokens_per_expert.tolist()]
        intermediate = self._grouped_linear("linear_fc1", x, splits)
        intermediate = self._activation(intermediate)
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(intermediate.dtype)
        output = self._grouped_linear("linear_fc2", intermediate, splits)
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
