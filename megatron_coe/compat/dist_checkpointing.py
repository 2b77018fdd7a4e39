"""``dist_checkpointing``'s write-results queue across releases (registry ``ckpt.write_results_queue``).

``dist_checkpointing/strategies/filesystem_async.py`` keeps a lazily created queue in the module
global ``_results_queue`` (a spawn-mode ``Manager().Queue()``) and hands it out through
``_get_write_results_queue()`` (< 0.17) or the public ``get_write_results_queue()`` (>= 0.17).
The trainer installs a queue served by its own signal-proof Manager before the first save
(``training/checkpoint.py``); these helpers are the only place that knows the names.
"""

from __future__ import annotations

import contextlib

from megatron_coe.compat.registry import mark


def _filesystem_async():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    mark("ckpt.write_results_queue")
    return filesystem_async


def write_results_queue():
    """The queue every async filesystem writer uses (created by Megatron if none is installed)."""
    fa = _filesystem_async()
    getter = getattr(fa, "get_write_results_queue", None) or fa._get_write_results_queue
    return getter()


def write_results_queue_installed() -> bool:
    """Whether the queue exists already (created by Megatron or installed here)."""
    return getattr(_filesystem_async(), "_results_queue", None) is not None


def install_write_results_queue(queue) -> None:
    """Make ``queue`` the one ``write_results_queue()`` returns (before the first save)."""
    fa = _filesystem_async()
    if not hasattr(fa, "_results_queue"):
        raise RuntimeError("megatron.core.dist_checkpointing.strategies.filesystem_async has no "
                           "_results_queue: this megatron-core release is not supported")
    fa._results_queue = queue


@contextlib.contextmanager
def write_results_queue_swapped(queue):
    """Inside this context dist_checkpointing's writers report to ``queue``; the previous queue
    (or None) is restored afterwards."""
    fa = _filesystem_async()
    previous = getattr(fa, "_results_queue", None)
    install_write_results_queue(queue)
    try:
        yield queue
    finally:
        fa._results_queue = previous
