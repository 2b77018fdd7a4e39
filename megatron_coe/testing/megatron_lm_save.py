"""Megatron-LM's own checkpointing on a standard MoE GPT, for the interoperability tests.

Needs the environment with ``megatron.training`` (megatron-core >= 0.17); one CPU process, gloo.
Megatron-LM's arguments come from its own parser and ``validate_args``; the model is the one
Megatron-LM's ``gpt_builder`` builds for ``--transformer-impl local`` (``GPTModel`` +
``get_gpt_layer_local_spec`` with MoE), wrapped in Megatron-Core's DDP, with Megatron-LM's
optimizer (``get_megatron_optimizer_config`` + ``get_megatron_optimizer``: one optimizer at EP
= 1) and scheduler (``get_optimizer_param_scheduler``: in samples).

``python -m megatron_coe.testing.megatron_lm_save DIR``
    takes two optimizer steps on random tokens and saves iteration 3 with
    ``megatron.training.checkpointing.save_checkpoint`` into ``DIR``, then writes
    ``DIR/reference.json``: the validation loss of that model on the batch this trainer
    validates on (``--mock-data --vocab-size 256 --seed 1234 --eval-iters 1
    --global-batch-size 8 --micro-batch-size 2 --seq-length 32``), computed as the trainer does
    (token-weighted mean, micro-batch sums in float32).

``python -m megatron_coe.testing.megatron_lm_save --train OUT.json --train-iters N
[--load DIR] [--save DIR --save-at K] [--eval-iters E]``
    Megatron-LM's training of the same model on this trainer's ``--mock-data`` batches
    (``--seed 1234``; embeddings tied, as this trainer's and Megatron-LM's default): ``--load``
    restores a checkpoint with Megatron-LM's ``load_checkpoint``
    (strict, with optimizer, scheduler and RNG states: no ``--no-load-*``), then each step is
    what Megatron-LM's ``train_step`` does (Megatron-Core's schedule, ``optimizer.step()``,
    ``opt_param_scheduler.step(increment=global batch)``), with this trainer's loss function and
    loss reduction, so that the losses compare bit for bit with this trainer's metrics. Writes
    ``{"iteration": loaded iteration, "valid_loss": after loading (E > 0), "train": {iteration:
    lm loss}, "rng": {...}}``; ``--save-at K`` saves iteration K with Megatron-LM's
    ``save_checkpoint`` and goes on (the uninterrupted run).

Megatron-Core assumes CUDA in a few places; ``install_cpu_compat`` (this project's stand-ins)
is all it takes for Megatron-LM's save and load to run on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from functools import partial

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
         "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32 "
         "--moe-token-dispatcher-type alltoall --normalization RMSNorm --disable-bias-linear "
         "--position-embedding-type rope "
         "--hidden-dropout 0 --attention-dropout 0 --seq-length 32 --max-position-embeddings 32 "
         "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 3e-3 "
         "--lr-decay-style cosine --min-lr 0 --use-distributed-optimizer --transformer-impl local "
         "--use-cpu-initialization --no-gradient-accumulation-fusion --no-masked-softmax-fusion "
         "--no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm --ckpt-format torch_dist "
         "--dist-ckpt-optim-fully-reshardable --save-interval 1 --tokenizer-type NullTokenizer "
         "--vocab-size 255 --distributed-backend gloo --seed 1234").split()
ITERATION, VOCAB, SEQ = 3, 256, 32


def _init_process_group() -> None:
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    from megatron_coe.compat import install_cpu_compat

    install_cpu_compat()
    torch.distributed.init_process_group("gloo")


def build(extra: list):
    """Megatron-LM's (args, model, ddp, optimizer, scheduler, config) for ``FLAGS + extra``."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.num_microbatches_calculator import init_num_microbatches_calculator
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.training import global_vars
    from megatron.training.arguments import (add_megatron_arguments,
                                             core_transformer_config_from_args, validate_args)
    from megatron.training.training import (get_megatron_ddp_config,
                                            get_megatron_optimizer_config,
                                            get_optimizer_param_scheduler)

    from megatron_coe.compat import cuda_device_redirect

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(FLAGS + extra)
    args.rank, args.world_size = 0, 1
    args = validate_args(args)
    args.padded_vocab_size = VOCAB
    global_vars.set_args(args)
    init_num_microbatches_calculator(0, None, args.global_batch_size, args.micro_batch_size, 1)
    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    random.seed(args.seed)
    config = core_transformer_config_from_args(args)
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=args.num_experts,
                                                      moe_grouped_gemm=False),
                     vocab_size=VOCAB, max_sequence_length=SEQ,
                     share_embeddings_and_output_weights=(
                         not args.untie_embeddings_and_output_weights),
                     position_embedding_type="rope")
    with cuda_device_redirect():
        ddp = DDP(config, get_megatron_ddp_config(args), model)
        opt_config, overrides = get_megatron_optimizer_config(args)
        opt = get_megatron_optimizer(opt_config, [ddp], config_overrides=overrides)
        sched = get_optimizer_param_scheduler(opt)
    from megatron.core.distributed import finalize_model_grads

    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = opt.scale_loss
    torch.manual_seed(args.seed)
    return args, model, ddp, opt, sched, config


def _mask():
    import torch

    return torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)


