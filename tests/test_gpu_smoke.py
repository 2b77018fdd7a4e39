"""tools/gpu_smoke.sh (the single-GPU acceptance check) on a CPU: everything but the GPU.

* the wrapper: ``bash -n``, ``--help``, and on this CPU machine exit 2 with ONE line saying there
  is no CUDA device (nothing runs, nothing passes);
* the verdicts (``tools/gpu_acceptance.py``'s judges, table and exit status) on stand-in
  measurements: a complete passing set exits 0 through the shell wrapper; each GPU finding of
  issue 19 that a row exists for (no grouped GEMM in bf16, bf16 routing buffers, the latent eps
  of --norm-epsilon, TE missing, a resume that is not exact, FP8 off by more than the tolerance,
  ...) fails its row and the exit status; a missing measurement fails; --quick's rows that are
  left out never count as passed; the tolerances' boundaries;
* every trainer command line the script builds parses with the trainer's own option parser
  (flag names and ranges), and the trainer / resume rows run for real on the CPU trainer (local
  spec, tiny model): the resume row passes (bit-exact), the trainer row fails only because the
  CPU builds the local spec, not TE grouped GEMM.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# the script and its CPU rows do not depend on the release: the 0.16 environment runs them
pytestmark = pytest.mark.one_env

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "tools" / "gpu_smoke.sh"


def _load_acceptance():
    """tools/gpu_acceptance.py as a module (registered: its dataclasses need that)."""
    spec = importlib.util.spec_from_file_location("gpu_acceptance",
                                                  ROOT / "tools" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_acceptance"] = module
    spec.loader.exec_module(module)
    return module


ga = _load_acceptance()


def _bash(*args, env=None, timeout=120):
    e = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    return subprocess.run(["bash", str(SMOKE), *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)


def test_script_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SMOKE)]).returncode == 0
    r = _bash("--help")
    assert r.returncode == 0, r.stderr
    for word in ("--quick", "--stand-in", "Exit status", "TEGroupedMLP", "Float16Module",
                 "--mla-latent-norm-epsilon", "--recompute-modules moe", "UNTESTED"):
        assert word in r.stdout, word


def test_no_cuda_device_is_one_line_and_a_failure():
    r = _bash(env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gpu_smoke.sh: no CUDA device: torch.cuda.is_available() is "
                               "False"), lines[0]
    assert "nothing was run" in lines[0]


# --------------------------------------------------------------------------- stand-in verdicts
STEPS, SAVE = 30, 15
BF16 = {str(i): 10.0 - 0.2 * i for i in range(1, STEPS + 1)}


def passing() -> dict:
    """Measurements as a good H100 run would record them (values chosen, not measured)."""
    fp8 = {k: v * 1.01 for k, v in BF16.items()}
    return {
        "versions": dict(torch="2.11.0+cu130", cuda=True, device="NVIDIA H100 80GB HBM3",
                         capability=[9, 0], megatron_core="0.16.1", te_version="2.11.0",
                         te_error=None, te_range="<2.12.0,>=2.9.0a0", te_in_range=True,
                         fp8_default_recipe="tensorwise"),
        "layer": dict(te_experts="TEGroupedMLP", local_experts="GroupedSequentialMLP",
                      loss_te=10.4012, loss_local=10.4020, logits_rel=8e-3,
                      grads_rel={"embedding.word_embeddings.weight": 1e-2,
                                 "output_layer.weight": 9e-3,
                                 "decoder.layers.0.mlp.router.weight": 2e-2,
                                 "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight":
                                 3e-2}),
        "buffers": dict(dtypes={"module.module.decoder.layers.0.mlp.tokens_per_expert_per_pass":
                                "torch.float32",
                                "module.module.decoder.layers.0.mlp.router.local_tokens_per_expert":
                                "torch.float32"},
                        count_sum=65536.0, expected_sum=65536.0),
        "latent_eps": dict(latent={"decoder.layers.0.self_attention.linear_kv_up_proj": 1e-6},
                           other={"decoder.layers.0.input_layernorm": 1e-5,
                                  "decoder.final_layernorm": 1e-5},
                           want_latent=1e-6, want_norm=1e-5),
        "trainer": dict(rc=0, steps=STEPS, save_step=SAVE, losses=dict(BF16), valid_loss=4.2,
                        impl="transformer_engine", experts="TEGroupedMLP", saved=[SAVE, STEPS]),
        "resume": dict(rc=0, steps=STEPS, save_step=SAVE,
                       losses={k: v for k, v in BF16.items() if int(k) > SAVE}, valid_loss=4.2,
                       impl="transformer_engine", experts="TEGroupedMLP"),
        "fp8_default": dict(rc=0, steps=STEPS, losses=dict(fp8), recipe="tensorwise"),
        "fp8_other": dict(rc=0, steps=STEPS, losses=dict(fp8), recipe="delayed"),
        "hf_import": dict(convert_rc=0, te_experts="TEGroupedMLP", logits_rel=1e-2),
        "perf": dict(coe_ms=2.1, moe_ms=2.0, ratio=1.05, flop_ratio=1.005, coe_tflops=300.0,
                     mfu=0.30, target=1.05),
    }


def _statuses(m, quick=False) -> dict:
    return {r.check: r.status for r in ga.rows_from(m, quick)}


def test_a_complete_passing_run_exits_0_through_the_wrapper(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(passing()))
    r = _bash("--stand-in", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    table = [l for l in r.stdout.splitlines() if l.startswith("| ") and "---" not in l][1:]
    assert len(table) == len(ga.ROWS)
    status = [l.split(" | ")[1] for l in table]
    assert status == ["PASS"] * 9 + ["MEASURED", "UNTESTED"], r.stdout
    assert "STAND-IN measurements" in r.stdout.splitlines()[0]
    assert r.stdout.strip().splitlines()[-1] == "PASS: 9 pass, 1 measured, 1 untested"
    assert "FP8 default recipe (tensorwise)" in r.stdout and "FP8 delayed vs bf16" in r.stdout


def test_quick_leaves_rows_out_without_passing_them(tmp_path):
    m = passing()
    for key in ("fp8_other", "hf_import", "perf"):
        del m[key]
    rows = ga.rows_from(m, quick=True)
    assert [r.status for r in rows].count("NOT RUN") == 3
    assert ga.exit_status(rows) == 0
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    assert _bash("--stand-in", str(path), "--quick").returncode == 0
    # the same measurements in full mode: the three missing rows fail
    r = _bash("--stand-in", str(path))
    assert r.returncode == 1
    assert r.stdout.count("| FAIL | not measured: no measurement |") == 3, r.stdout


def test_nothing_passes_vacuously(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("{}")
    r = _bash("--stand-in", str(path), "--quick")
    assert r.returncode == 1
    assert "| PASS |" not in r.stdout
    # only rows that cannot fail (not run, untested) is not a pass either
    rows = [ga.Row("a", ga.NOT_RUN, "", ""), ga.Row("b", ga.UNTESTED, "", "")]
    assert ga.exit_status(rows) == 1
    # a worker that died: its rows fail with the worker's line
    m = passing()
    del m["layer"]
    m["_errors"] = {"layer": "worker model exit 1: KeyError: 'decoder.layers.0...'"}
    row = [r for r in ga.rows_from(m, False) if "layer bf16" in r.check][0]
    assert row.status == "FAIL" and "KeyError" in row.measured


def _mutate(path: str, value):
    m = passing()
    keys = path.split("/")
    target = m
    for k in keys[:-1]:
        target = target[k]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return m


_DELETE = object()
GPU_FINDINGS = [
    # (what, mutation, row that must fail)
    ("TE does not import (finding 4)", ("versions/te_error", "ImportError: libtorch mismatch"),
     "versions"),
    ("TE outside megatron-core's range", ("versions/te_in_range", False), "versions"),
    ("no megatron-core", ("versions/megatron_core", None), "versions"),
    ("pre-Ada GPU", ("versions/capability", [8, 0]), "versions"),
    ("bf16 TE without grouped GEMM (finding 3)", ("layer/te_experts", "SequentialMLP"), "layer"),
    ("TE vs local logits off", ("layer/logits_rel", 0.05), "layer"),
    ("an expert grad off", ("layer/grads_rel/decoder.layers.0.mlp.router.weight", 0.2), "layer"),
    ("a bf16 count buffer (finding 2)", ("buffers/dtypes/module.module.decoder.layers.0.mlp."
                                         "tokens_per_expert_per_pass", "torch.bfloat16"),
     "buffers"),
    ("counts lost", ("buffers/count_sum", 65280.0), "buffers"),
    ("no count buffer found", ("buffers/dtypes", {}), "buffers"),
    ("latent norms with --norm-epsilon (finding 6)",
     ("latent_eps/latent/decoder.layers.0.self_attention.linear_kv_up_proj", 1e-5), "latent_eps"),
    ("no latent norm found", ("latent_eps/latent", {}), "latent_eps"),
    ("trainer builds SequentialMLP", ("trainer/experts", "SequentialMLP"), "trainer"),
    ("trainer silently on the local spec", ("trainer/impl", "local"), "trainer"),
    ("trainer failed", ("trainer/rc", 1), "trainer"),
    ("no validation", ("trainer/valid_loss", None), "trainer"),
    ("half-way checkpoint missing", ("trainer/saved", [STEPS]), "trainer"),
    ("resume off by one ulp", ("resume/losses/20", math.nextafter(BF16["20"], 0.0)), "resume"),
    ("resume missing a step", ("resume/losses/30", _DELETE), "resume"),
    ("FP8 default 4% off", ("fp8_default/losses", {k: v * 1.04 for k, v in BF16.items()}),
     "fp8_default"),
    ("FP8 NaN", ("fp8_other/losses/3", float("nan")), "fp8_other"),
    ("FP8 run failed", ("fp8_other/rc", 3), "fp8_other"),
    ("HF import logits off", ("hf_import/logits_rel", 0.05), "hf_import"),
    ("HF import loaded into the local spec", ("hf_import/te_experts", "GroupedSequentialMLP"),
     "hf_import"),
    ("benchmark did not measure", ("perf/ratio", float("nan")), "perf"),
]


@pytest.mark.parametrize("what, mutation, row", GPU_FINDINGS, ids=[g[0] for g in GPU_FINDINGS])
def test_each_finding_fails_its_row_and_the_run(what, mutation, row):
    m = _mutate(*mutation)
    rows = ga.rows_from(m, quick=False)
    keys = [spec.key for spec in ga.ROWS]
    failed = [spec_key for spec_key, r in zip(keys, rows) if r.status == "FAIL"]
    assert failed == [row], (what, failed, [r.measured for r in rows])
    assert ga.exit_status(rows) == 1


def test_tolerance_boundaries():
    ref = {"losses": {str(i): 2.0 for i in range(1, 11)}}
    for scale, status in ((1.0299, "PASS"), (1.0301, "FAIL"), (0.9701, "PASS"),
                          (0.9699, "FAIL")):
        m = dict(rc=0, losses={str(i): 2.0 * scale for i in range(1, 11)}, recipe="delayed")
        assert ga.judge_fp8(m, ref).status == status, scale
    # FP8 run with other steps than the reference: fail, whatever the values
    m = dict(rc=0, losses={str(i): 2.0 for i in range(1, 10)})
    assert ga.judge_fp8(m, ref).status == "FAIL"
    layer = passing()["layer"]
    for rel, status in ((ga.LAYER_LOGITS_REL_TOL, "PASS"), (ga.LAYER_LOGITS_REL_TOL * 1.01,
                                                              "FAIL")):
        assert ga.judge_layer(dict(layer, logits_rel=rel)).status == status
    assert ga.judge_layer(dict(layer, loss_te=layer["loss_local"] * (1 + 2 * ga.LAYER_LOSS_REL_TOL))
                          ).status == "FAIL"
    few = dict(layer, grads_rel=dict(list(layer["grads_rel"].items())[:3]))
    assert ga.judge_layer(few).status == "FAIL"       # fewer than MIN_GRADS_COMPARED
    assert ga.rel_close(1.0, 1.0, 0.0) and not ga.rel_close(float("nan"), 1.0, 1.0)
    assert ga.fp8_other_recipe("tensorwise") == "delayed"
    assert ga.fp8_other_recipe("delayed") == "tensorwise"


def test_table_is_markdown_with_one_row_per_check():
    rows = ga.rows_from(passing(), quick=False)
    rows[1].measured = "a | b\nc"     # cell separators and newlines cannot break the table
    text = ga.format_table(rows, "title")
    lines = text.splitlines()
    assert lines[0] == "title" and lines[2] == "| check | status | measured | criterion |"
    body = [l for l in lines if l.startswith("| ") and l != lines[2]]
    assert len(body) == len(ga.ROWS) and all(l.count(" | ") == 3 for l in body)


# --------------------------------------------------------------------------- model helpers
def test_norm_eps_and_grad_names_classify_te_and_local_spellings():
    class Norm(torch.nn.Module):
        def __init__(self, eps):
            super().__init__()
            self.eps = eps

    root = torch.nn.Module()
    attn = torch.nn.Module()
    attn.linear_kv_up_proj = Norm(1e-6)       # TE: the kv latent norm fused into the up-projection
    attn.kv_layernorm = Norm(1e-6)            # local spelling
    attn.linear_q_proj = torch.nn.Linear(2, 2)
    root.self_attention = attn
    root.input_layernorm = Norm(1e-5)
    got = ga.norm_eps(root)
    assert got == {"latent": {"self_attention.linear_kv_up_proj": 1e-6,
                              "self_attention.kv_layernorm": 1e-6},
                   "other": {"input_layernorm": 1e-5}}

    experts = torch.nn.Module()
    experts.weight3 = torch.nn.Parameter(torch.ones(2))
    model = torch.nn.Module()
    model.mlp = torch.nn.Module()
    model.mlp.experts = torch.nn.Module()
    model.mlp.experts.linear_fc1 = experts
    model.mlp.experts.linear_fc1.weight3.main_grad = torch.full((2,), 3.0)
    assert list(ga.grads_by_name(model)) == ["mlp.experts.local_experts.3.linear_fc1.weight"]


def test_every_command_line_the_script_builds_parses(tmp_path):
    """Flag names and ranges are the trainer's own: a typo would only show on the GPU."""
    from megatron_coe.training.options import parse_args

    cfg = ga.paper_config(tmp_path)
    argvs = [ga.trainer_argv(cfg, tmp_path, 30, ["--save", tmp_path / "c", "--save-interval", 15,
                                                 "--eval-interval", 15, "--eval-iters", 2]),
             ga.trainer_argv(cfg, tmp_path, 30, ["--load", tmp_path / "c" / "iter_0000015"])]
    for recipe in ([], ["--fp8-recipe", "delayed"], ["--fp8-recipe", "tensorwise"]):
        argvs.append(ga.trainer_argv(cfg, tmp_path, 30, ["--fp8-format", "hybrid", *recipe,
                                                          "--recompute-modules", "moe"]))
    for argv in argvs:
        args = parse_args([str(a) for a in argv])
        assert args.num_experts == 63 and args.coe_iterations == 2 and args.moe_router_topk == 4
        assert args.multi_latent_attention and args.bf16 and args.moe_router_dtype == "fp32"
    assert parse_args([str(a) for a in argvs[-1]]).recompute_modules == ["moe"]
    for impl in ("local", "transformer_engine"):
        args = ga._paper_args(tmp_path, "--transformer-impl", impl)
        assert args.layernorm_epsilon == ga.LAYER_NORM_EPS
        assert args.mla_latent_norm_epsilon == ga.LATENT_NORM_EPS and args.num_layers == 1
    moe = ga._paper_args(tmp_path, "--coe-iterations", "1", "--moe-router-topk", "8",
                         "--no-coe-inner-residual", "--coe-outer-residual",
                         "--moe-shared-expert-intermediate-size", "1408")
    assert (moe.coe_iterations, moe.moe_router_topk, moe.coe_outer_residual) == (1, 8, True)


