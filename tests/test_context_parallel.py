"""Context parallelism (``--context-parallel-size``, issue 23) as far as a CPU can show it.

No GPU runs here: Megatron-Core's only context-parallel attention is Transformer Engine's, so a CPU
run with CP > 1 is refused in one line. What is checked:

* the flags and their Megatron-LM defaults (1, ``p2p``), their refusals (CPU, the local layers,
  ``--seq-length`` not a multiple of 2 x CP, ``--cp-comm-type`` values and count) and their
  acceptance on the Transformer Engine path (the model config Megatron-Core validates);
* the layout arithmetic (world = TP x PP x CP x DP) and the memory estimate (activations / CP);
* at CP = 2 on 4 gloo ranks, ``parallel.initialize_parallel``'s groups (cp, dp, dp_cp, tp_cp,
  ep, expt_dp) are Megatron-Core's own layout, and Megatron-Core's DDP, built as the trainer builds
  it, averages dense gradients over the data-parallel-with-CP group;
* at CP = 2 on 2 ranks, the trainer's forward step gives each rank Megatron-Core's load-balanced
  chunks, and the per-token loss sums and counts reduced over the ranks equal the full
  sequence's (a per-token stand-in model: the local attention refuses CP).
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_coe.testing.distributed import run_distributed
from megatron_coe.testing.train_args import explicit
from megatron_coe.training import memory, options, precision, setup

from test_option_refusals import _refused

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32",
        "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "2", "--lr", "1e-2",
        "--vocab-size", "256", "--mock-data", "--eval-iters", "0", "--no-exit-signal-handler"]


# ------------------------------------------------------------------ flags, refusals, acceptance
def test_help_lists_the_flags_with_megatron_lm_defaults():
    text = re.sub(r"\s+", " ", options.build_parser().format_help())
    assert re.search(r"--context-parallel-size CONTEXT_PARALLEL_SIZE Context-parallel size: .*? "
                     r"\(default: 1\)", text)
    assert re.search(r"--cp-comm-type CP_COMM_TYPE \[CP_COMM_TYPE \.\.\.\] Context-parallel "
                     r"communication .*? \(default: \['p2p'\]\)", text)
    args = options.parse_args(explicit(TINY))
    assert (args.context_parallel_size, args.cp_comm_type) == (1, ["p2p"])
    if importlib.util.find_spec("megatron.training") is not None:  # megatron-core >= 0.17
        import argparse

        from megatron.training.arguments import add_megatron_arguments

        theirs = add_megatron_arguments(argparse.ArgumentParser()).parse_args([])
        assert (theirs.context_parallel_size, theirs.cp_comm_type) == (1, ["p2p"])


def test_context_parallel_refused_on_cpu_in_one_line(capfd):
    assert _refused([*TINY, "--context-parallel-size", "2"], capfd) == (
        "coe-train: error: --context-parallel-size 2 needs Transformer Engine's attention "
        "(Megatron-Core's local attention has no context parallelism): this machine has no CUDA "
        "GPU; use --context-parallel-size 1 on CPU.")


def test_context_parallel_refused_with_the_local_layers_on_a_gpu():
    """A CUDA machine with TE, but --transformer-impl local: refused naming the flag to drop;
    the TE path is accepted."""
    gpu = precision.DeviceProbe(cuda=lambda: True, have_te=lambda: True,
                                capability=lambda: (9, 0), device_name=lambda: "H100")
    local = options.parse_args(explicit([*TINY, "--context-parallel-size", "2",
                                         "--transformer-impl", "local"]))
    impl = precision.resolve_transformer_impl(local, gpu)
    with pytest.raises(setup.SetupError) as e:
        precision.check_context_parallel(local, impl, cuda=True)
    assert str(e.value).endswith("has no context parallelism): drop --transformer-impl local.")
    te = options.parse_args(explicit([*TINY, "--context-parallel-size", "2"]))
    impl = precision.resolve_transformer_impl(te, gpu)
    assert impl == "transformer_engine"
    precision.check_context_parallel(te, impl, cuda=True)  # accepted


REFUSED = [
    (["--context-parallel-size", "4", "--seq-length", "20"],
     "option seq_length (--seq-length): 20 is not a multiple of 2 x --context-parallel-size 4 = 8 "
     "(each sequence is split into 8 chunks); valid: a multiple of 8"),
    (["--cp-comm-type", "a2a+p2p"],
     "option cp_comm_type (--cp-comm-type): 'a2a+p2p' needs Megatron-LM's "
     "--hierarchical-context-parallel-sizes, which this trainer does not have; valid: p2p, a2a, "
     "allgather"),
    (["--cp-comm-type", "ring"],
     "option cp_comm_type (--cp-comm-type): 'ring' is not one of ['p2p', 'a2a', 'allgather']"),
    (["--cp-comm-type", "p2p", "a2a", "a2a"],
     "option cp_comm_type (--cp-comm-type): 3 values for --num-layers 2; valid: one for every "
     "layer, or one per layer"),
    (["--context-parallel-size", "0"],
     "option context_parallel_size (--context-parallel-size): 0 is out of range; valid: >= 1"),
]


@pytest.mark.parametrize("extra,expected", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_option_refusals(extra, expected, capfd):
    """Refused at option validation, before the machine is looked at (the same on a GPU)."""
    assert _refused([*TINY, *extra], capfd) == f"coe-train: error: {expected}"


def test_te_model_config_gets_the_cp_size_and_comm_type():
    """On the TE path the options reach Megatron-Core's TransformerConfig, which validates them
    (a per-layer list must have --num-layers entries)."""
    for types, expected in ((["a2a"], "a2a"), (["p2p", "allgather"], ["p2p", "allgather"])):
        args = options.parse_args(explicit([*TINY, "--context-parallel-size", "2",
                                            "--transformer-impl", "transformer_engine",
                                            "--no-moe-grouped-gemm", "--cp-comm-type", *types]))
        config = setup.build_model_config(args)
        assert (config.context_parallel_size, config.cp_comm_type) == (2, expected)
        assert config.transformer_impl == "transformer_engine"
    default = setup.build_model_config(options.parse_args(explicit(TINY)))
    assert (default.context_parallel_size, default.cp_comm_type) == (1, "p2p")


# ------------------------------------------------------------------ layout and memory
def test_layout_counts_context_parallel_ranks():
    args = options.parse_args(explicit([*TINY, "--context-parallel-size", "2",
                                        "--global-batch-size", "4"]))
    layout = setup.check_layout(args, world_size=4)
    assert (layout.cp, layout.dp, layout.num_microbatches) == (2, 2, 1)
    with pytest.raises(setup.SetupError, match=r"world size 6 is not divisible by tensor-parallel "
                       r"1 x pipeline-parallel 1 x context-parallel 4"):
        setup.check_layout(options.parse_args(explicit([*TINY, "--context-parallel-size", "4"])), 6)
    with pytest.raises(setup.SetupError, match=r"--global-batch-size 2 is not divisible by "
                       r"--micro-batch-size 2 x data-parallel size 2 = 4"):
        setup.check_layout(options.parse_args(explicit([*TINY, "--context-parallel-size", "2",
                                                        "--global-batch-size", "2"])), 4)


def test_memory_estimate_divides_activations_by_cp():
    """Same world size: CP = 2 halves each rank's activations (seq / 2 tokens of each sequence),
    keeps parameters and optimizer shards (sharded over DP x CP either way)."""
    def estimate(cp, world):
        args = options.parse_args(explicit([*TINY, "--context-parallel-size", str(cp),
                                            "--global-batch-size", "4", "--bf16"]))
        return memory.estimate(args, world, 256, "transformer_engine")[0]

    cp1, cp2 = estimate(1, 4), estimate(2, 4)
    assert (cp2.param_bytes, cp2.optimizer_bytes) == (cp1.param_bytes, cp1.optimizer_bytes)
    assert cp2.activation_per_microbatch == pytest.approx(cp1.activation_per_microbatch / 2,
                                                          rel=1e-3)
    assert cp2.activation_per_microbatch < 0.51 * cp1.activation_per_microbatch
    args = options.parse_args(explicit([*TINY, "--context-parallel-size", "2"]))
    assert "TP 1 x PP 1 x CP 2 x DP 2" in memory.table([cp2], args, 4)


# ------------------------------------------------------------------ process groups (4 ranks)
def _groups_at_cp2(rank, world_size):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.parallel import initialize_parallel

    pg = initialize_parallel(context_parallel_size=2, expert_model_parallel_size=2, seed=1)
    ranks = torch.distributed.get_process_group_ranks
    ours = {name: ranks(getattr(pg, name)) for name in
            ("cp", "dp", "dp_cp", "tp_cp", "ep", "expt_dp", "tp_dp_cp")}
    megatron = dict(
        cp=ranks(ps.get_context_parallel_group()), dp=ranks(ps.get_data_parallel_group()),
        dp_cp=ranks(ps.get_data_parallel_group(with_context_parallel=True)),
        tp_cp=ranks(ps.get_tensor_and_context_parallel_group()),
        ep=ranks(ps.get_expert_model_parallel_group()),
        expt_dp=ranks(ps.get_expert_data_parallel_group()),
        tp_dp_cp=ranks(ps.get_tensor_and_data_parallel_group(with_context_parallel=True)))

    # Megatron-Core's DDP on these groups (no pg_collection, as setup.build_model builds it):
    # the dense gradient is the mean over the DP x CP ranks (all-reduce here; the trainer's
    # distributed optimizer reduce-scatters over the same group)
    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1,
                               context_parallel_size=2, use_cpu_initialization=True)

    class Linear(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.weight = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return (self.weight * x).sum()

    with cuda_device_redirect():
        ddp = DistributedDataParallel(config=config, module=Linear(),
                                      ddp_config=DistributedDataParallelConfig(
                                          grad_reduce_in_fp32=True))
        ddp.zero_grad_buffer()
        ddp(torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)).backward()  # gradient (rank + 1) x
        ddp.finish_grad_sync()
    grad = ddp.module.weight.main_grad.tolist()
    return ours, megatron, grad


@pytest.mark.timeout(180)
def test_cp2_process_groups_are_megatron_cores_layout():
    results = run_distributed(_groups_at_cp2, 4, timeout=150)
    # Megatron-Core's order tp-cp-ep-dp-pp at TP 1, CP 2, DP 2; experts: EP 2 x expert-DP 2
    expected = {0: dict(cp=[0, 1], dp=[0, 2], ep=[0, 1], expt_dp=[0, 2]),
                1: dict(cp=[0, 1], dp=[1, 3], ep=[0, 1], expt_dp=[1, 3]),
                2: dict(cp=[2, 3], dp=[0, 2], ep=[2, 3], expt_dp=[0, 2]),
                3: dict(cp=[2, 3], dp=[1, 3], ep=[2, 3], expt_dp=[1, 3])}
    mean = [(1 + 2 + 3 + 4) / 4 * x for x in (1.0, 2.0, 3.0)]
    for rank, (ours, megatron, grad) in enumerate(results):
        assert ours == megatron, rank
        assert {k: ours[k] for k in expected[rank]} == expected[rank], (rank, ours)
        assert ours["dp_cp"] == ours["tp_dp_cp"] == [0, 1, 2, 3]
        assert ours["tp_cp"] == ours["cp"]
        assert grad == pytest.approx(mean), (rank, grad)  # over DP only it would be 2 x or 3 x


# ------------------------------------------------------------------ forward step and loss (2 ranks)
SEQ, MBS = 8, 2


def _full_batch():
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 50, (MBS, SEQ), generator=g)
    loss_mask = torch.ones(MBS, SEQ)
    loss_mask[0, :2] = loss_mask[1, 5] = 0.0  # 3 masked: 2 of CP rank 0's tokens, 1 of rank 1's
    return dict(tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=loss_mask,
                position_ids=torch.arange(SEQ).expand(MBS, -1).clone(),
                dataset_id=torch.zeros(MBS, dtype=torch.long))


def _per_token_model(seen):
    """A stand-in for GPTModel: a per-token loss [b, s] of the tokens, labels and positions it is
    given (no attention), recording what it received."""
    def model(tokens, position_ids, attention_mask, labels=None):
        seen.update(tokens=tokens, position_ids=position_ids, attention_mask=attention_mask)
        return ((tokens * 7 + labels * 3 + position_ids) % 11).float() / 3 + 0.25
    return model


def _forward_step(pg, batch, mask):
    from megatron_coe.training.trainer import Trainer

    trainer = SimpleNamespace(attention_mask=mask, pg_collection=pg)  # what forward_step reads
    seen = {}
    output, loss_fn = Trainer.forward_step(trainer, iter([batch]), _per_token_model(seen))
    return seen, output, loss_fn(output)


def _cp2_forward(rank, world_size):
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.training import metrics

    pg = initialize_parallel(context_parallel_size=2, seed=1)
    batch = _full_batch()
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    seen, output, (loss, num_tokens, report) = _forward_step(pg, dict(batch), mask)
    # Megatron-Core's own slicing, called directly (its signature of the installed release)
    theirs = {k: batch[k] for k in ("tokens", "position_ids")}
    theirs["attention_mask"] = mask
    kwargs = ({"is_hybrid_cp": False} if "is_hybrid_cp" in
              inspect.signature(get_batch_on_this_cp_rank).parameters else {})
    theirs = get_batch_on_this_cp_rank(theirs, cp_group=pg.cp, **kwargs)
    summed = report["lm loss"].clone()  # [loss sum, token count]
    torch.distributed.all_reduce(summed, group=pg.cp)
    lm_loss, _ = metrics.reduce_lm_loss([report])  # the trainer's reduction (all ranks)
    return dict(seen=seen, theirs=theirs, output=output, loss=loss, num_tokens=num_tokens,
                report=report, summed=summed, lm_loss=lm_loss)


@pytest.mark.timeout(120)
def test_cp2_forward_step_slices_and_loss_reduces_to_the_full_sequence():
    from megatron_coe.training.trainer import loss_func

    results = run_distributed(_cp2_forward, 2, timeout=100)
    batch = _full_batch()
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    full = _per_token_model({})(batch["tokens"], batch["position_ids"], mask,
                                labels=batch["labels"])
    full_loss, full_tokens, full_report = loss_func(batch["loss_mask"], full)
    # 2 x CP = 4 chunks of 2 tokens: rank 0 keeps chunks 0 and 3, rank 1 chunks 1 and 2
    chunks = {0: [0, 1, 6, 7], 1: [2, 3, 4, 5]}
    for rank, r in enumerate(results):
        idx = chunks[rank]
        assert torch.equal(r["seen"]["tokens"], batch["tokens"][:, idx])
        assert torch.equal(r["seen"]["position_ids"], batch["position_ids"][:, idx])
        assert torch.equal(r["seen"]["attention_mask"], mask[:, :, idx, :])  # the query rows
        for key in ("tokens", "position_ids", "attention_mask"):
            assert torch.equal(r["seen"][key], r["theirs"][key]), key
        assert torch.equal(r["output"], full[:, idx])
        assert r["num_tokens"] == int(batch["loss_mask"][:, idx].sum())
        assert torch.allclose(r["summed"], full_report["lm loss"]), r["summed"]
        assert r["lm_loss"] == pytest.approx((full_loss / full_tokens).item(), rel=1e-6)
    assert results[0]["num_tokens"] != results[1]["num_tokens"]  # the counts really differ
    assert results[0]["num_tokens"] + results[1]["num_tokens"] == full_tokens


def test_cp1_forward_step_passes_the_batch_through():
    """CP = 1 (every run so far): the model gets the micro-batch and the trainer's mask as they
    are; keys that are not per-token (a blend's dataset_id) are not passed on."""
    batch = _full_batch()
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    pg = SimpleNamespace(cp=SimpleNamespace(size=lambda: 1))
    seen, output, (_, num_tokens, _) = _forward_step(pg, dict(batch), mask)
    assert seen["tokens"] is batch["tokens"] and seen["attention_mask"] is mask
    assert output.shape == (MBS, SEQ) and num_tokens == int(batch["loss_mask"].sum())
