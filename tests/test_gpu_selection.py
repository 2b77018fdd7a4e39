"""Every GPU-only choice of the trainer, as pure functions of the options and a probe of the
machine (``training/precision.py``), checked on CPU with stand-in probes, plus the parts that run
here for real (issue 19, findings 3, 4, 5, 7, 8 and the launch items of 9):

* grouped GEMM: ``TEGroupedMLP`` whenever the Transformer Engine (TE) layers are used, bf16 or
  FP8; ``--no-moe-grouped-gemm`` turns it off; the local layers refuse it;
* a CUDA machine whose TE does not import is refused in one line quoting the import error,
  unless ``--transformer-impl local`` (the pure rule, ``setup.check_runtime``, and the CLI with
  a faked CUDA machine);
* the start-up line of a real CPU run names the transformer impl, the experts class actually
  built, the dispatcher, precision, router dtype and fusions;
* ``--moe-router-dtype`` reaches the model config, ``--help`` lists it, the paper presets use fp32;
* fusions: Megatron-LM's defaults on a GPU where the kernels import (stand-in probe), off on CPU;
  the real import probes on this machine; Megatron-LM's ``--no-*`` flags;
* launch: ``LOCAL_RANK`` modulo the visible devices, ``CUDA_DEVICE_MAX_CONNECTIONS`` set before
  the first CUDA call and refused when wrong for TP, ``flex`` refused without DeepEP, and the
  dataset-building barrier outliving ``--distributed-timeout-minutes`` (2 gloo processes).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron_coe.testing.train_args import explicit
from megatron_coe.training import precision, setup
from megatron_coe.training.options import parse_args as parse_args_as_given
from megatron_coe.training.precision import (
    DeviceProbe, KernelProbe, PrecisionError, plan_fusions, plan_precision,
    resolve_transformer_impl)

ROOT = Path(__file__).resolve().parents[1]
TE = "transformer_engine"
TE_BROKEN = ("ImportError: /usr/lib/python3/dist-packages/transformer_engine/"
             "transformer_engine_torch.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
TINY = ("--mock-data --num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 8 "
        "--moe-router-topk 2 --moe-ffn-hidden-size 32 --coe-iterations 2 --swiglu "
        "--seq-length 32 --micro-batch-size 2 --global-batch-size 2 --lr 1e-3 --vocab-size 128 "
        "--train-iters 1 --eval-iters 0 --log-interval 1").split()


def parse_args(argv: list):
    return parse_args_as_given(explicit(argv))


def _env(**extra) -> dict:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _probe(cuda=True, te_error=None, deep_ep=None) -> DeviceProbe:
    return DeviceProbe(cuda=lambda: cuda, have_te=lambda: te_error is None,
                       capability=lambda: (9, 0), device_name=lambda: "NVIDIA H100 80GB HBM3",
                       te_import_error=lambda: te_error, deep_ep=lambda backend: deep_ep)


def _kernels(**missing) -> KernelProbe:
    """Every kernel imports, except those named (name -> the reason it does not)."""
    names = [f.name for f in dataclasses.fields(KernelProbe)]
    calls = {n: (lambda n=n: missing.get(n)) for n in names}
    calls["rope"] = lambda mla: missing.get("rope_mla" if mla else "rope")
    return KernelProbe(**calls)


# --------------------------------------------------------------------------- grouped GEMM (3)
def test_grouped_gemm_is_the_default_with_the_te_layers_bf16_and_fp8():
    for flags in (["--bf16"], ["--fp8-format", "hybrid"], []):
        plan = plan_precision(parse_args(flags), te_available=True)
        assert plan.config["moe_grouped_gemm"] is True and plan.experts == "TEGroupedMLP", flags
    off = plan_precision(parse_args(["--bf16", "--no-moe-grouped-gemm"]), te_available=True)
    assert off.config["moe_grouped_gemm"] is False and off.experts == "SequentialMLP"
    local = plan_precision(parse_args([]), te_available=False)
    assert local.config["moe_grouped_gemm"] is False
    assert local.experts == "GroupedSequentialMLP"
    with pytest.raises(PrecisionError) as e:
        plan_precision(parse_args(["--moe-grouped-gemm", "--transformer-impl", "local"]), True)
    assert str(e.value).startswith("--moe-grouped-gemm needs the Transformer Engine layers "
                                   "(TEGroupedMLP)") and "\n" not in str(e.value)


def test_grouped_gemm_flag_reaches_the_model_config_and_yaml(monkeypatch):
    monkeypatch.setattr(setup, "use_cuda", lambda: False)  # the CPU machine's choice
    args = parse_args(TINY)
    assert args.moe_grouped_gemm is None  # unset: decided by the layers
    assert setup.build_model_config(args).moe_grouped_gemm is False  # CPU: local layers
    assert parse_args([*TINY, "--no-moe-grouped-gemm"]).moe_grouped_gemm is False
    assert parse_args([*TINY, "--moe-grouped-gemm"]).moe_grouped_gemm is True


# --------------------------------------------------------------------------- silent fallback (4)
def test_cuda_machine_without_working_te_is_refused_unless_local():
    args = parse_args([])
    with pytest.raises(PrecisionError) as e:
        resolve_transformer_impl(args, _probe(te_error=TE_BROKEN))
    msg = str(e.value)
    assert msg.startswith(f"Transformer Engine does not import on this CUDA machine "
                          f"({TE_BROKEN}): ")
    assert msg.endswith("or run without it with --transformer-impl local.") and "\n" not in msg
    with pytest.raises(PrecisionError, match="undefined symbol"):  # asked for TE explicitly too
        resolve_transformer_impl(parse_args(["--transformer-impl", TE]),
                                 _probe(te_error=TE_BROKEN))
    local = parse_args(["--transformer-impl", "local"])
    assert resolve_transformer_impl(local, _probe(te_error=TE_BROKEN)) == "local"
    assert resolve_transformer_impl(args, _probe()) == TE
    assert resolve_transformer_impl(args, _probe(cuda=False, te_error=TE_BROKEN)) == "local"
    with pytest.raises(PrecisionError, match="needs a CUDA GPU; use --transformer-impl local"):
        resolve_transformer_impl(parse_args(["--transformer-impl", TE]), _probe(cuda=False))


def test_check_runtime_refuses_a_broken_te_on_cuda(monkeypatch):
    monkeypatch.setattr(DeviceProbe, "this_machine",
                        classmethod(lambda cls: _probe(te_error=TE_BROKEN)))
    with pytest.raises(PrecisionError, match="does not import on this CUDA machine"):
        setup.check_runtime(parse_args(TINY))


@pytest.mark.timeout(120)
@pytest.mark.one_env
def test_cli_on_a_cuda_machine_with_a_broken_te_exits_2_with_one_line():
    """The trainer on a faked CUDA machine whose TE import fails: one line quoting the import
    error, exit 2, nothing built; with --transformer-impl local it passes that check."""
    fake = textwrap.dedent(f"""
        import sys, torch
        torch.cuda.is_available = lambda: True
        import megatron_coe.compat.te_absent as te
        te.transformer_engine_import_error = lambda: {TE_BROKEN!r}
        from megatron_coe.train import main
        sys.exit(main(sys.argv[1:]))
    """)
    proc = subprocess.run([sys.executable, "-c", fake, *explicit(TINY)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (
        f"coe-train: error: Transformer Engine does not import on this CUDA machine "
        f"({TE_BROKEN}): fix the install (a TE built for this torch: the NVIDIA PyTorch "
        "container's own, see docs/parallelism-and-gpu.md, GPU install) or run without it with "
        "--transformer-impl local.")
    assert "start-up:" not in proc.stdout


# --------------------------------------------------------------------------- start-up line
def test_startup_line_names_impl_experts_dispatcher_precision_router_fusions():
    fp8 = parse_args(["--fp8-format", "hybrid", "--moe-router-dtype", "fp32",
                      "--moe-token-dispatcher-type", "alltoall", "--swiglu"])
    plan = plan_precision(fp8, True)
    fusions = plan_fusions(fp8, cuda=True, impl=plan.transformer_impl, kernels=_kernels())
    assert precision.startup_line(fp8, plan, fusions) == (
        "start-up: transformer-impl transformer_engine | experts TEGroupedMLP | dispatcher "
        "alltoall | precision bf16 + fp8 hybrid (recipe tensorwise) | router dtype fp32 | "
        "fusions bias_swiglu, bias_dropout, rope, grad_accum, moe_permute (off: "
        "masked_softmax: TE attention, moe_router: opt-in)")
    bf16 = parse_args(["--bf16", "--no-moe-grouped-gemm", "--moe-token-dispatcher-type",
                       "allgather"])
    plan = plan_precision(bf16, True)
    line = precision.startup_line(bf16, plan, plan_fusions(bf16, True, TE, _kernels()))
    assert ("| experts SequentialMLP | dispatcher allgather | precision bf16 | router dtype "
            "bf16 (params dtype) |") in line


@pytest.mark.timeout(300)
@pytest.mark.one_env
def test_startup_line_of_a_real_cpu_run(tmp_path):
    """...and the checkpoint's Megatron-LM ``args`` record the experts actually built (no
    grouped GEMM on the local layers: False, not the unset option's None) and the router dtype."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_coe.train",
         *explicit([*TINY, "--moe-router-dtype", "fp32", "--moe-token-dispatcher-type",
                    "alltoall", "--save", str(tmp_path / "ckpt")])],
        cwd=ROOT, env=_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("start-up:")]
    assert lines == ["start-up: transformer-impl local | experts GroupedSequentialMLP | "
                     "dispatcher alltoall | precision fp32 | router dtype fp32 | fusions none "
                     "(CPU)"], proc.stdout[-3000:]
    assert "warning: --fp8-recipe" not in proc.stdout
    from megatron_coe.training import checkpoint as ckpt
    from megatron_coe.training.megatron_lm import load_common

    recorded = load_common(ckpt.find_checkpoint(str(tmp_path / "ckpt")))["args"]
    assert recorded.moe_grouped_gemm is False and recorded.moe_router_dtype == "fp32"