def valid_loss(model, args, eval_iters: int = 1) -> float:
    """The validation loss as this trainer computes it on its first ``eval_iters`` validation
    global batches."""
    import torch

    from megatron_coe.training.data import MockDataset

    valid = MockDataset(eval_iters * args.global_batch_size, SEQ, VOCAB, args.seed + 1)
    mask = _mask()
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(valid), args.micro_batch_size):
            items = [valid[i] for i in range(start, start + args.micro_batch_size)]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            out = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
            m = batch["loss_mask"].view(-1).float()
            total += torch.stack([torch.sum(out.float().view(-1) * m), m.sum()]).double()
    model.train()
    return (total[0] / total[1]).item()


def main(save_dir: str) -> int:
    """Two steps on random tokens, Megatron-LM's save of iteration 3, its validation loss."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch

    _init_process_group()
    from megatron.training.checkpointing import save_checkpoint

    from megatron_coe.compat import cuda_device_redirect

    args, model, ddp, opt, sched, _ = build(["--save", save_dir,
                                            "--untie-embeddings-and-output-weights"])
    mask = _mask()
    with cuda_device_redirect():
        gen = torch.Generator().manual_seed(0)
        for _ in range(ITERATION - 1):  # two steps: the optimizer has state
            ddp.zero_grad_buffer()
            opt.zero_grad()
            tokens = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
            loss = ddp(tokens, torch.arange(SEQ).expand(2, -1), mask, labels=tokens).mean()
            loss.backward()
            ddp.finish_grad_sync()
            opt.step()
            sched.step(increment=args.global_batch_size)
        save_checkpoint(ITERATION, [ddp], opt, sched, 1.0e9)
    with open(os.path.join(save_dir, "reference.json"), "w") as f:
        json.dump({"iteration": ITERATION, "valid_loss": valid_loss(model, args)}, f)
    torch.distributed.destroy_process_group()
    return 0


def _rng_summary() -> dict:
    """What the RNG states are now (to compare with the ones a checkpoint saved)."""
    import numpy as np
    import torch

    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    def philox_seed(state):  # a CUDA generator's state: seed, offset (int64 each)
        return int.from_bytes(bytes(state[:8].tolist()), "little") if state.numel() == 16 else None

    return {"random": repr(random.getstate()[1][:4]), "numpy": int(np.random.get_state()[2]),
            "numpy_key": [int(v) for v in np.random.get_state()[1][:4]],
            "torch": torch.get_rng_state()[:16].tolist(),
            "tracker_seeds": {name: philox_seed(state)
                              for name, state in get_cuda_rng_tracker().get_states().items()}}


def train(out: str, train_iters: int, load, save, save_at, eval_iters: int) -> int:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.training.checkpointing import load_checkpoint, save_checkpoint

    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.training import metrics
    from megatron_coe.training.data import MockDataset, micro_batches
    from megatron_coe.training.trainer import loss_func

    _init_process_group()
    extra = ["--train-iters", str(train_iters), "--lr-decay-iters", str(train_iters)]
    if load:
        extra += ["--load", load]
    if save:
        extra += ["--save", save]
    args, model, ddp, opt, sched, _ = build(extra)
    result = {"iteration": 0, "train": {}}
    iteration = 0
    if load:
        from megatron_coe.compat.optimizer_state import (adam_step_tolerant_load,
                                                         ensure_optimizer_state)

        # torch's AdamW (no Apex/TE on CPU) under Megatron-Core's DistributedOptimizer: the
        # project's CPU stand-ins, as the trainer uses them (compat.optimizer_state)
        ensure_optimizer_state(opt)
        with cuda_device_redirect(), adam_step_tolerant_load(opt):
            iteration, _ = load_checkpoint([ddp], opt, sched, strict=True)
        result.update(iteration=iteration, rng=_rng_summary(),
                      lr=opt.param_groups[0]["lr"], scheduler=sched.state_dict())
        if eval_iters:
            result["valid_loss"] = valid_loss(model, args, eval_iters)
    gbs, mbs = args.global_batch_size, args.micro_batch_size
    train_ds = MockDataset(train_iters * gbs, SEQ, VOCAB, args.seed)
    batches = micro_batches(train_ds, mbs, iteration * gbs, 0, 1, 0)
    mask = _mask()

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    forward_backward = get_forward_backward_func()
    num_microbatches = gbs // mbs
    while iteration < train_iters:
        with cuda_device_redirect():  # Megatron-LM's train_step
            ddp.zero_grad_buffer()
            opt.zero_grad()
            reports = forward_backward(forward_step_func=forward_step, data_iterator=batches,
                                       model=[ddp], num_microbatches=num_microbatches,
                                       seq_length=SEQ, micro_batch_size=mbs, forward_only=False)
            ok, _, _ = opt.step()
            assert ok
            sched.step(increment=num_microbatches * mbs * 1)
        iteration += 1
        args.consumed_train_samples += num_microbatches * mbs * 1  # Megatron-LM's train loop
        result["train"][iteration], _ = metrics.reduce_lm_loss(reports)
        if save and iteration == save_at:
            with cuda_device_redirect():
                save_checkpoint(iteration, [ddp], opt, sched, 1.0e9)
    with open(out, "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    if sys.argv[1] != "--train":
        sys.exit(main(sys.argv[1]))
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--train-iters", type=int, required=True)
    p.add_argument("--load")
    p.add_argument("--save")
    p.add_argument("--save-at", type=int)
    p.add_argument("--eval-iters", type=int, default=0)
    a = p.parse_args()
    sys.exit(train(a.train, a.train_iters, a.load, a.save, a.save_at, a.eval_iters))
