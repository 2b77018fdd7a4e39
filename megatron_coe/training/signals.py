"""Stop signals (SIGTERM, SIGUSR1): one flag for the whole process, and helper processes immune.

``install()`` runs as early as ``train.main`` can (right after parsing the options, before torch
is imported, the process group exists or a checkpoint is read): from then on a stop signal only
sets a flag. The trainer reads it at each step boundary (all ranks agree through one
all-reduce), saves and exits 0; a signal that arrives during start-up makes the trainer exit 0
before its first step, without writing anything (the last published checkpoint stays the
newest), so a job signalled while it loads a checkpoint restarts cleanly.

Helper processes must not die of these signals: ``scancel`` and Slurm preemption send SIGTERM to
*every* process of the job, and a killed helper breaks the save the trainer is about to make
(dist_checkpointing's spawn-mode ``Manager`` that collects write results: "Connection refused";
its fork-mode writer processes; DataLoader workers: "DataLoader worker ... is killed by signal").
``shielded()`` blocks both signals in the calling thread while helpers are started: a child
inherits the signal mask over ``fork`` and keeps it across ``exec`` (spawn), so the signals stay
pending in it forever (SIGKILL, which Slurm sends after ``KillWait``, still ends it). The
trainer's own delivery is not affected: a signal blocked in one thread goes to another thread of
the process, or stays pending until the block ends, and the Python handler runs either way.
``ignore_in_child()`` is for helpers that run our code first (DataLoader ``worker_init_fn``): it
sets SIG_IGN and unblocks. This is how CPython's own ``resource_tracker`` protects itself.
"""

from __future__ import annotations

import contextlib
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received = 0
_installed = False


def _handler(signum, frame) -> None:
    global _received
    _received = signum


def install() -> None:
    """Route SIGTERM and SIGUSR1 to the flag (idempotent; main thread only)."""
    global _installed
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    _installed = True


def installed() -> bool:
    return _installed


def received() -> int:
    """The last stop signal received by this process (0: none)."""
    return _received


def reset() -> None:
    global _received
    _received = 0


@contextlib.contextmanager
def shielded():
    """Block the stop signals in this thread; processes started inside inherit the block."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def block_in_this_thread() -> None:
    """For helper threads that start processes (e.g. the checkpoint writer's warm-up thread)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def ignore_in_child(*_args) -> None:
    """Run first in a helper process: ignore the stop signals (then unblock them)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
