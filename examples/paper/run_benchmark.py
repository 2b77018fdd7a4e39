#!/usr/bin/env python
"""The Chain-of-Experts paper benchmark in one command: MoE vs CoE vs ablations, several seeds.

    .venv/bin/python examples/paper/run_benchmark.py --protocol 2   # protocol 2 (protocol2.py)
    .venv/bin/python examples/paper/run_benchmark.py            # auto: GPU -> paper size, else CPU
    .venv/bin/python examples/paper/run_benchmark.py --scale cpu --train-iters 200 --seeds 1 2 3
    .venv/bin/python examples/paper/run_benchmark.py --scale gpu  # examples/*.yaml, 1 GPU per run
    bash examples/paper/run.sh                                   # the same, with the venv

Models (``--scale cpu``, configs in ``examples/paper/configs/cpu/``; N = 16 routed experts + 1
shared expert, hidden 128, 2 layers, MLA, seq 128):

    moe_8_16                   MoE(8/16)         C=1, top-8, inner off, outer on (the baseline)
    coe2_4_16                  CoE-2(4/16)       C=2, top-4 per pass, inner on, outer off
    coe2_4_12                  CoE-2(4/12)       the same with 3N/4 routed experts (memory-matched)
    coe2_4_16_shared_router    CoE-2(4/16), one router shared by both passes (ablation)
    coe2_4_16_outer_residual   CoE-2(4/16), outer residual only, inner off (ablation)

``--scale gpu`` runs the paper-size configs ``examples/{moe_8_64,coe2_4_64,coe2_4_48,
coe2_4_64_shared_router,coe2_4_64_outer_residual}.yaml`` (63/47 routed + 1 shared expert,
hidden 1024, 4 layers, seq 512, 1000 steps, bf16) with one process per run.

Every (model, seed) is one run of the trainer (``megatron_coe.train`` through
``train_measured.py``, which records peak memory and parameter counts). Then
``tools/analyze_routing.py`` loads each final checkpoint, measures the LM loss on the held-out
GSM8K test set (never trained on) and the routing statistics. Outputs in ``--out``:

    results.md, results.csv        one row per model: losses mean ± std and [min, max] over seeds,
                                   parameters, measured peak memory, tokens/s, step time / MoE
    runs.csv                       one row per run (seed)
    valid_loss.png                 validation-loss curves (mean over seeds, min-max band)
    routing/<run>/                 routing.json / routing.md / load + co-occurrence PNGs

Resumable: a run whose summary ``--out/runs/<run>.json`` exists is skipped; a run that was
interrupted resumes from its last checkpoint (``--load`` = its ``--save`` directory, saved every
``--save-interval`` steps); routing results that exist are not recomputed. ``--force`` reruns.

Validation: the trainer's validation split (``split 98,2,0``: the last 2% of the GSM8K train
problems, disjoint documents, never trained on; ``--eval-iters`` global batches every
``--eval-interval`` steps; the same batches for every model at a given seed) gives the curves and
the final/best validation loss; the GSM8K test set gives the test loss of the final checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# name -> (label, config file, role)
CPU_MODELS = {
    "moe_8_16": ("MoE(8/16)", HERE / "configs/cpu/moe_8_16.yaml"),
    "coe2_4_16": ("CoE-2(4/16)", HERE / "configs/cpu/coe2_4_16.yaml"),
    "coe2_4_12": ("CoE-2(4/12)", HERE / "configs/cpu/coe2_4_12.yaml"),
    "coe2_4_16_shared_router": ("CoE-2(4/16) shared router", HERE / "configs/cpu/coe2_4_16_shared_router.yaml"),
    "coe2_4_16_outer_residual": ("CoE-2(4/16) outer residual only", HERE / "configs/cpu/coe2_4_16_outer_residual.yaml"),
}
GPU_MODELS = {
    "moe_8_64": ("MoE(8/64)", ROOT / "examples/moe_8_64.yaml"),
    "coe2_4_64": ("CoE-2(4/64)", ROOT / "examples/coe2_4_64.yaml"),
    "coe2_4_48": ("CoE-2(4/48)", ROOT / "examples/coe2_4_48.yaml"),
    "coe2_4_64_shared_router": ("CoE-2(4/64) shared router", ROOT / "examples/coe2_4_64_shared_router.yaml"),
    "coe2_4_64_outer_residual": ("CoE-2(4/64) outer residual only", ROOT / "examples/coe2_4_64_outer_residual.yaml"),
}
# roles: baseline, main CoE, memory-matched CoE, ablations (same order in both scales)
ROLES = ("baseline", "coe", "coe_small", "ablation_shared_router", "ablation_outer_residual")

# Defaults per scale. CPU: sized for ~45-60 min for 15 runs on a shared 2-core machine.
SCALES = {
    "cpu": dict(models=CPU_MODELS, nproc=2, ep=2, threads=1, train_iters=300, eval_interval=25,
                eval_iters=15, save_interval=100, test_samples=1024, analysis_mb=16,
                train_prefix="data/processed/gsm8k_train_v1k", vocab=1024,
                test_prefix="data/processed/gsm8k_test_v1k", extra=[], run_timeout=1800),
    "gpu": dict(models=GPU_MODELS, nproc=1, ep=1, threads=None, train_iters=None,
                eval_interval=None, eval_iters=None, save_interval=250, test_samples=1024,
                analysis_mb=8, train_prefix="data/processed/gsm8k_train", vocab=4096,
                test_prefix="data/processed/gsm8k_test", extra=["--bf16"], run_timeout=4 * 3600),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- data
def ensure_data(python: str, train_prefix: str, test_prefix: str, vocab: int) -> None:
    """Tokenize GSM8K train (training a BPE) and test (same tokenizer) once."""
    tool = str(ROOT / "tools/preprocess_data.py")
    if not (os.path.exists(train_prefix + ".idx") and os.path.exists(train_prefix + ".tokenizer.json")):
        log(f"preprocessing data/gsm8k/train.jsonl.gz -> {train_prefix} (vocab {vocab})")
        subprocess.run([python, tool, "--input", str(ROOT / "data/gsm8k/train.jsonl.gz"),
                        "--json-keys", "question", "answer", "--vocab-size", str(vocab),
                        "--output-prefix", train_prefix], check=True, cwd=ROOT)
    if not os.path.exists(test_prefix + ".idx"):
        log(f"preprocessing data/gsm8k/test.jsonl.gz -> {test_prefix} (tokenizer of {train_prefix})")
        subprocess.run([python, tool, "--input", str(ROOT / "data/gsm8k/test.jsonl.gz"),
                        "--json-keys", "question", "answer", "--tokenizer-model",
                        train_prefix + ".tokenizer.json", "--output-prefix", test_prefix],
                       check=True, cwd=ROOT)


# --------------------------------------------------------------------------- one run
def read_jsonl(path: Path) -> list:
    out = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            continue
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    try:
        procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in reversed(procs):
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def train_command(opts, cfg: dict, config: Path, seed: int, run_dir: Path) -> list:
    script = str(HERE / "train_measured.py")
    if opts.nproc == 1:
        launcher = [opts.python, script]
    else:
        launcher = [opts.torchrun, "--nproc-per-node", str(opts.nproc), "--master-addr",
                    "127.0.0.1", "--master-port", str(free_port()), script]
    args = ["--config", str(config), "--seed", str(seed),
            "--data-path", opts.train_prefix,
            "--save", str(run_dir / "checkpoints"), "--load", str(run_dir / "checkpoints"),
            "--tensorboard-dir", str(run_dir / "tensorboard"),
            "--log-interval", str(opts.log_interval)]
    if opts.ep != 1:
        args += ["--expert-model-parallel-size", str(opts.ep)]
    for flag, value in (("--train-iters", opts.train_iters), ("--eval-interval", opts.eval_interval),
                        ("--eval-iters", opts.eval_iters), ("--save-interval", opts.save_interval)):
        if value is not None:
            args += [flag, str(value)]
    return launcher + args + cfg["extra"] + list(opts.trainer_args)


def summarize_run(name: str, model: str, seed: int, run_dir: Path, opts) -> dict:
    """Per-run summary from metrics.jsonl and the measured memory/parameter JSONs."""
    records = read_jsonl(run_dir / "tensorboard" / "metrics.jsonl")
    train = {r["iteration"]: r for r in records if r["type"] == "train"}  # last wins (resumes)
    valid = {r["iteration"]: r["lm_loss"] for r in records if r["type"] == "valid"}
    its = sorted(train)
    steady = [train[i]["step_time_s"] for i in its if i > 5] or [train[i]["step_time_s"] for i in its]
    step = statistics.median(steady)
    tokens_per_step = train[its[-1]]["tokens_per_s"] * train[its[-1]]["step_time_s"]
    segments = sorted((run_dir / "measure").glob("*/rank_*.json"))
    by_segment = {}
    for p in segments:
        by_segment.setdefault(p.parent.name, []).append(json.loads(p.read_text()))
    rss_peak = max(sum(r["rss_peak_bytes"] for r in seg) for seg in by_segment.values())
    rss_above = max(sum(r["rss_peak_above_baseline_bytes"] for r in seg) for seg in by_segment.values())
    first = next(iter(by_segment.values()))[0]
    cuda = [sum(r.get("cuda_max_allocated_bytes", 0) for r in seg) for seg in by_segment.values()]
    v_its = sorted(valid)
    return {
        "run": name, "model": model, "seed": seed, "iterations": its[-1],
        "final_valid_loss": valid[v_its[-1]], "best_valid_loss": min(valid.values()),
        "final_train_loss": train[its[-1]]["lm_loss"],
        "valid_curve": [[i, valid[i]] for i in v_its],
        "train_curve": [[i, train[i]["lm_loss"]] for i in its],
        "median_step_time_s": step, "tokens_per_s": tokens_per_step / step,
        "params_total": first.get("params_total"),
        "routed_expert_params_total": first.get("routed_expert_params_total"),
        "rss_peak_mib": rss_peak / 2**20, "rss_peak_above_baseline_mib": rss_above / 2**20,
        "cuda_max_allocated_gib": (max(cuda) / 2**30) if any(cuda) else None,
        "nproc": opts.nproc, "ep": opts.ep,
    }


def run_one(opts, cfg: dict, model: str, config: Path, seed: int) -> dict | None:
    name = f"{model}_seed{seed}"
    summary_path = Path(opts.out) / "runs" / f"{name}.json"
    run_dir = Path(opts.work_dir) / name
    if summary_path.exists() and not opts.force:
        log(f"{name}: done before, skipped ({summary_path})")
        return json.loads(summary_path.read_text())
    if opts.force and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    segment = time.strftime("%Y%m%d-%H%M%S")
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", COE_MEASURE_DIR=str(run_dir / "measure" / segment))
    if cfg["threads"]:
        env["OMP_NUM_THREADS"] = str(cfg["threads"])
    cmd = train_command(opts, cfg, config, seed, run_dir)
    log(f"{name}: training ({' '.join(cmd[cmd.index('--config'):])})")
    t0 = time.time()
    with open(run_dir / "train.log", "a") as logf:
        logf.write(f"\n===== {time.ctime()}: {' '.join(cmd)}\n")
        logf.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait(timeout=cfg["run_timeout"])
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = "timeout"
    if rc != 0:
        tail = "".join((run_dir / "train.log").read_text().splitlines(True)[-15:])
        log(f"{name}: FAILED (rc {rc}) after {time.time() - t0:.0f} s; log {run_dir / 'train.log'}:\n{tail}")
        return None
    s = summarize_run(name, model, seed, run_dir, opts)
    s["wall_s"] = time.time() - t0
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = summary_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(s, indent=1))
    os.replace(tmp, summary_path)
    log(f"{name}: done in {s['wall_s']:.0f} s | final valid {s['final_valid_loss']:.4f} | best "
        f"{s['best_valid_loss']:.4f} | {s['median_step_time_s'] * 1e3:.0f} ms/step | "
        f"params {_fmt_int(s['params_total'])} | peak RSS above baseline {s['rss_peak_above_baseline_mib']:.0f} MiB")
    return s


# --------------------------------------------------------------------------- routing / test loss
def run_analysis(opts, runs: list) -> dict:
    """tools/analyze_routing.py on every final checkpoint without a result yet (one process)."""
    out_root = Path(opts.out) / "routing"
    todo = [r for r in runs if opts.force or not (out_root / r["run"] / "routing.json").exists()]
    if todo and opts.test_samples > 0:
        cmd = [opts.python, str(ROOT / "tools/analyze_routing.py"),
               "--load", *[str(Path(opts.work_dir) / r["run"] / "checkpoints") for r in todo],
               "--names", *[r["run"] for r in todo], "--data", opts.test_prefix,
               "--num-samples", str(opts.test_samples), "--micro-batch-size", str(opts.analysis_mb),
               "--out", str(out_root)]
        log(f"routing analysis + GSM8K test loss of {len(todo)} checkpoint(s)")
        env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
        res = subprocess.run(cmd, cwd=ROOT, env=env)
        if res.returncode != 0:
            log(f"routing analysis failed (rc {res.returncode}); the table will lack test losses")
    found = {}
    for r in runs:
        p = out_root / r["run"] / "routing.json"
        if p.exists():
            found[r["run"]] = json.loads(p.read_text())
    return found


# --------------------------------------------------------------------------- tables and plots
def _mean_std(xs: list) -> tuple:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _fmt_loss(xs: list) -> str:
    m, s = _mean_std(xs)
    if m is None:
        return "-"
    if len(xs) == 1:
        return f"{m:.4f}"
    return f"{m:.4f} ± {s:.4f} [{min(xs):.4f}, {max(xs):.4f}]"


def _fmt_int(x) -> str:
    return "-" if x is None else f"{x:,}"


def _routing_means(r: dict) -> dict:
    layers = list(r["layers"].values())
    out = {"test_loss": r["lm_loss"],
           "load_max_over_mean": statistics.mean(p["max_over_mean"] for L in layers for p in L["passes"])}
    if "pairs" in layers[0]:
        out["overlap"] = statistics.mean(L["pairs"][0]["overlap"] for L in layers)
        out["overlap_random"] = layers[0]["pairs"][0]["overlap_random"]
        out["distinct_chains"] = statistics.mean(L["distinct_chains"] for L in layers)
        out["chain_perplexity"] = statistics.mean(L["chain_perplexity"] for L in layers)
        out["chain_space"] = layers[0]["chain_space"]
        out["tokens"] = layers[0]["tokens"]
    else:
        out["distinct_sets"] = statistics.mean(L["passes"][0]["distinct_sets"] for L in layers)
        out["set_perplexity"] = statistics.mean(L["set_perplexity"] for L in layers)
        out["set_space"] = layers[0]["set_space"]
        out["tokens"] = layers[0]["tokens"]
    return out


def aggregate(opts, models: dict, runs: list, routing: dict) -> list:
    by_model = {m: [r for r in runs if r["model"] == m] for m in models}
    base = list(models)[0]
    base_step = statistics.median([r["median_step_time_s"] for r in by_model[base]]) if by_model[base] else None
    rows = []
    for role, (m, (label, config)) in zip(ROLES, models.items()):
        rs = by_model[m]
        if not rs:
            rows.append({"model": m, "label": label, "role": role, "seeds": 0})
            continue
        steps = [r["median_step_time_s"] for r in rs]
        rt = [_routing_means(routing[r["run"]]) for r in rs if r["run"] in routing]
        row = {
            "model": m, "label": label, "role": role, "seeds": len(rs),
            "seed_list": [r["seed"] for r in rs], "iterations": rs[0]["iterations"],
            "final_valid": [r["final_valid_loss"] for r in rs],
            "best_valid": [r["best_valid_loss"] for r in rs],
            "test": [x["test_loss"] for x in rt],
            "params_total": rs[0]["params_total"],
            "routed_expert_params_total": rs[0]["routed_expert_params_total"],
            "rss_peak_above_baseline_mib": [r["rss_peak_above_baseline_mib"] for r in rs],
            "rss_peak_mib": [r["rss_peak_mib"] for r in rs],
            "cuda_max_allocated_gib": [r["cuda_max_allocated_gib"] for r in rs if r["cuda_max_allocated_gib"]],
            "median_step_time_s": statistics.median(steps),
            "tokens_per_s": statistics.median([r["tokens_per_s"] for r in rs]),
            "step_time_ratio": statistics.median(steps) / base_step if base_step else None,
            "routing": rt,
        }
        rows.append(row)
    return rows


def verdict(rows: list) -> list:
    """Plain statements: did CoE beat MoE beyond the seed spread, are the ablations above CoE?"""
    by_role = {r["role"]: r for r in rows if r.get("seeds")}
    lines = []

    def compare(a_role, b_role, what, key="final_valid"):
        a, b = by_role.get(a_role), by_role.get(b_role)
        if not a or not b:
            return None
        xa, xb = a[key], b[key]
        if not xa or not xb:
            return None
        ma, mb = statistics.mean(xa), statistics.mean(xb)
        paired = [x - y for x, y, sa, sb in zip(xa, xb, a["seed_list"], b["seed_list"]) if sa == sb]
        separated = max(xa) < min(xb)
        msg = (f"{a['label']} {ma:.4f} vs {b['label']} {mb:.4f} ({key.replace('_', ' ')}): "
               f"difference {ma - mb:+.4f}")
        if paired:
            pm, ps = _mean_std(paired)
            msg += f"; per-seed differences {', '.join(f'{d:+.4f}' for d in paired)}"
        msg += (f" -> {what}: " + ("YES, beyond the seed spread (every "
                f"{a['label']} seed below every {b['label']} seed)" if separated else
                ("lower on average but the seed ranges overlap (NOT beyond the seed spread)"
                 if ma < mb else "NO")))
        return msg

    for key in ("final_valid", "best_valid", "test"):
        for a_role, b_role, what in (
                ("coe", "baseline", "CoE below MoE"),
                ("coe_small", "baseline", "memory-matched CoE below MoE"),
                ("coe", "ablation_shared_router", "independent routers help"),
                ("coe", "ablation_outer_residual", "inner residual helps")):
            m = compare(a_role, b_role, what, key)
            if m:
                lines.append(m)
    return lines


def markdown(opts, rows: list, verdict_lines: list) -> str:
    gpu = any(r.get("cuda_max_allocated_gib") for r in rows if r.get("seeds"))
    mem_head = ("peak GPU memory allocated (GiB, sum over ranks)" if gpu else
                "peak RSS above runtime baseline (MiB, sum over ranks)")
    lines = [
        f"Scale: **{opts.scale}** | {opts.nproc} process(es) per run, EP={opts.ep} | "
        f"{rows[0].get('iterations', '?')} steps | seeds {' '.join(map(str, opts.seeds))} | "
        f"data: GSM8K train ({opts.train_prefix}), validation = trainer split 98,2,0, "
        f"test = GSM8K test ({opts.test_prefix}, {opts.test_samples} samples)", "",
        "Losses: mean ± std [min, max] over seeds.", "",
        f"| model | seeds | final valid loss | best valid loss | GSM8K test loss | params (total) | "
        f"routed-expert params | {mem_head} | peak RSS (MiB, sum over ranks) | tokens/s | "
        f"step time / MoE |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("seeds"):
            lines.append(f"| {r['label']} | 0 | not run / failed | | | | | | | | |")
            continue
        mem = (_mean_std(r["cuda_max_allocated_gib"]) if gpu else
               _mean_std(r["rss_peak_above_baseline_mib"]))
        mem_s = (f"{mem[0]:.2f}" if gpu else f"{mem[0]:.0f} ± {mem[1]:.0f}") if mem[0] else "-"
        rss = _mean_std(r["rss_peak_mib"])
        lines.append(
            f"| {r['label']} | {r['seeds']} | {_fmt_loss(r['final_valid'])} | "
            f"{_fmt_loss(r['best_valid'])} | {_fmt_loss(r['test'])} | "
            f"{_fmt_int(r['params_total'])} | {_fmt_int(r['routed_expert_params_total'])} | {mem_s} | "
            f"{rss[0]:.0f} ± {rss[1]:.0f} | {r['tokens_per_s']:,.0f} | {r['step_time_ratio']:.2f} |")
    lines += ["", "Routing on the GSM8K test samples (mean over layers and seeds):", "",
              "| model | load max/mean | pass-1/pass-2 top-k overlap (random) | distinct chains used "
              "(of tokens; space) | chain perplexity |", "|---|---|---|---|---|"]
    for r in rows:
        rt = r.get("routing") or []
        if not rt:
            continue
        lm = statistics.mean(x["load_max_over_mean"] for x in rt)
        if "overlap" in rt[0]:
            lines.append(
                f"| {r['label']} | {lm:.2f} | {statistics.mean(x['overlap'] for x in rt):.3f} "
                f"({rt[0]['overlap_random']:.3f}) | "
                f"{statistics.mean(x['distinct_chains'] for x in rt):,.0f} (of {rt[0]['tokens']:,}; "
                f"{rt[0]['chain_space']:,}) | "
                f"{statistics.mean(x['chain_perplexity'] for x in rt):,.0f} |")
        else:
            lines.append(
                f"| {r['label']} | {lm:.2f} | - | {statistics.mean(x['distinct_sets'] for x in rt):,.0f} "
                f"top-k sets (of {rt[0]['tokens']:,}; {rt[0]['set_space']:,}) | "
                f"{statistics.mean(x['set_perplexity'] for x in rt):,.0f} |")
    lines += ["", "Ordering checks:", ""] + [f"- {v}" for v in verdict_lines]
    lines += ["", "Plot: `valid_loss.png` (validation loss per model: mean over seeds, band = "
              "min..max)."]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list, runs: list) -> None:
    fields = ["model", "label", "seeds", "iterations", "final_valid_mean", "final_valid_std",
              "final_valid_min", "final_valid_max", "best_valid_mean", "best_valid_std",
              "best_valid_min", "best_valid_max", "test_mean", "test_std", "params_total",
              "routed_expert_params_total", "rss_peak_above_baseline_mib", "rss_peak_mib",
              "cuda_max_allocated_gib", "tokens_per_s", "median_step_time_s", "step_time_ratio"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            if not r.get("seeds"):
                w.writerow({"model": r["model"], "label": r["label"], "seeds": 0})
                continue
            d = {k: r.get(k) for k in ("model", "label", "seeds", "iterations", "params_total",
                                       "routed_expert_params_total", "tokens_per_s",
                                       "median_step_time_s", "step_time_ratio")}
            for key in ("final_valid", "best_valid", "test"):
                m, s = _mean_std(r[key])
                d[f"{key}_mean"], d[f"{key}_std"] = m, s
                if f"{key}_min" in fields:
                    d[f"{key}_min"] = min(r[key]) if r[key] else None
                    d[f"{key}_max"] = max(r[key]) if r[key] else None
            for key in ("rss_peak_above_baseline_mib", "rss_peak_mib", "cuda_max_allocated_gib"):
                d[key] = _mean_std(r[key])[0]
            w.writerow(d)
    run_fields = ["run", "model", "seed", "iterations", "final_valid_loss", "best_valid_loss",
                  "final_train_loss", "test_loss", "params_total", "routed_expert_params_total",
                  "rss_peak_mib", "rss_peak_above_baseline_mib", "cuda_max_allocated_gib",
                  "median_step_time_s", "tokens_per_s", "wall_s", "nproc", "ep"]
    with open(path.with_name("runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=run_fields, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow(r)


def plot(opts, models: dict, runs: list, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        log("matplotlib is not installed: no plots (pip install -r examples/paper/requirements.txt)")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (m, (label, _)) in enumerate(models.items()):
        rs = [r for r in runs if r["model"] == m]
        if not rs:
            continue
        its = sorted(set.intersection(*[{i for i, _ in r["valid_curve"]} for r in rs]))
        vals = [[dict(map(tuple, r["valid_curve"]))[i] for r in rs] for i in its]
        mean = [statistics.mean(v) for v in vals]
        lo, hi = [min(v) for v in vals], [max(v) for v in vals]
        for ax in axes:
            ax.plot(its, mean, marker="o", ms=3, color=f"C{i}", label=f"{label} (n={len(rs)})")
            ax.fill_between(its, lo, hi, color=f"C{i}", alpha=0.18)
    axes[0].set_title("validation loss (GSM8K held-out split)")
    tail_from = None
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.set_ylabel("validation LM loss")
        ax.grid(alpha=0.3)
    if runs:
        last = max(r["iterations"] for r in runs)
        tail_from = last // 2
        axes[1].set_xlim(tail_from, last * 1.02)
        tail_vals = [v for r in runs for i, v in r["valid_curve"] if i >= tail_from]
        if tail_vals:
            pad = 0.05 * (max(tail_vals) - min(tail_vals) + 1e-6)
            axes[1].set_ylim(min(tail_vals) - pad, max(tail_vals) + pad)
    axes[1].set_title(f"zoom: iteration >= {tail_from}")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"CoE vs MoE, {opts.scale} scale: mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=["auto", "cpu", "gpu"], default="auto",
                   help="cpu: small models (configs/cpu); gpu: the paper-size examples/*.yaml; "
                        "auto: gpu when torch sees a CUDA device")
    p.add_argument("--models", nargs="+", help="subset of the models (names as in the docstring)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--out", help="results directory (default examples/paper/results/<scale>)")
    p.add_argument("--work-dir", help="checkpoints, logs, metrics (default runs/paper/<scale>)")
    p.add_argument("--train-iters", type=int)
    p.add_argument("--eval-interval", type=int)
    p.add_argument("--eval-iters", type=int)
    p.add_argument("--save-interval", type=int)
    p.add_argument("--log-interval", type=int, default=25)
    p.add_argument("--nproc", type=int, help="processes per run (CPU default 2 with EP=2)")
    p.add_argument("--ep", type=int, help="expert-parallel size per run")
    p.add_argument("--test-samples", type=int, help="GSM8K test samples for the test loss and "
                   "routing analysis (0: skip the analysis)")
    p.add_argument("--train-data", help="training data prefix (default per scale; preprocessed "
                   "from data/gsm8k if missing)")
    p.add_argument("--test-data", help="held-out data prefix (same tokenizer)")
    p.add_argument("--force", action="store_true", help="rerun runs whose results exist")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("trainer_args", nargs="*", help="extra trainer flags after --, for every run")
    opts = p.parse_args(argv)
    if opts.scale == "auto":
        import torch

        opts.scale = "gpu" if torch.cuda.is_available() else "cpu"
    elif opts.scale == "gpu":
        import torch

        if not torch.cuda.is_available():
            sys.exit("run_benchmark.py: error: --scale gpu trains the paper-size models (hours of "
                     "CPU each) and runs only on a CUDA GPU; this machine has none. "
                     "examples/paper/gpu_plan.py prints their FLOPs, time and memory estimates; "
                     "--scale cpu runs the CPU-scale models")
    cfg = SCALES[opts.scale]
    models = cfg["models"]
    if opts.models:
        unknown = [m for m in opts.models if m not in models]
        if unknown:
            p.error(f"unknown model(s) {unknown} for scale {opts.scale}; choose from {list(models)}")
        models = {m: v for m, v in models.items() if m in opts.models}
    opts.models_cfg = models
    for key in ("train_iters", "eval_interval", "eval_iters", "save_interval", "nproc", "ep",
                "test_samples"):
        if getattr(opts, key) is None:
            setattr(opts, key, cfg[key])
    opts.analysis_mb = cfg["analysis_mb"]
    opts.train_prefix = opts.train_data or cfg["train_prefix"]
    opts.test_prefix = opts.test_data or cfg["test_prefix"]
    opts.out = opts.out or str(HERE / "results" / opts.scale)
    opts.work_dir = opts.work_dir or str(ROOT / "runs" / "paper" / opts.scale)
    opts.torchrun = str(Path(opts.python).with_name("torchrun"))
    return opts, cfg


def split_protocol(argv: list) -> tuple:
    """``--protocol N`` (1: this module's benchmark, the default; 2: ``protocol2.py``; 3:
    ``protocol3.py``) and the remaining arguments."""
    rest, protocol, it = [], "1", iter(argv)
    for a in it:
        if a == "--protocol":
            protocol = next(it, "")
        elif a.startswith("--protocol="):
            protocol = a.split("=", 1)[1]
        else:
            rest.append(a)
    if protocol not in ("1", "2", "3"):
        sys.exit(f"run_benchmark.py: error: --protocol {protocol!r}: choose 1 (the first CPU/GPU "
                 "benchmark, the default), 2 (examples/paper/protocol2.py) or 3 "
                 "(examples/paper/protocol3.py)")
    return int(protocol), rest


def epochs_note(opts, models: dict) -> None:
    """One line: the token budget of a run over the tokens of its training data (the paper-size
    configs train 1000 x 64 x 512 = 32.8 M tokens; GSM8K train is about 1.55 M: > 20 epochs)."""
    import yaml

    meta = Path(opts.train_prefix + ".meta.json")
    if not meta.exists():
        return
    data_tokens = json.loads(meta.read_text()).get("num_tokens")
    cfg = yaml.safe_load(Path(next(iter(models.values()))[1]).read_text())
    iters = opts.train_iters or cfg.get("train_iters")
    if not (data_tokens and iters and cfg.get("global_batch_size") and cfg.get("seq_length")):
        return
    budget = iters * cfg["global_batch_size"] * cfg["seq_length"]
    log(f"token budget {budget / 1e6:.1f} M tokens per run = {budget / data_tokens:.1f} epochs of "
        f"{opts.train_prefix} ({data_tokens / 1e6:.2f} M tokens)"
        + ("; more than a few epochs is a memorisation regime: pass --train-data/--test-data "
           "(e.g. MetaMathQA, as the paper, via tools/preprocess_data.py) or fewer "
           "--train-iters" if budget > 4 * data_tokens else ""))


def main(argv=None) -> int:
    protocol, argv = split_protocol(list(sys.argv[1:] if argv is None else argv))
    if protocol in (2, 3):
        sys.path.insert(0, str(HERE))
        import importlib

        return importlib.import_module(f"protocol{protocol}").main(argv)
    opts, cfg = parse(argv)
    models = opts.models_cfg
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"scale {opts.scale}: {len(models)} models x {len(opts.seeds)} seeds, {opts.nproc} "
        f"process(es)/run, EP={opts.ep}, train iters {opts.train_iters or 'from config'} -> {out}")
    if not (opts.train_data and opts.test_data):
        ensure_data(opts.python, opts.train_prefix, opts.test_prefix, cfg["vocab"])
    epochs_note(opts, models)
    runs, failed = [], []
    t0 = time.time()
    total = len(models) * len(opts.seeds)
    n = 0
    for seed in opts.seeds:  # seed-major: an interrupted benchmark has whole seeds of all models
        for m, (label, config) in models.items():
            n += 1
            log(f"--- run {n}/{total}: {label} seed {seed} (elapsed {time.time() - t0:.0f} s)")
            s = run_one(opts, cfg, m, config, seed)
            (runs.append(s) if s else failed.append(f"{m}_seed{seed}"))
    routing = run_analysis(opts, runs) if runs else {}
    for r in runs:
        r["test_loss"] = routing.get(r["run"], {}).get("lm_loss")
    rows = aggregate(opts, models, runs, routing)
    verdict_lines = verdict(rows)
    text = markdown(opts, rows, verdict_lines)
    if failed:
        text += f"\nFailed runs (see their train.log under {opts.work_dir}): {', '.join(failed)}\n"
    (out / "results.md").write_text(text)
    write_csv(out / "results.csv", rows, runs)
    (out / "results.json").write_text(json.dumps({"rows": rows, "verdict": verdict_lines,
                                                  "failed": failed}, indent=1, default=str))
    plotted = plot(opts, models, runs, out / "valid_loss.png")
    print("\n" + text, flush=True)
    log(f"wrote {out / 'results.md'}, results.csv, runs.csv"
        + (", valid_loss.png" if plotted else "") + f" in {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
