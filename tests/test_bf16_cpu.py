"""bf16 mixed precision on CPU: Megatron-Core's ``Float16Module``, fp32 main parameters and
gradients in the distributed optimizer, exact routing counts, bit-exact save/resume.

Nothing here needs a CPU with native bf16 matrix multiplication (torch computes bf16 on any CPU,
only more slowly): the models are tiny (hidden 32, seq 32).

* unit: a CoE layer wrapped in ``Float16Module`` keeps every count buffer (its own
  ``tokens_per_expert_per_pass``, the routers' ``local_tokens_per_expert``, ``expert_bias``,
  ``global_tokens_per_expert``, ``ga_steps``) in float32, and after 40 micro-batches its counts
  equal those of the same layer run in fp32 on the same batches, exactly (the inputs make every
  routing decision unambiguous, so both layers route alike; the test checks that they did). The
  counts pass 256, where a bf16 counter stops counting exactly, and the test shows that a bf16
  counter fed the same per-micro-batch counts would be wrong. ``.half()`` and a device move (the
  meta device standing in for ``.cuda()``) keep them float32 as well, and move them.
* trainer: ``--bf16`` with EP=2 on 2 gloo processes (the trainer's own code, run in forked
  ranks): ``Float16Module`` inside DDP, bf16 parameters, fp32 main parameters and main
  gradients, count buffers exact after 24 micro-batches per rank (equal to the routing decisions
  the routers returned, counted in int64), and a run resumed from its step-6 checkpoint
  reproduces the uninterrupted run's losses and gradient norms of steps 7-12 bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_coe.testing.distributed import run_distributed

from test_train import TINY, data_args, gsm8k  # noqa: F401 - gsm8k is a fixture

SEQ, BATCH, HIDDEN, EXPERTS, TOPK = 32, 2, 32, 8, 2
COUNT_BUFFERS = ("tokens_per_expert_per_pass", "local_tokens_per_expert", "expert_bias",
                 "global_tokens_per_expert", "ga_steps")


# --------------------------------------------------------------------------- unit: one CoE layer
def _unambiguous_batches(num: int, generator) -> list:
    """``[s, b, h]`` inputs whose top-2 experts are clear for every pass: each token is
    ``4 e_a + 2 e_b`` in the first ``EXPERTS`` dimensions (a != b random) plus small noise in the
    others, so router rows that are one-hot (see ``_set_routers``) score it 4, 2 and 0."""
    batches = []
    for _ in range(num):
        tokens = SEQ * BATCH
        first = torch.randint(0, EXPERTS, (tokens,), generator=generator)
        second = (first + torch.randint(1, EXPERTS, (tokens,), generator=generator)) % EXPERTS
        x = torch.zeros(tokens, HIDDEN)
        x[torch.arange(tokens), first] = 4.0
        x[torch.arange(tokens), second] = 2.0
        x[:, EXPERTS:] = 0.1 * torch.randn(tokens, HIDDEN - EXPERTS, generator=generator)
        batches.append(x.view(SEQ, BATCH, HIDDEN))
    return batches


def _set_routers(layer) -> None:
    """Router of pass t scores expert e by hidden dimension (e + 3t) mod E (one-hot rows), so
    the passes route differently; expert weights shrunk so that pass 2's input stays close to
    pass 1's (its routing stays unambiguous)."""
    with torch.no_grad():
        for t, router in enumerate(layer.routers):
            weight = torch.zeros(EXPERTS, HIDDEN)
            weight[torch.arange(EXPERTS), (torch.arange(EXPERTS) + 3 * t) % EXPERTS] = 1.0
            router.weight.copy_(weight)
        for name, p in layer.named_parameters():
            if "experts" in name:
                p.mul_(0.05)


def _record_routing(layer) -> list:
    """Every routing map the layer's routers return under grad (what the layer counts)."""
    seen = []

    def hook(router, args, output):
        if torch.is_grad_enabled():
            seen.append(output[1].detach().clone())

    for router in layer.routers:
        router.register_forward_hook(hook)
    return seen


