"""Data pipeline: tokenizer, preprocessing to .bin/.idx, Megatron GPT datasets, resumable loader.

Works on a slice of the bundled GSM8K (first 200 train problems, a 512-token BPE trained on them);
every index cache lives in pytest's tmp dirs.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_coe.data import preprocess as pp
from megatron_coe.data.datasets import (
    DataError,
    MegatronPretrainingSampler,
    build_data_loader,
    build_train_valid_test_datasets,
    validate_data_prefix,
)
from megatron_coe.data.tokenizer import TokenizerError, load_tokenizer, train_bpe_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "data", "gsm8k")
KEYS = ["question", "answer"]
SEQ = 32


def _quiet(_msg):
    pass


def _gsm8k(name: str, n: int) -> list:
    out = []
    with gzip.open(os.path.join(GSM8K, name), "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def _write_jsonl(path, records, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two prefixes sharing one tokenizer: A = 200 train problems (BPE trained here), B = 60 test."""
    d = tmp_path_factory.mktemp("data")
    train = _gsm8k("train.jsonl.gz", 200)
    test = _gsm8k("test.jsonl.gz", 60)
    a_src = _write_jsonl(d / "train200.jsonl.gz", train, gz=True)
    b_src = _write_jsonl(d / "test60.jsonl", test)
    a, b = str(d / "gsm_a"), str(d / "gsm_b")
    meta_a = pp.preprocess([a_src], a, json_keys=KEYS, vocab_size=512, log=_quiet)
    tok_path = pp.trained_tokenizer_path(a)
    meta_b = pp.preprocess([b_src], b, json_keys=KEYS, tokenizer_model=tok_path, log=_quiet)
    return dict(
        dir=d, a=a, b=b, train=train, test=test, meta_a=meta_a, meta_b=meta_b,
        tok=load_tokenizer(tok_path), tok_path=tok_path, a_src=a_src,
    )


def _copy_prefix(prefix, dst_dir, name="copy"):
    dst = os.path.join(str(dst_dir), name)
    for ext in (".bin", ".idx", ".meta.json"):
        if os.path.exists(prefix + ext):
            shutil.copy(prefix + ext, dst + ext)
    return dst


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def test_tokenizer(data, tmp_path):
    tok = data["tok"]
    assert tok.vocab_size == 512 and tok.eod == 0 and tok.pad == 1 and tok.eos == tok.eod
    text = "Natalia sold clips to 48 of her friends.\n  Ünïcødé 😀\t#### 72"
    ids = tok.tokenize(text)
    assert all(isinstance(i, int) for i in ids) and max(ids) < tok.vocab_size
    assert tok.detokenize(ids) == text
    assert tok.detokenize(np.array(ids + [tok.eod])) == text + "<|endoftext|>"
    assert tok.unique_identifiers["fingerprint"] == tok.fingerprint()

    # deterministic: same corpus, same tokenizer; saving and loading keep the fingerprint
    texts = [r["question"] + "\n" + r["answer"] for r in data["train"]]
    t1 = train_bpe_tokenizer(iter(texts), 512)
    t2 = train_bpe_tokenizer(iter(texts), 512, save_path=str(tmp_path / "tok"))
    assert t1.fingerprint() == t2.fingerprint() == tok.fingerprint()
    assert os.path.isfile(tmp_path / "tok")
    os.makedirs(tmp_path / "dir")
    t2.save(str(tmp_path / "dir"))  # a directory: writes dir/tokenizer.json
    assert load_tokenizer(str(tmp_path / "dir")).fingerprint() == tok.fingerprint()

    with pytest.raises(TokenizerError, match="at least 258"):
        train_bpe_tokenizer(iter(texts), 100)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
