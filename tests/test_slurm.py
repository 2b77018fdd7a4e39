"""The Slurm batch scripts on a real (throw-away) SLURM cluster with two emulated nodes.

``tests/slurm_cluster.py`` installs SLURM + munge if missing (apt), starts a private munged,
slurmctld and two slurmd (nodes n1, n2 on this host) and stops them by pid afterwards. The jobs
submit ``slurm/pretrain.sbatch`` exactly as a user would (from the repository root, settings in
environment variables, sbatch options on the command line) in its CPU mode: gloo, one task per
"node", expert parallelism 2 across the two nodes.

* a 2-node EP=2 run of the tiny config trains, its loss falls and it publishes a checkpoint;
* preemption: a longer run gets SIGUSR1 on its batch shell (what ``--signal=B:USR1@...`` does
  before the time limit; here ``scancel --signal=USR1 --batch``), which sends it to the trainer
  processes by pid; they save at the next step boundary, the script requeues the job, the second
  run resumes from that checkpoint and finishes, and every step's loss equals the uninterrupted
  run's bit for bit;
* cheap checks: srun spans both nodes, bad parallel layouts are refused before launch, the dry
  run resolves the rendezvous, convert.sbatch fails clearly without a converter or checkpoint.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import cluster_logs, cluster_or_skip

pytestmark = pytest.mark.one_env  # SLURM mechanics (release-independent): the 0.16 env

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
CONVERT = REPO / "slurm" / "convert.sbatch"
TINY_CONFIG = "examples/tiny/coe2_cpu.yaml"
DATA_DOCS = 1000         # GSM8K documents tokenized for the test runs (enough for 16 x 16 x 128)
TRAIN_ITERS = 16
SIGNAL_AT = 3            # signal the preempted run once this iteration has been logged
NODES_2 = ["--nodes=2", "--ntasks-per-node=1", "--time=10"]


@pytest.fixture(scope="module")
def cluster():
    with cluster_or_skip(nodes=2) as c:   # own temp dir: munged needs o+x on every parent
        yield c


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """The first DATA_DOCS GSM8K training documents as an indexed dataset with a 1k BPE vocab
    (the tiny configs' data_path, data/processed/gsm8k_train_v1k, is the full split and comes
    from examples/quickstart.sh; a subset keeps this test's preprocessing to a few seconds)."""
    out = tmp_path_factory.mktemp("data")
    subset = out / "gsm8k_train_subset.jsonl"
    with gzip.open(REPO / "data" / "gsm8k" / "train.jsonl.gz", "rt") as src:
        subset.write_text("".join(line for _, line in zip(range(DATA_DOCS), src)))
    prefix = out / "gsm8k_train_subset_v1k"
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(subset), "--json-keys",
         "question", "answer", "--vocab-size", "1024", "--output-prefix", str(prefix)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout
    return prefix


def _python_env() -> dict:
    """How the job finds this interpreter: VENV when running from a virtualenv, else PYTHON."""
    if sys.prefix != sys.base_prefix:
        return {"VENV": sys.prefix, "PYTHON": "python"}
    return {"PYTHON": sys.executable}


def _train_env(run_dir: Path, data: Path = None, **extra) -> dict:
    env = dict(DEVICE="cpu", CONFIG=TINY_CONFIG, EP="2", TRAIN_ITERS=str(TRAIN_ITERS),
               LOG_INTERVAL="1", RUN_DIR=str(run_dir), **_python_env())
    if data is not None:
        env["DATA_PATH"] = str(data)
    env.update(extra)
    return env


def _train_args() -> list:
    # no validation passes: they add time and do not change the training trajectory
    return ["--eval-iters", "0"]


def _metrics(run_dir: Path, job_name: str, job_id: str) -> dict:
    """iteration -> lm loss from the trainer's metrics.jsonl (full precision)."""
    path = run_dir / f"{job_name}_{job_id}" / "tensorboard" / "metrics.jsonl"
    assert path.is_file(), f"no metrics file {path}"
    losses = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "train":
            assert rec["iteration"] not in losses, f"iteration {rec['iteration']} trained twice"
            losses[rec["iteration"]] = rec["lm_loss"]
    return losses


def _explain(result, cluster) -> str:
    return (f"job {result.job_id} exit {result.returncode}\n--- job output\n{result.output[-6000:]}"
            f"\n--- sbatch\n{result.sbatch_output}\n--- daemons\n{cluster_logs(cluster, 15)}")


def _published(ckpt_root: Path) -> list:
    return sorted(int(p.name[5:]) for p in ckpt_root.glob("iter_???????")
                  if (p / "coe_checkpoint.json").is_file())


@pytest.fixture(scope="module")
def reference(cluster, tiny_data, tmp_path_factory):
    """The uninterrupted 2-node EP=2 run (test (a), and the reference for the preemption test)."""
    if not (REPO / "megatron_coe" / "train.py").is_file() or not (REPO / TINY_CONFIG).is_file():
        pytest.fail(f"the trainer (megatron_coe/train.py) or {TINY_CONFIG} is missing")
    run_dir = tmp_path_factory.mktemp("runs")
    result = cluster.submit(PRETRAIN, args=_train_args(), sbatch_args=NODES_2,
                            env=_train_env(run_dir, tiny_data), name="coe-ref", cwd=REPO,
                            timeout=180)
    return dict(result=result, run_dir=run_dir)


@pytest.mark.timeout(60)
def test_srun_spans_two_emulated_nodes(cluster, tmp_path):
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo rank=$SLURM_PROCID/$SLURM_NTASKS "
                      "node=$SLURMD_NODENAME local=$SLURM_LOCALID'\n")
    r = cluster.submit(script, sbatch_args=NODES_2, timeout=30)
    assert r.returncode == 0, _explain(r, cluster)
    assert sorted(re.findall(r"rank=(\d)/2 node=(n\d) local=0", r.output)) == [
        ("0", "n1"), ("1", "n2")], r.output


