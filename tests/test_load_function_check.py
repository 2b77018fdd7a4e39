"""``--load`` compares what the model computes, not only its shapes (issue 20, item 3).

A checkpoint whose architecture record differs from the run's in a field that changes the
function but no shape (residual modes, norm eps, RoPE/YaRN, score function, top-k, scaling, ...)
used to load silently and train a different model. ``check_compatible`` now refuses it in one
line naming each field, the flag and both values, unless ``--override-checkpoint-arch``; the
field list is the record's own (``function`` in ``ModelArch``'s field metadata). Checkpoints
written by Megatron-LM (their ``args`` read as a standard MoE) go through the same check.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from megatron_coe import checkpointing as fmt
from megatron_coe.arch import RECORD_KEY, ModelArch, option_fields
from megatron_coe.testing.train_args import explicit
from megatron_coe.training import checkpoint as ckpt
from megatron_coe.training import megatron_lm
from megatron_coe.training.options import parse_args as parse_args_as_given

TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 8 "
        "--moe-router-topk 2 --moe-ffn-hidden-size 32 --coe-iterations 2 --seq-length 32 "
        "--micro-batch-size 2 --global-batch-size 8 --mock-data").split()
MLA = ("--multi-latent-attention --q-lora-rank 16 --kv-lora-rank 16 --qk-head-dim 8 "
       "--qk-pos-emb-head-dim 8 --v-head-dim 8 --normalization RMSNorm").split()
VOCAB = 512


def parse_args(argv: list):
    return parse_args_as_given(explicit(argv))


def fake_checkpoint(root: Path, argv: list, iteration: int = 10) -> tuple:
    """(path, meta) of a published-looking checkpoint of the run ``argv`` (its record, as the
    trainer writes it)."""
    args = parse_args(argv)
    path = Path(fmt.iteration_dir(str(root), iteration))
    path.mkdir(parents=True)
    meta = {"iteration": iteration, "vocab_size": VOCAB, "args": args.to_dict(),
            RECORD_KEY: ModelArch.from_args(args, VOCAB).to_dict()}
    (path / fmt.META).write_text(json.dumps(meta))
    torch.save({}, path / "common.pt")
    return str(path), ckpt.read_meta(str(path))


def refusal(meta: dict, argv: list, path: str) -> str:
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_compatible(meta, parse_args(argv), VOCAB, path)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"--load: checkpoint {path} computes a different function than "
                              "this run: "), message
    assert message.endswith("give the checkpoint's values (or --use-checkpoint-args), or "
                            "--override-checkpoint-arch to change them on purpose"), message
    return message


def test_function_fields_are_marked_in_the_record():
    """Every architecture field is a shape field, a function field, or one of the named fields
    that change neither (a new field must be classified where it is declared)."""
    neither = {f.name for f in option_fields() if not f.metadata["function"]}
    assert neither == {"max_position_embeddings"}
    function_only = {f.name for f in option_fields()
                     if f.metadata["function"] and not f.metadata["shape"]}
    assert {"coe_inner_residual", "coe_outer_residual", "layernorm_epsilon",
            "moe_router_topk", "moe_router_score_function", "moe_router_topk_scaling_factor",
            "rotary_base", "mscale_all_dim", "beta_fast"} <= function_only


CASES = [  # (flags of the run that loads, the fields the line names)
    ("--no-coe-inner-residual --coe-outer-residual",
     ["coe_inner_residual (--coe-inner-residual): checkpoint True, this run False",
      "coe_outer_residual (--coe-outer-residual): checkpoint False, this run True"]),
    ("--norm-epsilon 1e-6", ["layernorm_epsilon (--norm-epsilon): checkpoint 1e-05, this run 1e-06"]),
    ("--moe-router-topk 3", ["moe_router_topk (--moe-router-topk): checkpoint 2, this run 3"]),
    ("--moe-router-score-function sigmoid",
     ["moe_router_score_function (--moe-router-score-function): checkpoint 'softmax', this run "
      "'sigmoid'"]),
    ("--moe-router-topk-scaling-factor 2.5",
     ["moe_router_topk_scaling_factor (--moe-router-topk-scaling-factor): checkpoint None, this "
      "run 2.5"]),
    ("--moe-router-pre-softmax",
     ["moe_router_pre_softmax (--moe-router-pre-softmax): checkpoint False, this run True"]),
    ("--rotary-base 50000", ["rotary_base (--rotary-base): checkpoint 10000.0, this run 50000.0"]),
]


@pytest.mark.parametrize("flags,named", CASES, ids=[c[0] for c in CASES])
def test_a_different_function_is_refused_naming_each_field(tmp_path, flags, named):
    path, meta = fake_checkpoint(tmp_path, TINY)
    message = refusal(meta, [*TINY, *flags.split()], path)
    for text in named:
        assert text in message, message
    assert message.count("checkpoint ") == len(named) + 1  # the path, then one per field


def test_yarn_parameters_of_an_mla_checkpoint_are_compared(tmp_path):
    path, meta = fake_checkpoint(tmp_path, [*TINY, *MLA])
    message = refusal(meta, [*TINY, *MLA, "--position-embedding-type", "yarn",
                             "--rotary-scaling-factor", "4", "--mscale-all-dim", "1"], path)
    assert "position_embedding_type (--position-embedding-type): checkpoint 'rope', this run " \
           "'yarn'" in message
    assert "rotary_scaling_factor (--rotary-scaling-factor): checkpoint 1.0, this run 4.0" in message
    assert "mscale_all_dim (--mscale-all-dim): checkpoint 0.0, this run 1.0" in message
    # an unset YaRN window equals the value it builds: not a difference
    yarn = [*TINY, *MLA, "--position-embedding-type", "yarn"]
    path, meta = fake_checkpoint(tmp_path / "yarn", yarn)
    ckpt.check_compatible(meta, parse_args([*yarn, "--yarn-beta-fast", "32"]), VOCAB, path)
    message = refusal(meta, [*yarn, "--yarn-beta-fast", "16"], path)
    assert "yarn_beta_fast (--yarn-beta-fast): checkpoint None, this run 16.0" in message


def test_same_function_loads_and_override_is_one_note(tmp_path, capsys):
    path, meta = fake_checkpoint(tmp_path, TINY)
    ckpt.check_compatible(meta, parse_args(TINY), VOCAB, path)  # the same model: accepted
    # fields the built model does not use are not compared (YaRN without MLA)
    ckpt.check_compatible(meta, parse_args([*TINY, "--mscale", "2"]), VOCAB, path)
    capsys.readouterr()
    ckpt.check_compatible(meta, parse_args([*TINY, "--moe-router-topk", "1",
                                            "--override-checkpoint-arch"]), VOCAB, path)
    out = capsys.readouterr().out
    assert out == (f"note: --override-checkpoint-arch: training checkpoint {path} with this "
                   "run's values of moe_router_topk (--moe-router-topk): checkpoint 2, this run "
                   "1\n"), out
    # a shape difference stays refused with the override
    with pytest.raises(ckpt.CheckpointError, match="different model shape"):
        ckpt.check_compatible(meta, parse_args([*TINY, "--hidden-size", "64",
                                                "--override-checkpoint-arch"]), VOCAB, path)


def test_megatron_lm_checkpoint_goes_through_the_same_check(tmp_path):
    """A Megatron-LM MoE checkpoint (its ``args``, no CoE fields: the standard MoE) loaded by a
    run with the paper's residuals: refused naming both residual fields (it used to load and
    train a different model); with the standard MoE's flags it is accepted."""
    standard = [*TINY, "--coe-iterations", "1", "--no-coe-inner-residual",
                "--coe-outer-residual"]
    values = parse_args(standard).to_dict()
    for name in megatron_lm.STANDARD_MOE:  # Megatron-LM's args have no CoE fields
        values.pop(name)
    ns = argparse.Namespace(**values, padded_vocab_size=VOCAB, iteration=4)
    path = str(tmp_path / "iter_0000004")
    Path(path).mkdir()
    torch.save({}, Path(path) / "common.pt")
    meta = dict(iteration=4, args=megatron_lm.options_from(ns), vocab_size=VOCAB,
                megatron_lm=True, layout={}, consumed_train_samples=0)
    ckpt.check_compatible(meta, parse_args(standard), VOCAB, path)
    message = refusal(meta, [*TINY, "--coe-iterations", "1"], path)
    assert "coe_inner_residual (--coe-inner-residual): checkpoint False, this run True" in message
    assert "coe_outer_residual (--coe-outer-residual): checkpoint True, this run False" in message
