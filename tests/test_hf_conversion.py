"""Megatron-Core <-> Hugging Face conversion (``megatron_coe/conversion``, ``tools/convert_*_hf.py``).

* A tiny CoE-2 (standard attention and MLA) is trained a few steps on GSM8K by the real trainer at
  EP=2 x TP=2 (4 gloo processes, sequence parallel) and saved; the export of that checkpoint, loaded
  with ``AutoModelForCausalLM(trust_remote_code=True)`` and ``AutoTokenizer``, gives the Megatron
  model's logits (fp32, max abs diff < 1e-4) and the same greedy tokens (with and without KV cache).
* HF -> Megatron (EP=2) -> HF gives bit-identical tensors and the same config.
* A standard MoE (C=1, MLA, inner residual off, outer on) exports as stock ``deepseek_v2`` and
  loads in ``transformers``' own ``DeepseekV2ForCausalLM`` (no remote code) with matching logits.
* Upcycling that MoE into CoE-2 (k per pass = k / 2): pass 1 routes like the source router, and the
  trainer trains the upcycled checkpoint (the loss falls).
* Clear errors: config / checkpoint mismatch, missing shards, unsupported architectures.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after tokenizing
import torch.nn.functional as F

from megatron_coe.conversion.hf_config import ConversionError
from megatron_coe.testing.configs import tiny_config
from megatron_coe.testing.distributed import run_distributed
from megatron_coe.testing.tools import hf_tensors, load_tool

from megatron_coe.testing.data import gsm8k_subset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
TRAIN = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --num-experts 8 --moe-router-topk 2 "
         "--moe-ffn-hidden-size 16 --moe-shared-expert-intermediate-size 16 --coe-iterations 2 --swiglu "
         f"--seq-length {SEQ} --micro-batch-size 2 --global-batch-size 4 --train-iters 4 --lr 1e-2 "
         "--split 95,5,0 --eval-iters 0 --log-interval 1 --no-exit-signal-handler "
         "--make-vocab-size-divisible-by 128 --moe-router-pre-softmax --moe-aux-loss-coeff 1e-2 "
         "--tensor-model-parallel-size 2 --expert-model-parallel-size 2 --sequence-parallel "
         # set explicitly (Megatron-LM's defaults differ: LayerNorm, tied embeddings, dropout 0.1)
         "--normalization RMSNorm --untie-embeddings-and-output-weights --hidden-dropout 0 "
         "--attention-dropout 0 --moe-token-dispatcher-type alltoall").split()
MLA = ("--multi-latent-attention --q-lora-rank 16 --kv-lora-rank 16 --qk-head-dim 8 "
       "--qk-pos-emb-head-dim 4 --v-head-dim 8 --qk-layernorm").split()
PROMPT = "Natalia sold 48 clips"
NEW_TOKENS = 8


def _causal(s: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)


def _megatron_logits(model, tokens):
    s = tokens.shape[1]
    pos = torch.arange(s)[None].expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, pos, _causal(s), runtime_gather_output=True)


def _megatron_greedy(model, prompt, n_new: int, multiple: int):
    """Greedy decoding by full forwards of a fixed-length buffer (a multiple of TP for sequence
    parallelism; causal attention and token-choice routing make the padding irrelevant)."""
    p = prompt.shape[1]
    buf = torch.zeros(1, -(-(p + n_new) // multiple) * multiple, dtype=torch.long)
    buf[0, :p] = prompt[0]
    for cur in range(p, p + n_new):
        buf[0, cur] = _megatron_logits(model, buf)[0, cur - 1].argmax()
    return buf[0, : p + n_new]


def _perturb(model, seed: int = 0) -> None:
    """Non-trivial weights: norms away from 1, all matrices rescaled elementwise, expert biases set."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(1 + 2.0 * torch.rand(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.01 * torch.randn(b.shape, generator=g))


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def gsm8k(tmp_path_factory) -> dict:
    """300 GSM8K problems -> a 320-token BPE (padded vocabulary 384) and an indexed dataset."""
    from megatron_coe.data.tokenizer import load_tokenizer

    prefix = gsm8k_subset(tmp_path_factory.mktemp("gsm8k"), num_docs=300, vocab_size=320)
    tok = load_tokenizer(prefix + ".tokenizer.json")
    return {"prefix": prefix, "tokenizer": tok, "vocab": 384}


