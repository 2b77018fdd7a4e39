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
import warnings as _warnings

# torch's CUDA wheels (the Python 3.12 environment) log "No CUDA runtime is found, using
# CUDA_HOME=..." when torch.utils.cpp_extension is imported on a machine without a GPU: one stray
# line in every process, before the one line a user error prints. Nothing in it needs acting on;
# real errors of that module are still shown.
_logging.getLogger("torch.utils.cpp_extension").setLevel(_logging.ERROR)

# Megatron-Core warns at import time, in every process and from four modules, that Transformer
# Engine and Apex are not installed: expected on CPU, where its torch implementations are used.
# Filtered here because this package is imported before Megatron-Core by every entry point; the
# trainer prints one line of its own instead (megatron_coe.compat.te_absent.cpu_note).
_warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed",
                         category=UserWarning)