@pytest.mark.timeout(60)
@pytest.mark.parametrize("layout, args, message", [
    (dict(EP="3"), [], r"not divisible by EP=3 x ETP=1"),
    (dict(TP="4"), [], r"world size 2 .* not divisible by TP=4 x PP=1 x CP=1"),
    (dict(CP="4"), [], r"world size 2 .* not divisible by TP=1 x PP=1 x CP=4"),
    (dict(CP="0"), [], r"CP=0 must be a positive integer"),
    (dict(EP="2", ETP="2"), [], r"not divisible by EP=2 x ETP=2"),
    (dict(EP="2"), ["--num-experts", "15"], r"num_experts=15 \(--num-experts\) is not divisible"),
])
def test_bad_parallel_layout_is_refused_before_launch(cluster, tmp_path, layout, args, message):
    env = _train_env(tmp_path, DRY_RUN="1", **layout)
    r = cluster.submit(PRETRAIN, args=args, sbatch_args=NODES_2, env=env, cwd=REPO, timeout=30)
    assert r.returncode == 2, _explain(r, cluster)
    assert re.search(message, r.output), r.output


@pytest.mark.timeout(60)
def test_dry_run_resolves_master_and_layout(cluster, tmp_path):
    r = cluster.submit(PRETRAIN, sbatch_args=NODES_2, env=_train_env(tmp_path, DRY_RUN="1"),
                       name="coe-dry", cwd=REPO, timeout=30)
    assert r.returncode == 0, _explain(r, cluster)
    # n1 does not resolve: the script falls back to its NodeAddr; the port comes from the job id
    assert f"master=127.0.0.1:{10000 + int(r.job_id) % 20000}" in r.output, r.output
    assert "world=2 (2 nodes x 1) TP=1 PP=1 CP=1 EP=2 ETP=1 -> DP=2 expert-DP=1" in r.output
    assert f"checkpoints={tmp_path}/checkpoints/coe-dry" in r.output
    assert f"logs={tmp_path}/coe-dry_{r.job_id}" in r.output
    assert "--moe-router-dtype fp32" in r.output, r.output   # the routers in fp32 (issue 19)
    assert "--context-parallel-size 1" in r.output, r.output


LAUNCH_ENV = ("CUDA_DEVICE_MAX_CONNECTIONS", "TORCH_NCCL_DUMP_ON_TIMEOUT",
              "TORCH_NCCL_TRACE_BUFFER_SIZE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE")


def _env_printer(path: Path) -> Path:
    """A stand-in for the interpreter: each rank prints the launch variables it was started with
    (what the trainer's CUDA context and ProcessGroupNCCL would read) and exits 0."""
    path.write_text("#!/bin/bash\nfor v in " + " ".join(LAUNCH_ENV) + "; do\n"
                    "  echo \"rank $RANK env $v=${!v-unset}\"\ndone\n")
    path.chmod(0o755)
    return path


