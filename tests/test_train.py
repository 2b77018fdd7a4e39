"""The trainer (``python -m megatron_coe.train``) end to end, on a slice of GSM8K and 2 CPU ranks.

Fast, in-process: options and YAML, example configs, every user error the trainer reports before
building anything (data, tokenizer, batch arithmetic, checkpoint shape), checkpoint discovery.
Real runs (torchrun, gloo, a tiny CoE-2: standard attention, 8 experts + 1 shared):

* EP=2 over 2 processes trains: the loss falls;
* a run SIGKILLed after its step-10 checkpoint and resumed with --load reproduces the
  uninterrupted run's per-step losses 11..20 bit for bit (unpublished ``iter_*.tmp`` ignored);
* the EP=2 checkpoint loads into one process (EP=1) and at TP=2 with the same validation loss;
* PP=2 trains; SIGTERM saves at the next step boundary and exits 0;
* time limit (--exit-duration-in-mins; $COE_JOB_END_TIME minus a margin): saves at the last step
  boundary before the deadline, publishes the checkpoint and exits 0;
* SIGTERM to every process of a 2-rank job (os.killpg: what scancel / Slurm preemption do; the
  DataLoader workers and checkpoint-writer processes get it too): the ranks still save, publish
  and exit 0, and the run resumes from that checkpoint; a SIGTERM during start-up exits 0 before
  the first step without writing a checkpoint.
"""

from __future__ import annotations

import json
import math
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
import torch

from megatron_coe import checkpointing as fmt
from megatron_coe.training import checkpoint as ckpt
from megatron_coe.training.options import OptionError
from megatron_coe.training.options import parse_args as parse_args_as_given
from megatron_coe.training.setup import SetupError, build_model_config, check_layout

from megatron_coe.testing.data import gsm8k_subset  # noqa: E402
from megatron_coe.testing.train_args import explicit  # noqa: E402


def parse_args(argv: list):
    """The options of ``argv`` plus the values these tests were written with (the trainer's
    defaults are Megatron-LM's)."""
    return parse_args_as_given(explicit(argv))

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
    root = tmp_path_factory.mktemp("gsm8k")
    prefix = gsm8k_subset(root, num_docs=400, vocab_size=512)
    return {"prefix": prefix, "dir": root}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(args: list, nproc: int) -> list:
    args = explicit(args)  # the values these tests were written with (Megatron-LM's defaults)
    if nproc == 1:
        return [PYTHON, "-m", "megatron_coe.train", *args]
    return [TORCHRUN, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), "-m", "megatron_coe.train", *args]


