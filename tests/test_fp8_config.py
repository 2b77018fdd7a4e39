"""FP8 options -> Megatron-Core 0.16.1 config + layer spec, and the device check (all on CPU).

* ``plan_precision`` (pure, builds nothing): ``--fp8-format hybrid|e4m3`` gives ``fp8``, the
  recipe (default ``tensorwise``), bf16 params, the Transformer Engine spec, grouped-GEMM
  experts, router padding (not with the allgather dispatcher); every key is a real
  ``TransformerConfig`` field with an allowed value. ``delayed`` with C > 1 prints one warning.
* ``check_fp8_device`` with stand-in probes: no CUDA device / no TE / GPU too old for the recipe
  / old TE / TE's own refusal each give a message naming what is missing.
* On this (CPU) machine the trainer refuses ``--fp8-format`` before training: one line, exit 2.
* argparse rejects unknown formats and recipes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from megatron_coe.training import precision
from megatron_coe.testing.train_args import explicit
from megatron_coe.training.options import parse_args as parse_args_as_given
from megatron_coe.training.precision import DeviceProbe, PrecisionError, plan_precision
from megatron_coe.training.setup import SetupError

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--mock-data", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--num-experts", "8", "--moe-router-topk", "2", "--train-iters", "5", "--eval-iters", "0"]


def parse_args(argv: list):
    """The options of ``argv`` plus the values these tests were written with (the trainer's
    defaults are Megatron-LM's)."""
    return parse_args_as_given(explicit(argv))


# --------------------------------------------------------------------------- pure mapping
@pytest.mark.parametrize("fmt, recipe", [("hybrid", "delayed"), ("e4m3", "tensorwise"),
                                         ("hybrid", "blockwise"), ("e4m3", "mxfp8")])
def test_fp8_maps_to_te_spec_grouped_gemm_router_padding_bf16(fmt, recipe):
    args = parse_args(["--fp8-format", fmt, "--fp8-recipe", recipe])
    plan = plan_precision(args, te_available=True)
    assert plan.use_transformer_engine and plan.transformer_impl == "transformer_engine"
    assert plan.bf16
    c = plan.config
    assert c["fp8"] == fmt and c["fp8_recipe"] == recipe
    assert c["bf16"] is True and c["params_dtype"] is torch.bfloat16
    assert c["pipeline_dtype"] is torch.bfloat16
    assert c["moe_grouped_gemm"] is True
    assert c["moe_router_padding_for_quantization"] is True  # default dispatcher: alltoall
    assert "moe_permute_fusion" not in c  # a fusion: precision.plan_fusions, FP8 or not
    assert c["transformer_impl"] == "transformer_engine"
    assert "fp8_param" not in c  # parameters stay bf16
    # the mapping does not depend on what this machine has: it never builds anything
    assert plan_precision(args, te_available=False) == plan


def test_fp8_kwargs_are_megatron_0_16_1_config_fields_with_allowed_values():
    from megatron.core.transformer.transformer_config import TransformerConfig

    fields = {f.name: f for f in dataclasses.fields(TransformerConfig)}
    for fmt in ("e4m3", "hybrid"):
        for recipe in ("delayed", "tensorwise", "mxfp8", "blockwise"):
            kw = plan_precision(parse_args(["--fp8-format", fmt, "--fp8-recipe", recipe]),
                                te_available=True).config
            assert set(kw) <= set(fields), set(kw) - set(fields)
            for name in ("fp8", "fp8_recipe", "transformer_impl"):
                allowed = [a for arg in typing.get_args(fields[name].type)
                           for a in (typing.get_args(arg) or [arg])]
                if isinstance(fields[name].type, str):  # postponed annotations: read the text
                    assert repr(kw[name]) in fields[name].type, (name, kw[name])
                else:
                    assert kw[name] in allowed, (name, kw[name], allowed)
    # 0.16.1 renamed the padding flag; the old name is only a deprecated alias that warns
    assert "moe_router_padding_for_quantization" in fields
    assert "moe_router_padding_for_fp8" in fields


def test_router_padding_only_where_megatron_allows_it():
    args = parse_args(["--fp8-format", "hybrid", "--moe-token-dispatcher-type", "allgather"])
    c = plan_precision(args, te_available=True).config
    assert c["moe_router_padding_for_quantization"] is False  # Megatron refuses it for allgather
    assert c["moe_grouped_gemm"] is True                     # TEGroupedMLP pads by itself
    flex = parse_args(["--fp8-format", "hybrid", "--moe-token-dispatcher-type", "flex"])
    assert plan_precision(flex, True).config["moe_router_padding_for_quantization"] is True


def test_fp8_with_local_layers_is_refused():
    args = parse_args(["--fp8-format", "hybrid", "--transformer-impl", "local"])
    with pytest.raises(PrecisionError, match="needs the Transformer Engine layers"):
        plan_precision(args, te_available=True)
    assert issubclass(PrecisionError, SetupError)  # the CLI prints it as one line, exit 2


def test_without_fp8_no_fp8_fields():
    cpu = plan_precision(parse_args([]), te_available=False)
    assert cpu.transformer_impl == "local" and not cpu.bf16
    assert cpu.config == dict(bf16=False, params_dtype=torch.float32,
                              pipeline_dtype=torch.float32, transformer_impl="local",
                              moe_grouped_gemm=False)
    gpu = plan_precision(parse_args(["--bf16"]), te_available=True)
    assert gpu.use_transformer_engine and gpu.bf16 and "fp8" not in gpu.config
    assert gpu.config["moe_grouped_gemm"] is True  # TEGroupedMLP in bf16 too (finding 3)
    assert plan_precision(parse_args(["--transformer-impl", "local", "--bf16"]),
                          True).transformer_impl == "local"


# --------------------------------------------------------------------------- device check
def _probe(cuda=True, te=True, cap=(9, 0), name="NVIDIA H100 80GB HBM3", te_version="2.8.0",
           verdict=(True, "")):
    return DeviceProbe(cuda=lambda: cuda, have_te=lambda: te, capability=lambda: cap,
                       device_name=lambda: name, te_version=lambda: te_version,
                       te_support=lambda recipe: verdict)


def _check(flags, probe):
    precision.check_fp8_device(parse_args(flags), probe)


def test_device_check_names_what_is_missing():
    hybrid = ["--fp8-format", "hybrid"]
    with pytest.raises(PrecisionError, match="needs a CUDA GPU with Transformer Engine; this "
                                             "machine has no CUDA device"):
        _check(hybrid, _probe(cuda=False))
    with pytest.raises(PrecisionError, match="needs Transformer Engine, which is not importable"):
        _check(hybrid, _probe(te=False))
    with pytest.raises(PrecisionError, match=r"needs a Ada/Hopper \(compute capability >= 8\.9\) "
                                             r"GPU; this one is NVIDIA A100-SXM4-80GB with "
                                             r"compute capability 8\.0"):
        _check(hybrid, _probe(cap=(8, 0), name="NVIDIA A100-SXM4-80GB"))
    with pytest.raises(PrecisionError, match=r"recipe mxfp8\) needs a Blackwell .* capability "
                                             r"9\.0\. Use --fp8-recipe delayed"):
        _check([*hybrid, "--fp8-recipe", "mxfp8"], _probe())
    with pytest.raises(PrecisionError, match=r"Transformer Engine >= 2\.1\.0 .* found 1\.13\.0"):
        _check(hybrid, _probe(te_version="1.13.0"))
    with pytest.raises(PrecisionError, match="Transformer Engine reports it unsupported on "
                                             "NVIDIA H100 80GB HBM3: CUDA 12.8 needed"):
        _check([*hybrid, "--fp8-recipe", "blockwise"], _probe(verdict=(False, "CUDA 12.8 needed")))
    # what passes: Hopper and Ada for delayed/tensorwise, Blackwell for mxfp8; no FP8: no check
    _check(hybrid, _probe())
    _check(["--fp8-format", "e4m3", "--fp8-recipe", "tensorwise"], _probe(cap=(8, 9),
                                                                           name="NVIDIA L40S"))
    _check([*hybrid, "--fp8-recipe", "mxfp8"], _probe(cap=(10, 0), name="NVIDIA B200"))
    _check([], _probe(cuda=False, te=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_preflight_refuses_fp8_on_this_cpu_machine():
    from megatron_coe.training.trainer import preflight

    with pytest.raises(SetupError, match="--fp8-format hybrid .* no CUDA device"):
        preflight(parse_args([*SMALL, "--fp8-format", "hybrid"]), 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.timeout(120)
@pytest.mark.one_env
def test_cli_refuses_fp8_before_training(tmp_path):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_coe.train",
         *explicit([*SMALL, "--fp8-format", "hybrid", "--save", str(tmp_path / "ckpt")])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert ("coe-train: error: --fp8-format hybrid (recipe tensorwise) needs a CUDA GPU with "
            "Transformer Engine; this machine has no CUDA device") in proc.stdout
    assert "Traceback" not in proc.stdout and "training from iteration" not in proc.stdout
    assert not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------- argparse
@pytest.mark.parametrize("flags", [["--fp8-format", "e5m2"], ["--fp8-format", "fp8"],
                                   ["--fp8-recipe", "custom"]])
def test_invalid_fp8_values_rejected_by_argparse(flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(flags)
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_default_recipe_is_tensorwise_and_delayed_with_chained_passes_warns():
    args = parse_args(["--fp8-format", "hybrid", "--coe-iterations", "2"])
    assert args.fp8_recipe == "tensorwise"
    assert plan_precision(args, True).config["fp8_recipe"] == "tensorwise"
    assert precision.precision_warnings(args) == []
    delayed = parse_args(["--fp8-format", "hybrid", "--fp8-recipe", "delayed",
                          "--coe-iterations", "2"])
    assert plan_precision(delayed, True).config["fp8_recipe"] == "delayed"  # still selectable
    (line,) = precision.precision_warnings(delayed)
    assert line.startswith("warning: --fp8-recipe delayed with --coe-iterations 2: ")
    assert "unverified on hardware" in line and "\n" not in line
    # one pass (a plain MoE layer): no repeated module, no warning; no FP8: nothing
    assert precision.precision_warnings(parse_args(["--fp8-format", "hybrid", "--fp8-recipe",
                                                    "delayed", "--coe-iterations", "1"])) == []
    assert precision.precision_warnings(parse_args(["--fp8-recipe", "delayed"])) == []


def test_fp8_implies_bf16():
    assert precision.uses_bf16(parse_args(["--fp8-format", "e4m3"]))
    assert not precision.uses_bf16(parse_args([]))
