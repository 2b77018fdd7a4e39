#!/usr/bin/env python
"""Routing analysis of trained CoE / MoE checkpoints (one process, CPU or one GPU).

    python tools/analyze_routing.py --load runs/quickstart/checkpoints --out runs/quickstart/routing
    python tools/analyze_routing.py --load CKPT_A CKPT_B --names a b \\
        --data data/processed/gsm8k_test_v1k --num-samples 1024 --out DIR

``--load``: a published checkpoint directory (``iter_NNNNNNN``) or a ``--save`` directory (its
newest checkpoint), any parallel layout (it is loaded at TP = PP = EP = 1). ``--data``: a held-out
data prefix tokenized with the checkpoint's tokenizer (e.g. GSM8K test, see
``data/gsm8k/README.md``); default: the validation split of the checkpoint's own training data.

Per checkpoint, in ``DIR`` (or ``DIR/<name>`` with several): ``routing.json`` (everything),
``routing.md`` (tables), ``load_histograms.png`` (expert load per layer and pass) and
``cooccurrence_heatmaps.png`` (pass-1 expert vs pass-2 expert). Definitions -- load, top-k
overlap between passes, expert chains ``(sorted S_1, sorted S_2)`` and their combinatorial space
``C(N,k)^C`` vs ``C(N,C*k)`` -- are in ``megatron_coe/analysis/routing.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_coe.envcheck import require_environment  # noqa: E402  (one line, no traceback,
require_environment()  # noqa: E402                    outside the project's environment)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", nargs="+", required=True, help="checkpoint (or --save) directories")
    p.add_argument("--names", nargs="+", help="one name per --load (default: directory names)")
    p.add_argument("--data", help="held-out data prefix (default: the checkpoint's validation split)")
    p.add_argument("--num-samples", type=int, default=512, help="sequences to evaluate")
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip a checkpoint whose routing.json exists")
    args = p.parse_args(argv)
    if args.names and len(args.names) != len(args.load):
        p.error("--names needs one name per --load")
    names = args.names or [_default_name(path) for path in args.load]
    if len(set(names)) != len(names):
        p.error(f"names must be unique: {names}")
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("note: matplotlib not installed, no PNGs (pip install -r "
                  "examples/paper/requirements.txt)", file=sys.stderr)
            plots = False

    import warnings

    for pattern in (r".*(Apex|Transformer Engine).* not installed.*", r".*full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)  # dist_checkpointing / ShardedTensor
    from megatron_coe.analysis import routing

    status = 0
    try:
        for name, path in zip(names, args.load):
            out_dir = args.out if len(args.load) == 1 else os.path.join(args.out, name)
            if args.skip_existing and os.path.exists(os.path.join(out_dir, "routing.json")):
                print(f"{name}: {out_dir}/routing.json exists, skipped", flush=True)
                continue
            try:
                r = routing.analyze_checkpoint(path, args.data, args.num_samples,
                                               args.micro_batch_size)
            except (FileNotFoundError, ValueError) as e:
                print(f"{name}: error: {e}", file=sys.stderr, flush=True)
                status = 2
                continue
            routing.write_outputs(name, r, out_dir, plots=plots)
            print(_one_line(name, r), flush=True)
    finally:
        routing.shutdown()
    return status


def _default_name(path: str) -> str:
    parts = [x for x in os.path.normpath(path).split(os.sep) if x]
    while parts and (parts[-1].startswith("iter_") or parts[-1] == "checkpoints"):
        parts.pop()
    return parts[-1] if parts else "checkpoint"


def _one_line(name: str, r: dict) -> str:
    msg = f"{name}: LM loss {r['lm_loss']:.4f} on {r['samples']} samples"
    for lname, L in r["layers"].items():
        if "pairs" in L:
            msg += (f" | {lname}: overlap {L['pairs'][0]['overlap']:.3f} "
                    f"(random {L['pairs'][0]['overlap_random']:.3f}), chains "
                    f"{L['distinct_chains']}/{L['tokens']} tokens")
        else:
            msg += f" | {lname}: sets {L['passes'][0]['distinct_sets']}/{L['tokens']} tokens"
    return msg


if __name__ == "__main__":  # required: dist_checkpointing may spawn a process importing __main__
    sys.exit(main())
