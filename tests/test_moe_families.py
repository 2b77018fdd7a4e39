"""Stock Hugging Face MoE families -> Megatron (CoE) and back (``conversion/families.py``).

Each family's tiny model is built by ``transformers`` itself from the family's config class with
random weights (no downloads), saved, and imported by ``tools/convert_from_hf.py`` at EP=2:

* the Megatron model (EP=2, and TP=2 with sequence parallelism) gives the HF logits
  (fp32, max abs diff <= 1e-4);
* HF -> Megatron -> HF (auto format: the source family's stock class) is bit-identical;
* dense layers (DeepSeek's ``first_k_dense_replace``, Qwen3's ``mlp_only_layers``) stay dense;
* upcycling to CoE-2 (top-k per pass k / 2): every pass router is the source router, and 10
  training steps at EP=2 lower the loss;
* an unsupported source config is refused in one line naming the field.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch

from megatron_coe.arch import ModelArch
from megatron_coe.testing.distributed import run_distributed
from megatron_coe.testing.tools import hf_tensors, load_tool

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16
VOCAB = 128

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
           num_key_value_heads=4,  # YaRN as in DeepSeek-V2-Lite / V3 (context 16 -> 64)
           rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707,
                                rope_theta=10000.0))

FAMILIES = {
    # family: (config class, model class, config kwargs, TP=2 check)
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(COMMON, **MLA, q_lora_rank=None, n_routed_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                         topk_method="group_limited_greedy", n_group=2, topk_group=2,
                         routed_scaling_factor=1.5), True),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(COMMON, **MLA, q_lora_rank=16, n_routed_experts=8, num_experts_per_tok=4,
                         moe_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=1,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                         num_nextn_predict_layers=1), True),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=16, mlp_only_layers=[0], norm_topk_prob=True,
                       rope_theta=1e6), True),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                     intermediate_size=16), True),
}


def _hf_model(family: str, overrides=None):
    import transformers

    cfg_cls, model_cls, kw, _ = FAMILIES[family]
    config = getattr(transformers, cfg_cls)(**dict(kw, **(overrides or {})))
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial weights: norms away from 1, larger matrices, a bias
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    return model


def _causal(s: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)


def _logits_worker(rank, world, ckpt, layouts, tokens):
    """Megatron logits of checkpoint ``ckpt`` built at each ``(tp, ep)`` of ``layouts``."""
    from megatron_coe.conversion.importer import build_model, load_checkpoint_into
    from megatron_coe.conversion.megatron_ckpt import MegatronCheckpoint
    from megatron_coe.parallel import destroy_parallel

    arch = MegatronCheckpoint(ckpt).arch
    out = []
    for tp, ep in layouts:
        model, _ = build_model(arch, tp=tp, ep=ep)
        load_checkpoint_into(model, ckpt)
        model.eval()
        pos = torch.arange(SEQ)[None].expand(tokens.shape[0], -1)
        with torch.no_grad():
            out.append(model(tokens, pos, _causal(SEQ), runtime_gather_output=True))
    destroy_parallel()
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = _hf_model(family)
    model.save_pretrained(str(root / "hf"))
    if family == "deepseek_v3":  # published V3 files hold the MTP layer after the last layer
        from safetensors.torch import load_file, save_file

        path = str(root / "hf/model.safetensors")
        tensors = load_file(path)
        tensors["model.layers.2.eh_proj.weight"] = torch.ones(32, 64)
        save_file(tensors, path, metadata={"format": "pt"})
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(tokens).logits
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        rc = load_tool("convert_from_hf").main(["--load", str(root / "hf"), "--save", str(root / "ckpt"),
                                            "--expert-model-parallel-size", "2"])
    assert rc == 0, log.getvalue()
    return dict(family=family, root=root, hf=root / "hf", ckpt=root / "ckpt", tokens=tokens,
                logits=logits, model=model, log=log.getvalue())


@pytest.mark.timeout(240)
def test_megatron_logits_equal_hf_logits(imported):
    layouts = [(1, 2)] + ([(2, 1)] if FAMILIES[imported["family"]][3] else [])
    out = [run_distributed(_logits_worker, 2, ckpt=str(imported["ckpt"]), layouts=[layout],
                           tokens=imported["tokens"])[0][0] for layout in layouts]
    for (tp, ep), logits in zip(layouts, out):
        diff = (logits - imported["logits"]).abs().max().item()
        print(f"{imported['family']} TP={tp} EP={ep}: max abs logit diff {diff:.3g}")
        assert diff <= 1e-4, (imported["family"], tp, ep, diff)
    meta = json.loads((imported["ckpt"] / "iter_0000000/coe_checkpoint.json").read_text())
    assert meta["source_family"] == imported["family"]
    pattern = meta["args"]["moe_layer_freq"]
    assert pattern == ([1] if imported["family"] == "mixtral" else [0, 1]) or pattern == 1
    if imported["family"] == "deepseek_v3":
        assert "dropping 1 multi-token-prediction layer(s) (num_nextn_predict_layers=1)" in imported["log"]


@pytest.mark.timeout(120)
def test_round_trip_is_bit_identical_in_the_stock_class(imported):
    import transformers

    from megatron_coe.conversion.export import export_checkpoint

    result = export_checkpoint(str(imported["ckpt"]), str(imported["root"] / "hf2"),
                               show_progress=False, log=lambda *a: None)
    assert result.format == imported["family"]
    a, b = hf_tensors(imported["hf"]), hf_tensors(imported["root"] / "hf2")
    if imported["family"] == "deepseek_v3":  # the MTP layer is dropped on import (one line)
        assert a.pop("model.layers.2.eh_proj.weight") is not None
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    cfg = json.loads((imported["root"] / "hf2/config.json").read_text())
    assert cfg["model_type"] == imported["family"] and "auto_map" not in cfg
    back = getattr(transformers, FAMILIES[imported["family"]][1]).from_pretrained(
        str(imported["root"] / "hf2"), attn_implementation="eager").eval()
    with torch.no_grad():
        logits = back(imported["tokens"]).logits
    assert torch.equal(logits, imported["logits"])


def _train_worker(rank, world, args_dict):
    from megatron_coe.training.options import TrainArgs
    from megatron_coe.training.trainer import Trainer, preflight

    args = TrainArgs(**args_dict)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        trainer = Trainer(args, preflight(args, world))
        start = trainer.iteration
        trainer.train()
    records = [json.loads(line) for line in open(args.metrics_file)]
    return dict(start=start, losses=[r["lm_loss"] for r in records if r["type"] == "train"],
                log=log.getvalue())


def train_args(meta_args: dict, root: Path, name: str, load=None, iters: int = 10) -> dict:
    return dict(meta_args, mock_data=True, vocab_size=VOCAB, seq_length=SEQ, micro_batch_size=4,
                global_batch_size=8, train_iters=iters, lr=3e-3, lr_warmup_iters=0,
                eval_iters=0, load=load, exit_signal_handler=False, log_interval=1,
                metrics_file=str(root / f"{name}.jsonl"), hidden_dropout=0.0,
                attention_dropout=0.0, moe_token_dispatcher_type="alltoall",
                lr_decay_style="constant", num_workers=0, expert_model_parallel_size=2,
                tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                sequence_parallel=False, expert_tensor_parallel_size=None,
                make_vocab_size_divisible_by=128, seed=1234)


@pytest.mark.timeout(300)
def test_upcycle_to_coe2_routes_like_source_and_trains(imported):
    from megatron_coe.conversion.megatron_ckpt import MegatronCheckpoint

    family, root = imported["family"], imported["root"]
    extra = ["--upcycle-topk", "2"] if family == "deepseek_v3" else []  # keeps 2 per group
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_tool("convert_from_hf").main(["--load", str(imported["hf"]), "--save", str(root / "up"),
                                              "--expert-model-parallel-size", "2",
                                              "--upcycle-iterations", "2"] + extra) == 0
    ckpt = MegatronCheckpoint(str(root / "up"))
    arch = ckpt.arch
    src_topk = imported["model"].config.num_experts_per_tok
    assert arch.coe_iterations == 2 and arch.moe_router_topk == (2 if extra else src_topk // 2)
    layers = imported["model"].model.layers
    for l in range(arch.num_layers):
        got = ckpt.read_layer(l)
        if not arch.is_moe_layer(l):  # dense layers untouched: no router, the dense MLP
            assert not any(k.startswith("mlp.routers.") for k in got) and "mlp.linear_fc1.weight" in got
            continue
        hf_mlp = getattr(layers[l], "mlp", None) if family != "mixtral" else layers[l].mlp
        gate = hf_mlp.gate
        for t in range(2):  # every pass starts from the source router (pass 1 routes as it)
            assert torch.equal(got[f"mlp.routers.{t}.weight"], gate.weight.detach())
            if arch.moe_router_enable_expert_bias:
                assert torch.equal(got[f"mlp.routers.{t}.expert_bias"],
                                   gate.e_score_correction_bias.detach().float())
    if family not in ("qwen3_moe", "deepseek_v2"):
        return  # training: two families keep the suite fast (the layer code is shared)
    args = train_args(ckpt.meta["args"], root, "up", load=str(root / "up"))
    up = run_distributed(_train_worker, 2, args_dict=args)[0]
    assert up["start"] == 0, up["log"]
    losses = up["losses"]
    scratch = run_distributed(_train_worker, 2, args_dict=train_args(ckpt.meta["args"], root, "scratch"))[0]
    print(f"{family} upcycled CoE-2 losses: {[round(x, 3) for x in losses]}; "
          f"CoE-2 from scratch: {[round(x, 3) for x in scratch['losses']]}")
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("family,overrides,field", [
    ("deepseek_v3", dict(rope_interleave=False), "rope_interleave"),
    ("deepseek_v3", dict(norm_topk_prob=False), "norm_topk_prob"),
    ("deepseek_v3", dict(n_group=2, topk_group=1), "topk_group"),
    ("deepseek_v2", dict(topk_group=1), "topk_group"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=8), "sliding_window"),
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise"),
    ("mixtral", dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e6)), "rope_type"),
])
def test_unsupported_source_config_is_refused_in_one_line(family, overrides, field, tmp_path, capsys):
    _hf_model(family, overrides).save_pretrained(str(tmp_path / "hf"))
    capsys.readouterr()  # transformers' progress bar
    rc = load_tool("convert_from_hf").main(["--load", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and field in err, err
    assert not (tmp_path / "ck" / "iter_0000000").exists()


def test_bad_field_value_is_named(tmp_path, capsys):
    _hf_model("qwen3_moe").save_pretrained(str(tmp_path / "hf"))
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    cfg["num_local_experts"] = "four"
    (tmp_path / "hf/config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert load_tool("convert_from_hf").main(["--load", str(tmp_path / "hf"), "--save", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num_local_experts must be a positive integer, got 'four'" in err, err


def _upcycled_logits_worker(rank, world, ckpt, tokens):
    return _logits_worker(rank, world, ckpt, [(1, 2)], tokens)[0]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_upcycled_coe2_with_dense_layers_exports_as_coe(family, tmp_path):
    """C=2 with a dense first layer (standard attention / MLA with sigmoid routing and expert
    bias) -> this project's CoE format; its remote code gives the Megatron logits (EP=2)."""
    from transformers import AutoModelForCausalLM

    from megatron_coe.conversion.export import export_checkpoint

    _hf_model(family).save_pretrained(str(tmp_path / "hf"))
    extra = ["--upcycle-topk", "2"] if family == "deepseek_v3" else []
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_tool("convert_from_hf").main(["--load", str(tmp_path / "hf"), "--save", str(tmp_path / "up"),
                                              "--expert-model-parallel-size", "2",
                                              "--upcycle-iterations", "2"] + extra) == 0
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    megatron = run_distributed(_upcycled_logits_worker, 2, ckpt=str(tmp_path / "up"), tokens=tokens)[0]
    result = export_checkpoint(str(tmp_path / "up"), str(tmp_path / "coe"), show_progress=False,
                               log=lambda *a: None)
    assert result.format == "coe"
    cfg = json.loads((tmp_path / "coe/config.json").read_text())
    assert cfg["inner_iter"] == 2 and cfg["first_k_dense_replace"] == 1 and cfg["moe_layer_freq"] == 1
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "coe"), trust_remote_code=True).eval()
    assert not hasattr(model.model.layers[0].mlp, "gate") and hasattr(model.model.layers[1].mlp, "gate")
    with torch.no_grad():
        diff = (model(tokens).logits - megatron).abs().max().item()
    print(f"{family} upcycled CoE-2 export: max abs logit diff {diff:.3g}")
    assert diff <= 1e-4, diff


