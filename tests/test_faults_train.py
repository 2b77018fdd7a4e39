"""Fault injection for the trainer (``python -m megatron_coe.train``): one test per fault class.

Each test asserts the exit status, the one line the run prints, that it ends (in a time bounded
by a multiple of a baseline measured in the same test, ``baseline_seconds``, never by a fixed
number of seconds) and that no data was lost (the published checkpoint is intact and finite). All
runs are tiny (mock data, CPU, gloo).

* NaN/Inf: ``--lr 1e4`` makes the gradient norm NaN at step 2: every rank exits 3 at that step
  with one line naming it, and the latest published checkpoint is the last finite one; with the
  per-step check off the run trains on but still never publishes a non-finite checkpoint;
* bad options: every numeric option just outside its range (generated from the option table),
  and a list of the bad values an operator typed, each one line and exit 2 before anything runs;
* a finished run started again: "nothing to train", exit 0 within seconds, checkpoint untouched;
* SIGTERM / SIGINT during start-up: a bounded exit, nothing written;
* a hung rank (SIGSTOP): its peer exits within --distributed-timeout-minutes plus a margin,
  naming the collective it was waiting in;
* SIGKILL of torchrun: its ranks stop within seconds, publishing nothing more.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from megatron_coe import train
from megatron_coe.training import checkpoint as ckpt
from megatron_coe.testing.train_args import explicit
from megatron_coe.training.options import OPTIONS, OptionError, flag_name
from megatron_coe.training.options import parse_args as parse_args_as_given

from test_train import TINY, _launch_ranks, kill_tree, launch, metrics, run

MOCK = [*TINY, "--mock-data", "--eval-iters", "0", "--log-interval", "1"]
HANG_S = 600  # stops a hung process; a guard, not a speed claim


# --------------------------------------------------------------------------- helpers
def parse_args(argv: list):
    """The options of ``argv`` plus the values these tests were written with (the trainer's
    defaults are Megatron-LM's)."""
    return parse_args_as_given(explicit(argv))


def launch_ranks(args: list, nproc: int, logs: list) -> list:
    """``nproc`` rank processes without a launcher (as srun starts them); their exit codes are
    the trainer's own."""
    return _launch_ranks(args, nproc, logs, one_group=False)


def baseline_seconds() -> float:
    """Seconds this machine takes now to start a Python process that imports what every rank
    imports first (torch, Megatron-Core): the unit of the time bounds of these tests, so that a
    loaded machine scales the bound and the measured time alike."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch, megatron.core.parallel_state"],
                   check=True, timeout=HANG_S, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return time.monotonic() - t0


def wait_for_steps(path: Path, n: int, procs: list, logs: list, timeout: float = HANG_S) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "\n".join(
            Path(log).read_text()[-2000:] for log in logs)
        time.sleep(0.05)


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def non_finite_tensors(checkpoint: str, tmp_path: Path) -> tuple[int, int]:
    """(tensors, non-finite tensors) of a published checkpoint: model and optimizer state."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / "flat.pt"
    dcp_to_torch_save(checkpoint, out)
    tensors = []

    def walk(obj):
        if torch.is_tensor(obj):
            tensors.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(torch.load(out, weights_only=False))
    floats = [t for t in tensors if t.is_floating_point()]
    return len(floats), sum(not bool(torch.isfinite(t).all()) for t in floats)


def error_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("coe-train: ")]


