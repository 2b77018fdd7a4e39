"""Megatron-Core GPT datasets for pretraining: prefix validation, dataset building, resumable loader.

``build_train_valid_test_datasets`` is Megatron-Core's own pipeline (``GPTDatasetConfig`` ->
``BlendedMegatronDatasetBuilder`` -> ``GPTDataset`` per prefix and split, ``BlendedDataset`` for
several prefixes), after ``validate_data_prefix`` has checked every prefix and split, so that bad
data fails with a ``DataError`` naming the file and the fix instead of deep inside Megatron.

Distributed use (Megatron-Core behaviour in 0.16.1 and 0.19.2, relied upon here):

* Every rank gets the datasets (``is_built_on_rank`` is ``lambda: True``). When
  ``torch.distributed`` is initialized, rank 0 builds the index caches first and the other ranks
  wait in a barrier, then load them (``blended_megatron_dataset_builder.py:523-546``). The barrier
  is a plain ``torch.distributed.barrier()`` on the default group, so gloo on CPU works. The cache
  directory must be visible to every rank (a shared file system for several nodes).
* ``data_cache_path=None`` keeps Megatron's default: GPTDataset index caches go to
  ``<prefix>/cache/GPTDataset_indices/`` (a directory named like the prefix), BlendedDataset
  indices are not cached but recomputed (deterministically) on each rank.
* Building runs inside ``compat.datasets.rank_zero_without_process_group()`` (before 0.19,
  ``BlendedDataset`` calls ``get_rank()`` unguarded in a process without ``torch.distributed``),
  and ``compat.datasets.check_helpers`` turns missing compiled helpers (``helpers_cpp``, shipped
  in the wheels) into a ``DataError`` that says what to install. Both are registry entries
  (``megatron_coe/compat/registry.py``).

``build_data_loader`` wraps a dataset in a ``torch.utils.data.DataLoader`` driven by
``MegatronPretrainingSampler`` (Megatron-LM ``megatron/training/datasets/data_samplers.py``):
samples are read in their global order ``consumed_samples, consumed_samples + 1, ...``; each
global micro-batch of ``micro_batch_size * dp_size`` indices is cut into ``dp_size`` slices and
rank ``dp_rank`` takes its slice, so restarting with the saved ``consumed_samples`` resumes at the
exact data position.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import warnings
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_coe.compat.datasets import check_helpers, rank_zero_without_process_group

logger = logging.getLogger(__name__)

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count
# numpy dtype of Megatron's DType codes (megatron/core/datasets/indexed_dataset.py:50-58)
_DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
                7: np.float32, 8: np.uint16}
MAX_SCAN_BYTES = 4 * 2**30  # .bin files up to this size are scanned for token ids >= vocab

_FIX_PREPROCESS = "re-create it with tools/preprocess_data.py --output-prefix {prefix} ..."


class DataError(ValueError):
    """Unusable training data; the message names the file and says what to do."""


@dataclass
class DataPrefixInfo:
    prefix: str
    num_documents: int
    num_sequences: int
    num_tokens: int
    dtype: str
    meta: Optional[dict]


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
def _read_index(prefix: str) -> Tuple[np.dtype, np.ndarray, int]:
    """(token dtype, sequence lengths, document count) of ``<prefix>.idx``, checked for size and
    consistency (lengths >= 0, each sequence pointer where the lengths put it, document indices
    increasing from 0 to the sequence count): a damaged index fails here, naming the file and the
    first bad entry, instead of inside Megatron's reader at some later sample."""
    idx_path = prefix + ".idx"
    fix = _FIX_PREPROCESS.format(prefix=prefix)
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise DataError(
            f"{idx_path} is not a Megatron indexed-dataset index (bad header or truncated); {fix}"
        )
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in _DTYPE_CODES:
        raise DataError(f"{idx_path}: unsupported index version {version} / dtype code {code}; {fix}")
    expected = _HEADER_BYTES + 4 * n_seq + 8 * n_seq + 8 * n_doc
    if size < expected:
        raise DataError(
            f"{idx_path} is truncated: {size} bytes, its header promises {expected}; {fix}"
        )
    dtype = np.dtype(_DTYPE_CODES[code])
    lengths = np.fromfile(idx_path, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
    corrupt = f"{idx_path} is damaged"
    if n_seq and lengths.min() < 0:
        i = int(np.argmax(lengths < 0))
        raise DataError(f"{corrupt}: sequence {i} has length {int(lengths[i])}; {fix}")
    pointers = np.memmap(idx_path, dtype=np.int64, mode="r", shape=(n_seq,),
                         offset=_HEADER_BYTES + 4 * n_seq) if n_seq else np.zeros(0, np.int64)
    start = 0
    chunk = 1 << 22
    for lo in range(0, n_seq, chunk):  # pointer[i] == itemsize * (lengths[0] + ... + lengths[i-1])
        sizes = lengths[lo:lo + chunk].astype(np.int64) * dtype.itemsize
        want = start + np.concatenate(([0], np.cumsum(sizes[:-1])))
        bad = np.flatnonzero(pointers[lo:lo + chunk] != want)
        if bad.size:
            i = lo + int(bad[0])
            raise DataError(f"{corrupt}: sequence {i} points to byte {int(pointers[i])} of the .bin, "
                            f"its lengths put it at byte {int(want[bad[0]])}; {fix}")
        start += int(sizes.sum())
    del pointers
    docs = np.fromfile(idx_path, dtype=np.int64, count=n_doc, offset=_HEADER_BYTES + 12 * n_seq)
    if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or (n_doc > 1 and np.diff(docs).min() < 0):
        raise DataError(f"{corrupt}: its document index does not run from 0 to the {n_seq} "
                        f"sequences in increasing order; {fix}")
    return dtype, lengths, int(n_doc)


_MAX_ID_CACHE: dict = {}  # (path, size, mtime_ns, inode, dtype) -> (max id, its position)


def _max_token_id(bin_path: str, dtype: np.dtype) -> Tuple[int, int]:
    """(largest token id, its position) of ``bin_path``: a chunked max over a read-only memmap (for
    a signed dtype a negative id is reported instead, as invalid). Remembered per file version, so
    validating the same data twice in a process scans it once."""
    st = os.stat(bin_path)
    key = (os.path.abspath(bin_path), st.st_size, st.st_mtime_ns, st.st_ino, dtype.str)
    if key not in _MAX_ID_CACHE:
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        chunk = 1 << 24
        best, where = -1, -1
        for lo in range(0, len(tokens), chunk):
            part = tokens[lo:lo + chunk]
            if dtype.kind == "i" and part.min() < 0:
                best, where = int(part.min()), lo + int(np.argmin(part))
                break
            j = int(np.argmax(part))
            if int(part[j]) > best:
                best, where = int(part[j]), lo + j
        del tokens
        _MAX_ID_CACHE[key] = (best, where)
    return _MAX_ID_CACHE[key]


def _sequence_of(lengths: np.ndarray, position: int) -> int:
    """Index of the sequence (document) holding token ``position`` of the .bin."""
    return int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), position, side="right"))


