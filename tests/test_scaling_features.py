"""Megatron-LM scaling features in the trainer, through Megatron-Core's own mechanisms, with C
chained passes: full activation recompute and token dropping (capacity per pass), in one EP=2 run
whose progress line and metrics report each pass's dropped fraction."""

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
