"""Fault injection: the Hugging Face exporter, the HF importer and the data tools with bad inputs.

Each case runs the real command-line tool in a subprocess and asserts the exit status, that stderr
is one line naming the file / field (no traceback), a time bound (``bound()``: a multiple of a
start-up measured in the same test), and what must not change:

* ``tools/convert_to_hf.py``: a failed export leaves ``--save`` byte-identical (refused directory,
  bad tokenizer, damaged checkpoint, interrupted write); a successful one keeps files it did not
  write and writes mode 0644 files listed in its manifest;
* ``tools/convert_from_hf.py``: a ``config.json`` that does not fit the weights, invalid JSON,
  missing / damaged shards, an unknown ``model_type``: refused before any worker starts, nothing
  written under ``--save``;
* data: a token id >= the tokenizer's vocabulary in a ``.bin`` and a damaged ``.idx`` are refused
  by the trainer at start-up; non-UTF-8 and damaged gzip input to ``tools/preprocess_data.py``
  name the file (and line); an existing output prefix is replaced only with ``--overwrite``; data
  made with ``--tokenizer-model`` carries that tokenizer, so training on it needs no flag.

Fixtures: 200 GSM8K problems (``megatron_coe.testing.data.gsm8k_subset``) and a 2-step trainer
checkpoint of a tiny CoE-2 model (one process), both built once per module (~10 s).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_coe.testing.tools import load_tool
from megatron_coe.testing.train_args import explicit

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # subprocesses are forked after tokenizing

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
HANG_S = 600  # stops a hung tool; a guard, not a speed claim (a loaded machine is slow)
ENV = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           PYTHONWARNINGS="ignore")
TRAIN = ("--num-layers 1 --hidden-size 32 --num-attention-heads 4 --num-experts 4 --moe-router-topk 2 "
         "--moe-ffn-hidden-size 16 --coe-iterations 2 --seq-length 32 --micro-batch-size 2 "
         "--global-batch-size 2 --lr 1e-3 --split 95,5,0 --eval-iters 0 --log-interval 1").split()

# release-independent tool faults, many processes: the 0.16 environment runs them (suite time)
pytestmark = [pytest.mark.timeout(2 * HANG_S), pytest.mark.one_env]


def bound() -> float:
    """The time bound of a refused command, measured in the test that asserts it: 10 x the start
    of a Python process that imports torch and Megatron-Core (what every tool does first; a
    refusal takes about one such start), so that a loaded machine scales both alike."""
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import torch, megatron.core.parallel_state"],
                   env=ENV, check=True, timeout=HANG_S)
    return 10 * (time.time() - t0)


def run(argv, cwd=None, timeout=HANG_S):
    """(returncode, stdout, stderr, seconds) of ``python argv`` with umask 022."""
    t0 = time.time()
    argv = [str(a) for a in argv]
    if argv[:2] == ["-m", "megatron_coe.train"]:  # the values these tests were written with
        argv = argv[:2] + explicit(argv[2:])
    p = subprocess.run([sys.executable, *argv], cwd=cwd or ROOT, env=ENV, capture_output=True,
                       text=True, timeout=timeout + 30, preexec_fn=lambda: os.umask(0o022))
    return p.returncode, p.stdout, p.stderr, time.time() - t0


_TOOLS: dict = {}


def tool(name: str, *argv):
    """(returncode, stdout, stderr, seconds) of ``tools/<name>.py argv`` run in this process
    (its ``main`` returns the exit status; no interpreter start-up per case), umask 022."""
    import contextlib
    import io
    import signal

    if name not in _TOOLS:
        _TOOLS[name] = load_tool(name, f"tool_{name}")
    out, err = io.StringIO(), io.StringIO()
    handler, mask = signal.getsignal(signal.SIGTERM), os.umask(0o022)
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = _TOOLS[name].main([str(a) for a in argv])
            except SystemExit as e:  # argparse
                rc = e.code
    finally:
        os.umask(mask)
        signal.signal(signal.SIGTERM, handler)
    return rc, out.getvalue(), err.getvalue(), time.time() - t0


def one_error_line(stderr: str, prog: str) -> str:
    """stderr is exactly one line, ``<prog>: error: ...``, with no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