# --------------------------------------------------------------------------- NaN / Inf
@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_nan_stops_every_rank_at_the_same_step_and_keeps_the_last_finite_checkpoint(tmp_path):
    """--lr 1e4, EP=2 over 2 ranks, a checkpoint every step: the gradient norm is NaN at step 2;
    both ranks exit 3 there with one line; iter 1 stays the latest and holds no NaN."""
    save = tmp_path / "ckpt"
    args = [*MOCK, "--lr", "1e4", "--lr-warmup-iters", "0", "--train-iters", "20",
            "--expert-model-parallel-size", "2", "--save", save, "--save-interval", "1",
            "--metrics-file", tmp_path / "metrics.jsonl"]
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    procs = launch_ranks(args, 2, logs)
    try:
        rcs = [p.wait(timeout=HANG_S) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    text = logs[0].read_text()
    assert rcs == [3, 3], f"exit codes {rcs}:\n{text[-3000:]}"
    [line] = [x for x in error_lines(text) if "non-finite" in x]
    m = re.search(r"non-finite (.+) at iteration (\d+): stopped without saving", line)
    assert m and "grad norm (nan)" in m[1], line
    stopped = int(m[2])
    assert 2 <= stopped <= 4, line  # within a few steps of the first NaN (step 2 here)
    assert "Traceback" not in text and "Traceback" not in logs[1].read_text()
    steps = {i for (t, i) in metrics(tmp_path / "metrics.jsonl") if t == "train"}
    assert max(steps) == stopped  # no step after the one that went non-finite
    latest = ckpt.find_checkpoint(str(save))
    assert latest and ckpt.read_meta(latest)["iteration"] == stopped - 1
    assert f"last published checkpoint: {latest}" in line
    assert not list(save.glob(f"iter_{stopped:07d}*"))  # nothing of the NaN step, not even .tmp
    total, bad = non_finite_tensors(latest, tmp_path)
    assert total > 0 and bad == 0, f"{bad}/{total} non-finite tensors in {latest}"


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_no_check_for_nan_trains_on_but_publishes_no_non_finite_checkpoint(tmp_path):
    """--no-check-for-nan-in-loss-and-grad (Megatron-LM's switch): the NaN run is not stopped at
    the step, but the save-time check does not depend on that flag: the first save with
    non-finite parameters stops the run (exit 3, one line), and every published checkpoint is
    finite (it used to publish one checkpoint per step, NaN ones included, and exit 0)."""
    save = tmp_path / "ckpt"
    args = [*MOCK, "--lr", "1e4", "--lr-warmup-iters", "0", "--train-iters", "6",
            "--no-check-for-nan-in-loss-and-grad", "--save", save, "--save-interval", "1"]
    text = run(args, 1, tmp_path / "run.log", timeout=HANG_S, expect_rc=3)
    assert "grad norm nan" in text  # trained on past the first NaN gradient
    [line] = [x for x in error_lines(text) if "non-finite" in x]
    m = re.fullmatch(r"coe-train: error: non-finite parameters at iteration (\d+): checkpoint "
                     r"not saved; last published checkpoint: (\S+) \(lower --lr .*", line)
    assert m, line
    stopped, latest = int(m[1]), ckpt.find_checkpoint(str(save))
    assert latest == m[2] and ckpt.read_meta(latest)["iteration"] == stopped - 1, line
    assert not list(save.glob(f"iter_{stopped:07d}*"))
    for it in range(1, stopped):
        total, bad = non_finite_tensors(str(save / f"iter_{it:07d}"), tmp_path)
        assert total > 0 and bad == 0, f"{bad}/{total} non-finite tensors in iteration {it}"


def _trainer_stub(save: str, iteration: int, check: bool):
    """A ``Trainer`` with only what ``save()`` reads before writing (no process group)."""
    from megatron_coe.training.trainer import Trainer

    class Args:
        check_for_nan_in_loss_and_grad = check
        overlap_param_gather = async_save = False

    Args.save = save
    trainer = Trainer.__new__(Trainer)
    trainer.args, trainer.iteration, trainer.last_saved, trainer.rank = Args(), iteration, None, 0
    trainer.phase = "test"
    trainer.async_queue = None
    trainer.model = [torch.nn.Linear(2, 2)]
    trainer._all_parameters_finite = lambda: all(  # no process group here
        torch.isfinite(p).all() for p in trainer.model[0].parameters())
    return trainer


@pytest.mark.parametrize("check", [True, False], ids=["per-step-check", "no-per-step-check"])
def test_save_refuses_non_finite_parameters(check):
    """The save guard on its own, whatever --check-for-nan-in-loss-and-grad says: one NaN
    parameter on any rank -> NonFiniteError, no save call."""
    from megatron_coe.training.trainer import NonFiniteError

    trainer = _trainer_stub("/nonexistent/never-written", 7, check)
    with torch.no_grad():
        trainer.model[0].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="non-finite parameters at iteration 7: checkpoint "
                                             "not saved"):
        trainer.save()
    assert not Path("/nonexistent/never-written").exists()


def test_save_never_replaces_a_checkpoint_this_run_did_not_write(tmp_path):
    """A save of iteration N when --save already holds an iter_N (published or not) that this
    run did not write: refused in one line before anything is written (it used to be moved
    aside and replaced)."""
    save = tmp_path / "ckpt"
    (save / "iter_0000007").mkdir(parents=True)
    (save / "iter_0000007" / "coe_checkpoint.json").write_text('{"iteration": 7}')
    before = tree_digest(save)
    trainer = _trainer_stub(str(save), 7, True)
    with pytest.raises(ckpt.CheckpointError) as err:
        trainer.save()
    assert str(err.value) == (
        f"--save {save} already holds {save}/iter_0000007, which this run did not write: a "
        f"save never replaces another run's checkpoint; resume that run with --load {save}, or "
        "choose another --save")
    assert tree_digest(save) == before and not (save / "iter_0000007.tmp").exists()


