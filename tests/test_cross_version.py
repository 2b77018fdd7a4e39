"""Checkpoints cross the supported Megatron-Core releases: 0.16.1 (Python 3.11, ``.venv``) and
0.19.2 (Python 3.12, ``.venv-mcore019``), through the trainer CLI.

This suite runs in one environment; the other release runs as a subprocess with the other
environment's interpreter (``tools/run_tests.sh`` builds both before running either suite;
``COE_OTHER_PYTHON`` overrides the path). Whichever suite runs it, the test does, with OLD the
older release's interpreter and NEW the newer one's:

1. OLD trains a tiny CoE-2 model (MLA with latent norms, shared expert, seq-aux + z-loss) for 4
   steps on GSM8K, saving at steps 2 and 4, and validates at step 4;
2. NEW resumes the step-2 checkpoint (model, distributed optimizer, LR schedule, RNG, data
   position) and trains steps 3-4: the per-step training losses and the step-4 validation loss
   are identical (==) to OLD's;
3. the way back, as far as the format allows: 0.19.2 stores a checkpoint's common state inside
   the torch_dist shards, which 0.16.1 cannot read, so OLD refuses NEW's checkpoint with exit 2
   and one line naming it and the release to use, and leaves it byte-identical.

When the other environment is missing the test is skipped with the reason, except when both
environments were asked for under ``CI=true`` (CI must cover both releases): then it fails.
``tools/run_tests.sh`` says which were asked for in ``COE_TEST_ENVS`` (``MCORE_ENV=016`` sets up
and runs one environment only; ``bash tools/run_tests.sh`` runs both and this test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_coe import checkpointing as fmt
from megatron_coe.compat.versions import megatron_core_version, version_string
from megatron_coe.testing.data import gsm8k_subset

ROOT = Path(__file__).resolve().parents[1]
ENVS = {"016": ".venv", "019": ".venv-mcore019"}

# Every option the runs rely on, written out (the trainer's defaults follow Megatron-LM's).
MODEL = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 --swiglu "
    "--normalization RMSNorm --norm-epsilon 1e-6 --multi-latent-attention "
    "--kv-lora-rank 16 --qk-head-dim 16 --qk-pos-emb-head-dim 8 --v-head-dim 16 --qk-layernorm "
    "--mla-latent-norm-epsilon 1e-6 --position-embedding-type rope --rotary-base 10000 "
    "--max-position-embeddings 32 --untie-embeddings-and-output-weights "
    "--hidden-dropout 0.0 --attention-dropout 0.0 --init-method-std 0.02 --seq-length 32 "
    "--make-vocab-size-divisible-by 128 "
    "--num-experts 8 --moe-router-topk 2 --moe-ffn-hidden-size 32 "
    "--moe-shared-expert-intermediate-size 32 --moe-router-score-function softmax "
    "--moe-router-pre-softmax --moe-router-load-balancing-type seq_aux_loss "
    "--moe-aux-loss-coeff 1e-2 --moe-z-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall "
    "--coe-iterations 2 --coe-inner-residual --no-coe-outer-residual --no-coe-shared-router "
    "--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 "
    "--expert-model-parallel-size 1 --transformer-impl local --distributed-backend gloo"
).split()
TRAIN = (
    "--micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --min-lr 0.0 --lr-decay-style cosine "
    "--lr-warmup-iters 1 --lr-decay-iters 4 --weight-decay 0.01 --adam-beta1 0.9 "
    "--adam-beta2 0.95 --adam-eps 1e-8 --clip-grad 1.0 --seed 1234 --split 90,10,0 "
    "--num-workers 0 --eval-interval 4 --eval-iters 2 --log-interval 1 --no-async-save "
    "--no-exit-signal-handler --check-for-nan-in-loss-and-grad"
).split()


def _is_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _both_requested() -> bool:
    """Whether this run asked for both environments (``tools/run_tests.sh`` exports
    ``COE_TEST_ENVS``, e.g. ``016`` under ``MCORE_ENV=016``; a plain pytest run counts as both)."""
    requested = os.environ.get("COE_TEST_ENVS")
    return requested is None or set(requested.split()) >= set(ENVS)


def _release_of(python: str) -> tuple:
    code = "import megatron_coe.compat.versions as v; print(v.version_string())"
    out = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=_env())
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else
                           f"exit {out.returncode}")
    return tuple(int(p) for p in out.stdout.split()[-1].split("."))


def _env() -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE", "PYTHONPATH"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="module")
def other_python() -> str:
    """The other environment's interpreter (fails under CI, skips elsewhere, when missing)."""
    mine = megatron_core_version()
    name = "019" if mine < (0, 17) else "016"
    python = os.environ.get("COE_OTHER_PYTHON") or str(ROOT / ENVS[name] / "bin" / "python")
    why = None
    if not os.path.exists(python):
        why = f"{python} does not exist"
    else:
        try:
            theirs = _release_of(python)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            why = f"{python} cannot import megatron_coe ({err})"
        else:
            if theirs[:2] == mine[:2]:
                why = (f"{python} has megatron-core {'.'.join(map(str, theirs))}, the same release "
                       f"as this suite's {version_string()}")
    if why:
        message = (f"cross-version test needs the other environment ({name}, {ENVS[name]}): {why}; "
                   f"the full command 'bash tools/run_tests.sh' creates it and runs this test "
                   f"(or 'bash tools/setup_env.sh {name}', or set COE_OTHER_PYTHON)")
        if _is_ci() and _both_requested():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return python


