"""DeepSeek-V2 attention without query compression on every Megatron-Core release.

DeepSeek-V2 (and the paper's model, ``q_lora_rank`` unset) normalises only the kv latent: the
queries are ``q_proj(x)`` of the already input-normalised hidden state, with no norm of their
own. ``qk_layernorm`` turns the latent norms on.

* Megatron-Core 0.16 builds exactly that: without query compression it builds no q norm.
* From the release that resolves the q/kv norm placement in ``QKNormConfigResolver``
  (``transformer/mla_qk_norm_config.py``; 0.19 here), ``qk_layernorm`` without query compression
  means a q norm fused into ``linear_q_proj`` (Transformer Engine's LayerNorm+Linear over the
  hidden state): a norm DeepSeek-V2 does not have, and on CPU (no fused norm+linear) the model
  cannot be built at all.

``DeepSeekV2MLASelfAttention`` is ``MLASelfAttention`` whose norm resolution, in that one case
(MLA, ``qk_layernorm``, no ``q_lora_rank``), builds ``linear_q_proj`` without a norm and keeps
the kv latent norm as the spec gives it (explicit norm, or fused into ``linear_kv_up_proj``),
checked by the release's own resolver; every other case is upstream's resolution. On releases
without the resolver the class is ``MLASelfAttention`` unchanged. ``models/specs.py`` uses it for
every MLA layer. Registry entry: ``mla.no_q_norm_without_q_lora``.
"""

from __future__ import annotations

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention  # noqa: F401 - specs.py

from megatron_coe.compat.mla_latent_eps import keep_latent_eps
from megatron_coe.compat.registry import mark

HAS_RESOLVER = hasattr(MLASelfAttention, "_resolve_qk_norm_config")


class DeepSeekV2MLASelfAttention(MLASelfAttention):
    """``MLASelfAttention`` with DeepSeek-V2's norms: no q norm without query compression."""

    def _resolve_qk_norm_config(self, submodules):
        # the latent norms keep their own eps (compat.mla_latent_eps) in every resolution
        return keep_latent_eps(submodules, self._resolve_deepseek_v2(submodules))

    def _resolve_deepseek_v2(self, submodules):
        config = self.config
        if config.q_lora_rank is not None or not config.qk_layernorm or getattr(
                config, "experimental_attention_variant", None) == "dsa":
            return super()._resolve_qk_norm_config(submodules)
        from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver

        mark("mla.no_q_norm_without_q_lora")
        r = QKNormConfigResolver(config, submodules)
        if config.qk_l2_norm:
            raise ValueError("qk_l2_norm is not supported with MLA.")
        r._reject_common_spec_conflicts()  # e.g. a q norm that nothing would use
        kv_norm = submodules.kv_layernorm or IdentityOp
        if r._is_trivial(kv_norm):  # the kv norm fused into linear_kv_up_proj (TE)
            kv_up = r._mla_fused_linear_or_default(submodules.linear_kv_up_proj,
                                                    "linear_kv_up_proj")
        else:
            kv_up = r._non_fused_or_default(submodules.linear_kv_up_proj, "linear_kv_up_proj")
        return r._result(
            linear_q_proj=r._non_fused_or_default(submodules.linear_q_proj, "linear_q_proj"),
            linear_q_up_proj=IdentityOp, linear_kv_up_proj=kv_up, q_layernorm=IdentityOp,
            kv_layernorm=kv_norm)
