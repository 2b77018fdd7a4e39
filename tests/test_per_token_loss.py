"""``--calculate-per-token-loss``: Megatron-Core's loss and gradient scaling by the token count
of the whole global batch. With unequal loss-mask counts per micro-batch and per data-parallel
rank, the trainer's gradient equals the gradient of (sum of masked token losses) / (total loss
tokens) over the global batch; the default (mean per micro-batch) does not."""

import pytest
import torch

from megatron_coe.testing.distributed import run_distributed

ARGS = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
        "--moe-router-topk 2 --moe-ffn-hidden-size 32 --coe-iterations 2 --swiglu "
        "--seq-length 16 --micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --train-iters 2 "
        "--mock-data --vocab-size 64 --eval-iters 0 --hidden-dropout 0 --attention-dropout 0 "
        "--moe-router-load-balancing-type none").split()
SEQ, MBS, MICRO = 16, 2, 2  # 2 ranks (DP=2) x 2 micro-batches of 2 sequences


def _batches(rank):
    """This rank's micro-batches; the loss masks keep 3..16 tokens per sequence, unequal."""
    gen = torch.Generator().manual_seed(11)
    out = []
    for r in range(2):
        for m in range(MICRO):
            tokens = torch.randint(0, 64, (MBS, SEQ + 1), generator=gen)
            keep = torch.randint(3, SEQ + 1, (MBS,), generator=gen)
            mask = (torch.arange(SEQ)[None] < keep[:, None]).float()
            b = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                     position_ids=torch.arange(SEQ).expand(MBS, -1))
            if r == rank:
                out.append(b)
    return out, gen


def _my_shards(ddp, rank, dp):
    """The gradient shards this rank owns after the distributed optimizer's reduce-scatter
    (bucket by bucket: the rank's 1/dp of each bucket's gradient buffer)."""
    out = {}
    for i, buf in enumerate(list(ddp.buffers) + list(ddp.expert_parallel_buffers)):
        for j, bucket in enumerate(buf.buckets):
            out[f"buffer{i}.bucket{j}"] = bucket.grad_data.chunk(dp)[rank].clone()
    return out


def _worker(rank, world_size, per_token):
    from megatron_coe.compat import cuda_device_redirect, install_cpu_compat
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training.options import parse_args
    from megatron_coe.training.trainer import Trainer, preflight

    argv = ARGS + (["--calculate-per-token-loss"] if per_token else [])
    args = parse_args(explicit(argv))
    install_cpu_compat()
    trainer = Trainer(args, preflight(args, world_size))
    (ddp,) = trainer.model
    mine, _ = _batches(rank)
    everyone = _batches(0)[0] + _batches(1)[0]

    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    with cuda_device_redirect():  # as Trainer.train_step runs it (CPU stand-in)
        trainer._run_schedule(iter(mine), forward_only=False)  # + finalize_model_grads
    trained = _my_shards(ddp, rank, world_size)

    # reference: one backward of the global batch's token mean, no data-parallel reduction
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    with ddp.no_sync():
        total = sum(b["loss_mask"].sum() for b in everyone)
        loss = 0.0
        for b in everyone:
            out = ddp(b["tokens"], b["position_ids"], trainer.attention_mask, labels=b["labels"])
            loss = loss + (out.float() * b["loss_mask"]).sum()
        (loss / total).backward()
    reference = _my_shards(ddp, rank, world_size)
    return trained, reference


@pytest.mark.timeout(300)
def test_per_token_loss_gradient_equals_the_global_token_mean():
    for trained, reference in run_distributed(_worker, 2, timeout=240, per_token=True):
        for name in reference:
            torch.testing.assert_close(trained[name], reference[name], rtol=2e-5, atol=1e-7,
                                       msg=name)


@pytest.mark.timeout(300)
def test_default_loss_averages_per_micro_batch_so_it_differs():
    """The control: without the flag the same batches give another gradient (the test above
    can fail)."""
    (trained, reference), _ = run_distributed(_worker, 2, timeout=240, per_token=False)
    worst = max((trained[n] - reference[n]).abs().max().item() /
                max(reference[n].abs().max().item(), 1e-12) for n in reference)
    assert worst > 1e-2