def _train(python: str, args: list, log: Path, timeout: float = 240) -> str:
    cmd = [python, "-m", "megatron_coe.train", *MODEL, *TRAIN, *map(str, args)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, f"{python}: exit {proc.returncode}:\n{text[-4000:]}"
    return text


def _records(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[(r["type"], r["iteration"])] = r["lm_loss"]
    return out


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.mark.timeout(600)
@pytest.mark.one_env
def test_checkpoint_resumes_across_releases_with_identical_losses(other_python, tmp_path):
    old, new = ((sys.executable, other_python) if megatron_core_version() < (0, 17)
                else (other_python, sys.executable))
    prefix = gsm8k_subset(tmp_path, num_docs=120, vocab_size=300)
    data = ["--data-path", prefix, "--data-cache-path", tmp_path / "cache"]

    # 1. the older release: steps 1-4, checkpoints at 2 and 4, validation at 4
    a = tmp_path / "old"
    _train(old, [*data, "--train-iters", 4, "--save", a / "ckpt", "--save-interval", 2,
                 "--metrics-file", a / "metrics.jsonl"], tmp_path / "old.log")
    ref = _records(a / "metrics.jsonl")
    assert ("valid", 4) in ref and all(("train", i) in ref for i in range(1, 5)), ref

    # the step-2 checkpoint on its own (--load resumes the iteration its tracker names)
    step2 = tmp_path / "step2"
    step2.mkdir()
    shutil.copytree(a / "ckpt" / "iter_0000002", step2 / "iter_0000002")
    (step2 / fmt.TRACKER).write_text("2\n")

    # 2. the newer release resumes it and trains steps 3-4: identical losses
    b = tmp_path / "new"
    log = _train(new, [*data, "--train-iters", 4, "--load", step2, "--save", b / "ckpt",
                       "--save-interval", 2, "--metrics-file", b / "metrics.jsonl"],
                 tmp_path / "new.log")
    assert "resumed from" in log and "iteration 2" in log, log[-3000:]
    got = _records(b / "metrics.jsonl")
    assert sorted(i for t, i in got if t == "train") == [3, 4], got
    assert [got[("train", i)] for i in (3, 4)] == [ref[("train", i)] for i in (3, 4)], (got, ref)
    assert got[("valid", 4)] == ref[("valid", 4)], (got, ref)

    # 3. the way back: the older release refuses the newer one's checkpoint in one line
    before = _tree(b / "ckpt")
    cmd = [old, "-m", "megatron_coe.train", *MODEL, *TRAIN, *map(str, [
        *data, "--train-iters", 4, "--load", b / "ckpt", "--skip-train"])]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if "cannot be loaded" in l]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
    assert len(lines) == 1 and str(b / "ckpt" / "iter_0000004") in lines[0], proc.stderr[-3000:]
    assert "megatron-core>=0.19" in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert _tree(b / "ckpt") == before
