"""Train a Chain-of-Experts GPT with Megatron-Core.

    # CPU, 2 processes, expert parallelism 2 (examples/quickstart.sh prepares the data):
    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 -m megatron_coe.train \\
        --config examples/tiny/coe2_cpu.yaml --expert-model-parallel-size 2

    # one process, no torchrun:
    python -m megatron_coe.train --config examples/tiny/coe2_cpu.yaml --train-iters 20

Options: ``coe-train --help`` (Megatron-LM flag names; ``--config FILE.yaml`` with the same keys,
flags override the file). The loop is in ``megatron_coe/training/``.

SIGTERM or SIGUSR1 on the ranks: save a checkpoint at the next step boundary and exit 0 (all
ranks agree on the step). The handler is installed right after the options are parsed, so a
signal during start-up (imports, model build, checkpoint loading) ends the run cleanly before its
first step, writing nothing. Helper processes (checkpoint writer, DataLoader workers) ignore
these signals, so a SIGTERM to every process of the job (``scancel``, Slurm preemption,
``kill -TERM -PGID``) still ends with a published checkpoint. Under torchrun, a SIGTERM to
torchrun itself is forwarded to the ranks, but torchrun SIGKILLs ranks still alive 30 s later.
``--exit-duration-in-mins`` and ``$COE_JOB_END_TIME`` (minus ``--exit-time-margin-mins``) stop the
run the same way before a time limit. ``--load DIR`` resumes from the checkpoint DIR's
``latest_checkpointed_iteration.txt`` names (or an ``iter_*`` directory given as DIR); when there
is none it warns and starts fresh, or exits 2 with ``--exit-on-missing-checkpoint``. The
``--save`` directory is locked for the run (``megatron_coe.checkpointing``): a second run on it
exits 2 at start, naming the holder. Checkpoint writer processes die with their rank.

Exit status and the one line each fault prints (``coe-train: ...``, no traceback):

    0    finished; stopped by a signal or time limit (checkpoint saved); or "nothing to train:
         checkpoint ... is at iteration N >= --train-iters M" (a finished run started again)
    1    a collective timed out (--distributed-timeout-minutes: a hung peer) or lost its peer,
         naming what the rank was doing; the launcher (torchrun) is gone; any other failure
    2    a user error (options, data, tokenizer, checkpoint shape), before any process group
    3    a NaN/Inf lm loss, aux loss, gradient norm or parameter (--check-for-nan-in-loss-and-grad)
    130  SIGINT (Ctrl-C): stops at once, without saving
"""

from __future__ import annotations

import os
import sys
import time

_START_TIME = time.time()  # process start, for --exit-duration-in-mins


def _user_errors() -> tuple:
    """Exception types that mean "the run is misconfigured" (message only, no traceback)."""
    from megatron_coe.config import CoEConfigError
    from megatron_coe.checkpointing import CheckpointError
    from megatron_coe.training.options import OptionError
    from megatron_coe.training.setup import SetupError

    errors = [OptionError, SetupError, CoEConfigError, CheckpointError]
    try:
        from megatron_coe.data.tokenizer import TokenizerError

        errors.append(TokenizerError)
    except ImportError:
        pass
    try:
        from megatron_coe.data.datasets import DataError

        errors.append(DataError)
    except ImportError:
        pass
    return tuple(errors)


def _quiet_known_warnings() -> None:
    """Megatron's import-time notices about optional GPU packages, repeated on every rank."""
    import warnings

    for pattern in (r".*(Apex|Transformer Engine).* not installed.*", r".*full scope is deprecated.*",
                    r".*\.grad attribute of a Tensor that is not a leaf.*",
                    r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).*deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def _kill_children() -> None:
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.kill()
    except Exception:  # best effort: the children also die when they notice the parent is gone
        pass


