"""Megatron-Core's number-of-micro-batches calculator, ``--rampup-batch-size`` in every release.

Megatron-LM's batch-size ramp (``--rampup-batch-size START INCR SAMPLES``) is Megatron-Core's
``RampupBatchsizeNumMicroBatchesCalculator`` up to 0.17: the global batch starts at START and
grows by INCR every ``SAMPLES / ((global - START) / INCR)`` consumed samples (the step count
truncated from a float division) until it is the full ``--global-batch-size`` past SAMPLES.
From 0.18 that class is gone (Megatron-LM's ``--rampup-batch-size`` is deprecated and ignored
there) and Megatron-Core has ``StepBatchsizeNumMicroBatchesCalculator`` instead, a piecewise
constant schedule "THRESHOLD:BATCH ..." in samples. On those releases the ramp is that schedule,
with the thresholds where the ramp's own arithmetic changes the batch (``ramp_schedule``), so
both releases give the same batch size at every consumed-sample count.

The calculator is an instance the trainer holds and updates (``update(consumed_samples,
consistency_check)``, then ``get()`` / ``get_current_global_batch_size()``); Megatron-Core's
process-wide calculator (``init_num_microbatches_calculator``) is not used.
"""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_coe.compat.registry import mark


def _ramp_steps(consumed: int, samples_per_increment: float) -> int:
    # the 0.16/0.17 calculator's step count, in the same float arithmetic
    return int(consumed / samples_per_increment)


def ramp_schedule(start: int, increment: int, ramp_samples: int, global_batch_size: int) -> list:
    """``[(first consumed sample, global batch)]`` of the ramp, ascending: the sample counts at
    which Megatron-Core's ramp calculator (<= 0.17) moves to a larger batch, and
    ``ramp_samples + 1`` (past the ramp: the full batch) unless the full batch came earlier."""
    increments = (global_batch_size - start) // increment
    per_increment = ramp_samples / increments
    batches = {0: start}
    for k in range(1, increments + 1):
        first = max(1, int(k * per_increment) - 1)  # near the threshold; then exact, by search
        while first > 0 and _ramp_steps(first - 1, per_increment) >= k:
            first -= 1
        while _ramp_steps(first, per_increment) < k:
            first += 1
        if first > ramp_samples:
            break
        batches[first] = start + k * increment
    if batches[max(batches)] != global_batch_size:
        batches[ramp_samples + 1] = global_batch_size
    return sorted(batches.items())


def num_microbatches_calculator(global_batch_size: int, micro_batch_size: int,
                                data_parallel_size: int, rampup: Optional[Sequence[int]] = None,
                                rank: int = 0):
    """Megatron-Core's calculator for a constant global batch, or for the ramp ``rampup`` =
    (START, INCR, SAMPLES) up to ``global_batch_size``; initialised at 0 consumed samples."""
    from megatron.core import num_microbatches_calculator as calculators

    if not rampup:
        return calculators.ConstantNumMicroBatchesCalculator(
            global_batch_size, micro_batch_size, data_parallel_size, False, rank)
    start, increment, ramp_samples = (int(v) for v in rampup)
    if hasattr(calculators, "RampupBatchsizeNumMicroBatchesCalculator"):
        mark("batch.rampup_calculator")
        return calculators.RampupBatchsizeNumMicroBatchesCalculator(
            global_batch_size, micro_batch_size, data_parallel_size, False, rank, start,
            increment, ramp_samples)
    mark("batch.rampup_step_schedule")
    schedule = " ".join(f"{first}:{batch}" for first, batch in
                        ramp_schedule(start, increment, ramp_samples, global_batch_size))
    return calculators.StepBatchsizeNumMicroBatchesCalculator(
        micro_batch_size, data_parallel_size, False, rank, schedule)