# --------------------------------------------------------------------------- bad options
def _outside(valid) -> list:
    """Values just outside a range (and NaN): what each numeric option must refuse."""
    bad = [math.nan]
    if math.isfinite(valid.lo):
        bad.append(valid.lo if valid.lo_open else valid.lo - 1)
    if math.isfinite(valid.hi):
        bad.append(valid.hi if valid.hi_open else valid.hi + 1)
    return bad


NUMERIC = sorted(name for name, f in OPTIONS.items() if f.metadata["type"] in (int, float))


def test_every_numeric_option_has_a_range():
    assert NUMERIC and all(OPTIONS[n].metadata["valid"] is not None for n in NUMERIC)
    assert {"micro_batch_size", "global_batch_size", "seq_length", "log_interval", "lr",
            "train_iters", "hidden_size", "eval_iters", "clip_grad",
            "distributed_timeout_minutes"} <= set(NUMERIC)


@pytest.mark.parametrize("name", NUMERIC)
def test_each_numeric_option_refuses_values_outside_its_range(name):
    valid = OPTIONS[name].metadata["valid"]
    kind = OPTIONS[name].metadata["type"]
    for value in _outside(valid):
        if kind is int and not math.isfinite(value):
            continue  # not an integer: refused by the type check already
        text = str(int(value) if kind is int else value)
        with pytest.raises(OptionError) as e:
            parse_args([f"{flag_name(name)}={text}"])
        msg = str(e.value)
        assert f"({flag_name(name)})" in msg and f"valid: {valid}" in msg and "\n" not in msg


BAD_OPTIONS = [  # (flags, text of the one line); what an operator types by mistake
    ("--micro-batch-size 0", "(--micro-batch-size): 0 is out of range; valid: >= 1"),
    ("--micro-batch-size -4", "(--micro-batch-size): -4 is out of range; valid: >= 1"),
    ("--global-batch-size 0", "(--global-batch-size): 0 is out of range; valid: >= 1"),
    ("--seq-length 0", "(--seq-length): 0 is out of range; valid: >= 1"),
    ("--seq-length 100000", "--seq-length 100000 needs about"),
    ("--log-interval 0", "(--log-interval): 0 is out of range; valid: >= 1"),
    ("--lr 0", "(--lr): 0.0 is out of range; valid: > 0"),
    ("--lr=-1e-3", "(--lr): -0.001 is out of range; valid: > 0"),
    ("--lr nan", "(--lr): nan is out of range; valid: > 0"),
    ("--lr 1e-4 --min-lr 3e-4", "(--min-lr): 0.0003 is above --lr 0.0001"),
    ("--train-iters 0", "(--train-iters): 0 is out of range; valid: >= 1"),
    ("--train-iters -5", "(--train-iters): -5 is out of range; valid: >= 1"),
    ("--split abc", "(--split): 'abc' is not a split"),
    ("--split 0,100,0 --data-path x", "(--split): '0,100,0' gives the training split weight 0"),
    ("--split 100,0,0 --data-path x --eval-iters 2", "(--split): '100,0,0' leaves no "
     "validation data but --eval-iters is 2"),
    ("--hidden-size 0", "(--hidden-size): 0 is out of range; valid: >= 1"),
    ("--num-layers 0", "(--num-layers): 0 is out of range; valid: >= 1"),
    ("--num-experts 0", "(--num-experts): 0 is out of range; valid: >= 1"),
    ("--eval-iters -1", "(--eval-iters): -1 is out of range; valid: >= 0"),
    ("--eval-interval 0", "(--eval-interval): 0 is out of range; valid: >= 1"),
    ("--clip-grad -1", "(--clip-grad): -1.0 is out of range; valid: >= 0"),
    ("--hidden-dropout 1", "(--hidden-dropout): 1.0 is out of range; valid: [0, 1)"),
    ("--adam-beta2 1", "(--adam-beta2): 1.0 is out of range; valid: [0, 1)"),
    ("--save-interval 0", "(--save-interval): 0 is out of range; valid: >= 1"),
    ("--lr-warmup-iters 500", "--lr-warmup-iters: warmup of 500 steps is not shorter"),
    ("--distributed-timeout-minutes 0", "(--distributed-timeout-minutes): 0.0 is out of range"),
    ("--tensor-model-parallel-size 0", "(--tensor-model-parallel-size): 0 is out of range"),
    ("--micro-batch-size two", "(--micro-batch-size): invalid literal for int()"),
]