def _cli_train_worker(rank, world, argv):
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training.options import parse_args
    from megatron_coe.training.trainer import Trainer, preflight

    args = parse_args(explicit(argv))
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = Trainer(args, preflight(args, world))
        trainer.train()
    return args.moe_layer_freq


@pytest.mark.timeout(240)
def test_trainer_dense_layers_flag_trains_saves_and_exports(tmp_path):
    """``--moe-layer-freq '[0]*1+[1]*3'`` (Megatron-LM's text form): trained at EP=2 x PP=2,
    saved, reloaded at EP=2 (another layout), exported as CoE with ``first_k_dense_replace`` 1;
    the remote code gives the Megatron logits."""
    from transformers import AutoModelForCausalLM

    from megatron_coe.conversion.export import export_checkpoint

    argv = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
            "--moe-router-topk 1 --moe-router-pre-softmax --moe-ffn-hidden-size 16 --ffn-hidden-size 48 "
            "--coe-iterations 2 --swiglu --normalization RMSNorm --untie-embeddings-and-output-weights "
            f"--seq-length {SEQ} --micro-batch-size 2 --global-batch-size 4 --train-iters 2 --lr 1e-3 "
            f"--mock-data --vocab-size {VOCAB} --eval-iters 0 --log-interval 1 "
            "--expert-model-parallel-size 2 --pipeline-model-parallel-size 2 "
            f"--save {tmp_path / 'ckpt'}").split() + ["--moe-layer-freq", "[0]*1+[1]*3"]
    freq = run_distributed(_cli_train_worker, 4, argv=argv)[0]
    assert freq == [0, 1, 1, 1]
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(9))
    megatron = run_distributed(_upcycled_logits_worker, 2, ckpt=str(tmp_path / "ckpt"), tokens=tokens)[0]
    result = export_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "hf"), show_progress=False,
                               log=lambda *a: None)
    cfg = json.loads((tmp_path / "hf/config.json").read_text())
    assert result.format == "coe" and cfg["first_k_dense_replace"] == 1 and cfg["intermediate_size"] == 48
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    with torch.no_grad():
        diff = (model(tokens).logits - megatron).abs().max().item()
    assert diff <= 1e-4, diff