def snapshot(path: Path) -> dict:
    """Every entry under ``path``: relative name -> (kind, sha256 of content or link target, mode)."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        if p.is_symlink():
            out[str(p.relative_to(path))] = ("link", os.readlink(p), None)
        elif p.is_dir():
            out[str(p.relative_to(path))] = ("dir", None, st.st_mode)
        else:
            out[str(p.relative_to(path))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode)
    return out


def staging_leftovers(save: Path) -> list:
    return [n for n in os.listdir(save.parent) if n.startswith(f".{save.name}.export-")]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    from megatron_coe.testing.data import gsm8k_subset

    return gsm8k_subset(tmp_path_factory.mktemp("gsm8k"), num_docs=200, vocab_size=300)


@pytest.fixture(scope="module")
def ckpt(data, tmp_path_factory) -> Path:
    """A published trainer checkpoint (2 steps, 1 process) whose run's tokenizer exists."""
    root = tmp_path_factory.mktemp("run")
    rc, out, err, _ = run(["-m", "megatron_coe.train", *TRAIN, "--train-iters", "2", "--data-path", data,
                           "--save", root / "ckpt", "--data-cache-path", root / "cache"], timeout=HANG_S)
    assert rc == 0, out + err
    return root / "ckpt"


@pytest.fixture(scope="module")
def hf(ckpt, tmp_path_factory) -> Path:
    """A clean export of ``ckpt`` (the source of the import cases)."""
    out = tmp_path_factory.mktemp("hf") / "model"
    rc, stdout, err, _ = run([TOOLS / "convert_to_hf.py", "--load", ckpt, "--save", out, "--no-progress"])
    assert rc == 0, stdout + err
    return out


def export(ckpt, save, *extra, subprocess=False):
    argv = ["--load", ckpt, "--save", save, "--no-progress", *extra]
    return run([TOOLS / "convert_to_hf.py", *argv]) if subprocess else tool("convert_to_hf", *argv)


def save_pretrained_dir(path: Path) -> Path:
    """What a user may have in an output directory: save_pretrained weights and other files."""
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights of another model" * 100)
    (path / "other_model.safetensors").write_bytes(b"unrelated weights" * 100)
    (path / "README.md").write_text("notes\n")
    (path / "sub").mkdir()
    (path / "sub" / "data.txt").write_text("kept\n")
    return path


# --------------------------------------------------------------------------- exporter
def test_export_refuses_non_empty_foreign_directory_and_changes_nothing(ckpt, tmp_path):
    save = save_pretrained_dir(tmp_path / "out")
    before = snapshot(save)
    rc, _, err, seconds = export(ckpt, save, subprocess=True)  # the real exit status and stderr
    assert rc == 2 and seconds < bound()
    line = one_error_line(err, "convert_to_hf")
    assert f"--save {save} is not empty" in line and "--overwrite" in line and "coe_export.json" in line
    assert snapshot(save) == before
    assert not staging_leftovers(save)


@pytest.mark.parametrize("tokenizer", ["missing", "bad_json"])
def test_export_bad_tokenizer_leaves_previous_export_byte_identical(ckpt, tmp_path, tokenizer):
    save = tmp_path / "out"
    assert export(ckpt, save)[0] == 0
    before = snapshot(save)
    tok = tmp_path / "tokenizer.json"
    if tokenizer == "bad_json":
        tok.write_text("{not json")
    rc, _, err, seconds = export(ckpt, save, "--tokenizer", tok)
    assert rc == 2 and seconds < bound()
    line = one_error_line(err, "convert_to_hf")
    assert "--tokenizer" in line and str(tok) in line
    assert snapshot(save) == before  # the old weights are still there, unchanged
    assert not staging_leftovers(save)


