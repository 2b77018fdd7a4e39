#!/usr/bin/env python
"""The single-GPU acceptance check behind ``tools/gpu_smoke.sh`` (see its header for the use).

Three layers, so that everything but the GPU measurements runs (and is tested) on a CPU:

* **judges** (pure functions, ``judge_<row>``): one measurement dict -> one ``Row`` with a
  verdict against a stated criterion. ``rows_from(measurements, quick)`` applies them all; a row
  whose measurement is missing FAILS ("not measured"), so an empty or partial run cannot pass.
* **the table** (``format_table``) and the exit status (``exit_status``): 0 only when every row
  that had to run passed and at least one did; ``NOT RUN`` (rows ``--quick`` leaves out) and
  ``UNTESTED`` (context parallelism: not meaningful on one GPU) never pass anything.
* **measurements** on the GPU: worker subprocesses of this file (``--worker NAME``: the probe,
  the layer comparison, the imported checkpoint, the layer benchmark) and trainer runs
  (``python -m megatron_coe.train``, as ``slurm/pretrain.sbatch`` launches it) on mock data.
  ``--stand-in FILE.json`` replaces them by recorded measurements (tests; replaying a GPU run's
  ``measurements.json``): the table says so.

Rows (``ROWS``): versions and TE import; the paper-shape MLA CoE-2(4/64) layer in bf16, TE spec
with grouped GEMM (``TEGroupedMLP``) vs the local spec (``GroupedSequentialMLP``), same weights
(moved through a checkpoint: the local <-> TE key translation), forward and backward within bf16
tolerance; the float32 routing buffers after ``Float16Module``; the MLA latent-norm eps built;
the trainer in bf16 with grouped GEMM (eval, save) and a bit-exact resume; FP8 (the default
recipe and the other of tensorwise/delayed) with ``--recompute-modules moe`` vs bf16 over the
same steps; a ``tools/convert_from_hf.py`` checkpoint made on the CPU loaded by the TE model;
CoE/MoE layer time ratio and MFU at the paper shape (``tools/bench_coe_layer.py``'s FLOP count
and statistics); context parallelism (untested: one GPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PROG = "gpu_smoke.sh"
PRESET = ROOT / "examples" / "coe2_4_64.yaml"   # the paper shape: CoE-2(4/64), MLA, hidden 1024
REHEARSAL_PRESET = ROOT / "examples" / "tiny" / "coe2_cpu.yaml"   # --cpu-rehearsal's model

# ----------------------------------------------------------------------------- criteria
BUDGET_S = {"full": 480, "quick": 180}           # at most 8 / 3 minutes on one H100
REHEARSAL_BUDGET_S = 1200                        # --cpu-rehearsal on a small shared CPU
MIN_CAPABILITY = (8, 9)                          # FP8 tensor cores (Ada/Hopper)
LAYER_LOGITS_REL_TOL = 2e-2    # ||logits_te - logits_local|| / ||logits_local||, bf16
LAYER_LOSS_REL_TOL = 5e-3      # |loss_te - loss_local| / loss_local
LAYER_GRAD_REL_TOL = 5e-2      # per compared parameter: ||g_te - g_local|| / ||g_local||
MIN_GRADS_COMPARED = 4         # embedding, output layer, a router, an expert at least
FP8_LAST_K = 5                 # FP8 vs bf16: mean loss over the last K steps ...
FP8_LOSS_REL_TOL = 3e-2        # ... within 3% of bf16's
HF_LOGITS_REL_TOL = 3e-2       # TE model (bf16) vs the Hugging Face model (fp32)
EPS_REL_TOL = 1e-6
TRAIN_STEPS = {"full": 30, "quick": 8}
TRAIN_LAYERS = {"full": 2, "quick": 1}   # trainer rows: the paper's layer shape, 2 (1) of its 4

MOCK_VOCAB = 8192
LAYER_NORM_EPS = 1e-5          # --norm-epsilon in the layer rows: differs from the latent eps
LATENT_NORM_EPS = 1e-6         # --mla-latent-norm-epsilon (the paper's)

PASS, FAIL, NOT_RUN, UNTESTED, MEASURED = "PASS", "FAIL", "NOT RUN", "UNTESTED", "MEASURED"
GOOD = (PASS, MEASURED)


@dataclass(frozen=True)
class RowSpec:
    key: str
    title: str
    quick: bool          # run by --quick
    gpu: bool = True     # False: never run on one GPU (UNTESTED)


ROWS = (
    RowSpec("versions", "versions, Transformer Engine import", True),
    RowSpec("layer", "MLA CoE-2(4/64) layer bf16: TE grouped GEMM vs local", True),
    RowSpec("buffers", "routing buffers fp32 after Float16Module", True),
    RowSpec("latent_eps", "MLA latent-norm eps as built (TE)", True),
    RowSpec("trainer", "trainer bf16, grouped GEMM: train, eval, save", True),
    RowSpec("resume", "resume from the step-S checkpoint, bit-exact", True),
    RowSpec("fp8_default", "FP8 default recipe vs bf16, --recompute-modules moe", True),
    RowSpec("fp8_other", "FP8 second recipe vs bf16, --recompute-modules moe", False),
    RowSpec("hf_import", "convert_from_hf.py (CPU) checkpoint -> TE model", False),
    RowSpec("perf", "CoE-2(4/64) / MoE(8/64) layer time, MFU (paper shape)", False),
    RowSpec("context_parallel", "context parallelism", False, gpu=False),
)


@dataclass
class Row:
    check: str
    status: str
    measured: str
    criterion: str


# ----------------------------------------------------------------------------- helpers
def _finite(*values) -> bool:
    try:
        return all(v is not None and math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def rel_close(a: float, b: float, tol: float) -> bool:
    """|a - b| <= tol * |b| (finite values only)."""
    return _finite(a, b) and abs(a - b) <= tol * abs(b)


def _fmt(x, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if _finite(x) else str(x)


def fp8_other_recipe(default: Optional[str]) -> str:
    """The second FP8 recipe: tensorwise, or delayed when tensorwise is the default."""
    return "delayed" if default == "tensorwise" else "tensorwise"


def loss_series(losses) -> list:
    """{iteration: loss} (JSON keys are strings) -> [(iteration, loss)] ascending."""
    return sorted((int(k), float(v)) for k, v in dict(losses or {}).items())


# ----------------------------------------------------------------------------- judges
def judge_versions(m: dict) -> Row:
    crit = (f"CUDA; TE imports; TE inside megatron-core's declared range; compute capability "
            f">= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
    cap = tuple(m.get("capability") or (0, 0))
    measured = (f"{m.get('device')} cc {cap[0]}.{cap[1]}; torch {m.get('torch')}; megatron-core "
                f"{m.get('megatron_core')}; TE {m.get('te_version') or 'none'} (range "
                f"{m.get('te_range') or 'none declared'})")
    problems = []
    if not m.get("cuda"):
        problems.append("no CUDA device")
    if not m.get("megatron_core"):
        problems.append("megatron-core not installed (tools/gpu_prepare.sh)")
    if m.get("te_error"):
        problems.append(f"TE does not import: {m['te_error']}")
    elif not m.get("te_version"):
        problems.append("TE not installed")
    if m.get("te_in_range") is False:
        problems.append("TE outside megatron-core's range")
    if cap < MIN_CAPABILITY:
        problems.append(f"compute capability {cap[0]}.{cap[1]}")
    if problems:
        measured += "; " + "; ".join(problems)
    return Row("", FAIL if problems else PASS, measured, crit)


def judge_layer(m: dict) -> Row:
    crit = (f"TE experts TEGroupedMLP, local GroupedSequentialMLP; logits rel err <= "
            f"{LAYER_LOGITS_REL_TOL:g}, loss rel <= {LAYER_LOSS_REL_TOL:g}, every compared grad "
            f"rel err <= {LAYER_GRAD_REL_TOL:g} (>= {MIN_GRADS_COMPARED} params)")
    grads = dict(m.get("grads_rel") or {})
    worst = max(grads.items(), key=lambda kv: kv[1] if _finite(kv[1]) else math.inf,
                default=(None, math.nan))
    measured = (f"experts {m.get('te_experts')} vs {m.get('local_experts')}; logits rel "
                f"{_fmt(m.get('logits_rel'))}; loss {_fmt(m.get('loss_te'), 6)} vs "
                f"{_fmt(m.get('loss_local'), 6)}; {len(grads)} grads, worst "
                f"{_fmt(worst[1])} ({worst[0]})")
    ok = (m.get("te_experts") == "TEGroupedMLP" and m.get("local_experts") == "GroupedSequentialMLP"
          and _finite(m.get("logits_rel")) and m["logits_rel"] <= LAYER_LOGITS_REL_TOL
          and rel_close(m.get("loss_te"), m.get("loss_local"), LAYER_LOSS_REL_TOL)
          and len(grads) >= MIN_GRADS_COMPARED
          and all(_finite(v) and v <= LAYER_GRAD_REL_TOL for v in grads.values()))
    return Row("", PASS if ok else FAIL, measured, crit)


def judge_buffers(m: dict) -> Row:
    crit = ("every tokens_per_expert_per_pass (and router count/bias) buffer float32; counts "
            "after n forwards == n x tokens x top-k per pass, exactly")
    dtypes = dict(m.get("dtypes") or {})
    counted = [n for n in dtypes if n.endswith("tokens_per_expert_per_pass")]
    wrong = sorted(n for n, d in dtypes.items() if d != "torch.float32")
    measured = (f"{len(dtypes)} buffers ({len(counted)} tokens_per_expert_per_pass), not fp32: "
                f"{', '.join(wrong) or 'none'}; count sum {m.get('count_sum')} vs expected "
                f"{m.get('expected_sum')}")
    ok = (bool(counted) and not wrong and m.get("expected_sum") is not None
          and m.get("count_sum") == m.get("expected_sum"))
    return Row("", PASS if ok else FAIL, measured, crit)


def judge_latent_eps(m: dict) -> Row:
    want_latent = m.get("want_latent", LATENT_NORM_EPS)
    want_norm = m.get("want_norm", LAYER_NORM_EPS)
    crit = (f"latent norms eps == --mla-latent-norm-epsilon {want_latent:g}, other norms "
            f"== --norm-epsilon {want_norm:g}")
    latent, other = dict(m.get("latent") or {}), dict(m.get("other") or {})
    bad = sorted(n for n, e in latent.items() if not rel_close(e, want_latent, EPS_REL_TOL))
    bad += sorted(n for n, e in other.items() if not rel_close(e, want_norm, EPS_REL_TOL))
    measured = (f"latent {sorted(set(map(float, latent.values())))} ({len(latent)} norms), other "
                f"{sorted(set(map(float, other.values())))} ({len(other)})"
                + (f"; wrong: {', '.join(bad[:3])}" if bad else ""))
    ok = bool(latent) and bool(other) and not bad
    return Row("", PASS if ok else FAIL, measured, crit)


def judge_trainer(m: dict) -> Row:
    steps = int(m.get("steps") or 0)
    crit = (f"exit 0; start-up line: transformer-impl transformer_engine, experts TEGroupedMLP; "
            f"losses of steps 1..{steps or 'N'} finite, falling; validation loss finite; "
            f"checkpoints at S and N published")
    series = loss_series(m.get("losses"))
    losses = [v for _, v in series]
    measured = (f"exit {m.get('rc')}; {m.get('impl')} / {m.get('experts')}; {len(series)} steps, "
                f"loss {_fmt(losses[0] if losses else None, 4)} -> "
                f"{_fmt(losses[-1] if losses else None, 4)}; valid {_fmt(m.get('valid_loss'), 4)}"
                f"; saved {m.get('saved')}")
    if m.get("error"):
        measured += f"; {m['error']}"
    ok = (m.get("rc") == 0 and m.get("impl") == "transformer_engine"
          and m.get("experts") == "TEGroupedMLP" and steps > 0
          and [i for i, _ in series] == list(range(1, steps + 1)) and _finite(*losses)
          and losses[-1] < losses[0] and _finite(m.get("valid_loss"))
          and set(m.get("saved") or ()) >= {int(m.get("save_step") or -1), steps})
    return Row("", PASS if ok else FAIL, measured, crit)


def judge_resume(m: dict, reference: dict) -> Row:
    s, steps = int(m.get("save_step") or 0), int(reference.get("steps") or 0)
    crit = f"exit 0; losses of steps S+1..N identical (bit for bit) to the uninterrupted run"
    ref = dict(loss_series(reference.get("losses")))
    got = dict(loss_series(m.get("losses")))
    want = list(range(s + 1, steps + 1))
    same = [i for i in want if i in got and i in ref and got[i] == ref[i]]
    diffs = [abs(got[i] - ref[i]) for i in want if i in got and i in ref]
    measured = (f"exit {m.get('rc')}; resumed at {s}; {len(same)}/{len(want)} steps identical"
                + (f", max |diff| {_fmt(max(diffs))}" if diffs and len(same) < len(want) else ""))
    if m.get("error"):
        measured += f"; {m['error']}"
    ok = m.get("rc") == 0 and s > 0 and bool(want) and len(same) == len(want) \
        and sorted(got) == want
    return Row("", PASS if ok else FAIL, measured, crit)


def judge_fp8(m: dict, reference: dict) -> Row:
    recipe = m.get("recipe", "?")
    crit = (f"exit 0, every step finite; mean loss of the last {FP8_LAST_K} steps within "
            f"{FP8_LOSS_REL_TOL:.0%} of bf16's (same data, CoE C=2 passes)")
    got, ref = loss_series(m.get("losses")), loss_series(reference.get("losses"))
    k = FP8_LAST_K
    measured = f"recipe {recipe}; exit {m.get('rc')}; {len(got)} steps"
    ok = m.get("rc") == 0 and len(got) >= k and [i for i, _ in got] == [i for i, _ in ref] \
        and _finite(*(v for _, v in got))
    if ok:
        a = sum(v for _, v in got[-k:]) / k
        b = sum(v for _, v in ref[-k:]) / k
        measured += f"; last-{k} mean {a:.4f} vs bf16 {b:.4f} ({(a - b) / b:+.2%})"
        ok = rel_close(a, b, FP8_LOSS_REL_TOL)
    if m.get("error"):
        measured += f"; {m['error']}"
    return Row("", PASS if ok else FAIL, measured, crit)


def judge_hf_import(m: dict) -> Row:
    crit = (f"convert exit 0 (CPU); loads into the TE model (experts TEGroupedMLP); logits rel "
            f"err vs the HF model <= {HF_LOGITS_REL_TOL:g}")
    measured = (f"convert exit {m.get('convert_rc')}; experts {m.get('te_experts')}; logits rel "
                f"{_fmt(m.get('logits_rel'))}")
    if m.get("error"):
        measured += f"; {m['error']}"
    ok = (m.get("convert_rc") == 0 and m.get("te_experts") == "TEGroupedMLP"
          and _finite(m.get("logits_rel")) and m["logits_rel"] <= HF_LOGITS_REL_TOL)
    return Row("", PASS if ok else FAIL, measured, crit)


def judge_perf(m: dict) -> Row:
    target = m.get("target", 1.05)
    crit = (f"measured (finite, > 0); reported against the CoE/MoE target <= {target} and the "
            f"bf16 peak; not a pass/fail criterion")
    ratio, mfu = m.get("ratio"), m.get("mfu")
    ok = _finite(ratio, m.get("coe_ms"), m.get("moe_ms")) and ratio > 0
    measured = (f"CoE {_fmt(m.get('coe_ms'))} ms, MoE {_fmt(m.get('moe_ms'))} ms, ratio "
                f"{_fmt(ratio)} ({'within' if ok and ratio <= target else 'ABOVE'} target; FLOP "
                f"ratio {_fmt(m.get('flop_ratio'))}); CoE {_fmt(m.get('coe_tflops'))} TFLOP/s, "
                f"MFU {(f'{mfu:.1%}' if _finite(mfu) else 'n/a (unknown peak)')}")
    return Row("", MEASURED if ok else FAIL, measured, crit)


def judge_context_parallel(m: dict) -> Row:
    return Row("", UNTESTED, m.get("why") or "--context-parallel-size (Transformer Engine "
               "attention only) needs >= 2 GPUs to mean anything; never run on a GPU",
               "none on one GPU")


def rows_from(measurements: dict, quick: bool) -> list:
    """Every row of ``ROWS``, judged from ``measurements`` ({row key: measurement dict})."""
    out = []
    errors = dict(measurements.get("_errors") or {})
    fp8_default = (measurements.get("versions") or {}).get("fp8_default_recipe")
    for spec in ROWS:
        title = spec.title
        if spec.key == "fp8_default" and fp8_default:
            title = f"FP8 default recipe ({fp8_default}) vs bf16, --recompute-modules moe"
        if spec.key == "fp8_other":
            title = (f"FP8 {fp8_other_recipe(fp8_default)} vs bf16, --recompute-modules moe")
        if not spec.gpu:
            row = judge_context_parallel(measurements.get(spec.key) or {})
        elif quick and not spec.quick:
            row = Row("", NOT_RUN, "left out by --quick", "")
        elif spec.key not in measurements:
            why = errors.get(spec.key) or "no measurement"
            row = Row("", FAIL, f"not measured: {why}", "")
        else:
            m = measurements[spec.key]
            ref = measurements.get("trainer") or {}
            if spec.key in ("resume", "fp8_default", "fp8_other"):
                row = {"resume": judge_resume, "fp8_default": judge_fp8,
                       "fp8_other": judge_fp8}[spec.key](m, ref)
            else:
                row = JUDGES[spec.key](m)
        row.check = title
        out.append(row)
    return out


JUDGES = {"versions": judge_versions, "layer": judge_layer, "buffers": judge_buffers,
          "latent_eps": judge_latent_eps, "trainer": judge_trainer, "hf_import": judge_hf_import,
          "perf": judge_perf}


def exit_status(rows: list) -> int:
    """0: no row failed and at least one passed; 1 otherwise (nothing passes vacuously)."""
    if any(r.status == FAIL for r in rows) or not any(r.status in GOOD for r in rows):
        return 1
    return 0


def _cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def format_table(rows: list, title: str) -> str:
    """One Markdown table (pasteable into the README) and a verdict line."""
    lines = [title, "", "| check | status | measured | criterion |", "|---|---|---|---|"]
    lines += [f"| {_cell(r.check)} | {r.status} | {_cell(r.measured)} | {_cell(r.criterion)} |"
              for r in rows]
    counts = {s: sum(r.status == s for r in rows) for s in (PASS, MEASURED, FAIL, NOT_RUN,
                                                            UNTESTED)}
    failed = [r.check for r in rows if r.status == FAIL]
    summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    verdict = "PASS" if exit_status(rows) == 0 else "FAIL"
    lines += ["", f"{verdict}: {summary}" + (f" (failed: {'; '.join(failed)})" if failed else "")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- trainer runs
_STARTUP = re.compile(r"start-up: transformer-impl (\S+) \| experts (\S+) \|")
_ERROR_LINE = re.compile(r"^(coe-train: .*|\w*Error: .*)$", re.M)


def read_metrics(path: Path) -> dict:
    """{"losses": {iteration: lm loss}, "valid_loss": last validation loss} of a metrics.jsonl."""
    losses, valid = {}, None
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("type") == "train":
                losses[int(rec["iteration"])] = float(rec["lm_loss"])
            elif rec.get("type") == "valid":
                valid = float(rec["lm_loss"])
    return dict(losses=losses, valid_loss=valid)


def parse_trainer_log(text: str) -> dict:
    """The start-up line's implementation and experts class, and the run's error line."""
    out = {}
    if m := _STARTUP.search(text):
        out.update(impl=m.group(1), experts=m.group(2))
    errors = _ERROR_LINE.findall(text)
    if errors:
        out["error"] = errors[-1][:300]
    return out


def published_iterations(ckpt: Path) -> list:
    return sorted(int(p.name[5:]) for p in ckpt.glob("iter_???????")
                  if (p / "coe_checkpoint.json").is_file())


def paper_config(workdir: Path, preset: Path = PRESET) -> Path:
    """The preset's model, router and optimizer settings (default: the paper's), without its
    data, checkpoint, batch and logging settings (the runs here set their own)."""
    import yaml

    drop = {"data_path", "split", "tensorboard_dir", "save", "load", "save_interval",
            "eval_interval", "eval_iters", "log_interval", "train_iters", "micro_batch_size",
            "global_batch_size", "num_workers", "exit_signal_handler"}
    values = {k: v for k, v in (yaml.safe_load(Path(preset).read_text()) or {}).items()
              if k not in drop}
    path = workdir / "paper_shape.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


GPU_PRECISION = ("--bf16", "--moe-router-dtype", "fp32")


def trainer_argv(cfg: Path, run_dir: Path, steps: int, extra=(), *, layers: int = 2,
                 vocab: int = MOCK_VOCAB, precision=GPU_PRECISION) -> list:
    """The trainer's command line of one run: ``cfg`` (``paper_config``), mock data, 2 micro-
    batches of 4 per step, a metrics line per step, then ``extra`` (last word wins)."""
    return ["--config", str(cfg), "--num-layers", str(layers), "--mock-data", "--vocab-size",
            str(vocab), "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters",
            str(steps), "--log-interval", "1", "--num-workers", "0", *precision,
            "--eval-iters", "0", "--metrics-file", str(run_dir / "metrics.jsonl"),
            *map(str, extra)]


def trainer_rows(ctx: "Context", cfg: Path, steps: int, **argv_kw) -> tuple[dict, dict]:
    """The trainer and resume measurements: ``steps`` steps with validation and a checkpoint at
    ``steps // 2`` (and the end), then a second run resumed from the half-way checkpoint."""
    s = steps // 2
    ref_dir = ctx.workdir / "bf16"
    ref_ckpt = ref_dir / "ckpt"
    evals = ["--eval-interval", s, "--eval-iters", 2]
    ref = train("bf16", trainer_argv(cfg, ref_dir, steps, ["--save", ref_ckpt, "--save-interval",
                                                           s, *evals], **argv_kw), ctx, steps, s)
    ref["saved"] = published_iterations(ref_ckpt)
    res_dir = ctx.workdir / "resume"
    # same evaluation as the reference; no --save (nothing to publish)
    resumed = train("resume", trainer_argv(cfg, res_dir, steps, [
        "--load", ref_ckpt / f"iter_{s:07d}", *evals], **argv_kw), ctx, steps, s)
    return ref, resumed


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
               # deterministic kernels, so that the resumed run can equal the first bit for bit
               NVTE_ALLOW_NONDETERMINISTIC_ALGO="0", CUBLAS_WORKSPACE_CONFIG=":4096:8")
    env.update(extra)
    return env


