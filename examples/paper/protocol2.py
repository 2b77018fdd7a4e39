#!/usr/bin/env python
"""The paper benchmark, protocol 2: the paper's protocol at CPU scale, per-arm learning rates,
paired seeds and decision rules fixed before the results.

    bash examples/paper/run.sh --protocol 2                 # all stages; resumes where it stopped
    bash examples/paper/run.sh --protocol 2 --report-only   # (partial) report from what finished

Owns: the protocol's definition (``BASE`` = every trainer option, ``ARMS`` = the fields each arm
changes, ``LRS``, seeds), the run plan (stage 0 throughput probe and planned wall time, stage 1
learning-rate sweep, stage 2 paired seeds), running and resuming the runs, and the report
(``results/protocol2/``: results.md, results.csv, runs.csv, lr_sweep.csv, PNG plots). The
statistics and the decision rules are ``megatron_coe/analysis/paired.py``.

Arms (N = 32 routed experts + 1 shared expert of FFN 64, hidden 128, MLA, seq 128):

    coe2_4_32                   CoE-2(4/32): C=2, top-4 per pass, inner residual on, outer off
    moe_8_32                    the paper's MoE(8/32): C=1, top-8, inner on, outer off
    megatron_moe_8_32           Megatron's standard MoE(8/32): C=1, top-8, inner off, outer on
    coe2_4_24                   CoE-2(4/24): 3N/4 routed experts (memory-matched)
    coe2_4_32_shared_router     CoE-2(4/32), one router for both passes (ablation)
    coe2_4_32_outer_residual    CoE-2(4/32), outer residual instead of inner (ablation)
    moe_8_32_4layers            the paper's MoE(8/32) with 4 layers (depth control)

Every arm is ``BASE`` (which *is* the CoE-2(4/32) arm) with the fields in ``ARMS[arm].fields``
replaced, and nothing else; ``configs/protocol2/<arm>.yaml`` are these configs written out
(``--write-configs``), and ``tests/test_paper_smoke.py`` checks both. ``BASE`` sets every trainer
option explicitly (none is left to the trainer's defaults); each run's own config (arm + seed +
learning rate) is written to its run directory and passed as the only ``--config``.

Stages:

0. Throughput probe: a few steps of CoE-2(4/32) and of the 4-layer MoE with validation and a
   save, timed from the trainer's metrics; then the planned wall time of every remaining run is
   printed before anything long starts (stored in ``<work>/stage0.json``).
1. Constant-LR sweep (``LRS``) at seed 1 for the three main arms; each main arm then uses its own
   best rate (lowest mean of its last 3 validations). The equal-rate comparison is reported.
2. Seeds 1..5 for CoE-2(4/32) and the paper MoE, 1..3 for the others (the memory-matched CoE and
   the ablations at CoE's rate, the depth control at the paper MoE's). ``--seed`` sets the
   initialisation and the data order, so runs with the same seed see identical batches.

After each block of runs, ``tools/analyze_routing.py`` measures the GSM8K test loss (the whole
test set) and the routing of the new final checkpoints; the report is rewritten after every run.

Resuming: a run whose summary ``<work>/summaries/<run>.json`` exists is skipped; an interrupted
run resumes from its last checkpoint (every ``save_interval`` steps). SIGTERM / SIGINT to this
process stop the current run at a step boundary with a checkpoint. Outputs other than the report
go to ``<work>`` (default ``runs/paper/protocol2``, ignored by git).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from megatron_coe.analysis import paired  # noqa: E402

import run_benchmark as rb  # noqa: E402  (data preparation, run summaries, routing means)

CONFIG_DIR = HERE / "configs" / "protocol2"
RESULTS_DIR = HERE / "results" / "protocol2"
WORK_DIR = ROOT / "runs" / "paper" / "protocol2"

# --------------------------------------------------------------------------- definition
# Every trainer option, set explicitly (the trainer's defaults are Megatron-LM's and may change).
# Options that only name paths or switch on logging/profiling are listed in RUNTIME_OPTIONS and
# set per run (save/load/tensorboard) or left off.
BASE = {
    # model: the paper's DeepSeek-V2-Lite-style layer at hidden 128, 2 layers
    "num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "num_query_groups": None,
    "kv_channels": None, "ffn_hidden_size": 256, "normalization": "RMSNorm",
    "layernorm_epsilon": 1.0e-5, "swiglu": True, "multi_latent_attention": True,
    "qk_layernorm": True, "mla_latent_norm_epsilon": 1.0e-6, "q_lora_rank": None,
    "kv_lora_rank": 32, "qk_head_dim": 32, "qk_pos_emb_head_dim": 16, "v_head_dim": 32,
    "position_embedding_type": "rope", "rotary_base": 10000.0, "rotary_percent": 1.0,
    "rotary_scaling_factor": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0,
    "yarn_original_max_position_embeddings": None, "yarn_beta_fast": None, "yarn_beta_slow": None,
    "max_position_embeddings": 128, "untie_embeddings_and_output_weights": False,
    "init_method_std": 0.02, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    "seq_length": 128, "make_vocab_size_divisible_by": 128,
    # experts and router (N = 32 routed + 1 shared)
    "num_experts": 32, "moe_layer_freq": 1, "moe_router_topk": 4, "moe_ffn_hidden_size": 64,
    "moe_shared_expert_intermediate_size": 64, "moe_router_score_function": "softmax",
    "moe_router_pre_softmax": True, "moe_router_topk_scaling_factor": None,
    "moe_router_num_groups": None, "moe_router_group_topk": None,
    "moe_router_enable_expert_bias": False, "moe_router_load_balancing_type": "seq_aux_loss",
    "moe_aux_loss_coeff": 1.0e-3, "moe_z_loss_coeff": None, "moe_token_dispatcher_type": "alltoall",
    "moe_router_bias_update_rate": 1.0e-3, "moe_expert_capacity_factor": None,
    "moe_pad_expert_input_to_capacity": False, "moe_token_drop_policy": "probs", "moe_grouped_gemm": False,
    "moe_flex_dispatcher_backend": "deepep", "moe_router_dtype": "fp32",
    # chain of experts (BASE is the CoE-2(4/32) arm)
    "coe_iterations": 2, "coe_inner_residual": True, "coe_outer_residual": False,
    "coe_shared_router": False, "coe_router_init_method": "normal",
    # layout: 2 CPU processes, EP=2 (DP=2 for the dense part), fp32
    "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
    "decoder_first_pipeline_num_layers": None, "decoder_last_pipeline_num_layers": None,
    "num_layers_per_virtual_pipeline_stage": None, "num_virtual_stages_per_pipeline_rank": None,
    "context_parallel_size": 1, "cp_comm_type": ["p2p"],
    "expert_model_parallel_size": 2, "expert_tensor_parallel_size": None,
    "sequence_parallel": False, "distributed_backend": "gloo", "transformer_impl": "local",
    "bf16": False, "fp8_format": None, "fp8_recipe": "delayed", "distributed_timeout_minutes": 10.0,
    # GPU fusions (Megatron-LM's defaults; every one is off on CPU)
    "bias_swiglu_fusion": True, "masked_softmax_fusion": True, "bias_dropout_fusion": True,
    "apply_rope_fusion": True, "gradient_accumulation_fusion": True, "moe_permute_fusion": None,
    "moe_router_fusion": False,
    "recompute_modules": [], "recompute_activations": False, "recompute_granularity": None,
    "recompute_method": None, "recompute_num_layers": None,
    "overlap_grad_reduce": False, "overlap_param_gather": False,
    # optimisation: the paper's AdamW, constant LR after 10% warmup (lr: per arm, stage 1)
    "micro_batch_size": 4, "global_batch_size": 16, "train_iters": 500, "lr": 3.0e-3,
    "min_lr": 0.0, "lr_decay_style": "constant", "lr_wsd_decay_style": "exponential",
    "lr_wsd_decay_iters": None, "lr_warmup_iters": 0, "lr_warmup_fraction": 0.1,
    "lr_decay_iters": None, "train_samples": None, "rampup_batch_size": [],
    "lr_warmup_samples": 0, "lr_decay_samples": None, "lr_wsd_decay_samples": None,
    "weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.95,
    "adam_eps": 1.0e-8, "clip_grad": 1.0, "seed": 1, "calculate_per_token_loss": False,
    "check_for_nan_in_loss_and_grad": True,
    # data: GSM8K train cut 98,2,0 by documents; validation = the whole held-out 2%
    "data_path": ["data/processed/gsm8k_train_v1k"], "split": "98,2,0", "train_data_path": [],
    "valid_data_path": [], "tokenizer_type": None, "tokenizer_model": None,
    "data_cache_path": None, "mock_data": False, "vocab_size": None, "num_workers": 0,
    "eval_interval": 25,
    "eval_iters": 15,  # = the whole validation split: 242 sequences // 16 per batch (checked)
    "skip_train": False, "log_interval": 25,
    # checkpoints and stopping
    "save_interval": 100, "no_load_optim": False, "no_load_rng": False,
    "use_checkpoint_args": False, "override_checkpoint_arch": False, "async_save": False,
    "exit_on_missing_checkpoint": False,
    "exit_signal_handler": True, "exit_interval": None, "exit_duration_in_mins": None,
    "exit_time_margin_mins": 5.0,
}

# Options that name where a run writes or switch on observability only (not the model, data or
# optimisation); the runner sets save / load / tensorboard_dir per run and leaves the rest off.
RUNTIME_OPTIONS = {
    "save", "load", "tensorboard_dir", "metrics_file", "peak_tflops", "wandb_project",
    "wandb_exp_name", "wandb_save_dir", "wandb_entity", "profile", "use_pytorch_profiler",
    "profile_step_start", "profile_step_end", "profile_ranks", "log_straggler",
    "disable_straggler_on_startup", "straggler_ctrlr_port", "straggler_minmax_count",
}

ROUTING_FIELDS = ("num_experts", "moe_router_topk", "coe_iterations", "coe_inner_residual",
                  "coe_outer_residual", "coe_shared_router")


@dataclass(frozen=True)
class Arm:
    label: str
    fields: dict          # the fields that differ from BASE (and only these)
    lr_from: str          # whose stage-1 rate this arm uses
    seeds: int            # stage-2 seeds 1..seeds
    sweep: bool = False   # a main arm: swept in stage 1


_MOE = {"num_experts": 32, "moe_router_topk": 8, "coe_iterations": 1}
ARMS = {
    "coe2_4_32": Arm("CoE-2(4/32)", {}, "coe2_4_32", 5, sweep=True),
    "moe_8_32": Arm("paper MoE(8/32)", dict(_MOE, coe_inner_residual=True,
                                            coe_outer_residual=False), "moe_8_32", 5, sweep=True),
    "megatron_moe_8_32": Arm("standard MoE(8/32)", dict(_MOE, coe_inner_residual=False,
                                                        coe_outer_residual=True),
                             "megatron_moe_8_32", 3, sweep=True),
    "coe2_4_24": Arm("CoE-2(4/24)", {"num_experts": 24}, "coe2_4_32", 3),
    "coe2_4_32_shared_router": Arm("CoE-2(4/32) shared router", {"coe_shared_router": True},
                                   "coe2_4_32", 3),
    "coe2_4_32_outer_residual": Arm("CoE-2(4/32) outer residual instead of inner",
                                    {"coe_inner_residual": False, "coe_outer_residual": True},
                                    "coe2_4_32", 3),
    "moe_8_32_4layers": Arm("paper MoE(8/32), 4 layers",
                            dict(_MOE, num_layers=4, coe_inner_residual=True,
                                 coe_outer_residual=False), "moe_8_32", 3),
}
COE, MOE, STD, DEPTH = "coe2_4_32", "moe_8_32", "megatron_moe_8_32", "moe_8_32_4layers"
LRS = (1.5e-3, 3.0e-3, 6.0e-3)        # stage-1 constant learning rates (protocol 1 used 3e-3)
EFFICIENCY_STEPS = (100, 250, 500)
PROBE_ARMS = (COE, DEPTH)             # stage 0: the 2-layer CoE and the 4-layer MoE


def arm_config(arm: str) -> dict:
    """The full option dict of ``arm``: BASE with the arm's fields."""
    cfg = copy.deepcopy(BASE)
    cfg.update(ARMS[arm].fields)
    return cfg


