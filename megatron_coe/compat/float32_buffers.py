"""Buffers that stay float32 in a bf16/fp16 model (Megatron-Core's ``Float16Module``).

``Float16Module(config, module)`` (``transformer/module.py``) converts the whole model with
``module.bfloat16()`` (``.half()`` for fp16), and torch casts every floating-point *buffer* with
the parameters. Megatron-Core's ``TopKRouter`` (``transformer/moe/router.py``) registers float32
buffers that count tokens (``local_tokens_per_expert`` for the expert bias,
``global_tokens_per_expert`` and ``ga_steps`` for the global aux loss) next to ``expert_bias``;
it converts only ``expert_bias`` back (``_maintain_float32_expert_bias``, before each forward,
save and load), so the counts are accumulated in bf16, which is exact only up to 256 (from 256
to 512 only even numbers exist: one more token is rounded away). CoE's per-pass expert-load
counts (``ChainOfExpertsLayer.tokens_per_expert_per_pass``) would be hit the same way.

``Float32Buffers`` is a mixin for an ``nn.Module`` class: ``keep_float32(*names)`` names buffers
(of the module or any of its submodules) that ``_apply`` -- what ``.bfloat16()``, ``.half()``,
``.float()``, ``.to(...)`` and ``.cuda()`` run -- moves to the new device but never casts, so
their values are kept exactly. ``ChainOfExpertsLayer`` uses it for its counts and its routers'
buffers. Registry entry ``float16.float32_count_buffers`` (marked when a module names its
buffers, i.e. whenever a CoE layer is built).
"""

from __future__ import annotations

import torch

from megatron_coe.compat.registry import mark


class Float32Buffers:
    """Mixin (before the ``nn.Module`` base): named float32 buffers survive dtype conversions."""

    _float32_buffer_names: tuple = ()

    def keep_float32(self, *names: str) -> None:
        """Buffers called ``names``, in this module or any submodule, stay float32."""
        mark("float16.float32_count_buffers")
        self._float32_buffer_names = tuple(names)

    def _apply(self, fn, *args, **kwargs):
        held = []
        for module in self.modules():
            for name in self._float32_buffer_names:
                buf = module._buffers.get(name)
                if buf is not None and buf.dtype == torch.float32:
                    held.append((module, name, buf))
                    module._buffers[name] = None  # nn.Module._apply skips None buffers
        try:
            result = super()._apply(fn, *args, **kwargs)
        finally:
            for module, name, buf in held:
                module._buffers[name] = buf
        for module, name, buf in held:
            device = fn(buf.new_empty(0)).device  # where fn puts a tensor of this kind
            if device != buf.device:
                module._buffers[name] = buf.to(device=device)
        return result