def run_logged(cmd: list, log: Path, timeout: float, env: dict) -> tuple[int, str]:
    """Run ``cmd`` with its output in ``log``; (exit status, output). 124: timed out."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    text = log.read_text(errors="replace")
    return rc, text


def train(name: str, argv: list, ctx: "Context", steps: int, save_step: int = 0) -> dict:
    run_dir = ctx.workdir / name
    rc, text = run_logged([ctx.python, "-m", "megatron_coe.train", *argv],
                          run_dir / "train.log", ctx.remaining(), child_env())
    m = dict(rc=rc, steps=steps, save_step=save_step, **read_metrics(run_dir / "metrics.jsonl"),
             **parse_trainer_log(text))
    if rc == 124:
        m["error"] = f"timed out (budget); log {run_dir / 'train.log'}"
    elif rc and "error" not in m:
        m["error"] = f"exit {rc}; log {run_dir / 'train.log'}: {last_line(text)}"
    return m


def last_line(text: str) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else "(no output)"


# ----------------------------------------------------------------------------- orchestration
@dataclass
class Context:
    workdir: Path
    quick: bool
    python: str
    deadline: float
    peak_tflops: Optional[float] = None
    rehearsal: bool = False      # --cpu-rehearsal: every row on the CPU, local spec, tiny preset

    # what the rows build: the acceptance's, or the rehearsal's
    @property
    def impl(self) -> str:
        return "local" if self.rehearsal else "transformer_engine"

    @property
    def preset(self) -> Path:
        return REHEARSAL_PRESET if self.rehearsal else PRESET

    @property
    def vocab(self) -> int:
        return 256 if self.rehearsal else MOCK_VOCAB

    @property
    def bf16(self) -> bool:
        return not self.rehearsal

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


def run_worker(name: str, ctx: Context, env: Optional[dict] = None) -> dict:
    """``--worker name`` in a subprocess; its measurements, or {"_error": one line}."""
    result = ctx.workdir / f"{name}.json"
    result.unlink(missing_ok=True)
    cmd = [ctx.python, str(Path(__file__).resolve()), "--worker", name, "--result", str(result),
           "--out", str(ctx.workdir)] + (["--quick"] if ctx.quick else []) \
        + (["--peak-tflops", str(ctx.peak_tflops)] if ctx.peak_tflops else []) \
        + (["--cpu-rehearsal"] if ctx.rehearsal else [])
    rc, text = run_logged(cmd, ctx.workdir / f"{name}.log", ctx.remaining(), env or child_env())
    if result.is_file():
        return json.loads(result.read_text())
    why = "timed out (budget)" if rc == 124 else f"exit {rc}: {last_line(text)}"
    return {"_error": f"worker {name} {why}; log {ctx.workdir / (name + '.log')}"}


def collect(ctx: Context) -> dict:
    """Every GPU measurement, in the order of ``ROWS`` (the cheap and decisive ones first)."""
    m: dict = {"_errors": {}}

    def merge(result: dict, keys: tuple) -> None:
        for k in keys:
            if k in result:
                m[k] = result[k]
            else:
                m["_errors"][k] = result.get(f"_error_{k}") or result.get("_error") or \
                    "no measurement"

    merge(run_worker("probe", ctx), ("versions",))
    if not (m.get("versions") or {}).get("cuda") and not ctx.rehearsal:
        return m
    merge(run_worker("model", ctx), ("layer", "buffers", "latent_eps"))

    cfg = paper_config(ctx.workdir, ctx.preset)
    mode = "quick" if ctx.quick else "full"
    steps, layers = TRAIN_STEPS[mode], TRAIN_LAYERS[mode]
    argv_kw = dict(layers=layers, vocab=ctx.vocab,
                   precision=GPU_PRECISION if ctx.bf16 else ("--moe-router-dtype", "fp32"))
    m["trainer"], m["resume"] = trainer_rows(ctx, cfg, steps, **argv_kw)

    default = (m.get("versions") or {}).get("fp8_default_recipe")
    recipes = [("fp8_default", [])]
    if not ctx.quick:
        recipes.append(("fp8_other", ["--fp8-recipe", fp8_other_recipe(default)]))
    for key, extra in recipes:
        run_dir = ctx.workdir / key
        got = train(key, trainer_argv(cfg, run_dir, steps, [
            "--fp8-format", "hybrid", *extra, "--recompute-modules", "moe"], **argv_kw),
            ctx, steps)
        got["recipe"] = extra[1] if extra else (default or "default")
        m[key] = got
    if ctx.quick:
        return m

    # A Hugging Face model made and converted on the CPU, loaded by the TE model on the GPU.
    cpu = child_env(CUDA_VISIBLE_DEVICES="")
    made = run_worker("hf_make", ctx, env=cpu)
    if "_error" in made:
        m["_errors"]["hf_import"] = made["_error"]
    else:
        rc, text = run_logged([ctx.python, "tools/convert_from_hf.py", "--load",
                               str(ctx.workdir / "hf"), "--save", str(ctx.workdir / "hf_ckpt")],
                              ctx.workdir / "convert.log", ctx.remaining(), cpu)
        if rc:
            m["hf_import"] = dict(convert_rc=rc, error=last_line(text))
        else:
            merge(run_worker("hf_load", ctx), ("hf_import",))
            if "hf_import" in m:
                m["hf_import"]["convert_rc"] = rc
    merge(run_worker("perf", ctx), ("perf",))
    return m


# ----------------------------------------------------------------------------- GPU workers
def _init_single_rank(args):
    """torch.distributed (one rank, NCCL) and Megatron's groups, as the trainer makes them."""
    import torch

    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.training import setup

    install_cpu_compat()  # as the trainer does first: Megatron fixes; CPU stand-ins without CUDA
    if not torch.distributed.is_initialized():
        setup.init_distributed(args)
    return initialize_parallel(seed=args.seed,
                               distributed_timeout_minutes=args.distributed_timeout_minutes)


