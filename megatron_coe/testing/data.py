"""Small real datasets for tests: the first problems of the bundled GSM8K, tokenized."""

from __future__ import annotations

import gzip
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def gsm8k_subset(root, num_docs: int, vocab_size: int) -> str:
    """Preprocess the first ``num_docs`` GSM8K training problems (question + answer) into an
    indexed dataset under ``root`` with a BPE of ``vocab_size`` trained on them; returns the
    prefix (``<prefix>.bin/.idx/.meta.json/.tokenizer.json``)."""
    from megatron_coe.data import preprocess

    root = Path(root)
    src = root / "train.jsonl"
    with gzip.open(REPO / "data/gsm8k/train.jsonl.gz", "rt") as f, open(src, "w") as out:
        for _, line in zip(range(num_docs), f):
            out.write(line)
    prefix = str(root / "gsm8k")
    preprocess.preprocess([str(src)], prefix, json_keys=["question", "answer"],
                          vocab_size=vocab_size, log=lambda *a: None)
    return prefix
