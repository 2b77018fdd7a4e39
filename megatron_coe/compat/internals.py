"""Megatron-Core internals the CoE code relies on without changing them (registry kind ``internal``).

Nothing here patches Megatron-Core. These entries name upstream methods and signatures that are
not a stable public API (or are marked ``@internal_api``) but that CoE modules outside this
package call or substitute into Megatron's specs. ``verify_internals()`` checks each one against
the installed release (the method exists and takes the parameters the CoE code passes) and
marks it; ``tests/test_compat_registry.py`` runs it, so an upgrade that changes one fails there
with the entry's name instead of deep inside a forward.

* ``internal.moe_layer_stages``: ``transformer/coe_layer.py`` (``ChainOfExpertsLayer.coe_pass``)
  runs ``MoELayer``'s stage methods once per pass: ``route``, ``preprocess``, ``dispatch``,
  ``shared_experts_compute``, ``routed_experts_compute`` (``@internal_api`` in 0.16.1 and
  0.19.2), ``combine``, ``postprocess`` (``transformer/moe/moe_layer.py``).
* ``internal.local_norm``: ``transformer/local_modules.py`` ``TorchNorm`` replaces the local
  spec's norms (``transformer/torch_norm.py`` ``WrappedTorchNorm`` refuses sequence
  parallelism); it must accept every keyword ``WrappedTorchNorm`` takes.
* ``internal.local_mla_attention``: ``transformer/local_modules.py`` ``MLADotProductAttention``
  is the local core attention of ``MLASelfAttention`` (``transformer/multi_latent_attention.py``
  passes ``k_channels=`` / ``v_channels=``, which ``transformer/dot_product_attention.py``
  ``DotProductAttention.__init__`` does not take); it forwards every other keyword unchanged.
* ``internal.ddp_forward_pre_hook``: ``training/setup.py`` (``wait_for_params_of_grouped_experts``,
  ``--overlap-param-gather``) runs ``DistributedDataParallel._make_forward_pre_hook()``'s hook
  for the experts ``GroupedSequentialMLP`` reads without calling them, while
  ``remove_forward_pre_hook_handles`` is non-empty (``distributed/distributed_data_parallel.py``).

``PRIVATE_USES_OUTSIDE_COMPAT`` lists the private Megatron-Core names those files use; the
registry test refuses any other private attribute use outside this package.
"""

from __future__ import annotations

import inspect

from megatron_coe.compat.registry import mark

# method -> the parameters (after self) the CoE layer passes, in order
MOE_LAYER_STAGES = {
    "route": ("hidden_states", "padding_mask"),
    "preprocess": ("hidden_states", "probs", "routing_map"),
    "dispatch": ("hidden_states", "probs"),
    "shared_experts_compute": ("hidden_states",),
    "routed_experts_compute": ("hidden_states", "probs"),
    "combine": ("output",),
    "postprocess": ("output", "shared_expert_output"),
}


# file -> private Megatron-Core attribute names it uses (each covered by an internal.* entry)
PRIVATE_USES_OUTSIDE_COMPAT = {
    "megatron_coe/training/setup.py": ("_make_forward_pre_hook",),
}


class InternalChanged(RuntimeError):
    """An upstream internal no longer has the shape the CoE code relies on."""


def _params(fn) -> tuple:
    return tuple(p for p in inspect.signature(fn).parameters if p != "self")


def verify_internals() -> None:
    """Check every ``internal.*`` entry against the installed Megatron-Core; raise
    ``InternalChanged`` naming the entry and what changed, else mark each entry."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_coe.transformer.local_modules import MLADotProductAttention, TorchNorm

    for name, expected in MOE_LAYER_STAGES.items():
        method = getattr(MoELayer, name, None)
        if method is None or _params(method)[:len(expected)] != expected:
            raise InternalChanged(
                f"internal.moe_layer_stages: MoELayer.{name} is "
                f"{'missing' if method is None else _params(method)}, ChainOfExpertsLayer passes "
                f"{expected}")
    mark("internal.moe_layer_stages")

    missing = set(_params(WrappedTorchNorm.__new__)) - set(_params(TorchNorm.__new__)) - {"cls"}
    if missing:
        raise InternalChanged(f"internal.local_norm: WrappedTorchNorm takes {sorted(missing)}, "
                              "which TorchNorm does not")
    mark("internal.local_norm")

    base = set(_params(DotProductAttention.__init__))
    if {"k_channels", "v_channels"} & base:
        raise InternalChanged("internal.local_mla_attention: DotProductAttention now takes "
                              "k_channels/v_channels; MLADotProductAttention may be unnecessary")
    own = inspect.signature(MLADotProductAttention.__init__).parameters
    if not {"k_channels", "v_channels", "args", "kwargs"} <= set(own):
        raise InternalChanged("internal.local_mla_attention: MLADotProductAttention must take "
                              "k_channels, v_channels and forward *args/**kwargs")
    mark("internal.local_mla_attention")

    from megatron.core.distributed import DistributedDataParallel

    make_hook = getattr(DistributedDataParallel, "_make_forward_pre_hook", None)
    if make_hook is None or _params(make_hook) or "remove_forward_pre_hook_handles" not in \
            inspect.getsource(DistributedDataParallel):
        raise InternalChanged("internal.ddp_forward_pre_hook: DistributedDataParallel no longer "
                              "has _make_forward_pre_hook() / remove_forward_pre_hook_handles")
    mark("internal.ddp_forward_pre_hook")
