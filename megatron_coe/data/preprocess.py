"""Corpus -> Megatron indexed dataset (``<prefix>.bin`` / ``<prefix>.idx``) + ``<prefix>.meta.json``.

Inputs (one or more files, read in the order given):

* JSON lines: ``.jsonl``, ``.json`` (one object a line), optionally ``.gz``. Each object gives one
  document: the values of ``json_keys`` joined with a newline (GSM8K: ``question`` ``answer``).
* Parquet: ``.parquet`` (needs ``pyarrow``, not a dependency of this project), one document a row,
  columns ``json_keys`` joined the same way.
* Plain text: ``.txt``, optionally ``.gz``. ``text_mode="block"`` (default): one document per
  block of lines separated by one or more blank lines (the block's lines keep their newlines, the
  trailing newline of a block is dropped). ``text_mode="line"``: one document per non-empty line.

Every document is tokenized and followed by the tokenizer's end-of-document id, then appended
with Megatron-Core's ``IndexedDatasetBuilder`` (one sequence per document, as Megatron-LM's
``tools/preprocess_data.py`` writes without ``--split-sentences``). Empty documents (empty or
whitespace only) are skipped and counted.

Outputs, all named from ``output_prefix`` (note: the prefix is used as is; Megatron-LM appends
``_text_document``, we do not):

* ``<prefix>.bin``, ``<prefix>.idx``: the dataset; pass ``<prefix>`` as the data path.
* ``<prefix>.meta.json``: tokenizer fingerprint, vocab size, eod id, document and token counts,
  the sources; ``datasets.validate_data_prefix`` checks it against the training tokenizer.
* ``<prefix>.tokenizer.json``: the tokenizer of the data, always: the byte-level BPE trained on
  the corpus (``vocab_size``), or a byte-identical copy of the given ``tokenizer_model`` (the
  trainer and the HF exporter find it there, so ``--data-path <prefix>`` needs no
  ``--tokenizer-model``). Use it for preprocessing further splits with the same vocabulary.

An output prefix that already holds any of these files is refused unless ``overwrite``
(``--overwrite``), the HF exporter's rule: nothing is replaced by surprise. The tokenizer given as
``tokenizer_model`` may itself be ``<prefix>.tokenizer.json``: it is kept, not a conflict.

Files are written under temporary names and renamed at the end, so an interrupted run never leaves
a ``.bin``/``.idx`` pair that looks complete.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

from megatron_coe.cli import OneLineParser
from megatron_coe.data.tokenizer import (MIN_BPE_VOCAB, CoETokenizer, TokenizerError,
                                         load_tokenizer,
                                         resolve_tokenizer_path, train_bpe_tokenizer)

META_FORMAT = "megatron-coe-indexed-dataset/1"
JOIN = "\n"
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text")
PARQUET_SUFFIXES = (".parquet", ".pq")
BATCH_DOCS = 512  # documents tokenized per call (and per worker task)


class PreprocessError(ValueError):
    """Bad input for preprocessing; the message names the file (and line) and what to do."""


@dataclass
class Document:
    text: str
    path: str
    source: str  # "path:line" (JSONL), "path:row N" (Parquet), "path:line" of the block start (text)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _kind(path: str) -> str:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(PARQUET_SUFFIXES):
        if path.lower().endswith(".gz"):
            raise PreprocessError(f"{path}: gzip-compressed Parquet is not supported; gunzip it first")
        return "parquet"
    raise PreprocessError(
        f"{path}: unknown input type; expected {', '.join(JSON_SUFFIXES + TEXT_SUFFIXES + PARQUET_SUFFIXES)}"
        " (optionally .gz, except Parquet)"
    )


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, "r", encoding="utf-8")


def _join_fields(record: dict, keys: Sequence[str], where: str) -> str:
    parts = []
    for key in keys:
        if key not in record:
            present = ", ".join(repr(k) for k in list(record)[:20])
            raise PreprocessError(
                f"{where}: no key {key!r} in this record (keys present: {present}); "
                f"choose the fields to use with --json-keys"
            )
        value = record[key]
        if isinstance(value, str):
            parts.append(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts.append(str(value))
        else:
            raise PreprocessError(
                f"{where}: key {key!r} holds a {type(value).__name__}, expected a string"
            )
    return JOIN.join(parts)


def _read_json(path: str, keys: Sequence[str]) -> Iterator[Document]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PreprocessError(
                    f"{where}: malformed JSON ({err.msg} at column {err.colno}); "
                    "expected one JSON object a line"
                ) from None
            if not isinstance(record, dict):
                raise PreprocessError(
                    f"{where}: expected a JSON object, got a {type(record).__name__}"
                )
            yield Document(_join_fields(record, keys, where), path, where)


def _read_parquet(path: str, keys: Sequence[str]) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PreprocessError(
            f"{path}: reading Parquet needs pyarrow, which is not installed: pip install pyarrow"
        ) from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    missing = [k for k in keys if k not in names]
    if missing:
        raise PreprocessError(
            f"{path}: no column {missing[0]!r} (columns: {', '.join(map(repr, names))}); "
            "choose the fields to use with --json-keys"
        )
    row = 0
    for batch in pf.iter_batches(columns=list(keys), batch_size=4096):
        for record in batch.to_pylist():
            yield Document(_join_fields(record, keys, f"{path}:row {row}"), path, f"{path}:row {row}")
            row += 1


def _read_text(path: str, mode: str) -> Iterator[Document]:
    with _open_text(path) as f:
        if mode == "line":
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield Document(line, path, f"{path}:{lineno}")
            return
        block: List[str] = []
        start = 0
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                yield Document("".join(block).rstrip("\r\n"), path, f"{path}:{start}")
                block = []
        if block:
            yield Document("".join(block).rstrip("\r\n"), path, f"{path}:{start}")


def read_documents(
    path: str, json_keys: Sequence[str] = ("text",), text_mode: str = "block"
) -> Iterator[Document]:
    """Documents of one input file, in file order (see the module docstring for the formats)."""
    if text_mode not in ("block", "line"):
        raise PreprocessError(f"text_mode must be 'block' or 'line', not {text_mode!r}")
    kind = _kind(path)
    if kind == "json":
        return _read_json(path, json_keys)
    if kind == "parquet":
        return _read_parquet(path, json_keys)
    return _read_text(path, text_mode)


def _utf8_error(path: str) -> str:
    """The first line of ``path`` that is not UTF-8, as a message (the file is read again: this
    runs only after a decoding error, whose offset is relative to a buffer, not to the file)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    fix = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8) and pass that"
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1}); {fix}")
    return f"{path}: not valid UTF-8; {fix}"