def _paper_args(workdir: Path, *extra, preset: Path = PRESET, vocab: int = MOCK_VOCAB,
                bf16: bool = True):
    """One layer of ``preset`` (default: the paper's) as the trainer parses it; the norm eps and
    the latent-norm eps set apart so that the eps row can tell them from each other."""
    from megatron_coe.training.options import parse_args

    cfg = paper_config(workdir, preset)
    return parse_args(["--config", str(cfg), "--num-layers", "1", "--mock-data", "--vocab-size",
                       str(vocab), "--micro-batch-size", "2", "--train-iters", "1",
                       *(["--bf16"] if bf16 else []), "--moe-router-dtype", "fp32",
                       "--norm-epsilon", str(LAYER_NORM_EPS), "--mla-latent-norm-epsilon",
                       str(LATENT_NORM_EPS), *map(str, extra)])


def _experts_class(model) -> Optional[str]:
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            return type(module).__name__
    return None


def eps_of(module) -> Optional[float]:
    for attr in ("eps", "epsilon", "variance_epsilon", "_eps"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


LATENT_NORM_NAMES = ("kv_layernorm", "q_layernorm", "linear_kv_up_proj", "linear_q_up_proj")


def norm_eps(model) -> dict:
    """{"latent": {module: eps}, "other": {module: eps}} of every module that has an eps: the MLA
    latent norms (local: ``kv_layernorm``/``q_layernorm``; TE: fused into
    ``linear_kv_up_proj``/``linear_q_up_proj``) and every other norm."""
    latent, other = {}, {}
    for name, module in model.named_modules():
        eps = eps_of(module)
        if eps is None:
            continue
        # a norm module nested in a fused linear belongs to it
        if any(part in LATENT_NORM_NAMES for part in name.split(".")):
            latent[name] = eps
        else:
            other[name] = eps
    return dict(latent=latent, other=other)


def grads_by_name(model) -> dict:
    """{canonical parameter name: fp32 gradient} (DDP keeps them in ``main_grad``); routed
    experts under ``local_experts.{i}.linear_fcN.weight`` for both specs."""
    from megatron_coe.training.setup import unwrap

    out = {}
    for name, p in unwrap(model).named_parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        if g is None:
            continue
        m = re.match(r"^(.*\.experts)\.(linear_fc[12])\.weight(\d+)$", name)
        if m:  # TEGroupedMLP -> SequentialMLP spelling
            name = f"{m.group(1)}.local_experts.{m.group(3)}.{m.group(2)}.weight"
        out[name] = g.detach().float().clone()
    return out


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def worker_probe(ctx: Context) -> dict:
    import torch

    from importlib import metadata

    v = dict(torch=torch.__version__, cuda=torch.cuda.is_available(), device=None,
             capability=None)
    if v["cuda"]:
        v.update(device=torch.cuda.get_device_name(0),
                 capability=list(torch.cuda.get_device_capability(0)))
    try:
        v["megatron_core"] = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        v["megatron_core"] = None
    try:
        import transformer_engine.pytorch  # noqa: F401

        v["te_error"] = None
    except Exception as e:  # noqa: BLE001 - the text is the finding
        v["te_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
    for dist in ("transformer-engine", "transformer_engine", "transformer-engine-torch"):
        try:
            v["te_version"] = metadata.version(dist)
            break
        except metadata.PackageNotFoundError:
            v["te_version"] = None
    v["te_range"], v["te_in_range"] = None, None
    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
        from packaging.utils import canonicalize_name

        spec = SpecifierSet()
        for line in metadata.requires("megatron-core") or []:
            req = Requirement(line)
            if canonicalize_name(req.name) == "transformer-engine":
                spec &= req.specifier
        v["te_range"] = str(spec) or None
        if v["te_version"]:
            v["te_in_range"] = spec.contains(v["te_version"].split("+")[0], prereleases=True)
    except Exception:  # noqa: BLE001 - no megatron-core: its own row says so
        pass
    try:
        from megatron_coe.training.options import OPTIONS

        v["fp8_default_recipe"] = OPTIONS["fp8_recipe"].default
    except Exception as e:  # noqa: BLE001
        v["fp8_default_recipe"] = None
        v["options_error"] = f"{type(e).__name__}: {e}"[:300]
    return {"versions": v}


def one_line(e: BaseException) -> str:
    """An exception as the one line a row shows (the traceback goes to the worker's log)."""
    import traceback

    traceback.print_exc()
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def group_experts(grads: dict) -> dict:
    """Routed experts' gradients of one layer and linear concatenated into one entry
    (``...local_experts.*.linear_fc1.weight``): a routing decision that flips between the two
    implementations moves a few tokens between experts, which the whole set absorbs."""
    import torch

    out, groups = {}, {}
    for name, g in grads.items():
        m = re.match(r"^(.*\.local_experts)\.(\d+)\.(.*)$", name)
        if m:
            groups.setdefault(f"{m.group(1)}.*.{m.group(3)}", []).append((int(m.group(2)), g))
        else:
            out[name] = g
    for name, items in groups.items():
        out[name] = torch.cat([g.reshape(-1) for _, g in sorted(items, key=lambda x: x[0])])
    return out


def worker_model(ctx: Context) -> dict:
    return measure_model(ctx, impl=ctx.impl, preset=ctx.preset, vocab=ctx.vocab, bf16=ctx.bf16)


def measure_model(ctx: Context, impl: str = "transformer_engine", preset: Path = PRESET,
                  vocab: int = MOCK_VOCAB, bf16: bool = True) -> dict:
    """The layer, buffer and eps rows: the paper-shape one-layer model built by the trainer's own
    code (``Float16Module``, DDP) with the TE spec (``impl``) and with the local spec, the local
    weights moved into the TE model through a checkpoint (the local -> TE key translation at
    load), then the same batch forward and backward through both. The CPU test runs the same
    code with ``impl="local"``, a tiny preset and fp32."""
    import torch
    import torch.nn.functional as F

    from megatron_coe.arch import ModelArch
    from megatron_coe.conversion.importer import save_model_checkpoint
    from megatron_coe.parallel import destroy_parallel
    from megatron_coe.training import checkpoint, setup
    from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer

    out: dict = {}
    try:
        kw = dict(preset=preset, vocab=vocab, bf16=bf16)
        args_te = _paper_args(ctx.workdir, "--transformer-impl", impl, **kw)
        args_local = _paper_args(ctx.workdir, "--transformer-impl", "local", **kw)
        setup.check_runtime(args_te)  # a TE that does not import is refused here, in one line
        padded = setup.padded_vocab_size(vocab, args_te)
        pg = _init_single_rank(args_te)
        te = setup.build_model(args_te, setup.build_model_config(args_te), padded, pg)[0]
    except Exception as e:  # noqa: BLE001 - every row of this worker reports it
        return {"_error": one_line(e)}

    s, b = args_te.seq_length, args_te.micro_batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (b, s), generator=gen).to(device)
    labels = torch.roll(tokens, -1, dims=1)
    pos = torch.arange(s, device=device)[None].expand(b, -1)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), diagonal=1)

    try:
        out["latent_eps"] = dict(norm_eps(setup.unwrap(te)), want_latent=LATENT_NORM_EPS,
                                 want_norm=LAYER_NORM_EPS)
    except Exception as e:  # noqa: BLE001
        out["_error_latent_eps"] = one_line(e)

    layers = [mod for mod in setup.unwrap(te).modules() if isinstance(mod, ChainOfExpertsLayer)]
    try:
        # counts start from zero: read them after n forwards of one batch (counted with autograd
        # on, once per step as in training; the graphs are dropped)
        n_fwd = 8
        te.train()
        for _ in range(n_fwd):
            te(tokens, pos, mask)
        names = getattr(ChainOfExpertsLayer, "FLOAT32_BUFFERS", ("tokens_per_expert_per_pass",))
        dtypes = {n: str(t.dtype) for n, t in te.named_buffers() if n.split(".")[-1] in names}
        counts = [lay.tokens_per_expert_per_pass for lay in layers]
        out["buffers"] = dict(
            dtypes=dtypes,
            count_sum=sum(float(c.double().sum()) for c in counts) if counts else None,
            expected_sum=float(n_fwd * b * s * args_te.moe_router_topk
                               * args_te.coe_iterations * len(layers)))
    except Exception as e:  # noqa: BLE001
        out["_error_buffers"] = one_line(e)
    for lay in layers:  # the comparison below starts from zero counts, as the local model does
        lay.tokens_per_expert_per_pass.zero_()

    def fwd_bwd(model):
        model.train()
        model.zero_grad_buffer()
        logits = model(tokens, pos, mask)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        return logits.detach().float(), float(loss)

    try:
        destroy_parallel()
        pg = _init_single_rank(args_local)
        local = setup.build_model(args_local, setup.build_model_config(args_local), padded,
                                  pg)[0]
        layout = dict(world_size=1, tp=1, pp=1, ep=1, dp=1, num_microbatches=None)
        path = save_model_checkpoint(setup.unwrap(local), ModelArch.from_args(args_local, padded),
                                     str(ctx.workdir / "layer_ckpt"), layout, {})
        checkpoint.load_checkpoint(path, [te], None, None, args_te, None)
        logits_l, loss_l = fwd_bwd(local)
        logits_t, loss_t = fwd_bwd(te)
        g_l, g_t = group_experts(grads_by_name(local)), group_experts(grads_by_name(te))
        common = [n for n in g_t if n in g_l and g_t[n].shape == g_l[n].shape]
        out["layer"] = dict(te_experts=_experts_class(setup.unwrap(te)),
                            local_experts=_experts_class(setup.unwrap(local)),
                            loss_te=loss_t, loss_local=loss_l,
                            logits_rel=_rel(logits_t, logits_l),
                            grads_rel={n: _rel(g_t[n], g_l[n]) for n in common},
                            not_compared=sorted(set(g_t) ^ set(g_l)))
    except Exception as e:  # noqa: BLE001
        out["_error_layer"] = one_line(e)
    return out


