"""The on-disk checkpoint format, owned here alone (trainer, HF importer, exporter, analysis).

Layout of a checkpoint root (the trainer's ``--save``, the importer's ``--save``)::

    ROOT/latest_checkpointed_iteration.txt   the ONLY record of "latest" (an iteration number)
    ROOT/iter_0000020/                       a published checkpoint
        coe_checkpoint.json                  metadata, written last: iteration, args, layout,
                                             arch (the ModelArch record), ..., and ``files``: size + CRC-32 of
                                             every other file of the directory
        metadata.json, .metadata, common.pt, *.distcp   dist_checkpointing (torch_dist)
        rng/rank_00000.pt                    per-rank RNG states (trainer only)
    ROOT/iter_0000030.tmp/                   being written, or left by a crash: never read
    ROOT/coe_save.lock                       flock(2)-ed by the run writing ROOT; holder inside

What this module owns (``training/checkpoint.py`` builds the Megatron state that goes in):

* names: ``iteration_dir``, ``TRACKER``, ``META``, ``LOCK``; ``find_checkpoint`` resolves a root
  through the tracker only (an ``iter_*`` directory newer than the tracker is not used) or takes
  an iteration directory as is; ``read_meta`` (a damaged json is named in one line);
* ``save`` (collective): every rank writes into ``iter_N.tmp``, the ranks agree that all writes
  succeeded, the files are checksummed (spread over the ranks), rank 0 writes the metadata and
  ``publish``-es: fsync, rename into place keeping the previous copy of the same iteration until
  the new one is in, then the tracker (write, fsync, ``os.replace``, fsync the directory). A
  write error (ENOSPC, EROFS, EDQUOT, ...) is reported as such on every rank, the partial
  ``.tmp`` is removed, and the published checkpoints are untouched;
* ``verify`` (collective when a process group exists): sizes and CRC-32 against ``files``;
  a damaged or truncated file is named, with the newest older checkpoint that verifies;
* ``SaveLock``: an exclusive ``flock`` on ``ROOT/coe_save.lock`` for the whole run; a second
  writer fails at start naming the holder (host, pid, job). The kernel drops the lock when the
  holder dies (even of SIGKILL); forked children do not inherit it;
* ``check_save_dir``: ``--save`` is a directory, writable, with room for a checkpoint;
* ``sharded_writer``: the context for ``dist_checkpointing.save``: Megatron's write-results queue
  is an in-process ``queue.Queue`` (the save is synchronous: the forked writers report to the
  saving process, which reads the queue itself; Megatron's default is a spawn-mode ``Manager``
  server process, which outlived its rank and could hang the interpreter's exit), and the forked
  writer processes get ``PR_SET_PDEATHSIG`` = SIGKILL, so they die with their rank.

Process-wide state (needed by the ``os.register_at_fork`` hook): the lock file descriptors to
close in forked children, and the thread whose forks get the parent-death signal.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import re
import shutil
import signal
import socket
import threading
import time
import zlib
from typing import Callable, Optional

TRACKER = "latest_checkpointed_iteration.txt"
META = "coe_checkpoint.json"
LOCK = "coe_save.lock"
FORMAT_VERSION = 1
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                     "chained_optim_avoid_prefix": True, "singleton_local_shards": False}
_ITER_DIR = re.compile(r"^iter_(\d{7})$")
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be found, read, verified or written; the message says why."""