def _env(**extra) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE"):  # e.g. when run inside a job
        env.pop(name, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(args: list, nproc: int, log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(_command([str(a) for a in args], nproc), cwd=ROOT,
                            env=_env(**(env or {})), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def run(args: list, nproc: int, log: Path, timeout: float = 180, expect_rc: int = 0,
        env: dict | None = None) -> str:
    proc = launch(args, nproc, log, env)
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
    # options named no_*: plain switches (no --no-no-load-optim), same YAML keys
    args = parse_args(["--no-load-optim", "--no-load-rng"])
    assert args.no_load_optim is True and args.no_load_rng is True
    assert parse_args([]).no_load_optim is False
    with pytest.raises(SystemExit):
        parse_args(["--no-no-load-optim"])
    cfg.write_text("no_load_optim: true\nno-load-rng: true\n")
    args = parse_args(["--config", str(cfg)])
    assert args.no_load_optim is True and args.no_load_rng is True


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
    args = parse_args_as_given(["--config", str(ROOT / path)])  # the file sets all it needs
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


@pytest.fixture(scope="module")
def gsm8k_test(gsm8k) -> str:
    """40 GSM8K test problems, tokenized with the training data's tokenizer."""
    return gsm8k_subset(gsm8k["dir"], num_docs=40, split="test",
                        tokenizer_model=gsm8k["prefix"] + ".tokenizer.json")


@pytest.mark.one_env
def test_per_split_data_paths(gsm8k, gsm8k_test, tmp_path):
    """--train-data-path / --valid-data-path: the training and validation data come from their
    own prefixes (GSM8K train and test), used whole; conflicting data options are refused."""
    from megatron_coe.training import data
    from megatron_coe.training.trainer import preflight

    test_prefix = gsm8k_test
    per_split = [*TINY, "--train-data-path", gsm8k["prefix"], "--valid-data-path", test_prefix]
    args = parse_args(per_split)
    pre = preflight(args, 1)
    train, valid = data.build_datasets(args, pre.tokenizer)
    assert train.dataset.path_prefix == gsm8k["prefix"]
    assert valid.dataset.path_prefix == test_prefix
    assert len(valid.dataset) == 40  # every test document: no --split cut
    assert len(train.dataset) == 400

    refused = {
        "exclude each other": [*per_split, "--data-path", gsm8k["prefix"]],
        "needs --train-data-path": [*TINY, "--valid-data-path", test_prefix],
        "leaves no validation data": [*TINY, "--train-data-path", gsm8k["prefix"]],
        "is required": list(TINY),
    }
    for message, argv in refused.items():
        with pytest.raises(SetupError, match=message):
            preflight(parse_args(argv), 1)
    # without validation, a training blend alone is enough
    preflight(parse_args([*TINY, "--train-data-path", gsm8k["prefix"], "--eval-iters", "0"]), 1)

    log = run([*per_split, "--train-iters", "4", "--eval-interval", "4", "--log-interval", "2",
               "--tensorboard-dir", tmp_path / "tb"], 1, tmp_path / "per_split.log")
    valid_losses = [r for (t, _), r in metrics(tmp_path / "tb/metrics.jsonl").items()
                    if t == "valid"]
    assert valid_losses and all(math.isfinite(r["lm_loss"]) for r in valid_losses), log[-2000:]


def _fake_checkpoint(root: Path, iteration: int, args, vocab: int = 512, suffix: str = ""):
    path = Path(fmt.iteration_dir(str(root), iteration) + suffix)
    path.mkdir(parents=True)
    (path / fmt.META).write_text(json.dumps({"iteration": iteration, "vocab_size": vocab,
                                              "args": args.to_dict()}))
    torch.save({}, path / "common.pt")  # the common-state file every release can read
    return path


def test_load_picks_only_published_checkpoints(tmp_path):
    """The tracker is the one record of "latest": an iter_* directory newer than it (a crash
    between publishing and the tracker, or a foreign copy) and unpublished .tmp are not used."""
    args = parse_args(TINY)
    assert fmt.find_checkpoint(str(tmp_path)) is None
    _fake_checkpoint(tmp_path, 10, args)
    assert fmt.find_checkpoint(str(tmp_path)) is None  # no tracker: nothing published
    (tmp_path / fmt.TRACKER).write_text("10\n")
    _fake_checkpoint(tmp_path, 20, args)                  # newer than the tracker
    _fake_checkpoint(tmp_path, 30, args, suffix=".tmp")  # interrupted while being written
    (tmp_path / "iter_0000040.tmp").mkdir()               # died before writing anything
    assert fmt.find_checkpoint(str(tmp_path)) == str(tmp_path / "iter_0000010")
    assert fmt.find_checkpoint(str(tmp_path / "iter_0000020")) == str(tmp_path / "iter_0000020")
    (tmp_path / fmt.TRACKER).write_text("50\n")          # names a checkpoint that is gone
    with pytest.raises(fmt.CheckpointError, match="names iteration 50 .* last good checkpoint is "
                       "iteration 20"):
        fmt.find_checkpoint(str(tmp_path))


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
    assert (ckpt_dir / fmt.TRACKER).read_text().strip() == "20"
    assert not list(ckpt_dir.glob("*.tmp"))
    # the architecture record (what --load checks and the HF exporter reads); it matches the args
    from megatron_coe.arch import RECORD_KEY, ModelArch

    meta = ckpt.read_meta(str(ckpt_dir / "iter_0000020"))
    arch = ModelArch.from_dict(meta[RECORD_KEY])
    assert (arch.num_moe_experts, arch.coe_iterations, arch.vocab_size) == (8, 2, 512)
    assert arch == ModelArch.from_option_values(meta["args"], meta["vocab_size"])


@pytest.mark.timeout(300)
@pytest.mark.one_env
def test_sigkill_after_checkpoint_then_resume_is_bit_exact(gsm8k, reference):
    out = gsm8k["dir"] / "killed"
    args = [*TINY, *data_args(gsm8k), "--expert-model-parallel-size", "2", "--save",
            out / "ckpt", "--save-interval", "10", "--tensorboard-dir", out / "tb"]
    proc = launch(args, 2, gsm8k["dir"] / "killed.log")
    tracker = out / "ckpt" / fmt.TRACKER
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
@pytest.mark.one_env
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


# --------------------------------------------------------------------------- time limit
def test_time_limit_deadline_from_flag_and_job_end_time():
    from megatron_coe.training import timelimit

    args = parse_args(["--exit-duration-in-mins", "10"])
    assert timelimit.deadline(args, 1000.0, {}) == 1000.0 + 600
    env = {"COE_JOB_END_TIME": "2000"}
    assert timelimit.deadline(parse_args([]), 1000.0, env) == 2000 - 5 * 60  # default margin
    assert timelimit.deadline(parse_args(["--exit-time-margin-mins", "1"]), 1000.0, env) == 1940
    assert timelimit.deadline(args, 1000.0, env) == 1600  # the earlier one: the flag's
    assert timelimit.deadline(args, 1000.0, {"COE_JOB_END_TIME": "1800"}) == 1500  # the env's
    assert timelimit.deadline(parse_args([]), 1000.0, {"COE_JOB_END_TIME": ""}) is None
    with pytest.raises(SetupError, match="COE_JOB_END_TIME='soon' is not a time"):
        timelimit.check(parse_args([]), {"COE_JOB_END_TIME": "soon"})
    with pytest.raises(OptionError, match=r"\(--exit-duration-in-mins\): 0.0 is out of range"):
        parse_args(["--exit-duration-in-mins", "0"])  # the option table's range, at parse time

    guard = timelimit.TimeGuard(deadline=100.0)
    for t in (3.0, 1.0, 1.0):  # the estimate is the slowest recent step
        guard.record_step(t)
    assert not guard.time_up(now=96.0) and guard.time_up(now=97.5)
    assert guard.time_up(now=95.0, extra=2.5)  # a validation due at this boundary counts
    assert not timelimit.TimeGuard(None).time_up(now=1e12)


@pytest.mark.timeout(300)
@pytest.mark.one_env
def test_exit_duration_saves_publishes_and_exits_0(tmp_path):
    """--exit-duration-in-mins 0.05 (3 s, less than start-up): stop after the first step(s)."""
    reason = tmp_path / "exit_reason"
    args = [*TINY, "--mock-data", "--train-iters", "1000", "--eval-iters", "0", "--save",
            tmp_path / "ckpt", "--metrics-file", tmp_path / "metrics.jsonl",
            "--exit-duration-in-mins", "0.05"]
    log = run(args, 1, tmp_path / "run.log", env={"COE_EXIT_REASON_FILE": reason})
    assert "time limit: the next step" in log and "saving and exiting" in log
    last = max(train_losses(metrics(tmp_path / "metrics.jsonl")))
    saved = ckpt.find_checkpoint(str(tmp_path / "ckpt"))
    assert saved and ckpt.read_meta(saved)["iteration"] == last < 1000
    assert (tmp_path / "ckpt" / fmt.TRACKER).read_text().strip() == str(last)
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    assert reason.read_text().strip() == "time_limit"


@pytest.mark.timeout(300)
@pytest.mark.one_env
def test_job_end_time_env_stops_before_the_margin(tmp_path):
    """$COE_JOB_END_TIME = now + 5 min + 1 s with the default 5-minute margin: stop at once."""
    args = [*TINY, "--mock-data", "--train-iters", "1000", "--eval-iters", "0", "--save",
            tmp_path / "ckpt", "--metrics-file", tmp_path / "metrics.jsonl"]
    log = run(args, 1, tmp_path / "run.log", env={"COE_JOB_END_TIME": int(time.time()) + 301})
    assert "time limit: the next step" in log
    last = max(train_losses(metrics(tmp_path / "metrics.jsonl")))
    assert last < 1000
    assert ckpt.read_meta(ckpt.find_checkpoint(str(tmp_path / "ckpt")))["iteration"] == last


# --------------------------------------------------------------------------- preemption
def _launch_ranks(args: list, nproc: int, logs: list, one_group: bool = True) -> list:
    """``nproc`` trainer processes without torchrun (as srun starts them). With ``one_group``,
    all in one new process group whose id is rank 0's pid: ``os.killpg`` then reaches the ranks
    and every helper process they start, like Slurm's SIGTERM to all processes of a job;
    otherwise in the caller's group (their exit codes are the trainer's own)."""
    port, procs = _free_port(), []
    for rank in range(nproc):
        env = _env(RANK=rank, WORLD_SIZE=nproc, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=nproc,
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "megatron_coe.train", *explicit(args)], cwd=ROOT, env=env,
            stdout=open(logs[rank], "w"), stderr=subprocess.STDOUT,
            **({"process_group": 0 if rank == 0 else procs[0].pid} if one_group else {})))
    return procs


def _wait_for_lines(path: Path, n: int, procs: list, logs: list, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and len(path.read_text().splitlines()) >= n):
        dead = [p for p in procs if p.poll() is not None]
        assert not dead and time.time() < deadline, "\n".join(
            Path(log).read_text()[-2000:] for log in logs)
        time.sleep(0.05)


def _helpers(procs: list) -> list:
    out = []
    for p in procs:
        try:
            out += [c.name() for c in psutil.Process(p.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.timeout(400)
@pytest.mark.one_env
def test_sigterm_to_whole_process_group_saves_publishes_and_resumes(tmp_path):
    """2 ranks (EP=2) with DataLoader workers running (checkpoint writers fork during saves):
    SIGTERM to every process of the group -> checkpoint saved + published, exit 0; resume."""
    save = tmp_path / "ckpt"
    args = [*TINY, "--mock-data", "--train-iters", "1000", "--eval-iters", "0",
            "--expert-model-parallel-size", "2", "--num-workers", "1", "--save", save,
            "--metrics-file", tmp_path / "metrics.jsonl"]
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    procs = _launch_ranks(args, 2, logs)
    try:
        _wait_for_lines(tmp_path / "metrics.jsonl", 3, procs, logs)
        # per rank: 1 DataLoader worker (no long-lived checkpoint helper exists any more)
        deadline = time.time() + 60
        while len(_helpers(procs)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        helpers = _helpers(procs)
        assert len(helpers) >= 2, f"helper processes not running: {helpers}"
        os.killpg(procs[0].pid, signal.SIGTERM)
        rcs = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    text = "\n".join(log.read_text() for log in logs)
    assert rcs == [0, 0], f"exit codes {rcs}:\n{text[-4000:]}"
    assert "received at iteration" in text, text[-3000:]
    last = max(train_losses(metrics(tmp_path / "metrics.jsonl")))
    saved = ckpt.find_checkpoint(str(save))
    assert saved and ckpt.read_meta(saved)["iteration"] == last < 1000, text[-3000:]
    assert (save / fmt.TRACKER).read_text().strip() == str(last)
    assert not list(save.glob("*.tmp"))
    assert sorted(p.name for p in (Path(saved) / "rng").iterdir()) == ["rank_00000.pt",
                                                                        "rank_00001.pt"]

    resumed = [*args, "--load", save, "--train-iters", last + 2, "--metrics-file",
               tmp_path / "resumed.jsonl"]
    log = run(resumed, 2, tmp_path / "resumed.log")
    assert f"iter_{last:07d} at iteration {last}" in log
    assert sorted(train_losses(metrics(tmp_path / "resumed.jsonl"))) == [last + 1, last + 2]
    assert ckpt.read_meta(ckpt.find_checkpoint(str(save)))["iteration"] == last + 2


@pytest.mark.timeout(300)
def test_sigterm_during_startup_exits_0_without_a_checkpoint(tmp_path):
    """The handler is installed before torch is imported: a SIGTERM while the trainer is still
    importing/building ends it with exit 0 before the first step, and nothing is written."""
    save = tmp_path / "ckpt"
    reason = tmp_path / "exit_reason"
    args = [*TINY, "--mock-data", "--train-iters", "1000", "--eval-iters", "0", "--save", save,
            "--load", save, "--metrics-file", tmp_path / "metrics.jsonl"]
    log = tmp_path / "run.log"
    proc = launch(args, 1, log, env={"COE_EXIT_REASON_FILE": reason})
    try:
        deadline = time.time() + 60
        # `import torch` starts right after the handler is installed: signal once it is mapped
        while "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert "received during start-up: exiting before the first step" in text, text[-3000:]
    assert not list(save.glob("iter_*")) and ckpt.find_checkpoint(str(save)) is None
    assert reason.read_text().strip() == "signal"


# --------------------------------------------------------------------------- parameter count
def _count_params(rank, world_size, tp=1, pp=1, ep=1, tied=False):
    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import destroy_parallel, initialize_parallel
    from megatron_coe.testing.configs import tiny_config
    from megatron_coe.training.setup import count_parameters, mark_routed_experts

    destroy_parallel()
    pg = initialize_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                             expert_model_parallel_size=ep)
    config = tiny_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         expert_model_parallel_size=ep, sequence_parallel=tp > 1,
                         moe_shared_expert_intermediate_size=32,
                         pipeline_dtype=torch.float32 if pp > 1 else None)
    with cuda_device_redirect():  # tied embeddings at PP > 1: Megatron moves the copy to CUDA
        model = build_coe_gpt_model(config, pg_collection=pg, vocab_size=64, max_sequence_length=16,
                                    share_embeddings_and_output_weights=tied)
    mark_routed_experts(model)
    counts = count_parameters([model])
    if world_size == 1:  # the reference: everything on one rank
        params = dict(model.named_parameters())
        assert counts["local"] == sum(p.numel() for p in params.values())
        assert counts["routed_experts"] == sum(
            p.numel() for n, p in params.items() if ".experts." in f".{n}")
    return counts["total"], counts["routed_experts"], counts["local"]


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_is_the_same_for_every_layout(tied):
    """The trainer's parameter count covers the whole model whatever TP/PP/EP shard it."""
    from megatron_coe.testing.distributed import run_distributed

    (reference,) = run_distributed(_count_params, 1, tied=tied)
    for layout in (dict(ep=2), dict(tp=2), dict(pp=2)):
        results = run_distributed(_count_params, 2, tied=tied, **layout)
        for total, experts, local in results:
            assert (total, experts) == reference[:2], layout
            assert local < reference[2], layout  # each rank holds a shard only
