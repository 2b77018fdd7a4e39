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

``watch_launcher()`` (ranks started by torchrun): when the launcher dies without stopping its
ranks (SIGKILL, OOM killer), the ranks stop too, within about a second, without saving: a
watcher thread sees the parent process change and ends the process with ``os._exit`` (exit 1,
one line on stderr), whatever the main thread is doing. Nothing is published by a rank that
stops this way; an interrupted save leaves only an unpublished ``iter_N.tmp``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

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


LAUNCHER_GONE_EXIT = 1


def under_torchrun(environ=os.environ) -> bool:
    """This process is a rank started by torchrun (torch elastic sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in environ


def watch_launcher(interval: float = 0.5) -> threading.Thread:
    """Exit this process (``os._exit``) as soon as its parent, the launcher, is gone."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent != 1:  # 1: orphaned before we looked
            time.sleep(interval)
        rank = os.environ.get("RANK", "?")
        try:
            print(f"coe-train: error: rank {rank}: the launcher (pid {parent}) is gone: stopping "
                  "without saving", file=sys.stderr, flush=True)
        finally:
            os._exit(LAUNCHER_GONE_EXIT)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