# --------------------------------------------------------------------------- names
def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_published(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def read_tracker(root: str) -> Optional[int]:
    """The iteration the tracker of ``root`` names, or None without a tracker."""
    path = os.path.join(root, TRACKER)
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    try:
        return int(text.strip())
    except ValueError:
        raise CheckpointError(f"{path} is damaged (holds {text[:40]!r}, not an iteration number): "
                              "write the iteration of the checkpoint to resume from into it") from None


def published_iterations(root: str) -> list:
    """Iterations of the published ``iter_*`` directories under ``root``, ascending."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return sorted(int(m.group(1)) for n in names
                  if (m := _ITER_DIR.match(n)) and is_published(os.path.join(root, n)))


def find_checkpoint(load: str, recover: bool = False) -> Optional[str]:
    """The checkpoint ``load`` names: ``load`` itself if it is an iteration directory, else the
    one the tracker of ``load`` names; None when ``load`` holds no tracker (or does not exist).

    ``recover`` (the trainer's ``--load``): a root whose tracker is lost (a copy that missed one
    file) but that holds published iterations gives the newest of them whose files verify
    (``recover_untracked``), never None; ``untracked_note`` is the line that says so."""
    if os.path.exists(load) and not os.path.isdir(load):
        raise CheckpointError(f"{load} is a file, not a checkpoint directory: pass the --save "
                              "directory of a run or one of its iter_* directories")
    if is_published(load):
        return load
    iteration = read_tracker(load)
    if iteration is None:
        return recover_untracked(load) if recover else None
    path = iteration_dir(load, iteration)
    if is_published(path):
        return path
    if is_published(path + ".old"):  # a re-save of this iteration stopped between its renames
        return path + ".old"
    raise CheckpointError(f"{os.path.join(load, TRACKER)} names iteration {iteration} but {path} "
                          f"is missing or has no {META}{_older_hint(load, iteration)}")


_RECOVERED: dict = {}  # realpath of a root without tracker -> (iteration, [(skipped, why)])


def recover_untracked(load: str) -> Optional[str]:
    """The newest published iteration of ``load`` (a root without tracker) whose metadata and
    files verify; None when it holds no published iteration. When every one is damaged:
    ``CheckpointError`` listing them (never a silent start from scratch)."""
    found = published_iterations(load)
    if not found:
        return None
    skipped = []
    for it in reversed(found):
        path = iteration_dir(load, it)
        meta = read_meta_quiet(path)
        if meta is None or not isinstance(meta.get("iteration"), int):
            skipped.append((it, f"{META} is damaged"))
            continue
        problems = _check_files(path, meta.get("files") or {}, range_all=True)
        if problems:
            skipped.append((it, sorted(problems)[0]))
            continue
        _RECOVERED[os.path.realpath(load)] = (it, skipped)
        return path
    listed = "; ".join(f"iter_{it:07d}: {why}" for it, why in skipped)
    raise CheckpointError(
        f"--load {load} has no {TRACKER} and none of its {len(found)} checkpoint(s) verifies "
        f"({listed}): nothing to resume and its iterations must not be replaced by a new run; "
        f"pass a checkpoint to --load, or to start over use an empty --save (or remove "
        f"{os.path.join(load, 'iter_*')})")


def untracked_note(load: str) -> Optional[str]:
    """The one line about a ``recover_untracked`` resume of ``load`` (None if it was not one)."""
    got = _RECOVERED.get(os.path.realpath(load))
    if got is None:
        return None
    it, skipped = got
    damaged = ("; skipped damaged " + ", ".join(f"iter_{s:07d} ({why})" for s, why in skipped)
               if skipped else "")
    return (f"note: --load {load} has no {TRACKER} (lost or not copied): resuming the newest "
            f"checkpoint whose checksums verify, iteration {it} ({iteration_dir(load, it)})"
            f"{damaged}; the next save writes the tracker again")


def describe_missing(load: str) -> str:
    """Why ``find_checkpoint(load)`` found nothing, for the warning / error line."""
    if not os.path.exists(load):
        return f"--load {load} does not exist"
    unpublished = [n for n in sorted(os.listdir(load)) if n.startswith("iter_")]
    if unpublished:
        shown = (unpublished if len(unpublished) <= 4
                 else [*unpublished[:2], f"... ({len(unpublished) - 3} more)", unpublished[-1]])
        return (f"--load {load} has no {TRACKER}; its {', '.join(shown)} "
                f"{'are' if len(unpublished) > 1 else 'is'} not a published checkpoint "
                "(pass an iter_* directory to load it explicitly)")
    return f"--load {load} holds no checkpoint ({TRACKER} is missing)"


def read_meta(path: str) -> dict:
    """``path/coe_checkpoint.json``; a missing or damaged file is one line naming it."""
    file = os.path.join(path, META)
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing: {path} is not a published checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror}") from None
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or not isinstance(meta.get("iteration"), int):
            raise ValueError("no iteration recorded")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        what = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else str(e)
        raise CheckpointError(f"checkpoint metadata {file} is damaged ({len(raw)} bytes; {what})"
                              f"{_older_hint(os.path.dirname(path), _iteration_of(path))}") from None
    return meta


def _iteration_of(path: str) -> Optional[int]:
    m = _ITER_DIR.match(os.path.basename(os.path.normpath(path)).split(".")[0])
    return int(m.group(1)) if m else None


def _older_hint(root: str, before: Optional[int]) -> str:
    """'; the last good checkpoint is ...' naming the newest older checkpoint that verifies."""
    good = last_good(root, before)
    if good is None:
        return "; no older intact checkpoint in " + root
    return f"; the last good checkpoint is iteration {good} ({iteration_dir(root, good)}): pass it to --load"


def last_good(root: str, before: Optional[int] = None) -> Optional[int]:
    """The newest published iteration below ``before`` whose metadata and files verify."""
    for it in reversed(published_iterations(root)):
        if before is not None and it >= before:
            continue
        path = iteration_dir(root, it)
        try:
            meta = read_meta_quiet(path)
        except CheckpointError:
            continue
        if meta is not None and not _check_files(path, meta.get("files") or {}, range_all=True):
            return it
    return None


def read_meta_quiet(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        return meta if isinstance(meta, dict) else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- integrity
def _files(directory: str) -> list:
    """Relative paths of every file under ``directory`` except the metadata itself."""
    out = []
    for base, _, names in os.walk(directory):
        for n in names:
            rel = os.path.relpath(os.path.join(base, n), directory)
            if rel != META:
                out.append(rel)
    return sorted(out)


def _crc32(path: str) -> tuple:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def _dist():
    """(rank, world, torch.distributed) when a process group exists, else (0, 1, None)."""
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1, None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist
    return 0, 1, None


def checksum_files(directory: str) -> dict:
    """{relative path: [size, crc32]} of ``directory`` (collective: each rank hashes a share)."""
    rank, world, dist = _dist()
    names = _files(directory)
    mine = {n: list(_crc32(os.path.join(directory, n))) for n in names[rank::world]}
    if dist is None:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: v for p in parts for k, v in p.items()}


def _check_files(path: str, files: dict, range_all: bool = False) -> list:
    """Problems (one phrase per damaged file) of this rank's share of ``files``."""
    rank, world, _ = _dist()
    names = sorted(files)
    if not range_all:
        names = names[rank::world]
    problems = []
    for name in names:
        size, crc = files[name]
        full = os.path.join(path, name)
        try:
            actual = os.path.getsize(full)
            if actual != size:
                problems.append(f"{name} is truncated or altered ({actual} bytes, {size} written)")
            elif _crc32(full)[1] != crc:
                problems.append(f"{name} is damaged (checksum {_crc32(full)[1]}, {crc} written)")
        except FileNotFoundError:
            problems.append(f"{name} is missing")
        except OSError as e:
            problems.append(f"{name} cannot be read ({e.strerror})")
    return problems


def verify(path: str, meta: dict) -> None:
    """Check every file of checkpoint ``path`` against its recorded size and CRC-32.

    Collective when a process group exists (each rank reads a share; every rank raises the same
    ``CheckpointError``). Checkpoints written before checksums were recorded are not checked.
    """
    files = meta.get("files")
    if not files:
        return
    rank, world, dist = _dist()
    problems = _check_files(path, files)
    if dist is not None:
        parts = [None] * world
        dist.all_gather_object(parts, problems)
        problems = [p for part in parts for p in part]
    if problems:
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        root = os.path.dirname(os.path.normpath(path))
        raise CheckpointError(f"checkpoint {path} is damaged: {sorted(problems)[0]}{more}"
                              f"{_older_hint(root, _iteration_of(path))}")


# --------------------------------------------------------------------------- storage errors
_STORAGE_ERRNOS = {errno.ENOSPC: "no space left on device (ENOSPC)",
                   errno.EROFS: "read-only file system (EROFS)",
                   errno.EDQUOT: "disk quota exceeded (EDQUOT)",
                   errno.EACCES: "permission denied (EACCES)",
                   errno.EPERM: "operation not permitted (EPERM)",
                   errno.EFBIG: "file too large (EFBIG)",
                   errno.EIO: "I/O error (EIO)"}
_ERRNO_TEXT = re.compile(r"\[Errno (\d+)\]")


def _errno_in(exc: BaseException) -> Optional[int]:
    """An errno from the storage table found in ``exc``, its causes or their texts."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
            return exc.errno
        for m in _ERRNO_TEXT.finditer(str(exc)):
            if int(m.group(1)) in _STORAGE_ERRNOS:
                return int(m.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


def probe(directory: str, nbytes: int = 1 << 20) -> Optional[int]:
    """Write, fsync and remove ``nbytes`` in ``directory``; the errno of a failure, else None."""
    path = os.path.join(directory, f".coe_write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            block = b"\0" * min(nbytes, 1 << 20)
            left = nbytes
            while left > 0:
                left -= os.write(fd, block[:left])
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(path)
    except OSError as e:
        return e.errno
    return None


def free_bytes(directory: str) -> Optional[int]:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def storage_error(directory: str, exc: BaseException, what: str) -> Optional[str]:
    """One line for a failed write of ``what`` into ``directory``, when storage is the cause.

    The errno comes from the exception when it has one; torch's writers lose it ("unexpected pos
    704 vs 598"), so the directory is then probed (a 1 MiB write + fsync, and the free space).
    """
    code = _errno_in(exc)
    if code is None:
        target = directory if os.path.isdir(directory) else os.path.dirname(directory)
        code = probe(target)
        free = free_bytes(target)
        if code is None and free is not None and free < (1 << 20):
            code = errno.ENOSPC
    if code is None:
        return None
    return f"cannot write {what} to {directory}: {_STORAGE_ERRNOS.get(code, os.strerror(code))}"


# --------------------------------------------------------------------------- --save checks
def check_save_dir(path: str, need_bytes: int = 0, flag: str = "--save") -> None:
    """``path`` is (or can be made) a writable directory with ``need_bytes`` free."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path} is a file, not a directory: pass a directory "
                              "(it is created if missing)")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{flag} {path} cannot be created: "
                              f"{_STORAGE_ERRNOS.get(e.errno, e.strerror)}") from None
    code = probe(path, 64 << 10)
    if code is not None:
        raise CheckpointError(f"{flag} {path} is not writable: "
                              f"{_STORAGE_ERRNOS.get(code, os.strerror(code))}; choose another "
                              f"{flag} or fix the directory before training")
    free = free_bytes(path)
    if need_bytes and free is not None and free < need_bytes:
        raise CheckpointError(f"{flag} {path} has {_size(free)} free but a checkpoint of this run "
                              f"needs about {_size(need_bytes)}: free space or choose another "
                              f"{flag}")