def _stop_on_sigint() -> None:
    """SIGINT ends this process at once with exit 130 and one line, wherever it arrives.

    Python's default turns SIGINT into a KeyboardInterrupt, which a library's bare ``except:``
    (seen during start-up under load) can swallow, leaving the run going. A handler that exits
    cannot be swallowed. Nothing is published on this path: a save in progress stays an
    unpublished ``iter_N.tmp`` and its writer processes die with the rank.
    """
    import signal

    main_pid = os.getpid()

    def interrupted(signum, frame):
        if os.getpid() == main_pid:  # forked helpers (data workers, writers) exit quietly
            _kill_children()  # else a data worker prints a traceback when its parent vanishes
            rank = os.environ.get("RANK", "0")
            os.write(2, f"coe-train: rank {rank}: interrupted (SIGINT): stopped without "
                        "saving\n".encode())
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


def main(argv: list | None = None) -> int:
    """Run the trainer; the exit status (see the module docstring)."""
    _stop_on_sigint()
    try:
        return _main(argv)
    except KeyboardInterrupt:  # at any point: imports, start-up, training
        rank = os.environ.get("RANK", "0")
        print(f"coe-train: rank {rank}: interrupted (SIGINT): stopped without saving",
              file=sys.stderr, flush=True)
        return 130


def _main(argv: list | None) -> int:
    from megatron_coe.training.options import OptionError, parse_args

    rank = int(os.environ.get("RANK", "0"))
    try:
        args = parse_args(argv)  # before importing torch: --help and typos answer at once
    except OptionError as e:
        if rank == 0:
            print(f"coe-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    from megatron_coe.training import signals

    if args.exit_signal_handler:  # before anything slow: a signal from now on is never lost
        signals.install()
    if signals.under_torchrun():  # ranks must not outlive torchrun (SIGKILLed, OOM-killed)
        signals.watch_launcher()

    # Before the first CUDA call (the driver reads it when the context is created): one
    # hardware queue, which tensor parallelism needs before Blackwell (Megatron-LM's rule; a
    # different value set by the user is refused then: precision.check_cuda_max_connections).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import torch

    _quiet_known_warnings()
    if not torch.cuda.is_available():
        # Megatron's jit_fuser is torch.compile: ~15 s of compilation per step shape on a CPU.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.compat.te_absent import cpu_note
    from megatron_coe.training.trainer import (
        EXIT_NON_FINITE, CollectiveError, NonFiniteError, NothingToTrain, Trainer, preflight)

    user_errors = _user_errors()
    try:
        pre = preflight(args, int(os.environ.get("WORLD_SIZE", "1")))  # user errors, fast
        install_cpu_compat()
        if rank == 0 and cpu_note():
            print(cpu_note(), flush=True)
        _init_distributed(args, rank)
        from megatron_coe.checkpointing import lock_collective

        lock_collective(args.save)  # held until exit: a second run on --save fails here
        Trainer(args, pre, start_time=_START_TIME).train()
    except user_errors as e:
        if rank == 0:
            print(f"coe-train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except NothingToTrain as e:
        if rank == 0:
            print(f"coe-train: {e}", flush=True)
        return 0
    except NonFiniteError as e:
        if rank == 0:
            print(f"coe-train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_NON_FINITE
    except CollectiveError as e:  # every rank says what it was waiting for
        print(f"coe-train: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if torch.distributed.is_initialized():
            from megatron_coe.parallel import destroy_parallel

            destroy_parallel()
            torch.distributed.destroy_process_group()
    return 0


def _init_distributed(args, rank: int) -> None:
    """``setup.init_distributed``; a rendezvous that times out is one ``CollectiveError``."""
    from megatron_coe.training import setup
    from megatron_coe.training.trainer import CollectiveError

    try:
        setup.init_distributed(args)
    except RuntimeError as e:  # DistStoreError / DistNetworkError derive from it
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        first = str(e).strip().splitlines()[0]
        raise CollectiveError(
            f"rank {rank}: start-up: rendezvous (init_process_group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) timed out after "
            f"--distributed-timeout-minutes {args.distributed_timeout_minutes:g}: a rank did not "
            f"start ({first})") from None


if __name__ == "__main__":  # required: dist_checkpointing spawns a process that imports __main__
    sys.exit(main())
