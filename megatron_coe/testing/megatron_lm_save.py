"""A checkpoint written by Megatron-LM's own ``save_checkpoint`` for a standard MoE GPT (tests).

``python -m megatron_coe.testing.megatron_lm_save DIR`` (the environment with
``megatron.training``, megatron-core >= 0.17; one CPU process, gloo) builds Megatron-LM's
arguments with its own parser and ``validate_args``, the model Megatron-LM's ``gpt_builder``
builds for ``--transformer-impl local`` (``GPTModel`` + ``get_gpt_layer_local_spec`` with MoE),
Megatron-Core's DDP, distributed optimizer and Megatron-LM's scheduler, takes two optimizer
steps on random tokens and saves iteration 3 with ``megatron.training.checkpointing
.save_checkpoint`` into ``DIR``. It then writes ``DIR/reference.json``: the validation loss of
that model on the batch this trainer validates on (``--mock-data --vocab-size 256 --seed 1234
--eval-iters 1 --global-batch-size 8 --micro-batch-size 2 --seq-length 32``), computed as the
trainer does (token-weighted mean, micro-batch sums in float32).

Megatron-Core assumes CUDA in a few places; ``install_cpu_compat`` (this project's stand-ins) is
all it takes for Megatron-LM's save to run on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FLAGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --ffn-hidden-size 64 "
         "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 32 "
         "--moe-token-dispatcher-type alltoall --normalization RMSNorm --disable-bias-linear "
         "--untie-embeddings-and-output-weights --position-embedding-type rope "
         "--hidden-dropout 0 --attention-dropout 0 --seq-length 32 --max-position-embeddings 32 "
         "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 3e-3 "
         "--lr-decay-style cosine --min-lr 0 --use-distributed-optimizer --transformer-impl local "
         "--use-cpu-initialization --no-gradient-accumulation-fusion --no-masked-softmax-fusion "
         "--no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm --ckpt-format torch_dist "
         "--dist-ckpt-optim-fully-reshardable --save-interval 1 --tokenizer-type NullTokenizer "
         "--vocab-size 255 --distributed-backend gloo --seed 1234").split()
ITERATION, VOCAB, SEQ = 3, 256, 32


def main(save_dir: str) -> int:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import socket

    import torch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    from megatron_coe.compat import cuda_device_redirect, install_cpu_compat

    install_cpu_compat()
    torch.distributed.init_process_group("gloo")
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel as DDP
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.training import global_vars
    from megatron.training.arguments import (add_megatron_arguments,
                                             core_transformer_config_from_args, validate_args)
    from megatron.training.checkpointing import save_checkpoint
    from megatron.training.training import get_optimizer_param_scheduler

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    args = parser.parse_args(FLAGS + ["--save", save_dir])
    args.rank, args.world_size = 0, 1
    args = validate_args(args)
    args.padded_vocab_size = VOCAB
    global_vars.set_args(args)
    ps.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    config = core_transformer_config_from_args(args)
    model = GPTModel(config, get_gpt_layer_local_spec(num_experts=args.num_experts,
                                                      moe_grouped_gemm=False),
                     vocab_size=VOCAB, max_sequence_length=SEQ,
                     share_embeddings_and_output_weights=False, position_embedding_type="rope")
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    with cuda_device_redirect():
        ddp = DDP(config, DistributedDataParallelConfig(use_distributed_optimizer=True), model)
        opt = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=args.lr, min_lr=args.min_lr, use_distributed_optimizer=True),
            [ddp])
        sched = get_optimizer_param_scheduler(opt)
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

    # the validation loss as this trainer computes it on its first validation global batch
    from megatron_coe.training.data import MockDataset

    valid = MockDataset(args.global_batch_size, SEQ, VOCAB, args.seed + 1)
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(valid), args.micro_batch_size):
            items = [valid[i] for i in range(start, start + args.micro_batch_size)]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            out = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
            m = batch["loss_mask"].view(-1).float()
            total += torch.stack([torch.sum(out.float().view(-1) * m), m.sum()]).double()
    with open(os.path.join(save_dir, "reference.json"), "w") as f:
        json.dump({"iteration": ITERATION, "valid_loss": (total[0] / total[1]).item()}, f)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
