"""Sample-based training and the batch-size ramp, as Megatron-LM (issue 23, item 6).

* ``--rampup-batch-size START INCR SAMPLES``: at every consumed-sample count the global batch is
  Megatron-LM's (START, + INCR every SAMPLES / ((global - START) / INCR) samples, the full batch
  past SAMPLES): Megatron-Core's ramp calculator up to 0.17, the same ramp as its step schedule
  from 0.18;
* ``--train-samples``: the steps are Megatron-LM's (``update_train_iters``: the ramp's steps,
  then whole global batches), and the LR schedule counts samples (``--lr-warmup-samples``,
  ``--lr-decay-samples`` default ``--train-samples``, ``--lr-wsd-decay-samples``);
* refusals in one line: the ramp or a ``--lr-*-samples`` option with ``--train-iters``, both
  lengths, a ramp batch the layout cannot split;
* a 2-rank run (DP=2) takes each step's global batch from the calculator (logged per step), its
  LR is Megatron-LM's in samples, its aux losses stay per-micro-batch means while the number of
  micro-batches changes, and a checkpoint saved where the ramp is about to grow resumes with the
  uninterrupted run's next losses bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from megatron_coe.compat.batch_rampup import num_microbatches_calculator
from megatron_coe.training import setup
from megatron_coe.training.data import num_samples
from megatron_coe.training.options import OptionError

from test_option_refusals import _refused
from test_train import TINY, metrics, parse_args, run, train_losses

# the tiny model of tests/test_train.py without its length (--train-iters, --lr-warmup-iters)
MOCK = [*TINY[:TINY.index("--lr-warmup-iters")], *TINY[TINY.index("--split"):-2], "--mock-data",
        "--vocab-size", "64", "--eval-iters", "0", "--no-exit-signal-handler"]


def megatron_lm_ramp(consumed: int, start: int, increment: int, samples: int, full: int) -> int:
    """Megatron-LM's rule for the global batch after ``consumed`` samples."""
    if consumed > samples:
        return full
    return start + int(consumed / (samples / ((full - start) // increment))) * increment


@pytest.mark.parametrize("start,increment,samples,full", [
    (4, 4, 24, 12), (16, 8, 3000, 1024), (2, 3, 10, 11), (1, 1, 3, 9), (8, 8, 1000, 64)])
def test_global_batch_is_megatron_lms_at_every_consumed_sample(start, increment, samples, full):
    calculator = num_microbatches_calculator(full, 1, 1, (start, increment, samples))
    for consumed in range(samples + 3):
        calculator.update(consumed, consistency_check=False)
        assert calculator.get_current_global_batch_size() == megatron_lm_ramp(
            consumed, start, increment, samples, full), consumed
    dp = 2 if full % 2 == 0 else 1
    calculator = num_microbatches_calculator(full, 1, dp, (start, increment, samples))
    calculator.update(samples + 1, consistency_check=True)
    assert calculator.get() == full // dp  # micro-batches per data-parallel rank


RAMP = ["--micro-batch-size", "1", "--global-batch-size", "12", "--rampup-batch-size", "4", "4",
        "24", "--train-samples", "60", "--lr-warmup-samples", "8"]


def test_steps_of_a_sample_based_run_are_megatron_lms():
    args = parse_args([*MOCK, *RAMP])
    # batches 4, 4, 4 (samples 0-11), 8, 8 (12-27: 28 > 24 ends the ramp), then (60 - 28) // 12
    assert setup.ramp_steps(args) == [4, 4, 4, 8, 8]
    assert setup.train_iters_and_samples(args) == (7, 52)
    assert num_samples(args)[0] == 60
    # a run ending on the ramp takes its last step whole (Megatron-LM: while consumed <= samples)
    short = parse_args([*MOCK, *RAMP[:-4], "--train-samples", "10"])
    assert setup.train_iters_and_samples(short) == (3, 12) and num_samples(short)[0] == 12
    plain = parse_args([*MOCK, *RAMP[:4], "--train-samples", "60"])
    assert setup.train_iters_and_samples(plain) == (5, 60)


def megatron_lm_lr(samples: float, lr: float, warmup: float, decay: float) -> float:
    """Megatron-LM's linear warmup from 0, then linear decay to 0, in samples."""
    if warmup > 0 and samples <= warmup:
        return lr * samples / warmup
    return lr * max(0.0, 1 - (samples - warmup) / (decay - warmup))


def test_lr_schedule_counts_samples():
    param = torch.nn.Parameter(torch.zeros(1))
    for extra, warmup, decay in ((["--lr-decay-samples", "40"], 8, 40), ([], 8, 60),
                                 (["--lr-warmup-fraction", "0.25"], 15, 60)):
        ramp = RAMP[:-2] if "--lr-warmup-fraction" in extra else RAMP  # no --lr-warmup-samples
        argv = [*MOCK, *ramp, *extra, "--lr-decay-style", "linear", "--lr", "1e-3"]
        scheduler = setup.build_scheduler(parse_args(argv), torch.optim.SGD([param], lr=1.0))
        assert (scheduler.lr_warmup_steps, scheduler.lr_decay_steps) == (warmup, decay)
        consumed = 0
        for batch in (4, 4, 4, 8, 8, 12, 12):
            assert scheduler.get_lr(scheduler.optimizer.param_groups[0]) == pytest.approx(
                megatron_lm_lr(consumed, 1e-3, warmup, decay), abs=1e-12), (extra, consumed)
            scheduler.step(increment=batch)
            consumed += batch
    wsd = parse_args([*MOCK, *RAMP, "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "20"])
    assert setup.build_scheduler(wsd, torch.optim.SGD([param], lr=1.0)).wsd_decay_steps == 20
    with pytest.raises(OptionError, match=r"^option lr_wsd_decay_samples \(--lr-wsd-decay-samples"
                                          r"\): 70 with --lr-decay-style WSD; valid: 1\.\.60 "):
        parse_args([*MOCK, *RAMP, "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "70"])


REFUSED = [
    (["--train-iters", "10", "--rampup-batch-size", "4", "4", "24"],
     "option rampup_batch_size (--rampup-batch-size): needs sample-based training: "
     "--train-samples instead of --train-iters (as in Megatron-LM)"),
    (["--train-iters", "10", "--train-samples", "60"],
     "option train_samples (--train-samples): give --train-iters or --train-samples, not both "
     "(as in Megatron-LM)"),
    (["--train-iters", "10", "--lr-decay-samples", "40"],
     "option lr_decay_samples (--lr-decay-samples): applies to sample-based training "
     "(--train-samples); this run gives --train-iters: use --lr-decay-iters (as in Megatron-LM)"),
    (["--train-samples", "60", "--lr-warmup-iters", "2"],
     "option lr_warmup_iters (--lr-warmup-iters): applies to iteration-based training "
     "(--train-iters); this run gives --train-samples: use --lr-warmup-samples (as in "
     "Megatron-LM)"),
    (["--train-samples", "60", "--rampup-batch-size", "4", "4"],
     "option rampup_batch_size (--rampup-batch-size): [4, 4] is not START INCR SAMPLES; valid: "
     "three integers >= 1"),
    # world size 2, micro-batch 2: every ramp batch must be a multiple of 4
    (["--train-samples", "60", "--micro-batch-size", "2", "--global-batch-size", "12",
      "--rampup-batch-size", "4", "2", "24"],
     "option rampup_batch_size (--rampup-batch-size): the global batch 6 of the step at sample 8 "
     "is not divisible by --micro-batch-size 2 x data-parallel size 2 = 4; valid: START and INCR "
     "multiples of 4"),
    (["--train-samples", "60", "--global-batch-size", "12", "--rampup-batch-size", "12", "4",
      "24"],
     "option rampup_batch_size (--rampup-batch-size): START 12 is not below --global-batch-size "
     "12, the batch the ramp ends at; valid: START < --global-batch-size"),
    (["--train-samples", "60", "--global-batch-size", "12", "--rampup-batch-size", "4", "3",
      "24"],
     "option rampup_batch_size (--rampup-batch-size): INCR 3 does not divide --global-batch-size "
     "12 - START 4 = 8; valid: a divisor of 8"),
    (["--train-samples", "7", "--global-batch-size", "8"],
     "--train-samples 7 is less than one global batch (--global-batch-size 8): nothing to "
     "train; raise --train-samples."),
]


@pytest.mark.parametrize("argv,expected", REFUSED, ids=[" ".join(a[:4]) for a, _ in REFUSED])
def test_refused_in_one_line_naming_the_flag(argv, expected, capfd, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # preflight's layout (DP=2); no process group starts
    assert _refused([*MOCK, *argv], capfd) == f"coe-train: error: {expected}"


RUN = [*MOCK, *RAMP, "--lr-decay-style", "linear", "--log-interval", "1", "--num-workers",
       "0"]


@pytest.mark.timeout(300)
def test_two_rank_ramp_follows_the_calculator_and_resumes_bit_exact(tmp_path):
    log = run([*RUN, "--save", tmp_path / "ckpt", "--save-interval", "3", "--metrics-file",
               tmp_path / "full.jsonl"], 2, tmp_path / "full.log")
    full = metrics(tmp_path / "full.jsonl")
    steps = [full[("train", i)] for i in range(1, 8)]
    assert ("train", 8) not in full and "training from iteration 0 to 7" in log
    calculator = num_microbatches_calculator(12, 1, 2, (4, 4, 24))  # DP=2, micro-batch 1
    expected, consumed = [], 0
    for _ in steps:
        calculator.update(consumed, consistency_check=True)
        expected.append(calculator.get_current_global_batch_size())
        consumed += expected[-1]
    assert expected == [4, 4, 4, 8, 8, 12, 12]
    assert [r["global_batch_size"] for r in steps] == expected
    assert [r["consumed_samples"] for r in steps] == [4, 8, 12, 20, 28, 40, 52]
    assert "| global batch 8 |" in log and "| global batch 12 |" in log
    before = [0, 4, 8, 12, 20, 28, 40]  # samples consumed when each step's LR is set
    assert [r["lr"] for r in steps] == pytest.approx(
        [megatron_lm_lr(s, 3e-3, 8, 60) for s in before], abs=1e-12)
    # aux losses are per-micro-batch means whether a rank runs 2 or 6 micro-batches
    aux = [v for r in steps for v in r["aux"].values()]
    assert aux and all(0.9 < v < 1.2 for v in aux), aux
    # Megatron-LM's args in the checkpoint: the run's sample-based values, its derived steps
    from megatron.core import dist_checkpointing

    ns = dist_checkpointing.load_common_state_dict(str(tmp_path / "ckpt/iter_0000003"))["args"]
    assert (ns.train_samples, ns.rampup_batch_size, ns.lr_warmup_samples, ns.train_iters,
            ns.consumed_train_samples) == (60, [4, 4, 24], 8, 7, 12)
    # iteration 3 (12 samples): the next step is the first of global batch 8
    (tmp_path / "ckpt/latest_checkpointed_iteration.txt").write_text("3")
    log = run([*RUN, "--load", tmp_path / "ckpt", "--metrics-file", tmp_path / "resumed.jsonl"],
              2, tmp_path / "resumed.log")
    assert "training from iteration 3 to 7" in log
    resumed = metrics(tmp_path / "resumed.jsonl")
    assert [resumed[("train", i)]["global_batch_size"] for i in range(4, 8)] == expected[3:]
    ref, got = train_losses(full), train_losses(resumed)
    assert sorted(got) == [4, 5, 6, 7]
    assert [got[i] for i in range(4, 8)] == [ref[i] for i in range(4, 8)]  # bit-exact


def test_a_length_flag_replaces_the_config_files_length_of_the_other_kind(tmp_path):
    """--train-samples on the command line with a config that sets train_iters trains by samples
    (the flag wins over the file, as every flag does); both as flags is still refused."""
    from megatron_coe.training.options import OptionError, parse_args

    cfg = tmp_path / "run.yaml"
    cfg.write_text("num_layers: 2\nhidden_size: 32\nnum_attention_heads: 4\nnum_experts: 4\n"
                   "seq_length: 32\nmicro_batch_size: 1\ntrain_iters: 300\nlr_decay_iters: 200\n"
                   "lr: 0.001\n")
    args = parse_args(["--config", str(cfg), "--train-samples", "640",
                       "--lr-decay-samples", "320"])
    assert (args.train_iters, args.train_samples, args.lr_decay_iters,
            args.lr_decay_samples) == (None, 640, None, 320)
    args = parse_args(["--config", str(cfg)])
    assert (args.train_iters, args.train_samples, args.lr_decay_iters) == (300, None, 200)
    with pytest.raises((OptionError, SystemExit)):
        parse_args(["--config", str(cfg), "--train-iters", "3", "--train-samples", "640"])