@pytest.mark.parametrize("flags,expected", BAD_OPTIONS, ids=[f for f, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_exit_2(flags, expected, capfd):
    """train.main in-process (the CLI minus the interpreter start): exit 2, one line on stderr
    naming the flag, the value and the valid range, before any process group."""
    argv = explicit([*MOCK, "--no-exit-signal-handler", *flags.split()])
    rc = train.main(argv)
    out, err = capfd.readouterr()
    assert rc == 2, out + err
    assert not torch.distributed.is_initialized()
    assert err.count("\n") == 1 and err.startswith("coe-train: error: "), err
    assert expected in err, err


@pytest.mark.timeout(2 * HANG_S)
def test_global_batch_size_0_from_the_command_line(tmp_path):
    """The real CLI: one line, exit 2, no traceback, no checkpoint, before anything runs (the
    whole output is that line)."""
    text = run([*MOCK, "--global-batch-size", "0", "--save", tmp_path / "ckpt"], 1,
               tmp_path / "run.log", timeout=HANG_S, expect_rc=2)
    assert text.strip() == ("coe-train: error: option global_batch_size (--global-batch-size): "
                            "0 is out of range; valid: >= 1")
    assert not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------- nothing to train
@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_resuming_a_finished_run_exits_0_in_seconds(tmp_path):
    """Quick: the second start takes less than 3 x the first run (which also built, trained and
    saved), measured in this test (a wide multiple: the machine's load changes between the
    two)."""
    save = tmp_path / "ckpt"
    args = [*MOCK, "--train-iters", "3", "--lr-warmup-iters", "1", "--save", save, "--load", save,
            "--metrics-file", tmp_path / "metrics.jsonl"]
    t0 = time.monotonic()
    run(args, 1, tmp_path / "first.log", timeout=HANG_S)
    first = time.monotonic() - t0
    before = tree_digest(save)
    t0 = time.monotonic()
    text = run(args, 1, tmp_path / "again.log", timeout=HANG_S)
    elapsed = time.monotonic() - t0
    assert elapsed < 3 * first, f"took {elapsed:.1f} s, the whole first run {first:.1f} s"
    assert (f"coe-train: nothing to train: checkpoint {save / 'iter_0000003'} is at iteration 3 "
            ">= --train-iters 3") in text, text
    assert "training from iteration" not in text and "Traceback" not in text
    assert tree_digest(save) == before  # nothing rewritten


# --------------------------------------------------------------------------- signals at start-up
@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_sigterm_to_torchrun_during_startup_ends_in_bounded_time(tmp_path):
    """SIGTERM to torchrun while its 2 ranks import and build: every process is gone within a
    bound (a multiple of ``baseline_seconds``), and nothing is written."""
    bound = 5 * baseline_seconds()
    save = tmp_path / "ckpt"
    args = [*MOCK, "--train-iters", "1000", "--expert-model-parallel-size", "2", "--save", save]
    log = tmp_path / "run.log"
    proc = launch(args, 2, log)
    try:
        deadline = time.time() + HANG_S
        while len(psutil.Process(proc.pid).children()) < 2:  # ranks started, still importing
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        ranks = psutil.Process(proc.pid).children()
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=HANG_S)
        gone, alive = psutil.wait_procs(ranks, timeout=bound)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert not alive, f"ranks still running: {alive}"
    assert elapsed < bound, f"took {elapsed:.1f} s (bound {bound:.1f} s)"
    assert not list(save.glob("iter_*")), "a checkpoint was written"


def _sigint_once(args: list, log: Path, ready, wait_s: float):
    """Launch one rank, send SIGINT once ``ready()`` holds; (exit code, seconds to exit, log text,
    the rank's child processes at the moment of the signal)."""
    proc = launch(args, 1, log)
    try:
        deadline = time.time() + wait_s
        while not ready(proc):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        children = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=HANG_S)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    assert "interrupted (SIGINT): stopped without saving" in text and "Traceback" not in text, \
        text[-3000:]
    return rc, elapsed, text, children


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_sigint_during_startup_is_one_line_and_exit_130(tmp_path):
    bound = 3 * baseline_seconds()
    rc, elapsed, text, _ = _sigint_once(
        [*MOCK, "--train-iters", "1000", "--save", tmp_path / "ckpt"], tmp_path / "run.log",
        lambda proc: "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text(), wait_s=HANG_S)
    assert rc == 130 and elapsed < bound, (rc, elapsed, bound, text[-3000:])
    assert not list((tmp_path / "ckpt").glob("iter_*"))


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_sigint_during_training_exits_130_at_once_and_leaves_no_process(tmp_path):
    """SIGINT mid-run (data workers running): exit 130 with the one line within a bound (a
    multiple of ``baseline_seconds``), no traceback, nothing published after it, and no helper
    process outlives the rank."""
    bound = 2 * baseline_seconds()
    log = tmp_path / "run.log"
    rc, elapsed, text, children = _sigint_once(
        [*MOCK, "--train-iters", "100000", "--num-workers", "2", "--save", tmp_path / "ckpt",
         "--save-interval", "1000"], log, lambda proc: "iter " in log.read_text(), wait_s=HANG_S)
    assert rc == 130 and elapsed < bound, (rc, elapsed, bound, text[-3000:])
    assert not list((tmp_path / "ckpt").glob("iter_*"))
    _, alive = psutil.wait_procs(children, timeout=bound)  # killed by the rank on its way out
    assert not alive, [p.cmdline() for p in alive]


# --------------------------------------------------------------------------- hung / orphaned
@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_hung_rank_makes_its_peer_exit_within_the_timeout(tmp_path):
    """SIGSTOP rank 1 of an EP=2 run with --distributed-timeout-minutes 0.2 (12 s): rank 0 exits
    1 within 12 s plus a margin, naming the iteration and the collective it waited in; the
    published checkpoint is untouched."""
    timeout_s = 12
    margin = 3 * baseline_seconds()  # exiting after the timeout: a multiple of a start-up
    save = tmp_path / "ckpt"
    args = [*MOCK, "--train-iters", "100000", "--expert-model-parallel-size", "2", "--save", save,
            "--save-interval", "2", "--distributed-timeout-minutes", timeout_s / 60,
            "--metrics-file", tmp_path / "metrics.jsonl"]
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    procs = launch_ranks(args, 2, logs)
    try:
        wait_for_steps(tmp_path / "metrics.jsonl", 3, procs, logs)
        deadline = time.time() + HANG_S
        while ckpt.find_checkpoint(str(save)) is None:
            assert time.time() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        rc0 = procs[0].wait(timeout=HANG_S)
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)
    text = logs[0].read_text()
    assert rc0 == 1, text[-3000:]
    assert elapsed < timeout_s + margin, f"rank 0 took {elapsed:.1f} s to give up ({margin:.1f})"
    [line] = [x for x in error_lines(text) if "timed out" in x]
    assert re.search(r"rank 0: (iteration \d+|checkpoint save at iteration \d+): .*a collective "
                     r"timed out after --distributed-timeout-minutes 0.2: a peer rank is hung",
                     line), line
    assert "Traceback" not in text
    latest = ckpt.find_checkpoint(str(save))  # published before the stop, complete and finite
    assert latest is not None and f"last published checkpoint: {latest}" in line
    total, bad = non_finite_tensors(latest, tmp_path)
    assert total > 0 and bad == 0


