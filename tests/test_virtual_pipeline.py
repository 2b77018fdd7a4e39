"""Interleaved (virtual) pipeline (issue 23 item 1): ``--num-layers-per-virtual-pipeline-stage`` /
``--num-virtual-stages-per-pipeline-rank`` build one ``GPTModel`` chunk per virtual stage, each in
its own DDP, trained by Megatron-Core's interleaved schedule (one data iterator per chunk).

* PP=2 x VPP=2 trains exactly like PP=1 from the same checkpoint (losses, gradient norms, the
  per-layer expert loads that name every layer by its global number), with the Megatron-LM
  schedule hooks of --overlap-grad-reduce / --overlap-param-gather; its checkpoint (Megatron-LM's
  ``model0``/``model1`` entries, global layer names) resumes at PP=1 with PP=1's losses. From
  scratch the layouts start from different weights (each pipeline rank seeds its own generator,
  as in Megatron-LM), so both runs start from one checkpoint: PP=1 -> VPP -> PP=1.
* Megatron-LM's rules for the two flags are refused in one line; the flags show their defaults.
"""

from __future__ import annotations

import re

import pytest
import torch

from megatron_coe.training import megatron_lm
from test_train import metrics, run

TINY_VPP = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --num-experts 8 "
            "--moe-router-topk 2 --moe-ffn-hidden-size 32 --moe-shared-expert-intermediate-size 32 "
            "--coe-iterations 2 --moe-router-pre-softmax --moe-router-load-balancing-type "
            "seq_aux_loss --moe-aux-loss-coeff 1e-2 --swiglu --seq-length 32 --micro-batch-size 2 "
            "--global-batch-size 8 --lr 3e-3 --lr-warmup-iters 1 --eval-iters 1 --log-interval 1 "
            "--train-iters 6 --save-interval 2 --mock-data --vocab-size 64 --hidden-dropout 0 "
            "--attention-dropout 0 --moe-token-dispatcher-type alltoall").split()
VPP = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
       "--overlap-grad-reduce", "--overlap-param-gather"]


def _train(path) -> dict:
    return {i: r for (t, i), r in metrics(path).items() if t == "train"}


def _assert_same_steps(ref: dict, got: dict, steps: list) -> None:
    assert sorted(got) == steps, sorted(got)
    for i in steps:
        a, b = ref[i], got[i]
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-6), (i, a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), (i, a, b)
        # every (layer, pass) routed the same tokens: the chunks hold the right global layers
        assert b["load_imbalance"] == a["load_imbalance"], (i, a, b)


@pytest.mark.timeout(400)
def test_interleaved_pipeline_matches_one_stage_and_reshards_both_ways(tmp_path):
    one = tmp_path / "pp1"
    run([*TINY_VPP, "--save", one, "--metrics-file", tmp_path / "pp1.jsonl"], 1,
        tmp_path / "pp1.log", timeout=300)
    ref = _train(tmp_path / "pp1.jsonl")
    assert sorted(ref) == list(range(1, 7))

    # PP=1's iteration 2 -> PP=2 x VPP=2 (the tracker names iteration 2)
    (one / "latest_checkpointed_iteration.txt").write_text("2")
    log = run([*TINY_VPP, *VPP, "--load", one, "--save", tmp_path / "vpp",
               "--metrics-file", tmp_path / "vpp.jsonl"], 2, tmp_path / "vpp.log", timeout=300)
    assert "'pp': 2" in log and "'vpp': 2" in log and "at iteration 2" in log, log[-3000:]
    vpp = _train(tmp_path / "vpp.jsonl")
    _assert_same_steps(ref, vpp, [3, 4, 5, 6])
    valid = lambda path: metrics(path)[("valid", 6)]["lm_loss"]  # noqa: E731
    assert valid(tmp_path / "vpp.jsonl") == pytest.approx(valid(tmp_path / "pp1.jsonl"), rel=1e-6)
    # Megatron-LM's args in the common state name the virtual stages
    common = megatron_lm.load_common(str(tmp_path / "vpp/iter_0000004"))
    assert common["args"].virtual_pipeline_model_parallel_size == 2
    assert common["args"].num_layers_per_virtual_pipeline_stage == 1

    # PP=2 x VPP=2's iteration 4 -> PP=1
    (tmp_path / "vpp/latest_checkpointed_iteration.txt").write_text("4")
    run([*TINY_VPP, "--load", tmp_path / "vpp", "--metrics-file", tmp_path / "back.jsonl"], 1,
        tmp_path / "back.log", timeout=300)
    _assert_same_steps(ref, _train(tmp_path / "back.jsonl"), [5, 6])


# --------------------------------------------------------------------------- options
BASE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
        "--num-experts", "4", "--seq-length", "32", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--mock-data", "--vocab-size", "64", "--train-iters", "1",
        "--lr", "1e-3"]


def _layout(extra: list, world: int):
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training import options, setup

    args = options.parse_args(explicit([*BASE, *extra]))
    return args, setup.check_layout(args, world)


