"""The trainer as it saved checkpoints before it followed Megatron-LM's optimizer and scheduler
layout (tests of the reader for that older form).

``python -m megatron_coe.testing.old_checkpoint <trainer arguments>`` runs
``megatron_coe.train`` with the older checkpoint form restored:

* routed experts always in their own distributed optimizer (two chained optimizers at EP = 1);
* the LR/WD scheduler in iterations (lengths in optimizer steps, stepped by 1 per iteration);
* a one-pass layer's router saved under ``mlp.routers.0``;
* no ``scheduler_unit`` in ``coe_checkpoint.json``.

Everything else is the current trainer.
"""

from __future__ import annotations

import sys


def install() -> None:
    from megatron_coe import checkpointing
    from megatron_coe.training import options, setup
    from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer

    def mark_routed_experts(model) -> None:
        for name, param in model.named_parameters():
            if ".experts." in f".{name}":
                param.allreduce = False

    def build_scheduler(args, optimizer):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        decay = args.lr_decay_iters or args.train_iters
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
            lr_warmup_steps=options.lr_lengths(args)[0], lr_decay_steps=decay,
            lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
            end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
            wsd_decay_steps=args.lr_wsd_decay_iters, lr_wsd_decay_style=args.lr_wsd_decay_style)
        step = scheduler.step
        # the trainer steps by the global batch (samples); the old scheduler counted iterations
        scheduler.step = lambda increment: step(increment=increment // args.global_batch_size)
        return scheduler

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return super(ChainOfExpertsLayer, self).sharded_state_dict(prefix, sharded_offsets,
                                                                   metadata)

    save = checkpointing.save

    def save_without_unit(root, iteration, write, meta):
        if meta is not None:
            meta.pop("scheduler_unit", None)
        return save(root, iteration, write, meta)

    setup.mark_routed_experts = mark_routed_experts
    setup.build_scheduler = build_scheduler
    ChainOfExpertsLayer.sharded_state_dict = sharded_state_dict
    checkpointing.save = save_without_unit


if __name__ == "__main__":  # dist_checkpointing spawns a process that imports __main__
    install()
    from megatron_coe.train import main

    sys.exit(main(sys.argv[1:]))
