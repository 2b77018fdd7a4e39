"""Checkpoints shared with Megatron-LM (``megatron.training``).

* This trainer's checkpoints carry Megatron-LM's common-state keys (``args`` as an
  ``argparse.Namespace`` with Megatron-LM names, ``checkpoint_version``, ``iteration``,
  ``opt_param_scheduler``, ``num_floating_point_operations_so_far``; ``rng_state`` sharded).
* Megatron-LM's own ``load_args_from_checkpoint`` reads such a checkpoint (needs
  ``megatron.training``: megatron-core >= 0.17, the 0.19 environment; skipped in the 0.16 one).
* A checkpoint in Megatron-LM's layout (its files only: no ``coe_checkpoint.json``, no ``rng/``)
  of a standard MoE (C=1, outer residual) is found by ``--load`` through its tracker, gives the
  same validation loss it had, and resumes training with the optimizer state (layouts match)
  bit-identically to the uninterrupted run.
* A Megatron-LM checkpoint of a model this trainer cannot build (tied embeddings, biases, dense
  layers, ...) is refused in one line naming why.

Each run: 1 CPU process, --mock-data, 2 layers, hidden 32 (5-10 s).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_coe.checkpointing import CheckpointError
from megatron_coe.training import megatron_lm

PYTHON = sys.executable
MOE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
       "--moe-router-topk 2 --moe-ffn-hidden-size 32 --ffn-hidden-size 64 --coe-iterations 1 "
       "--no-coe-inner-residual --coe-outer-residual --normalization RMSNorm "
       "--hidden-dropout 0 --attention-dropout 0 --moe-token-dispatcher-type alltoall "
       "--seq-length 32 --micro-batch-size 2 --global-batch-size 8 --lr 3e-3 "
       "--lr-decay-style cosine --lr-decay-iters 6 --eval-iters 2 --eval-interval 100 --log-interval 1 "
       "--mock-data --vocab-size 256 --num-workers 0 --distributed-backend gloo "
       "--transformer-impl local").split()
HAVE_MEGATRON_LM = importlib.util.find_spec("megatron.training") is not None


def _run(args: list, tmp: Path, expect_rc: int = 0) -> str:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    proc = subprocess.run([PYTHON, "-m", "megatron_coe.train", *MOE, *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect_rc, out[-3000:]
    return out


def _records(path: Path) -> list:
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 6-step run, and a 4-step run saved at 4 (same options)."""
    root = tmp_path_factory.mktemp("mlm")
    _run(["--train-iters", "6", "--metrics-file", "full.jsonl"], root)
    _run(["--train-iters", "4", "--save", "ckpt"], root)
    return root


@pytest.mark.timeout(300)
def test_common_state_carries_megatron_lm_keys(runs):
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(str(runs / "ckpt" / "iter_0000004"))
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 4
    ns = common["args"]
    assert isinstance(ns, argparse.Namespace)
    assert (ns.num_layers, ns.hidden_size, ns.num_experts, ns.moe_router_topk) == (2, 32, 4, 2)
    assert ns.padded_vocab_size == 256 and ns.max_position_embeddings == 32
    assert ns.add_bias_linear is False and ns.position_embedding_type == "rope"
    assert ns.ckpt_format == "torch_dist" and ns.consumed_train_samples == 32
    assert common["opt_param_scheduler"]["num_steps"] == common["scheduler"]["num_steps"]
    assert common["num_floating_point_operations_so_far"] > 0


@pytest.mark.skipif(not HAVE_MEGATRON_LM, reason="needs megatron.training (megatron-core >= "
                    "0.17, the Python 3.12 environment .venv-mcore019); megatron-core "
                    f"{importlib.util.find_spec('megatron.core') and 'here has none'}")
@pytest.mark.timeout(300)
def test_megatron_lm_load_args_from_checkpoint_reads_our_checkpoint(runs):
    from megatron.training.arguments import add_megatron_arguments
    from megatron.training.checkpointing import load_args_from_checkpoint

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(["--load", str(runs / "ckpt"), "--use-checkpoint-args"])
    result = load_args_from_checkpoint(args)
    assert isinstance(result, tuple), "Megatron-LM found no arguments in the checkpoint"
    args, ckpt_args = result
    assert args.iteration == 4
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (2, 32, 4)
    assert (args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size) == (4, 2, 32)
    assert args.normalization == "RMSNorm" and args.swiglu is False
    assert args.add_bias_linear is False and args.position_embedding_type == "rope"
    assert args.padded_vocab_size == 256 and args.ckpt_format == "torch_dist"
    assert ckpt_args.coe_iterations == 1


