"""The trainer's own layout, model and (optionally) optimizer and scheduler, built in-process from
trainer flags, for tests that inspect them (the process group must already exist)."""

from __future__ import annotations

from typing import NamedTuple, Optional


class TrainerParts(NamedTuple):
    args: object
    layout: object
    vocab: int
    model: list
    optimizer: Optional[object]
    scheduler: Optional[object]


def build_trainer_parts(argv: list, world_size: int, optimizer: bool = True) -> TrainerParts:
    """``argv`` (plus the values the tests were written with, ``train_args.explicit``) parsed and
    built by ``training.setup`` exactly as the trainer does: layout, model config, process groups,
    padded vocabulary, ``[DDP(GPTModel)]``, then optimizer and scheduler unless ``optimizer`` is
    False."""
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training import options, setup

    args = options.parse_args(explicit(argv))
    layout = setup.check_layout(args, world_size)
    config = setup.build_model_config(args)
    pg = initialize_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                             args.expert_model_parallel_size, args.expert_tensor_parallel_size,
                             args.seed)
    vocab = setup.padded_vocab_size(args.vocab_size, args)
    model = setup.build_model(args, config, vocab, pg)
    opt = setup.build_optimizer(args, model) if optimizer else None
    sched = setup.build_scheduler(args, opt) if optimizer else None
    return TrainerParts(args, layout, vocab, model, opt, sched)
