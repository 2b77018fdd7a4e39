"""Megatron-Core's asynchronous ``dist_checkpointing`` save across releases (registry
``ckpt.async_strategy``).

``dist_checkpointing.save(..., async_sharded_save=True)`` returns an ``AsyncRequest`` that an
``AsyncCallsQueue`` runs in a forked process (``strategies/async_utils.py``). From 0.17 on,
``save`` also takes ``async_strategy`` with the default ``"nvrx"`` (nvidia-resiliency-ext, not a
dependency here; without it the save raises); ``"mcore"`` is Megatron-Core's own implementation,
the one 0.16 always uses and whose write-results queue ``compat.dist_checkpointing`` installs.
"""

from __future__ import annotations

import inspect

from megatron_coe.compat.registry import mark


def async_save_kwargs() -> dict:
    """Keyword arguments of ``dist_checkpointing.save`` for Megatron-Core's own async writer."""
    from megatron.core import dist_checkpointing

    mark("ckpt.async_strategy")
    if "async_strategy" in inspect.signature(dist_checkpointing.save).parameters:
        return {"async_sharded_save": True, "async_strategy": "mcore"}
    return {"async_sharded_save": True}


def calls_queue():
    """A new ``AsyncCallsQueue`` with a forked (temporal) writer process per request."""
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    return AsyncCallsQueue(persistent=False)


def request_with_finalize(request, finalize):
    """``request`` (an ``AsyncRequest``) whose finalization is the one callable ``finalize``
    (which runs the request's own finalize functions itself, see ``checkpointing.save_async``)."""
    own = list(request.finalize_fns)
    return request._replace(finalize_fns=[lambda: finalize(own)])