@pytest.mark.timeout(60)
def test_gpu_mode_exports_the_launch_environment_to_every_rank(cluster, tmp_path):
    """GPU mode (DEVICE=gpu; the emulated nodes have no GPUs, whose count is then not checked):
    every rank starts with CUDA_DEVICE_MAX_CONNECTIONS=1 already in its environment (CUDA reads
    it when the context is created, so the trainer cannot set it reliably), and the NCCL flight
    recorder is both armed (dump on timeout) and given a trace buffer (without
    TORCH_NCCL_TRACE_BUFFER_SIZE the dump records nothing), dumping into the job directory.
    The variables are blanked in the submitting environment, so the values come from the script."""
    printer = _env_printer(tmp_path / "print-env")
    blank = {v: "" for v in LAUNCH_ENV}
    env = dict(DEVICE="gpu", CONFIG=TINY_CONFIG, EP="2", RUN_DIR=str(tmp_path),
               PYTHON=str(printer), **blank)
    r = cluster.submit(PRETRAIN, sbatch_args=NODES_2, env=env, name="coe-gpu-env", cwd=REPO,
                       timeout=30)
    assert r.returncode == 0, _explain(r, cluster)
    job_dir = tmp_path / f"coe-gpu-env_{r.job_id}"
    expected = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
                "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": f"{job_dir}/nccl_trace_rank_"}
    seen = {}
    for rank, name, value in re.findall(r"^rank (\d+) env (\w+)=(.*)$", r.output, re.M):
        seen.setdefault(name, {})[rank] = value
    for name, value in expected.items():
        assert seen.get(name) == {"0": value, "1": value}, (name, seen, r.output)
    assert "device=gpu backend=nccl" in r.output, r.output


@pytest.mark.timeout(60)
def test_gpu_mode_site_settings_win_and_an_empty_trace_buffer_is_flagged(cluster, tmp_path):
    """A site's own values are kept (each variable only defaults); a dump flag without a trace
    buffer is named in the job log with the variable to set."""
    printer = _env_printer(tmp_path / "print-env")
    env = dict(DEVICE="gpu", CONFIG=TINY_CONFIG, EP="2", RUN_DIR=str(tmp_path),
               PYTHON=str(printer), CUDA_DEVICE_MAX_CONNECTIONS="8",
               TORCH_NCCL_DUMP_ON_TIMEOUT="1", TORCH_NCCL_TRACE_BUFFER_SIZE="0",
               TORCH_NCCL_DEBUG_INFO_TEMP_FILE="")
    r = cluster.submit(PRETRAIN, sbatch_args=NODES_2, env=env, name="coe-gpu-env2", cwd=REPO,
                       timeout=30)
    assert r.returncode == 0, _explain(r, cluster)
    assert re.search(r"^rank 0 env CUDA_DEVICE_MAX_CONNECTIONS=8$", r.output, re.M), r.output
    assert re.search(r"^rank 1 env TORCH_NCCL_TRACE_BUFFER_SIZE=0$", r.output, re.M), r.output
    assert ("warning: TORCH_NCCL_DUMP_ON_TIMEOUT=1 with TORCH_NCCL_TRACE_BUFFER_SIZE=0 records "
            "nothing to dump") in r.output, r.output


def _stand_in_repo(root: Path, converter: bool) -> Path:
    """A directory that passes convert.sbatch's repository check, with or without a converter
    that prints its arguments (the real tools/convert_to_hf.py may not exist yet)."""
    (root / "megatron_coe").mkdir(parents=True)
    (root / "megatron_coe" / "__init__.py").write_text("")
    if converter:
        (root / "tools").mkdir()
        (root / "tools" / "convert_to_hf.py").write_text(
            "import sys\nprint('convert_to_hf.py args:', ' '.join(sys.argv[1:]))\n")
    return root


def _convert(cluster, repo: Path, ckpt: Path, hf: Path):
    env = dict(REPO=str(repo), CKPT=str(ckpt), HF_DIR=str(hf), PYTHON=sys.executable)
    return cluster.submit(CONVERT, args=["--dtype", "bf16"],
                          sbatch_args=["--cpus-per-task=1"],   # emulated nodes have 2 CPUs
                          env=env, cwd=REPO, timeout=30)


@pytest.mark.timeout(60)
def test_convert_job_explains_a_missing_converter(cluster, tmp_path):
    repo = _stand_in_repo(tmp_path / "repo", converter=False)
    r = _convert(cluster, repo, tmp_path / "ckpt", tmp_path / "hf")
    assert r.returncode == 2, _explain(r, cluster)
    assert "tools/convert_to_hf.py does not exist" in r.output, r.output