def test_preprocess_round_trip(data):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok, meta = data["tok"], data["meta_a"]
    ds = IndexedDataset(data["a"])
    assert len(ds) == meta["num_documents"] == 200
    assert int(ds.sequence_lengths.sum()) == meta["num_tokens"]
    assert ds[0].dtype == np.uint16 and meta["dtype"] == "uint16"
    for i in (0, 1, 199):
        doc = ds[i]
        assert doc[-1] == tok.eod and tok.eod not in doc[:-1]
        rec = data["train"][i]
        assert tok.detokenize(doc[:-1]) == rec["question"] + "\n" + rec["answer"]
    assert meta["tokenizer"] == {
        "fingerprint": tok.fingerprint(), "vocab_size": 512, "eod": 0,
        "eod_token": "<|endoftext|>", "path": data["tok_path"], "trained_here": True,
        "copied_from": None,
    }
    assert meta["sources"][0]["documents"] == 200 and meta["json_keys"] == KEYS
    on_disk = json.load(open(pp.meta_path(data["a"])))
    assert on_disk["num_tokens"] == meta["num_tokens"]
    info = validate_data_prefix(data["a"], tok)
    assert (info.num_documents, info.num_tokens) == (200, meta["num_tokens"])
    assert data["meta_b"]["tokenizer"]["trained_here"] is False
    assert data["meta_b"]["tokenizer"]["fingerprint"] == tok.fingerprint()
    # the given tokenizer is kept beside the data, byte for byte (the trainer's default)
    assert data["meta_b"]["tokenizer"]["path"] == pp.trained_tokenizer_path(data["b"])
    assert data["meta_b"]["tokenizer"]["copied_from"] == data["tok_path"]
    with open(pp.trained_tokenizer_path(data["b"]), "rb") as f, open(data["tok_path"], "rb") as g:
        assert f.read() == g.read()