def config_yaml(arm: str) -> str:
    a = ARMS[arm]
    changed = ", ".join(f"{k}={v}" for k, v in a.fields.items() if BASE[k] != v) \
        or "none (this arm is BASE)"
    head = (f"# {a.label}: protocol 2 of the paper benchmark (examples/paper/protocol2.py).\n"
            f"# GENERATED by `python examples/paper/protocol2.py --write-configs` from BASE;\n"
            f"# fields changed from BASE: {changed}.\n"
            "# Every trainer option is set here; the runner adds seed, lr (stage 1 picks it per "
            "arm),\n# and the run's save / load / tensorboard paths.\n")
    return head + yaml.safe_dump(arm_config(arm), sort_keys=False, default_flow_style=None)


def write_configs(directory: Path = CONFIG_DIR) -> list:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for arm in ARMS:
        p = directory / f"{arm}.yaml"
        p.write_text(config_yaml(arm))
        paths.append(p)
    return paths


def lr_tag(lr: float) -> str:
    return f"{lr:.1e}".replace("e-0", "e-").replace(".0e", "e")


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"{arm}_lr{lr_tag(lr)}_seed{seed}"


# --------------------------------------------------------------------------- plan
class Plan:
    """Which runs the protocol needs, given the finished ones (stage 2 needs stage 1's rates)."""

    def __init__(self, arms: list, lrs: tuple, seeds_main: int, seeds_other: int):
        self.arms, self.lrs = arms, tuple(lrs)
        self.seeds = {a: (seeds_main if ARMS[a].seeds >= 5 else seeds_other) for a in arms}

    def stage1(self) -> list:
        return [(a, lr, 1) for a in self.arms if ARMS[a].sweep for lr in self.lrs]

    def best_lrs(self, summaries: dict) -> dict:
        """Best rate per main arm among its finished sweep runs (None if none finished, or if
        stage 1 is not complete for that arm)."""
        best = {}
        for a in self.arms:
            if not ARMS[a].sweep:
                continue
            scores = {lr: summaries[run_name(a, lr, 1)]["score"] for lr in self.lrs
                      if run_name(a, lr, 1) in summaries}
            best[a] = min(scores, key=scores.get) if len(scores) == len(self.lrs) else None
        return best

    def lr_of(self, arm: str, best: dict):
        """The arm's rate: its own (main arms) or its owner's stage-1 choice; BASE's rate when
        the owner is not in this selection of arms; None while stage 1 has not chosen it."""
        src = ARMS[arm].lr_from
        return best.get(src) if src in self.arms else BASE["lr"]

    def stage2(self, best: dict) -> list:
        """(arm, lr, seed) in priority order: the decision's runs first (CoE / paper MoE pairs,
        then the depth control), then the other arms; lr None = not known yet."""
        order = []
        main = [a for a in (COE, MOE) if a in self.arms]
        depth = [DEPTH] if DEPTH in self.arms else []
        top = max([self.seeds[a] for a in main + depth] or [0])
        for seed in range(1, top + 1):
            for a in main + depth:
                lr = self.lr_of(a, best)
                if seed <= self.seeds[a] and not (lr is None and seed == 1 and ARMS[a].sweep):
                    order.append((a, lr, seed))  # (a main arm's seed 1 is a stage-1 run)
        for a in self.arms:
            if a in main or a in depth:
                continue
            for seed in range(1, self.seeds[a] + 1):
                lr = self.lr_of(a, best)
                if not (lr is None and seed == 1 and ARMS[a].sweep):
                    order.append((a, lr, seed))
        return order


