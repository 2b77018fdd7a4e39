"""Operations features with Megatron-LM's flags: W&B (offline), --profile, --log-straggler,
--overlap-grad-reduce / --overlap-param-gather.

Real runs are tiny (--mock-data, 2 layers, hidden 32, 4 steps; 10-20 s each on 2 CPU ranks):

* an offline W&B run (``WANDB_MODE=offline``, no network): the run directory under
  ``<--save>/wandb`` holds every logged step's train loss and the validation loss, equal to
  ``metrics.jsonl``'s, and the run's options as its config;
* 2 ranks with --overlap-grad-reduce --overlap-param-gather give per-step losses bit-identical
  to the same run without overlap (gloo), and the checkpoint saved after the last step equals
  the one without overlap (the parameter all-gather is forced before saving);
* the same run with --profile --use-pytorch-profiler --profile-ranks 1 writes a Chrome trace of
  iterations 2..3 for rank 1 only; --log-straggler prints the fastest/slowest rank every
  --log-interval steps;
* refusals (one line each): --overlap-param-gather without --overlap-grad-reduce, an empty
  profile window, --profile without the torch profiler on a CPU, a --profile-ranks rank outside
  the world, --profile without --tensorboard-dir, W&B without a run directory.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_coe.testing.train_args import explicit
from megatron_coe.training import metrics, profiling
from megatron_coe.training.errors import SetupError
from megatron_coe.training.options import OptionError, parse_args

PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
        "--moe-router-topk 2 --moe-ffn-hidden-size 32 --coe-iterations 2 --seq-length 32 "
        "--micro-batch-size 2 --global-batch-size 8 --lr 3e-3 --lr-decay-style cosine "
        "--eval-iters 1 --eval-interval 4 --log-interval 2 --train-iters 4 --mock-data "
        "--vocab-size 256 --num-workers 0 --distributed-backend gloo --transformer-impl local"
        ).split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list, nproc: int, tmp: Path, timeout: float = 240, **env) -> str:
    cmd = ([PYTHON, "-m", "megatron_coe.train"] if nproc == 1 else
           [TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "megatron_coe.train"])
    full_env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", **env)
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE"):
        full_env.pop(name, None)
    proc = subprocess.run(cmd + explicit(TINY + args), env=full_env, cwd=tmp, capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    return out


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_losses(path: Path) -> dict:
    return {r["iteration"]: r["lm_loss"] for r in _jsonl(path) if r["type"] == "train"}


# --------------------------------------------------------------------------- W&B
def _wandb_records(path: Path) -> list:
    """The records of a ``run-*.wandb`` file: a 7-byte header, then LevelDB-log blocks of 32 KiB
    whose records are (crc32, length, type) + payload; FIRST/MIDDLE/LAST parts joined."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    records, pos, part = [], 7, b""
    while pos + 7 <= len(data):
        block_left = 32768 - pos % 32768
        if block_left < 7:
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += block_left
            continue
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        part += payload
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            records.append(record)
            part = b""
    return records


