"""Router losses: record Megatron-Core's own aux / z-loss values under per-pass names.

A CoE layer calls a router once per pass. Megatron's metrics tracker keeps one slot per
(name, layer), so C passes of one layer would be summed into one value. The CoE router does
not copy any loss computation: it runs ``TopKRouter.forward`` unchanged inside
``metric_names_suffixed(f"_pass{t}")``, which renames what the router *records* (never what it
computes or attaches to the graph):

* < 0.18: ``transformer/moe/router.py`` calls the module-level ``save_to_aux_losses_tracker``
  (imported from ``moe_utils``) in ``attach_and_log_load_balancing_loss`` and ``apply_z_loss``.
* >= 0.18: it calls ``get_moe_metrics_tracker().record(...)``.

Inside the context the router module's binding of that function is replaced by one that
appends the suffix to the metric name and calls the original; the binding is restored on
exit, also on an exception. Registry entry: ``router.pass_metric_names``.
"""

from __future__ import annotations

import contextlib

from megatron_coe.compat.registry import mark


class _SuffixedTracker:
    """Proxy of a >= 0.18 ``MoEMetricsTracker`` whose ``record`` appends a suffix to the name."""

    def __init__(self, tracker, suffix: str):
        self._tracker, self._suffix = tracker, suffix

    def record(self, name, *args, **kwargs):
        return self._tracker.record(f"{name}{self._suffix}", *args, **kwargs)

    def __getattr__(self, attr):
        return getattr(self._tracker, attr)


def _binding_name(router_module) -> str:
    if hasattr(router_module, "get_moe_metrics_tracker"):
        return "get_moe_metrics_tracker"  # >= 0.18
    return "save_to_aux_losses_tracker"  # < 0.18


@contextlib.contextmanager
def metric_names_suffixed(suffix: str):
    """Router metrics recorded inside this context are named ``<name><suffix>``."""
    import megatron.core.transformer.moe.router as router_module

    mark("router.pass_metric_names")
    binding = _binding_name(router_module)
    original = getattr(router_module, binding)
    if binding == "get_moe_metrics_tracker":
        def replacement():
            return _SuffixedTracker(original(), suffix)
    else:
        def replacement(name, *args, **kwargs):
            return original(f"{name}{suffix}", *args, **kwargs)
    setattr(router_module, binding, replacement)
    try:
        yield
    finally:
        setattr(router_module, binding, original)


def recorded_metrics() -> dict:
    """``{name: per-layer values tensor}`` recorded by routers since the last clear
    (registry ``router.metrics_tracker``: ``get_moe_metrics_tracker().metrics`` from 0.18,
    ``moe_utils.get_moe_layer_wise_logging_tracker()`` before)."""
    import megatron.core.transformer.moe.router as router_module

    mark("router.metrics_tracker")
    if hasattr(router_module, "get_moe_metrics_tracker"):
        return {n: e.values for n, e in router_module.get_moe_metrics_tracker().metrics.items()}
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return {n: e["values"] for n, e in get_moe_layer_wise_logging_tracker().items()}


def clear_recorded_metrics() -> None:
    """Forget what ``recorded_metrics`` returns."""
    import megatron.core.transformer.moe.router as router_module

    if hasattr(router_module, "get_moe_metrics_tracker"):
        router_module.get_moe_metrics_tracker().clear()
        return
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()


def reduce_recorded_metrics(names, pg_collection) -> None:
    """All-reduce the recorded metrics ``names`` across ranks the way the installed release's own
    logging does (pipeline sum, the router's reduce / average groups, data-parallel average):
    ``get_moe_metrics_tracker()._sync_metrics`` from 0.18 (the replacement the deprecated
    ``reduce_aux_losses_tracker_across_ranks`` names), ``moe_utils.reduce_aux_losses_tracker_
    across_ranks`` before (registry ``router.metrics_tracker``)."""
    import megatron.core.transformer.moe.router as router_module

    mark("router.metrics_tracker")
    if hasattr(router_module, "get_moe_metrics_tracker"):
        router_module.get_moe_metrics_tracker()._sync_metrics(list(names), pg_collection)
        return
    from megatron.core.transformer.moe.moe_utils import reduce_aux_losses_tracker_across_ranks

    reduce_aux_losses_tracker_across_ranks(list(names), pg_collection=pg_collection)
