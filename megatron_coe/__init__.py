"""megatron-coe: Chain-of-Experts language models on NVIDIA Megatron-Core.

Package layout:
    config.py                         CoE fields on Megatron's TransformerConfig, validated once
    compat/                           the Megatron-Core boundary: every patch, stand-in, version
                                      adaptation and internal relied upon, one module per
                                      upstream area, listed in compat/registry.py
    transformer/coe_layer.py          ChainOfExpertsLayer (C chained expert-parallel passes)
    transformer/coe_router.py         per-pass router (aux losses logged per layer and pass)
    transformer/coe_transformer_layer.py  outer residual in the transformer layer
    models/specs.py, models/gpt.py    ModuleSpecs and the GPT model builder
"""

__version__ = "0.1.0"

import logging as _logging

# torch's CUDA wheels (the Python 3.12 environment) log "No CUDA runtime is found, using
# CUDA_HOME=..." when torch.utils.cpp_extension is imported on a machine without a GPU: one stray
# line in every process, before the one line a user error prints. Nothing in it needs acting on;
# real errors of that module are still shown.
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)
