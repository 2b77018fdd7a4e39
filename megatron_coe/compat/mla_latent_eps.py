"""The MLA latent norms keep their own eps through Megatron-Core's q/kv norm resolution.

``models/specs.py`` gives the q/kv latent norms ``config.mla_latent_norm_epsilon`` (DeepSeek-V2:
1e-6) instead of ``layernorm_epsilon`` by wrapping the module that builds them
(``with_latent_norm_eps``): the explicit norm (local spec) or Transformer Engine's
``LayerNormColumnParallelLinear`` the norm is fused into (TE spec: ``linear_q_up_proj``,
``linear_kv_up_proj``). The wrapper is a class of its own that records the module it wraps as
``latent_eps_of``.

* Megatron-Core 0.16 builds the spec's classes as given: the wrappers are built, the latent eps
  applies, nothing to adapt.
* From the release that resolves the q/kv norm placement in ``QKNormConfigResolver``
  (``transformer/mla_qk_norm_config.py``; 0.19 here), a fused norm+linear is recognised by class
  identity with the backend's class (``_is_fused_norm_linear``: ``module_cls is
  fused_norm_linear_impl``). The wrapper is not that class, so the resolver replaces it with the
  backend default: on the TE spec the latent norms silently got ``layernorm_epsilon``
  (``--norm-epsilon``) and an HF export recorded an eps the model did not use.

``keep_latent_eps(submodules, resolved)`` takes the resolver's answer and, in each slot where it
chose exactly the class a wrapper of the spec wraps, puts the wrapper back (the resolver's checks
and placement decisions stand; only the eps of the module it picked changes).
``compat.mla_q_norm.DeepSeekV2MLASelfAttention`` (every MLA layer of a CoE model) applies it to
every resolution. Registry entry ``mla.latent_eps_kept`` (marked whenever a resolution is
adapted, i.e. every MLA attention with latent norms built on such a release).
"""

from __future__ import annotations

from megatron_coe.compat.registry import mark

SLOTS = ("linear_q_proj", "linear_q_up_proj", "linear_kv_up_proj", "q_layernorm", "kv_layernorm")


def _module_of(spec):
    return getattr(spec, "module", spec)  # a ModuleSpec or a class


def keep_latent_eps(submodules, resolved: dict) -> dict:
    """``resolved`` (``QKNormConfigResolver``'s dict) with the spec's latent-eps wrappers in the
    slots where the resolver chose the very class they wrap."""
    mark("mla.latent_eps_kept")
    out = dict(resolved)
    for slot in SLOTS:
        requested = getattr(submodules, slot, None)
        wrapped = getattr(_module_of(requested), "latent_eps_of", None)
        if wrapped is not None and slot in out and _module_of(out[slot]) is wrapped:
            out[slot] = requested
    return out