@pytest.mark.timeout(420)
def test_trainer_and_resume_rows_on_the_cpu_trainer(tmp_path):
    """The trainer rows' machinery for real (local spec, tiny model, CPU): the runs, the
    metrics, the start-up line, the checkpoints, and the bit-exact resume."""
    cfg = ga.paper_config(tmp_path, ROOT / "examples" / "tiny" / "coe2_cpu.yaml")
    ctx = ga.Context(workdir=tmp_path, quick=True, python=sys.executable,
                     deadline=time.monotonic() + 400)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    ref, resumed = ga.trainer_rows(ctx, cfg, 6, layers=2, vocab=256, precision=())
    assert ref["rc"] == 0, (ref, (tmp_path / "bf16" / "train.log").read_text()[-3000:])
    assert (ref["impl"], ref["experts"]) == ("local", "GroupedSequentialMLP"), ref
    assert sorted(int(i) for i in ref["losses"]) == list(range(1, 7))
    assert ref["saved"] == [3, 6] and math.isfinite(ref["valid_loss"])
    row = ga.judge_resume(json.loads(json.dumps(resumed)), json.loads(json.dumps(ref)))
    assert row.status == "PASS", (row, (tmp_path / "resume" / "train.log").read_text()[-3000:])
    assert row.measured.startswith("exit 0; resumed at 3; 3/3 steps identical")
    # the trainer row wants TE grouped GEMM: on the CPU it fails, naming what was built
    trow = ga.judge_trainer(ref)
    assert trow.status == "FAIL" and "local / GroupedSequentialMLP" in trow.measured
    assert ga.judge_trainer(dict(copy.deepcopy(ref), impl="transformer_engine",
                                 experts="TEGroupedMLP")).status == "PASS"


