"""Checkpoint faults: each one ends in bounded time with one clear line, and nothing published is lost.

One tiny 1-process run (mock data, 2 steps, checkpoints at 1 and 2) is made once and copied into
each test; the faults are then injected into the copy or into the trainer:

* a shard with changed bytes / a truncated shard: refused at load, naming the file and the last
  good iteration (checksums recorded at save);
* a truncated ``coe_checkpoint.json``: one line naming it;
* two runs on one ``--save``: the second fails at start naming the holder; the first still saves;
* an HF import into a run directory: refused, the run untouched;
* a read-only ``--save`` (found before training) and a disk that fills at a later save (torch's
  "unexpected pos" error): reported as EROFS / ENOSPC, the published checkpoint intact, the
  partial write removed. As root a chmod does not make a directory read-only and a small file
  system cannot be mounted everywhere, so the OSError is injected (a ``patch`` run before the
  trainer's ``main``); where ``unshare -rm`` works, the same two faults also run on a real
  2.2 MB tmpfs and a read-only mount;
* a regular file as ``--save``; ``--load`` of an empty directory (warning; an error with
  ``--exit-on-missing-checkpoint``);
* exit right after a save is quick (the exit takes less than the run up to its last line), and
  no helper process is left;
* SIGKILL of a rank while its checkpoint writer is running: the writer dies too;
* a lost tracker: the newest iteration whose checksums verify is resumed (one note line), a
  damaged newer one is named and never replaced; a new run never replaces another run's
  ``iter_N``; temporaries of interrupted saves are removed once this run holds the lock.

Time: no test bounds a duration by a fixed number of seconds (a loaded machine breaks those).
"Refused before training" is shown by the output (no step ran); "quick" by a multiple of a time
measured in the same test; ``HANG_S`` only stops a hung process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from megatron_coe import checkpointing as fmt
from megatron_coe.testing.tools import reaped, survivors_of_kill, tagged
from megatron_coe.testing.train_args import explicit

ROOT = Path(__file__).resolve().parents[1]
HANG_S = 600  # stops a hung trainer; a guard, not a speed claim
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 8 "
        "--moe-router-topk 2 --moe-ffn-hidden-size 32 --coe-iterations 2 --seq-length 32 "
        "--micro-batch-size 2 --global-batch-size 4 --lr 3e-3 "
        "--eval-iters 0 --log-interval 1 --mock-data --no-exit-signal-handler").split()


# --------------------------------------------------------------------------- helpers
def _env(tag: str = "") -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", COE_FAULT_TEST=tag)
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def _command(args: list, patch: str = "") -> list:
    args = explicit(args)  # the values these tests were written with (Megatron-LM's defaults)
    if not patch:
        return [sys.executable, "-m", "megatron_coe.train", *map(str, args)]
    code = textwrap.dedent(patch) + "\nimport sys\nfrom megatron_coe.train import main\n" \
                                    "sys.exit(main(sys.argv[1:]))\n"
    return [sys.executable, "-c", code, *map(str, args)]


def run(args: list, timeout: float = HANG_S, patch: str = "", tag: str = "") -> tuple:
    """(exit status, output, seconds) of one trainer process."""
    t0 = time.time()
    try:
        p = subprocess.run(_command(args, patch), cwd=ROOT, env=_env(tag), capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"trainer did not exit within {timeout} s: {(e.stdout or b'')[-2000:]!r}")
    return p.returncode, p.stdout + p.stderr, time.time() - t0


def before_training(out: str) -> bool:
    """The run stopped before its first step (what "refused at start" means, whatever the
    machine's load)."""
    return "training from iteration" not in out and "iter 1/" not in out


def run_timed(args: list, last: str, tag: str) -> tuple:
    """(exit status, output, seconds from the start to the first line containing ``last``,
    seconds from that line to the exit) of one trainer process (stdout and stderr merged)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(_command(args), cwd=ROOT, env=_env(tag), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines, seen = [], None
    with reaped(proc, tag):
        for line in proc.stdout:
            lines.append(line)
            if seen is None and last in line:
                seen = time.monotonic()
        rc = proc.wait(timeout=HANG_S)
    end = time.monotonic()
    out = "".join(lines)
    assert seen is not None, f"no line with {last!r}:\n{out[-3000:]}"
    return rc, out, seen - t0, end - seen


def error_line(out: str) -> str:
    """The one ``coe-train: error:`` line; fails on a traceback or several error lines."""
    assert "Traceback" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("coe-train: error:")]
    assert len(lines) == 1, out[-3000:]
    return lines[0]


def digest(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root`` (the lock file excluded)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != fmt.LOCK}


def intact(root: Path, iteration: int) -> None:
    """``root``'s tracker names ``iteration`` and that checkpoint verifies; no .tmp is left."""
    assert fmt.read_tracker(str(root)) == iteration
    path = fmt.find_checkpoint(str(root))
    fmt.verify(path, fmt.read_meta(path))
    assert not list(root.glob("*.tmp"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step run: checkpoints at iterations 1 and 2 (tracker: 2)."""
    root = tmp_path_factory.mktemp("run") / "ckpt"
    rc, out, _ = run([*TINY, "--train-iters", 2, "--save", root, "--save-interval", 1])
    assert rc == 0, out[-3000:]
    intact(root, 2)
    return root


@pytest.fixture
def copy(run_dir, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(run_dir, dst)
    return dst


def resume(root: Path, **kw) -> tuple:
    return run([*TINY, "--train-iters", 3, "--load", root, "--save", root], **kw)


# --------------------------------------------------------------------------- integrity
@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.parametrize("damage", ["changed_bytes", "truncated"])
def test_damaged_shard_is_named_with_the_last_good_iteration(copy, damage):
    shard = copy / "iter_0000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "changed_bytes":  # 160 bytes in the middle: loads "fine" without checksums
        mid = len(data) // 2
        data[mid:mid + 160] = bytes(b ^ 0x5A for b in data[mid:mid + 160])
    else:
        data = data[:len(data) - 106]
    shard.write_bytes(bytes(data))
    before = digest(copy)
    rc, out, _ = resume(copy)
    line = error_line(out)
    assert rc == 2 and before_training(out), out[-3000:]
    assert f"checkpoint {copy}/iter_0000002 is damaged: __0_0.distcp is " in line, line
    assert ("damaged (checksum" if damage == "changed_bytes" else "truncated or altered") in line
    assert "the last good checkpoint is iteration 1" in line, line
    assert digest(copy) == before  # nothing written, nothing published
    fmt.verify(str(copy / "iter_0000001"), fmt.read_meta(str(copy / "iter_0000001")))


@pytest.mark.timeout(2 * HANG_S)
def test_truncated_metadata_json_is_one_line_with_the_path(copy):
    meta = copy / "iter_0000002" / fmt.META
    meta.write_bytes(meta.read_bytes()[:300])
    before = digest(copy)
    rc, out, _ = resume(copy)
    line = error_line(out)
    assert rc == 2 and before_training(out), out[-3000:]
    assert f"checkpoint metadata {meta} is damaged (300 bytes;" in line, line
    assert "the last good checkpoint is iteration 1" in line, line
    assert digest(copy) == before


# --------------------------------------------------------------------------- ownership
@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_second_writer_on_one_save_fails_at_start_naming_the_holder(tmp_path):
    save = tmp_path / "ckpt"
    first = subprocess.Popen(
        _command([*TINY[:-1], "--train-iters", 100000, "--save", save, "--metrics-file",
                  tmp_path / "m.jsonl"]),
        cwd=ROOT, env=_env(), stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + HANG_S
        while not ((tmp_path / "m.jsonl").exists() and (tmp_path / "m.jsonl").read_text()):
            assert first.poll() is None and time.time() < deadline, \
                (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        rc, out, _ = run([*TINY, "--train-iters", 2, "--save", save])
        line = error_line(out)
        assert rc == 2 and before_training(out), out[-3000:]
        assert f"--save {save} is in use by another run (host " in line, line
        assert f"pid {first.pid} " in line, line
        assert not list(save.glob("iter_*"))  # the second run wrote nothing
        first.send_signal(signal.SIGTERM)  # the first run saves at its next step and exits 0
        assert first.wait(timeout=HANG_S) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    path = fmt.find_checkpoint(str(save))
    meta = fmt.read_meta(path)
    intact(save, meta["iteration"])
    assert meta["args"]["train_iters"] == 100000  # the first run's metadata with its tensors


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_hf_import_into_a_run_directory_is_refused(copy, tmp_path):
    before = digest(copy)
    p = subprocess.run([sys.executable, "tools/convert_from_hf.py", "--load", tmp_path / "hf",
                        "--save", copy], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=HANG_S)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert (f"--save {copy} already holds a training run's checkpoints (latest iter_0000002)"
            in out), out
    assert digest(copy) == before
    # the trainer never resumes an older iteration than the tracker's, whatever else is there
    (copy / "iter_0000000").mkdir()
    shutil.copy(copy / "iter_0000001" / fmt.META, copy / "iter_0000000" / fmt.META)
    assert fmt.find_checkpoint(str(copy)) == str(copy / "iter_0000002")


# --------------------------------------------------------------------------- storage
_READ_ONLY = """
import errno, os
SAVE = os.path.realpath({save!r})
_open = os.open
def read_only_open(path, flags, *a, **k):
    if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and \\
            os.path.realpath(os.fspath(path)).startswith(SAVE):
        raise OSError(errno.EROFS, "Read-only file system", path)
    return _open(path, flags, *a, **k)
os.open = read_only_open
"""

_DISK_FULL_AT_ITER_2 = """
import functools, os
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
SAVE = os.path.realpath({save!r})
_write_item, _statvfs = fa._write_item, os.statvfs
@functools.wraps(_write_item)  # keeps the signature Megatron inspects
def write_item(*args, **kw):  # what torch's zip writer reports when the disk fills mid-shard
    stream = [a for a in args if hasattr(a, "name")][0]
    if "iter_0000002.tmp" in str(stream.name):
        stream.write(b"x" * 598)
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
    return _write_item(*args, **kw)
class Full:
    def __init__(self, st): self.f_frsize, self.f_bavail = st.f_frsize, 0
def statvfs(path):  # the file system is full once the first checkpoint is on it
    st = _statvfs(path)
    full = os.path.realpath(os.fspath(path)).startswith(SAVE) and \\
        os.path.isdir(os.path.join(SAVE, "iter_0000001"))
    return Full(st) if full else st
fa._write_item, os.statvfs = write_item, statvfs
"""


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_read_only_save_is_reported_before_training(tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    rc, out, _ = run([*TINY, "--train-iters", 2, "--save", save],
                     patch=_READ_ONLY.format(save=str(save)))
    line = error_line(out)
    assert rc == 2 and before_training(out), out[-3000:]
    assert line == (f"coe-train: error: --save {save} is not writable: read-only file system "
                    f"(EROFS); choose another --save or fix the directory before training"), line
    assert "iter 1/" not in out  # no step was spent
    assert list(save.iterdir()) == []


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_full_disk_at_a_later_save_is_enospc_and_keeps_the_published_checkpoint(tmp_path):
    save = tmp_path / "ckpt"
    rc, out, _ = run([*TINY, "--train-iters", 3, "--save", save, "--save-interval", 1],
                     patch=_DISK_FULL_AT_ITER_2.format(save=str(save)))
    line = error_line(out)
    assert rc == 2, out[-3000:]
    assert line.startswith(f"coe-train: error: cannot write checkpoint iteration 2 to "
                           f"{save}/iter_0000002.tmp: no space left on device (ENOSPC)"), line
    assert f"the published checkpoint {save}/iter_0000001 is untouched" in line, line
    assert "unexpected pos" not in line
    intact(save, 1)  # and the partial iter_0000002.tmp is gone


def _can_mount() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.skipif(not _can_mount(), reason="needs unshare -rm (a user namespace) for a tmpfs")
@pytest.mark.parametrize("fault", ["full", "read_only"])
@pytest.mark.one_env
def test_real_small_or_read_only_filesystem(tmp_path, fault):
    """The same faults on a real file system: a 2.2 MB tmpfs (room for one checkpoint of the
    tiny model; the previous one is kept until the next is published) or a read-only mount."""
    mnt, out_dir = tmp_path / "mnt", tmp_path / "after"
    mnt.mkdir()
    save = mnt / "ckpt"
    cmd = " ".join(_command([*TINY, "--train-iters", 3, "--save-interval", 1, "--save", save,
                             "--metrics-file", tmp_path / "m.jsonl"]))
    ro = f" && mkdir {save} && mount -o remount,ro {mnt}" if fault == "read_only" else ""
    script = (f"mount -t tmpfs -o size=2200k tmpfs {mnt}{ro} && {{ {cmd}; rc=$?; "
              f"cp -a {mnt} {out_dir}; exit $rc; }}")
    p = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=HANG_S)
    out, after = p.stdout + p.stderr, out_dir / "ckpt"
    line = error_line(out)
    assert p.returncode == 2, out[-3000:]
    if fault == "read_only":
        assert line == (f"coe-train: error: --save {save} is not writable: read-only file system "
                        "(EROFS); choose another --save or fix the directory before training"), line
        assert list(after.iterdir()) == []
    else:
        assert line == (f"coe-train: error: cannot write checkpoint iteration 2 to "
                        f"{save}/iter_0000002.tmp: no space left on device (ENOSPC); the "
                        f"published checkpoint {save}/iter_0000001 is untouched"), line
        intact(after, 1)


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_regular_file_as_save_is_one_line(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    rc, out, _ = run([*TINY, "--train-iters", 2, "--save", target])
    line = error_line(out)
    assert rc == 2 and before_training(out), out[-3000:]
    assert line == (f"coe-train: error: --save {target} is a file, not a directory: pass a "
                    "directory (it is created if missing)"), line
    assert target.read_text() == "keep me\n"


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_load_of_an_empty_directory_warns_or_exits(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, out, _ = run([*TINY, "--train-iters", 2, "--load", empty,
                      "--exit-on-missing-checkpoint"])
    line = error_line(out)
    assert rc == 2 and before_training(out), out[-3000:]
    assert line == (f"coe-train: error: --load {empty} holds no checkpoint "
                    f"({fmt.TRACKER} is missing); --exit-on-missing-checkpoint is set: fix "
                    "--load or drop that flag to train from scratch"), line
    rc, out, _ = run([*TINY, "--train-iters", 1, "--load", tmp_path / "typo"])
    assert rc == 0, out[-3000:]
    assert (f"starting from scratch: --load {tmp_path / 'typo'} does not exist "
            "(--exit-on-missing-checkpoint makes this an error)") in out.splitlines(), out


# --------------------------------------------------------------------------- processes
@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_exit_right_after_a_save_is_quick_and_leaves_no_process(tmp_path):
    """The old writer warm-up started a spawn Manager that the exit handler joined forever.
    Quick: the exit after the last line takes less than the run took up to that line (start-up,
    a step and a save measured in the same process: a multiple that a loaded machine scales
    alike; the hang it guards against never ends)."""
    tag = uuid.uuid4().hex
    save = tmp_path / "ckpt"
    rc, out, up_to, exit_s = run_timed([*TINY, "--train-iters", 1, "--save", save],
                                       "saved checkpoint", tag)
    assert rc == 0 and exit_s < up_to, (up_to, exit_s, out[-3000:])
    intact(save, 1)
    _, alive = psutil.wait_procs(tagged(tag), timeout=up_to)  # helpers exit with the rank
    assert alive == [], alive
    # and a run that stops at once, before its first step (the case that hung)
    rc, out, up_to, exit_s = run_timed([*TINY, "--train-iters", 1, "--load", save, "--save",
                                        save], "nothing to train", tag)
    assert rc == 0 and exit_s < up_to, (up_to, exit_s, out[-3000:])
    _, alive = psutil.wait_procs(tagged(tag), timeout=up_to)
    assert alive == [], alive
    intact(save, 1)


_SLOW_WRITER = """
import functools, os, time
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
_write_item = fa._write_item
@functools.wraps(_write_item)
def write_item(*args, **kw):  # the forked writer of iteration 2 stalls
    stream = [a for a in args if hasattr(a, "name")][0]
    if "iter_0000002.tmp" in str(stream.name):
        print("writer stalled", os.getpid(), flush=True)
        time.sleep(300)
    return _write_item(*args, **kw)
fa._write_item = write_item
"""


@pytest.mark.timeout(2 * HANG_S)
def test_writer_processes_die_with_their_rank_on_sigkill(tmp_path):
    tag = uuid.uuid4().hex
    save = tmp_path / "ckpt"
    log = tmp_path / "run.log"
    proc = subprocess.Popen(_command([*TINY, "--train-iters", 3, "--save", save,
                                      "--save-interval", 1], patch=_SLOW_WRITER),
                            cwd=ROOT, env=_env(tag), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    with reaped(proc, tag):
        deadline = time.time() + HANG_S
        while "writer stalled" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        stalled = int(log.read_text().split("writer stalled", 1)[1].split()[0])
        writers = [p for p in tagged(tag) if p.pid != proc.pid]
        # 0.16.1 forks writer processes; 0.19.2's synchronous save writes in the rank itself
        assert writers or stalled == proc.pid, "the stalled writer is neither a child nor the rank"
        assert stalled == proc.pid or stalled in [p.pid for p in writers]
        # forked writers only: no spawn-mode server (the old results Manager) that could
        # outlive the rank or hang its exit
        assert not [p for p in writers if "spawn_main" in " ".join(p.cmdline())], writers
        alive = survivors_of_kill(proc, writers)
        assert alive == [], f"writer processes outlived their rank: {alive}"
    intact_published = fmt.find_checkpoint(str(save))
    assert intact_published == str(save / "iter_0000001")
    fmt.verify(intact_published, fmt.read_meta(intact_published))
    assert fmt.read_tracker(str(save)) == 1


# --------------------------------------------------------------------------- other runs' data
def _damage(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0x5A for b in data[mid:mid + 64])
    shard.write_bytes(bytes(data))


def _published(root: Path) -> dict:
    return {k: v for k, v in digest(root).items() if k.startswith("iter_") and ".tmp" not in k}


@pytest.mark.timeout(2 * HANG_S)
def test_lost_tracker_resumes_the_newest_intact_iteration_and_clears_stale_temporaries(copy):
    """A copy that missed the tracker (a partial rsync), the same command again: iteration 2 is
    resumed with one note line (it used to train from 0 and replace iter_1 and iter_2), nothing
    published is rewritten, and the .tmp of an interrupted save is removed under the lock."""
    (copy / fmt.TRACKER).unlink()
    stale = copy / "iter_0000007.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"\0" * 100)
    before = _published(copy)
    rc, out, _ = run([*TINY, "--train-iters", 3, "--load", copy, "--save", copy,
                      "--save-interval", 1])
    assert rc == 0, out[-3000:]
    lines = out.splitlines()
    assert (f"note: --load {copy} has no {fmt.TRACKER} (lost or not copied): resuming the newest "
            f"checkpoint whose checksums verify, iteration 2 ({copy}/iter_0000002); the next "
            "save writes the tracker again") in lines, out[-3000:]
    assert (f"note: removed 1 temporary file(s) left in --save {copy} by an interrupted save "
            "(iter_0000007.tmp): this run holds its lock, so no other run is writing them"
            ) in lines, out[-3000:]
    assert f"resumed from {copy}/iter_0000002 at iteration 2" in out
    assert not stale.exists()
    after = _published(copy)
    assert {k: after.get(k) for k in before} == before  # iter_1 and iter_2 untouched
    intact(copy, 3)


@pytest.mark.timeout(2 * HANG_S)
def test_lost_tracker_with_a_damaged_newest_iteration_is_refused_naming_it(copy):
    """No tracker and iter_2 damaged: the newest intact one is iteration 1, but resuming it would
    replace the damaged iter_2, which this run did not write: refused at start, nothing
    changed. With every iteration damaged, the list of them (never a silent fresh start)."""
    (copy / fmt.TRACKER).unlink()
    _damage(copy / "iter_0000002" / "__0_0.distcp")
    before = digest(copy)
    rc, out, _ = resume(copy)
    line = error_line(out)
    assert rc == 2 and before_training(out), out[-3000:]
    assert line.startswith(
        f"coe-train: error: --save {copy} has no {fmt.TRACKER}; its newest intact checkpoint is "
        f"iteration 1, but this run would replace the damaged {copy}/iter_0000002: "
        "__0_0.distcp is damaged (checksum "), line
    assert line.endswith("a save never replaces another run's checkpoint; remove the damaged "
                         "directory to resume iteration 1, or choose another --save"), line
    assert "skipped damaged iter_0000002 (__0_0.distcp is damaged" in out
    assert digest(copy) == before
    _damage(copy / "iter_0000001" / "__0_0.distcp")
    with pytest.raises(fmt.CheckpointError) as err:
        fmt.recover_untracked(str(copy))
    assert str(err.value).startswith(
        f"--load {copy} has no {fmt.TRACKER} and none of its 2 checkpoint(s) verifies "
        "(iter_0000002: __0_0.distcp is damaged (checksum "), str(err.value)
    assert "; iter_0000001: __0_0.distcp is damaged (checksum " in str(err.value)


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_a_new_run_never_replaces_another_runs_checkpoints(copy):
    """A fresh run (no --load) whose --save holds another run's iterations 1-2: refused before
    training (it used to train and replace both)."""
    before = digest(copy)
    rc, out, _ = run([*TINY, "--train-iters", 3, "--save", copy, "--save-interval", 1])
    line = error_line(out)
    assert rc == 2 and before_training(out), out[-3000:]
    assert line == (f"coe-train: error: --save {copy} already holds iter_0000001, iter_0000002, "
                    "which this run (iterations 1-3) would replace: a save never replaces "
                    f"another run's checkpoint; resume the newest with --load "
                    f"{copy}/iter_0000002, or choose another --save (or remove those iter_* "
                    "directories)"), line
    assert digest(copy) == before


def test_stale_temporaries_are_removed_only_while_the_lock_is_held(tmp_path, capsys):
    """``lock_collective`` (no process group: this process is rank 0) removes what interrupted
    saves left, once it holds the --save lock; while another run holds it, nothing is touched
    (that run may be writing them). An ``iter_N.old`` without a published ``iter_N`` is the only
    copy of N and stays."""
    root = tmp_path / "ckpt"
    (root / "iter_0000002").mkdir(parents=True)
    (root / "iter_0000002" / fmt.META).write_text('{"iteration": 2}')
    for name in ("iter_0000003.tmp", "iter_0000002.old", "iter_0000004.old"):
        (root / name).mkdir()
        (root / name / "x.distcp").write_bytes(b"x")
    (root / (fmt.TRACKER + ".tmp")).write_text("3\n")
    holder = fmt.SaveLock(str(root))
    try:
        with pytest.raises(fmt.CheckpointError, match="is in use by another run"):
            fmt.lock_collective(str(root))
        assert (root / "iter_0000003.tmp").exists() and (root / "iter_0000002.old").exists()
    finally:
        holder.release()
    capsys.readouterr()
    lock = fmt.lock_collective(str(root))
    try:
        assert capsys.readouterr().out == (
            f"note: removed 3 temporary file(s) left in --save {root} by an interrupted save "
            f"(iter_0000002.old, iter_0000003.tmp, {fmt.TRACKER}.tmp): this run holds its lock, "
            "so no other run is writing them\n")
    finally:
        lock.release()
    assert sorted(p.name for p in root.iterdir()) == [fmt.LOCK, "iter_0000002",
                                                      "iter_0000004.old"]


def test_use_checkpoint_args_after_a_lost_tracker_reads_the_resumed_iteration(copy):
    """--use-checkpoint-args takes the model of the iteration the trainer resumes, also when the
    tracker is lost (it used to say the directory holds no checkpoint)."""
    from megatron_coe.training.options import parse_args

    (copy / fmt.TRACKER).unlink()
    args = parse_args(["--load", str(copy), "--use-checkpoint-args", "--mock-data",
                       "--vocab-size", "256", "--micro-batch-size", "2", "--lr", "3e-3",
                       "--train-iters", "3"])
    assert (args.num_layers, args.hidden_size, args.num_experts, args.coe_iterations) == \
        (2, 32, 8, 2)


def test_missing_checkpoint_line_names_the_newest_iteration(tmp_path):
    """The line for a --load whose iter_* are unpublished names the newest one too (it used to
    list the first three only)."""
    for it in range(1, 7):
        (tmp_path / f"iter_{it:07d}").mkdir()
    assert fmt.describe_missing(str(tmp_path)) == (
        f"--load {tmp_path} has no {fmt.TRACKER}; its iter_0000001, iter_0000002, ... (3 more), "
        "iter_0000006 are not a published checkpoint (pass an iter_* directory to load it "
        "explicitly)")
