"""``dist_checkpointing``'s write-results queue across releases (registry ``ckpt.write_results_queue``).

``dist_checkpointing/strategies/filesystem_async.py`` keeps a lazily created queue in the module
global ``_results_queue`` (a spawn-mode ``Manager().Queue()``) and hands it out through
``_get_write_results_queue()`` (< 0.17) or the public ``get_write_results_queue()`` (>= 0.17).
The trainer installs a queue served by its own signal-proof Manager before the first save
(``training/checkpoint.py``); these helpers are the only place that knows the names.

Where the common (non-tensor) state lives (registry ``ckpt.common_state_location``): 0.16.1 writes
it to ``common.pt`` and can read nothing else; 0.19.2 stores it as the ``common_state``
ShardedObject inside the ``torch_dist`` shards (Megatron-LM PR #5160; no ``common.pt``) and still
reads ``common.pt`` (``serialization.load_common_state_dict``, ``_legacy_common_state_exists``).
So a checkpoint saved under 0.16.1 loads under 0.19.2, but not the other way;
``common_state_unreadable`` says why before 0.16.1's loader fails with an unrelated error.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional

from megatron_coe.compat.registry import mark
from megatron_coe.compat.versions import version_string

COMMON_STATE_FILE = "common.pt"  # dist_checkpointing/strategies/common.py: COMMON_STATE_FNAME


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


def reads_embedded_common_state() -> bool:
    """Whether the installed release reads a checkpoint without ``common.pt``."""
    from megatron.core.dist_checkpointing import serialization

    return hasattr(serialization, "_legacy_common_state_exists")


def common_state_unreadable(path: str) -> Optional[str]:
    """None if the installed Megatron-Core can read the common state of the ``dist_checkpointing``
    checkpoint ``path``; otherwise why not and what to do (one sentence)."""
    mark("ckpt.common_state_location")
    if os.path.exists(os.path.join(path, COMMON_STATE_FILE)) or reads_embedded_common_state():
        return None
    return (f"it keeps its common state inside the torch_dist shards (no {COMMON_STATE_FILE}), the "
            f"format of newer Megatron-Core releases (0.19.2 writes it), which the installed "
            f"megatron-core {version_string()} cannot read: load it with the release that saved "
            f"it (megatron-core>=0.19), or convert it (tools/convert_to_hf.py there, then "
            f"tools/convert_from_hf.py here)")