REFUSED = [
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--num-virtual-stages-per-pipeline-rank", "2"], 2, "exclude each other"),
    (["--num-virtual-stages-per-pipeline-rank", "2"], 1,
     "--num-virtual-stages-per-pipeline-rank 2: the interleaved pipeline needs "
     "--pipeline-model-parallel-size > 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "the 2 layers of each pipeline rank (--num-layers 4 / --pipeline-model-parallel-size 2) are "
     "not a multiple of it"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
      "--decoder-first-pipeline-num-layers", "2"], 2,
     "with uneven stages (--decoder-first/last-pipeline-num-layers): give the chunks per rank "
     "with --num-virtual-stages-per-pipeline-rank"),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
      "--decoder-first-pipeline-num-layers", "3"], 2,
     "pipeline stage 0 has 3 layers, not a multiple of 2 virtual stages"),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
      "--global-batch-size", "3"], 2,
     "needs a multiple of --pipeline-model-parallel-size 2 micro-batches per step, but "
     "--global-batch-size 3 gives 3"),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
      "--moe-layer-freq", "[0]*2+[1]*2"], 2,
     "pipeline stage 0, virtual stage 0 (layers 1-1) has no CoE layer"),
]


@pytest.mark.parametrize("extra,world,words", REFUSED, ids=[w[:40] for _, _, w in REFUSED])
def test_bad_virtual_pipeline_layouts_are_refused_in_one_line(extra, world, words):
    from megatron_coe.training.setup import SetupError

    with pytest.raises(SetupError, match=re.escape(words)) as e:
        _layout(extra, world)
    assert "\n" not in str(e.value)


def test_virtual_pipeline_refusal_from_the_command_line_is_one_line(capfd):
    from megatron_coe import train
    from megatron_coe.testing.train_args import explicit

    rc = train.main(explicit([*BASE, "--num-virtual-stages-per-pipeline-rank", "2"]))
    _, err = capfd.readouterr()
    assert rc == 2 and not torch.distributed.is_initialized()
    assert err == ("coe-train: error: --num-virtual-stages-per-pipeline-rank 2: the interleaved "
                   "pipeline needs --pipeline-model-parallel-size > 1; raise it or drop the "
                   "flag.\n")


def _megatron_core_layers(config, pp: int, vpp: int) -> list:
    """[[global layer indices] per pipeline rank], all its chunks, from Megatron-Core itself."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    out = [[] for _ in range(pp)]
    for rank in range(pp):
        for stage in range(vpp):
            start = get_transformer_layer_offset(config, vp_stage=stage, pp_rank=rank)
            out[rank] += range(start, start + get_num_layers_to_build(config, stage, rank))
    return out


def test_virtual_stages_from_either_flag_reach_the_model_config_and_memory_estimate():
    from megatron_coe.training import memory, setup

    pp2 = ["--pipeline-model-parallel-size", "2"]
    args, layout = _layout([*pp2, "--num-layers-per-virtual-pipeline-stage", "1"], 2)
    assert layout.vpp == 2 and layout.num_microbatches == 4
    config = setup.build_model_config(args)
    assert (config.virtual_pipeline_model_parallel_size, config.overlap_p2p_comm,
            config.batch_p2p_comm) == (2, True, False)  # Megatron-LM's interleaved defaults
    par = memory.parallel_of(args, 2)
    assert par.vpp == 2 and memory.stage_layers(args, par) == [[0, 2], [1, 3]] == \
        _megatron_core_layers(config, 2, 2)
    # one virtual stage per rank is the plain schedule (Megatron-LM: None)
    args, layout = _layout([*pp2, "--num-layers-per-virtual-pipeline-stage", "2"], 2)
    assert layout.vpp == 1 and setup.build_model_config(args).virtual_pipeline_model_parallel_size \
        is None
    # uneven stages with virtual stages: Megatron-Core's own config accepts the split
    args, layout = _layout(["--num-layers", "6", "--decoder-first-pipeline-num-layers", "4",
                            *pp2, "--num-virtual-stages-per-pipeline-rank", "2"], 2)
    config = setup.build_model_config(args)
    assert layout.vpp == 2 and config.num_layers_in_first_pipeline_stage == 4
    assert memory.stage_layers(args, memory.parallel_of(args, 2)) == [[0, 1, 3, 4], [2, 5]] == \
        _megatron_core_layers(config, 2, 2)


def test_help_lists_both_flags_with_megatron_lm_defaults():
    from megatron_coe.training import options

    text = re.sub(r"\s+", " ", options.build_parser().format_help())
    for flag in ("--num-layers-per-virtual-pipeline-stage",
                 "--num-virtual-stages-per-pipeline-rank"):
        help_text = re.search(re.escape(flag) + r" \S+ (.*?\(default: [^)]*\))", text)
        assert help_text and help_text[1].endswith("(default: None)"), flag


def test_batch_ramp_with_the_interleaved_pipeline_keeps_micro_batch_groups_whole():
    """Every global batch of a --rampup-batch-size ramp must give the interleaved schedule a
    multiple of PP micro-batches: 2, 4, 6 pass at PP=2 x VPP=2; a ramp through 3 is refused."""
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training import options, setup

    i = BASE.index("--train-iters")
    by_samples = BASE[:i] + ["--train-samples", "40"] + BASE[i + 2:]
    vpp = ["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
           "--global-batch-size", "6"]
    args = options.parse_args(explicit([*by_samples, *vpp, "--rampup-batch-size", "2", "2", "8"]))
    assert setup.check_layout(args, 2).vpp == 2
    args = options.parse_args(explicit([*by_samples, *vpp, "--rampup-batch-size", "2", "1", "8"]))
    with pytest.raises(setup.SetupError, match=r"the global batch 3 .* x "
                       r"--pipeline-model-parallel-size 2 \(the interleaved pipeline's") as e:
        setup.check_layout(args, 2)
    assert "\n" not in str(e.value)