def test_text_input_cli_and_workers(data, tmp_path, monkeypatch, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = data["tok"]
    txt = tmp_path / "corpus.txt"
    txt.write_text("first doc\nline two\n\n\nsecond doc\n\n  \nthird doc\n", encoding="utf-8")
    out = str(tmp_path / "txt_block")
    rc = pp.main(["--input", str(txt), "--tokenizer-model", data["tok_path"],
                  "--output-prefix", out])
    assert rc == 0 and "3 documents" in capsys.readouterr().out
    ds = IndexedDataset(out)
    assert [tok.detokenize(ds[i][:-1]) for i in range(3)] == [
        "first doc\nline two", "second doc", "third doc"]
    meta = pp.preprocess([str(txt)], str(tmp_path / "txt_line"), tokenizer_model=data["tok_path"],
                         text_mode="line", log=_quiet)
    assert meta["num_documents"] == 4

    # worker processes give the same bytes as the in-process path
    monkeypatch.setattr(pp, "BATCH_DOCS", 16)
    w2 = str(tmp_path / "w2")
    pp.preprocess([data["a_src"]], w2, json_keys=KEYS, tokenizer_model=data["tok_path"],
                  workers=2, log=_quiet)
    for ext in (".bin", ".idx"):
        assert open(w2 + ext, "rb").read() == open(data["a"] + ext, "rb").read()

    # the CLI script: fast --help (Megatron is imported lazily) and a clear error exit
    script = os.path.join(ROOT, "tools", "preprocess_data.py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--json-keys" in r.stdout
    r = subprocess.run([sys.executable, script, "--input", str(tmp_path / "missing.jsonl"),
                        "--vocab-size", "300", "--output-prefix", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "missing.jsonl does not exist" in r.stderr


def test_preprocess_errors(data, tmp_path):
    tokm = dict(tokenizer_model=data["tok_path"], log=_quiet)
    out = str(tmp_path / "out")

    missing_key = _write_jsonl(tmp_path / "k.jsonl", [{"question": "a", "answer": "b"},
                                                      {"question": "only"}])
    with pytest.raises(pp.PreprocessError, match=r"k\.jsonl:2: no key 'answer'"):
        pp.preprocess([missing_key], out, json_keys=KEYS, **tokm)
    with pytest.raises(pp.PreprocessError, match=r"k\.jsonl:2: no key 'answer'"):  # while training
        pp.preprocess([missing_key], out, json_keys=KEYS, vocab_size=300, log=_quiet)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "no closing quote}\n')
    with pytest.raises(pp.PreprocessError, match=r"bad\.jsonl:3: malformed JSON"):
        pp.preprocess([str(bad)], out, **tokm)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(pp.PreprocessError, match=r"empty\.jsonl is empty"):
        pp.preprocess([str(empty)], out, **tokm)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(pp.PreprocessError, match=r"blank\.txt contains no"):
        pp.preprocess([str(blank)], out, **tokm)
    with pytest.raises(pp.PreprocessError, match=r"nope\.jsonl does not exist"):
        pp.preprocess([str(tmp_path / "nope.jsonl")], out, **tokm)
    with pytest.raises(pp.PreprocessError, match="no tokenizer: give --tokenizer-model"):
        pp.preprocess([missing_key], out, json_keys=KEYS, log=_quiet)
    # nothing half-written is left behind
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]

    pq = tmp_path / "x.parquet"
    pq.write_bytes(b"PAR1 not really")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(pp.PreprocessError, match="pip install pyarrow"):
            pp.preprocess([str(pq)], out, **tokm)


# ---------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------
def test_gpt_datasets_split_and_shapes(data, tmp_path):
    tok = data["tok"]
    train, valid, test = build_train_valid_test_datasets(
        [data["a"]], "90,10,0", SEQ, 1234, (64, 8, 0), tok, str(tmp_path / "cache"))
    assert test is None and len(train) >= 64 and len(valid) >= 8
    # documents 0..179 train, 180..199 valid
    assert train.document_index.max() < 180 and valid.document_index.min() >= 180
    for ds in (train, valid):
        s = ds[0]
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (SEQ,)
        assert s["tokens"].dtype == torch.int64
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])  # labels: tokens shifted by one
        assert int(s["tokens"].max()) < tok.vocab_size
    # the sample is a window of the concatenated documents
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = IndexedDataset(data["a"])
    parts = [docs[int(d)] for d in train.document_index]
    starts = np.cumsum([0] + [len(x) for x in parts])
    stream = np.concatenate(parts)
    for i in (0, 17):
        doc_beg, off = train.sample_index[train.shuffle_index[i]]
        start = int(starts[doc_beg] + off)
        assert train[i]["tokens"].tolist() == stream[start:start + SEQ].tolist()

    # cache hit: same samples, files in the cache dir
    again, _, _ = build_train_valid_test_datasets(
        [data["a"]], "90,10,0", SEQ, 1234, (64, 8, 0), tok, str(tmp_path / "cache"))
    assert torch.equal(again[5]["tokens"], train[5]["tokens"])
    assert any(f.endswith("shuffle_index.npy") for f in os.listdir(tmp_path / "cache"))


def test_blend(data, tmp_path):
    train, valid, _ = build_train_valid_test_datasets(
        ["0.7", data["a"], "0.3", data["b"]], "90,10,0", SEQ, 7, (100, 10, 0), data["tok"],
        str(tmp_path / "cache"))
    assert len(train) == 100 and len(valid) == 10
    ids = [int(train[i]["dataset_id"]) for i in range(len(train))]
    assert abs(ids.count(0) - 70) <= 1 and abs(ids.count(1) - 30) <= 1
    assert train[0]["tokens"].shape == (SEQ,)
    loader = build_data_loader(train, 4, 0, 0, 1)
    batch = next(iter(loader))
    assert batch["tokens"].shape == (4, SEQ) and batch["dataset_id"].shape == (4,)


def test_resumable_loader(data, tmp_path):
    train, _, _ = build_train_valid_test_datasets(
        [data["a"]], "90,10,0", SEQ, 1234, (64, 8, 0), data["tok"], str(tmp_path / "cache"))
    n = 40
    ref = [train[i]["tokens"] for i in range(n)]

    fresh = [b["tokens"] for b in build_data_loader(train, 2, 0, 0, 1)]
    assert len(fresh) == len(train) // 2
    for k in (2, 6):  # resume after k consumed samples == skip k samples of a fresh loader
        resumed = build_data_loader(train, 2, k, 0, 1)
        for j, batch in zip(range(5), resumed):
            assert torch.equal(batch["tokens"], fresh[k // 2 + j])
    assert torch.equal(fresh[0], torch.stack(ref[0:2]))

    # two data-parallel ranks: each takes its slice of every global micro-batch
    seen = {}
    for rank in (0, 1):
        sampler = MegatronPretrainingSampler(n, 4, 3, rank, 2)
        idx = [i for b in sampler for i in b]
        seen[rank] = idx
        loader = build_data_loader(train, 3, 4, rank, 2)
        first = next(iter(loader))["tokens"]
        assert torch.equal(first, torch.stack(ref[4 + 3 * rank: 7 + 3 * rank]))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(4, 4 + 6 * ((n - 4) // 6)))
    assert seen[0][:6] == [4, 5, 6, 10, 11, 12]
    with pytest.raises(ValueError, match="consumed_samples"):
        MegatronPretrainingSampler(n, n, 2, 0, 1)
    assert build_data_loader(None, 2, 0, 0, 1) is None


def _build_on_rank(rank, world_size, a, b, tokenizer_path, cache):
    tok = load_tokenizer(tokenizer_path)
    train, valid, _ = build_train_valid_test_datasets(
        [a], "90,10,0", SEQ, 99, (32, 4, 0), tok, cache)
    blend, _, _ = build_train_valid_test_datasets(
        ["0.5", a, "0.5", b], "90,10,0", SEQ, 99, (32, 4, 0), tok, cache)
    return (len(train), train[3]["tokens"].tolist(), valid[0]["tokens"].tolist(),
            len(blend), blend[5]["tokens"].tolist(), int(blend[5]["dataset_id"]))


def test_distributed_build_gloo(data, tmp_path):
    """Rank 0 builds the caches, rank 1 waits at the barrier and loads them (gloo, CPU)."""
    from megatron_coe.testing.distributed import run_distributed

    cache = str(tmp_path / "cache")
    results = run_distributed(_build_on_rank, 2, timeout=120, a=data["a"], b=data["b"],
                              tokenizer_path=data["tok_path"], cache=cache)
    assert results[0] == results[1]
    assert sorted(os.listdir(cache)) and any("BlendedDataset" in f for f in os.listdir(cache))
    assert results[0] == _build_on_rank(0, 1, data["a"], data["b"], data["tok_path"], cache)


# ---------------------------------------------------------------------------------------------
# validation errors
# ---------------------------------------------------------------------------------------------
def test_validation_errors(data, tmp_path):
    tok = data["tok"]

    p = _copy_prefix(data["a"], tmp_path, "nobin")
    os.remove(p + ".bin")
    with pytest.raises(DataError, match=r"missing data file .*nobin\.bin"):
        validate_data_prefix(p, tok)
    with pytest.raises(DataError, match=r"missing data file"):  # checked before building
        build_train_valid_test_datasets([p], "90,10,0", SEQ, 1, (8, 1, 0), tok, str(tmp_path / "c"))
    p = _copy_prefix(data["a"], tmp_path, "noidx")
    os.remove(p + ".idx")
    with pytest.raises(DataError, match=r"missing index file .*noidx\.idx"):
        validate_data_prefix(p, tok)
    with pytest.raises(DataError, match=r"missing index file .*nothing\.idx.*check the data path"):
        validate_data_prefix(str(tmp_path / "nothing"), tok)

    p = _copy_prefix(data["a"], tmp_path, "trunc")
    size = os.path.getsize(p + ".bin")
    with open(p + ".bin", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(DataError, match=r"trunc\.bin is truncated"):
        validate_data_prefix(p, tok)

    # tokenizer mismatch, recorded in .meta.json
    other = train_bpe_tokenizer(iter(["a small other corpus", "of two documents"]), 300)
    with pytest.raises(DataError, match=r"tokenizer mismatch .*vocab_size 512.*vocab_size \d+"):
        validate_data_prefix(data["a"], other)
    with pytest.raises(DataError, match="tokenizer mismatch"):
        build_train_valid_test_datasets([data["a"]], "90,10,0", SEQ, 1, (8, 1, 0), other,
                                        str(tmp_path / "c"))
    # ... and without .meta.json: the largest token id must fit the vocabulary
    p = _copy_prefix(data["a"], tmp_path, "nometa")
    os.remove(p + ".meta.json")
    assert validate_data_prefix(p, tok).meta is None
    with pytest.raises(DataError, match=r"holds token id \d+ \(token \d+, document \d+\) but the "
                                        r"training tokenizer has vocab_size \d+: damaged, or made "
                                        r"with another tokenizer"):
        validate_data_prefix(p, other)
    with pytest.warns(UserWarning, match="not checked"):
        validate_data_prefix(p, other, max_scan_bytes=10)

    # a split that gets no documents would make Megatron loop forever: refused
    with pytest.raises(DataError, match="gives the valid split 0 of the 60 documents"):
        build_train_valid_test_datasets([data["b"]], "1000,1,0", SEQ, 1, (8, 1, 0), tok,
                                        str(tmp_path / "c"))
