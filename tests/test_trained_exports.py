"""Checkpoints the trainer writes from the shipped presets export to a model type whose code
computes the Megatron model's function (issue 12, acceptance 1 and 2).

Each case trains a few steps with the real trainer (``megatron_coe.train``'s ``Trainer``) from a
preset, exports the checkpoint with ``tools/convert_to_hf.py`` (in-process ``main``), loads the
export with the code of the model type it declares (stock ``DeepseekV2ForCausalLM`` for
``deepseek_v2``, else the export's remote code) and compares the logits with the trained Megatron
model's (fp32, max abs diff <= 1e-4):

* ``quickstart``: ``examples/tiny/coe2_cpu.yaml`` at EP=2 on 2 processes, as
  ``examples/quickstart.sh`` runs it (fewer steps, a smaller batch);
* ``paper/<preset>``: every paper preset (``examples/*.yaml``) shrunk to CPU size by flags on top
  of the YAML (1 layer, hidden 64, 16 experts or 12 for the 47-expert preset, small MLA dims);
  all declare ``coe_deepseekv2`` (YaRN has no stock DeepSeek-V2 export);
* ``legacy``: a checkpoint as the trainer wrote it before latent norms were the default
  (``--no-qk-layernorm``, RoPE, no architecture record, args without the options added since):
  it exports under this project's own ``coe_megatron`` with exactly one line saying why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # workers are forked after tokenizing

from megatron_coe.testing.data import gsm8k_subset  # noqa: E402
from megatron_coe.testing.distributed import run_distributed  # noqa: E402
from megatron_coe.testing.tools import load_tool  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEQ, TOL = 32, 1e-4
RUN = ["--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", "4",
       "--train-iters", "3", "--lr", "3e-3", "--lr-warmup-iters", "0", "--eval-iters", "0",
       "--split", "100,0,0", "--log-interval", "1", "--no-exit-signal-handler",
       "--tensorboard-dir", "", "--num-workers", "0"]
SHRINK = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "2",
          "--kv-lora-rank", "16", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
          "--v-head-dim", "16", "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "32",
          "--moe-shared-expert-intermediate-size", "32"]
PAPER = ["moe_8_64", "coe2_4_64", "coe2_4_48", "coe2_4_64_shared_router",
         "coe2_4_64_outer_residual", "megatron_moe_8_64"]
# options the trainer did not have when latent norms were off by default (f96ede2~1)
ADDED_SINCE = ("layernorm_epsilon", "mla_latent_norm_epsilon", "untie_embeddings_and_output_weights",
               "position_embedding_type", "rotary_base", "rotary_percent", "rotary_scaling_factor",
               "mscale", "mscale_all_dim", "yarn_original_max_position_embeddings",
               "yarn_beta_fast", "yarn_beta_slow", "max_position_embeddings", "num_query_groups",
               "moe_router_topk_scaling_factor", "moe_router_num_groups", "moe_router_group_topk")


def _cases():
    coe2 = ["--config", str(ROOT / "examples/tiny/coe2_cpu.yaml")]
    cases = {"quickstart": (coe2 + ["--expert-model-parallel-size", "2"], 2)}
    for name in PAPER:
        experts = "12" if name == "coe2_4_48" else "16"
        cases[f"paper/{name}"] = (["--config", str(ROOT / f"examples/{name}.yaml"), *SHRINK,
                                   "--num-experts", experts], 1)
    # the options added since at the values that code built (plain RoPE, no YaRN scale, eps 1e-5)
    cases["legacy"] = (coe2 + ["--no-qk-layernorm", "--position-embedding-type", "rope",
                               "--rotary-scaling-factor", "1", "--mscale", "1",
                               "--mscale-all-dim", "0", "--norm-epsilon", "1e-5"], 1)
    return cases


CASES = _cases()


def _train_worker(rank, world, argv, tokens):
    from megatron_coe.training.options import parse_args
    from megatron_coe.training.setup import unwrap
    from megatron_coe.training.trainer import Trainer, preflight

    args = parse_args(argv)
    trainer = Trainer(args, preflight(args, world))
    trainer.train()
    model = unwrap(trainer.model[0])
    model.eval()
    s = tokens.shape[1]
    with torch.no_grad():  # every rank takes part (expert parallelism)
        logits = model(tokens, torch.arange(s)[None].expand(tokens.shape[0], -1),
                       torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1))
    return logits if rank == 0 else None


def _reload_worker(rank, world, ckpt, tokens):
    """The checkpoint loaded into a model built by the trainer's own code at EP=1
    (``conversion.load_checkpoint_into``: any saved layout)."""
    from megatron_coe import checkpointing
    from megatron_coe.arch import ModelArch
    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.conversion.importer import load_checkpoint_into
    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.training.options import OPTIONS, TrainArgs
    from megatron_coe.training.setup import build_model_config

    install_cpu_compat()
    pg = initialize_parallel()
    meta = checkpointing.read_meta(checkpointing.find_checkpoint(ckpt))
    args = TrainArgs(**dict({k: v for k, v in meta["args"].items() if k in OPTIONS},
                            expert_model_parallel_size=1))
    model = build_coe_gpt_model(build_model_config(args), pg_collection=pg,
                                vocab_size=meta["vocab_size"], max_sequence_length=args.seq_length,
                                **ModelArch.from_args(args).gpt_model_kwargs())
    load_checkpoint_into(model, ckpt)
    model.eval()
    s = tokens.shape[1]
    with torch.no_grad():
        return model(tokens, torch.arange(s)[None].expand(tokens.shape[0], -1),
                     torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gsm8k")
    prefix = gsm8k_subset(root, num_docs=120, vocab_size=320)
    from megatron_coe.data.tokenizer import load_tokenizer

    tok = load_tokenizer(prefix + ".tokenizer.json")
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many. "
    tokens = torch.tensor([tok.tokenize(text * 4)[:SEQ]] * 2)
    return prefix, tokens


def _train(case, data, root: Path):
    prefix, tokens = data
    argv, world = CASES[case]
    ckpt = root / "ckpt"
    argv = argv + RUN + ["--data-path", prefix, "--data-cache-path", str(root / "cache"),
                         "--save", str(ckpt), "--load", str(ckpt)]
    logits = run_distributed(_train_worker, world, timeout=240, argv=argv, tokens=tokens)[0]
    return ckpt, logits


def _as_legacy(ckpt: Path) -> None:
    """Rewrite the metadata as the trainer wrote it before the architecture record existed."""
    meta_path = next(ckpt.glob("iter_*/coe_checkpoint.json"))
    meta = json.loads(meta_path.read_text())
    meta.pop("arch")
    meta["args"] = {k: v for k, v in meta["args"].items() if k not in ADDED_SINCE}
    meta_path.write_text(json.dumps(meta))


def _load_declared(path: Path):
    from transformers import AutoModelForCausalLM, DeepseekV2ForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    if cfg["model_type"] == "deepseek_v2":
        return cfg, DeepseekV2ForCausalLM.from_pretrained(str(path)).eval()
    model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()
    assert model.config.model_type == cfg["model_type"]
    return cfg, model


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_trained_checkpoint_exports_its_function(case, data, tmp_path, capsys):
    ckpt, logits = _train(case, data, tmp_path)
    if case == "legacy":
        _as_legacy(ckpt)
    if case == "quickstart":  # the EP=2 checkpoint reloads at EP=1 into the same function
        reloaded = run_distributed(_reload_worker, 1, ckpt=str(ckpt), tokens=data[1])[0]
        assert (reloaded - logits).abs().max().item() <= 1e-5
    capsys.readouterr()
    out = tmp_path / "hf"
    assert load_tool("convert_to_hf").main(["--load", str(ckpt), "--save", str(out),
                                        "--no-progress"]) == 0
    printed = capsys.readouterr().out.splitlines()
    cfg, model = _load_declared(out)
    if case == "quickstart":  # the tokenizer, loaded as the exporter's last line says
        from transformers import AutoTokenizer

        assert "AutoTokenizer.from_pretrained" in printed[-1] and "trust_remote_code=True" in \
            printed[-1], printed[-1]
        tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
        from megatron_coe.data.tokenizer import load_tokenizer

        ours = load_tokenizer(data[0] + ".tokenizer.json")
        text = "Natalia sold 48 clips in April."
        assert tok(text)["input_ids"] == ours.tokenize(text)
    notes = [line for line in printed if "own model type" in line]
    if case == "legacy":
        assert cfg["model_type"] == "coe_megatron" and not cfg["qk_layernorm"]
        assert len(notes) == 1 and "'coe_megatron'" in notes[0] and "no latent norms" in notes[0], \
            printed
    else:
        assert cfg["model_type"] == "coe_deepseekv2", (case, printed)
        assert cfg["qk_layernorm"] and cfg["latent_norm_eps"] == 1e-6 and not notes
        assert cfg["rope_scaling"]["type"] == "yarn" and cfg["rope_scaling"]["factor"] == 40
    with torch.no_grad():
        diff = (model(data[1]).logits - logits).abs().max().item()
    print(f"[{case}] {cfg['model_type']}: max abs logit diff {diff:.3g}")
    assert diff <= TOL, f"{case}: max abs logit diff {diff}"
