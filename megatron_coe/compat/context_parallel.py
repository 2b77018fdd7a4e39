"""Context parallelism's batch slicing across Megatron-Core releases.

``cp.batch_slicing``: ``megatron.core.utils.get_batch_on_this_cp_rank`` gives each rank of the
context-parallel group its two load-balanced sequence chunks (of 2 x CP: rank r keeps chunks r
and 2 x CP - 1 - r, so that causal attention costs every rank the same). Its signature changed:

* 0.16: ``get_batch_on_this_cp_rank(batch, cp_group=None)``;
* 0.19: ``get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group=None, hybrid_cp_group_func=None,
  use_per_sequence_balancing=False)``; a batch without ``cu_seqlens`` (not packed: this
  trainer's) takes the same per-sequence split as 0.16.

``batch_on_this_cp_rank(batch, cp_group)`` calls whichever is installed, with the group passed
explicitly (never Megatron's global parallel state).
"""

from __future__ import annotations

import functools
import inspect

from megatron_coe.compat.registry import mark


@functools.lru_cache(maxsize=1)
def _takes_is_hybrid_cp() -> bool:
    from megatron.core.utils import get_batch_on_this_cp_rank

    return "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters


def batch_on_this_cp_rank(batch: dict, cp_group) -> dict:
    """This CP rank's share of ``batch`` ({name: [b, s, ...] tensor}; ``attention_mask``
    [b, 1, s, s] is split along its query dimension), by Megatron-Core's own slicing."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    mark("cp.batch_slicing")
    if _takes_is_hybrid_cp():
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=cp_group)
    return get_batch_on_this_cp_rank(batch, cp_group=cp_group)
