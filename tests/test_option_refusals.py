"""Trainer options refused at option validation, in one line, before anything runs (issue 20).

* every numeric option takes a negative value in any notation (``--lr -1e-3``, ``-.5``, ``-2E+1``,
  ``-inf``) and reports its range (argparse took ``-1e-3`` for an unknown option: "expected one
  argument" under the whole usage block);
* plain RoPE (``--position-embedding-type rope``) with YaRN's ``--mscale-all-dim`` and a scaling
  factor > 1 is refused: Megatron-Core scales MLA attention by YaRN's mscale whatever the RoPE
  type, so that model is neither RoPE nor YaRN (it trained and was refused only at export).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron_coe import train
from megatron_coe.testing.train_args import explicit

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(ROOT / "examples/tiny/coe2_cpu.yaml")
MOCK = ["--config", TINY_CONFIG, "--mock-data", "--vocab-size", "256", "--eval-iters", "0",
        "--no-exit-signal-handler"]


def _refused(argv: list, capfd) -> str:
    """train.main in-process: exit 2, one line on stderr, no process group; that line."""
    import torch

    rc = train.main(explicit(argv))
    out, err = capfd.readouterr()
    assert rc == 2, out + err
    assert not torch.distributed.is_initialized()
    assert err.count("\n") == 1 and err.startswith("coe-train: error: "), err
    assert "usage:" not in err and "training from" not in out
    return err.strip()


NEGATIVE = [
    ("--lr", "-1e-3", "option lr (--lr): -0.001 is out of range; valid: > 0"),
    ("--min-lr", "-1E-5", "option min_lr (--min-lr): -1e-05 is out of range; valid: >= 0"),
    ("--adam-eps", "-1.5e+2", "option adam_eps (--adam-eps): -150.0 is out of range; valid: > 0"),
    ("--weight-decay", "-.5", "option weight_decay (--weight-decay): -0.5 is out of range; "
                              "valid: >= 0"),
    ("--clip-grad", "-1.", "option clip_grad (--clip-grad): -1.0 is out of range; valid: >= 0"),
    ("--init-method-std", "-2e-2", "option init_method_std (--init-method-std): -0.02 is out of "
                                   "range; valid: > 0"),
    ("--moe-aux-loss-coeff", "-1e-2", "option moe_aux_loss_coeff (--moe-aux-loss-coeff): -0.01 is "
                                      "out of range; valid: >= 0"),
    ("--lr", "-inf", "option lr (--lr): -inf is out of range; valid: > 0"),
    ("--seed", "-3", "option seed (--seed): -3 is out of range; valid: >= 0"),
    ("--train-iters", "-1e3", "option train_iters (--train-iters): invalid literal for int() "
                              "with base 10: '-1e3'"),
]


@pytest.mark.parametrize("flag,value,expected", NEGATIVE, ids=[f"{f} {v}" for f, v, _ in NEGATIVE])
def test_negative_numeric_values_reach_the_range_check(flag, value, expected, capfd):
    assert _refused([*MOCK, flag, value], capfd) == f"coe-train: error: {expected}"


def test_negative_value_from_the_command_line():
    """The real CLI (a space between flag and value, as people type it): one line, exit 2."""
    p = subprocess.run([sys.executable, "-m", "megatron_coe.train", *explicit([*MOCK, "--lr", "-1e-3"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip() == "coe-train: error: option lr (--lr): -0.001 is out of range; valid: > 0"


def test_a_missing_value_is_one_line_too(capfd):
    with pytest.raises(SystemExit) as e:
        train.main(explicit([*MOCK, "--lr"]))
    assert e.value.code == 2
    _, err = capfd.readouterr()
    assert err == "coe-train: error: argument --lr: expected one argument (see --help)\n"


ROPE_MSCALE = ("coe-train: error: --mscale-all-dim 0.707 with --position-embedding-type rope and "
               "--rotary-scaling-factor 40: Megatron-Core scales MLA attention by YaRN's mscale "
               "whatever the RoPE type, so the model would be neither plain RoPE nor YaRN; for plain "
               "RoPE set --mscale-all-dim 0 (or --rotary-scaling-factor 1), else use "
               "--position-embedding-type yarn")


def test_plain_rope_with_yarn_mscale_all_dim_refused_before_training(capfd):
    """The tiny config (YaRN, mscale_all_dim 0.707, factor 40) switched to plain RoPE."""
    assert _refused([*MOCK, "--position-embedding-type", "rope"], capfd) == ROPE_MSCALE


def test_plain_rope_made_coherent_is_accepted():
    """Either fix the line names is accepted and is plain RoPE: the attention scale factor that
    Megatron-Core's MLA applies (its ``_yarn_get_mscale``) is then exactly 1."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import _yarn_get_mscale

    from megatron_coe.training.options import parse_args

    for fix in (["--mscale-all-dim", "0"], ["--rotary-scaling-factor", "1"]):
        args = parse_args(explicit([*MOCK, "--position-embedding-type", "rope", *fix]))
        assert args.position_embedding_type == "rope"
        assert _yarn_get_mscale(args.rotary_scaling_factor, args.mscale_all_dim) == 1.0
    args = parse_args(explicit([*MOCK, "--mscale-all-dim", "0.707"]))  # what the refusal avoids
    assert _yarn_get_mscale(args.rotary_scaling_factor, args.mscale_all_dim) != 1.0
    yarn = parse_args(explicit(MOCK))  # the config as written (YaRN) is unchanged
    assert (yarn.position_embedding_type, yarn.mscale_all_dim) == ("yarn", 0.707)
