"""EP=8 across two (emulated) SLURM nodes: ``slurm/pretrain.sbatch`` in its CPU mode runs the
tiny CoE-2 config (16 experts, 2 per rank) on 2 nodes x 4 tasks, saves, and the run resumes at
EP=4 on one node; every step's loss equals a one-process EP=1 run's to float tolerance.

The initialisation of the experts depends on the EP layout (Megatron-Core seeds each expert-
parallel rank's RNG by its rank), so the EP=8 job starts from the EP=1 run's checkpoint of
iteration 2 (resharded at load): EP=1 steps 1-6, EP=8 steps 3-4, EP=4 steps 5-6.

Eight gloo ranks on a small machine are the suite's heaviest test: it runs in the 0.16
environment only (the 0.19 suite prints that and skips it); the two-node SLURM mechanics are
also covered in both environments by ``tests/test_slurm.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from slurm_cluster import cluster_logs, cluster_or_skip
from test_slurm import PRETRAIN, REPO, TINY_CONFIG, _python_env, tiny_data  # noqa: F401

pytestmark = pytest.mark.one_env  # eight gloo ranks: the 0.16 environment runs it
ARGS = ["--micro-batch-size", "2", "--global-batch-size", "16", "--eval-iters", "0",
        "--log-interval", "1"]


@pytest.fixture(scope="module")
def cluster4():
    """Two emulated nodes of 4 CPUs each (configured: SLURM schedules 4 tasks per node)."""
    with cluster_or_skip(nodes=2, cpus_per_node=4) as c:
        yield c


def _losses(path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("type") == "train":
            out[r["iteration"]] = r["lm_loss"]
    return out


@pytest.mark.timeout(900)
def test_ep8_on_two_nodes_resumes_at_ep4_and_matches_ep1(cluster4, tiny_data, tmp_path):
    ref = tmp_path / "ep1.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_coe.train", "--config", TINY_CONFIG, "--data-path",
         str(tiny_data), "--train-iters", "6", "--save-interval", "2", "--save",
         str(tmp_path / "ep1_ckpt"), *ARGS, "--metrics-file", str(ref)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = _losses(ref)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    ckpt = tmp_path / "checkpoints" / "ep8"  # the jobs' --save/--load (RUN_NAME=ep8)
    ckpt.mkdir(parents=True)
    shutil.copytree(tmp_path / "ep1_ckpt" / "iter_0000002", ckpt / "iter_0000002")
    (ckpt / "latest_checkpointed_iteration.txt").write_text("2")

    env = dict(DEVICE="cpu", CONFIG=TINY_CONFIG, DATA_PATH=str(tiny_data), RUN_DIR=str(tmp_path),
               RUN_NAME="ep8", **_python_env())
    def job(name, nodes, ep, iters, resumed_from):
        r = cluster4.submit(PRETRAIN, args=ARGS, name=name, cwd=REPO, timeout=600,
                            sbatch_args=[f"--nodes={nodes}", "--ntasks-per-node=4", "--time=15"],
                            env=dict(env, EP=str(ep), TRAIN_ITERS=str(iters)))
        assert r.returncode == 0, r.output[-6000:] + cluster_logs(cluster4, 15)
        assert f"world={4 * nodes} ({nodes} nodes x 4) TP=1 PP=1 CP=1 EP={ep}" in r.output
        assert "resumed from" in r.output and f"iter_{resumed_from:07d}" in r.output
        return r

    first = job("coe-ep8", nodes=2, ep=8, iters=4, resumed_from=2)
    second = job("coe-ep4", nodes=1, ep=4, iters=6, resumed_from=4)

    ep8 = _losses(tmp_path / f"coe-ep8_{first.job_id}" / "tensorboard" / "metrics.jsonl")
    ep4 = _losses(tmp_path / f"coe-ep4_{second.job_id}" / "tensorboard" / "metrics.jsonl")
    assert sorted(ep8) == [3, 4] and sorted(ep4) == [5, 6]
    for i, loss in {**ep8, **ep4}.items():
        assert loss == pytest.approx(reference[i], rel=1e-4), (i, loss, reference[i])
