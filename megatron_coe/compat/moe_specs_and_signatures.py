"""MoE layer specs and constructor signatures across Megatron-Core releases.

``specs.moe_spec_form`` — what ``get_gpt_layer_local_spec`` / ``..._with_transformer_engine_spec``
put in ``submodules.mlp`` for a MoE layer:

* < 0.18: ``ModuleSpec(module=MoELayer, submodules=MoESubmodules(experts=ModuleSpec(...), ...))``
* >= 0.18: ``functools.partial(MoELayer, submodules=MoESubmodules(experts=partial(SequentialMLP,
  submodules=MLPSubmodules(...)), shared_experts=partial(_build_shared_experts, ...)))``

``spec_parts`` reads module, submodules and params from either form; ``as_module_spec`` turns a
class builder of either form into a ``ModuleSpec``, which every supported release builds (it is
callable from 0.17 on, and ``build_module`` takes it everywhere). The CoE layer spec always uses
``ModuleSpec`` for the pieces it replaces (the MoE layer, the routed experts); Megatron's
shared-expert builder is kept in the form upstream gave.

``signatures.moe_layer_kwargs`` — keywords Megatron passes to the modules it builds:
``TransformerLayer`` calls ``mlp(config=, pg_collection=, is_mtp_layer=, name=)`` (>= 0.18);
``MoELayer`` calls ``router(config=, pg_collection=, is_mtp_layer=)`` (``is_mtp_layer`` >= 0.17)
and ``experts(n, config, pg_collection=, name=)`` (``name`` >= 0.18). The CoE subclasses accept
them all and hand their base class only what the installed base class takes
(``supported_kwargs``).

``signatures.mlp_pg_collection`` (< 0.18) — ``TransformerLayer`` passes ``pg_collection`` only to
exactly ``MoELayer`` (and a few expert classes); for a subclass it logs "Unknown MLP type" and
passes nothing. ``mlp_spec_with_process_groups`` puts the layer's collection into the CoE MLP
spec's params on those versions; from 0.18 on ``TransformerLayer`` passes it itself (adding it
to the params would pass it twice).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from typing import Any, Callable, Dict, Tuple

from megatron_coe.compat.registry import mark
from megatron_coe.compat.versions import mcore_in


def spec_parts(spec) -> Tuple[Any, Any, Dict[str, Any]]:
    """``(module, submodules, params)`` of a ``ModuleSpec`` or ``functools.partial`` builder."""
    mark("specs.moe_spec_form")
    if isinstance(spec, functools.partial):
        keywords = dict(spec.keywords)
        submodules = keywords.pop("submodules", None)
        if spec.args:
            raise TypeError(f"positional arguments in a spec builder are not supported: {spec!r}")
        return spec.func, submodules, keywords
    if hasattr(spec, "module"):
        return spec.module, getattr(spec, "submodules", None), dict(getattr(spec, "params", None) or {})
    if isinstance(spec, type):
        return spec, None, {}
    raise TypeError(f"not a module spec: {spec!r}")


def spec_module(spec):
    """The class (or function) a spec builds."""
    return spec_parts(spec)[0]


def spec_submodules(spec):
    """The ``submodules`` of a spec (``MoESubmodules`` for a MoE layer), either form."""
    return spec_parts(spec)[1]


def as_module_spec(spec, **replace):
    """A ``ModuleSpec`` equal to ``spec`` (either form); ``replace`` overrides ``module`` /
    ``submodules`` / ``params``."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    module, submodules, params = spec_parts(spec)
    fields = dict(module=module, submodules=submodules, params=params)
    fields.update(replace)
    metainfo = dict(getattr(spec, "metainfo", None) or {})
    return ModuleSpec(module=fields["module"], params=dict(fields["params"] or {}),
                      submodules=fields["submodules"], metainfo=metainfo)


@functools.lru_cache(maxsize=None)
def _accepted(func: Callable) -> Tuple[frozenset, bool]:
    params = inspect.signature(func).parameters.values()
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return frozenset(p.name for p in params), var_kw


def supported_kwargs(func: Callable, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The items of ``kwargs`` that ``func`` accepts (all of them if it takes ``**kwargs``).

    Used for the keywords newer releases added (``is_mtp_layer``, ``name``): a CoE subclass
    takes them and forwards them only where the installed base class has them."""
    mark("signatures.moe_layer_kwargs")
    names, var_kw = _accepted(func)
    if var_kw:
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in names}


def transformer_layer_passes_pg_collection_to_subclasses() -> bool:
    """Whether the installed ``TransformerLayer`` hands its ``pg_collection`` to any MLP (>= 0.18)."""
    return not mcore_in("<0.18")


class _KnownCoEMLPFilter(logging.Filter):
    """Drop TransformerLayer's "Unknown MLP type" warning (< 0.18): the CoE layer spec carries
    the process groups itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Unknown MLP type")


_FILTER_INSTALLED = False


def mlp_spec_with_process_groups(mlp_spec, pg_collection):
    """The MLP spec a ``TransformerLayer`` subclass hands to Megatron so that a ``MoELayer``
    subclass receives ``pg_collection`` on every supported release (see module docstring)."""
    global _FILTER_INSTALLED
    if transformer_layer_passes_pg_collection_to_subclasses() or pg_collection is None:
        return mlp_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.spec_utils import ModuleSpec

    if not (isinstance(mlp_spec, ModuleSpec) and isinstance(mlp_spec.module, type)
            and issubclass(mlp_spec.module, MoELayer) and mlp_spec.module is not MoELayer):
        return mlp_spec
    mark("signatures.mlp_pg_collection")
    if not _FILTER_INSTALLED:
        logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
            _KnownCoEMLPFilter())
        _FILTER_INSTALLED = True
    return dataclasses.replace(mlp_spec, params=dict(mlp_spec.params or {}, pg_collection=pg_collection))
