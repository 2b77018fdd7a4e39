"""Megatron-Core CoE checkpoint (or in-memory model) -> Hugging Face model directory.

Output directory::

    config.json                       model_type coe_deepseekv2 / coe_gpt (+ auto_map) or deepseek_v2
    configuration_coe.py, modeling_coe.py    (CoE formats: this project's remote code)
    model-0000i-of-0000N.safetensors, model.safetensors.index.json
    generation_config.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   (when a tokenizer is known)
    coe_export.json                   manifest: the files this export wrote (marks a previous export)

Nothing under the output directory changes until the export is complete: it is checked first
(checkpoint, tokenizer, options, the directory itself), written into a temporary sibling directory
and renamed into place; a non-empty directory that is not a previous export is refused unless
``overwrite``, and files the exporter did not write are kept (rules: ``export_dir``).

Formats (``fmt``):

* ``"coe"``: the CoE remote-code model; loads with
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; exact for every
  model this project trains;
* ``"deepseek_v2"``: stock ``transformers`` ``DeepseekV2ForCausalLM`` (no remote code), only for a
  standard MoE that it expresses (``hf_config.stock_deepseek_v2_problems``);
* ``"auto"`` (default): ``deepseek_v2`` when that is exact, else ``coe``.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from megatron_coe.arch import ModelArch
from megatron_coe.conversion import export_dir, families, hf_config, hf_io, mapping
from megatron_coe.conversion.hf_config import ConversionError

FORMATS = ("auto", "coe") + families.FAMILIES
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    path: str
    format: str
    arch: ModelArch
    num_tensors: int
    total_bytes: int
    seconds: float


def progress(iterable, total: int, desc: str, enabled: bool = True):
    """tqdm if installed (and ``enabled``), else a plain line every ~10%."""
    if not enabled:
        yield from iterable
        return
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None:
        yield from tqdm(iterable, total=total, desc=desc, unit="layer", file=sys.stderr)
        return
    step = max(1, total // 10)
    for i, item in enumerate(iterable):
        yield item
        if (i + 1) % step == 0 or i + 1 == total:
            print(f"{desc}: {i + 1}/{total}", file=sys.stderr, flush=True)


def choose_format(arch: ModelArch, fmt: str = "auto", warn: Callable[[str], None] = print,
                  family: Optional[str] = None) -> str:
    """``deepseek_v2`` (auto: when stock DeepSeek-V2 computes this model exactly) or ``coe``;
    an auto export under this project's own model type prints one line saying why. ``family``:
    the stock family the model was imported from (``families``); auto exports to it when that
    class computes the model exactly (a C=1 model), else as above."""
    if fmt not in FORMATS:
        raise ConversionError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "auto" and family in families.FAMILIES and not families.family_problems(arch, family):
        return family
    if fmt in families.FAMILIES and fmt != "deepseek_v2":
        problems = families.family_problems(arch, fmt)
        if problems:
            raise ConversionError(f"this model cannot be exported as stock {fmt} "
                                  "(use --format coe):\n  - " + "\n  - ".join(problems))
        return fmt
    problems = hf_config.stock_deepseek_v2_problems(arch)
    if fmt == "auto":
        if not problems:
            return "deepseek_v2"
        own = hf_config.published_problems(arch)
        if arch.multi_latent_attention and own:
            warn(f"note: exporting as this project's own model type {hf_config.model_type(arch)!r} "
                 f"(remote code), not 'coe_deepseekv2': {own[0]}")
        return "coe"
    if fmt == "deepseek_v2" and problems:
        raise ConversionError("this model cannot be exported as stock DeepSeek-V2 "
                              "(use --format coe):\n  - " + "\n  - ".join(problems))
    return fmt


def config_json(arch: ModelArch, fmt: str, token_ids: Optional[dict] = None,
                dtype: str = "float32") -> dict:
    """The export's ``config.json``: ``hf_config.to_hf_config`` (or the stock family's) plus
    ``architectures`` and, for the remote-code formats, ``auto_map``."""
    stock = fmt in families.FAMILIES
    cfg = (families.family_hf_config(arch, fmt, token_ids, dtype) if stock
           else hf_config.to_hf_config(arch, stock=False, token_ids=token_ids, dtype=dtype))
    if stock:
        cfg["architectures"] = [families.HF_CLASSES[fmt]]
        return cfg
    gpt = not arch.multi_latent_attention
    kind = "GPT" if gpt else ("Megatron" if cfg["model_type"] == "coe_megatron" else "")
    cfg["architectures"] = [f"Coe{kind}ForCausalLM"]
    cfg["auto_map"] = {
        "AutoConfig": f"configuration_coe.Coe{kind}Config",
        "AutoModel": f"modeling_coe.Coe{kind}Model",
        "AutoModelForCausalLM": f"modeling_coe.Coe{kind}ForCausalLM",
    }
    return cfg


def _new_names(fmt: str, tokenizer) -> list:
    """Files an export writes besides the weight shards."""
    names = ["config.json", "generation_config.json", hf_io.INDEX, export_dir.MANIFEST]
    if fmt not in families.FAMILIES:
        names += list(hf_io.TEMPLATE_FILES)
    if tokenizer is not None:
        names += list(hf_io.TOKENIZER_FILES)
    return names


def write_hf_model(save: str, arch: ModelArch, get_layer: Callable[[int], Dict[str, torch.Tensor]],
                   non_layer: Dict[str, torch.Tensor], *, fmt: str = "auto",
                   tokenizer: Optional[str] = None, dtype: str = "float32",
                   max_shard_size="5GB", show_progress: bool = True,
                   log: Callable[[str], None] = print, overwrite: bool = False,
                   source: Optional[str] = None, family: Optional[str] = None) -> ExportResult:
    """Write an HF directory from canonical Megatron tensors (``get_layer(l)``, ``non_layer``).

    Everything is checked first (format, dtype, shard size, tokenizer, the ``save`` directory:
    see ``export_dir`` for what may be replaced, and ``overwrite``); then the export is written
    into a temporary sibling of ``save`` and renamed into place, so on any error ``save`` is left
    as it was. ``dtype``: of the written weights.
    """
    t0 = time.time()
    fmt = choose_format(arch, fmt, warn=log, family=family)
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out_dtype = DTYPES[dtype]
    hf_io.parse_size(max_shard_size)
    tok = hf_io.check_tokenizer(tokenizer, arch.vocab_size) if tokenizer else None
    plan = export_dir.plan_export(save, overwrite, _new_names(fmt, tok), load=source)
    if tok is None:
        log("note: no tokenizer given (--tokenizer); the export has no tokenizer files")

    staging = export_dir.make_staging(plan)
    try:
        count, index, written = _write_files(staging, arch, get_layer, non_layer, fmt, tok, out_dtype,
                                             max_shard_size, show_progress)
        del non_layer
        export_dir.write_manifest(staging, written, {"format": fmt, "source": source})
        written.append(export_dir.MANIFEST)
        export_dir.finish_staging(plan, staging, written, log)
        export_dir.publish(plan, staging)
    except OSError as e:
        export_dir.discard(staging)
        what = "no space left on the device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ConversionError(f"writing the export of --save {save} failed: {what}"
                              f"{f' ({e.filename})' if e.filename else ''}; --save is unchanged") from None
    except BaseException:
        export_dir.discard(staging)
        raise
    return ExportResult(save, fmt, arch, count, index["metadata"]["total_size"], time.time() - t0)


def _write_files(out: str, arch: ModelArch, get_layer, non_layer, fmt: str, tok, out_dtype,
                 max_shard_size, show_progress: bool):
    """All files of the export into the (new, empty) directory ``out``; (tensors, index, names)."""
    stock = fmt in families.FAMILIES
    written = []
    token_ids = None
    if tok is not None:
        token_ids = tok.save_for_transformers(out, model_max_length=arch.max_position_embeddings)
        written += list(hf_io.TOKENIZER_FILES)
    cfg = config_json(arch, fmt, token_ids, dtype=str(out_dtype).replace("torch.", ""))
    hf_io.write_json(os.path.join(out, "config.json"), cfg)
    gen = {"_from_model_config": False, "do_sample": False}
    if token_ids:
        gen.update(eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"])
    hf_io.write_json(os.path.join(out, "generation_config.json"), gen)
    written += ["config.json", "generation_config.json"]
    if not stock:
        hf_io.copy_templates(out)
        written += list(hf_io.TEMPLATE_FILES)

    def cast(name, t):
        if name.endswith("e_score_correction_bias") or not t.is_floating_point():
            return t
        return t.to(out_dtype)

    writer = hf_io.ShardedSafetensorsWriter(out, max_shard_size)
    count = 0
    for name, t in mapping.non_layer_to_hf(arch, non_layer).items():
        writer.add(name, cast(name, t))
        count += 1
    del non_layer  # embeddings are in the writer now; keep one layer in memory from here on
    for layer_idx in progress(range(arch.num_layers), arch.num_layers, "export", show_progress):
        tensors = families.to_family_names(fmt if stock else None, mapping.layer_to_hf(
            arch, get_layer(layer_idx), layer_idx, stock=stock))
        for name, t in tensors.items():
            writer.add(name, cast(name, t))
            count += 1
    index = writer.close()
    return count, index, written + writer.files


def export_checkpoint(load: str, save: str, *, tokenizer: Optional[str] = None, fmt: str = "auto",
                      dtype: Optional[str] = None, max_shard_size="5GB", show_progress: bool = True,
                      log: Callable[[str], None] = print, overwrite: bool = False) -> ExportResult:
    """A trainer checkpoint (any TP/EP/PP) -> HF directory, one layer in memory at a time.

    ``tokenizer``: a ``tokenizer.json`` (file or directory); default: the one the training run
    used (``--tokenizer-model``, else ``<first data prefix>.tokenizer.json``) when it still exists.
    ``overwrite``: see ``write_hf_model`` / ``export_dir``.
    """
    from megatron_coe.conversion.megatron_ckpt import MegatronCheckpoint

    ckpt = MegatronCheckpoint(load)
    if tokenizer is None:
        tokenizer = tokenizer_from_meta(ckpt.meta, log)
    a = ckpt.arch
    log(f"checkpoint {ckpt.path}: {'MLA' if a.multi_latent_attention else 'MHA'} "
        f"C={a.coe_iterations} layers={a.num_layers} experts={a.num_moe_experts} "
        f"top-k={a.moe_router_topk} "
        f"(saved with layout {ckpt.meta.get('layout')})")

    def read(what, fn, *a):
        try:
            return fn(*a)
        except ConversionError:
            raise
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except BaseException as e:  # a damaged shard: DCP's CheckpointException (a BaseException), EOFError, ...
            failures = getattr(e, "failures", None)  # DCP's CheckpointException wraps the rank's error
            if failures:
                first = next(iter(failures.values()))
                e = first[0] if isinstance(first, tuple) else first
            detail = (str(e).strip().splitlines() or ["no detail"])[0]
            raise ConversionError(f"cannot read {what} from checkpoint {ckpt.path} ({type(e).__name__}: "
                                  f"{detail}): a damaged or truncated shard file? export another "
                                  "iteration or copy it again") from None

    return write_hf_model(save, a, lambda i: read(f"layer {i}", ckpt.read_layer, i),
                          read("the embeddings", ckpt.read_non_layer), fmt=fmt,
                          tokenizer=tokenizer, dtype=dtype or ckpt.dtype, max_shard_size=max_shard_size,
                          show_progress=show_progress, log=log, overwrite=overwrite,
                          source=os.path.abspath(ckpt.path),
                          family=ckpt.meta.get("source_family"))


def export_model(model, arch: ModelArch, save: str, **kwargs) -> ExportResult:
    """An in-memory TP=EP=PP=1 Megatron ``GPTModel`` -> HF directory (``write_hf_model`` kwargs;
    ``dtype`` defaults to the model's)."""
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    non_layer, layers = mapping.module_state_to_layers(state, arch)
    kwargs.setdefault("dtype", hf_config.megatron_dtype(model.config))
    return write_hf_model(save, arch, lambda i: layers[i], non_layer, **kwargs)


def tokenizer_from_meta(meta: dict, log: Callable[[str], None] = print) -> Optional[str]:
    args = meta.get("args") or {}
    if args.get("mock_data"):
        return None
    candidates = []
    if args.get("tokenizer_model"):
        candidates.append(args["tokenizer_model"])
    for prefix in args.get("data_path") or []:
        try:
            float(prefix)  # a blend weight
            continue
        except ValueError:
            candidates.append(prefix + ".tokenizer.json")
            break
    for c in candidates:
        if os.path.isfile(c) or os.path.isfile(os.path.join(c, "tokenizer.json")):
            return c
    if candidates:
        log(f"note: the run's tokenizer {candidates[0]} is not found from {os.getcwd()}; pass --tokenizer")
    return None