def _as_megatron_lm(src: Path, dst: Path) -> Path:
    """Keep only what Megatron-LM writes: the tracker and iter_N's dist_checkpointing files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("coe_checkpoint.json", "rng",
                                                            "coe_save.lock", "metrics.jsonl"))
    assert not list(dst.rglob("coe_checkpoint.json")) and not (dst / "iter_0000004" / "rng").exists()
    return dst


@pytest.mark.timeout(300)
def test_megatron_lm_format_standard_moe_resumes_with_same_validation_loss(runs):
    mlm = _as_megatron_lm(runs / "ckpt", runs / "mlm_ckpt")
    saved_valid = [r for r in _records(runs / "ckpt" / "metrics.jsonl") if r["type"] == "valid"]
    out = _run(["--train-iters", "4", "--load", "mlm_ckpt", "--skip-train",
                "--metrics-file", "eval.jsonl"], runs)
    assert "loaded Megatron-LM checkpoint" in out
    valid = _records(runs / "eval.jsonl")
    assert [r["lm_loss"] for r in valid] == [saved_valid[-1]["lm_loss"]]
    # resume from iteration 4 with its optimizer and LR schedule: steps 5..6 as uninterrupted
    out = _run(["--train-iters", "6", "--load", "mlm_ckpt", "--metrics-file", "resumed.jsonl"],
               runs)
    assert "resumed from" in out and "at iteration 4" in out
    full = {r["iteration"]: r["lm_loss"] for r in _records(runs / "full.jsonl")
            if r["type"] == "train"}
    resumed = {r["iteration"]: r["lm_loss"] for r in _records(runs / "resumed.jsonl")
               if r["type"] == "train"}
    assert resumed == {5: full[5], 6: full[6]}


def test_incompatible_megatron_lm_model_is_refused_with_every_reason():
    ns = argparse.Namespace(num_experts=4, moe_layer_freq=[0, 1], mtp_num_layers=1,
                            squared_relu=True, ckpt_format="torch")
    with pytest.raises(CheckpointError, match=r"cannot build: multi-token prediction "
                                              r"\(--mtp-num-layers 1\); --squared-relu.*; "
                                              r"--ckpt-format torch \(this trainer reads torch_dist\)$"):
        megatron_lm.refuse_incompatible(ns, "ckpt/iter_0000001")  # dense layers: buildable
    with pytest.raises(CheckpointError, match=r"dense GPT \(no --num-experts\)"):
        megatron_lm.refuse_incompatible(argparse.Namespace(num_experts=None), "x")
    megatron_lm.refuse_incompatible(argparse.Namespace(num_experts=4, moe_layer_freq=1), "x")


@pytest.mark.timeout(300)
def test_incompatible_megatron_lm_checkpoint_is_refused_in_one_line(runs, tmp_path):
    mlm = _as_megatron_lm(runs / "ckpt", tmp_path / "dense")
    common_file = mlm / "iter_0000004" / "common.pt"
    if not common_file.exists():
        pytest.skip("this megatron-core keeps the common state inside the .distcp shards "
                    "(no common.pt to edit); the reasons are checked by the test above")
    common = torch.load(common_file, weights_only=False)
    common["args"].mtp_num_layers = 1
    torch.save(common, common_file)
    out = _run(["--train-iters", "6", "--load", str(mlm)], tmp_path, expect_rc=2)
    lines = [l for l in out.splitlines() if "cannot build" in l]
    assert len(lines) == 1 and "--mtp-num-layers 1" in lines[0], out[-2000:]
    assert "Traceback" not in out and not (mlm / "iter_0000006").exists()


# --------------------------------------------------------------------------- --use-checkpoint-args
RUN_ONLY = ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6",
            "--lr", "3e-3", "--lr-decay-style", "cosine", "--lr-decay-iters", "6",
            "--eval-iters", "2", "--log-interval", "1", "--mock-data", "--vocab-size", "256",
            "--num-workers", "0", "--distributed-backend", "gloo", "--transformer-impl", "local"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["coe", "megatron_lm"])
def test_use_checkpoint_args_takes_the_model_from_the_checkpoint(runs, kind):
    from megatron_coe.training.options import OptionError, parse_args

    load = runs / "ckpt"
    if kind == "megatron_lm":
        load = runs / "mlm_args_ckpt"
        if not load.exists():
            _as_megatron_lm(runs / "ckpt", load)
    # no model flags at all: every model option is the checkpoint's (sizes, MoE, residuals,
    # dropout, dispatcher, sequence length), as Megatron-LM's load_args_from_checkpoint
    args = parse_args([*RUN_ONLY, "--load", str(load), "--use-checkpoint-args"])
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.num_experts,
            args.moe_ffn_hidden_size, args.ffn_hidden_size, args.seq_length) == (2, 32, 4, 4, 32,
                                                                                 64, 32)
    assert (args.coe_iterations, args.coe_inner_residual, args.coe_outer_residual) == (1, False,
                                                                                       True)
    assert args.normalization == "RMSNorm" and args.hidden_dropout == 0.0
    assert args.moe_token_dispatcher_type == "alltoall"
    # Megatron-LM's rule: sizes given here win; the rest of the model is the checkpoint's
    args = parse_args([*RUN_ONLY, "--load", str(load), "--use-checkpoint-args",
                       "--num-layers", "3", "--num-experts", "8", "--hidden-dropout", "0.2"])
    assert (args.num_layers, args.num_experts, args.hidden_dropout) == (3, 4, 0.0)
    with pytest.raises(OptionError, match=r"--use-checkpoint-args.*no .*checkpoint|"
                                          r"--use-checkpoint-args.*nothing"):
        parse_args([*RUN_ONLY, "--load", str(runs / "nothing_here"), "--use-checkpoint-args"])
    with pytest.raises(OptionError, match=r"--use-checkpoint-args\): needs --load"):
        parse_args([*RUN_ONLY, "--use-checkpoint-args"])


@pytest.mark.timeout(300)
def test_use_checkpoint_args_resumes_without_model_flags(runs, tmp_path):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    proc = subprocess.run([PYTHON, "-m", "megatron_coe.train", *RUN_ONLY, "--load",
                           str(runs / "ckpt"), "--use-checkpoint-args", "--metrics-file",
                           str(tmp_path / "resumed.jsonl")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "at iteration 4" in out, out[-3000:]
    full = {r["iteration"]: r["lm_loss"] for r in _records(runs / "full.jsonl")
            if r["type"] == "train"}
    resumed = {r["iteration"]: r["lm_loss"] for r in _records(tmp_path / "resumed.jsonl")
               if r["type"] == "train"}
    assert resumed == {5: full[5], 6: full[6]}


# --------------------------------------------------------------------------- Megatron-LM's own save
@pytest.mark.skipif(not HAVE_MEGATRON_LM, reason="needs megatron.training (Megatron-LM's "
                    "save_checkpoint; megatron-core >= 0.17, the Python 3.12 environment "
                    ".venv-mcore019)")
@pytest.mark.timeout(400)
def test_checkpoint_written_by_megatron_lm_save_checkpoint_loads_with_its_validation_loss(tmp_path):
    """megatron.training.checkpointing.save_checkpoint of Megatron-LM's standard MoE GPT (local
    spec, CPU): --load --use-checkpoint-args takes its model, weights (the router under
    Megatron-Core's key, as this trainer saves a C=1 layer's) and optimizer state, and validates
    to the loss that model had, bit for bit."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(name, None)
    save = tmp_path / "mlm"
    p = subprocess.run([PYTHON, "-m", "megatron_coe.testing.megatron_lm_save", str(save)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert (save / "iter_0000003").is_dir() and not (save / "iter_0000003" / "coe_checkpoint.json").exists()
    reference = json.loads((save / "reference.json").read_text())
    proc = subprocess.run([PYTHON, "-m", "megatron_coe.train", *RUN_ONLY, "--load", str(save),
                           "--use-checkpoint-args", "--skip-train", "--eval-iters", "1",
                           "--metrics-file", "valid.jsonl"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # one distributed optimizer at EP = 1 on both sides: the optimizer state loads too
    assert "loaded Megatron-LM checkpoint" in out and "weights only" not in out, out[-3000:]
    assert "at iteration 3" in out, out[-3000:]
    valid = [r for r in _records(tmp_path / "valid.jsonl") if r["type"] == "valid"]
    assert [r["lm_loss"] for r in valid] == [reference["valid_loss"]]