def _train_worker(rank, world, argv, tokens, prompt):
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training.options import parse_args
    from megatron_coe.training.setup import unwrap
    from megatron_coe.training.trainer import Trainer, preflight

    args = parse_args(explicit(argv))  # + the values this test was written with
    trainer = Trainer(args, preflight(args, world))
    trainer.train()
    model = unwrap(trainer.model[0])
    model.eval()
    logits = _megatron_logits(model, tokens)
    greedy = _megatron_greedy(model, prompt, NEW_TOKENS, args.tensor_model_parallel_size)
    return (logits, greedy) if rank == 0 else None


@pytest.fixture(scope="module", params=["mha", "mla"])
def trained(request, gsm8k, tmp_path_factory) -> dict:
    """The trainer's EP=2 x TP=2 checkpoint + the Megatron model's logits and greedy tokens."""
    root = tmp_path_factory.mktemp(f"trained_{request.param}")
    argv = TRAIN + ["--data-path", gsm8k["prefix"], "--save", str(root / "ckpt"),
                    "--data-cache-path", str(root / "cache")]
    if request.param == "mla":
        argv += MLA
    tok = gsm8k["tokenizer"]
    text = PROMPT + " 24 clips in May. How many clips did Natalia sell altogether in April and May?"
    tokens = torch.tensor([tok.tokenize(text * 4)[:SEQ]] * 2)
    tokens[1] = tokens[1].roll(3)
    prompt = torch.tensor([tok.tokenize(PROMPT)])
    assert prompt.shape[1] + NEW_TOKENS <= SEQ
    logits, greedy = run_distributed(_train_worker, 4, argv=argv, tokens=tokens, prompt=prompt)[0]
    return dict(kind=request.param, root=root, ckpt=root / "ckpt", tokens=tokens, prompt=prompt,
                logits=logits, greedy=greedy)


@pytest.fixture(scope="module")
def exported(trained) -> dict:
    """The trained checkpoint exported through the CLI (tokenizer found from the run's data path)."""
    out = trained["root"] / "hf"
    assert load_tool("convert_to_hf").main(["--load", str(trained["ckpt"]), "--save", str(out),
                                        "--no-progress"]) == 0
    return dict(trained, hf=out)


# --------------------------------------------------------------------------- (1) export
def test_export_matches_megatron_logits_and_greedy(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    hf = exported["hf"]
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == ("coe_deepseekv2" if exported["kind"] == "mla" else "coe_gpt")
    assert cfg["inner_iter"] == 2 and cfg["inner_residual"] and not cfg["outer_residual"]
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    assert {"model.layers.1.mlp.gate.0.weight", "model.layers.1.mlp.gate.1.weight",
            "model.layers.0.mlp.experts.7.gate_proj.weight", "model.layers.0.mlp.experts.7.up_proj.weight",
            "model.layers.0.mlp.shared_experts.down_proj.weight", "model.embed_tokens.weight",
            "lm_head.weight", "model.norm.weight"} <= names
    if exported["kind"] == "mla":
        assert {"model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.q_a_layernorm.weight",
                "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                "model.layers.0.self_attn.kv_b_proj.weight"} <= names
    else:
        assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                "model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.o_proj.weight"} <= names

    model = AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(exported["tokens"]).logits
    diff = (logits - exported["logits"]).abs().max().item()
    print(f"[{exported['kind']}] max abs logit diff HF vs Megatron (EP=2 x TP=2): {diff:.3g}")
    assert diff < 1e-4, f"max abs logit diff {diff}"

    tok = AutoTokenizer.from_pretrained(str(hf))
    assert isinstance(tok, PreTrainedTokenizerFast)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, exported["prompt"])
    want = exported["greedy"].tolist()
    for use_cache in (True, False):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, use_cache=use_cache)[0].tolist()
        # generate() stops at the end-of-document token; Megatron's greedy loop does not
        assert out == want[: len(out)], f"use_cache={use_cache}: {out} != {want}"
        assert len(out) == len(want) or out[-1] == tok.eos_token_id
        print(f"[{exported['kind']}] greedy (use_cache={use_cache}): {out}")
    assert tok.decode(out).startswith(PROMPT)