@pytest.mark.timeout(60)
def test_convert_job_needs_a_published_checkpoint(cluster, tmp_path):
    repo = _stand_in_repo(tmp_path / "repo", converter=True)
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000010.tmp").mkdir(parents=True)     # an unfinished save does not count
    (ckpt / "iter_0000010.tmp" / "coe_checkpoint.json").write_text("{}")
    r = _convert(cluster, repo, ckpt, tmp_path / "hf")
    assert r.returncode == 2, _explain(r, cluster)
    assert f"no published checkpoint in CKPT={ckpt}" in r.output, r.output


@pytest.mark.timeout(60)
def test_convert_job_runs_the_converter(cluster, tmp_path):
    repo = _stand_in_repo(tmp_path / "repo", converter=True)
    ckpt = tmp_path / "ckpt"
    (ckpt / "iter_0000010").mkdir(parents=True)
    (ckpt / "iter_0000010" / "coe_checkpoint.json").write_text("{}")
    r = _convert(cluster, repo, ckpt, tmp_path / "hf")
    assert r.returncode == 0, _explain(r, cluster)
    assert f"convert_to_hf.py args: --load {ckpt} --save {tmp_path / 'hf'} --dtype bf16" in r.output


@pytest.mark.timeout(240)
def test_pretrain_two_nodes_expert_parallel(cluster, reference):
    r, run_dir = reference["result"], reference["run_dir"]
    assert r.returncode == 0, _explain(r, cluster)
    assert "world=2 (2 nodes x 1) TP=1 PP=1 CP=1 EP=2" in r.output
    losses = _metrics(run_dir, "coe-ref", r.job_id)
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1)), losses
    first = sum(losses[i] for i in (1, 2, 3)) / 3
    last = sum(losses[i] for i in range(TRAIN_ITERS - 2, TRAIN_ITERS + 1)) / 3
    assert last < first - 0.05, f"loss did not fall: {losses}"
    ckpt = run_dir / "checkpoints" / "coe-ref"
    assert _published(ckpt) == [TRAIN_ITERS], list(ckpt.iterdir())
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAIN_ITERS)
    assert (run_dir / f"coe-ref_{r.job_id}" / "train.log").is_file()


@pytest.mark.timeout(300)
def test_preemption_checkpoints_requeues_and_resumes_exactly(cluster, reference, tiny_data,
                                                             tmp_path):
    ref = reference["result"]
    assert ref.returncode == 0, "the uninterrupted reference run failed (see the test above)"
    ref_losses = _metrics(reference["run_dir"], "coe-ref", ref.job_id)

    job = cluster.start_job(PRETRAIN, args=_train_args(), sbatch_args=NODES_2,
                            env=_train_env(tmp_path, tiny_data), name="coe-preempt", cwd=REPO)
    try:
        job.wait_for_output(rf"^iter +{SIGNAL_AT}/{TRAIN_ITERS} ", timeout=120)
        # what --signal=B:USR1@T does T seconds before the time limit: USR1 to the batch shell only
        cluster.run(["scancel", "--signal=USR1", "--batch", job.job_id])
        r = job.wait(timeout=180)
    finally:
        if job.proc.poll() is None:
            cluster.run(["scancel", job.job_id], check=False)
    out = r.output
    assert r.returncode == 0, _explain(r, cluster)
    assert "SIGUSR1 received: sending it to the 2 training processes" in out, out
    assert "to the whole step instead" not in out, out   # delivered by pid, to the ranks only
    assert f"requeueing job {r.job_id}" in out, out
    assert "restart 1 on" in out, f"the job was not started again:\n{out}"

    m = re.search(r"received at iteration (\d+): saving and exiting", out)
    assert m, f"the trainer did not stop on the signal:\n{out}"
    stopped = int(m.group(1))
    assert SIGNAL_AT <= stopped < TRAIN_ITERS, out
    assert re.search(rf"resumed from \S+iter_{stopped:07d} at iteration {stopped}\b", out), out
    ckpt = tmp_path / "checkpoints" / "coe-preempt"
    assert _published(ckpt) == [stopped, TRAIN_ITERS], list(ckpt.iterdir())

    losses = _metrics(tmp_path, "coe-preempt", r.job_id)   # both runs append to one job dir
    assert sorted(losses) == list(range(1, TRAIN_ITERS + 1)), losses
    assert losses[TRAIN_ITERS] == ref_losses[TRAIN_ITERS], (
        f"final loss after preemption {losses[TRAIN_ITERS]!r} != uninterrupted "
        f"{ref_losses[TRAIN_ITERS]!r}\npreempted: {losses}\nreference: {ref_losses}")
    assert losses == ref_losses