def _layer_counts_worker(rank, world_size, micro_batches):
    from megatron.core.transformer.module import Float16Module

    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.testing.configs import tiny_config

    pg = initialize_parallel(seed=7)
    common = dict(num_layers=1, hidden_size=HIDDEN, num_moe_experts=EXPERTS,
                  moe_router_topk=TOPK, coe_iterations=2, moe_router_score_function="sigmoid",
                  moe_router_enable_expert_bias=True,
                  moe_router_load_balancing_type="global_aux_loss", moe_aux_loss_coeff=1e-2)
    fp32_config = tiny_config(**common)
    bf16_config = tiny_config(bf16=True, params_dtype=torch.bfloat16,
                              pipeline_dtype=torch.bfloat16, **common)
    fp32_model, bf16_model = (
        build_coe_gpt_model(config, pg_collection=pg, vocab_size=64, max_sequence_length=SEQ)
        for config in (fp32_config, bf16_config))
    fp32_layer = fp32_model.decoder.layers[0].mlp
    _set_routers(fp32_layer)
    bf16_model.load_state_dict(fp32_model.state_dict())  # the same weights, rounded to bf16
    bf16_layer = bf16_model.decoder.layers[0].mlp
    wrapped = Float16Module(bf16_config, bf16_layer)  # module.bfloat16(), as the trainer does

    dtypes = {name: buf.dtype for name, buf in wrapped.named_buffers()}
    param_dtypes = {p.dtype for p in wrapped.parameters()}

    seen = {"fp32": _record_routing(fp32_layer), "bf16": _record_routing(bf16_layer)}
    gen = torch.Generator().manual_seed(11)
    for x in _unambiguous_batches(micro_batches, gen):
        out, _ = fp32_layer(x.clone().requires_grad_(True))
        out.float().sum().backward()
        out, _ = wrapped(x.clone().requires_grad_(True))  # Float16Module: bf16 in, fp32 out
        assert out.dtype == torch.float32
        out.sum().backward()

    def per_pass(maps):  # calls alternate pass 1, pass 2 (two routers)
        return torch.stack([torch.stack(maps[t::2]).sum(dim=1, dtype=torch.int64)
                            for t in range(2)])  # [C, micro_batches, E]

    increments = {k: per_pass(v) for k, v in seen.items()}
    counts = {"fp32": fp32_layer.tokens_per_expert_per_pass.clone(),
              "bf16": bf16_layer.tokens_per_expert_per_pass.clone()}
    router_counts = {"fp32": [r.local_tokens_per_expert.clone() for r in fp32_layer.routers],
                     "bf16": [r.local_tokens_per_expert.clone() for r in bf16_layer.routers]}
    # fp16 (.half()) and a device move (what .cuda() is on a GPU; here the meta device) keep the
    # count buffers float32 too, and move them
    fp32_model.half()
    half = {p.dtype for p in fp32_model.parameters()}, {b.dtype for b in fp32_model.buffers()}
    bf16_model.to(device="meta")
    moved = {(b.device.type, b.dtype) for b in bf16_model.buffers()}
    moved_params = {p.device.type for p in bf16_model.parameters()}
    return dict(
        half=half, moved=moved, moved_params=moved_params,
        dtypes=dtypes, param_dtypes=param_dtypes,
        same_decisions=all(torch.equal(a, b) for a, b in zip(seen["fp32"], seen["bf16"])),
        calls=(len(seen["fp32"]), len(seen["bf16"])),
        increments=increments["bf16"],
        counts=counts,
        router_counts=router_counts,
    )


@pytest.mark.timeout(180)
def test_float16module_keeps_count_buffers_fp32_and_counts_equal_fp32_layer():
    micro_batches = 40
    (r,) = run_distributed(_layer_counts_worker, 1, micro_batches=micro_batches)
    assert r["param_dtypes"] == {torch.bfloat16}
    held = {name.rsplit(".", 1)[-1] for name in r["dtypes"]}
    assert set(COUNT_BUFFERS) <= held, held  # every count buffer exists in this configuration
    assert all(dtype == torch.float32 for dtype in r["dtypes"].values()), r["dtypes"]
    assert r["half"] == ({torch.float16}, {torch.float32})
    assert r["moved"] == {("meta", torch.float32)}
    assert r["moved_params"] == {"meta"}

    # both layers made the same decisions, so an exact counter gives the same counts
    assert r["calls"] == (2 * micro_batches, 2 * micro_batches)
    assert r["same_decisions"], "the inputs no longer make routing unambiguous in bf16"
    exact = r["increments"].sum(dim=1)  # [C, E] int64
    assert torch.equal(r["counts"]["fp32"], exact.float())
    assert torch.equal(r["counts"]["bf16"], r["counts"]["fp32"])
    for t in range(2):
        assert torch.equal(r["router_counts"]["bf16"][t], r["router_counts"]["fp32"][t])
        assert torch.equal(r["router_counts"]["bf16"][t], exact[t].float())
    assert exact.sum().item() == 2 * micro_batches * SEQ * BATCH * TOPK

    # the test can fail: past 256 a bf16 counter fed the same increments loses tokens
    assert exact.max().item() > 512
    bf16_counter = torch.zeros(exact.shape, dtype=torch.bfloat16)
    for step in range(micro_batches):
        bf16_counter += r["increments"][:, step].to(torch.bfloat16)
    assert not torch.equal(bf16_counter.float(), exact.float())


# --------------------------------------------------------------------------- trainer: EP=2, bf16
BF16_RUN = [*TINY, "--bf16", "--expert-model-parallel-size", "2", "--train-iters", "12",
            "--log-interval", "12", "--eval-interval", "12", "--save-interval", "6"]


