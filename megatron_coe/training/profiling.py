"""Profiling and straggler reporting with Megatron-LM's flags.

Owns ``--profile`` (``--use-pytorch-profiler``, ``--profile-step-start``, ``--profile-step-end``,
``--profile-ranks``) and ``--log-straggler`` (``--disable-straggler-on-startup``,
``--straggler-ctrlr-port``, ``--straggler-minmax-count``); the trainer calls ``check`` in its
preflight and drives ``StepProfiler`` / ``StragglerReport`` from its loop.

Profiled steps are the ones Megatron-LM profiles: counting completed iterations, profiling
starts when the iteration count equals ``--profile-step-start`` and stops after the step that
makes it ``--profile-step-end`` (``end - start`` steps). The window is in absolute iterations,
so a resumed run profiles the same steps as an uninterrupted one.

* ``--use-pytorch-profiler``: ``torch.profiler`` (CPU activities, plus CUDA on a GPU); the trace
  is ``<--tensorboard-dir>/../torch_profile/rank-<global rank>.json.gz`` (Megatron-LM's path), a
  Chrome trace readable by Perfetto / ``chrome://tracing`` / TensorBoard.
* without it: ``cudaProfilerStart`` / ``cudaProfilerStop`` around the steps, a capture range for
  ``nsys profile --capture-range=cudaProfilerApi``; needs CUDA (refused on CPU).

``--log-straggler``: on CUDA, Megatron-Core's ``StragglerDetector`` (CUDA events around the
forward/backward schedule, min/max rank report every ``--log-interval`` steps, toggled through
its control port). Without CUDA that detector is inert (it times with CUDA events), so the CPU
report gathers every rank's forward/backward seconds since the last report and rank 0 prints
the slowest and fastest ``--straggler-minmax-count`` ranks.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Optional

import torch

from megatron_coe.training.errors import SetupError
from megatron_coe.training.options import TrainArgs


def check(args: TrainArgs, world_size: int) -> None:
    """Refuse profiler / straggler settings that cannot work here, in one line each."""
    if not args.profile:
        return
    bad = [r for r in args.profile_ranks if r >= world_size]
    if bad:
        raise SetupError(f"--profile-ranks {' '.join(map(str, bad))}: no such rank (world size "
                         f"{world_size}); use ranks 0..{world_size - 1} or omit the flag for all")
    if args.use_pytorch_profiler:
        if not args.tensorboard_dir:
            raise SetupError("--profile --use-pytorch-profiler writes the trace to "
                             "<--tensorboard-dir>/../torch_profile (Megatron-LM's place): set "
                             "--tensorboard-dir")
    elif not torch.cuda.is_available():
        raise SetupError("--profile without --use-pytorch-profiler opens a CUDA profiler (nsys) "
                         "capture range and needs a CUDA device; add --use-pytorch-profiler for "
                         "a torch profiler trace")


def trace_path(args: TrainArgs, rank: int) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(args.tensorboard_dir)), "torch_profile",
                        f"rank-{rank}.json.gz")


class StepProfiler:
    """``before_step(iteration)`` / ``after_step(iteration)`` around every training step
    (``iteration``: completed iterations before / after it)."""

    def __init__(self, args: TrainArgs, rank: int):
        self.args, self.rank = args, rank
        self.active = args.profile and (not args.profile_ranks or rank in args.profile_ranks)
        self.prof = None
        self.path: Optional[str] = None

    def before_step(self, iteration: int) -> None:
        if not self.active or iteration != self.args.profile_step_start:
            return
        if self.args.use_pytorch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
        else:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self.prof = "cuda"

    def after_step(self, iteration: int) -> None:
        if self.prof is not None and iteration >= self.args.profile_step_end:
            self.stop()

    def stop(self) -> None:
        """End the profiled range (also on an early exit) and write the trace."""
        prof, self.prof = self.prof, None
        if prof is None:
            return
        if prof == "cuda":
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            return
        prof.stop()
        self.path = trace_path(self.args, self.rank)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp.json.gz"  # export picks gzip from the suffix
        prof.export_chrome_trace(tmp)
        os.replace(tmp, self.path)
        print(f"rank {self.rank}: profiler trace of iterations {self.args.profile_step_start + 1}"
              f"..{self.args.profile_step_end} written to {self.path}", flush=True)


class StragglerReport:
    """Per-rank timing of the forward/backward schedule, reported every ``--log-interval``."""

    def __init__(self, args: TrainArgs, rank: int, world_size: int):
        self.args, self.rank, self.world = args, rank, world_size
        self.enabled = args.log_straggler
        self.detector = None
        self.seconds = 0.0
        self.steps = 0
        if self.enabled and torch.cuda.is_available():
            from megatron.core.utils import StragglerDetector

            self.detector = StragglerDetector()  # the process-wide singleton
            self.detector.configure(world_size, rank, mmcnt=args.straggler_minmax_count,
                                    enabled=not args.disable_straggler_on_startup,
                                    port=args.straggler_ctrlr_port)

    @contextlib.contextmanager
    def timed(self):
        """Wrap one step's forward/backward schedule."""
        if not self.enabled:
            yield
            return
        if self.detector is not None:
            with self.detector:
                yield
            return
        t0 = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - t0
        self.steps += 1

    def report(self, flops_since_last: float) -> Optional[str]:
        """Collective (every rank): the report line on rank 0 (printed), else None."""
        if not self.enabled:
            return None
        if self.detector is not None:
            self.detector.report(flops_since_last, self.args.log_interval)
            return None
        steps = max(self.steps, 1)
        mine = torch.tensor([self.seconds / steps * 1e3], dtype=torch.float64)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, mine)
        self.seconds, self.steps = 0.0, 0
        if self.rank != 0 or self.args.disable_straggler_on_startup:
            return None
        ms = sorted((g[0].item(), r) for r, g in enumerate(gathered))
        n = min(self.args.straggler_minmax_count, self.world)
        fast = ", ".join(f"rank {r} {t:.1f} ms" for t, r in ms[:n])
        slow = ", ".join(f"rank {r} {t:.1f} ms" for t, r in reversed(ms[-n:]))
        line = (f"straggler: forward/backward per step over the last {self.args.log_interval} "
                f"steps | fastest {fast} | slowest {slow} | slowest/fastest "
                f"{ms[-1][0] / max(ms[0][0], 1e-9):.2f}")
        print(line, flush=True)
        return line
