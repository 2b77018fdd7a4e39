"""Megatron-Core's Transformer Engine layer spec, readable where Transformer Engine is absent.

``te_layer_spec(**kwargs)`` returns ``(spec, fused_norm_linear)``: what
``get_gpt_layer_with_transformer_engine_spec(**kwargs)`` builds, and the class it uses for a
linear with a fused input norm (TE's ``LayerNormLinear``, whose checkpoint keys hold the norm as
``layer_norm_weight``). The checkpoint-key table (``models/checkpoint_keys.py``) reads the
spec's structure (which norm is its own module, which is fused into the linear after it) and its
``sharded_state_dict_keys_map``; it never builds a module.

Without TE, Megatron-Core cannot call that function: 0.16.1 leaves ``TESpecProvider`` undefined
in ``models/gpt/gpt_layer_specs.py`` (``NameError``), 0.19.2 binds it to ``None``, and the TE
classes themselves are ``MagicMock`` stand-ins. There the function runs with a stand-in backend
provider bound to that name for the duration of the call: every method returns a named
placeholder class (one per method), ``fuse_layernorm_and_linear`` is True as TE's is, and the
routed experts are the local provider's (their keys do not depend on the backend). The spec's
layout (which slot gets which backend module, the keys map) is Megatron-Core's own. With TE
installed the real provider is used.
"""

from __future__ import annotations

import functools
import threading

from megatron_coe.compat.registry import mark
from megatron_coe.compat.te_absent import have_transformer_engine

_LOCK = threading.Lock()
_MISSING = object()


def _placeholder(name: str) -> type:
    return type(name, (), {"__doc__": f"Stand-in for Transformer Engine's {name} (spec reading only)."})


@functools.lru_cache(maxsize=None)
def _stand_in_provider() -> type:
    from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider

    norm = _placeholder("TENorm")
    fused = _placeholder("TELayerNormColumnParallelLinear")
    classes = {"linear": _placeholder("TELinear"),
               "column_parallel_linear": _placeholder("TEColumnParallelLinear"),
               "row_parallel_linear": _placeholder("TERowParallelLinear"),
               "core_attention": _placeholder("TEDotProductAttention")}

    def method(value):
        return lambda self, *args, **kwargs: value

    body = {name: method(cls) for name, cls in classes.items()}
    body.update(
        layer_norm=method(norm),
        column_parallel_layer_norm_linear=method(fused),
        fuse_layernorm_and_linear=method(True),
        activation_func=method(None),
        # routed experts: their checkpoint keys are the same for every backend
        grouped_mlp_modules=lambda self, *args, **kwargs:
            LocalSpecProvider().grouped_mlp_modules(*args, **kwargs),
        __doc__="Transformer Engine backend stand-in: placeholder classes, for reading the spec.",
        FUSED_NORM_LINEAR=fused,
    )
    return type("TESpecProviderStandIn", (BackendSpecProvider,), body)


def te_layer_spec(**kwargs):
    """``(get_gpt_layer_with_transformer_engine_spec(**kwargs), fused norm-linear class)``."""
    from megatron.core.models.gpt import gpt_layer_specs

    if have_transformer_engine():
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs),
                TESpecProvider().column_parallel_layer_norm_linear())
    mark("te.layer_spec_stand_in")
    provider = _stand_in_provider()
    with _LOCK:
        saved = getattr(gpt_layer_specs, "TESpecProvider", _MISSING)
        gpt_layer_specs.TESpecProvider = provider
        try:
            spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
        finally:
            if saved is _MISSING:
                del gpt_layer_specs.TESpecProvider
            else:
                gpt_layer_specs.TESpecProvider = saved
    return spec, provider.FUSED_NORM_LINEAR