def hf_model_kwargs() -> dict:
    """A DeepSeek-V2 (MLA, shared expert, one dense first layer) small enough for the CPU."""
    return dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False,
                kv_lora_rank=64, q_lora_rank=None, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=32, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=128, n_shared_experts=1, first_k_dense_replace=1,
                topk_method="greedy", routed_scaling_factor=1.0)


def worker_hf_make(ctx: Context) -> dict:
    """CPU: a random DeepSeek-V2 model saved by transformers, and its fp32 logits."""
    import torch
    import transformers

    config = transformers.DeepseekV2Config(**hf_model_kwargs())
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(config).eval()
    model.save_pretrained(str(ctx.workdir / "hf"))
    tokens = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(tokens).logits.float()
    torch.save(dict(tokens=tokens, logits=logits), ctx.workdir / "hf_logits.pt")
    return {"hf_made": True}


def hf_load(ctx: Context, impl: str = "transformer_engine", bf16: bool = True) -> dict:
    """The converted checkpoint (``hf_ckpt``) built and loaded as the trainer does
    (``--use-checkpoint-args``), its logits against the Hugging Face model's (``hf_logits.pt``).
    The GPU row: TE spec in bf16; the CPU test runs the same code with the local spec in fp32."""
    import torch

    from megatron_coe.training import checkpoint, setup
    from megatron_coe.training.options import parse_args

    ckpt = ctx.workdir / "hf_ckpt"
    ref = torch.load(ctx.workdir / "hf_logits.pt")
    vocab = ref["logits"].shape[-1]
    args = parse_args(["--use-checkpoint-args", "--load", str(ckpt), "--micro-batch-size", "1",
                       "--train-iters", "1", "--lr", "1e-4", "--moe-router-dtype", "fp32",
                       "--transformer-impl", impl, "--mock-data", "--vocab-size", str(vocab)]
                      + (["--bf16"] if bf16 else []))
    setup.check_runtime(args)
    pg = _init_single_rank(args)
    model = setup.build_model(args, setup.build_model_config(args),
                              setup.padded_vocab_size(vocab, args), pg)[0]
    checkpoint.load_checkpoint(checkpoint.find_checkpoint(str(ckpt)), [model], None, None, args,
                               None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = ref["tokens"].to(device)
    s = tokens.shape[1]
    pos = torch.arange(s, device=device)[None].expand(tokens.shape[0], -1)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), diagonal=1)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, pos, mask).float().cpu()[..., :vocab]
    return dict(te_experts=_experts_class(setup.unwrap(model)),
                logits_rel=_rel(logits, ref["logits"]))