def _checked(path: str, docs: Iterator[Document]) -> Iterator[Document]:
    """``docs`` with decoding and decompression errors turned into one-line PreprocessErrors."""
    try:
        yield from docs
    except UnicodeDecodeError:
        raise PreprocessError(_utf8_error(path)) from None
    except EOFError:
        raise PreprocessError(f"{path}: the gzip stream ends early (a truncated or partial copy); "
                              "copy the file again") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise PreprocessError(f"{path}: not a valid gzip file ({err}); give the file without .gz "
                              "if it is not compressed, or copy it again") from None


def check_inputs(inputs: Sequence[str]) -> List[str]:
    """Fail early, before any work, on missing / unreadable / unknown inputs."""
    if not inputs:
        raise PreprocessError("no input files given (--input)")
    out = []
    for path in inputs:
        if not os.path.exists(path):
            raise PreprocessError(f"input file {path} does not exist")
        if not os.path.isfile(path):
            raise PreprocessError(f"input {path} is not a file")
        _kind(path)
        if os.path.getsize(path) == 0:
            raise PreprocessError(f"input file {path} is empty")
        out.append(path)
    return out


def _iter_corpus(inputs, json_keys, text_mode, stats: Optional[dict] = None) -> Iterator[Document]:
    """All non-empty documents of all inputs; an input without any document is an error."""
    for path in inputs:
        n = 0
        for doc in _checked(path, read_documents(path, json_keys, text_mode)):
            if not doc.text.strip():
                if stats is not None:
                    stats["skipped_empty"] = stats.get("skipped_empty", 0) + 1
                continue
            n += 1
            yield doc
        if n == 0:
            raise PreprocessError(
                f"input file {path} contains no (non-empty) documents"
                + (f" for --json-keys {' '.join(json_keys)}" if _kind(path) != "text" else "")
            )


