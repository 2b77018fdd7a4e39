#!/usr/bin/env python
"""Memory per rank of a training run, from its options alone: no data, no process group, no GPU.

    python tools/estimate_memory.py --config examples/coe2_4_64.yaml --bf16 \\
        --expert-model-parallel-size 8 --world-size 8 --vocab-size 32000
    python tools/estimate_memory.py --config my.yaml --nodes 2 --gpus-per-node 8 \\
        --pipeline-model-parallel-size 2 --expert-model-parallel-size 8 --bf16

Takes the trainer's flags and ``--config`` (``coe-train --help``) plus the cluster: ``--world-size
N`` or ``--nodes N --gpus-per-node G``. The vocabulary: ``--vocab-size V`` (the tokenizer's; it is
padded as the trainer pads it), else the tokenizer next to the ``--data-path`` of the config
(``--tokenizer-model``). Prints a markdown table, one row per pipeline stage (every TP/EP/DP rank
of a stage holds the same): parameters, gradients and optimizer state exactly as the trainer
builds them (Megatron-Core DDP buffers with the distributed optimizer), activations as an
estimate (``megatron_coe/training/memory.py`` says what is counted). Activations assume
Transformer Engine's fused attention unless ``--transformer-impl local``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_coe.envcheck import require_environment  # noqa: E402  (one line, no traceback,
require_environment()  # noqa: E402                    outside the project's environment)

import argparse  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--world-size", type=int, help="processes (GPUs) of the run")
    p.add_argument("--nodes", type=int, help="nodes (with --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (with --nodes)")
    ours, rest = p.parse_known_args(argv)
    if ours.world_size is None:
        if ours.nodes is None or ours.gpus_per_node is None:
            p.error("give --world-size N or --nodes N --gpus-per-node G")
        ours.world_size = ours.nodes * ours.gpus_per_node
    return ours, rest


def main(argv=None) -> int:
    from megatron_coe.training import data, memory, options, setup
    from megatron_coe.training.errors import SetupError

    ours, rest = parse(sys.argv[1:] if argv is None else argv)
    given = {a.split("=", 1)[0] for a in rest}
    if "--vocab-size" in given and not {"--data-path", "--mock-data"} & given:
        rest = rest + ["--mock-data"]  # the vocabulary is given: no data needed
    try:
        args = options.parse_args(rest)
        if args.global_batch_size is None:
            mp = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
            args.global_batch_size = args.micro_batch_size * max(1, ours.world_size // mp)
        vocab = args.vocab_size if args.mock_data else data.load_tokenizer(args).vocab_size
        vocab = setup.padded_vocab_size(vocab, args)
        ranks = memory.estimate(args, ours.world_size, vocab)
    except (options.OptionError, SetupError, OSError, ValueError) as e:
        print(f"estimate_memory: {e}", file=sys.stderr)
        return 2
    print(memory.table(ranks, args, ours.world_size))
    print()
    print(memory.startup_line(ranks, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