# --------------------------------------------------------------------------- data sizes
def split_sizes(train_prefix: str, test_prefix: str, seq_length: int, split: str) -> dict:
    """Sequences in one epoch of the validation split and of the test set."""
    from megatron_coe.data.datasets import build_train_valid_test_datasets
    from megatron_coe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(train_prefix + ".tokenizer.json")
    cache = str(WORK_DIR / "index_cache")
    _, valid, _ = build_train_valid_test_datasets([train_prefix], split, seq_length, 1,
                                                  (1, None, 0), tok, data_cache_path=cache)
    _, test, _ = build_train_valid_test_datasets([test_prefix], "0,1,0", seq_length, 1,
                                                 (0, None, 0), tok, data_cache_path=cache)
    return {"valid_sequences": len(valid), "test_sequences": len(test)}


# --------------------------------------------------------------------------- running
STOP = {"signal": None}


def _on_signal(signum, _frame):
    STOP["signal"] = signum


def _pdeathsig():  # the launcher dies with this process (Linux)
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _wait(proc, timeout: float):
    """Wait for ``proc``; on SIGTERM/SIGINT to this process forward SIGTERM (the trainer saves a
    checkpoint at the next step boundary), and kill the tree 120 s later."""
    deadline, sent = time.time() + timeout, None
    while True:
        try:
            return proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
        if STOP["signal"] and sent is None:
            rb.log(f"signal {STOP['signal']}: asking the current run to save and stop")
            proc.send_signal(signal.SIGTERM)
            sent = time.time()
        if (sent and time.time() - sent > 120) or time.time() > deadline:
            rb.kill_tree(proc)
            return "timeout" if not sent else "stopped"


def _watch_records(path: Path, times: list, stop: threading.Event):
    """Stage 0: note when each metrics.jsonl record arrives."""
    seen = 0
    while not stop.is_set():
        recs = rb.read_jsonl(path)
        now = time.time()
        for r in recs[seen:]:
            times.append((now, r))
        seen = len(recs)
        time.sleep(0.1)


