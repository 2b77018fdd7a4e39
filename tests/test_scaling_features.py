"""Megatron-LM scaling features in the trainer, through Megatron-Core's own mechanisms, with C
chained passes: full activation recompute and token dropping (capacity per pass), in one EP=2 run
whose progress line and metrics report each pass's dropped fraction."""

import re

import pytest

from test_train import TINY, data_args, gsm8k, metrics, run  # noqa: F401 - gsm8k is a fixture


@pytest.mark.timeout(400)
def test_full_recompute_and_token_dropping_train_at_ep2(gsm8k, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, *data_args(gsm8k), "--expert-model-parallel-size", "2",
            "--moe-token-dispatcher-type", "alltoall", "--moe-expert-capacity-factor", "0.5",
            "--recompute-granularity", "full", "--recompute-method", "uniform",
            "--recompute-num-layers", "1", "--train-iters", "10", "--eval-interval", "10",
            "--metrics-file", out / "metrics.jsonl"]
    log = run(args, 2, tmp_path / "train.log", timeout=360)
    lines = [line for line in log.splitlines() if line.startswith("iter")]
    assert lines and all(" dropped p1 " in line and " p2 " in line for line in lines), lines
    m = metrics(out / "metrics.jsonl")
    logged = [r for (t, i), r in sorted(m.items()) if t == "train" and "dropped_fraction" in r]
    assert [r["iteration"] for r in logged] == [5, 10]
    for r in logged:  # every (layer, pass) dropped some of its choices at capacity factor 0.5
        assert set(r["dropped_fraction"]) == {"layer1_pass1", "layer1_pass2", "layer2_pass1",
                                              "layer2_pass2"}
        assert all(0.0 < v < 1.0 for v in r["dropped_fraction"].values()), r
    assert m[("valid", 10)]["lm_loss"] < m[("train", 1)]["lm_loss"]


UNEVEN = ["--num-layers", "4", "--moe-layer-freq", "[0]*1+[1]*3", "--train-iters", "6",
          "--log-interval", "1", "--eval-interval", "6", "--save-interval", "3"]


@pytest.mark.timeout(600)
def test_uneven_pipeline_stages_match_one_stage_and_reshard(gsm8k, tmp_path):
    """--decoder-first/last-pipeline-num-layers (DeepSeek-V3 style, a dense first layer): PP=2
    with stages of 3 + 1 layers trains like PP=1 (float tolerance), and its checkpoint resumes at
    PP=1 with the same losses."""
    from test_train import train_losses

    one = run([*TINY, *data_args(gsm8k), *UNEVEN, "--metrics-file", tmp_path / "pp1.jsonl"], 1,
              tmp_path / "pp1.log", timeout=400)
    assert "'pp': 1" in one
    two = run([*TINY, *data_args(gsm8k), *UNEVEN, "--pipeline-model-parallel-size", "2",
               "--decoder-first-pipeline-num-layers", "3", "--save", tmp_path / "ckpt",
               "--metrics-file", tmp_path / "pp2.jsonl"], 2, tmp_path / "pp2.log", timeout=400)
    assert "'pp': 2" in two
    ref, uneven = (train_losses(metrics(tmp_path / f"pp{n}.jsonl")) for n in (1, 2))
    assert sorted(ref) == sorted(uneven) == list(range(1, 7))
    for i in ref:
        assert uneven[i] == pytest.approx(ref[i], rel=1e-5, abs=1e-5), (i, ref[i], uneven[i])
    # the uneven PP=2 checkpoint of iteration 3 resumes at PP=1
    (tmp_path / "ckpt/latest_checkpointed_iteration.txt").write_text("3")
    run([*TINY, *data_args(gsm8k), *UNEVEN, "--load", tmp_path / "ckpt", "--no-load-rng",
         "--metrics-file", tmp_path / "resumed.jsonl"], 1, tmp_path / "resumed.log", timeout=400)
    resumed = train_losses(metrics(tmp_path / "resumed.jsonl"))
    assert sorted(resumed) == [4, 5, 6]
    for i in resumed:
        assert resumed[i] == pytest.approx(ref[i], rel=1e-5, abs=1e-5), (i, ref[i], resumed[i])


def test_uneven_stage_sizes_are_checked_in_one_line():
    from megatron_coe.training.setup import SetupError, check_layout

    from test_train import parse_args

    base = [*TINY, "--mock-data", "--vocab-size", "64", "--num-layers", "4",
            "--pipeline-model-parallel-size", "2"]
    for extra, words in ((["--decoder-first-pipeline-num-layers", "5"], "share -1 layers"),
                         (["--decoder-first-pipeline-num-layers", "1", "--moe-layer-freq",
                           "[0]*1+[1]*3"], "stage 0 (layers 1-1) has no CoE layer"),
                         (["--decoder-first-pipeline-num-layers", "2",
                           "--decoder-last-pipeline-num-layers", "1"], "which must be 0")):
        with pytest.raises(SetupError, match=re.escape(words)):
            check_layout(parse_args(base + extra), 2)
    layout = check_layout(parse_args(base + ["--decoder-last-pipeline-num-layers", "1"]), 2)
    assert layout.pp == 2
