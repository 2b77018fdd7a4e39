#!/usr/bin/env python
"""Convert a Hugging Face model directory into a trainer checkpoint, optionally upcycling MoE -> CoE.

Thin CLI over ``megatron_coe.conversion.importer`` (see its docstring for the details).

Examples:
    # a CoE export, or a stock MoE (deepseek_v2, deepseek_v3, qwen3_moe, mixtral: see
    # megatron_coe/conversion/families.py) -> checkpoint saved from an EP=2 layout
    python tools/convert_from_hf.py --load hf/coe2 --save ckpt/coe2 --expert-model-parallel-size 2

    # upcycle a standard MoE (top-4) into CoE-2 with top-2 per pass (default k / C)
    python tools/convert_from_hf.py --load hf/moe --save ckpt/coe2_up --upcycle-iterations 2

    # then train from it (weights only: the trainer starts at iteration 0 with a new optimizer):
    python -m megatron_coe.train ... --coe-iterations 2 --moe-router-topk 2 --load ckpt/coe2_up

The model is built on tensor x pipeline x expert parallel gloo processes forked on this machine
(or the ranks of a torchrun job: torchrun --nproc-per-node N tools/convert_from_hf.py ...). A
dist_checkpointing checkpoint reloads under any other layout, so the layout chosen here only
matters for memory per process.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_coe.envcheck import require_environment  # noqa: E402  (one line, no traceback,
require_environment()  # noqa: E402                    outside the project's environment)

from megatron_coe.cli import OneLineParser, one_line  # noqa: E402

PROG = "convert_from_hf"  # the prefix of every error line

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value

def main(argv=None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="Hugging Face model directory")
    parser.add_argument("--save", required=True,
                        help="checkpoint root (iter_0000000 and latest_checkpointed_iteration.txt go there)")
    parser.add_argument("--tensor-model-parallel-size", type=positive_int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=positive_int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=positive_int, default=1)
    parser.add_argument("--expert-tensor-parallel-size", type=positive_int, default=None)
    parser.add_argument("--seq-length", type=positive_int, default=None,
                        help="sequence length recorded for the trainer (default: max_position_embeddings)")
    up = parser.add_argument_group("MoE -> CoE upcycling")
    up.add_argument("--upcycle-iterations", type=positive_int, default=None,
                    help="C of the CoE model to build from a standard MoE (C=1) source")
    up.add_argument("--upcycle-topk", type=positive_int, default=None,
                    help="top-k per pass (default: source top-k / C, equal compute)")
    up.add_argument("--upcycle-inner-residual", action=argparse.BooleanOptionalAction, default=True,
                    help="inner residual of the CoE model (default: on, the paper's CoE)")
    up.add_argument("--upcycle-outer-residual", action=argparse.BooleanOptionalAction, default=None,
                    help="outer residual (default: the source's, on for a standard MoE)")
    up.add_argument("--upcycle-shared-router", action="store_true",
                    help="one router for all passes (default: one per pass, each a copy of the MoE router)")
    args = parser.parse_args(argv)

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    import warnings

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")
    from megatron_coe.conversion.importer import Upcycle, import_hf
    from megatron_coe.conversion.hf_config import ConversionError

    upcycle = None
    if args.upcycle_iterations is not None:
        upcycle = Upcycle(iterations=args.upcycle_iterations, topk=args.upcycle_topk,
                          inner_residual=args.upcycle_inner_residual,
                          outer_residual=args.upcycle_outer_residual,
                          shared_router=args.upcycle_shared_router)
    elif args.upcycle_topk is not None or args.upcycle_shared_router:
        parser.error("--upcycle-* options need --upcycle-iterations")
    try:
        path = import_hf(args.load, args.save, tp=args.tensor_model_parallel_size,
                         pp=args.pipeline_model_parallel_size, ep=args.expert_model_parallel_size,
                         etp=args.expert_tensor_parallel_size, upcycle=upcycle, seq_length=args.seq_length)
    except ConversionError as e:
        print(f"convert_from_hf: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --save not writable
        print(f"convert_from_hf: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch

        if torch.distributed.is_initialized():  # torchrun mode
            from megatron_coe.parallel import destroy_parallel

            destroy_parallel()
            torch.distributed.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {path}; train from it with --load {args.save} (weights only: iteration 0, new optimizer)")
    return 0

if __name__ == "__main__":  # required: dist_checkpointing's writer spawns a process importing __main__
    sys.exit(main())
