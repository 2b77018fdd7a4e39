"""Routed experts of the local (CPU) spec: ``SequentialMLP`` weights, grouped-GEMM compute.

Megatron-Core's local spec runs its experts with ``SequentialMLP``: a Python loop over every
local expert, each a full ``MLP`` call (two parallel linears, activation, scaling; ~50 aten and
autograd ops). That per-expert cost does not depend on how many tokens the expert received, and
a CoE layer pays it once per pass, so on CPU the loop -- not the arithmetic -- dominated CoE's
overhead over MoE (see ``tools/bench_coe_layer.py --profile``).

``GroupedSequentialMLP`` keeps everything of ``SequentialMLP`` that the rest of the system sees
-- the ``local_experts.{i}.linear_fc1/linear_fc2`` parameters, their initialisation,
``sharded_state_dict`` (global expert indices, EP/expert-TP resharding), Hugging Face name
mapping -- and replaces only ``forward``: each linear becomes one ``torch._grouped_mm`` over the
permuted tokens (groups = tokens per expert) on a stacked copy of the local experts' weights.
The activation and the router-probability scaling are row-wise, so they run once on all rows.

A CoE layer calls its experts once per pass. Inside ``chain_scope()`` (entered by
``ChainOfExpertsLayer.chain``) the passes share one stacked weight copy, and their weight
gradients are summed in place (``addmm_``) and handed to autograd once per weight -- the CPU
counterpart of the fused weight-gradient accumulation TE/Megatron use on GPUs. Without it, each
extra pass would cost a full weight copy forward and a full-size weight-gradient add backward,
which at the paper's layer shape (64 experts x 2 x 704 x 1024) is most of CoE's overhead.

On CPU ``torch._grouped_mm`` computes each group with the same matmul as ``F.linear`` does, so
for one call (C=1) outputs and gradients are bit-identical to ``SequentialMLP``
(``tests/test_grouped_experts.py``; ``tests/test_megatron_equivalence.py`` still compares
bit-exactly against Megatron's stock MoE layer). Exceptions, at fp32 rounding level: a clamped
SwiGLU (torch's vectorised SiLU rounds a tensor's SIMD tail differently, and the loop cuts the
rows into different tensors), and the in-place sum over C > 1 passes (``addmm_`` vs autograd's
add).

Where the grouped path does not apply, ``forward`` is ``SequentialMLP.forward`` unchanged (same
numbers, only slower): for an empty token batch, a single local expert, tensors not on the CPU
(GPU runs use the Transformer Engine spec and ``TEGroupedMLP``), and for configs listed by
``grouped_compute_blockers`` (FP8/FP4, expert biases, fused or TE activations, fused gradient
accumulation). ``grouped_compute`` says which path the config selects.
"""

from __future__ import annotations

import contextlib

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


class _LinearScope:
    """What the calls of one expert linear share inside ``GroupedSequentialMLP.chain_scope()``:
    the stacked weights (built once) and the weight gradients, summed in place."""

    def __init__(self, weights):
        self.weights = list(weights)
        with torch.no_grad():
            self.stacked = torch.stack([w.detach() for w in self.weights])  # [E, out, in]
        self.pending = 0  # recorded calls whose backward has not run yet
        self.grad_sum = None  # per-expert [out, in] weight gradients accumulated so far


class _GroupedLinear(torch.autograd.Function):
    """``out[rows_e] = x[rows_e] @ W_e^T`` for every local expert ``e`` in one grouped GEMM.

    Inputs: ``x`` ``[T, in]``, the scope (stacked weights, gradient sum), the group sizes and
    their int32 cumulative offsets, then the expert weights themselves (so autograd delivers
    their gradients). Backward: ``grad_x`` is one grouped GEMM; each ``dW_e = dY_e^T @ X_e`` is
    added in place to the scope's sum. Only the last call of the scope to run backward returns
    the summed weight gradients -- one ``AccumulateGrad`` per weight and step, as with one pass,
    instead of C full-size weight-gradient tensors added up by autograd.
    """

    @staticmethod
    def forward(ctx, x, scope, splits, offsets, *weights):
        ctx.scope, ctx.splits = scope, splits
        ctx.save_for_backward(x, offsets)
        return torch._grouped_mm(x, scope.stacked.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad_out):
        x, offsets = ctx.saved_tensors
        scope = ctx.scope
        grad_out = grad_out.contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._grouped_mm(grad_out, scope.stacked, offs=offsets)
        weight_grads = [None] * len(scope.weights)
        if any(ctx.needs_input_grad[4:]):
            pairs = zip(grad_out.split(ctx.splits), x.split(ctx.splits))
            if scope.grad_sum is None:
                scope.grad_sum = [dy.t().mm(xe) for dy, xe in pairs]
            else:
                for acc, (dy, xe) in zip(scope.grad_sum, pairs):
                    acc.addmm_(dy.t(), xe)
            scope.pending -= 1
            if scope.pending == 0:
                weight_grads, scope.grad_sum = scope.grad_sum, None
        return (grad_x, None, None, None, *weight_grads)


class GroupedSequentialMLP(SequentialMLP):
    """``SequentialMLP`` whose local experts run as two grouped GEMMs (see the module docstring)."""

    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        self.grouped_compute = not grouped_compute_blockers(self.config)
        self._scopes = None  # {"fc1": _LinearScope, "fc2": ...} inside chain_scope()

    @contextlib.contextmanager
    def chain_scope(self):
        """Calls inside this context (a CoE layer's C passes) share one stacked copy of the
        weights and sum their weight gradients in place (see ``_GroupedLinear``)."""
        self._scopes = {}
        try:
            yield
        finally:
            self._scopes = None

    def _linear_scope(self, name: str) -> _LinearScope:
        if self._scopes is not None and name in self._scopes:
            return self._scopes[name]
        scope = _LinearScope(getattr(e, name).weight for e in self.local_experts)
        if self._scopes is not None:
            self._scopes[name] = scope
        return scope

    def _grouped_linear(self, name, x, splits, offsets):
        scope = self._linear_scope(name)
        if torch.is_grad_enabled() and any(w.requires_grad for w in scope.weights):
            scope.pending += 1
        return _GroupedLinear.apply(x, scope, splits, offsets, *scope.weights)

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

        splits = [int(n) for n in tokens_per_expert.tolist()]
        offsets = torch.tensor(splits, dtype=torch.int64).cumsum(0).to(torch.int32)

        intermediate = self._grouped_linear("linear_fc1", x, splits, offsets)
        intermediate = self._activation(intermediate)
        intermediate = (intermediate * permuted_probs.unsqueeze(-1)).to(intermediate.dtype)
        output = self._grouped_linear("linear_fc2", intermediate, splits, offsets)
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
