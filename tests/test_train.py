"""The trainer (``python -m megatron_coe.train``) end to end, on a slice of GSM8K and 2 CPU ranks.

Fast, in-process: options and YAML, example configs, every user error the trainer reports before
building anything (data, tokenizer, batch arithmetic, checkpoint shape), checkpoint discovery.
Real runs (torchrun, gloo, a tiny CoE-2: standard attention, 8 experts + 1 shared):

* EP=2 over 2 processes trains: the loss falls;
* a run SIGKILLed after its step-10 checkpoint and resumed with --load reproduces the
  uninterrupted run's per-step losses 11..20 bit for bit (unpublished ``iter_*.tmp`` ignored);
* the EP=2 checkpoint loads into one process (EP=1) and at TP=2 with the same validation loss;
* PP=2 trains; SIGTERM saves at the next step boundary and exits 0.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_coe.training import checkpoint as ckpt
from megatron_coe.training.options import OptionError, parse_args
from megatron_coe.training.setup import SetupError, build_model_config, check_layout

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TINY = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 8 "
        "--moe-router-topk 2 --moe-ffn-hidden-size 32 --moe-shared-expert-intermediate-size 32 "
        "--coe-iterations 2 --moe-router-pre-softmax --moe-router-load-balancing-type seq_aux_loss "
        "--moe-aux-loss-coeff 1e-2 --swiglu --seq-length 32 --micro-batch-size 2 "
        "--global-batch-size 8 --lr 3e-3 --lr-warmup-iters 2 --split 95,5,0 --eval-iters 2 "
        "--eval-interval 10 --log-interval 5 --train-iters 30").split()


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory) -> dict:
    """400 GSM8K problems -> a 512-token BPE and a Megatron indexed dataset."""
    from megatron_coe.data import preprocess as pp

    root = tmp_path_factory.mktemp("gsm8k")
    src = root / "train.jsonl"
    with gzip.open(ROOT / "data/gsm8k/train.jsonl.gz", "rt") as f, open(src, "w") as out:
        for _, line in zip(range(400), f):
            out.write(line)
    prefix = str(root / "gsm8k")
    pp.preprocess([str(src)], prefix, json_keys=["question", "answer"], vocab_size=512,
                  log=lambda *a: None)
    return {"prefix": prefix, "dir": root}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(args: list, nproc: int) -> list:
    if nproc == 1:
        return [PYTHON, "-m", "megatron_coe.train", *args]
    return [TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "megatron_coe.train", *args]


def _env() -> dict:
    return dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")


def launch(args: list, nproc: int, log: Path) -> subprocess.Popen:
    return subprocess.Popen(_command([str(a) for a in args], nproc), cwd=ROOT, env=_env(),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def run(args: list, nproc: int, log: Path, timeout: float = 180, expect_rc: int = 0) -> str:
    proc = launch(args, nproc, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"run timed out after {timeout}s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert rc == expect_rc, f"exit code {rc} (expected {expect_rc}):\n{text[-4000:]}"
    return text


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and all its descendants (ranks, checkpoint helper processes)."""
    try:
        procs = [psutil.Process(proc.pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in reversed(procs):  # ranks first, then the launcher
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


def metrics(path: Path) -> dict:
    """{(type, iteration): record}; the last record wins; a torn last line is skipped."""
    out = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        out[(r["type"], r["iteration"])] = r
    return out


def train_losses(m: dict) -> dict:
    return {i: r["lm_loss"] for (t, i), r in m.items() if t == "train"}


def data_args(gsm8k) -> list:
    return ["--data-path", gsm8k["prefix"]]


# --------------------------------------------------------------------------- fast checks
def test_yaml_and_flags_one_table(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num-layers: 3\nmoe_router_topk: 4\nlr: 3e-4\ncoe_inner_residual: false\n"
                   "data_path: [a, b]\n")
    args = parse_args(["--config", str(cfg), "--moe-router-topk", "2"])
    assert (args.num_layers, args.moe_router_topk, args.lr) == (3, 2, 3e-4)  # flag > file
    assert args.coe_inner_residual is False and args.data_path == ["a", "b"]
    assert parse_args(["--no-coe-inner-residual"]).coe_inner_residual is False


def test_unknown_config_key_names_it_and_suggests(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_layer: 2\n")
    with pytest.raises(OptionError, match=r"unknown key 'num_layer'.*Did you mean 'num_layers'"):
        parse_args(["--config", str(cfg)])
    cfg.write_text("train_iters: many\n")
    with pytest.raises(OptionError, match="train_iters"):
        parse_args(["--config", str(cfg)])


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix()
                                        for p in ROOT.glob("examples/**/*.yaml")))
def test_example_configs_parse_and_validate(path):
    args = parse_args(["--config", str(ROOT / path)])
    config = build_model_config(args)
    assert config.num_moe_experts == args.num_experts and config.coe_iterations >= 1


def test_batch_arithmetic_error_says_what_to_change():
    args = parse_args(["--global-batch-size", "10", "--micro-batch-size", "2"])
    with pytest.raises(SetupError, match=r"--global-batch-size 10 is not divisible by "
                                         r"--micro-batch-size 2 x data-parallel size 2 = 4"):
        check_layout(args, world_size=2)
    assert check_layout(parse_args(["--global-batch-size", "8"]), 2).num_microbatches == 2


def test_preflight_reports_data_tokenizer_and_shape_errors(gsm8k, tmp_path):
    from megatron_coe.data.datasets import DataError
    from megatron_coe.data.tokenizer import train_bpe_tokenizer
    from megatron_coe.training.trainer import preflight

    base = [*TINY, *data_args(gsm8k)]
    assert preflight(parse_args(base), 1).vocab_size == 512

    with pytest.raises(DataError, match=r"missing.*nope\.idx"):
        preflight(parse_args([*TINY, "--data-path", str(tmp_path / "nope")]), 1)

    trunc = str(tmp_path / "trunc")
    for ext in (".idx", ".meta.json", ".tokenizer.json"):
        shutil.copy(gsm8k["prefix"] + ext, trunc + ext)
    Path(trunc + ".bin").write_bytes(Path(gsm8k["prefix"] + ".bin").read_bytes()[:1000])
    with pytest.raises(DataError, match="truncated"):
        preflight(parse_args([*TINY, "--data-path", trunc]), 1)

    other = str(tmp_path / "other.tokenizer.json")
    train_bpe_tokenizer(["a b c"] * 20 + ["xyz"] * 5, 300, save_path=other)
    with pytest.raises(DataError, match="tokenizer mismatch"):
        preflight(parse_args([*base, "--tokenizer-model", other]), 1)

    with pytest.raises(SetupError, match="fp8"):
        preflight(parse_args([*base, "--fp8-format", "hybrid"]), 1)


def _fake_checkpoint(root: Path, iteration: int, args, vocab: int = 512, suffix: str = ""):
    path = Path(ckpt.iteration_dir(str(root), iteration) + suffix)
    path.mkdir(parents=True)
    (path / ckpt.META).write_text(json.dumps({"iteration": iteration, "vocab_size": vocab,
                                              "args": args.to_dict()}))
    return path


def test_load_picks_only_published_checkpoints(tmp_path):
    args = parse_args(TINY)
    assert ckpt.find_checkpoint(str(tmp_path)) is None
    _fake_checkpoint(tmp_path, 10, args)
    _fake_checkpoint(tmp_path, 30, args, suffix=".tmp")  # interrupted while being written
    (tmp_path / "iter_0000040.tmp").mkdir()               # died before writing anything
    (tmp_path / "iter_0000020").mkdir()                   # foreign / incomplete: no metadata
    assert ckpt.find_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000010")
    assert ckpt.find_checkpoint(str(tmp_path / "iter_0000010")) == str(tmp_path / "iter_0000010")


def test_load_with_other_model_shape_names_the_fields(tmp_path):
    saved = parse_args(TINY)
    path = _fake_checkpoint(tmp_path, 10, saved)
    run_args = parse_args([*TINY, "--hidden-size", "64", "--num-experts", "16",
                           "--moe-router-topk", "4"])  # top-k changes no shape: allowed
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.check_compatible(ckpt.read_meta(str(path)), run_args, 512, str(path))
    msg = str(err.value)
    assert "hidden_size (--hidden-size): checkpoint 32, this run 64" in msg
    assert "num_experts (--num-experts): checkpoint 8, this run 16" in msg
    assert "topk" not in msg
    with pytest.raises(ckpt.CheckpointError, match="vocab"):
        ckpt.check_compatible(ckpt.read_meta(str(path)), saved, 1024, str(path))


# --------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def reference(gsm8k):
    """Uninterrupted EP=2 run: checkpoints at 10 and 20, exits after step 20 (of a 30-step plan)."""
    out = gsm8k["dir"] / "reference"
    args = [*TINY, *data_args(gsm8k), "--expert-model-parallel-size", "2", "--save",
            out / "ckpt", "--save-interval", "10", "--exit-interval", "20", "--tensorboard-dir",
            out / "tb"]
    log = run(args, 2, gsm8k["dir"] / "reference.log")
    return {"out": out, "log": log, "metrics": metrics(out / "tb" / "metrics.jsonl")}


@pytest.mark.timeout(300)
def test_ep2_run_trains_and_reports(reference):
    losses = train_losses(reference["metrics"])
    assert sorted(losses) == list(range(1, 21))
    first, last = sum(losses[i] for i in (1, 2, 3)) / 3, sum(losses[i] for i in (18, 19, 20)) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"
    record = reference["metrics"][("train", 20)]
    assert {"seq_load_balancing_loss_pass1", "seq_load_balancing_loss_pass2"} <= set(record["aux"])
    assert {"layer1_pass1", "layer2_pass2"} <= set(record["load_imbalance"])
    assert record["grad_norm"] > 0 and record["tokens_per_s"] > 0
    assert "iter 20/30 | lm loss" in reference["log"] and "ETA" in reference["log"]
    assert list((reference["out"] / "tb").glob("events.out.tfevents.*"))
    ckpt_dir = reference["out"] / "ckpt"
    assert (ckpt_dir / ckpt.TRACKER).read_text().strip() == "20"
    assert not list(ckpt_dir.glob("*.tmp"))


@pytest.mark.timeout(300)
def test_sigkill_after_checkpoint_then_resume_is_bit_exact(gsm8k, reference):
    out = gsm8k["dir"] / "killed"
    args = [*TINY, *data_args(gsm8k), "--expert-model-parallel-size", "2", "--save",
            out / "ckpt", "--save-interval", "10", "--tensorboard-dir", out / "tb"]
    proc = launch(args, 2, gsm8k["dir"] / "killed.log")
    tracker = out / "ckpt" / ckpt.TRACKER
    deadline = time.time() + 180
    while not (tracker.exists() and tracker.read_text().strip() == "10"):
        assert proc.poll() is None, (gsm8k["dir"] / "killed.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint at step 10"
        time.sleep(0.02)
    kill_tree(proc)
    assert proc.returncode != 0, "the run finished before it could be killed"
    # A checkpoint that was being written when the process died must never be loaded.
    shutil.copytree(out / "ckpt" / "iter_0000010", out / "ckpt" / "iter_0000015.tmp")
    shutil.rmtree(out / "ckpt" / "iter_0000015.tmp" / "rng")

    resumed = [*args, "--load", out / "ckpt", "--exit-interval", "20", "--tensorboard-dir",
               out / "tb_resumed"]
    log = run(resumed, 2, gsm8k["dir"] / "resumed.log")
    assert "resumed from" in log and "iter_0000010 at iteration 10" in log
    ref, got = train_losses(reference["metrics"]), train_losses(metrics(out / "tb_resumed" /
                                                                          "metrics.jsonl"))
    assert sorted(got) == list(range(11, 21))
    assert [got[i] for i in range(11, 21)] == [ref[i] for i in range(11, 21)]  # bit-exact
    assert metrics(out / "tb_resumed" / "metrics.jsonl")[("valid", 20)]["lm_loss"] == \
        reference["metrics"][("valid", 20)]["lm_loss"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("layout", ["ep1", "tp2"])
def test_ep2_checkpoint_reshards_with_same_validation_loss(gsm8k, reference, layout):
    """EP=2 x DP=2 -> one process (EP=1), or TP=2 + SP: model and optimizer state reshard."""
    out = gsm8k["dir"] / layout
    nproc, extra = (1, []) if layout == "ep1" else (
        2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"])
    args = [*TINY, *data_args(gsm8k), *extra, "--load", reference["out"] / "ckpt",
            "--skip-train", "--metrics-file", out / "metrics.jsonl"]
    log = run(args, nproc, gsm8k["dir"] / f"{layout}.log")
    assert "RNG states are not restored" in log  # the layout changed
    loss = metrics(out / "metrics.jsonl")[("valid", 20)]["lm_loss"]
    assert abs(loss - reference["metrics"][("valid", 20)]["lm_loss"]) < 1e-6


@pytest.mark.timeout(300)
def test_pipeline_parallel_2_trains(gsm8k):
    out = gsm8k["dir"] / "pp2"
    args = [*TINY, *data_args(gsm8k), "--pipeline-model-parallel-size", "2", "--train-iters",
            "20", "--eval-interval", "20", "--metrics-file", out / "metrics.jsonl"]
    log = run(args, 2, gsm8k["dir"] / "pp2.log")
    assert "'pp': 2" in log
    losses = train_losses(metrics(out / "metrics.jsonl"))
    first, last = sum(losses[i] for i in (1, 2, 3)) / 3, sum(losses[i] for i in (18, 19, 20)) / 3
    assert last < first - 0.3, f"loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.mark.timeout(300)
def test_sigterm_saves_at_step_boundary_and_exits_0(tmp_path):
    args = [*TINY, "--mock-data", "--train-iters", "1000", "--eval-iters", "0", "--save",
            tmp_path / "ckpt", "--metrics-file", tmp_path / "metrics.jsonl"]
    log = tmp_path / "run.log"
    proc = launch(args, 1, log)
    deadline = time.time() + 120
    while not ((tmp_path / "metrics.jsonl").exists() and len(
            (tmp_path / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    saved = ckpt.find_checkpoint(str(tmp_path / "ckpt"))
    last = max(train_losses(metrics(tmp_path / "metrics.jsonl")))
    assert saved and ckpt.read_meta(saved)["iteration"] == last < 1000
    assert "received at iteration" in log.read_text()


@pytest.mark.timeout(300)
def test_cli_error_is_one_clear_line(gsm8k, reference):
    args = [*TINY, *data_args(gsm8k), "--hidden-size", "64", "--load", reference["out"] / "ckpt"]
    text = run(args, 1, gsm8k["dir"] / "shape.log", expect_rc=2)
    assert "coe-train: error: checkpoint" in text
    assert "hidden_size (--hidden-size): checkpoint 32, this run 64" in text
    assert "Traceback" not in text
