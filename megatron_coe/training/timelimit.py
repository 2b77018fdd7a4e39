"""Time-limit guard: stop at a step boundary, with a checkpoint, before the job's time runs out.

Two sources of a deadline, the earlier one wins:

* ``--exit-duration-in-mins M`` (Megatron-LM's flag): M minutes of wall time after the trainer
  process started;
* the environment variable ``COE_JOB_END_TIME`` (epoch seconds; ``slurm/pretrain.sbatch`` exports
  the end of the allocation) minus ``--exit-time-margin-mins`` (default 5: time for the final
  checkpoint and the exit).

At each step boundary the trainer stops if the next step would end after the deadline, i.e.
``now + (validation / checkpoint due at this boundary) + next step > deadline``, the next step
being estimated by the slowest of the recent steps. Every rank decides on its own clock and the
decisions are combined in the step's loss all-reduce, so all ranks stop at the same step. The
trainer then saves, publishes the checkpoint and exits 0.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Mapping, Optional

from megatron_coe.training.errors import SetupError
from megatron_coe.training.options import TrainArgs

END_TIME_ENV = "COE_JOB_END_TIME"


def job_end_time(environ: Mapping[str, str] = os.environ) -> Optional[float]:
    """``COE_JOB_END_TIME`` as epoch seconds (None when unset or empty)."""
    raw = environ.get(END_TIME_ENV, "").strip()
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise SetupError(f"{END_TIME_ENV}={raw!r} is not a time in epoch seconds (e.g. "
                         "$(date +%s) + remaining seconds); unset it or fix the launcher.")


def check(args: TrainArgs, environ: Mapping[str, str] = os.environ) -> None:
    """Option values (before anything is built)."""
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        raise SetupError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins}.")
    if args.exit_time_margin_mins < 0:
        raise SetupError(f"--exit-time-margin-mins must be >= 0, got {args.exit_time_margin_mins}.")
    job_end_time(environ)


def deadline(args: TrainArgs, start_time: float,
             environ: Mapping[str, str] = os.environ) -> Optional[float]:
    """Epoch seconds by which the trainer must have stopped stepping (None: no limit)."""
    candidates = []
    if args.exit_duration_in_mins is not None:
        candidates.append(start_time + 60.0 * args.exit_duration_in_mins)
    end = job_end_time(environ)
    if end is not None:
        candidates.append(end - 60.0 * args.exit_time_margin_mins)
    return min(candidates) if candidates else None


class TimeGuard:
    """Remembers recent step times; ``time_up(now, extra)`` is this rank's decision."""

    def __init__(self, deadline: Optional[float], window: int = 10):
        self.deadline = deadline
        self.steps = deque(maxlen=window)

    def record_step(self, seconds: float) -> None:
        self.steps.append(seconds)

    def next_step_estimate(self) -> float:
        return max(self.steps) if self.steps else 0.0

    def time_up(self, now: float, extra: float = 0.0) -> bool:
        """Would ``extra`` seconds of boundary work plus the next step end after the deadline?"""
        if self.deadline is None:
            return False
        return now + extra + self.next_step_estimate() > self.deadline