def _tokenizer_desc(fingerprint, vocab_size, eod, path) -> str:
    return f"fingerprint {str(fingerprint)[:12]}, vocab_size {vocab_size}, eod {eod}" + (
        f", {path}" if path else ""
    )


def validate_data_prefix(
    prefix: str, tokenizer=None, max_scan_bytes: int = MAX_SCAN_BYTES
) -> DataPrefixInfo:
    """Check that ``<prefix>.bin/.idx`` exist, agree in size, and suit ``tokenizer``.

    With ``<prefix>.meta.json`` (written by ``tools/preprocess_data.py``) the tokenizer check is
    exact: same fingerprint (hence vocabulary and eod). Without it, the largest token id in the
    ``.bin`` must be below ``tokenizer.vocab_size``; that scan is skipped, with a warning, for
    ``.bin`` files larger than ``max_scan_bytes``. Raises ``DataError``.
    """
    bin_path, idx_path, meta_file = prefix + ".bin", prefix + ".idx", prefix + ".meta.json"
    fix = _FIX_PREPROCESS.format(prefix=prefix)
    for path, what in ((idx_path, "index"), (bin_path, "data")):
        if not os.path.isfile(path):
            other = bin_path if path == idx_path else idx_path
            hint = (
                f"{other} exists, so the dataset is incomplete: {fix}"
                if os.path.exists(other)
                else "check the data path (pass the prefix, without .bin/.idx) or "
                + fix.replace("re-create it", "create it")
            )
            raise DataError(f"missing {what} file {path}; {hint}")

    dtype, lengths, n_doc = _read_index(prefix)
    n_tokens = int(lengths.sum(dtype=np.int64))
    expected_bin = n_tokens * dtype.itemsize
    actual_bin = os.path.getsize(bin_path)
    if actual_bin < expected_bin:
        raise DataError(
            f"{bin_path} is truncated: {actual_bin} bytes, but {idx_path} describes {n_tokens} "
            f"tokens of {dtype.name} = {expected_bin} bytes (an interrupted copy or write?); {fix}"
        )
    if actual_bin > expected_bin:
        raise DataError(
            f"{bin_path} has {actual_bin} bytes, but {idx_path} describes only {expected_bin}: "
            f"the two files come from different runs; {fix}"
        )

    meta = None
    if os.path.isfile(meta_file):
        try:
            with open(meta_file, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read {meta_file}: {err}; {fix} or delete it") from None
        if not isinstance(meta, dict):
            raise DataError(f"{meta_file} does not hold a JSON object; {fix} or delete it")
        if meta.get("num_tokens") not in (None, n_tokens) or meta.get("num_documents") not in (
            None,
            n_doc - 1,
        ):
            raise DataError(
                f"{meta_file} describes {meta.get('num_documents')} documents / "
                f"{meta.get('num_tokens')} tokens but {idx_path} holds {n_doc - 1} / {n_tokens}: "
                f"the metadata belongs to another run; {fix}"
            )

    if tokenizer is not None:
        fp_fn = getattr(tokenizer, "fingerprint", None)
        if meta is not None and "tokenizer" in meta:
            mt = meta["tokenizer"]
            # Tokenizers without a fingerprint (not CoETokenizer): vocab size and eod must agree.
            same = (
                mt.get("fingerprint") == fp_fn()
                if fp_fn is not None
                else (mt.get("vocab_size"), mt.get("eod")) == (tokenizer.vocab_size, tokenizer.eod)
            )
            if not same:
                data_tok = _tokenizer_desc(
                    mt.get("fingerprint"), mt.get("vocab_size"), mt.get("eod"), mt.get("path")
                )
                train_tok = _tokenizer_desc(
                    fp_fn() if fp_fn else "?", tokenizer.vocab_size, tokenizer.eod,
                    getattr(tokenizer, "path", None),
                )
                raise DataError(
                    f"tokenizer mismatch for {prefix}: the data was tokenized with [{data_tok}] "
                    f"(recorded in {meta_file}), but training uses [{train_tok}]. "
                    f"Train with the tokenizer the data was made with, or re-run "
                    f"tools/preprocess_data.py --tokenizer-model <training tokenizer> "
                    f"--output-prefix {prefix} ..."
                )
        if actual_bin <= max_scan_bytes:
            # Every token id must be a token of the tokenizer. With a matching fingerprint in
            # .meta.json a bad id means the .bin changed after preprocessing (bit rot, a
            # partial overwrite); without .meta.json it may also be another tokenizer's data.
            max_id, where = _max_token_id(bin_path, dtype) if n_tokens else (-1, -1)
            if max_id < 0 and where >= 0 or max_id >= tokenizer.vocab_size:
                doc = _sequence_of(lengths, where)
                cause = (
                    f"the file is damaged (its {meta_file} records the training tokenizer, so the "
                    f"data changed after preprocessing)"
                    if meta is not None and "tokenizer" in meta
                    else f"damaged, or made with another tokenizer (no {meta_file} to say which)"
                )
                raise DataError(
                    f"{bin_path} holds token id {max_id} (token {where}, document {doc}) but the "
                    f"training tokenizer has vocab_size {tokenizer.vocab_size}: {cause}; "
                    f"re-create it with tools/preprocess_data.py --tokenizer-model <training "
                    f"tokenizer> --output-prefix {prefix} ..."
                )
        else:
            warnings.warn(
                f"{bin_path} is {actual_bin / 2**20:.0f} MiB, over the {max_scan_bytes / 2**20:.0f} "
                f"MiB scanned at start-up: its token ids were not checked against the tokenizer "
                f"(vocab_size {tokenizer.vocab_size})"
            )

    return DataPrefixInfo(
        prefix=prefix,
        num_documents=n_doc - 1,
        num_sequences=int(lengths.shape[0]),
        num_tokens=n_tokens,
        dtype=dtype.name,
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def parse_blend(data_path: Union[str, Sequence[str]]) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron blend list -> (prefixes, weights or None); ``["p"]`` or ``["w1", "p1", ...]``."""
    from megatron.core.datasets.utils import get_blend_from_list

    if isinstance(data_path, str):
        data_path = data_path.split()
    data_path = [str(p) for p in data_path]
    if not data_path:
        raise DataError("empty data path: give a prefix, or weight prefix pairs")
    blend = get_blend_from_list(data_path)
    prefixes, weights = list(blend[0]), blend[1]
    if weights is not None:
        weights = [float(w) for w in weights]
        if any(w <= 0 for w in weights):
            raise DataError(f"blend weights must be positive: {data_path}")
    for p in prefixes:
        try:
            float(p)
        except ValueError:
            continue
        raise DataError(
            f"data path {data_path} looks like weights without prefixes (or an odd-length "
            f"weighted blend): use ['prefix'] or ['w1', 'prefix1', 'w2', 'prefix2', ...]"
        )
    return prefixes, weights


def blend_prefixes(data_path=None, blend_per_split=None) -> List[str]:
    """Every prefix of ``data_path`` or of the ``blend_per_split`` blends, training data first."""
    blends = [data_path] if blend_per_split is None else blend_per_split
    return [p for b in blends if b for p in parse_blend(b)[0]]


def _check_splits(infos: Sequence[DataPrefixInfo], split: str, num_samples) -> None:
    """Every split with a non-zero share must own documents of every prefix.

    A GPTDataset over no documents makes ``GPTDataset._get_num_epochs`` (``gpt_dataset.py:634``)
    loop forever, whatever number of samples is asked (0 included).
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    names = ("train", "valid", "test")
    for info in infos:
        n = info.num_documents
        for i, bookends in enumerate(matrix):
            if bookends is None:
                continue
            beg, end = int(round(bookends[0] * n)), int(round(bookends[1] * n))
            if end <= beg:
                raise DataError(
                    f"split {split!r} gives the {names[i]} split 0 of the {n} documents of "
                    f"{info.prefix}: use more documents, a larger {names[i]} share, or a "
                    f"{names[i]} share of 0 in the split string"
                )


def build_train_valid_test_datasets(
    data_path: Optional[Union[str, Sequence[str]]],
    split: Optional[str],
    seq_length: int,
    seed: int,
    num_samples: Tuple[Optional[int], Optional[int], Optional[int]],
    tokenizer,
    data_cache_path: Optional[str] = None,
    *,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    mid_level_dataset_surplus: float = 0.005,
    validate: bool = True,
    blend_per_split: Optional[Sequence[Optional[Union[str, Sequence[str]]]]] = None,
):
    """(train, valid, test) Megatron datasets; a split with weight 0 in ``split`` is None.

    Args:
        data_path: Megatron blend list: ``["prefix"]`` or ``["w1", "prefix1", "w2", "prefix2"]``
            (a string is split on whitespace); None with ``blend_per_split``.
        split: e.g. ``"90,10,0"`` (documents of each prefix, in order); None with
            ``blend_per_split``.
        seq_length: tokens per sample; samples hold ``tokens`` and ``labels`` of this length
            (labels are tokens shifted by one).
        seed: seed of the document / sample shuffles.
        num_samples: samples per split (train: iterations * global batch size); None for one
            epoch of a split (only without weights).
        tokenizer: a ``CoETokenizer`` (or anything with ``vocab_size``, ``eod``,
            ``unique_identifiers``; ``fingerprint()`` for the metadata check).
        data_cache_path: where the index caches go (see the module docstring for None).
        blend_per_split: instead of ``data_path`` + ``split``, one blend list per split
            (train, valid, test; None for a split without data), each using all documents of
            its prefixes (Megatron's ``--train-data-path`` / ``--valid-data-path``).

    Every rank of a ``torch.distributed`` job must call this (it holds barriers).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if len(num_samples) != 3:
        raise ValueError(f"num_samples must hold 3 numbers (train, valid, test), not {num_samples}")
    if (data_path is None) == (blend_per_split is None):
        raise ValueError("give either data_path (with split) or blend_per_split")
    if blend_per_split is not None:
        if len(blend_per_split) != 3:
            raise ValueError("blend_per_split must hold 3 blends (train, valid, test) or None")
        blend, split = None, None  # each split's blend is used whole
        per_split = [None if b is None else parse_blend(b) for b in blend_per_split]
    else:
        blend, per_split = parse_blend(data_path), None
    if validate:
        infos = [validate_data_prefix(p, tokenizer)
                 for p in blend_prefixes(data_path, blend_per_split)]
        if blend is not None:
            _check_splits(infos, split, num_samples)
    check_helpers(DataError)

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=blend,
        blend_per_split=per_split,
        split=split,
        path_to_cache=data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        mid_level_dataset_surplus=mid_level_dataset_surplus,
    )
    sizes = [None if n is None else int(n) for n in num_samples]
    with rank_zero_without_process_group():
        train, valid, test = BlendedMegatronDatasetBuilder(
            GPTDataset, sizes, lambda: True, config
        ).build()
    return train, valid, test


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
class MegatronPretrainingSampler:
    """Batch sampler: sequential global order from ``consumed_samples``, sliced per DP rank.

    Yields, for each global micro-batch ``[s, s + micro_batch_size * dp_size)``, the indices
    ``s + dp_rank * micro_batch_size + [0, micro_batch_size)``. An incomplete last global
    micro-batch is dropped (``drop_last``) or, otherwise, split as evenly as possible.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"no sample to load: total_samples={total_samples}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} is outside the dataset's "
                f"{total_samples} samples (build the datasets with more samples to go on)"
            )
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, not {micro_batch_size}")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} not in [0, {data_parallel_size})"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.micro_batch_times_data_parallel_size = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Micro-batches this rank will yield."""
        remaining = self.total_samples - self.consumed_samples
        full = remaining // self.micro_batch_times_data_parallel_size
        rest = remaining % self.micro_batch_times_data_parallel_size
        if rest and not self.drop_last:
            start, end = self._partial_bounds(rest)
            full += int(end > start)
        return full

    def _partial_bounds(self, n: int) -> Tuple[int, int]:
        per_rank = -(-n // self.data_parallel_size)
        start = min(self.data_parallel_rank * per_rank, n)
        return start, min(start + per_rank, n)

    def __iter__(self):
        start = self.data_parallel_rank * self.micro_batch_size
        end = start + self.micro_batch_size
        step = self.micro_batch_times_data_parallel_size
        s = self.consumed_samples
        while s + step <= self.total_samples:
            yield list(range(s + start, s + end))
            s += step
        if s < self.total_samples and not self.drop_last:
            lo, hi = self._partial_bounds(self.total_samples - s)
            if hi > lo:
                yield list(range(s + lo, s + hi))


def build_data_loader(
    dataset,
    micro_batch_size: int,
    consumed_samples: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
    drop_last: bool = True,
):
    """DataLoader of ``dataset`` resuming at ``consumed_samples`` (None when dataset is None).

    Batches are dicts of stacked tensors (``tokens``, ``labels``, ``loss_mask``,
    ``position_ids``, ``attention_mask`` when built, ``dataset_id`` for blends). One pass over
    the remaining samples; build the datasets with enough samples for the whole run.
    """
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
        drop_last=drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=False,
        persistent_workers=num_workers > 0,
    )
