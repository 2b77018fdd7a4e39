"""A longer timeout for the default process group during one phase (torch's private setter).

``default_group_timeout(minutes, restore_minutes)``: collectives on the default group time out
after ``minutes`` inside the block and after ``restore_minutes`` again afterwards. The trainer
uses it while rank 0 builds the dataset index caches and the other ranks wait in Megatron-Core's
builder barrier (``training/setup.dataset_build_timeout``). torch has no public setter for an
existing group's timeout: ``torch.distributed.distributed_c10d._set_pg_timeout`` (torch >= 2.3;
NCCL and gloo) is used where present; without it the block runs under the group's own timeout.
"""

from __future__ import annotations

import contextlib
import datetime

import torch


@contextlib.contextmanager
def default_group_timeout(minutes: float, restore_minutes: float):
    from torch.distributed import distributed_c10d as c10d

    set_timeout = getattr(c10d, "_set_pg_timeout", None)
    if not torch.distributed.is_initialized() or set_timeout is None:
        yield
        return
    set_timeout(datetime.timedelta(minutes=minutes))
    try:
        yield
    finally:
        set_timeout(datetime.timedelta(minutes=restore_minutes))
