"""A standard-MoE (C=1) run crosses between this trainer and Megatron-LM in both directions, with
weights, optimizer, LR schedule and RNG states (Megatron-LM's own ``megatron.training``
``load_checkpoint`` / ``save_checkpoint``, driven by ``megatron_coe.testing.megatron_lm_save``;
the 0.19 environment, skipped in the 0.16 one where ``megatron.training`` does not exist).

* Megatron-LM loads this trainer's iteration-4 checkpoint strictly into its own MoE GPT (the
  router under Megatron-Core's key ``mlp.router``), with its optimizer (one distributed
  optimizer at EP = 1, as Megatron-LM builds it), its scheduler (in samples: Megatron-LM's
  mismatch assertions pass) and its RNG states (no ``--no-load-rng``); the validation loss and
  the losses of steps 5 and 6 are bit-identical to this trainer's uninterrupted run.
* This trainer resumes Megatron-LM's iteration-4 checkpoint with optimizer and schedule; steps
  5 and 6 are bit-identical to Megatron-LM's uninterrupted run.
* Megatron-LM's --use-checkpoint-args gets a tokenizer it builds: the copy of the run's
  Hugging Face tokenizer saved in the checkpoint (tokenizes as the trainer's), or for
  --mock-data its NullTokenizer of the same size.
* A checkpoint in this trainer's older form (two chained optimizers at EP = 1, the scheduler in
  iterations, the router under ``mlp.routers.0``; written by ``megatron_coe.testing
  .old_checkpoint``) still resumes with optimizer and schedule, bit-identically (both
  environments); so does an EP = 1 checkpoint (one optimizer) at EP = 2 (two).

Each run: 1 CPU process, --mock-data, 2 layers, hidden 32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PYTHON = sys.executable
ROOT = Path(__file__).resolve().parents[1]
MOE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
       "--moe-router-topk 2 --moe-ffn-hidden-size 32 --ffn-hidden-size 64 --coe-iterations 1 "
       "--no-coe-inner-residual --coe-outer-residual --normalization RMSNorm "
       "--hidden-dropout 0 --attention-dropout 0 --moe-token-dispatcher-type alltoall "
       "--seq-length 32 --micro-batch-size 2 --global-batch-size 8 --lr 3e-3 "
       "--lr-decay-style cosine --train-iters 6 --eval-iters 2 --log-interval 1 "
       "--mock-data --vocab-size 256 --num-workers 0 --distributed-backend gloo "
       "--transformer-impl local").split()
HAVE_MEGATRON_LM = importlib.util.find_spec("megatron.training") is not None
needs_megatron_lm = pytest.mark.skipif(
    not HAVE_MEGATRON_LM, reason="needs megatron.training (Megatron-LM's load_checkpoint / "
    "save_checkpoint; megatron-core >= 0.17, the Python 3.12 environment .venv-mcore019)")


def _env() -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                 "MASTER_PORT"):
        env.pop(name, None)
    return env


def _train(args: list, cwd: Path, module: str = "megatron_coe.train", base: list = MOE) -> str:
    proc = subprocess.run([PYTHON, "-m", module, *base, *args], env=_env(),
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _megatron_lm(args: list, out: Path) -> dict:
    proc = subprocess.run([PYTHON, "-m", "megatron_coe.testing.megatron_lm_save", "--train",
                           str(out), "--train-iters", "6", *args], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Unable to load rng state" not in log
    result = json.loads(out.read_text())
    result["train"] = {int(k): v for k, v in result["train"].items()}
    return result


def _records(path: Path, kind: str) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in rows if r["type"] == kind}


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """This trainer: 6 steps uninterrupted; the same run stopped and saved at iteration 4."""
    root = tmp_path_factory.mktemp("roundtrip")
    _train(["--metrics-file", "full.jsonl", "--eval-interval", "100"], root)
    _train(["--exit-interval", "4", "--eval-interval", "4", "--save", "ckpt",
            "--metrics-file", "part.jsonl"], root)
    return root


@needs_megatron_lm
@pytest.mark.timeout(600)
def test_megatron_lm_resumes_our_checkpoint_bit_identically(ours):
    saved = torch.load(ours / "ckpt" / "iter_0000004" / "rng" / "rank_00000.pt",
                       weights_only=False)
    got = _megatron_lm(["--load", str(ours / "ckpt"), "--eval-iters", "2"],
                       ours / "mlm_resumed.json")
    assert got["iteration"] == 4
    # the weights: strict load of Megatron-LM's own model, the same validation loss
    assert got["valid_loss"] == _records(ours / "part.jsonl", "valid")[4]
    # scheduler in Megatron-LM's unit (samples: 4 steps x 8), no mismatch assertion
    assert (got["scheduler"]["num_steps"], got["scheduler"]["lr_decay_steps"]) == (32, 48)
    # RNG states restored by Megatron-LM (python, numpy, torch) are the ones saved
    assert got["rng"]["random"] == repr(saved["random"][1][:4])
    assert got["rng"]["numpy_key"] == [int(v) for v in saved["numpy"][1][:4]]
    assert got["rng"]["torch"] == saved["torch"][:16].tolist()
    # a CPU run's CUDA streams: CUDA (Philox) states a GPU restores, seeded as Megatron-Core
    # seeds them (--seed 1234; tensor / expert offsets 2718 / 1024)
    assert got["rng"]["tracker_seeds"] == {"data-parallel-rng": 1234,
                                           "model-parallel-rng": 1234 + 2718,
                                           "expert-parallel-rng": 1234 + 1024}
    # optimizer + schedule: the next steps are the uninterrupted run's, bit for bit
    full = _records(ours / "full.jsonl", "train")
    assert got["train"] == {5: full[5], 6: full[6]}


@needs_megatron_lm
@pytest.mark.timeout(600)
def test_we_resume_megatron_lm_checkpoint_bit_identically(ours, tmp_path):
    reference = _megatron_lm(["--save", str(tmp_path / "mlm"), "--save-at", "4"],
                             tmp_path / "mlm_full.json")
    assert sorted(reference["train"]) == [1, 2, 3, 4, 5, 6]
    out = _train(["--load", str(tmp_path / "mlm"), "--metrics-file", "resumed.jsonl",
                  "--eval-interval", "100"], tmp_path)
    assert "resumed from" in out and "at iteration 4" in out, out[-2000:]
    assert "weights only" not in out
    resumed = _records(tmp_path / "resumed.jsonl", "train")
    assert resumed == {5: reference["train"][5], 6: reference["train"][6]}


@pytest.mark.timeout(600)
def test_older_checkpoint_form_resumes_with_optimizer_and_schedule(tmp_path):
    from megatron.core import dist_checkpointing

    old = ["--lr-warmup-iters", "2", "--eval-interval", "100"]  # warmup: its length converts
    _train([*old, "--metrics-file", "full.jsonl"], tmp_path, "megatron_coe.testing.old_checkpoint")
    _train([*old, "--exit-interval", "4", "--save", "ckpt"], tmp_path,
           "megatron_coe.testing.old_checkpoint")
    path = tmp_path / "ckpt" / "iter_0000004"
    meta = json.loads((path / "coe_checkpoint.json").read_text())
    assert "scheduler_unit" not in meta  # the older form: iterations, routers.0, 2 optimizers
    assert any(".mlp.routers.0." in k for k in dist_checkpointing.load_tensors_metadata(str(path)))
    common = dist_checkpointing.load_common_state_dict(str(path))
    assert sorted(k for k in common["optimizer"] if isinstance(k, int)) == [0, 1]
    assert common["scheduler"]["num_steps"] == 4
    out = _train([*old, "--load", "ckpt", "--metrics-file", "resumed.jsonl"], tmp_path)
    assert "at iteration 4" in out and "weights only" not in out, out[-2000:]
    full = _records(tmp_path / "full.jsonl", "train")
    assert _records(tmp_path / "resumed.jsonl", "train") == {5: full[5], 6: full[6]}


def test_scheduler_state_is_read_in_samples():
    from megatron_coe.training import megatron_lm

    state = {"max_lr": 3e-3, "lr_warmup_steps": 2, "num_steps": 4, "lr_decay_steps": 6,
             "wd_incr_steps": 6, "lr_decay_style": "cosine"}
    old = megatron_lm.scheduler_state({"scheduler": state}, {"args": {"global_batch_size": 8}})
    assert {k: old[k] for k in megatron_lm.SCHEDULER_LENGTHS} == {
        "num_steps": 32, "lr_warmup_steps": 16, "lr_decay_steps": 48, "wd_incr_steps": 48}
    new = {**state, "num_steps": 32}
    assert megatron_lm.scheduler_state({"scheduler": new}, {"scheduler_unit": "samples"}) == new
    assert megatron_lm.scheduler_state({"opt_param_scheduler": new}, {"megatron_lm": True}) == new


@needs_megatron_lm
@pytest.mark.timeout(600)
def test_megatron_lm_builds_the_tokenizer_our_checkpoint_names(ours, tmp_path):
    """Megatron-LM's --use-checkpoint-args takes a tokenizer it can build: the copy saved in the
    checkpoint (HuggingFaceTokenizer), or for --mock-data its NullTokenizer of the same size."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    from megatron.training.arguments import add_megatron_arguments
    from megatron.training.checkpointing import load_args_from_checkpoint

    from megatron_coe.data.tokenizer import load_tokenizer
    from megatron_coe.testing.data import gsm8k_subset

    def megatron_lm_tokenizer(load: Path, *flags):
        parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
        args, recorded = load_args_from_checkpoint(parser.parse_args(
            ["--load", str(load), "--use-checkpoint-args", *flags]))
        return args, recorded, build_tokenizer(args)

    # --mock-data: Megatron-LM's mock-data tokenizer; its --vocab-size (not taken from a
    # checkpoint by Megatron-LM) is the recorded one
    _, recorded, _ = megatron_lm_tokenizer(ours / "ckpt", "--vocab-size", "1")
    args, _, tok = megatron_lm_tokenizer(ours / "ckpt", "--vocab-size", str(recorded.vocab_size))
    assert args.tokenizer_type == "NullTokenizer"
    assert tok.vocab_size == 256 == args.padded_vocab_size

    prefix = gsm8k_subset(tmp_path, num_docs=60, vocab_size=300)
    data = [a for a in MOE if a not in ("--mock-data", "--vocab-size", "256")]
    _train(["--data-path", prefix, "--split", "100,0,0", "--train-iters", "1",
            "--eval-iters", "0", "--save", "ckpt"], tmp_path, base=data)
    args, _, tok = megatron_lm_tokenizer(tmp_path / "ckpt")
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    assert Path(args.tokenizer_model) == (tmp_path / "ckpt" / "iter_0000001" / "tokenizer")
    ours_tok = load_tokenizer(prefix + ".tokenizer.json")
    text = "Natalia sold clips to 48 of her friends in April, and then half as many in May."
    assert tok.tokenize(text) == ours_tok.tokenize(text)
    assert (tok.vocab_size, tok.eod) == (ours_tok.vocab_size, ours_tok.eod)


@pytest.mark.timeout(600)
def test_ep1_checkpoint_resumes_at_ep2_with_its_optimizer(tmp_path):
    """One optimizer at EP = 1 (Megatron-LM's layout), two at EP = 2 (the experts' own): the
    saved state is regrouped on load and the run goes on bit-identically."""
    short = ["--train-iters", "4", "--eval-iters", "1", "--eval-interval", "100"]
    _train([*short, "--metrics-file", "full.jsonl"], tmp_path)
    _train([*short, "--exit-interval", "2", "--save", "ckpt"], tmp_path)
    torchrun = str(Path(PYTHON).with_name("torchrun"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(port), "-m", "megatron_coe.train", *MOE, *short,
                           "--expert-model-parallel-size", "2", "--load", "ckpt",
                           "--metrics-file", "ep2.jsonl"], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "at iteration 2" in out, out[-3000:]
    full = _records(tmp_path / "full.jsonl", "train")
    assert _records(tmp_path / "ep2.jsonl", "train") == {3: full[3], 4: full[4]}