# ---------------------------------------------------------------------------------------------
# tokenizing (optionally in worker processes)
# ---------------------------------------------------------------------------------------------
_WORKER_TOKENIZER: Optional[CoETokenizer] = None


def _worker_init(tokenizer_json: str, eod_token: str) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    from tokenizers import Tokenizer

    _WORKER_TOKENIZER = CoETokenizer(Tokenizer.from_str(tokenizer_json), eod_token=eod_token)


def _worker_encode(texts: List[str]) -> List[List[int]]:
    return _WORKER_TOKENIZER.tokenize_batch(texts)


def _batches(docs: Iterator[Document], size: int) -> Iterator[List[Document]]:
    batch: List[Document] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded_batches(
    docs: Iterator[Document], tokenizer: CoETokenizer, workers: int
) -> Iterator[Tuple[List[Document], List[List[int]]]]:
    batches = _batches(docs, BATCH_DOCS)
    if workers <= 1:
        for batch in batches:
            yield batch, tokenizer.tokenize_batch([d.text for d in batch])
        return
    # Windows of a few batches per worker through Pool.map: output order == input order whatever
    # the worker count, and memory stays bounded (Pool.imap would read the whole corpus ahead).
    ctx = mp.get_context("spawn")
    window = 4 * workers
    init = (tokenizer.hf_tokenizer.to_str(), tokenizer.eod_token)
    with ctx.Pool(workers, initializer=_worker_init, initargs=init) as pool:
        while True:
            chunk = [b for _, b in zip(range(window), batches)]
            if not chunk:
                break
            results = pool.map(_worker_encode, [[d.text for d in b] for b in chunk], chunksize=1)
            yield from zip(chunk, results)


# ---------------------------------------------------------------------------------------------
# main entry point
# ---------------------------------------------------------------------------------------------
def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def meta_path(prefix: str) -> str:
    return prefix + ".meta.json"


def trained_tokenizer_path(prefix: str) -> str:
    """``<prefix>.tokenizer.json``: the data's tokenizer (trained here or copied, see the module
    docstring); the trainer's default ``--tokenizer-model`` for ``--data-path <prefix>``."""
    return prefix + ".tokenizer.json"


OUTPUT_SUFFIXES = (".bin", ".idx", ".meta.json", ".tokenizer.json")


