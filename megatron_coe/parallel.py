"""Process groups: the one place that initializes Megatron-Core's parallel state and RNG."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed


def initialize_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: int | None = None,
    seed: int = 1234,
    distributed_timeout_minutes: float = 10.0,
) -> ProcessGroupCollection:
    """Build TP/PP/EP/DP groups on the already-initialized default process group and seed RNGs.

    Returns the ``ProcessGroupCollection`` that modules receive as ``pg_collection``.
    ``distributed_timeout_minutes`` is every new group's collective timeout (Megatron-Core's own
    default is 30 minutes; the trainer passes ``--distributed-timeout-minutes``).
    """
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=distributed_timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
