"""Full activation recompute (``--recompute-granularity full``, Megatron-Core's own
``TransformerBlock`` checkpointing) of CoE layers: every pass is recomputed whole, the routing in
the recompute is the same, and aux losses and expert-load counts are counted once.

EP=2 on two gloo processes, C=2; uniform and block methods against no recompute, bit-identical.
"""

import pytest
import torch

from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
)

from megatron_coe.models.gpt import build_coe_gpt_model
from megatron_coe.parallel import destroy_parallel, initialize_parallel
from megatron_coe.testing.configs import tiny_config
from megatron_coe.testing.distributed import run_distributed
from megatron_coe.training.options import OptionError, parse_args

VOCAB, SEQ, BATCH = 64, 16, 2
RECOMPUTE = {
    "none": {},
    "uniform": dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=1),
    "block": dict(recompute_granularity="full", recompute_method="block",
                  recompute_num_layers=2),
}


def _run(rank, world_size, mode):
    torch.manual_seed(7)
    destroy_parallel()
    pg = initialize_parallel(expert_model_parallel_size=2, seed=7)
    cfg = tiny_config(expert_model_parallel_size=2, moe_shared_expert_intermediate_size=32,
                      moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2,
                      moe_z_loss_coeff=1e-3, **RECOMPUTE[mode])
    model = build_coe_gpt_model(cfg, pg_collection=pg, vocab_size=VOCAB, max_sequence_length=SEQ)
    calls = []
    for layer in model.decoder.layers:
        layer.mlp.register_forward_hook(lambda *_: calls.append(1))
    clear_aux_losses_tracker()
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batch (DP=2 for attention)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    position_ids = torch.arange(SEQ).expand(BATCH, -1)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    loss = model(tokens, position_ids, mask, labels=torch.roll(tokens, -1, 1)).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    loads = torch.stack([layer.mlp.tokens_per_expert_per_pass.clone()
                         for layer in model.decoder.layers])
    tracker = {k: v["values"].clone() for k, v in get_moe_layer_wise_logging_tracker().items()}
    destroy_parallel()
    return loss.detach(), grads, loads, tracker, len(calls)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["uniform", "block"])
def test_full_recompute_is_bit_identical_at_c2_ep2(mode):
    plain = run_distributed(_run, 2, timeout=240, mode="none")
    recomputed = run_distributed(_run, 2, timeout=240, mode=mode)
    for (loss_a, grads_a, loads_a, tracker_a, calls_a), \
            (loss_b, grads_b, loads_b, tracker_b, calls_b) in zip(plain, recomputed):
        assert (calls_a, calls_b) == (2, 4)  # 2 CoE layers; each run again in the backward
        assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name
        # routing counted once per step (not again in the recompute): C x tokens x topk per layer
        assert torch.equal(loads_a, loads_b)
        assert loads_a.sum(dim=(1, 2)).tolist() == [2 * BATCH * SEQ * 2] * 2
        # aux and z losses recorded once per (layer, pass)
        assert tracker_a.keys() == tracker_b.keys() and "z_loss_pass2" in tracker_a
        for name in tracker_a:
            assert torch.equal(tracker_a[name], tracker_b[name]), name


def test_recompute_options_follow_megatron_lm():
    base = ["--config", "examples/tiny/coe2_cpu.yaml"]
    a = parse_args(base + ["--recompute-granularity", "full", "--recompute-method", "block",
                           "--recompute-num-layers", "1"])
    assert (a.recompute_granularity, a.recompute_method, a.recompute_num_layers) == \
        ("full", "block", 1)
    assert parse_args(base + ["--recompute-activations"]).recompute_granularity == "selective"
    assert parse_args(base + ["--recompute-modules", "moe"]).recompute_granularity == "selective"
    defaults = parse_args(base)
    assert (defaults.recompute_granularity, defaults.recompute_method,
            defaults.recompute_num_layers) == (None, None, None)  # Megatron-LM's defaults
    for bad, flag in ((["--recompute-granularity", "full"], "--recompute-granularity"),
                      (["--recompute-method", "uniform"], "--recompute-method"),
                      (["--recompute-granularity", "full", "--recompute-method", "uniform",
                        "--recompute-num-layers", "1", "--recompute-modules", "moe"],
                       "--recompute-modules")):
        with pytest.raises(OptionError, match=flag):
            parse_args(base + bad)
