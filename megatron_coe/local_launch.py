"""Run a function on N gloo processes on this machine, without torchrun (the HF importer
and the tests use it).

Workers are forked after Megatron-Core is imported (no per-rank import cost) and meet through a
``file://`` rendezvous. Each worker returns a picklable value, sent by value (plain ``pickle``:
tensors are copied, not shared through file descriptors that vanish when the worker exits before
the caller reads them); an exception in any worker is
re-raised in the caller with that worker's traceback. Every wait has a timeout so a hung
collective fails the test instead of hanging CI.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import traceback
from typing import Any, Callable

import torch


class WorkerError(RuntimeError):
    pass


def _worker(rank, world_size, init_file, fn, kwargs, results):
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        results.put((rank, True, pickle.dumps(fn(rank, world_size, **kwargs))))
    except BaseException:  # report everything, including assertion failures
        results.put((rank, False, traceback.format_exc()))
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, timeout: float = 300.0, **kwargs):
    """Run ``fn(rank, world_size, **kwargs)`` on ``world_size`` forked processes; list of results."""
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    fd, init_file = tempfile.mkstemp(prefix="coe_rdzv_")
    os.close(fd)
    os.unlink(init_file)
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, init_file, fn, kwargs, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in procs:
            rank, ok, value = results.get(timeout=timeout)
            if ok:
                out[rank] = pickle.loads(value)
            else:
                errors.append(f"--- rank {rank} ---\n{value}")
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout}s waiting for workers")
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
            if p.is_alive():
                p.kill()
        if os.path.exists(init_file):
            os.unlink(init_file)
    if errors:
        raise WorkerError("\n".join(errors))
    return [out[r] for r in range(world_size)]