@pytest.mark.timeout(2 * HANG_S)
@pytest.mark.one_env
def test_sigkill_of_torchrun_stops_its_ranks(tmp_path):
    """SIGKILL to torchrun alone (not its ranks): both ranks are gone within a bound (a multiple
    of ``baseline_seconds``) and no checkpoint is published after that."""
    bound = 2 * baseline_seconds()
    save = tmp_path / "ckpt"
    args = [*MOCK, "--train-iters", "100000", "--expert-model-parallel-size", "2", "--save", save,
            "--save-interval", "3", "--metrics-file", tmp_path / "metrics.jsonl"]
    log = tmp_path / "run.log"
    proc = launch(args, 2, log)
    ranks = []
    try:
        wait_for_steps(tmp_path / "metrics.jsonl", 2, [proc], [log])
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2, ranks
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=HANG_S)
        t0 = time.monotonic()
        gone, alive = psutil.wait_procs(ranks, timeout=bound)
        elapsed = time.monotonic() - t0
    finally:
        for r in ranks:
            try:
                r.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    assert not alive, f"ranks outlived torchrun: {alive}"
    assert elapsed < bound, f"ranks took {elapsed:.1f} s to stop (bound {bound:.1f} s)"
    latest = ckpt.find_checkpoint(str(save))
    time.sleep(2)
    assert ckpt.find_checkpoint(str(save)) == latest  # nothing published after the stop
    assert "the launcher (pid" in log.read_text()