def _trainer_worker(rank, world_size, argv, inspect):
    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training import metrics
    from megatron_coe.training.options import parse_args
    from megatron_coe.training.trainer import Trainer, preflight
    from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer

    args = parse_args(explicit(argv))
    pre = preflight(args, world_size)
    install_cpu_compat()
    trainer = Trainer(args, pre)
    if not inspect:
        trainer.train()
        return None

    (ddp,) = trainer.model
    layers = [m for m in ddp.modules() if isinstance(m, ChainOfExpertsLayer)]
    decided = {}  # (layer, pass) -> int64 counts of the decisions the routers returned

    def hook_for(layer_number, pass_index):
        def hook(router, args, output):
            if torch.is_grad_enabled():  # what the layer counts (once per step, also recompute)
                key = (layer_number, pass_index)
                decided[key] = decided.get(key, 0) + output[1].sum(dim=0, dtype=torch.int64)
        return hook

    for layer in layers:
        for t, router in enumerate(layer.routers):
            router.register_forward_hook(hook_for(layer.layer_number, t))

    counted = []  # the count buffers just before the metrics read (and reset) them
    read = metrics.expert_load_imbalance

    def capture(model, config):
        counted.append({layer.layer_number: layer.tokens_per_expert_per_pass.clone()
                        for layer in layers})
        return read(model, config)

    metrics.expert_load_imbalance = capture
    trainer.train()
    metrics.expert_load_imbalance = read

    optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
    main_params = [p for opt in optimizers for group in opt.shard_fp32_from_float16_groups
                   for p in group]
    return dict(
        wrappers=[type(m).__name__ for m in (ddp, ddp.module, ddp.module.module)],
        param_dtypes={p.dtype for p in ddp.parameters()},
        main_grad_dtypes={p.main_grad.dtype for p in ddp.parameters()},
        main_param_dtypes={p.dtype for p in main_params},
        main_params=sum(p.numel() for p in main_params),
        local_params=sum(p.numel() for p in ddp.parameters()),
        optimizers=[type(opt).__name__ for opt in optimizers],
        buffer_dtypes={name: buf.dtype for name, buf in ddp.named_buffers()},
        counted=counted,
        decided={k: v.clone() for k, v in decided.items()},
    )


def _train_records(tb: Path) -> dict:
    out = {}
    for line in (tb / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["type"] == "train":
            out[r["iteration"]] = r
    return out


@pytest.mark.timeout(600)
def test_bf16_ep2_trainer_fp32_master_exact_counts_and_bit_exact_resume(gsm8k, tmp_path):
    full = [*BF16_RUN, *data_args(gsm8k), "--save", tmp_path / "ckpt",
            "--tensorboard-dir", tmp_path / "tb"]
    ranks = run_distributed(_trainer_worker, 2, timeout=400, argv=[str(a) for a in full],
                            inspect=True)
    for r in ranks:
        assert r["wrappers"] == ["DistributedDataParallel", "Float16Module", "GPTModel"]
        assert r["param_dtypes"] == {torch.bfloat16}
        assert r["main_grad_dtypes"] == {torch.float32}  # DDP's grad buffers
        assert r["main_param_dtypes"] == {torch.float32}
        assert set(r["optimizers"]) == {"DistributedOptimizer"}
        # the fp32 shards of the distributed optimizer cover this rank's share of the weights
        assert 0 < r["main_params"] < r["local_params"]
        counts = {n: d for n, d in r["buffer_dtypes"].items() if n.endswith(COUNT_BUFFERS)}
        assert counts and all(d == torch.float32 for d in counts.values()), r["buffer_dtypes"]

        # one read of the counters, at step 12: 12 steps x 2 micro-batches on this rank
        (counted,) = r["counted"]
        assert sorted(counted) == [1, 2] and sorted(r["decided"]) == [(l, t) for l in (1, 2)
                                                                      for t in (0, 1)]
        for (layer, t), decisions in r["decided"].items():
            assert torch.equal(counted[layer][t], decisions.float()), (layer, t)
            assert decisions.sum().item() == 12 * 2 * 2 * 32 * 2  # steps x mb x batch x seq x k
        assert max(d.max().item() for d in r["decided"].values()) > 256  # bf16 would be inexact

    resumed = [*BF16_RUN, *data_args(gsm8k), "--load", tmp_path / "ckpt" / "iter_0000006",
               "--save", tmp_path / "ckpt_resumed", "--tensorboard-dir", tmp_path / "tb_resumed"]
    run_distributed(_trainer_worker, 2, timeout=400, argv=[str(a) for a in resumed],
                    inspect=False)
    a, b = _train_records(tmp_path / "tb"), _train_records(tmp_path / "tb_resumed")
    assert sorted(a) == list(range(1, 13)) and sorted(b) == list(range(7, 13))
    for it in range(7, 13):
        assert b[it]["lm_loss"] == a[it]["lm_loss"], it
        assert b[it]["grad_norm"] == a[it]["grad_norm"], it
    assert b[12]["load_imbalance"] and a[12]["load_imbalance"]