# --------------------------------------------------------------------------- router dtype (7)
def test_router_dtype_option_reaches_the_config_and_help_lists_it():
    assert setup.build_model_config(parse_args(TINY)).moe_router_dtype is None  # params dtype
    for dtype in ("fp32", "fp64"):
        args = parse_args([*TINY, "--moe-router-dtype", dtype])
        assert setup.build_model_config(args).moe_router_dtype == dtype
    proc = subprocess.run([sys.executable, "-m", "megatron_coe.train", "--help"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    help_text = " ".join(proc.stdout.split())
    assert "--moe-router-dtype {fp32,fp64}" in help_text
    for flag in ("--moe-grouped-gemm, --no-moe-grouped-gemm", "--rope-fusion, --no-rope-fusion",
                 "--no-bias-swiglu-fusion", "--no-masked-softmax-fusion",
                 "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion",
                 "--moe-permute-fusion, --no-moe-permute-fusion", "--moe-router-fusion",
                 "--moe-flex-dispatcher-backend {deepep,hybridep}"):
        assert flag in help_text, flag


@pytest.mark.parametrize("path", sorted(
    [p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*.yaml")]
    + [p.relative_to(ROOT).as_posix() for p in (ROOT / "examples/paper/configs").rglob("*.yaml")]))
def test_paper_presets_route_in_fp32(path):
    assert parse_args_as_given(["--config", str(ROOT / path)]).moe_router_dtype == "fp32"


# --------------------------------------------------------------------------- fusions (8)
def test_fusions_on_a_gpu_are_megatron_lms_defaults_where_kernels_import():
    swiglu = parse_args(["--swiglu"])
    plan = plan_fusions(swiglu, cuda=True, impl="local", kernels=_kernels())
    assert plan.config == dict(bias_activation_fusion=True, masked_softmax_fusion=True,
                               bias_dropout_fusion=True, apply_rope_fusion=True,
                               gradient_accumulation_fusion=True, moe_permute_fusion=True,
                               moe_router_fusion=False)
    assert plan.off == {"moe_router": "opt-in"}
    # a kernel that does not import: that fusion off, with the reason, the others on
    apex = "ModuleNotFoundError: No module named 'fused_weight_gradient_mlp_cuda'"
    plan = plan_fusions(swiglu, True, TE, _kernels(gradient_accumulation=apex))
    assert plan.config["gradient_accumulation_fusion"] is False
    assert plan.off["grad_accum"] == f"no kernel: {apex}"
    assert plan.config["masked_softmax_fusion"] is False  # TE attention: not used there
    assert plan.config["moe_permute_fusion"] and plan.config["bias_activation_fusion"]
    # nothing to fuse: GeLU without bias; MLA with plain RoPE (Megatron-Core fuses only YaRN)
    gelu = plan_fusions(parse_args([]), True, TE, _kernels())
    assert not gelu.config["bias_activation_fusion"]
    assert gelu.off["bias_swiglu"] == "GeLU without bias"
    mla = ["--multi-latent-attention", "--kv-lora-rank", "32", "--qk-head-dim", "16",
           "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16"]
    rope = plan_fusions(parse_args(mla), True, TE, _kernels())
    assert not rope.config["apply_rope_fusion"] and rope.off["rope"] == "MLA fuses only YaRN RoPE"
    yarn = parse_args([*mla, "--position-embedding-type", "yarn"])
    assert plan_fusions(yarn, True, TE, _kernels()).config["apply_rope_fusion"]
    assert not plan_fusions(yarn, True, TE, _kernels(rope_mla="no triton")).config[
        "apply_rope_fusion"]


def test_fusion_flags_turn_them_off_and_opt_in_ones_on():
    flags = ["--swiglu", "--no-bias-swiglu-fusion", "--no-masked-softmax-fusion",
             "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
             "--no-moe-permute-fusion", "--moe-router-fusion"]
    plan = plan_fusions(parse_args(flags), True, "local", _kernels())
    assert [f for f, on in plan.config.items() if on] == ["moe_router_fusion"]
    assert plan.off["rope"] == "--no-rope-fusion"
    assert plan.describe().startswith("moe_router (off: bias_swiglu: --no-bias-swiglu-fusion")
    # asked for explicitly where it cannot run: one line, not a silent off
    with pytest.raises(PrecisionError, match=r"^--moe-router-fusion: its kernel does not import "
                                             r"here \(TE too old\)"):
        plan_fusions(parse_args(["--moe-router-fusion"]), True, TE,
                     _kernels(moe_router="TE too old"))
    with pytest.raises(PrecisionError, match="^--moe-permute-fusion: its kernel"):
        plan_fusions(parse_args(["--moe-permute-fusion"]), True, TE, _kernels(moe_permute="x"))
    with pytest.raises(PrecisionError, match="^--moe-permute-fusion needs a CUDA GPU"):
        plan_fusions(parse_args(["--moe-permute-fusion"]), False, "local")
    # unset: on where it imports, quietly off (listed) where not
    assert plan_fusions(parse_args([]), True, TE, _kernels(moe_permute="x")).off[
        "moe_permute"] == "no kernel: x"


def test_cpu_keeps_every_fusion_off_and_the_config_gets_them(tmp_path, monkeypatch):
    from megatron_coe.config import CPU_UNFUSED, FUSION_FIELDS

    monkeypatch.setattr(setup, "use_cuda", lambda: False)
    plan = plan_fusions(parse_args(["--swiglu"]), cuda=False, impl="local")
    assert plan.config == {f: False for f in FUSION_FIELDS} and plan.describe() == "none (CPU)"
    assert [f for f, _, _ in precision.FUSIONS] == list(FUSION_FIELDS)
    assert set(CPU_UNFUSED) >= set(FUSION_FIELDS) - {"gradient_accumulation_fusion"}
    config = setup.build_model_config(parse_args([*TINY, "--rope-fusion"]))
    assert not any(getattr(config, f) for f in FUSION_FIELDS)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("rope_fusion: false\ngradient_accumulation_fusion: false\n")
    args = parse_args_as_given(["--config", str(yaml_file), *explicit(TINY)])
    assert args.apply_rope_fusion is False and args.gradient_accumulation_fusion is False


def test_fusion_fields_exist_in_the_installed_megatron_core():
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert {f for f, _, _ in precision.FUSIONS} <= fields
    assert {"moe_router_dtype", "moe_grouped_gemm", "moe_flex_dispatcher_backend"} <= fields


def test_real_kernel_probes_on_this_machine():
    """The import probes the GPU path uses, run here: the jit-fused kernels import everywhere;
    Apex's fused wgrad kernel, TE's permutation/router kernels and TE's RoPE do not (no GPU
    packages on this CPU machine), each with the import's own reason."""
    import importlib.util

    k = KernelProbe.this_machine()
    assert k.bias_activation() is None and k.bias_dropout() is None
    for module, probe in (("fused_weight_gradient_mlp_cuda", k.gradient_accumulation),
                          ("scaled_upper_triang_masked_softmax_cuda", k.masked_softmax)):
        if importlib.util.find_spec(module) is None:  # Apex's kernels: not on a CPU machine
            assert probe() == f"ModuleNotFoundError: No module named '{module}'"
        else:
            assert probe() is None
    if precision._import_error("transformer_engine") is not None:  # no TE (a CPU machine)
        assert "fused_permute" in k.moe_permute()
        assert "fused_topk_with_score_function" in k.moe_router()
        assert "fused_apply_rotary_pos_emb" in k.rope(False)


# --------------------------------------------------------------------------- launch (9)
def test_local_rank_modulo_visible_devices():
    assert [precision.local_device_index(r, 4) for r in range(10)] == [0, 1, 2, 3] * 2 + [0, 1]
    assert precision.local_device_index(3, 1) == 0
    with pytest.raises(PrecisionError, match="no CUDA device is visible"):
        precision.local_device_index(0, 0)


def test_cuda_device_max_connections_rule():
    tp2 = parse_args(["--tensor-model-parallel-size", "2", "--sequence-parallel"])
    precision.check_cuda_max_connections(tp2, "1", (9, 0))
    precision.check_cuda_max_connections(tp2, "8", (10, 0))       # Blackwell: no requirement
    precision.check_cuda_max_connections(parse_args([]), "8", (9, 0))  # TP=1: none either
    with pytest.raises(PrecisionError) as e:
        precision.check_cuda_max_connections(tp2, "8", (9, 0))
    assert str(e.value) == (
        "--tensor-model-parallel-size 2 on a GPU of compute capability 9.0 needs "
        "CUDA_DEVICE_MAX_CONNECTIONS=1 (found '8'): unset it (the trainer sets 1) or export "
        "CUDA_DEVICE_MAX_CONNECTIONS=1.")


def test_trainer_sets_cuda_device_max_connections_before_the_first_cuda_call(monkeypatch):
    """train.main on a machine without the variable: the first torch.cuda call already sees 1."""
    from megatron_coe import train

    monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    seen = []

    def is_available():
        seen.append(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    sigint = signal.getsignal(signal.SIGINT)
    try:  # refused at once (FP8 on CPU): nothing is built; no signal handler installed
        assert train.main(explicit([*TINY, "--fp8-format", "hybrid",
                                    "--no-exit-signal-handler"])) == 2
    finally:
        signal.signal(signal.SIGINT, sigint)
    assert seen and seen[0] == "1"


def test_flex_dispatcher_needs_deep_ep():
    flex = parse_args(["--moe-token-dispatcher-type", "flex"])
    missing = "ModuleNotFoundError: No module named 'deep_ep'"
    with pytest.raises(PrecisionError) as e:
        precision.check_flex_dispatcher(flex, _probe(deep_ep=missing))
    assert str(e.value) == (
        f"--moe-token-dispatcher-type flex (--moe-flex-dispatcher-backend deepep) needs DeepEP, "
        f"which does not import here ({missing}): {precision.FLEX_INSTALL}, or use "
        "--moe-token-dispatcher-type alltoall.")
    hybrid = parse_args(["--moe-token-dispatcher-type", "flex", "--moe-flex-dispatcher-backend",
                         "hybridep"])
    with pytest.raises(PrecisionError, match=r"hybridep\) needs HybridEP"):
        precision.check_flex_dispatcher(hybrid, _probe(deep_ep="no HybridEPBuffer"))
    precision.check_flex_dispatcher(flex, _probe(deep_ep=None))  # installed: accepted
    precision.check_flex_dispatcher(parse_args([]), _probe(deep_ep=missing))  # not flex


def test_preflight_refuses_flex_on_this_machine():
    from megatron_coe.training.trainer import preflight

    if precision._import_error("deep_ep") is None:
        pytest.skip("deep_ep is installed here: flex is accepted")
    with pytest.raises(PrecisionError, match="needs DeepEP, which does not import here "
                                             r"\(ModuleNotFoundError"):
        preflight(parse_args([*TINY, "--moe-token-dispatcher-type", "flex"]), 1)


_BARRIER = textwrap.dedent("""
    import datetime, os, time
    import torch.distributed as dist
    from megatron_coe.compat.collective_timeout import default_group_timeout
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=0.05))  # 3 s
    for phase in ("dataset-build timeout", "collective timeout"):
        if rank == 0:
            time.sleep(8)  # rank 0 "building indices" for longer than the collective timeout
        try:
            if phase == "dataset-build timeout":
                with default_group_timeout(1.0, restore_minutes=0.05):
                    dist.barrier()
            else:  # restored: the same wait now times out
                dist.barrier()
        except RuntimeError as e:
            print(f"rank {rank}: {phase}: barrier failed: {str(e).splitlines()[0]}", flush=True)
            os._exit(1)
        print(f"rank {rank}: {phase}: barrier passed", flush=True)
    os._exit(0)
""")


@pytest.mark.timeout(300)
@pytest.mark.one_env
def test_dataset_build_barrier_outlives_the_collective_timeout(monkeypatch):
    """Rank 0 works longer than the collective timeout (3 s) before a barrier the other rank
    waits in: inside the dataset-build timeout both ranks pass; after it (timeout restored) the
    same wait times out on the waiting rank (the failure a first run over a large corpus would
    hit). The trainer's phase raises the default group's timeout to 120 min (or
    --distributed-timeout-minutes if longer) and restores it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", _BARRIER], cwd=ROOT,
                              env=_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    (rc0, out0), (rc1, out1) = [(p.wait(timeout=240), p.stdout.read()) for p in procs]
    assert "rank 0: dataset-build timeout: barrier passed" in out0, out0
    assert "rank 1: dataset-build timeout: barrier passed" in out1, out1
    assert rc1 == 1 and "rank 1: collective timeout: barrier failed" in out1, out1
    calls = []
    monkeypatch.setattr(setup, "default_group_timeout", lambda *a: calls.append(a))
    for minutes in ("10", "200"):
        setup.dataset_build_timeout(parse_args(["--distributed-timeout-minutes", minutes]))
    assert calls == [(120.0, 10.0), (200.0, 200.0)]