def checkpoint_bytes(path: str) -> int:
    total = 0
    for base, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(base, n))
    return total


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- lock
_LOCK_FDS: set = set()          # closed in forked children (they must not keep the lock)
_DEATHSIG: Optional[tuple] = None  # (thread ident, pid) whose forks die with that pid
_HOOKED = False


def _install_fork_hook() -> None:
    global _HOOKED
    if not _HOOKED and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _HOOKED = True


def _after_fork_in_child() -> None:
    global _DEATHSIG
    for fd in list(_LOCK_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    target = _DEATHSIG
    if target is not None and threading.get_ident() == target[0]:
        set_parent_death_signal()
        if os.getppid() != target[1]:  # the parent died before the signal was armed
            os._exit(1)
        # this child's own forks (the file writers of an --async-save writer) die with it
        _DEATHSIG = (target[0], os.getpid())


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux ``prctl(PR_SET_PDEATHSIG)``: this process gets ``sig`` when the *thread* that
    forked it exits (so only forks from a thread that lives as long as the process use it)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _holder() -> str:
    job = (os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
           or os.environ.get("COE_JOB_ID") or "-")
    return (f"host {socket.gethostname()} pid {os.getpid()} job {job} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")


class SaveLock:
    """Exclusive ``flock`` on ``root/coe_save.lock`` (held until ``release`` or process exit)."""

    def __init__(self, root: str, flag: str = "--save"):
        import fcntl

        self.path = os.path.join(root, LOCK)
        try:
            os.makedirs(root, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CheckpointError(f"{flag} {root}: cannot create the lock file {self.path}: "
                                  f"{_STORAGE_ERRNOS.get(e.errno, e.strerror)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(self.fd, 500, 0).decode(errors="replace").strip()
            os.close(self.fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CheckpointError(f"{flag} {root}: cannot lock {self.path}: {e.strerror}") from None
            raise CheckpointError(
                f"{flag} {root} is in use by another run ({holder or 'holder unknown'}): two runs "
                f"must not write one {flag} directory; wait for it to end or use another "
                f"{flag}") from None
        _install_fork_hook()
        _LOCK_FDS.add(self.fd)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (_holder() + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is not None and self.fd in _LOCK_FDS:
            _LOCK_FDS.discard(self.fd)
            os.close(self.fd)  # drops the lock; the file stays (removing it would race a locker)
        self.fd = None


_STALE = re.compile(r"^iter_(\d{7})\.(tmp|old)$")


def remove_stale(root: str) -> list:
    """Remove what interrupted saves left in ``root``; only while this process holds its
    ``SaveLock`` (no other run can be writing there, so they are provably dead): every
    ``iter_N.tmp`` (never published), an ``iter_N.old`` whose ``iter_N`` is published (the copy a
    re-save keeps until the tracker moves) and the tracker's temporary. Returns their names."""
    removed = []
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return removed
    for name in names:
        m = _STALE.match(name)
        path = os.path.join(root, name)
        if m and (m.group(2) == "tmp" or is_published(iteration_dir(root, int(m.group(1))))):
            shutil.rmtree(path, ignore_errors=True)
        elif name == TRACKER + ".tmp":
            with contextlib.suppress(OSError):
                os.unlink(path)
        else:
            continue
        if not os.path.exists(path):
            removed.append(name)
    return removed


def lock_collective(root: Optional[str], flag: str = "--save") -> Optional[SaveLock]:
    """Rank 0 takes ``SaveLock(root)``; every rank raises the same error when it is held. With
    the lock held, rank 0 removes the temporaries of interrupted saves (``remove_stale``) and
    says so in one line."""
    if not root:
        return None
    rank, world, dist = _dist()
    lock, message = None, None
    if rank == 0:
        try:
            lock = SaveLock(root, flag)
        except CheckpointError as e:
            message = str(e)
        if lock is not None:
            removed = remove_stale(root)
            if removed:
                print(f"note: removed {len(removed)} temporary file(s) left in {flag} {root} by "
                      f"an interrupted save ({', '.join(removed)}): this run holds its lock, so "
                      "no other run is writing them", flush=True)
    if dist is not None:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise CheckpointError(message)
    return lock


# --------------------------------------------------------------------------- writing
@contextlib.contextmanager
def sharded_writer(results_queue=None):
    """Context for ``dist_checkpointing.save``: in-process results queue (``results_queue``: one
    that crosses processes, for an async save's forked writer), writers die with us."""
    global _DEATHSIG
    from megatron_coe.compat.dist_checkpointing import write_results_queue_swapped

    _install_fork_hook()
    _DEATHSIG = (threading.get_ident(), os.getpid())
    try:
        with write_results_queue_swapped(queue.Queue() if results_queue is None
                                         else results_queue):
            yield
    finally:
        _DEATHSIG = None


def _fsync_tree(directory: str) -> None:
    for base, dirs, names in os.walk(directory):
        for n in names:
            fd = os.open(os.path.join(base, n), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(base)


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str, data: dict) -> None:
    """Write ``path`` completely (temp file, fsync, rename) or not at all."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(root: str, tmp: str, iteration: int) -> str:
    """Rank 0: make the complete ``tmp`` the published ``iter_N`` and point the tracker at it.

    fsync first; an existing ``iter_N`` (a re-save) is moved aside and removed only after the
    tracker names the new one, so some complete copy of every published iteration exists at
    every instant (``find_checkpoint`` falls back to ``iter_N.old``).
    """
    final = iteration_dir(root, iteration)
    old = final + ".old"
    _fsync_tree(tmp)
    if os.path.exists(final):
        shutil.rmtree(old, ignore_errors=True)  # only garbage while iter_N exists
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(root)
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _agree(error: Optional[BaseException], directory: str, what: str, cleanup: Optional[str]):
    """All ranks learn whether any rank failed; storage failures become one-line errors."""
    rank, world, dist = _dist()
    line = None
    if error is not None:
        line = storage_error(directory, error, what) or ""
    lines = [line]
    if dist is not None:
        lines = [None] * world
        dist.all_gather_object(lines, line)
    failed = [(r, m) for r, m in enumerate(lines) if m is not None]
    if not failed:
        return
    if rank == 0 and cleanup:
        shutil.rmtree(cleanup, ignore_errors=True)  # the partial write: give the space back
    storage = [(r, m) for r, m in failed if m]
    if storage:
        r, m = storage[0]
        raise CheckpointError(m + (f" (rank {r})" if world > 1 else "") + _published_note(
            os.path.dirname(directory.rstrip("/"))))
    if error is not None:
        raise error
    raise RuntimeError(f"saving {what} failed on rank(s) {[r for r, _ in failed]} (see their log)")


def _published_note(root: str) -> str:
    try:
        found = find_checkpoint(root)
    except CheckpointError:
        found = None
    return (f"; the published checkpoint {found} is untouched" if found
            else "; no checkpoint was published")


def save(root: str, iteration: int, write: Callable[[str], None], meta: Optional[dict]) -> str:
    """Collective: ``write(tmp)`` on every rank, checksums, then rank 0 publishes ``iter_N``.

    ``meta`` (rank 0's; other ranks may pass None) becomes ``coe_checkpoint.json`` with
    ``format_version``, ``iteration`` and ``files`` added.
    """
    tmp = begin(root, iteration)
    error = None
    try:
        write(tmp)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException;
        error = e               # every rank must learn about any failure (see _agree)
    return finish(root, iteration, tmp, meta, error)


def existing_iterations(root: str) -> list:
    """Iterations with an ``iter_N`` (or a re-save's ``iter_N.old``) directory under ``root``,
    published or not, ascending."""
    try:
        names = os.listdir(root)
    except OSError:
        return []
    out = set()
    for n in names:
        m = _ITER_DIR.match(n) or (_STALE.match(n) if n.endswith(".old") else None)
        if m and os.path.isdir(os.path.join(root, n)):
            out.add(int(m.group(1)))
    return sorted(out)


def _iterations_text(its: list) -> str:
    names = [f"iter_{it:07d}" for it in its]
    if len(names) > 4:
        names = [*names[:2], f"... ({len(names) - 3} more)", names[-1]]
    return ", ".join(names)


def refuse_replacing(root: str, iteration: int) -> None:
    """A save never replaces a checkpoint directory that its run did not write: ``iter_N`` (or
    ``iter_N.old``) of ``root`` existing before this save is refused in one line. (A trainer run
    saves each iteration once; the HF importer checks its ``--save`` itself.)"""
    if iteration in existing_iterations(root):
        raise CheckpointError(
            f"--save {root} already holds {iteration_dir(root, iteration)}, which this run did "
            f"not write: a save never replaces another run's checkpoint; resume that run with "
            f"--load {root}, or choose another --save")


def refuse_overlap(root: str, start: int, end: int) -> None:
    """Before training: ``root`` must hold no iteration this run could save (``start`` <
    N <= ``end``); a run that would replace another run's checkpoints is refused at start."""
    clash = [it for it in existing_iterations(root) if start < it <= end]
    recovered, skipped = _RECOVERED.get(os.path.realpath(root), (None, []))
    damaged = {it: why for it, why in skipped if it in clash}
    if damaged:  # a lost tracker, resumed below damaged iterations this run would replace
        listed = "; ".join(f"{iteration_dir(root, it)}: {why}" for it, why in damaged.items())
        raise CheckpointError(
            f"--save {root} has no {TRACKER}; its newest intact checkpoint is iteration "
            f"{recovered}, but this run would replace the damaged {listed}: a save never "
            f"replaces another run's checkpoint; remove the damaged directory to resume "
            f"iteration {recovered}, or choose another --save")
    if clash:
        raise CheckpointError(
            f"--save {root} already holds {_iterations_text(clash)}, which this run (iterations "
            f"{start + 1}-{end}) would replace: a save never replaces another run's checkpoint; "
            f"resume the newest with --load {iteration_dir(root, max(clash))}, or choose another "
            f"--save (or remove those iter_* directories)")


def begin(root: str, iteration: int) -> str:
    """Collective: the empty ``iter_N.tmp`` every rank writes into (an older one removed)."""
    rank, _, _ = _dist()
    tmp = iteration_dir(root, iteration) + ".tmp"
    error = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
            os.makedirs(tmp)
        except OSError as e:
            error = e
    _agree(error, tmp, f"checkpoint iteration {iteration}", None)
    return tmp


def agree(error: Optional[BaseException], root: str, iteration: int) -> None:
    """Collective: raise on every rank when any rank's part of saving ``iter_N.tmp`` failed
    (the partial write removed); for the steps of an async save between ``begin`` and
    ``finish``."""
    tmp = iteration_dir(root, iteration) + ".tmp"
    _agree(error, tmp, f"checkpoint iteration {iteration}", tmp)


def async_results_queue():
    """The write-results queue of an async save: its writer is a forked process."""
    import multiprocessing

    return multiprocessing.get_context("fork").Queue()


def finish(root: str, iteration: int, tmp: str, meta: Optional[dict],
           error: Optional[BaseException] = None) -> str:
    """Collective: once every rank has written its part of ``tmp`` (``error``: this rank's
    failure), checksums, then rank 0 publishes ``iter_N`` (``publish``) and the tracker. An async
    save calls it when its writers are done, at a later step boundary: until then ``tmp`` is
    not published and a kill leaves the published checkpoint as it was."""
    rank, _, dist = _dist()
    final = iteration_dir(root, iteration)
    _agree(error, tmp, f"checkpoint iteration {iteration}", tmp)
    error = None
    files = checksum_files(tmp)
    if rank == 0:
        try:
            full = dict(meta or {}, format_version=FORMAT_VERSION, iteration=iteration,
                        files=files)
            write_json(os.path.join(tmp, META), full)
            publish(root, tmp, iteration)
        except OSError as e:
            error = e
    _agree(error, tmp if error is not None else root, f"checkpoint iteration {iteration}",
           tmp if error is not None else None)
    if dist is not None:
        dist.barrier()
    return final


def refuse_import_into_run(root: str, source: str) -> None:
    """An HF import may write ``root`` only when it holds no checkpoint, or the same import."""
    if os.path.exists(root) and not os.path.isdir(root):
        raise CheckpointError(f"--save {root} is a file, not a directory")
    latest = find_checkpoint(root) if os.path.isdir(root) else None
    others = [it for it in published_iterations(root) if it != 0]
    if latest is None and not others:
        return
    meta = read_meta_quiet(latest) if latest else None
    same = (meta is not None and meta.get("weights_only") and meta.get("iteration") == 0
            and meta.get("converted_from") == os.path.abspath(source) and not others)
    if same:
        return
    if meta is not None and meta.get("weights_only") and not others:
        raise CheckpointError(f"--save {root} already holds an import of {meta.get('converted_from')}: "
                              f"importing {os.path.abspath(source)} there would replace it; choose "
                              "an empty --save directory (or remove that one)")
    latest_name = os.path.basename(latest) if latest else f"iter_{max(others):07d}"
    raise CheckpointError(f"--save {root} already holds a training run's checkpoints (latest "
                          f"{latest_name}): the trainer would resume those and ignore an import; "
                          "choose an empty --save directory")