# --------------------------------------------------------------------------- (2) round trip
def test_round_trip_hf_megatron_hf_is_bit_identical(exported):
    """HF -> Megatron saved from EP=2 (MLA: EP=2 x PP=2) -> HF."""
    hf, root = exported["hf"], exported["root"]
    pp = 2 if exported["kind"] == "mla" else 1
    assert load_tool("convert_from_hf").main(["--load", str(hf), "--save", str(root / "back"),
                                          "--expert-model-parallel-size", "2",
                                          "--pipeline-model-parallel-size", str(pp)]) == 0
    meta = json.loads((root / "back/iter_0000000/coe_checkpoint.json").read_text())
    assert (meta["layout"]["ep"], meta["layout"]["pp"]) == (2, pp) and meta["weights_only"]
    trained_meta = json.loads(next(Path(exported["ckpt"]).glob("iter_*/coe_checkpoint.json")).read_text())
    assert meta["arch"] == trained_meta["arch"]  # the same architecture record as the trainer's
    from megatron_coe.conversion.export import export_checkpoint

    export_checkpoint(str(root / "back"), str(root / "hf2"), tokenizer=str(hf), show_progress=False)
    a, b = hf_tensors(hf), hf_tensors(root / "hf2")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert json.loads((hf / "config.json").read_text()) == json.loads((root / "hf2/config.json").read_text())


# --------------------------------------------------------------------------- (3) stock DeepSeek-V2
def _moe_worker(rank, world, save, vocab, tokens):
    from megatron_coe.conversion.importer import build_model, save_model_checkpoint
    from megatron_coe.conversion import hf_config

    config = tiny_config(mla=True, coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True,
                         moe_router_pre_softmax=True, qk_layernorm=True, gated_linear_unit=True,
                         activation_func=F.silu, moe_shared_expert_intermediate_size=64,
                         moe_router_topk=2, layernorm_epsilon=1e-6)
    arch = hf_config.from_megatron_config(config, vocab_size=vocab, max_position_embeddings=SEQ)
    model, _ = build_model(arch)
    _perturb(model)
    save_model_checkpoint(model, arch, save, dict(world_size=1, tp=1, pp=1, ep=1, dp=1,
                                                  num_microbatches=None), {})
    model.eval()
    return _megatron_logits(model, tokens), arch


