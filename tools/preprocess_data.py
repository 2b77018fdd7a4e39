#!/usr/bin/env python
"""Tokenize a corpus into a Megatron indexed dataset (<prefix>.bin/.idx + <prefix>.meta.json).

Thin CLI over ``megatron_coe.data.preprocess`` (see its docstring for formats and outputs). The
data's tokenizer is always written beside it (<prefix>.tokenizer.json: trained here, or a copy of
--tokenizer-model), so training on --data-path <prefix> needs no --tokenizer-model. An existing
prefix is replaced only with --overwrite.

Examples:
    # GSM8K train split, training a 4096-token byte-level BPE on it
    python tools/preprocess_data.py --input data/gsm8k/train.jsonl.gz \\
        --json-keys question answer --vocab-size 4096 --output-prefix data/processed/gsm8k_train

    # test split with the same tokenizer
    python tools/preprocess_data.py --input data/gsm8k/test.jsonl.gz \\
        --json-keys question answer --output-prefix data/processed/gsm8k_test \\
        --tokenizer-model data/processed/gsm8k_train.tokenizer.json
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_coe.envcheck import require_environment  # noqa: E402  (one line, no traceback,
require_environment()  # noqa: E402                    outside the project's environment)

from megatron_coe.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
