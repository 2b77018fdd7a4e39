"""``TransformerConfig`` fields whose name or form changed between Megatron-Core releases.

``config.cuda_graph_field``: which parts of a layer CUDA graphs capture.

* < 0.18: ``cuda_graph_scope`` (a string, a list of strings or ``CudaGraphScope`` enums).
* >= 0.18: ``cuda_graph_modules`` (default ``"full"``, i.e. whole layers); ``cuda_graph_scope``
  is a deprecated alias (default None) that ``TransformerConfig.__post_init__`` migrates into
  ``cuda_graph_modules``. The CoE checks run *before* Megatron's ``__post_init__``, so both
  fields are read: a guard reading only one of them accepts a partial MoE capture silently.

``cuda_graph_capture_modules(config)`` returns the captured module names from whichever of the
fields the installed version has, before or after Megatron's normalisation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Tuple

from megatron_coe.compat.registry import mark


@functools.lru_cache(maxsize=1)
def cuda_graph_fields() -> Tuple[str, ...]:
    """The installed ``TransformerConfig``'s CUDA-graph capture fields, current name first."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    return tuple(n for n in ("cuda_graph_modules", "cuda_graph_scope") if n in names)


def cuda_graph_field() -> str:
    """The field a user sets for partial CUDA-graph capture on the installed version."""
    return cuda_graph_fields()[0]


def _names(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, (list, tuple, set)):
        return [n for v in value for n in _names(v)]
    return [getattr(value, "name", str(value))]  # CudaGraphModule / CudaGraphScope enum


def cuda_graph_capture_modules(config) -> List[str]:
    """Names of the modules CUDA graphs capture, e.g. ``["moe_router"]``; ``[]`` for whole
    layers or none. ``"full"`` (>= 0.18's whole-layer default) is not a module."""
    mark("config.cuda_graph_field")
    names: List[str] = []
    for field in cuda_graph_fields():
        names += [n for n in _names(getattr(config, field, None)) if n != "full"]
    return names