@pytest.mark.timeout(240)
@pytest.mark.one_env
def test_wandb_offline_run_directory_holds_the_metrics(tmp_path):
    out = _run(["--save", "ckpt", "--wandb-project", "coe-test", "--wandb-exp-name", "tiny-run"],
               1, tmp_path, WANDB_MODE="offline", WANDB_CONFIG_DIR=str(tmp_path / "wbconfig"),
               WANDB_CACHE_DIR=str(tmp_path / "wbcache"), WANDB_DATA_DIR=str(tmp_path / "wbdata"),
               WANDB_SILENT="true")
    runs = list((tmp_path / "ckpt" / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, out[-2000:]
    history, config, run_name = {}, {}, None
    for record in _wandb_records(runs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "run":
            run_name = record.run.display_name
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
    assert run_name == "tiny-run"
    assert config["wandb_project"] == "coe-test" and config["num_experts"] == 4
    expected = _train_losses(tmp_path / "ckpt" / "metrics.jsonl")
    assert sorted(expected) == [1, 2, 3, 4]
    assert {s: history[s]["train/lm_loss"] for s in expected} == expected
    valid = [r for r in _jsonl(tmp_path / "ckpt" / "metrics.jsonl") if r["type"] == "valid"]
    assert history[4]["valid/lm_loss"] == valid[0]["lm_loss"]
    assert all("train/lr" in history[s] and "train/grad_norm" in history[s] for s in expected)


# --------------------------------------------------------------------------- overlap, profile
@pytest.fixture(scope="module")
def overlap_runs(tmp_path_factory):
    """2 ranks without and with overlap (the latter also profiled on rank 1 and with
    --log-straggler)."""
    root = tmp_path_factory.mktemp("overlap")
    plain = _run(["--save", "plain/ckpt"], 2, root)
    overlapped = _run(["--save", "ovl/ckpt", "--tensorboard-dir", "ovl/tb",
                       "--overlap-grad-reduce", "--overlap-param-gather", "--log-straggler",
                       "--profile", "--use-pytorch-profiler", "--profile-step-start", "1",
                       "--profile-step-end", "3", "--profile-ranks", "1"], 2, root)
    return root, plain, overlapped


@pytest.mark.timeout(300)
def test_overlap_grad_reduce_and_param_gather_are_bit_identical(overlap_runs):
    root, _, _ = overlap_runs
    plain = _train_losses(root / "plain" / "ckpt" / "metrics.jsonl")
    ovl = _train_losses(root / "ovl" / "tb" / "metrics.jsonl")
    assert sorted(plain) == [1, 2, 3, 4] and ovl == plain
    # the saved weights (gathered before the save) are the same bytes as without overlap
    from megatron_coe import checkpointing as fmt

    a = fmt.find_checkpoint(str(root / "plain" / "ckpt"))
    b = fmt.find_checkpoint(str(root / "ovl" / "ckpt"))
    assert a and b and Path(a).name == Path(b).name == "iter_0000004"
    # every saved tensor (weights and optimizer state) identical; not the files' bytes: the
    # common state (Megatron-LM's args, which name the overlap flags) lives inside the .distcp
    # shards from megatron-core 0.17 on
    ta, tb = _saved_tensors(a), _saved_tensors(b)
    assert sorted(ta) == sorted(tb) and any("weight" in k for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, differ


def _saved_tensors(path: str) -> dict:
    """{key: tensor} of every tensor in a torch_dist checkpoint, read in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    state = {k: torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in reader.read_metadata().state_dict_metadata.items()
             if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state


@pytest.mark.timeout(300)
def test_profile_writes_a_torch_trace_for_the_chosen_steps_and_ranks(overlap_runs):
    root, _, out = overlap_runs
    trace_dir = root / "ovl" / "torch_profile"
    assert sorted(p.name for p in trace_dir.iterdir()) == ["rank-1.json.gz"]
    with gzip.open(trace_dir / "rank-1.json.gz", "rt") as f:
        trace = json.load(f)
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)  # real operator events
    assert "rank 1: profiler trace of iterations 2..3 written to" in out


@pytest.mark.timeout(300)
def test_log_straggler_reports_fastest_and_slowest_rank(overlap_runs):
    _, plain, out = overlap_runs
    lines = [l for l in out.splitlines() if l.startswith("straggler:")]
    assert len(lines) == 2  # iterations 2 and 4 (--log-interval 2)
    for line in lines:
        assert re.search(r"fastest rank [01] [0-9.]+ ms \| slowest rank [01] [0-9.]+ ms", line), line
        assert set(re.findall(r"rank (\d)", line)) == {"0", "1"}, line
    assert "straggler:" not in plain


# --------------------------------------------------------------------------- refusals
def test_option_rules_between_ops_flags():
    with pytest.raises(OptionError, match=r"--overlap-param-gather.*needs --overlap-grad-reduce"):
        parse_args(TINY + ["--overlap-param-gather"])
    with pytest.raises(OptionError, match=r"--profile-step-end.*3 is not after "
                                          r"--profile-step-start 3"):
        parse_args(TINY + ["--profile", "--profile-step-start", "3", "--profile-step-end", "3"])


def test_profile_and_wandb_refusals_name_the_flag():
    args = parse_args(TINY + ["--profile", "--use-pytorch-profiler", "--profile-ranks", "0", "2"])
    with pytest.raises(SetupError, match=r"--profile-ranks 2: no such rank \(world size 2\)"):
        profiling.check(args, 2)
    with pytest.raises(SetupError, match=r"set --tensorboard-dir"):
        profiling.check(parse_args(TINY + ["--profile", "--use-pytorch-profiler"]), 2)
    if not torch.cuda.is_available():
        with pytest.raises(SetupError, match=r"--profile without --use-pytorch-profiler .*needs "
                                             r"a CUDA device"):
            profiling.check(parse_args(TINY + ["--profile"]), 1)
    with pytest.raises(SetupError, match=r"--wandb-project p: .*set --wandb-save-dir or --save"):
        metrics.check_wandb(parse_args(TINY + ["--wandb-project", "p"]))
    metrics.check_wandb(parse_args(TINY + ["--wandb-project", "p", "--save", "x"]))


# --------------------------------------------------------------------------- LR styles, tokenizer
@pytest.mark.parametrize("style", ["inverse-square-root", "WSD"])
def test_megatron_lm_lr_decay_styles_follow_megatron_core(style):
    """The LR of every step comes from Megatron-Core's scheduler with the new styles (and the
    WSD decay phase): stable at the peak, then down to --min-lr over --lr-wsd-decay-iters."""
    from megatron_coe.training.setup import build_scheduler

    extra = ["--lr-wsd-decay-iters", "4", "--min-lr", "1e-4"] if style == "WSD" else []
    args = parse_args(TINY + ["--lr-decay-style", style, "--lr-warmup-iters", "2",
                              "--train-iters", "10"] + extra)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=args.lr)
    sched = build_scheduler(args, opt)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(increment=args.global_batch_size)  # in samples, as the trainer steps it
    assert lrs[:3] == pytest.approx([0.0, 1.5e-3, 3e-3])
    if style == "WSD":
        assert lrs[2:7] == pytest.approx([3e-3] * 5)  # stable until the last 4 decay steps
        assert lrs[7] < 3e-3 and lrs[9] < lrs[8] < lrs[7] and lrs[9] >= 1e-4
    else:  # lr * sqrt(warmup) / sqrt(step)
        assert lrs[8] == pytest.approx(3e-3 * (2 ** 0.5) / (8 ** 0.5))
    with pytest.raises(OptionError, match=r"--lr-wsd-decay-iters.*WSD; valid: 1\.\.10"):
        parse_args(TINY + ["--lr-decay-style", "WSD", "--train-iters", "10"])


def test_tokenizer_type_huggingface_is_accepted_and_others_named():
    assert parse_args(TINY + ["--tokenizer-type", "HuggingFaceTokenizer"]).tokenizer_type == \
        "HuggingFaceTokenizer"
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--tokenizer-type", "GPT2BPETokenizer"])
