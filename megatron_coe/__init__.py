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