class Runner:
    """Trains, resumes and summarises runs of a protocol (``arms``: its arm table;
    ``config_of``: arm -> full option dict; protocol 3 passes its own, and a summaries directory
    that is committed)."""

    def __init__(self, opts, arms: dict = None, config_of=None, summaries_dir: Path = None):
        self.opts = opts
        self.work = Path(opts.work_dir)
        self.arms, self.config_of = arms or ARMS, config_of or arm_config
        self.summaries_dir = summaries_dir or self.work / "summaries"
        self.skipped = set()

    # ---- one training run
    def run_config(self, arm: str, lr: float, seed: int, run_dir: Path, extra: dict) -> Path:
        cfg = self.config_of(arm)
        cfg.update(seed=seed, lr=lr, data_path=[self.opts.train_prefix])
        cfg.update(self.opts.overrides)
        cfg.update(extra)
        cfg.update(save=str(run_dir / "checkpoints"), load=str(run_dir / "checkpoints"),
                   tensorboard_dir=str(run_dir / "tensorboard"))
        path = run_dir / "config.yaml"
        text = yaml.safe_dump(cfg, sort_keys=False)
        old = yaml.safe_load(path.read_text()) if path.exists() else {}
        # an option added to BASE since the run started (it ran with the trainer's value of it)
        # does not stop the resume; a changed value does
        if any(old[k] != cfg[k] for k in old.keys() & cfg.keys()):
            raise SystemExit(f"error: {path} holds another configuration than this invocation "
                             f"would train ({arm}, lr {lr}, seed {seed}); give another "
                             "--work-dir or remove that run directory")
        path.write_text(text)
        return path

    def command(self, config: Path) -> list:
        script = str(HERE / "train_measured.py")
        if self.opts.nproc == 1:
            return [self.opts.python, script, "--config", str(config)]
        return [self.opts.torchrun, "--nproc-per-node", str(self.opts.nproc), "--master-addr",
                "127.0.0.1", "--master-port", str(rb.free_port()), script, "--config", str(config)]

    def train(self, name: str, arm: str, lr: float, seed: int, run_dir: Path, extra=None,
              watch: list = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        config = self.run_config(arm, lr, seed, run_dir, extra or {})
        env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1",
                   COE_MEASURE_DIR=str(run_dir / "measure" / time.strftime("%Y%m%d-%H%M%S")))
        cmd = self.command(config)
        t0 = time.time()
        stop = threading.Event()
        if watch is not None:
            threading.Thread(target=_watch_records, daemon=True,
                             args=(run_dir / "tensorboard" / "metrics.jsonl", watch, stop)).start()
        with open(run_dir / "train.log", "a") as logf:
            logf.write(f"\n===== {time.ctime()}: {' '.join(cmd)}\n")
            logf.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    preexec_fn=_pdeathsig)
            rc = _wait(proc, self.opts.run_timeout)
        stop.set()
        return rc, t0

    def run(self, arm: str, lr: float, seed: int, extra: dict = None, name: str = None):
        """Train one (arm, lr, seed) unless its summary exists; returns the summary or None."""
        name = name or run_name(arm, lr, seed)
        spath = self.summaries_dir / f"{name}.json"
        if spath.exists():
            if name not in self.skipped:  # stage 2 meets the stage-1 runs again
                rb.log(f"{name}: finished before, skipped")
                self.skipped.add(name)
            return json.loads(spath.read_text())
        run_dir = self.work / "runs" / name
        rb.log(f"{name}: training ({self.arms[arm].label}, lr {lr:g}, seed {seed})")
        rc, t0 = self.train(name, arm, lr, seed, run_dir, extra)
        if rc != 0 and STOP["signal"]:
            rb.log(f"{name}: interrupted after {time.time() - t0:.0f} s (the trainer saves a "
                   "checkpoint on SIGTERM); the next invocation resumes it")
            return None
        if rc != 0:
            tail = "".join((run_dir / "train.log").read_text().splitlines(True)[-12:])
            rb.log(f"{name}: FAILED (rc {rc}) after {time.time() - t0:.0f} s; "
                   f"{run_dir / 'train.log'}:\n{tail}")
            return None
        s = summarize(name, arm, lr, seed, run_dir)
        s["wall_s"] = time.time() - t0
        _write_json(spath, s)
        rb.log(f"{name}: done in {s['wall_s']:.0f} s | score (last 3 valid) {s['score']:.4f} | "
               f"final valid {s['final_valid_loss']:.4f} | {s['median_step_time_s'] * 1e3:.0f} "
               "ms/step")
        return s

    # ---- test loss and routing of finished runs
    def analyze(self, summaries: dict) -> None:
        out_root = self.work / "routing"
        todo = [n for n in summaries if not (out_root / n / "routing.json").exists()]
        if not todo or self.opts.test_samples == 0:
            return
        cmd = [self.opts.python, str(ROOT / "tools/analyze_routing.py"),
               "--load", *[str(self.work / "runs" / n / "checkpoints") for n in todo],
               "--names", *todo, "--data", self.opts.test_prefix,
               "--num-samples", str(self.opts.test_samples), "--micro-batch-size", "16",
               "--out", str(out_root), "--skip-existing"]
        rb.log(f"GSM8K test loss + routing of {len(todo)} checkpoint(s) "
               f"({self.opts.test_samples} test sequences each)")
        env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="2")
        with open(self.work / "analysis.log", "a") as logf:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                    preexec_fn=_pdeathsig)
            rc = _wait(proc, self.opts.run_timeout)
        if rc != 0:
            rb.log(f"routing analysis rc {rc} (see {self.work / 'analysis.log'})")

    # ---- stage 0
    def stage0(self, plan: Plan) -> dict:
        path = self.work / "stage0.json"
        if path.exists():
            return json.loads(path.read_text())
        probe = {}
        iters = self.opts.probe_iters
        arms = [a for a in PROBE_ARMS if a in plan.arms] or plan.arms[:1]
        for arm in arms:
            run_dir = self.work / "stage0" / arm
            if run_dir.exists():
                shutil.rmtree(run_dir)
            rb.log(f"stage 0: {iters} steps of {ARMS[arm].label} (validation every "
                   f"{iters // 2} steps over the whole split, one save)")
            times = []
            rc, t0 = self.train(f"stage0_{arm}", arm, BASE["lr"], 1, run_dir,
                                extra=dict(train_iters=iters, eval_interval=max(1, iters // 2),
                                           save_interval=iters, log_interval=1),
                                watch=times)
            t_end = time.time()
            if rc != 0:
                raise SystemExit(f"error: stage 0 probe of {arm} failed (rc {rc}); see "
                                 f"{run_dir / 'train.log'}")
            time.sleep(0.3)
            train = [(t, r) for t, r in times if r["type"] == "train"]
            steps = [r["step_time_s"] for _, r in train if r["iteration"] > 2] or \
                [r["step_time_s"] for _, r in train]
            evals = []
            for k, (t, r) in enumerate(times):
                if r["type"] == "valid" and k > 0:
                    evals.append(t - times[k - 1][0])
            startup = (train[0][0] - t0 - train[0][1]["step_time_s"]) if train else 0.0
            probe[arm] = {"step_s": statistics.median(steps),
                          "eval_s": statistics.mean(evals) if evals else 0.0,
                          "startup_s": max(startup, 0.0),
                          "exit_s": max(t_end - times[-1][0], 0.0) if times else 0.0,
                          "wall_s": t_end - t0}
            rb.log(f"stage 0: {arm}: {probe[arm]['step_s'] * 1e3:.0f} ms/step, validation "
                   f"{probe[arm]['eval_s']:.1f} s, start-up {probe[arm]['startup_s']:.0f} s, "
                   f"save + exit {probe[arm]['exit_s']:.1f} s")
        # test loss + routing of one run: a start-up plus a forward pass over the test set in
        # one process (a validation is a forward pass over eval_iters x gbs sequences, split
        # over nproc processes)
        cfg, p = effective(self.opts), probe[arms[0]]
        per_seq = p["eval_s"] * self.opts.nproc / (cfg["eval_iters"] * cfg["global_batch_size"])
        probe["analysis_s"] = p["startup_s"] + per_seq * self.opts.test_samples
        _write_json(path, probe)
        return probe


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def estimate_run_s(probe: dict, arm: str, cfg: dict) -> float:
    """Planned seconds of one run of ``arm`` from the stage-0 probe (2-layer arms: the CoE
    probe; 4-layer: the 4-layer probe, or 2x the 2-layer step time)."""
    layers = ARMS[arm].fields.get("num_layers", BASE["num_layers"])
    p = probe.get(DEPTH if layers > BASE["num_layers"] and DEPTH in probe else COE) \
        or next(v for k, v in probe.items() if isinstance(v, dict))
    scale = 1.0 if (layers == BASE["num_layers"] or DEPTH in probe) else layers / BASE["num_layers"]
    iters, ev, sv = cfg["train_iters"], cfg["eval_interval"], cfg["save_interval"]
    return (p["startup_s"] + scale * (iters * p["step_s"] + (iters // ev) * p["eval_s"])
            + (iters // sv) * p["exit_s"])


def summarize(name: str, arm: str, lr: float, seed: int, run_dir: Path) -> dict:
    records = rb.read_jsonl(run_dir / "tensorboard" / "metrics.jsonl")
    train = {r["iteration"]: r for r in records if r["type"] == "train"}
    valid = {r["iteration"]: r["lm_loss"] for r in records if r["type"] == "valid"}
    its = sorted(train)
    steady = [train[i]["step_time_s"] for i in its if i > 5] or [train[i]["step_time_s"] for i in its]
    step = statistics.median(steady)
    curve = [[i, valid[i]] for i in sorted(valid)]
    segs = {}
    for p in sorted((run_dir / "measure").glob("*/rank_*.json")):
        segs.setdefault(p.parent.name, []).append(json.loads(p.read_text()))
    first = next(iter(segs.values()))[0] if segs else {}
    return {
        "run": name, "arm": arm, "lr": lr, "seed": seed, "iterations": its[-1],
        "score": paired.last_k_mean(curve, min(paired.RULES["last_k"], len(curve))),
        "final_valid_loss": curve[-1][1], "best_valid_loss": min(v for _, v in curve),
        "final_train_loss": train[its[-1]]["lm_loss"], "valid_curve": curve,
        "median_step_time_s": step,
        "tokens_per_s": train[its[-1]]["tokens_per_s"] * train[its[-1]]["step_time_s"] / step,
        "params_total": first.get("params_total"),
        "routed_expert_params_total": first.get("routed_expert_params_total"),
        "rss_peak_mib": max(sum(r["rss_peak_bytes"] for r in s) for s in segs.values()) / 2**20
        if segs else None,
        "rss_peak_above_baseline_mib": max(sum(r["rss_peak_above_baseline_bytes"] for r in s)
                                           for s in segs.values()) / 2**20 if segs else None,
    }


# --------------------------------------------------------------------------- report
def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def _interval(st: dict) -> str:
    if not st["n"]:
        return "-"
    if st["n"] == 1:
        return f"{st['mean']:+.4f} (n=1)"
    return f"{st['mean']:+.4f} [{st['lo']:+.4f}, {st['hi']:+.4f}] (n={st['n']})"


def _eff(model_runs: list, base_runs: list, step: int) -> str:
    """Mean over paired seeds of the step efficiency; '>= x' where the baseline never got there."""
    base = {r["seed"]: r for r in base_runs}
    vals, bounds = [], []
    for r in model_runs:
        if r["seed"] not in base:
            continue
        e = paired.step_efficiency(r["valid_curve"], base[r["seed"]]["valid_curve"], step)
        if e["value"] is not None:
            vals.append(e["value"])
        elif e["lower_bound"] is not None:
            bounds.append(e["lower_bound"])
    if not vals and not bounds:
        return "-"
    parts = []
    if vals:
        parts.append(f"{statistics.mean(vals):.2f}" + (f" [{min(vals):.2f}, {max(vals):.2f}]"
                                                       if len(vals) > 1 else ""))
    if bounds:
        parts.append(f"{len(bounds)} seed(s) >= {min(bounds):.2f} (not reached by the baseline)")
    return "; ".join(parts) + f" (n={len(vals) + len(bounds)})"


class Report:
    def __init__(self, opts, plan: Plan, summaries: dict, routing: dict, probe, best: dict,
                 planned: list, wall_s: float):
        self.opts, self.plan, self.s, self.routing = opts, plan, summaries, routing
        self.probe, self.best, self.planned, self.wall_s = probe, best, planned, wall_s
        for r in self.s.values():
            rt = routing.get(r["run"])
            r["test_loss"] = rt["lm_loss"] if rt else None

    def runs_of(self, arm: str) -> list:
        lr = self.plan.lr_of(arm, self.best)
        if lr is None:
            return []
        return sorted((r for r in self.s.values() if r["arm"] == arm and r["lr"] == lr
                       and r["seed"] <= self.plan.seeds[arm]), key=lambda r: r["seed"])

    def diffs(self, arm: str, base: str, key: str = "score") -> list:
        b = {r["seed"]: r for r in self.runs_of(base)}
        return [r[key] - b[r["seed"]][key] for r in self.runs_of(arm)
                if r["seed"] in b and r[key] is not None and b[r["seed"]][key] is not None]

    def complete(self) -> bool:
        return all(lr is not None and run_name(a, lr, s) in self.s for a, lr, s in self.planned)

    def decision(self) -> dict:
        need = [(a, lr, s) for a, lr, s in self.planned if a in (COE, MOE, DEPTH)]
        complete = bool(need) and all(lr is not None and run_name(a, lr, s) in self.s
                                      for a, lr, s in need)
        d = self.diffs(COE, MOE)
        gain = None
        if DEPTH in self.plan.arms and self.runs_of(DEPTH):
            g = self.diffs(MOE, DEPTH)
            gain = statistics.mean(g) if g else None
        return paired.decide(d, gain, complete and COE in self.plan.arms and MOE in self.plan.arms)

    def markdown(self) -> str:
        o = self.opts
        done = sum(run_name(a, lr, s) in self.s for a, lr, s in self.planned if lr is not None)
        total = len(self.planned)
        status = ("COMPLETE" if self.complete() else
                  f"**IN PROGRESS**: {done} of {total} planned runs finished (stage 2 runs whose "
                  "rate stage 1 has not chosen yet count as planned)")
        L = [f"# Paper benchmark, protocol 2 (CPU scale): {status}", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `bash examples/paper/run.sh "
             f"--protocol 2{' --report-only' if o.report_only else ''}`. Training wall time so far "
             f"(sum over finished runs): {self.wall_s / 60:.0f} min.", ""]
        if o.overrides:
            L += [f"Overrides of the protocol (not the protocol's numbers): {o.overrides}", ""]
        c = effective(o)
        L += [f"Arms: {', '.join(ARMS[a].label for a in self.plan.arms)}. {c['train_iters']} "
              f"steps x {c['global_batch_size']} x {c['seq_length']} tokens, constant LR "
              f"after {c['lr_warmup_fraction']:.0%} warmup, validation every "
              f"{c['eval_interval']} steps on the whole held-out split "
              f"({self.opts.sizes['valid_sequences']} sequences), GSM8K test loss on "
              f"{self.opts.test_samples} test sequences (the whole test set) at the end.", ""]
        if self.probe:
            L += [f"Stage 0 planned wall time for the whole protocol: "
                  f"{self.probe.get('planned_total_s', 0) / 3600:.1f} h "
                  f"({self.probe.get('planned_runs', '?')} runs).", ""]
        # decision
        dec = self.decision()
        L += ["## Decision (rules fixed before the results)", "", paired.RULES_TEXT, "",
              f"**Verdict: {dec['verdict']}**: {dec['reason']}.", ""]
        st = dec["stats"]
        if st["n"]:
            L += [f"Per-seed d (CoE-2(4/32) - paper MoE(8/32), score): "
                  f"{', '.join(f'{x:+.4f}' for x in st['values'])}; mean {_interval(st)}.", ""]
        if dec["depth_gain"] is not None:
            L += [f"Depth control: 2-layer minus 4-layer paper MoE score = "
                  f"{dec['depth_gain']:+.4f} (mean over {len(self.diffs(MOE, DEPTH))} paired "
                  "seeds; >= 0.05 means depth helps here).", ""]
        # stage 1
        L += ["## Stage 1: constant-LR sweep (seed 1)", "",
              "| arm | " + " | ".join(f"lr {lr:g}" for lr in self.plan.lrs) + " | chosen |",
              "|---" * (len(self.plan.lrs) + 2) + "|"]
        for a in self.plan.arms:
            if not ARMS[a].sweep:
                continue
            cells = []
            for lr in self.plan.lrs:
                r = self.s.get(run_name(a, lr, 1))
                cells.append(f"{r['score']:.4f}" if r else "in progress")
            b = self.best.get(a)
            edge = b is not None and b in (self.plan.lrs[0], self.plan.lrs[-1]) and len(self.plan.lrs) > 1
            L.append(f"| {ARMS[a].label} | " + " | ".join(cells) + " | "
                     + ("-" if b is None else f"{b:g}" + (" (edge of the sweep)" if edge else ""))
                     + " |")
        L += ["", "Score = mean of the last 3 validation losses. Equal-rate comparison (seed 1, "
              "score differences at the same rate):", "",
              "| lr | CoE - paper MoE | CoE - standard MoE | paper MoE - standard MoE |",
              "|---|---|---|---|"]
        for lr in self.plan.lrs:
            def d(a, b):
                ra, rb_ = self.s.get(run_name(a, lr, 1)), self.s.get(run_name(b, lr, 1))
                return f"{ra['score'] - rb_['score']:+.4f}" if ra and rb_ else "-"
            L.append(f"| {lr:g} | {d(COE, MOE)} | {d(COE, STD)} | {d(MOE, STD)} |")
        # stage 2
        L += ["", "## Stage 2: every arm at its rate", "",
              "Losses: mean ± std over seeds. d = paired difference of the score against the "
              "paper MoE (same seeds), mean [95% t-interval].", "",
              "| arm | lr | seeds (done/planned) | score | final valid | best valid | GSM8K test "
              "(mean ± std; per seed) | d vs paper MoE (score) | d vs paper MoE (test) | params "
              "| routed-expert params | peak RSS above baseline (MiB) | tokens/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in self.plan.arms:
            rs = self.runs_of(a)
            lr = self.plan.lr_of(a, self.best)
            n_plan = self.plan.seeds[a]
            if not rs:
                L.append(f"| {ARMS[a].label} | {'-' if lr is None else f'{lr:g}'} | 0/{n_plan} "
                         "| in progress | | | | | | | | | |")
                continue
            tests = [r["test_loss"] for r in rs]
            per_seed = ", ".join("-" if t is None else f"{t:.4f}" for t in tests)
            dv = "(baseline)" if a == MOE else _interval(paired.paired_interval(self.diffs(a, MOE)))
            dt = "(baseline)" if a == MOE else _interval(paired.paired_interval(
                self.diffs(a, MOE, "test_loss")))
            mark = "" if len(rs) == n_plan else " (in progress)"
            rss = [r["rss_peak_above_baseline_mib"] for r in rs if r["rss_peak_above_baseline_mib"]]
            rss_s = f"{statistics.mean(rss):.0f}" if rss else "-"
            L.append(
                f"| {ARMS[a].label} | {lr:g} | {len(rs)}/{n_plan}{mark} | "
                f"{_ms([r['score'] for r in rs])} | {_ms([r['final_valid_loss'] for r in rs])} | "
                f"{_ms([r['best_valid_loss'] for r in rs])} | {_ms(tests)}; {per_seed} | {dv} | "
                f"{dt} | {rb._fmt_int(rs[0]['params_total'])} | "
                f"{rb._fmt_int(rs[0]['routed_expert_params_total'])} | {rss_s} | "
                f"{statistics.median(r['tokens_per_s'] for r in rs):,.0f} |")
        for base, blabel in ((MOE, "paper MoE(8/32)"), (STD, "standard MoE(8/32)")):
            if base not in self.plan.arms:
                continue
            L += ["", f"Step efficiency vs the {blabel} (the step at which the {blabel} first "
                  "reaches the arm's validation loss at step s, interpolated between validations, "
                  "over s; > 1: the arm is ahead; mean [min, max] over paired seeds):", "",
                  "| arm | " + " | ".join(f"s = {s}" for s in EFFICIENCY_STEPS) + " |",
                  "|---" * (len(EFFICIENCY_STEPS) + 1) + "|"]
            for a in self.plan.arms:
                if a == base:
                    continue
                L.append(f"| {ARMS[a].label} | " + " | ".join(
                    _eff(self.runs_of(a), self.runs_of(base), s) for s in EFFICIENCY_STEPS) + " |")
        # routing
        L += ["", "## Routing on the GSM8K test set (mean over layers and seeds)", "",
              "| arm | load max/mean | pass-1/pass-2 top-k overlap (random) | distinct chains "
              "or top-k sets used (of tokens; space) | perplexity |", "|---|---|---|---|---|"]
        for a in self.plan.arms:
            rt = [rb._routing_means(self.routing[r["run"]]) for r in self.runs_of(a)
                  if r["run"] in self.routing]
            if not rt:
                continue
            lm = statistics.mean(x["load_max_over_mean"] for x in rt)
            if "overlap" in rt[0]:
                L.append(f"| {ARMS[a].label} | {lm:.2f} | "
                         f"{statistics.mean(x['overlap'] for x in rt):.3f} "
                         f"({rt[0]['overlap_random']:.3f}) | "
                         f"{statistics.mean(x['distinct_chains'] for x in rt):,.0f} chains (of "
                         f"{rt[0]['tokens']:,}; {rt[0]['chain_space']:,}) | "
                         f"{statistics.mean(x['chain_perplexity'] for x in rt):,.0f} |")
            else:
                L.append(f"| {ARMS[a].label} | {lm:.2f} | - | "
                         f"{statistics.mean(x['distinct_sets'] for x in rt):,.0f} sets (of "
                         f"{rt[0]['tokens']:,}; {rt[0]['set_space']:,}) | "
                         f"{statistics.mean(x['set_perplexity'] for x in rt):,.0f} |")
        L += ["", "Plots: `paired_difference.png` (score-curve differences vs the paper MoE per "
              "step: thin lines per seed, thick = mean), `valid_loss.png` (mean validation "
              "curves), `routing_*` (seed-1 routing plots of CoE-2(4/32) and the paper MoE). "
              "Per-run numbers: `runs.csv`; sweep: `lr_sweep.csv`."]
        return "\n".join(L) + "\n"

    def write(self, out: Path) -> str:
        out.mkdir(parents=True, exist_ok=True)
        text = self.markdown()
        (out / "results.md").write_text(text)
        fields = ["arm", "label", "lr", "seeds_done", "seeds_planned", "score_mean", "score_std",
                  "final_valid_mean", "final_valid_std", "best_valid_mean", "best_valid_std",
                  "test_mean", "test_std", "test_per_seed", "d_score_mean", "d_score_lo",
                  "d_score_hi", "d_test_mean", "d_test_lo", "d_test_hi", "params_total",
                  "routed_expert_params_total", "rss_peak_above_baseline_mib", "tokens_per_s"]
        with open(out / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for a in self.plan.arms:
                rs = self.runs_of(a)
                row = {"arm": a, "label": ARMS[a].label, "lr": self.plan.lr_of(a, self.best),
                       "seeds_done": len(rs), "seeds_planned": self.plan.seeds[a]}
                for key, col in (("score", "score"), ("final_valid_loss", "final_valid"),
                                 ("best_valid_loss", "best_valid"), ("test_loss", "test")):
                    xs = [r[key] for r in rs if r[key] is not None]
                    row[f"{col}_mean"] = statistics.mean(xs) if xs else None
                    row[f"{col}_std"] = statistics.stdev(xs) if len(xs) > 1 else None
                row["test_per_seed"] = " ".join(f"{r['test_loss']:.4f}" for r in rs
                                                if r["test_loss"] is not None)
                if a != MOE:
                    for key, col in (("score", "d_score"), ("test_loss", "d_test")):
                        st = paired.paired_interval(self.diffs(a, MOE, key))
                        row[f"{col}_mean"], row[f"{col}_lo"], row[f"{col}_hi"] = (
                            st["mean"], st["lo"], st["hi"])
                if rs:
                    row.update(params_total=rs[0]["params_total"],
                               routed_expert_params_total=rs[0]["routed_expert_params_total"],
                               rss_peak_above_baseline_mib=statistics.mean(
                                   r["rss_peak_above_baseline_mib"] or 0 for r in rs),
                               tokens_per_s=statistics.median(r["tokens_per_s"] for r in rs))
                w.writerow(row)
        run_fields = ["run", "arm", "lr", "seed", "iterations", "score", "final_valid_loss",
                      "best_valid_loss", "final_train_loss", "test_loss", "params_total",
                      "routed_expert_params_total", "rss_peak_mib", "rss_peak_above_baseline_mib",
                      "median_step_time_s", "tokens_per_s", "wall_s"]
        with open(out / "runs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=run_fields, extrasaction="ignore")
            w.writeheader()
            for r in sorted(self.s.values(), key=lambda r: (r["arm"], r["lr"], r["seed"])):
                w.writerow(r)
        with open(out / "lr_sweep.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["arm", "lr", "seed", "score", "final_valid_loss", "chosen"])
            for a in self.plan.arms:
                if ARMS[a].sweep:
                    for lr in self.plan.lrs:
                        r = self.s.get(run_name(a, lr, 1))
                        w.writerow([a, lr, 1, r and r["score"], r and r["final_valid_loss"],
                                    self.best.get(a) == lr])
        self.plots(out)
        return text

    def plots(self, out: Path) -> None:
        try:
            import matplotlib
        except ImportError:
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        base = {r["seed"]: dict(map(tuple, r["valid_curve"])) for r in self.runs_of(MOE)}
        for k, a in enumerate(self.plan.arms):
            if a == MOE:
                continue
            curves = []
            for r in self.runs_of(a):
                b = base.get(r["seed"])
                if not b:
                    continue
                c = {i: v - b[i] for i, v in r["valid_curve"] if i in b}
                curves.append(c)
                if a == COE:
                    ax.plot(sorted(c), [c[i] for i in sorted(c)], color=f"C{k}", lw=0.7, alpha=0.5)
            if curves:
                its = sorted(set.intersection(*[set(c) for c in curves]))
                ax.plot(its, [statistics.mean(c[i] for c in curves) for i in its], color=f"C{k}",
                        lw=2, label=f"{ARMS[a].label} (n={len(curves)})")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation loss minus paper MoE(8/32), same seed")
        ax.set_ylim(-0.25, 0.25)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.set_title("paired difference vs the paper MoE (thin: CoE-2(4/32) per seed)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "paired_difference.png", dpi=110)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, a in enumerate(self.plan.arms):
            rs = self.runs_of(a)
            if not rs:
                continue
            its = sorted(set.intersection(*[{i for i, _ in r["valid_curve"]} for r in rs]))
            vals = [[dict(map(tuple, r["valid_curve"]))[i] for r in rs] for i in its]
            ax.plot(its, [statistics.mean(v) for v in vals], color=f"C{k}",
                    label=f"{ARMS[a].label} (n={len(rs)})")
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation LM loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "valid_loss.png", dpi=110)
        plt.close(fig)
        for a in (COE, MOE):
            rs = self.runs_of(a)
            if rs and rs[0]["seed"] == 1:
                src = Path(self.opts.work_dir) / "routing" / rs[0]["run"]
                for png in ("load_histograms.png", "cooccurrence_heatmaps.png"):
                    if (src / png).exists():
                        shutil.copyfile(src / png, out / f"routing_{a}_{png}")


# --------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    p.add_argument("--seeds-main", type=int, default=5, help="seeds of CoE-2(4/32) / paper MoE")
    p.add_argument("--seeds-other", type=int, default=3, help="seeds of the other arms")
    p.add_argument("--out", default=str(RESULTS_DIR), help="report directory")
    p.add_argument("--work-dir", default=str(WORK_DIR), help="runs, checkpoints, logs")
    p.add_argument("--report-only", action="store_true",
                   help="write the (partial) report from the finished runs; train nothing")
    p.add_argument("--write-configs", action="store_true",
                   help=f"write the arms' configs to {CONFIG_DIR.relative_to(ROOT)} and exit")
    p.add_argument("--probe-iters", type=int, default=20, help="stage-0 steps per probe")
    p.add_argument("--train-data", help="training data prefix (default: GSM8K train, vocab 1024)")
    p.add_argument("--test-data", help="test data prefix (same tokenizer)")
    p.add_argument("--test-samples", type=int,
                   help="test sequences (default: the whole test set; 0: no analysis)")
    p.add_argument("--run-timeout", type=float, default=3 * 3600)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override protocol options (smoke tests only; printed in the report), "
                        "e.g. train_iters=4 expert_model_parallel_size=1")
    p.add_argument("--nproc", type=int, default=2, help="processes per run")
    opts = p.parse_args(argv)
    opts.overrides = {}
    for item in opts.set:
        key, _, value = item.partition("=")
        if key not in BASE:
            p.error(f"--set {item}: {key!r} is not a protocol option (see BASE in {__file__})")
        opts.overrides[key] = yaml.safe_load(value)
    opts.train_prefix = opts.train_data or str(ROOT / "data/processed/gsm8k_train_v1k")
    opts.test_prefix = opts.test_data or str(ROOT / "data/processed/gsm8k_test_v1k")
    opts.torchrun = str(Path(opts.python).with_name("torchrun"))
    return opts


def effective(opts) -> dict:
    cfg = dict(BASE)
    cfg.update(opts.overrides)
    return cfg


def main(argv=None) -> int:
    opts = parse(argv)
    if opts.write_configs:
        for pth in write_configs():
            print(pth.relative_to(ROOT))
        return 0
    t_start = time.time()
    work = Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if not (opts.train_data and opts.test_data):
        rb.ensure_data(opts.python, opts.train_prefix, opts.test_prefix, 1024)
    cfg = effective(opts)
    key = [opts.train_prefix, opts.test_prefix, cfg["seq_length"], cfg["split"]]
    cached = work / "split_sizes.json"
    sizes = json.loads(cached.read_text()) if cached.exists() else {}
    if sizes.get("key") != key:
        sizes = dict(split_sizes(*key), key=key)
        _write_json(cached, sizes)
    opts.sizes = sizes
    whole = opts.sizes["valid_sequences"] // cfg["global_batch_size"]
    if cfg["eval_iters"] != whole:
        raise SystemExit(f"error: eval_iters is {cfg['eval_iters']} but the whole validation "
                         f"split is {opts.sizes['valid_sequences']} sequences = {whole} global "
                         f"batches of {cfg['global_batch_size']}: set eval_iters to {whole} "
                         "(BASE in examples/paper/protocol2.py, or --set eval_iters=...)")
    if opts.test_samples is None:
        opts.test_samples = opts.sizes["test_sequences"]
    plan = Plan(opts.arms, tuple(opts.lrs), opts.seeds_main, opts.seeds_other)
    runner = Runner(opts)

    def load_summaries() -> dict:
        out = {}
        for pth in sorted((work / "summaries").glob("*.json")):
            s = json.loads(pth.read_text())
            out[s["run"]] = s
        return out

    def load_routing(summaries) -> dict:
        found = {}
        for n in summaries:
            pth = work / "routing" / n / "routing.json"
            if pth.exists():
                found[n] = json.loads(pth.read_text())
        return found

    def report() -> str:
        summaries = load_summaries()
        best = plan.best_lrs(summaries)
        planned = list(dict.fromkeys(plan.stage1() + plan.stage2(best)))  # unique, in order
        probe = json.loads((work / "stage0.json").read_text()) if (work / "stage0.json").exists() \
            else None
        wall = sum(s.get("wall_s", 0) for s in summaries.values())
        text = Report(opts, plan, summaries, load_routing(summaries), probe, best, planned,
                      wall).write(Path(opts.out))
        return text

    if opts.report_only:
        print(report(), flush=True)
        rb.log(f"wrote {opts.out}/results.md (report only)")
        return 0
    for sig in (signal.SIGTERM, signal.SIGINT):  # the current run saves and stops
        signal.signal(sig, _on_signal)

    rb.log(f"protocol 2: arms {', '.join(plan.arms)}; lrs {plan.lrs}; work {work}; report "
           f"{opts.out}; validation = {whole} batches (whole split of "
           f"{opts.sizes['valid_sequences']} sequences); test = {opts.test_samples} sequences")
    # ---- stage 0
    probe = runner.stage0(plan)
    summaries = load_summaries()
    best = plan.best_lrs(summaries)
    todo1 = [x for x in plan.stage1() if run_name(*x) not in summaries]
    stage2_all = plan.stage2({a: (best.get(a) or BASE["lr"]) for a in plan.arms})
    todo2 = [x for x in stage2_all if run_name(*x) not in summaries
             and x not in todo1]
    per_run = {a: estimate_run_s(probe, a, cfg) for a in plan.arms}
    planned_s = sum(per_run[a] for a, _, _ in todo1 + todo2) + \
        probe.get("analysis_s", 0) * (len(todo1) + len(todo2))
    probe.update(planned_total_s=planned_s + sum(s.get("wall_s", 0) for s in summaries.values()),
                 planned_runs=len(set(plan.stage1() + stage2_all)), planned_remaining_s=planned_s)
    _write_json(work / "stage0.json", probe)
    rb.log("stage 0: planned wall time per run: " + ", ".join(
        f"{a} {per_run[a] / 60:.1f} min" for a in plan.arms))
    rb.log(f"stage 0: PLANNED WALL TIME {planned_s / 3600:.2f} h for {len(todo1) + len(todo2)} "
           f"remaining runs (stage 1: {len(todo1)}, stage 2: up to {len(todo2)}; a stage-2 run "
           "that equals a stage-1 run is not run again), on this machine's current load")

    failed = []

    def block(runs: list) -> None:
        for arm, lr, seed in runs:
            if STOP["signal"]:
                return
            s = runner.run(arm, lr, seed)
            if s is None:
                failed.append(run_name(arm, lr, seed))
            report()
        if not STOP["signal"]:
            runner.analyze(load_summaries())
            report()

    # ---- stage 1
    block(plan.stage1())
    best = plan.best_lrs(load_summaries())
    if not STOP["signal"]:
        rb.log("stage 1: best rates: " + ", ".join(f"{a} {lr}" for a, lr in best.items()))
    # ---- stage 2, in blocks of seeds (test loss + routing after each block)
    runs2 = [x for x in plan.stage2(best) if x[1] is not None]
    for seed in sorted({s for _, _, s in runs2}):
        if STOP["signal"]:
            break
        block([x for x in runs2 if x[2] == seed])
    text = report()
    print("\n" + text, flush=True)
    total = time.time() - t_start
    if STOP["signal"]:
        rb.log(f"stopped by signal {STOP['signal']} after {total:.0f} s; run the same command "
               "again to continue")
        return 128 + int(STOP["signal"])
    rb.log(f"protocol 2: wall time of this invocation {total:.0f} s ({total / 3600:.2f} h); "
           f"training wall time of all finished runs "
           f"{sum(s.get('wall_s', 0) for s in load_summaries().values()) / 3600:.2f} h; "
           f"report {opts.out}/results.md" + (f"; FAILED runs: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
