"""Process groups and RNG: the one place that initializes Megatron-Core's parallel state and seeds.

``initialize_parallel`` builds the groups, seeds every generator once (``seed_rngs``) and
returns the ``ProcessGroupCollection`` that the rest of the code passes down explicitly
(``build_coe_gpt_model(pg_collection=...)`` -> ``GPTModel`` -> every layer). No CoE module reads
``parallel_state``; this module is the only one that initializes it.
"""

from __future__ import annotations

import random

import numpy as np
import torch
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
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
) -> ProcessGroupCollection:
    """Build TP/PP/CP/EP/DP groups on the already-initialized default process group and seed
    RNGs.

    Returns the ``ProcessGroupCollection`` that modules receive as ``pg_collection``.
    ``distributed_timeout_minutes`` is every new group's collective timeout (Megatron-Core's own
    default is 30 minutes; the trainer passes ``--distributed-timeout-minutes``).

    With ``context_parallel_size`` > 1 Megatron-Core lays the ranks out as tp-cp-ep-dp-pp:
    ``cp`` holds the ranks that share one sequence, ``dp`` the replicas that read different
    samples, ``dp_cp`` both (DDP reduces the dense gradients and the distributed optimizer
    shards over it), and the experts' own layout (EP x expert-TP x expert-DP per stage) folds CP
    into the expert data-parallel group ``expt_dp``.
    ``virtual_pipeline_model_parallel_size``: model chunks per pipeline rank (None: not
    interleaved), recorded in the parallel state as Megatron-LM does; the model chunks take
    their ``vp_stage`` explicitly.
    """
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        distributed_timeout_minutes=distributed_timeout_minutes,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
    )
    pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    seed_rngs(seed, pg_collection)
    return pg_collection


def seed_rngs(seed: int, pg_collection: ProcessGroupCollection) -> None:
    """Seed Python, numpy, torch and Megatron's model-parallel RNG tracker for this rank.

    Pipeline stages get different seeds (``seed + 100 * pp_rank``, as Megatron-LM); the tracker
    adds Megatron's own tensor/expert-parallel offsets for the ranks in ``pg_collection``.
    """
    seed = seed + 100 * pg_collection.pp.rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, tp_rank=pg_collection.tp.rank(),
                                    ep_rank=pg_collection.ep.rank(),
                                    etp_rank=pg_collection.expt_tp.rank())


def destroy_parallel() -> None:
    parallel_state.destroy_model_parallel()
