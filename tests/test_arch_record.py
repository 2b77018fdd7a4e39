"""The architecture record (``megatron_coe.arch.ModelArch``) is the one description of a model.

* its parameter count equals the built Megatron model's, for every shipped preset (tiny and
  paper-size at 1 layer) and for standard attention;
* a checkpoint's record (``coe_checkpoint.json`` ``arch``) is read back as the same record, and a
  record of an older checkpoint (``args`` only, options missing that were added since) is read
  as the model that code built;
* shape comparison (``--load`` compatibility) treats an unset size and its resolved value alike;
* ``training/`` and ``conversion/`` do not import each other (module imports, walked with ast).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from megatron_coe.arch import RECORD_KEY, ModelArch, default_of
from megatron_coe.training.options import parse_args

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "megatron_coe"
TINY = ["--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", "1", "--lr", "1e-3"]
CASES = {f"tiny/{p.stem}": ["--config", str(p)] for p in sorted((ROOT / "examples/tiny").glob("*.yaml"))}
CASES.update({
    "paper/coe2_4_64 (1 layer)": ["--config", str(ROOT / "examples/coe2_4_64.yaml"),
                                  "--num-layers", "1"],
    "mha_gqa_qk_norm": ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                        "--num-query-groups", "2", "--qk-layernorm", "--num-experts", "4",
                        "--moe-ffn-hidden-size", "8", "--normalization", "LayerNorm"],
    "mla_q_lora_shared_router": ["--config", str(ROOT / "examples/tiny/coe2_cpu.yaml"),
                                 "--q-lora-rank", "16", "--coe-shared-router",
                                 "--no-untie-embeddings-and-output-weights"],
})


def _count_worker(rank, world, cases):
    import torch

    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.training.setup import build_model_config

    install_cpu_compat()
    pg = initialize_parallel()
    out = {}
    for name, argv in cases.items():
        args = parse_args(argv + TINY)
        torch.manual_seed(0)
        config = build_model_config(args)
        model = build_coe_gpt_model(config, pg_collection=pg, vocab_size=256,
                                    max_sequence_length=64,
                                    **ModelArch.from_args(args).gpt_model_kwargs())
        out[name] = (sum(p.numel() for p in model.parameters()), config,
                     model.share_embeddings_and_output_weights)
    return out


@pytest.mark.timeout(300)
def test_parameter_count_is_the_built_models():
    from megatron_coe.testing.distributed import run_distributed

    built = run_distributed(_count_worker, 1, cases=CASES)[0]
    for name, argv in CASES.items():
        counted = ModelArch.from_args(parse_args(argv + TINY)).num_parameters(256)["total"]
        assert counted == built[name][0], (name, counted, built[name][0])


@pytest.mark.timeout(300)
def test_exporter_reads_the_record_as_the_built_model():
    """The record a checkpoint stores (``ModelArch.from_args``, read by the exporter through
    ``hf_config.check_convertible``) is the record of the model built from the same options
    (``hf_config.from_megatron_config``)."""
    from megatron_coe.conversion import hf_config
    from megatron_coe.testing.distributed import run_distributed

    built = run_distributed(_count_worker, 1, cases=CASES)[0]
    for name, argv in CASES.items():
        args = parse_args(argv + TINY)
        _, config, tied = built[name]
        want = hf_config.from_megatron_config(config, vocab_size=256,
                                             max_position_embeddings=args.max_position_embeddings
                                             or args.seq_length,
                                             rotary_base=args.rotary_base,
                                             rotary_percent=args.rotary_percent,
                                             tie_word_embeddings=tied)
        recorded = hf_config.check_convertible(ModelArch.from_args(args, 256))
        assert recorded == want, name
        assert hf_config.to_hf_config(recorded) == hf_config.to_hf_config(want), name


def test_record_round_trip_and_older_records():
    args = parse_args(["--config", str(ROOT / "examples/tiny/coe2_cpu.yaml")] + TINY)
    arch = ModelArch.from_args(args, vocab_size=1024)
    meta = {RECORD_KEY: arch.to_dict(), "args": {}, "vocab_size": 1}
    assert ModelArch.from_checkpoint_meta(meta) == arch  # the record wins over args
    # a checkpoint from before the record: args only, the options added since are missing
    old_args = {k: v for k, v in args.to_dict().items()
                if k not in ("untie_embeddings_and_output_weights", "mla_latent_norm_epsilon")}
    old_args.update(layernorm_epsilon=1e-5)
    old = ModelArch.from_checkpoint_meta({"args": old_args, "vocab_size": 1024})
    assert old.untie_embeddings_and_output_weights  # untied: build_coe_gpt_model's old default
    assert old.mla_latent_norm_epsilon == 1e-5       # Megatron's latent eps = the main eps
    assert old.max_position_embeddings == args.max_position_embeddings
    assert old.vocab_size == 1024


def test_shape_differences_resolve_unset_sizes():
    base = ModelArch(num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=8)
    resolved = base.replace(kv_channels=16, ffn_hidden_size=256, moe_ffn_hidden_size=256,
                            num_query_groups=4)
    assert base.shape_differences(resolved) == []
    mla = base.replace(multi_latent_attention=True)
    assert mla.shape_differences(mla.replace(qk_layernorm=True)) == []  # unset = on with MLA
    assert [d[:2] for d in mla.shape_differences(mla.replace(qk_layernorm=False))] == [
        ("qk_layernorm", "--qk-layernorm")]
    assert base.shape_differences(base.replace(kv_lora_rank=7)) == []  # MLA dims without MLA
    diffs = base.shape_differences(base.replace(num_moe_experts=16, moe_router_topk=4))
    assert diffs == [("num_experts", "--num-experts", 8, 16)]  # top-k changes no shape


def _imports(path: Path, text: str = None) -> set:
    """Modules ``path`` imports (absolute names; relative imports resolved), anywhere in it."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    parts = path.relative_to(ROOT).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + (
                    (base,) if base else ()))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@pytest.mark.parametrize("src,dst", [("training", "conversion"), ("conversion", "training")])
