#!/usr/bin/env python
"""Export a trainer checkpoint (any TP / EP / PP layout) to a Hugging Face model directory.

Thin CLI over ``megatron_coe.conversion.export`` (see its docstring for the output layout).

Examples:
    # the newest checkpoint of a run; tokenizer taken from the run's data prefix
    python tools/convert_to_hf.py --load runs/quickstart/checkpoints --save hf/coe2

    # then, in Python:
    #   model = AutoModelForCausalLM.from_pretrained("hf/coe2", trust_remote_code=True)
    #   tok = AutoTokenizer.from_pretrained("hf/coe2", trust_remote_code=True)
    # (trust_remote_code for the tokenizer too: without it transformers reads config.json with
    # its generic config class, which cannot parse a YaRN rope_scaling)

    # a standard MoE (C=1, MLA, inner residual off, outer on, pre-softmax routing) for stock
    # transformers DeepseekV2ForCausalLM (no remote code):
    python tools/convert_to_hf.py --load ckpt/iter_0001000 --save hf/moe --format deepseek_v2

Formats: ``coe`` (model_type coe_deepseekv2 for MLA, coe_gpt for standard attention, with
configuration_coe.py / modeling_coe.py), ``deepseek_v2`` (stock transformers), ``auto`` (default:
deepseek_v2 when that is exact, else coe).

The output directory: everything (checkpoint, tokenizer, options, --save) is checked before
anything is written; the export is written into a temporary directory beside --save and renamed
into place, so a failed or interrupted export leaves --save as it was. Each export records the
files it wrote in coe_export.json. --save may be new, empty, or a previous export (then only the
files that export wrote are replaced; other files are kept). Any other non-empty directory is
refused unless --overwrite: then the files the export writes (by name) and the Hugging Face
weight files transformers would load instead (model*.safetensors, pytorch_model*.bin and their
index) are replaced, and everything else is kept. Files are written with mode 0644 (umask 022).
Errors are one line on stderr, exit status 2.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_coe.envcheck import require_environment  # noqa: E402  (one line, no traceback,
require_environment()  # noqa: E402                    outside the project's environment)

from megatron_coe.cli import OneLineParser, one_line  # noqa: E402

PROG = "convert_to_hf"  # the prefix of every error line

def main(argv=None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True,
                        help="checkpoint: a run's --save directory (newest iteration) or an iter_NNNNNNN directory")
    parser.add_argument("--save", required=True, help="output Hugging Face model directory")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json (file or directory); default: the training run's tokenizer")
    parser.add_argument("--format", default="auto", choices=["auto", "coe", "deepseek_v2", "deepseek_v3", "qwen3_moe", "mixtral"],
                        help="output format (default: auto)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default: 5GB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow a non-empty --save that is not a previous export: replace its model "
                             "files (the ones this export writes, and model*.safetensors / "
                             "pytorch_model*.bin weights); other files are kept")
    args = parser.parse_args(argv)

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import signal
    import warnings

    # SIGTERM unwinds like Ctrl-C, so the temporary export directory is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
    from megatron_coe.conversion.export import export_checkpoint
    from megatron_coe.conversion.hf_config import ConversionError

    try:
        result = export_checkpoint(args.load, args.save, tokenizer=args.tokenizer, fmt=args.format,
                                   dtype=args.dtype, max_shard_size=args.max_shard_size,
                                   show_progress=not args.no_progress, overwrite=args.overwrite)
    except ConversionError as e:
        print(f"convert_to_hf: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"convert_to_hf: error: {e}", file=sys.stderr)
        return 2
    load_hint = "" if result.format in ("deepseek_v2", "deepseek_v3", "qwen3_moe", "mixtral") else ", trust_remote_code=True"
    print(f"wrote {result.path} (format {result.format}, {result.num_tensors} tensors, "
          f"{result.total_bytes / 1e6:.1f} MB, {result.seconds:.1f} s); load with "
          f"AutoModelForCausalLM.from_pretrained({result.path!r}{load_hint}) (and "
          f"AutoTokenizer.from_pretrained({result.path!r}{load_hint}))")
    return 0

if __name__ == "__main__":  # required: dist_checkpointing's writer spawns a process importing __main__
    sys.exit(main())