def test_probe_worker_on_this_cpu_fails_the_versions_row(tmp_path):
    """The probe runs anywhere: here it finds no CUDA and no Transformer Engine, and says so."""
    from importlib import metadata

    ctx = ga.Context(workdir=tmp_path, quick=True, python=sys.executable,
                     deadline=time.monotonic() + 60)
    v = ga.worker_probe(ctx)["versions"]
    assert v["cuda"] is False and v["megatron_core"] == metadata.version("megatron-core")
    assert v["te_error"] and v["te_error"].startswith(("ModuleNotFoundError", "ImportError"))
    assert v["fp8_default_recipe"] in ("tensorwise", "delayed")
    row = ga.judge_versions(v)
    assert row.status == "FAIL" and "no CUDA device" in row.measured
    assert "TE does not import" in row.measured


def test_expert_gradients_are_compared_as_one_set():
    grads = {"l.mlp.experts.local_experts.1.linear_fc1.weight": torch.full((2,), 1.0),
             "l.mlp.experts.local_experts.0.linear_fc1.weight": torch.full((2,), 0.0),
             "l.mlp.router.weight": torch.ones(3)}
    got = ga.group_experts(grads)
    assert sorted(got) == ["l.mlp.experts.local_experts.*.linear_fc1.weight", "l.mlp.router.weight"]
    assert got["l.mlp.experts.local_experts.*.linear_fc1.weight"].tolist() == [0, 0, 1, 1]


