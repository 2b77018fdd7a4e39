"""torch AdamW state under Megatron-Core's ``DistributedOptimizer`` without Apex / Transformer Engine.

Without Apex's or TE's fused Adam, Megatron-Core wraps ``torch.optim.AdamW``, whose
per-parameter state (``step``, ``exp_avg``, ``exp_avg_sq``) torch creates lazily at the first
step. Two upstream code paths assume it exists (``optimizer/distrib_optimizer.py``, the same
code in 0.16.1 and 0.19.2):

* ``DistributedOptimizer.state_dict()`` reads ``state["step"]`` of every parameter ("Extract
  'step', for non-Apex/TE support"): saving or loading into a fresh optimizer fails with
  KeyError. ``ensure_optimizer_state`` gives every parameter of a fresh torch Adam/AdamW the
  state its first step would create (zero moments, step 0); a load overwrites it, no step is
  taken (registry ``optim.fresh_adam_state``).
* ``DistributedOptimizer.load_state_dict`` gives each torch-AdamW state a ``step`` taken from
  the saved param groups and then ``_set_main_param_and_optimizer_states`` copies each saved
  tensor onto *every* tensor of the parameter's state, but the saved ``fully_reshardable``
  per-parameter tensors hold no ``step``: KeyError. Inside ``adam_step_tolerant_load()`` the
  missing ``step`` is copied onto itself (a no-op); on exit every parameter gets its own
  ``step`` tensor (the load assigns one shared tensor, which AdamW would increment once per
  parameter) (registry ``optim.load_missing_step``; the patch rebinds
  ``DistributedOptimizer._set_main_param_and_optimizer_states`` for the duration of the
  context only and restores it, also on an exception).
"""

from __future__ import annotations

import contextlib

import torch

from megatron_coe.compat.registry import mark


def _torch_optimizers(optimizer):
    """The inner torch optimizers of a (chained) Megatron optimizer."""
    for dist_opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        yield dist_opt.optimizer


def ensure_optimizer_state(optimizer) -> None:
    """Give every parameter of a fresh torch Adam/AdamW the state its first step would create."""
    for inner in _torch_optimizers(optimizer):
        if not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
            continue
        mark("optim.fresh_adam_state")
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _unshare_steps(optimizer) -> None:
    for inner in _torch_optimizers(optimizer):
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()


@contextlib.contextmanager
def adam_step_tolerant_load(optimizer):
    """Context for ``optimizer.load_state_dict(...)`` of a ``fully_reshardable`` state into torch
    AdamW: tolerates the saved tensors' missing ``step`` and unshares the loaded steps on exit."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    mark("optim.load_missing_step")
    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original
    _unshare_steps(optimizer)