@pytest.fixture(scope="module")
def stock_moe(gsm8k, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("stock")
    tokens = torch.randint(0, gsm8k["vocab"], (2, SEQ), generator=torch.Generator().manual_seed(7))
    logits, arch = run_distributed(_moe_worker, 1, save=str(root / "ckpt"), vocab=gsm8k["vocab"],
                                   tokens=tokens)[0]
    from megatron_coe.conversion.export import export_checkpoint

    result = export_checkpoint(str(root / "ckpt"), str(root / "hf"), show_progress=False,
                               tokenizer=gsm8k["prefix"] + ".tokenizer.json")
    return dict(root=root, hf=root / "hf", tokens=tokens, logits=logits, arch=arch, format=result.format)


def test_standard_moe_exports_to_stock_deepseek_v2(stock_moe):
    from transformers import AutoModelForCausalLM, DeepseekV2ForCausalLM

    assert stock_moe["format"] == "deepseek_v2"
    hf = stock_moe["hf"]
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v2" and "auto_map" not in cfg
    assert not (hf / "modeling_coe.py").exists()
    model, info = DeepseekV2ForCausalLM.from_pretrained(str(hf), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    model.eval()
    with torch.no_grad():
        logits = model(stock_moe["tokens"]).logits
    diff = (logits - stock_moe["logits"]).abs().max().item()
    print(f"stock DeepseekV2ForCausalLM max abs logit diff: {diff:.3g}")
    assert diff < 1e-4, f"max abs logit diff {diff}"
    assert isinstance(AutoModelForCausalLM.from_pretrained(str(hf)), DeepseekV2ForCausalLM)


# --------------------------------------------------------------------------- (4) upcycling
def _upcycled_worker(rank, world, args_dict, tokens):
    import contextlib
    import io

    from megatron_coe.training.options import TrainArgs
    from megatron_coe.training.setup import unwrap
    from megatron_coe.training.trainer import Trainer, preflight

    args = TrainArgs(**args_dict)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        trainer = Trainer(args, preflight(args, world))
    start = (trainer.iteration, trainer.consumed)
    model = unwrap(trainer.model[0])
    mlp = model.decoder.layers[0].mlp
    seen = {}
    hook = mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x0", a[0].detach().clone()))
    model.eval()
    _megatron_logits(model, tokens)
    hook.remove()
    with torch.no_grad():
        probs, routing_map = mlp.routers[0](seen["x0"])
    routers = [r.weight.detach().clone() for r in mlp.routers]
    model.train()
    trainer.train()
    records = [json.loads(line) for line in open(args.metrics_file)]
    losses = [r["lm_loss"] for r in records if r["type"] == "train"]
    return dict(x0=seen["x0"], probs=probs, routing_map=routing_map, routers=routers, losses=losses,
                topk=model.config.moe_router_topk, start=start, log=log.getvalue())


def test_upcycled_coe_routes_like_source_and_trains(stock_moe, gsm8k):
    from transformers import DeepseekV2ForCausalLM

    root = stock_moe["root"]
    assert load_tool("convert_from_hf").main(["--load", str(stock_moe["hf"]), "--save", str(root / "up"),
                                          "--expert-model-parallel-size", "2",
                                          "--upcycle-iterations", "2"]) == 0
    meta = json.loads((root / "up/iter_0000000/coe_checkpoint.json").read_text())
    assert meta["args"]["coe_iterations"] == 2 and meta["args"]["moe_router_topk"] == 1  # k/C = 2/2
    assert meta["weights_only"]
    from megatron_coe.arch import ModelArch

    assert "model_config" not in meta  # the one record, nothing beside it
    assert ModelArch.from_dict(meta["arch"]) == stock_moe["arch"].replace(
        coe_iterations=2, moe_router_topk=1, coe_inner_residual=True, coe_outer_residual=True)
    # weights-only checkpoint: --load alone (no --no-load-optim) takes the weights, starts at 0
    args = dict(meta["args"], data_path=[gsm8k["prefix"]], data_cache_path=str(root / "cache"),
                seq_length=SEQ, micro_batch_size=4, global_batch_size=8, train_iters=8, lr=1e-2,
                lr_warmup_iters=0, split="95,5,0", eval_iters=0, load=str(root / "up"),
                exit_signal_handler=False, log_interval=1, metrics_file=str(root / "metrics.jsonl"),
                # the values this test was written with (the trainer's defaults are Megatron-LM's)
                hidden_dropout=0.0, attention_dropout=0.0, moe_token_dispatcher_type="alltoall",
                lr_decay_style="cosine", num_workers=0)
    assert "no_load_optim" not in args or not args["no_load_optim"]
    out = run_distributed(_upcycled_worker, 2, args_dict=args, tokens=stock_moe["tokens"])[0]
    assert out["topk"] == 1
    assert out["start"] == (0, 0), out["log"]
    assert "holds model weights only" in out["log"] and "layout changed" not in out["log"], out["log"]

    source = DeepseekV2ForCausalLM.from_pretrained(str(stock_moe["hf"])).eval()
    gate = source.model.layers[0].mlp.gate
    for w in out["routers"]:  # every pass starts from the MoE router
        assert torch.equal(w, gate.weight.detach())
    # Pass 1 on x0 routes like the source router: its expert is the source's best, same weight.
    x0 = out["x0"].reshape(-1, out["x0"].shape[-1])
    with torch.no_grad():
        _, weights, indices = gate(x0)
    best = weights.argmax(-1, keepdim=True)
    assert torch.equal(out["routing_map"].float().argmax(-1), indices.gather(-1, best)[:, 0])
    torch.testing.assert_close(out["probs"].max(-1).values, weights.gather(-1, best)[:, 0],
                               rtol=1e-5, atol=1e-6)

    losses = out["losses"]
    print(f"upcycled CoE-2 losses: {[round(x, 3) for x in losses]}")
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


# --------------------------------------------------------------------------- errors
def _copy_checkpoint(trained, dst: Path) -> Path:
    src = Path(trained["ckpt"])
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_config_mismatch_is_refused(trained, tmp_path):
    """The recorded architecture (``arch``) is used; checkpoints without it fall back to
    ``args``; each is checked against the stored tensors. (Older imports' ``model_config``:
    ``test_legacy_import_model_config_reads_as_the_record``.)"""
    from megatron_coe.conversion.export import export_checkpoint
    from megatron_coe.conversion.megatron_ckpt import arch_from_meta

    ckpt = _copy_checkpoint(trained, tmp_path / "ckpt")
    meta_path = next(ckpt.glob("iter_*/coe_checkpoint.json"))
    meta = json.loads(meta_path.read_text())
    assert "model_config" not in meta  # the trainer writes only the one record
    legacy = {k: v for k, v in meta.items() if k != "arch"}  # older trainer checkpoints
    assert arch_from_meta(legacy) == arch_from_meta(meta)
    assert arch_from_meta(meta).num_moe_experts == 8
    refused = r"does not match its recorded configuration(.|\n)*mlp\.experts\.experts\.linear_fc1\.weight"
    for bad in (dict(meta, arch=dict(meta["arch"], num_moe_experts=16)),
                dict(legacy, args=dict(legacy["args"], num_experts=16))):
        meta_path.write_text(json.dumps(bad))
        with pytest.raises(ConversionError, match=refused):
            export_checkpoint(str(ckpt), str(tmp_path / "hf"), show_progress=False)


def test_legacy_import_model_config_reads_as_the_record():
    """Imports written before the one record stored ``model_config`` (the old HF-side field
    names); it reads back as the record it was written from, and a re-export would claim the
    same model type."""
    from megatron_coe.arch import ModelArch
    from megatron_coe.conversion import hf_config
    from megatron_coe.conversion.megatron_ckpt import arch_from_meta

    cases = json.loads((ROOT / "tests/data/legacy_import_model_config.json").read_text())
    for name in ("mla_yarn", "gpt_gqa"):
        want = ModelArch.from_dict(cases[name]["arch"])
        got = arch_from_meta(dict(vocab_size=want.vocab_size,
                                  model_config=cases[name]["model_config"]))
        assert got == want.normalized(), name
        assert hf_config.to_hf_config(got) == hf_config.to_hf_config(want), name
    old = dict(cases["gpt_gqa"]["model_config"], activation="relu")
    with pytest.raises(ConversionError, match="import it again"):
        arch_from_meta(dict(vocab_size=300, model_config=old))


def test_missing_shard_is_refused(trained, tmp_path):
    from megatron_coe.conversion.export import export_checkpoint

    ckpt = _copy_checkpoint(trained, tmp_path / "ckpt")
    shard = sorted(ckpt.glob("iter_*/*.distcp"))[-1]
    shard.unlink()
    with pytest.raises(ConversionError, match=f"{shard.name} is missing"):
        export_checkpoint(str(ckpt), str(tmp_path / "hf"), show_progress=False)
    with pytest.raises(ConversionError, match="no published checkpoint"):
        export_checkpoint(str(tmp_path), str(tmp_path / "hf"), show_progress=False)


def test_unsupported_and_mismatched_hf_models_are_refused(exported, stock_moe, tmp_path):
    from megatron_coe.conversion.export import export_checkpoint
    from megatron_coe.conversion.importer import HFSource, Upcycle

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    with pytest.raises(ConversionError, match="unsupported Hugging Face model_type 'llama'"):
        HFSource(str(llama))
    # weights that do not match config.json
    broken = tmp_path / "broken"
    shutil.copytree(exported["hf"], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.gate.1.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"1 missing(.|\n)*model\.layers\.1\.mlp\.gate\.1\.weight"):
        HFSource(str(broken))
    # upcycling: only from C=1, and k_moe / C must be an integer unless top-k is given
    with pytest.raises(ConversionError, match="standard MoE"):
        HFSource(str(exported["hf"]), Upcycle(iterations=2))
    with pytest.raises(ConversionError, match="not an integer"):
        HFSource(str(stock_moe["hf"]), Upcycle(iterations=3))
    assert HFSource(str(stock_moe["hf"]), Upcycle(iterations=3, topk=2)).arch.moe_router_topk == 2
    # a tokenizer larger than the model's vocabulary
    from tokenizers import Tokenizer, models

    big = tmp_path / "big_tokenizer.json"
    vocab = {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(500)}}
    Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")).save(str(big))
    with pytest.raises(ConversionError, match="tokens but the model's vocabulary has 384"):
        export_checkpoint(str(exported["ckpt"]), str(tmp_path / "hf"), tokenizer=str(big), show_progress=False)
    # a CoE-2 model has no stock DeepSeek-V2 form
    with pytest.raises(ConversionError, match="cannot be exported as stock DeepSeek-V2"):
        export_checkpoint(str(exported["ckpt"]), str(tmp_path / "hf"), fmt="deepseek_v2",
                          show_progress=False)