def test_pipeline_stage_without_coe_layers_is_refused_before_training():
    """PP=2 with ``--moe-layer-freq '[0]*2+[1]*2'``: stage 0 would hold only dense layers (no
    expert parameters, so its optimizer and checkpoint collectives differ from stage 1's and the
    first save fails). Refused in one line by the layout check, before any process group."""
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training.options import parse_args
    from megatron_coe.training.setup import SetupError, check_layout

    argv = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --num-experts 4 "
            "--moe-router-topk 2 --moe-ffn-hidden-size 16 --coe-iterations 2 --seq-length 32 "
            "--micro-batch-size 2 --train-iters 3 --lr 1e-3 --mock-data --vocab-size 64 "
            "--pipeline-model-parallel-size 2").split()
    with pytest.raises(SetupError) as e:
        check_layout(parse_args(explicit(argv + ["--moe-layer-freq", "[0]*2+[1]*2"])), 2)
    msg = str(e.value)
    assert "pipeline stage 0 (layers 1-2) has no CoE layer" in msg and "\n" not in msg
    check_layout(parse_args(explicit(argv + ["--moe-layer-freq", "[0]*1+[1]*3"])), 2)  # allowed


def test_moe_layer_freq_flag_values_are_one_line_errors():
    from megatron_coe.training.options import OptionError, coerce

    assert coerce("moe_layer_freq", "2") == 2 and coerce("moe_layer_freq", "[0,1]") == [0, 1]
    assert coerce("moe_layer_freq", [0, 1, 1]) == [0, 1, 1]
    for bad, why in (("0", ">= 1"), ("[0]*1+[3]", "0 (dense) / 1 (MoE)"), ("__import__('os')", "such as")):
        with pytest.raises(OptionError) as e:
            coerce("moe_layer_freq", bad)
        assert "--moe-layer-freq" in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def _count_worker(rank, world, arch_dict):
    from megatron_coe.conversion.importer import build_model

    model, _ = build_model(ModelArch.from_dict(arch_dict))
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_of_a_model_with_dense_layers():
    """``ModelArch.num_parameters`` counts dense layers as dense (the built model's count)."""
    arch = ModelArch(num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
                     num_moe_experts=4, moe_ffn_hidden_size=16, gated_linear_unit=True,
                     normalization="RMSNorm", moe_layer_freq=[0, 1, 0], coe_iterations=2,
                     untie_embeddings_and_output_weights=True, vocab_size=VOCAB,
                     max_position_embeddings=SEQ).resolve_defaults()
    built = run_distributed(_count_worker, 1, arch_dict=arch.to_dict())[0]
    assert arch.num_parameters()["total"] == built
