"""Small real datasets for tests: the first problems of the bundled GSM8K, tokenized."""

from __future__ import annotations

import gzip
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def gsm8k_subset(root, num_docs: int, vocab_size: int | None = None, split: str = "train",
                 tokenizer_model: str | None = None) -> str:
    """Preprocess the first ``num_docs`` GSM8K ``split`` problems (question + answer) into an
    indexed dataset under ``root``, with a BPE of ``vocab_size`` trained on them or the given
    ``tokenizer_model``; returns the prefix (``<prefix>.bin/.idx/.meta.json``, and
    ``.tokenizer.json`` for a trained BPE): ``root/gsm8k`` for the train split, else
    ``root/gsm8k_<split>``."""
    from megatron_coe.data import preprocess

    root = Path(root)
    src = root / f"{split}.jsonl"
    with gzip.open(REPO / f"data/gsm8k/{split}.jsonl.gz", "rt") as f, open(src, "w") as out:
        for _, line in zip(range(num_docs), f):
            out.write(line)
    prefix = str(root / ("gsm8k" if split == "train" else f"gsm8k_{split}"))
    preprocess.preprocess([str(src)], prefix, json_keys=["question", "answer"],
                          vocab_size=None if tokenizer_model else vocab_size,
                          tokenizer_model=tokenizer_model, log=lambda *a: None)
    return prefix
