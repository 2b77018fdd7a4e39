"""Hugging Face side files: safetensors shards + index, reading an HF directory, tokenizer files."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Iterable, Optional

import torch

from megatron_coe.conversion.hf_config import ConversionError
from megatron_coe.data.tokenizer import TRANSFORMERS_FILES as TOKENIZER_FILES  # the export writes them

INDEX = "model.safetensors.index.json"
TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_template")
TEMPLATE_FILES = ("configuration_coe.py", "modeling_coe.py")


def parse_size(size) -> int:
    """``"5GB"``/``"500MB"``/int bytes -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 1000000)")
    unit = (m.group(2) or "B").upper().replace("I", "")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}[unit])


class ShardedSafetensorsWriter:
    """Writes tensors into ``model-XXXXX-of-YYYYY.safetensors`` shards plus ``model.safetensors.index.json``.

    Tensors are buffered until a shard reaches ``max_shard_size`` and then written, so memory is
    one shard plus what the caller holds. Shard names get their final count at ``close()``.
    """

    def __init__(self, out_dir: str, max_shard_size="5GB"):
        self.out_dir = out_dir
        self.max_bytes = parse_size(max_shard_size)
        self.buffer: Dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list = []  # temporary file names
        self.weight_map: Dict[str, int] = {}
        self.total = 0
        os.makedirs(out_dir, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.weight_map or name in self.buffer:
            raise ConversionError(f"tensor {name} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_bytes:
            self.flush()
        # own contiguous storage: safetensors refuses views of shared storage
        self.buffer[name] = tensor.detach().to("cpu").contiguous().clone()
        self.buffer_bytes += nbytes
        self.total += nbytes

    def add_all(self, tensors: Dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self.add(name, t)

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file

        tmp = f"model-shard{len(self.shards):05d}.tmp.safetensors"
        save_file(self.buffer, os.path.join(self.out_dir, tmp), metadata={"format": "pt"})
        for name in self.buffer:
            self.weight_map[name] = len(self.shards)
        self.shards.append(tmp)
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> dict:
        self.flush()
        n = len(self.shards)
        names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, final in zip(self.shards, names):
            os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, final))
        index = {"metadata": {"total_size": self.total},
                 "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
        with open(os.path.join(self.out_dir, INDEX), "w") as f:
            json.dump(index, f, indent=2)
        self.files = names + [INDEX]
        return index


class HFWeights:
    """Lazy access to the tensors of an HF model directory (sharded or single safetensors).

    Opening reads the index and every shard's header (not the data): a damaged index or shard, a
    shard that lacks a tensor the index puts there, or a missing shard is a ``ConversionError``
    naming the file. ``shapes`` gives every tensor's shape.
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index_path = os.path.join(path, INDEX)
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index_path):
            index = _load_json(index_path, "the safetensors index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{index_path} has no \"weight_map\" of tensor name -> shard file: "
                                      "a damaged index; copy the model directory again")
            self.weight_map = dict(weight_map)
        elif os.path.isfile(single):
            self.weight_map = None
        elif any(n.endswith(".bin") for n in os.listdir(path)):
            raise ConversionError(f"{path} holds PyTorch .bin weights; only safetensors are supported "
                                  "(re-save with save_pretrained(safe_serialization=True))")
        else:
            raise ConversionError(f"{path} has no {INDEX} or model.safetensors")
        files = sorted(set(self.weight_map.values())) if self.weight_map is not None else ["model.safetensors"]
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise ConversionError(f"{path} is incomplete: missing weight shard(s) {missing}")
        self.shapes: Dict[str, tuple] = {}
        in_file: Dict[str, str] = {}
        for fname in files:
            fpath = os.path.join(path, fname)
            try:
                with safe_open(fpath, framework="pt") as f:
                    for name in f.keys():
                        self.shapes[name] = tuple(f.get_slice(name).get_shape())
                        in_file[name] = fname
            except Exception as e:  # safetensors raises SafetensorError (an Exception) on a bad header
                raise ConversionError(f"{fpath} is not a readable safetensors file ({e}): a damaged or "
                                      "truncated copy? copy it again") from None
        if self.weight_map is None:
            self.weight_map = in_file
        wrong = sorted(n for n, f in self.weight_map.items() if in_file.get(n) != f)
        if wrong:
            n = wrong[0]
            raise ConversionError(f"{index_path}: tensor {n} is not in {self.weight_map[n]}, where the index "
                                  f"puts it ({len(wrong)} such tensors): index and shards do not belong "
                                  "together; copy the model directory again")
        self.shapes = {n: self.shapes[n] for n in self.weight_map}
        self._open: Dict[str, object] = {}

    def names(self) -> Iterable[str]:
        return self.weight_map.keys()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.weight_map:
            raise ConversionError(f"{self.path}: missing tensor {name!r}")
        fname = self.weight_map[name]
        if fname not in self._open:
            self._open[fname] = safe_open(os.path.join(self.path, fname), framework="pt")
        return self._open[fname].get_tensor(name)

    def get_prefix(self, prefix: str) -> Dict[str, torch.Tensor]:
        return {n: self.get(n) for n in self.weight_map if n.startswith(prefix)}


def _load_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): "
                              f"fix or replace {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None


def read_hf_config(path: str) -> dict:
    if not os.path.isdir(path):
        raise ConversionError(f"--load {path} is not a directory: give a Hugging Face model directory "
                              "(config.json + safetensors)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{path} has no config.json: not a Hugging Face model directory")
    cfg = _load_json(cfg_path, "the model configuration")
    if not isinstance(cfg, dict):
        raise ConversionError(f"{cfg_path} holds a JSON {type(cfg).__name__}, not an object: not a model "
                              "configuration")
    return cfg


_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
_OPTIONAL_POSITIVE_INTS = ("intermediate_size", "max_position_embeddings", "num_key_value_heads",
                           "inner_iter", "head_dim", "shared_expert_intermediate_size",
                           "n_shared_experts", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                           "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")
ACTIVATIONS = ("silu", "gelu", "relu")
CONFIG_DTYPES = ("float32", "bfloat16", "float16")


def check_hf_config(cfg: dict, cfg_path: str, supported_types: Iterable[str]) -> None:
    """Types and ranges of the ``config.json`` fields the importer uses, one line naming the field.

    Unknown ``model_type`` values are left to ``hf_config.from_hf_config`` (its message lists the
    supported ones)."""
    if cfg.get("model_type") not in tuple(supported_types):
        return

    def bad(key, want):
        return ConversionError(f"{cfg_path}: {key} must be {want}, got {cfg.get(key)!r}; fix config.json "
                               "(or use the config.json the weights came with)")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    for key in _POSITIVE_INTS:
        if key not in cfg or cfg[key] is None:
            raise ConversionError(f"{cfg_path}: the field {key!r} is missing; fix config.json "
                                  "(or use the config.json the weights came with)")
    for key in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
        if cfg.get(key) is not None and not (is_int(cfg[key]) and cfg[key] >= 1):
            raise bad(key, "a positive integer")
    for key in _POSITIVE_NUMBERS:
        v = cfg.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
            raise bad(key, "a positive number")
    mla = cfg["model_type"] == "deepseek_v2" or cfg.get(
        "attention_type", "mla" if cfg["model_type"] == "coe_deepseekv2" else "mha") == "mla"
    if cfg["model_type"] != "deepseek_v2" and cfg.get("attention_type", "mla" if mla else "mha") not in ("mla", "mha"):
        raise bad("attention_type", "'mla' or 'mha'")
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if mla else ():
        if cfg.get(key) is None:
            raise ConversionError(f"{cfg_path}: multi-latent attention needs the field {key!r}, which is "
                                  "missing; fix config.json (or use the config.json the weights came with)")
    if cfg.get("hidden_act", "silu") not in ACTIVATIONS:
        raise bad("hidden_act", f"one of {list(ACTIVATIONS)}")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    if dtype is not None and str(dtype).replace("torch.", "") not in CONFIG_DTYPES:
        raise bad("dtype" if cfg.get("dtype") else "torch_dtype", f"one of {list(CONFIG_DTYPES)}")
    kv_heads = cfg.get("num_key_value_heads")
    if kv_heads is not None and cfg["num_attention_heads"] % kv_heads:
        raise ConversionError(f"{cfg_path}: num_attention_heads {cfg['num_attention_heads']} is not a multiple "
                              f"of num_key_value_heads {kv_heads}; fix config.json")
    if cfg["num_experts_per_tok"] > cfg["n_routed_experts"]:
        raise ConversionError(f"{cfg_path}: num_experts_per_tok {cfg['num_experts_per_tok']} is larger than "
                              f"n_routed_experts {cfg['n_routed_experts']}; fix config.json")


def _max_index(names: Iterable[str], pattern: str) -> Optional[int]:
    found = [int(m.group(1)) for m in map(re.compile(pattern).match, names) if m]
    return max(found) + 1 if found else None


def check_weights(path: str, cfg: dict, shapes: Dict[str, tuple], expected: Dict[str, tuple]) -> None:
    """The tensors (``shapes``: name -> shape) are the ones ``config.json`` describes (``expected``).

    A mismatch is one line naming the ``config.json`` field when it can be told from the weights
    (layers, experts, hidden size, vocabulary, passes), else the first differing tensor.
    """
    cfg_path = os.path.join(path, "config.json")
    fix = "fix config.json or use the config.json the weights came with"
    facts = []
    embed = shapes.get("model.embed_tokens.weight")
    if embed is not None and len(embed) == 2:
        facts += [("vocab_size", embed[0], "model.embed_tokens.weight rows"),
                  ("hidden_size", embed[1], "model.embed_tokens.weight columns")]
    facts.append(("num_hidden_layers", _max_index(shapes, r"model\.layers\.(\d+)\."), "layers"))
    facts.append(("n_routed_experts", _max_index(shapes, r"model\.layers\.0\.mlp\.experts\.(\d+)\."),
                  "experts in layer 0"))
    if cfg.get("model_type") != "deepseek_v2":
        facts.append(("inner_iter", _max_index(shapes, r"model\.layers\.0\.mlp\.gate\.(\d+)\.weight$"),
                      "routers (one per pass) in layer 0"))
    for key, have, what in facts:
        want = cfg.get(key, 1 if key == "inner_iter" else None)
        if key == "inner_iter" and not cfg.get("use_igate", True):
            continue  # one shared router
        if have is not None and want != have:
            raise ConversionError(f"{cfg_path}: {key} is {want} but the weights in {path} have {have} "
                                  f"({what}); {fix}")
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        first = (f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}")
        raise ConversionError(f"{path}: the weights do not match config.json ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected; first: {first}); {fix}")
    for name in sorted(expected):
        if tuple(shapes[name]) != tuple(expected[name]):
            raise ConversionError(f"{path}: tensor {name} has shape {list(shapes[name])} but config.json "
                                  f"implies {list(expected[name])}; {fix}")


def copy_templates(out_dir: str) -> None:
    for name in TEMPLATE_FILES:
        shutil.copyfile(os.path.join(TEMPLATE_DIR, name), os.path.join(out_dir, name))


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# --------------------------------------------------------------------------- tokenizer
def check_tokenizer(tokenizer_path: str, vocab_size: Optional[int] = None):
    """Load the tokenizer to export (``CoETokenizer``) and check it fits the model's vocabulary."""
    from megatron_coe.data.tokenizer import TokenizerError, load_tokenizer

    try:
        tok = load_tokenizer(tokenizer_path)
    except TokenizerError as e:
        raise ConversionError(f"--tokenizer: {e}") from None
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ConversionError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary "
                              f"has {vocab_size}: pass the tokenizer the model was trained with (--tokenizer)")
    return tok


