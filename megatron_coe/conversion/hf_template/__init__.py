"""Hugging Face model code copied next to exported weights (``configuration_coe.py``, ``modeling_coe.py``).

Loaded by ``transformers`` as remote code (``trust_remote_code=True``), not imported by megatron_coe.
"""
