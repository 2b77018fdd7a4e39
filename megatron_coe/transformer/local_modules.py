"""Local-spec (no Transformer Engine) modules that Megatron-Core 0.16 lacks for CoE models.

* ``TorchNorm``: torch ``LayerNorm``/``RMSNorm`` that, unlike Megatron's ``WrappedTorchNorm``,
  accepts sequence parallelism (MoE with TP > 1 requires it during training). Its parameters
  are tagged ``sequence_parallel`` so ``finalize_model_grads`` all-reduces their gradients over TP,
  exactly as it does for Transformer Engine and Apex norms.
* ``MLADotProductAttention``: Megatron's local ``DotProductAttention`` for multi-latent attention.
  ``MLASelfAttention`` passes ``k_channels``/``v_channels`` that the local class does not take;
  the local kernel is correct for MLA when ``kv_channels == v_head_dim`` (the query/key head dim
  only enters the score product, and MLA passes its own softmax scale).
"""

from __future__ import annotations

import torch

from megatron.core.transformer.dot_product_attention import DotProductAttention


class TorchNorm:
    """Builds ``torch.nn.LayerNorm`` or ``torch.nn.RMSNorm`` as selected by ``config.normalization``."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization=None):
        if zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("layernorm_zero_centered_gamma needs Transformer Engine or Apex norms.")
        kind = normalization or config.normalization
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"normalization must be 'LayerNorm' or 'RMSNorm', got {kind!r}")
        for param in norm.parameters():
            setattr(param, "sequence_parallel", bool(config.sequence_parallel))
        return norm


class MLADotProductAttention(DotProductAttention):
    """Local core attention usable by ``MLASelfAttention`` (requires ``kv_channels == v_head_dim``)."""

    def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
        super().__init__(*args, **kwargs)
        if v_channels is not None and v_channels != self.config.kv_channels:
            raise ValueError(
                f"local MLA attention needs kv_channels == v_head_dim (got kv_channels="
                f"{self.config.kv_channels}, v_head_dim={v_channels}): leave kv_channels unset."
            )