def check_output_prefix(output_prefix: str, overwrite: bool = False,
                        tokenizer_model: Optional[str] = None) -> None:
    """``PreprocessError`` (one line) when ``output_prefix`` already holds files a run would
    replace and ``overwrite`` is off; ``tokenizer_model`` may be the prefix's own tokenizer."""
    keep = None
    if tokenizer_model:
        try:
            keep = os.path.realpath(resolve_tokenizer_path(tokenizer_model))
        except TokenizerError:
            keep = None  # reported when the tokenizer is loaded
    existing = [output_prefix + s for s in OUTPUT_SUFFIXES if os.path.lexists(output_prefix + s)
                and os.path.realpath(output_prefix + s) != keep]
    if existing and not overwrite:
        names = ", ".join(os.path.basename(p) for p in existing)
        raise PreprocessError(
            f"--output-prefix {output_prefix} already holds {names}: choose another prefix, or "
            "pass --overwrite to replace them"
        )


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    json_keys: Sequence[str] = ("text",),
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
    workers: int = 1,
    text_mode: str = "block",
    log: Callable[[str], None] = _stderr,
    log_interval_s: float = 5.0,
    overwrite: bool = False,
) -> dict:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx/.meta.json/.tokenizer.json``; returns
    the metadata.

    Give either ``tokenizer_model`` (a ``tokenizer.json`` or a directory holding one; copied to
    ``<output_prefix>.tokenizer.json``) or ``vocab_size`` (train a byte-level BPE on the inputs,
    saved there). An existing output is replaced only with ``overwrite``.
    """
    t0 = time.time()
    json_keys = list(json_keys) or ["text"]
    inputs = check_inputs(list(inputs))
    if not output_prefix:
        raise PreprocessError("--output-prefix is empty")
    for suffix in (".bin", ".idx"):
        if output_prefix.endswith(suffix):
            raise PreprocessError(
                f"--output-prefix {output_prefix} ends with {suffix}: give the prefix only"
            )
    check_output_prefix(output_prefix, overwrite, tokenizer_model)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    # Every output is written under a temporary name and published at the end, the tokenizer
    # first: an interrupted or failed run leaves nothing under the prefix's names.
    tag = f".tmp{os.getpid()}"
    tokenizer_file = trained_tokenizer_path(output_prefix)
    bin_final, idx_final = output_prefix + ".bin", output_prefix + ".idx"
    tok_tmp: Optional[str] = tokenizer_file + tag  # None: the given tokenizer is tokenizer_file
    bin_tmp, idx_tmp = bin_final + tag, idx_final + tag
    tokenizer_source: Optional[str] = None  # the given tokenizer file, copied beside the data
    stats: dict = {}
    builder = None
    ok = False
    try:
        if tokenizer_model:
            tokenizer = load_tokenizer(tokenizer_model)
            if os.path.realpath(tokenizer.path) != os.path.realpath(tokenizer_file):
                tokenizer_source = tokenizer.path
                shutil.copyfile(tokenizer_source, tok_tmp)  # byte for byte: same fingerprint
            else:
                tok_tmp = None
            log(f"tokenizer: {tokenizer}")
        elif vocab_size:
            log(f"training a byte-level BPE tokenizer (vocab_size={vocab_size}) on "
                f"{len(inputs)} file(s)")
            t_tok = time.time()
            tokenizer = train_bpe_tokenizer(
                (d.text for d in _iter_corpus(inputs, json_keys, text_mode)), vocab_size, tok_tmp
            )
            tokenizer.path = tokenizer_file
            log(f"tokenizer trained in {time.time() - t_tok:.1f}s: {tokenizer}")
        else:
            raise PreprocessError(
                "no tokenizer: give --tokenizer-model PATH (an existing tokenizer.json) or "
                "--vocab-size N (train a byte-level BPE on the inputs)"
            )

        # Megatron-Core is imported only now: importing it takes seconds.
        import numpy as np
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        dtype = DType.optimal_dtype(tokenizer.vocab_size)
        builder = IndexedDatasetBuilder(bin_tmp, dtype=dtype)
        eod = tokenizer.eod
        n_docs = n_tokens = n_bytes = 0
        per_source: dict = {p: {"path": p, "documents": 0, "tokens": 0} for p in inputs}
        last_log = time.time()
        t_enc = time.time()
        docs = _iter_corpus(inputs, json_keys, text_mode, stats)
        for batch, ids_batch in _encoded_batches(docs, tokenizer, workers):
            for doc, ids in zip(batch, ids_batch):
                ids.append(eod)
                builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
                src = per_source[doc.path]
                src["documents"] += 1
                src["tokens"] += len(ids)
                n_docs += 1
                n_tokens += len(ids)
                n_bytes += len(doc.text.encode("utf-8"))
            now = time.time()
            if now - last_log >= log_interval_s:
                el = now - t_enc
                log(
                    f"processed {n_docs} documents, {n_tokens} tokens "
                    f"({n_docs / el:.0f} docs/s, {n_bytes / el / 2**20:.2f} MiB/s)"
                )
                last_log = now
        builder.finalize(idx_tmp)
        ok = True
    finally:
        if not ok:
            try:
                builder.data_file.close()
            except Exception:
                pass
            for p in (tok_tmp, bin_tmp, idx_tmp):
                if p is not None and os.path.exists(p):
                    os.remove(p)
    if tok_tmp is not None:
        os.replace(tok_tmp, tokenizer_file)
    os.replace(bin_tmp, bin_final)
    os.replace(idx_tmp, idx_final)

    elapsed = time.time() - t0
    meta = {
        "format": META_FORMAT,
        "prefix": os.path.basename(output_prefix),
        "num_documents": n_docs,
        "num_tokens": n_tokens,
        "skipped_empty_documents": stats.get("skipped_empty", 0),
        "dtype": np.dtype(dtype).name,
        "eod_appended": True,
        "json_keys": json_keys,
        "join": JOIN,
        "text_mode": text_mode,
        "tokenizer": {
            "fingerprint": tokenizer.fingerprint(),
            "vocab_size": tokenizer.vocab_size,
            "eod": tokenizer.eod,
            "eod_token": tokenizer.eod_token,
            "path": tokenizer_file,
            "trained_here": not tokenizer_model,
            "copied_from": tokenizer_source,
        },
        "sources": [
            {**per_source[p], "bytes": os.path.getsize(p)} for p in inputs
        ],
        "created_unix": int(time.time()),
        "elapsed_s": round(elapsed, 3),
    }
    tmp = meta_path(output_prefix) + tag
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    os.replace(tmp, meta_path(output_prefix))

    el = max(time.time() - t_enc, 1e-9)
    log(
        f"done: {n_docs} documents, {n_tokens} tokens ({n_tokens / max(n_docs, 1):.1f} tokens/doc, "
        f"{n_docs / el:.0f} docs/s) in {elapsed:.1f}s; skipped {meta['skipped_empty_documents']} empty"
    )
    return meta


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="preprocess_data.py",
        description="Tokenize JSONL(.gz) / Parquet / text files into a Megatron indexed dataset "
        "(<prefix>.bin, <prefix>.idx) plus <prefix>.meta.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("input data")
    g.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="input files: .jsonl/.json/.ndjson[.gz], .parquet, .txt[.gz]; read in order")
    g.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                   help="JSON keys / Parquet columns of a document, joined with a newline "
                   "(GSM8K: --json-keys question answer)")
    g.add_argument("--text-mode", choices=["block", "line"], default="block",
                   help="plain text: one document per blank-line-separated block, or per line")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", metavar="PATH",
                   help="existing Hugging Face tokenizer.json (or a directory holding one); "
                   "copied to <output-prefix>.tokenizer.json, where training finds it")
    g.add_argument("--vocab-size", type=int, metavar="N",
                   help="without --tokenizer-model: train a byte-level BPE of N tokens on the "
                   "inputs, saved as <output-prefix>.tokenizer.json")
    g = p.add_argument_group("output data")
    g.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json, PREFIX.tokenizer.json "
                   "(no suffix is appended)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the files of an existing PREFIX (refused without it)")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1,
                   help="tokenizer processes (the Rust tokenizer may also use threads; set "
                   "TOKENIZERS_PARALLELISM=false to stop that)")
    g.add_argument("--log-interval", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between progress lines")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tokenizer_model and args.vocab_size:
        parser.error("give --tokenizer-model or --vocab-size, not both")
    if not args.tokenizer_model and not args.vocab_size:
        parser.error("give --tokenizer-model PATH or --vocab-size N")
    if args.vocab_size is not None and args.vocab_size < MIN_BPE_VOCAB:
        parser.error(f"argument --vocab-size: must be >= {MIN_BPE_VOCAB} (256 byte symbols and "
                     f"the special tokens), got {args.vocab_size}")
    if args.workers < 1:
        parser.error(f"argument --workers: must be >= 1, got {args.workers}")
    if not 0 <= args.log_interval < float("inf"):
        parser.error(f"argument --log-interval: must be a finite number of seconds >= 0, got "
                     f"{args.log_interval:g}")
    try:
        meta = preprocess(
            args.input,
            args.output_prefix,
            json_keys=args.json_keys,
            tokenizer_model=args.tokenizer_model,
            vocab_size=args.vocab_size,
            workers=args.workers,
            text_mode=args.text_mode,
            log_interval_s=args.log_interval,
            overwrite=args.overwrite,
        )
    except (PreprocessError, ValueError, OSError) as err:
        print(f"preprocess_data.py: error: {err}", file=sys.stderr)
        return 1
    tok = meta["tokenizer"]
    print(
        f"wrote {args.output_prefix}.bin, {args.output_prefix}.idx, "
        f"{meta_path(args.output_prefix)}, {tok['path']}: {meta['num_documents']} documents, "
        f"{meta['num_tokens']} tokens, vocab_size {tok['vocab_size']}, eod {tok['eod']}, "
        + (f"tokenizer copied from {tok['copied_from']}" if tok["copied_from"]
           else "tokenizer trained here" if tok["trained_here"] else "tokenizer kept")
    )
    return 0