@pytest.mark.timeout(480)
def test_hf_import_row_machinery_on_the_cpu(tmp_path):
    """The HF row's CPU half as on the GPU machine (a DeepSeek-V2 model made by transformers,
    tools/convert_from_hf.py with CUDA hidden), then the GPU half's code with the local spec in
    fp32: the trainer's build and load of the converted checkpoint gives the HF logits."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", TORCHDYNAMO_DISABLE="1")
    made = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_acceptance.py"), "--worker",
                           "hf_make", "--result", str(tmp_path / "made.json"), "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    conv = subprocess.run([sys.executable, "tools/convert_from_hf.py", "--load",
                           str(tmp_path / "hf"), "--save", str(tmp_path / "hf_ckpt")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    ctx = ga.Context(workdir=tmp_path, quick=False, python=sys.executable,
                     deadline=time.monotonic() + 300)
    from megatron_coe.testing.distributed import run_distributed

    got = run_distributed(_hf_load_local, 1, ctx=ctx)[0]
    assert got["te_experts"] == "GroupedSequentialMLP", got
    assert got["logits_rel"] < 1e-4, got
    row = ga.judge_hf_import(dict(got, convert_rc=0))
    assert row.status == "FAIL" and "experts GroupedSequentialMLP" in row.measured  # not TE
    assert ga.judge_hf_import(dict(got, convert_rc=0, te_experts="TEGroupedMLP")).status == "PASS"


def _hf_load_local(rank, world, ctx):
    import gpu_acceptance

    return gpu_acceptance.hf_load(ctx, impl="local", bf16=False)


def _measure_local(rank, world, ctx):
    import gpu_acceptance

    return gpu_acceptance.measure_model(ctx, impl="local", preset=ROOT / "examples" / "tiny" /
                                        "coe2_cpu.yaml", vocab=256, bf16=False)


@pytest.mark.timeout(300)
def test_model_rows_machinery_on_the_cpu(tmp_path):
    """The layer / buffer / eps worker's code with the local spec on both sides (tiny preset,
    fp32, CPU): the checkpoint round trip makes the two models compute the same numbers exactly,
    the count buffers are float32 and exact, the latent norms carry their own eps; only the
    experts class (no TE here) keeps the layer row from passing."""
    from megatron_coe.testing.distributed import run_distributed

    ctx = ga.Context(workdir=tmp_path, quick=True, python=sys.executable,
                     deadline=time.monotonic() + 250)
    got = run_distributed(_measure_local, 1, ctx=ctx)[0]
    assert not [k for k in got if k.startswith("_error")], got
    layer = got["layer"]
    assert layer["logits_rel"] == 0.0 and layer["loss_te"] == layer["loss_local"], layer
    assert len(layer["grads_rel"]) >= ga.MIN_GRADS_COMPARED and not layer["not_compared"], layer
    assert set(layer["grads_rel"].values()) == {0.0}, layer
    assert any(".local_experts.*." in n for n in layer["grads_rel"]), layer
    assert ga.judge_layer(layer).status == "FAIL"          # GroupedSequentialMLP on both sides
    assert ga.judge_layer(dict(layer, te_experts="TEGroupedMLP")).status == "PASS"
    assert ga.judge_buffers(got["buffers"]).status == "PASS", got["buffers"]
    assert got["buffers"]["expected_sum"] == 8 * 2 * 128 * 2 * 2     # 8 fwd x b x s x k x C
    eps = got["latent_eps"]
    assert ga.judge_latent_eps(eps).status == "PASS", eps
    assert any(n.endswith("kv_layernorm") for n in eps["latent"]), eps


def _perf_local(rank, world, ctx):
    import gpu_acceptance

    return gpu_acceptance.measure_perf(ctx, impl="local", preset=ROOT / "examples" / "tiny" /
                                       "coe2_cpu.yaml", bf16=False, seq=64, mbs=2, warmup=1,
                                       iters=3)


@pytest.mark.timeout(300)
def test_perf_row_machinery_on_the_cpu(tmp_path):
    """The benchmark worker's code (tools/bench_coe_layer.py's FLOP count, the trainer's config
    for both variants) with the local spec on a tiny preset: CoE-2 vs MoE at equal FLOPs
    (the CoE router per pass aside), both measured; no MFU without a known peak."""
    from megatron_coe.testing.distributed import run_distributed

    ctx = ga.Context(workdir=tmp_path, quick=False, python=sys.executable,
                     deadline=time.monotonic() + 250)
    got = run_distributed(_perf_local, 1, ctx=ctx)[0]
    assert got["experts"] == {"coe": "GroupedSequentialMLP", "moe": "GroupedSequentialMLP"}, got
    assert 1.0 < got["flop_ratio"] < 1.05, got     # routers: CoE runs one per pass
    assert got["coe_ms"] > 0 and got["moe_ms"] > 0 and got["mfu"] is None, got
    row = ga.judge_perf(got)
    assert row.status == "MEASURED" and "MFU n/a" in row.measured, row


def test_bench_module_import_leaves_torch_compile_alone(monkeypatch):
    """tools/bench_coe_layer.py sets TORCHDYNAMO_DISABLE=1 for its CPU runs at import; the GPU
    benchmark imports it for its FLOP count and statistics without that leaking."""
    monkeypatch.delenv("TORCHDYNAMO_DISABLE", raising=False)
    bench = ga._bench_module()
    assert "TORCHDYNAMO_DISABLE" not in os.environ
    assert callable(bench.flops_per_step) and bench.TARGET_COE_OVER_MOE == 1.05


def test_run_worker_is_a_subprocess_returning_its_measurements(tmp_path):
    ctx = ga.Context(workdir=tmp_path, quick=True, python=sys.executable,
                     deadline=time.monotonic() + 240)
    got = ga.run_worker("probe", ctx)
    assert got["versions"]["cuda"] is False and got["versions"]["torch"] == torch.__version__
    assert (tmp_path / "probe.log").is_file()
    # a worker that dies: one line naming it, its last line and its log
    ctx.python = "/bin/false"
    got = ga.run_worker("probe", ctx)
    assert set(got) == {"_error"} and got["_error"].startswith("worker probe exit 1:"), got
    assert str(tmp_path / "probe.log") in got["_error"]


@pytest.mark.parametrize("quick", [True, False])
def test_collect_runs_the_rows_in_order_and_keeps_every_failure(tmp_path, monkeypatch, quick):
    """collect()'s wiring with stand-ins for the workers and trainer runs: which runs, in what
    order, with which flags; a failed worker's line lands on each of its rows; the HF row goes
    through convert_from_hf.py on the CPU (CUDA hidden) before its GPU half."""
    calls = []

    def fake_worker(name, ctx, env=None):
        calls.append(("worker", name, (env or {}).get("CUDA_VISIBLE_DEVICES")))
        return {"probe": {"versions": {"cuda": True, "fp8_default_recipe": "tensorwise"}},
                "model": {"latent_eps": {"latent": {}}, "_error_layer": "KeyError: 'x'",
                          "_error_buffers": "RuntimeError: y"},
                "hf_make": {"hf_made": True},
                "hf_load": {"hf_import": {"logits_rel": 0.0}},
                "perf": {"_error": "worker perf exit 1: boom"}}[name]

    def fake_train(name, argv, ctx, steps, save_step=0):
        calls.append(("train", name, [str(a) for a in argv]))
        return {"rc": 0, "steps": steps, "save_step": save_step}

    def fake_logged(cmd, log, timeout, env):
        calls.append(("run", Path(cmd[1]).name, env.get("CUDA_VISIBLE_DEVICES")))
        return 0, ""

    monkeypatch.setattr(ga, "run_worker", fake_worker)
    monkeypatch.setattr(ga, "train", fake_train)
    monkeypatch.setattr(ga, "run_logged", fake_logged)
    ctx = ga.Context(workdir=tmp_path, quick=quick, python=sys.executable,
                     deadline=time.monotonic() + 60)
    m = ga.collect(ctx)
    order = [c[1] for c in calls]
    tail = [] if quick else ["fp8_other", "hf_make", "convert_from_hf.py", "hf_load", "perf"]
    assert order == ["probe", "model", "bf16", "resume", "fp8_default", *tail], order
    assert m["_errors"]["layer"] == "KeyError: 'x'" and m["_errors"]["buffers"] == "RuntimeError: y"
    assert "latent_eps" in m and "layer" not in m
    trains = {c[1]: c[2] for c in calls if c[0] == "train"}
    steps = ga.TRAIN_STEPS["quick" if quick else "full"]
    assert "--save" in trains["bf16"] and "--save" not in trains["resume"]
    assert trains["resume"][trains["resume"].index("--load") + 1].endswith(
        f"bf16/ckpt/iter_{steps // 2:07d}")
    for key in ("fp8_default",) + (() if quick else ("fp8_other",)):
        argv = trains[key]
        assert argv[argv.index("--fp8-format") + 1] == "hybrid"
        assert argv[argv.index("--recompute-modules") + 1] == "moe"
    assert "--fp8-recipe" not in trains["fp8_default"]          # the trainer's default
    if not quick:
        assert trains["fp8_other"][trains["fp8_other"].index("--fp8-recipe") + 1] == "delayed"
        cpu_side = [c for c in calls if c[1] in ("hf_make", "convert_from_hf.py")]
        assert all(c[2] == "" for c in cpu_side), cpu_side      # made and converted on the CPU
        assert m["hf_import"] == {"logits_rel": 0.0, "convert_rc": 0}
        assert m["_errors"]["perf"] == "worker perf exit 1: boom"
    rows = ga.rows_from(m, quick)
    assert ga.exit_status(rows) == 1


def test_collect_stops_after_the_probe_without_cuda(tmp_path, monkeypatch):
    monkeypatch.setattr(ga, "run_worker", lambda name, ctx, env=None: {"versions": {"cuda": False}})
    monkeypatch.setattr(ga, "train", lambda *a, **k: pytest.fail("trained without CUDA"))
    ctx = ga.Context(workdir=tmp_path, quick=True, python=sys.executable,
                     deadline=time.monotonic() + 60)
    m = ga.collect(ctx)
    assert set(m) == {"_errors", "versions"}
    assert ga.exit_status(ga.rows_from(m, True)) == 1