def test_export_damaged_checkpoint_leaves_save_byte_identical(ckpt, tmp_path):
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpt, bad)
    shard = sorted(bad.glob("iter_*/*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 3)
    save = tmp_path / "out"
    assert export(ckpt, save)[0] == 0
    (save / "NOTES").write_text("mine\n")
    before = snapshot(save)
    rc, _, err, seconds = export(bad, save)
    assert rc == 2 and seconds < bound()
    line = one_error_line(err, "convert_to_hf")
    assert str(bad) in line and "damaged" in line
    assert snapshot(save) == before
    assert not staging_leftovers(save)


def test_export_interrupted_while_writing_leaves_save_unchanged(ckpt, tmp_path):
    """An interruption after the first files are staged (KeyboardInterrupt, also what SIGTERM
    becomes in the CLI) removes the staging directory; --save is untouched."""
    from megatron_coe.conversion.export import write_hf_model
    from megatron_coe.conversion.megatron_ckpt import MegatronCheckpoint

    save = tmp_path / "out"
    assert export(ckpt, save)[0] == 0
    before = snapshot(save)
    ck = MegatronCheckpoint(str(ckpt))

    def interrupted(layer):
        assert staging_leftovers(save), "the export is staged beside --save"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_hf_model(str(save), ck.arch, interrupted, ck.read_non_layer(), show_progress=False,
                       log=lambda *a: None)
    assert snapshot(save) == before
    assert not staging_leftovers(save)


@pytest.mark.parametrize("case", ["file", "overlaps_load", "shard_size"])
def test_export_bad_options_refused_before_writing(ckpt, tmp_path, case):
    save, extra = tmp_path / "out", []
    if case == "file":
        save.write_text("a file")
        want = "is an existing file"
    elif case == "overlaps_load":
        save = ckpt
        want = "overlaps the checkpoint"
    else:
        extra, want = ["--max-shard-size", "5XB"], "cannot parse size '5XB'"
    before = snapshot(tmp_path) if case != "overlaps_load" else snapshot(ckpt)
    rc, _, err, seconds = export(ckpt, save, *extra)
    assert rc == 2 and seconds < bound()
    assert want in one_error_line(err, "convert_to_hf")
    assert (snapshot(tmp_path) if case != "overlaps_load" else snapshot(ckpt)) == before


def test_export_overwrite_keeps_unrelated_files_and_writes_0644(ckpt, tmp_path):
    save = save_pretrained_dir(tmp_path / "out")
    kept = {k: v for k, v in snapshot(save).items() if k != "model.safetensors"}
    rc, out, err, seconds = export(ckpt, save, "--overwrite")
    assert rc == 0 and seconds < bound(), out + err
    assert "--overwrite: replacing model.safetensors" in out
    after = snapshot(save)
    for name, entry in kept.items():  # other_model.safetensors, README.md, sub/, sub/data.txt
        assert after[name] == entry, name
    # the old save_pretrained weights would shadow the export in transformers: replaced
    assert "model.safetensors" not in after
    manifest = json.loads((save / "coe_export.json").read_text())
    assert manifest["tool"] == "megatron-coe convert_to_hf"
    written = set(manifest["files"]) | {"coe_export.json"}
    assert written == set(after) - set(kept)
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json",
            "model-00001-of-00001.safetensors"} <= written
    for name in written:
        assert (save / name).stat().st_mode & 0o777 == 0o644, name
    assert not staging_leftovers(save)

    from safetensors.torch import load_file

    assert load_file(str(save / "model-00001-of-00001.safetensors"))  # a readable export


def test_reexport_replaces_only_files_of_the_previous_export(ckpt, tmp_path):
    save = tmp_path / "out"
    assert export(ckpt, save, "--max-shard-size", "30KB")[0] == 0
    assert len(list(save.glob("model-*-of-*.safetensors"))) >= 2
    (save / "README.md").write_text("my notes\n")
    (save / "other_model.safetensors").write_bytes(b"x" * 10)
    kept = {k: v for k, v in snapshot(save).items() if k in ("README.md", "other_model.safetensors")}
    rc, out, err, _ = export(ckpt, save)  # no --overwrite needed: --save is a previous export
    assert rc == 0, out + err
    after = snapshot(save)
    assert {k: after[k] for k in kept} == kept
    assert sorted(p.name for p in save.glob("model-*.safetensors")) == ["model-00001-of-00001.safetensors"]
    # a model.safetensors the previous export did not write is refused without --overwrite
    (save / "model.safetensors").write_bytes(b"y")
    before = snapshot(save)
    rc, _, err, _ = export(ckpt, save)
    assert rc == 2 and "model.safetensors" in one_error_line(err, "convert_to_hf")
    assert snapshot(save) == before


# --------------------------------------------------------------------------- importer
def _edit_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


IMPORT_CASES = {
    "hidden_size": (dict(hidden_size=64), "config.json: hidden_size is 64 but the weights"),
    "num_experts_per_tok": (dict(num_experts_per_tok=5), "config.json: num_experts_per_tok 5 is larger than "
                                                         "n_routed_experts 4"),
    "num_experts_per_tok_type": (dict(num_experts_per_tok="2"), "config.json: num_experts_per_tok must be a "
                                                                "positive integer, got '2'"),
    "n_routed_experts": (dict(n_routed_experts=8), "config.json: n_routed_experts is 8 but the weights"),
    "num_hidden_layers": (dict(num_hidden_layers=3), "config.json: num_hidden_layers is 3 but the weights"),
    "inner_iter": (dict(inner_iter=3), "config.json: inner_iter is 3 but the weights"),
    "head_dim": (dict(head_dim=16), "has shape [32, 32] but config.json implies"),
    # the list comes from the one registry (families.IMPORTABLE_MODEL_TYPES): every stock family
    # that imports is named (deepseek_v3, qwen3_moe and mixtral were left out)
    "model_type": (dict(model_type="llama"), "config.json: unsupported Hugging Face model_type 'llama': "
                   "supported are coe_deepseekv2, coe_gpt, coe_megatron, deepseek_v2, deepseek_v3, "
                   "qwen3_moe, mixtral (the CoE exports of this project and the stock MoE families "
                   "deepseek_v2, deepseek_v3, qwen3_moe, mixtral)"),
    "missing_field": (dict(hidden_size=None), "config.json: the field 'hidden_size' is missing"),
    # models the architecture record (so the trainer) cannot express are refused, not converted
    "hidden_act": (dict(hidden_act="relu"), "config.json: cannot convert this Hugging Face model: "
                                            "hidden_act 'relu'"),
    "rope_interleaved": (dict(rope_interleaved=True), "config.json: cannot convert this Hugging Face "
                                                      "model: rope_interleaved (interleaved RoPE) has "
                                                      "no trainer option"),
}


@pytest.mark.parametrize("case", list(IMPORT_CASES) + ["invalid_json", "missing_shard", "damaged_shard",
                                                      "bad_index"])
def test_import_bad_source_is_one_line_before_any_worker(hf, tmp_path, case):
    src = tmp_path / "hf"
    if case in IMPORT_CASES:
        changes, want = IMPORT_CASES[case]
        _edit_config(hf, src, **changes)
    else:
        shutil.copytree(hf, src)
        shard = src / "model-00001-of-00001.safetensors"
        if case == "invalid_json":
            (src / "config.json").write_text('{"model_type": "coe_gpt",')
            want = f"{src}/config.json is not valid JSON"
        elif case == "missing_shard":
            shard.unlink()
            want = f"{src} is incomplete: missing weight shard(s) ['{shard.name}']"
        elif case == "damaged_shard":
            os.truncate(shard, shard.stat().st_size - 1000)
            want = f"{shard} is not a readable safetensors file"
        else:
            (src / "model.safetensors.index.json").write_text("{}")
            want = "model.safetensors.index.json has no \"weight_map\""
    save = tmp_path / "ckpt"
    argv = ["--load", src, "--save", save]
    if case == "hidden_size":  # one case through a real interpreter: exit status and stderr
        rc, out, err, seconds = run([TOOLS / "convert_from_hf.py", *argv])
    else:
        rc, out, err, seconds = tool("convert_from_hf", *argv)
    assert rc == 2 and seconds < bound(), out + err
    line = one_error_line(err, "convert_from_hf")
    assert want in line, line
    assert "importing" not in out  # refused before the workers (which are started after that line)
    assert not save.exists()


# --------------------------------------------------------------------------- data
def _copy_prefix(prefix: str, dst: Path) -> str:
    dst.mkdir()
    for suffix in (".bin", ".idx", ".meta.json", ".tokenizer.json"):
        shutil.copy(prefix + suffix, dst / ("gsm8k" + suffix))
    return str(dst / "gsm8k")


def _train(prefix: str, tmp_path: Path):
    return run(["-m", "megatron_coe.train", *TRAIN, "--train-iters", "2", "--data-path", prefix,
                "--data-cache-path", tmp_path / "cache"])


def test_token_id_over_vocab_in_bin_refused_at_start(data, tmp_path):
    """Bit rot in a .bin whose .meta.json matches the tokenizer: refused before step 1 (it was an
    IndexError in the embedding at step 1, or silently wrong ids below the padded vocabulary)."""
    prefix = _copy_prefix(data, tmp_path / "d")
    tokens = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    tokens[5000] = 300  # == the tokenizer's vocab_size, below the padded vocabulary (384)
    tokens.flush()
    del tokens
    rc, out, err, seconds = _train(prefix, tmp_path)
    assert rc == 2 and seconds < bound(), out + err
    line = one_error_line(err, "coe-train")
    assert f"{prefix}.bin holds token id 300 (token 5000, document" in line
    assert "vocab_size 300" in line and "damaged" in line
    assert "training from iteration" not in out


@pytest.mark.parametrize("damage", ["pointer", "length", "document_index"])
def test_damaged_idx_refused_at_start(data, tmp_path, damage):
    prefix = _copy_prefix(data, tmp_path / "d")
    idx = prefix + ".idx"
    with open(idx, "rb") as f:
        _, _, n_seq, n_doc = struct.unpack("<QBQQ", f.read(34)[9:])
    with open(idx, "r+b") as f:
        if damage == "pointer":
            f.seek(34 + 4 * n_seq + 8 * 50)
            f.write(struct.pack("<q", 10**12))
            want = f"{idx} is damaged: sequence 50 points to byte 1000000000000"
        elif damage == "length":
            f.seek(34 + 4 * 7)
            f.write(struct.pack("<i", -3))
            want = f"{idx} is damaged: sequence 7 has length -3"
        else:
            f.seek(34 + 12 * n_seq + 8 * (n_doc - 1))
            f.write(struct.pack("<q", n_seq + 5))
            want = f"{idx} is damaged: its document index"
    rc, out, err, seconds = _train(prefix, tmp_path)
    assert rc == 2 and seconds < bound(), out + err
    assert want in one_error_line(err, "coe-train")
    assert "training from iteration" not in out


def _gsm8k_test_jsonl(path: Path, n: int) -> Path:
    with gzip.open(ROOT / "data/gsm8k/test.jsonl.gz", "rt") as f, open(path, "w") as out:
        for _, line in zip(range(n), f):
            out.write(line)
    return path


def test_data_preprocessed_with_a_given_tokenizer_trains_without_the_flag(data, tmp_path):
    """--tokenizer-model is kept beside the data (<prefix>.tokenizer.json, byte-identical), as a
    tokenizer trained by preprocess_data.py is: training on the prefix alone works (it was refused:
    tokenizer file <prefix>.tokenizer.json does not exist, unless --tokenizer-model was given again)."""
    src = _gsm8k_test_jsonl(tmp_path / "test.jsonl", 80)
    given = Path(data + ".tokenizer.json")
    prefix = tmp_path / "d" / "gsm8k_test"
    rc, out, err, _ = tool("preprocess_data", "--input", src, "--json-keys", "question", "answer",
                           "--tokenizer-model", given, "--output-prefix", prefix)
    assert rc == 0, out + err
    kept = Path(f"{prefix}.tokenizer.json")
    assert kept.read_bytes() == given.read_bytes()
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    assert meta["tokenizer"]["path"] == str(kept) and meta["tokenizer"]["copied_from"] == str(given)
    assert f"tokenizer copied from {given}" in out
    rc, out, err, _ = _train(str(prefix), tmp_path)  # no --tokenizer-model
    assert rc == 0, out + err
    assert "training from iteration 0 to 2" in out and "iter 2/2" in out, out


def test_preprocess_refuses_to_replace_an_existing_prefix(data, tmp_path):
    """An output prefix holding any file a run writes is replaced only with --overwrite (one line,
    nothing changed); the prefix's own tokenizer given as --tokenizer-model is no conflict."""
    src = _gsm8k_test_jsonl(tmp_path / "test.jsonl", 40)
    prefix = _copy_prefix(data, tmp_path / "d")
    before = snapshot(tmp_path / "d")
    argv = ["--input", src, "--json-keys", "question", "answer", "--output-prefix", prefix]
    rc, out, err, _ = tool("preprocess_data", *argv, "--vocab-size", "300")
    assert rc == 1, out + err
    assert one_error_line(err, "preprocess_data.py") == (
        f"preprocess_data.py: error: --output-prefix {prefix} already holds gsm8k.bin, gsm8k.idx, "
        "gsm8k.meta.json, gsm8k.tokenizer.json: choose another prefix, or pass --overwrite to "
        "replace them")
    assert snapshot(tmp_path / "d") == before
    # one file of a prefix is enough; the prefix's own tokenizer is kept, not a conflict
    for suffix in (".bin", ".meta.json"):
        os.remove(prefix + suffix)
    own_tokenizer = ["--tokenizer-model", prefix + ".tokenizer.json"]
    rc, out, err, _ = tool("preprocess_data", *argv, *own_tokenizer)
    assert rc == 1 and one_error_line(err, "preprocess_data.py").endswith(
        f"--output-prefix {prefix} already holds gsm8k.idx: choose another prefix, or pass "
        "--overwrite to replace them"), err
    rc, out, err, _ = tool("preprocess_data", *argv, *own_tokenizer, "--overwrite")
    assert rc == 0, out + err
    after = snapshot(tmp_path / "d")
    assert after["gsm8k.tokenizer.json"] == before["gsm8k.tokenizer.json"]
    assert after["gsm8k.idx"] != before["gsm8k.idx"]  # 40 test problems, not 200 train ones
    assert json.loads(Path(prefix + ".meta.json").read_text())["num_documents"] == 40
    assert sorted(after) == sorted(before)  # no temporary left behind


@pytest.mark.parametrize("kind", ["jsonl", "txt", "txt.gz", "bad_gzip", "truncated_gzip"])
def test_preprocess_bad_input_names_file_and_line(tmp_path, kind):
    src = tmp_path / f"input.{'jsonl.gz' if 'gzip' in kind else kind}"
    if kind == "jsonl":
        src.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
        want = f"{src}:2: not valid UTF-8 (byte 0xe9 at column 14)"
    elif kind in ("txt", "txt.gz"):
        body = b"hello world\n\nsecond block\ncaf\xe9 au lait\n"
        src.write_bytes(gzip.compress(body) if kind == "txt.gz" else body)
        want = f"{src}:4: not valid UTF-8 (byte 0xe9 at column 4)"
    elif kind == "bad_gzip":
        src.write_bytes(b'{"text": "not compressed"}\n')
        want = f"{src}: not a valid gzip file"
    else:
        words = np.random.default_rng(0).integers(0, 10**6, 20000)
        body = "".join(f'{{"text": "document {w}"}}\n' for w in words).encode()
        packed = gzip.compress(body)
        src.write_bytes(packed[: len(packed) // 2])
        want = f"{src}: the gzip stream ends early"
    out_prefix = tmp_path / "out" / "data"
    argv = ["--input", src, "--vocab-size", "300", "--output-prefix", out_prefix]
    if kind == "jsonl":
        rc, out, err, seconds = run([TOOLS / "preprocess_data.py", *argv])
    else:
        rc, out, err, seconds = tool("preprocess_data", *argv)
    assert rc == 1 and seconds < bound(), out + err
    lines = [line for line in err.splitlines() if line.strip() and "training a byte-level BPE" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("preprocess_data.py: error: ") and want in lines[0], lines[0]
    assert not list(out_prefix.parent.glob("data.*"))  # nothing that looks like a dataset


@pytest.mark.parametrize("name,argv,want", [
    ("convert_from_hf", ["--load", "x", "--save", "y", "--seq-length", "0"],
     "argument --seq-length: must be a positive integer, got 0"),
    ("convert_from_hf", ["--load", "x", "--save", "y", "--expert-model-parallel-size", "-2"],
     "argument --expert-model-parallel-size: must be a positive integer, got -2"),
    ("convert_to_hf", ["--load", "x", "--save", "y", "--dtype", "fp8"], "argument --dtype: invalid choice"),
    ("preprocess_data", ["--input", "x.jsonl", "--output-prefix", "y", "--vocab-size", "abc"],
     "argument --vocab-size: invalid int value: 'abc'"),
    # negative values in any notation reach the option's own check (they were "expected one
    # argument": argparse took -1e3 for an unknown option)
    ("convert_from_hf", ["--load", "x", "--save", "y", "--seq-length", "-1e3"],
     "argument --seq-length: invalid positive_int value: '-1e3'"),
    ("convert_from_hf", ["--load", "x", "--save", "y", "--upcycle-topk", "-2"],
     "argument --upcycle-topk: must be a positive integer, got -2"),
    ("preprocess_data", ["--input", "x.jsonl", "--output-prefix", "y", "--vocab-size", "-1e3"],
     "argument --vocab-size: invalid int value: '-1e3'"),
    ("preprocess_data", ["--input", "x.jsonl", "--output-prefix", "y", "--vocab-size", "300",
                         "--log-interval", "-1.5e-1"],
     "argument --log-interval: must be a finite number of seconds >= 0, got -0.15"),
    ("preprocess_data", ["--input", "x.jsonl", "--output-prefix", "y", "--vocab-size", "-300"],
     "argument --vocab-size: must be >= 258 (256 byte symbols and the special tokens), got -300"),
])
def test_cli_usage_errors_are_one_line(tmp_path, name, argv, want):
    rc, _, err, seconds = tool(name, *argv)
    assert rc == 2 and seconds < bound()
    assert want in one_error_line(err, "preprocess_data.py" if name == "preprocess_data" else name)