def test_training_and_conversion_do_not_import_each_other(src, dst):
    files = sorted((PKG / src).rglob("*.py"))
    assert files, src
    bad = {str(f.relative_to(ROOT)): sorted(m for m in _imports(f)
                                            if m == f"megatron_coe.{dst}"
                                            or m.startswith(f"megatron_coe.{dst}."))
           for f in files}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"megatron_coe/{src} imports megatron_coe/{dst}: {bad}"


def test_import_walk_sees_function_level_and_relative_imports():
    """The walker itself: an import inside a function and a relative import are both found."""
    found = _imports(PKG / "training" / "probe.py",
                     "def f():\n    from megatron_coe.conversion.hf_config import to_hf_config\n"
                     "from ..conversion import mapping\nimport megatron_coe.conversion.export\n")
    assert {"megatron_coe.conversion.hf_config", "megatron_coe.conversion.mapping",
            "megatron_coe.conversion.export"} <= found


@pytest.mark.parametrize("name", sorted(CASES))
def test_importer_builds_the_trainers_model_config(name):
    """An import (``hf_config.megatron_config``) builds every architecture field of the
    Megatron config exactly as the trainer does (``build_model_config``) for the same record,
    also after a round trip through ``config.json``."""
    from megatron_coe.conversion import hf_config
    from megatron_coe.training.setup import build_model_config

    args = parse_args(CASES[name] + TINY)
    arch = ModelArch.from_args(args, 256)
    trainer = build_model_config(args)
    round_trip = hf_config.from_hf_config(hf_config.to_hf_config(hf_config.check_convertible(arch)))
    for record in (arch, round_trip):
        imported = hf_config.megatron_config(record)
        assert type(imported) is type(trainer)
        differ = {k: (getattr(imported, k), getattr(trainer, k)) for k in arch.to_config_kwargs()
                  if getattr(imported, k) != getattr(trainer, k)}
        assert not differ, differ


def test_import_options_of_a_yarn_model_train_at_its_original_context():
    from megatron_coe.conversion import hf_config

    args = parse_args(["--config", str(ROOT / "examples/coe2_4_64.yaml")])
    values = hf_config.trainer_options(ModelArch.from_args(args, 102400))
    assert values["max_position_embeddings"] == 163840 and values["seq_length"] == 4096
    assert ModelArch.from_option_values(values, 102400) == ModelArch.from_args(args, 102400)


# Classes outside ``arch.py`` that may declare a field with an architecture field's name:
# requests and results that are not the model's architecture.
NOT_ARCHITECTURE = {
    ("megatron_coe/conversion/importer.py", "Upcycle"),  # what an upcycling run asks for
    ("megatron_coe/analysis/routing.py", "LayerRouting"),  # a routing measurement
    ("megatron_coe/training/options.py", "TrainArgs"),  # vocab_size: --mock-data's vocabulary
    ("megatron_coe/training/trainer.py", "Preflight"),  # the tokenizer's vocabulary, measured
}


def test_each_architecture_field_is_declared_once():
    """No class outside ``arch.py`` declares an architecture field with its own default: the
    Megatron-Core config classes take theirs from the record (``default_of``), the trainer's
    option table builds its rows from it, the Hugging Face side translates it (``hf_config``).
    Checked over every module of the package by name, including the old HF-side names."""
    from megatron_coe.config import CoEConfigMixin, CoEMLATransformerConfig

    names = {f.name for f in dataclasses.fields(ModelArch)}
    names |= {"num_experts", "topk", "inner_residual", "outer_residual", "shared_router",
              "norm_eps", "rope_theta", "head_dim", "gated", "shared_expert_size",
              "latent_norm_eps", "rope_scaling", "tie_word_embeddings"}
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel.startswith("megatron_coe/conversion/hf_template/") or rel == "megatron_coe/arch.py":
            continue  # the exported model's own code (ships without this package); the record
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef) or (rel, node.name) in NOT_ARCHITECTURE:
                continue
            for stmt in node.body:
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and stmt.target.id in names):
                    from_record = (isinstance(stmt.value, ast.Call)
                                   and getattr(stmt.value.func, "id", None) == "default_of")
                    if not from_record:
                        found.setdefault(f"{rel}:{node.name}", []).append(stmt.target.id)
    assert not found, f"architecture fields declared outside megatron_coe/arch.py: {found}"
    # and the ones that read the record do get its defaults
    for cls in (CoEConfigMixin, CoEMLATransformerConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("coe_iterations", "coe_inner_residual", "coe_outer_residual",
                          "coe_shared_router", "mla_latent_norm_epsilon"):
                assert f.default == default_of(f.name), (cls.__name__, f.name)
