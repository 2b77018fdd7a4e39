"""Tests' name for ``megatron_coe.local_launch`` (N forked gloo processes, no torchrun).

The launcher lives in the package proper because the HF importer uses it too; production code
never imports ``testing/``.
"""

from megatron_coe.local_launch import WorkerError, run_distributed

__all__ = ["WorkerError", "run_distributed"]
