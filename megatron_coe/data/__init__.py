"""Data side of pretraining: tokenizer, corpus preprocessing, Megatron datasets and loaders.

    tokenizer.py    CoETokenizer (Hugging Face ``tokenizers``), byte-level BPE training
    preprocess.py   JSONL(.gz) / Parquet / text -> Megatron indexed dataset (.bin/.idx/.meta.json);
                    CLI in ``tools/preprocess_data.py``
    datasets.py     prefix validation, GPTDataset / BlendedDataset building, resumable loader

Modules import Megatron-Core lazily where they can, so the CLI's ``--help`` and argument errors
stay fast.
"""
