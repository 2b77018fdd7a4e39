"""Hugging Face side files: safetensors shards + index, reading an HF directory, tokenizer files."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Dict, Iterable, Optional

import torch

from megatron_coe.conversion.spec import ConversionError

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
    """Lazy access to the tensors of an HF model directory (sharded or single safetensors)."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX)
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                self.weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        elif any(n.endswith(".bin") for n in os.listdir(path)):
            raise ConversionError(f"{path} holds PyTorch .bin weights; only safetensors are supported "
                                  "(re-save with save_pretrained(safe_serialization=True))")
        else:
            raise ConversionError(f"{path} has no {INDEX} or model.safetensors")
        missing = sorted({f for f in self.weight_map.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise ConversionError(f"{path} is incomplete: missing weight shard(s) {missing}")
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


def read_hf_config(path: str) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{path} has no config.json: not a Hugging Face model directory")
    with open(cfg_path) as f:
        return json.load(f)


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_tokenizer(out_dir: str, tok, model_max_length: Optional[int] = None) -> dict:
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ special tokens) of a ``check_tokenizer``
    result for ``AutoTokenizer``. Returns the special token ids ({"eos": .., "pad": .., "bos": None})
    for ``config.json``.
    """
    tok.hf_tokenizer.save(os.path.join(out_dir, "tokenizer.json"), pretty=True)
    special = {"eos_token": tok.eod_token}
    if tok.pad_token is not None:
        special["pad_token"] = tok.pad_token
    config = dict(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                  add_bos_token=False, add_eos_token=False, **special)
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    write_json(os.path.join(out_dir, "tokenizer_config.json"), config)
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    return {"eos": tok.eod, "pad": tok._pad, "bos": None}
