"""Data for the trainer: Megatron GPT datasets (``megatron_coe.data``) or ``--mock-data``.

Every rank reads its own data-parallel shard of each global batch (pipeline and tensor-parallel
peers read the same samples), so no broadcast is needed. The train position is the number of
consumed samples, which checkpoints store: a resumed run continues with the next sample. Each
validation pass reads the same first ``eval_iters`` global batches of the validation split.
"""

from __future__ import annotations

import atexit
import itertools
from typing import Iterator

import torch

from megatron_coe.training.options import TrainArgs
from megatron_coe.training.setup import SetupError, train_iters_and_samples


class MockDataset(torch.utils.data.Dataset):
    """Learnable synthetic sequences: ``t_i = (a + b * i) mod V`` with (a, b) drawn per sample."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size, self.seed = (
            num_samples, seq_length, vocab_size, seed)

    def __len__(self):
        return self.num_samples

    def __getitem__(self, idx):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(idx))
        start, stride = torch.randint(0, self.vocab_size, (2,), generator=gen).tolist()
        stride = 1 + stride % 7
        t = (start + stride * torch.arange(self.seq_length + 1)) % self.vocab_size
        return dict(tokens=t[:-1], labels=t[1:], loss_mask=torch.ones(self.seq_length),
                    position_ids=torch.arange(self.seq_length))


class MockTokenizer:
    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod = vocab_size, 0

    def fingerprint(self) -> str:
        return f"mock-{self.vocab_size}"


def num_samples(args: TrainArgs) -> tuple[int, int, int]:
    """(train, valid, test) samples the run reads (train: --train-samples as in Megatron-LM, or
    what the steps take when a run ending on the batch ramp takes more)."""
    if args.train_samples is not None:
        train = max(args.train_samples, train_iters_and_samples(args)[1])
    else:
        train = args.train_iters * args.global_batch_size
    valid = args.eval_iters * args.global_batch_size
    return train, valid, 0


def data_blends(args: TrainArgs) -> dict:
    """Where the data comes from, as ``build_train_valid_test_datasets`` takes it: ``data_path``
    (one blend) cut by ``split``, or ``blend_per_split`` ([train, valid, test] blends, each used
    whole); the data options are checked here."""
    per_split = args.train_data_path or args.valid_data_path
    if args.data_path and per_split:
        raise SetupError("--data-path (one blend cut by --split) and --train-data-path / "
                         "--valid-data-path (a blend per split) exclude each other: give one "
                         "or the other.")
    if per_split:
        if not args.train_data_path:
            raise SetupError("--valid-data-path needs --train-data-path.")
        if args.eval_iters > 0 and not args.valid_data_path:
            raise SetupError(f"--train-data-path without --valid-data-path leaves no validation "
                             f"data but --eval-iters is {args.eval_iters}: add "
                             "--valid-data-path or set --eval-iters 0.")
        valid = args.valid_data_path if args.eval_iters > 0 else None
        return {"data_path": None, "split": None,
                "blend_per_split": [list(args.train_data_path), valid and list(valid), None]}
    if not args.data_path:
        raise SetupError("--data-path (or --train-data-path and --valid-data-path) is required "
                         "(or --mock-data for synthetic data).")
    return {"data_path": list(args.data_path), "split": args.split, "blend_per_split": None}


def _prefixes(args: TrainArgs) -> list:
    """Every data prefix of the run, the training data's first."""
    from megatron_coe.data.datasets import blend_prefixes

    blends = data_blends(args)
    return blend_prefixes(blends["data_path"], blends["blend_per_split"])


def load_tokenizer(args: TrainArgs):
    """``--tokenizer-model``, else ``<first training data prefix>.tokenizer.json``
    (written by preprocess_data.py)."""
    if args.mock_data:
        return MockTokenizer(args.vocab_size)
    from megatron_coe.data.tokenizer import load_tokenizer as load

    return load(args.tokenizer_model or _prefixes(args)[0] + ".tokenizer.json")


def validate_data(args: TrainArgs, tokenizer) -> None:
    """Each data prefix exists, is complete and was tokenized with ``tokenizer`` (DataError)."""
    if args.mock_data:
        return
    from megatron_coe.data.datasets import validate_data_prefix

    for prefix in _prefixes(args):
        validate_data_prefix(prefix, tokenizer)


def build_datasets(args: TrainArgs, tokenizer):
    """(train, valid) datasets; data files, tokenizer and splits are validated first."""
    train_n, valid_n, test_n = num_samples(args)
    if args.mock_data:
        return (MockDataset(train_n, args.seq_length, args.vocab_size, args.seed),
                MockDataset(valid_n, args.seq_length, args.vocab_size, args.seed + 1))
    from megatron_coe.data.datasets import build_train_valid_test_datasets

    train, valid, _ = build_train_valid_test_datasets(
        **data_blends(args), seq_length=args.seq_length, seed=args.seed,
        num_samples=(train_n, valid_n if args.eval_iters else 0, test_n),
        tokenizer=tokenizer, data_cache_path=args.data_cache_path)
    if args.eval_iters > 0 and valid is None:
        raise SetupError(f"--split {args.split} leaves no validation data but --eval-iters is "
                         f"{args.eval_iters}: give the validation split a weight or set "
                         "--eval-iters 0.")
    return train, valid


def micro_batches(dataset, micro_batch_size: int, consumed_samples: int, dp_rank: int,
                  dp_size: int, num_workers: int = 0) -> Iterator[dict]:
    """This rank's micro-batches from ``consumed_samples`` on (tensors moved to the GPU if any)."""
    from megatron_coe.data.datasets import build_data_loader
    from megatron_coe.training import signals

    loader = build_data_loader(dataset, micro_batch_size, consumed_samples, dp_rank, dp_size,
                               num_workers=num_workers)
    if num_workers > 0:
        # Workers ignore SIGTERM/SIGUSR1 (a job-wide SIGTERM must not kill them before the
        # trainer's final save); they are forked inside the block, then set SIG_IGN themselves.
        loader.worker_init_fn = signals.ignore_in_child
        with signals.shielded():
            batches = iter(loader)
        _track_workers(getattr(batches, "_workers", []))
    else:
        batches = iter(loader)
    for batch in batches:
        if torch.cuda.is_available():
            batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        yield batch


def per_chunk(iterator: Iterator[dict], chunks: int):
    """The data iterator(s) for the pipeline schedule: ``iterator`` itself for one model chunk;
    for an interleaved pipeline one iterator per chunk (Megatron-Core's interleaved schedule
    reads each chunk's micro-batches from that chunk's iterator), each giving every micro-batch
    of ``iterator`` in order (a micro-batch is kept until the last chunk has taken it)."""
    if chunks == 1:
        return iterator
    return list(itertools.tee(iterator, chunks))


_WORKERS: list = []  # DataLoader worker processes (they ignore SIGTERM)


def _track_workers(workers) -> None:
    """Remember workers so that none outlives the trainer.

    A DataLoader shuts its workers down itself when its iterator is released; at interpreter
    exit with an iterator still alive (e.g. a traceback holding the training loop's frame),
    multiprocessing ends daemonic children with SIGTERM and joins them, which would wait
    forever on workers that ignore SIGTERM: those are SIGKILLed first (this atexit hook is
    registered after multiprocessing's, so it runs before it).
    """
    if not _WORKERS:
        atexit.register(_kill_leftover_workers)
    _WORKERS[:] = [w for w in _WORKERS if w.is_alive()] + list(workers)


def _kill_leftover_workers() -> None:
    for w in _WORKERS:
        try:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        except (OSError, ValueError, AssertionError):
            pass