def worker_hf_load(ctx: Context) -> dict:
    return {"hf_import": hf_load(ctx, impl=ctx.impl, bf16=ctx.bf16)}


def _bench_module():
    """tools/bench_coe_layer.py (its FLOP count, statistics and target), imported without its
    process-wide TORCHDYNAMO_DISABLE default leaking into this GPU process."""
    import importlib.util

    before = os.environ.get("TORCHDYNAMO_DISABLE")
    spec = importlib.util.spec_from_file_location("bench_coe_layer",
                                                  ROOT / "tools" / "bench_coe_layer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if before is None:
        os.environ.pop("TORCHDYNAMO_DISABLE", None)
    return module


def worker_perf(ctx: Context) -> dict:
    if ctx.rehearsal:
        return {"perf": measure_perf(ctx, impl=ctx.impl, preset=ctx.preset, bf16=False, seq=64,
                                     mbs=2, warmup=1, iters=3)}
    return {"perf": measure_perf(ctx)}


def measure_perf(ctx: Context, impl: str = "transformer_engine", preset: Path = PRESET,
                 bf16: bool = True, seq: int = 512, mbs: int = 8, warmup: int = 5,
                 iters: int = 20) -> dict:
    """CoE-2(4/64) vs MoE(8/64) ``layer.mlp`` fwd+bwd on the TE spec in bf16, interleaved, CUDA
    synchronised; the shared expert matched (MoE's twice as wide: equal FLOPs), as the bench.
    (The CPU test runs it with the local spec on a tiny preset.)"""
    import torch
    from megatron.core.transformer.spec_utils import build_module

    from megatron_coe.models.specs import get_coe_layer_spec
    from megatron_coe.parallel import destroy_parallel
    from megatron_coe.training import metrics, setup

    from megatron_coe.compat import install_cpu_compat

    install_cpu_compat()  # as the trainer's build_model does (the CUDA machine's no-ops)
    bench = _bench_module()
    kw = dict(preset=preset, bf16=bf16)
    base = _paper_args(ctx.workdir, "--transformer-impl", impl, **kw)
    shared = base.moe_shared_expert_intermediate_size or 0
    variants = {
        "coe": [],
        "moe": ["--coe-iterations", "1", "--moe-router-topk", str(2 * base.moe_router_topk),
                "--no-coe-inner-residual", "--coe-outer-residual",
                "--moe-shared-expert-intermediate-size", str(2 * shared)],
    }
    tokens = seq * mbs
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    steps, configs, experts = {}, {}, {}
    for key, extra in variants.items():
        args = _paper_args(ctx.workdir, "--transformer-impl", impl, *extra, **kw)
        pg = _init_single_rank(args)
        config = setup.build_model_config(args)
        layer = build_module(get_coe_layer_spec(config, use_transformer_engine=impl != "local"),
                             config=config, layer_number=1, pg_collection=pg).to(device)
        layer.train()
        gen = torch.Generator(device=device).manual_seed(11)
        x = torch.randn(seq, mbs, config.hidden_size, device=device, generator=gen,
                        dtype=config.params_dtype)
        with torch.no_grad():
            x = layer.pre_mlp_layernorm(x)
        x = x.detach().requires_grad_(True)
        grad = torch.randn_like(x) * 1e-2
        params = [p for p in layer.parameters() if p.requires_grad]

        def step(layer=layer, x=x, grad=grad, params=params):
            for p in params:
                p.grad = None
            out, _ = layer.mlp(x)
            torch.autograd.backward(out, grad)

        steps[key], configs[key] = step, config
        experts[key] = type(layer.mlp.experts).__name__
        destroy_parallel()
    times = {k: [] for k in steps}
    order = ["coe", "moe"]
    for i in range(warmup + iters):
        for k in (order if i % 2 == 0 else order[::-1]):
            sync()
            t0 = time.perf_counter()
            steps[k]()
            sync()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    f_coe = bench.flops_per_step(configs["coe"], tokens)
    f_moe = bench.flops_per_step(configs["moe"], tokens)
    coe_s = sorted(times["coe"])[len(times["coe"]) // 2]
    moe_s = sorted(times["moe"])[len(times["moe"]) // 2]
    peak = (ctx.peak_tflops * 1e12 if ctx.peak_tflops
            else metrics.peak_flops_per_device(base))
    coe_flops = f_coe["fwd_bwd"] / coe_s
    return dict(coe_ms=coe_s * 1e3, moe_ms=moe_s * 1e3, ratio=coe_s / moe_s,
                paired_ratio=bench.paired_ratio(times["coe"], times["moe"]),
                flop_ratio=f_coe["fwd"] / f_moe["fwd"], coe_tflops=coe_flops / 1e12,
                mfu=coe_flops / peak if peak else None, target=bench.TARGET_COE_OVER_MOE,
                tokens=tokens, experts=experts)


RUN_DIRS = ("layer_ckpt", "bf16", "resume", "fp8_default", "fp8_other", "hf", "hf_ckpt",
            "hf_logits.pt", "measurements.json", "table.md")

WORKERS = {"probe": worker_probe, "model": worker_model, "hf_make": worker_hf_make,
           "hf_load": worker_hf_load, "perf": worker_perf}


# ----------------------------------------------------------------------------- main
def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description="Single-GPU acceptance check of the "
                                "trainer (see tools/gpu_smoke.sh).")
    p.add_argument("--quick", action="store_true",
                   help=f"the decisive rows only, fewer steps (< {BUDGET_S['quick'] // 60} min)")
    p.add_argument("--out", default=str(ROOT / "runs" / "gpu_smoke"),
                   help="logs, checkpoints, measurements.json and table.md")
    p.add_argument("--stand-in", metavar="JSON",
                   help="judge recorded measurements instead of measuring (no GPU needed)")
    p.add_argument("--cpu-rehearsal", action="store_true",
                   help="run every row's machinery on this CPU (local spec, tiny preset, fp32): "
                   "checks the check before GPU time is spent; never an acceptance (exit 1)")
    p.add_argument("--peak-tflops", type=float, help="bf16 peak per GPU for MFU (default: "
                   "known GPUs: H100/H200 989)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def no_cuda_reason() -> Optional[str]:
    """None when a CUDA device is usable, else the one line that says why not."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return f"{PROG}: no CUDA device: torch does not import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        return (f"{PROG}: no CUDA device: torch.cuda.is_available() is False (torch "
                f"{torch.__version__}, CUDA_VISIBLE_DEVICES={visible}); this check needs one "
                "NVIDIA GPU (H100-class) with Transformer Engine; nothing was run")
    return None


def main(argv=None) -> int:
    opts = parse(argv)
    mode = "quick" if opts.quick else "full"
    workdir = Path(opts.out).resolve()
    budget = REHEARSAL_BUDGET_S if opts.cpu_rehearsal else BUDGET_S[mode]
    if opts.cpu_rehearsal:  # as the CPU tests run: no torch.compile warm-up, one thread
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = Context(workdir=workdir, quick=opts.quick, python=sys.executable,
                  deadline=time.monotonic() + budget, peak_tflops=opts.peak_tflops,
                  rehearsal=opts.cpu_rehearsal)
    if opts.worker:  # a measurement subprocess
        result = WORKERS[opts.worker](ctx)
        Path(opts.result).write_text(json.dumps(result, indent=1, default=str))
        return 0
    if opts.stand_in:
        measurements = json.loads(Path(opts.stand_in).read_text())
        title = (f"{PROG} ({mode}): STAND-IN measurements from {opts.stand_in}, not a GPU run")
    else:
        reason = None if opts.cpu_rehearsal else no_cuda_reason()
        if reason:
            print(reason, file=sys.stderr)
            return 2
        workdir.mkdir(parents=True, exist_ok=True)
        for name in RUN_DIRS:  # a previous run's checkpoints and metrics would be appended to
            target = workdir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        t0 = time.monotonic()
        measurements = collect(ctx)
        (workdir / "measurements.json").write_text(json.dumps(measurements, indent=1,
                                                              default=str))
        v = measurements.get("versions") or {}
        title = (f"{PROG} ({mode}) on {v.get('device')}, {time.strftime('%Y-%m-%d %H:%M %Z')}, "
                 f"{time.monotonic() - t0:.0f} s; logs in {workdir}")
        if opts.cpu_rehearsal:
            title = (f"{PROG} ({mode}) CPU REHEARSAL (local spec, {REHEARSAL_PRESET.name}, fp32): "
                     f"the check's machinery only, NOT an acceptance; "
                     f"{time.monotonic() - t0:.0f} s; logs in {workdir}")
    rows = rows_from(measurements, opts.quick)
    table = format_table(rows, title)
    print(table)
    if not opts.stand_in:
        (workdir / "table.md").write_text(table + "\n")
    return exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
