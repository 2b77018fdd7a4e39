"""Megatron-Core's GPT dataset pipeline across releases (``megatron/core/datasets``).

* ``rank_zero_without_process_group()`` (registry ``data.blended_get_rank``): in a single process
  without ``torch.distributed``, ``BlendedDataset._build_indices`` with a cache path calls
  ``torch.distributed.get_rank()`` unguarded on a cache miss (``blended_dataset.py:153`` in
  0.16.1; 0.19.2 checks ``is_initialized()`` first) and fails. Inside the context, and only when
  no process group exists, the ``torch`` name inside ``blended_dataset`` is a view of ``torch``
  whose ``distributed.get_rank()`` answers 0; everything else is torch's own. The binding is
  restored on exit, also on an exception. On releases that guard the call it does nothing.
* ``check_helpers()`` (registry ``data.helpers_cpp``): the sample-index and blending builders are
  the compiled ``megatron.core.datasets.helpers_cpp``, shipped inside the manylinux wheels (0.16.1
  cp311 and 0.19.2 cp312 checked). ``datasets/utils.py: compile_helpers`` would run ``make`` in
  the package directory, but the wheels ship no Makefile, so it is no fallback: a missing
  extension becomes one error naming the installed release and what to install.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_coe.compat.registry import entry, mark
from megatron_coe.compat.versions import version_string


class _DistributedRankZero:
    """``torch.distributed`` whose ``get_rank()`` answers 0 when no process group exists."""

    def __getattr__(self, name):
        return getattr(torch.distributed, name)

    @staticmethod
    def get_rank(group=None):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(group)
        return 0


class _TorchView:
    distributed = _DistributedRankZero()

    def __getattr__(self, name):
        return getattr(torch, name)


@contextlib.contextmanager
def rank_zero_without_process_group():
    """``BlendedDataset`` building works in a process without ``torch.distributed``."""
    if (not entry("data.blended_get_rank").applies()
            or (torch.distributed.is_available() and torch.distributed.is_initialized())):
        yield
        return
    from megatron.core.datasets import blended_dataset

    mark("data.blended_get_rank")
    original = blended_dataset.torch
    blended_dataset.torch = _TorchView()
    try:
        yield
    finally:
        blended_dataset.torch = original


def check_helpers(error_type=ImportError) -> None:
    """Raise ``error_type`` (one message) if Megatron-Core's compiled dataset helpers are missing."""
    mark("data.helpers_cpp")
    try:
        from megatron.core.datasets import helpers  # noqa: F401  (as upstream imports it)
    except ImportError as err:
        release = version_string()
        raise error_type(
            f"Megatron-Core {release}'s compiled dataset helpers (megatron.core.datasets."
            f"helpers_cpp) cannot be imported ({err}). Install a megatron-core wheel for this "
            f"platform, or build it from source (pip install --no-binary megatron-core "
            f"megatron-core=={release}, needs g++ and pybind11)."
        ) from err
