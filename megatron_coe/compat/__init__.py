"""The Megatron-Core boundary: every patch, stand-in and version adaptation, one module per area.

Modules (each documents the upstream call sites it covers; ``registry.py`` lists every entry
with the versions it applies to; ``python -m megatron_coe.compat`` prints the table):

    versions                  installed megatron-core, tested range (one warning line outside it)
    registry                  the list of workarounds
    cuda_on_cpu               CUDA stand-ins for CPU machines (install_cpu_compat, cuda_device_redirect,
                              outside_cuda_device_redirect)
    te_absent                 Transformer Engine detection/refusal; 0.16 bugs without TE
    te_layer_spec             Megatron-Core's TE layer spec read without TE (checkpoint keys)
    moe_specs_and_signatures  MoE spec forms and constructor keywords across releases
    router_losses             upstream router losses recorded under per-pass names
    transformer_config        config fields renamed across releases (CUDA-graph capture)
    dist_checkpointing        the async writer's results queue; where a checkpoint keeps its common
                              state (0.16.1: common.pt; 0.19.2: inside the shards)
    async_checkpoint          --async-save through Megatron-Core's own async writer
    context_parallel          a micro-batch sliced to this context-parallel rank (both signatures)
    batch_rampup              --rampup-batch-size: Megatron-Core's ramp calculator (<0.18) or the
                              same ramp as a step schedule (>=0.18)
    mla_q_norm                DeepSeek-V2 MLA without query compression builds no q norm (0.19)
    mla_latent_eps            the latent norms keep their eps through the q/kv norm resolver (0.19)
    float32_buffers           count buffers stay float32 when Float16Module casts a model to bf16
    optimizer_state           torch AdamW state under DistributedOptimizer without Apex/TE
    datasets                  BlendedDataset without a process group; compiled helpers check
    internals                 upstream internals CoE modules use unchanged (verify_internals)

Tested range: megatron-core >=0.16.1,<0.20 (CI runs 0.16.1 on Python 3.11 and 0.19.2 on 3.12).
The names below are re-exported so that ``from megatron_coe.compat import X`` keeps working.
"""

from megatron_coe.compat.versions import TESTED_RANGE, megatron_core_version, warn_if_untested
from megatron_coe.compat.te_absent import (
    TransformerEngineUnavailable,
    have_transformer_engine,
    install_megatron_fixes,
    require_transformer_engine,
)
from megatron_coe.compat.cuda_on_cpu import (
    cuda_device_redirect,
    install_cpu_compat,
    outside_cuda_device_redirect,
)

warn_if_untested()

__all__ = [
    "TESTED_RANGE",
    "TransformerEngineUnavailable",
    "cuda_device_redirect",
    "have_transformer_engine",
    "install_cpu_compat",
    "install_megatron_fixes",
    "megatron_core_version",
    "outside_cuda_device_redirect",
    "require_transformer_engine",
    "warn_if_untested",
]
