"""``--async-save`` (Megatron-LM's flag) through Megatron-Core's async dist_checkpointing.

* A normal async run (2 ranks) publishes every checkpoint (checksums verified, no ``.tmp`` left)
  and a run resumed from its first checkpoint reproduces its losses bit for bit.
* A run SIGKILLed while the background writer of iteration 2 is stalled (training has gone on
  meanwhile) leaves no writer process behind, iteration 1 published and the tracker on it; the
  resumed run reproduces an uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron_coe import checkpointing as fmt
from megatron_coe.testing.tools import reaped, survivors_of_kill, tagged
from megatron_coe.testing.train_args import explicit

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
        "--moe-router-topk 2 --moe-ffn-hidden-size 32 --coe-iterations 2 --seq-length 32 "
        "--micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --hidden-dropout 0 "
        "--attention-dropout 0 --moe-token-dispatcher-type alltoall --eval-iters 0 "
        "--log-interval 1 --mock-data --vocab-size 256 --num-workers 0 "
        "--distributed-backend gloo --transformer-impl local").split()

# the forked file writers of iteration 2 stall (inherited by the async writer's forks)
SLOW_WRITER = """
import functools, os, time
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
_write_item = fa._write_item
@functools.wraps(_write_item)
def write_item(*args, **kw):
    stream = [a for a in args if hasattr(a, "name")][0]
    if "iter_0000002.tmp" in str(stream.name):
        print("writer stalled", os.getpid(), flush=True)
        time.sleep(300)
    return _write_item(*args, **kw)
fa._write_item = write_item
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tag: str = "") -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", COE_FAULT_TEST=tag)
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def _command(args: list, nproc: int = 1, patch: str = "") -> list:
    args = explicit([*TINY, *map(str, args)])
    if patch:
        code = patch + "\nimport sys\nfrom megatron_coe.train import main\nsys.exit(main(sys.argv[1:]))\n"
        return [PYTHON, "-c", code, *args]
    if nproc == 1:
        return [PYTHON, "-m", "megatron_coe.train", *args]
    return [TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "megatron_coe.train", *args]


def _run(args: list, nproc: int = 1, timeout: float = 240) -> str:
    p = subprocess.run(_command(args, nproc), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    return out


def _losses(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "train":
            out[r["iteration"]] = r["lm_loss"]
    return out


def _published(save: Path, iteration: int) -> None:
    path = fmt.find_checkpoint(str(save))
    assert path == str(save / f"iter_{iteration:07d}")
    fmt.verify(path, fmt.read_meta(path))
    assert fmt.read_tracker(str(save)) == iteration


@pytest.mark.timeout(400)
def test_async_run_publishes_and_resumes_bit_exactly(tmp_path):
    save = tmp_path / "a"
    out = _run(["--async-save", "--train-iters", 4, "--save-interval", 2, "--save", save,
                "--metrics-file", tmp_path / "a.jsonl"], nproc=2)
    assert "writing in the background" in out and "(async, published at iteration" in out
    _published(save, 4)
    assert fmt.published_iterations(str(save)) == [2, 4] and not list(save.glob("*.tmp"))
    # resume from the first async checkpoint: the same losses, bit for bit
    resumed = tmp_path / "b"
    resumed.mkdir()
    shutil.copytree(save / "iter_0000002", resumed / "iter_0000002")
    (resumed / fmt.TRACKER).write_text("2\n")
    out = _run(["--async-save", "--train-iters", 4, "--save-interval", 2, "--load", resumed,
                "--save", resumed, "--metrics-file", tmp_path / "b.jsonl"], nproc=2)
    assert "resumed from" in out
    a, b = _losses(tmp_path / "a.jsonl"), _losses(tmp_path / "b.jsonl")
    assert sorted(b) == [3, 4] and all(a[i] == b[i] for i in (3, 4)), (a, b)
    _published(resumed, 4)


@pytest.mark.timeout(400)
def test_sigkill_during_async_save_keeps_published_checkpoint_and_resumes_bit_exactly(tmp_path):
    tag = uuid.uuid4().hex
    save, log = tmp_path / "ckpt", tmp_path / "run.log"
    metrics = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(
        _command(["--async-save", "--train-iters", 3, "--save-interval", 1, "--save", save,
                  "--metrics-file", metrics], patch=SLOW_WRITER),
        cwd=ROOT, env=_env(tag), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    with reaped(proc, tag):
        deadline = time.time() + 180
        # the writer of iteration 2 stalls in the background while iteration 3 trains
        while not ("writer stalled" in log.read_text() and metrics.exists()
                   and 3 in _losses(metrics)):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        writers = [p for p in tagged(tag) if p.pid != proc.pid]
        assert writers, "no writer process found"
        alive = survivors_of_kill(proc, writers)
        assert alive == [], f"writer processes outlived their rank: {alive}"
    _published(save, 1)  # iteration 2 never published; iteration 1 intact
    assert (save / "iter_0000002.tmp").exists() and not (save / "iter_0000002").exists()

    out = _run(["--async-save", "--train-iters", 3, "--save-interval", 1, "--load", save,
                "--save", save, "--metrics-file", tmp_path / "resumed.jsonl"])
    assert "resumed from" in out and "iter_0000001" in out
    _published(save, 3)
    assert not list(save.glob("*.tmp"))
    _run(["--train-iters", 3, "--metrics-file", tmp_path / "reference.jsonl"])
    ref, resumed = _losses(tmp_path / "reference.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [2, 3] and all(ref[i] == resumed[i] for i in (2, 3)), (ref, resumed)
