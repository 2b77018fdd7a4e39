"""Checkpoint keys that depend on the layer spec, and their translation: the one alias table.

The local spec (CPU training, ``tools/convert_from_hf.py``) and the Transformer Engine spec
(GPU) save some norms under different keys. A TE spec fuses a norm into the linear that reads
its output (``TELayerNormColumnParallelLinear``: the norm is that linear's
``layer_norm_weight``), and each spec renames keys with its ``sharded_state_dict_keys_map``
(the local spec saves a standard-attention layer's norms under the fused TE keys). The result,
per layer (``decoder.layers.[N.]`` + the key; MLA latent norms with ``--qk-layernorm``):

    norm                           local spec                           TE spec
    input, standard attention      self_attention.linear_qkv.layer_norm_weight (both)
    input, MLA                     input_layernorm.weight (both)
    pre-MLP, MoE/CoE layer, std    mlp.linear_fc1.layer_norm_weight     pre_mlp_layernorm.weight
    pre-MLP, MoE/CoE layer, MLA    pre_mlp_layernorm.weight (both)
    pre-MLP, dense layer, std      mlp.linear_fc1.layer_norm_weight (both)
    pre-MLP, dense layer, MLA      pre_mlp_layernorm.weight             mlp.linear_fc1.layer_norm_weight
    MLA q latent (q_lora_rank)     self_attention.q_layernorm.weight    self_attention.linear_q_up_proj.layer_norm_weight
    MLA kv latent                  self_attention.kv_layernorm.weight   self_attention.linear_kv_up_proj.layer_norm_weight

(``.bias`` alike for LayerNorm.) The table is not typed here: ``layer_norm_keys`` reads it
from Megatron-Core's own specs, ``get_gpt_layer_local_spec`` and
``get_gpt_layer_with_transformer_engine_spec`` (the latter through ``compat.te_layer_spec``
where TE is absent): which norm slot is a module and which is fused into the linear after it
(``NORM_READERS``: the module graph), and each spec's ``sharded_state_dict_keys_map``.

Uses: conversion names every tensor by its canonical (module) name (``canonical_suffix``, any
spelling in); the trainer's ``--load`` respells the model's keys as the checkpoint spells them
(``match_to_checkpoint``: the spelling recorded in the checkpoint's metadata under
``RECORD_KEY``, or for checkpoints without it, the one its keys show), so that a checkpoint of
either spec loads into a model of the other, model and optimizer state (the distributed
optimizer's keys are derived from the model's); it also takes the checkpoint's spelling of a
one-pass layer's router (``ROUTER_KEYS``).
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Optional

LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"
SPELLINGS = (LOCAL, TRANSFORMER_ENGINE)
RECORD_KEY = "checkpoint_keys"  # coe_checkpoint.json: the spelling its tensors were saved with

# Each norm of a layer (module name relative to the layer) and the linears that read its
# output, where a TE spec may fuse it (first one the spec makes a norm-fused linear).
NORM_READERS = (
    ("input_layernorm", ("self_attention.linear_qkv", "self_attention.linear_qkv_down_proj",
                         "self_attention.linear_q_down_proj",
                         "self_attention.linear_kv_down_proj")),
    ("pre_mlp_layernorm", ("mlp.linear_fc1",)),
    ("self_attention.q_layernorm", ("self_attention.linear_q_up_proj",)),
    ("self_attention.kv_layernorm", ("self_attention.linear_kv_up_proj",)),
    ("self_attention.k_layernorm", ()),
)
NORM_PARAMS = ("weight", "bias")

# Keys that differ for reasons other than the spec. Checkpoint suffix -> canonical suffix.
OTHER_ALIASES = {
    # a one-pass (C=1) layer's router is saved under Megatron-Core's MoELayer key
    "mlp.router.weight": "mlp.routers.0.weight",
    "mlp.router.expert_bias": "mlp.routers.0.expert_bias",
}

_KEY = re.compile(r"^(decoder\.layers\.)(?:(\d+)\.)?(.+)$")


# --------------------------------------------------------------------------- from the specs
def _submodule(submodules, dotted: str):
    """The class a layer spec puts at ``dotted`` (None where it has no such slot)."""
    from megatron_coe.compat.moe_specs_and_signatures import spec_submodules

    parts = dotted.split(".")
    obj = submodules
    for part in parts[:-1]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
        obj = spec_submodules(obj)
    return getattr(obj, parts[-1], None)


def _apply_keys_map(key: str, keys_map: dict) -> str:
    """A layer's ``sharded_state_dict_keys_map`` applied to one key, as Megatron-Core's
    ``TransformerLayer.sharded_state_dict`` does (the first prefix that matches)."""
    for old, new in keys_map.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _fused_norm_prefix() -> str:
    """The parameter prefix of a norm inside a norm-fused linear, from the local spec's own
    keys map (which respells its norms as TE's fused ones): ``layer_norm_``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    values = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map.values()
    prefixes = {v.rsplit(".", 1)[1] for v in values}
    if len(prefixes) != 1:
        raise RuntimeError(f"unexpected keys map in Megatron-Core's local layer spec: {values}")
    return prefixes.pop()


def _spec_norm_keys(spec, fused_cls) -> dict:
    from megatron.core.transformer.identity_op import IdentityOp

    sub = spec.submodules
    keys_map = getattr(sub, "sharded_state_dict_keys_map", None) or {}
    out = {}
    for norm, readers in NORM_READERS:
        slot = _submodule(sub, norm)
        if slot is None:
            continue
        if slot is not IdentityOp:
            base = f"{norm}."
        else:
            fused = [r for r in readers if fused_cls is not None and _submodule(sub, r) is fused_cls]
            if not fused:
                continue  # no such norm in this layer
            base = f"{fused[0]}.{_fused_norm_prefix()}"
        for p in NORM_PARAMS:
            out[f"{norm}.{p}"] = _apply_keys_map(base + p, keys_map)
    return out


@functools.lru_cache(maxsize=None)
def layer_norm_keys(spelling: str, multi_latent_attention: bool, qk_layernorm: bool,
                    moe: bool) -> dict:
    """{canonical suffix: checkpoint suffix} of a layer's norms under ``spelling``'s spec
    (``moe``: a MoE/CoE layer, else a dense layer of ``--moe-layer-freq``)."""
    from megatron_coe.compat import install_megatron_fixes

    install_megatron_fixes()
    kw = dict(num_experts=2 if moe else None, qk_layernorm=qk_layernorm,
              multi_latent_attention=multi_latent_attention)
    if spelling == LOCAL:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        return _spec_norm_keys(get_gpt_layer_local_spec(**kw), None)
    if spelling == TRANSFORMER_ENGINE:
        from megatron_coe.compat.te_layer_spec import te_layer_spec

        return _spec_norm_keys(*te_layer_spec(**kw))
    raise ValueError(f"unknown checkpoint key spelling {spelling!r}; one of {SPELLINGS}")


def _variants():
    for s in SPELLINGS:
        for mla in (False, True):
            for qk in (False, True):
                for moe in (False, True):
                    yield s, mla, qk, moe


@functools.lru_cache(maxsize=None)
def _aliases() -> dict:
    table = {}
    for variant in _variants():
        for canonical, key in layer_norm_keys(*variant).items():
            if key != canonical:
                if table.setdefault(key, canonical) != canonical:
                    raise RuntimeError(f"checkpoint key {key} names both {table[key]} and "
                                       f"{canonical} in Megatron-Core's layer specs")
    for key, canonical in OTHER_ALIASES.items():
        table.setdefault(key, canonical)
    return table


def checkpoint_aliases() -> dict:
    """{checkpoint suffix: canonical suffix} of every spelling that is not the module name."""
    return dict(_aliases())


def canonical_suffix(ckpt_suffix: str) -> str:
    """A layer tensor's canonical (module) name, whichever spec's checkpoint spelled it."""
    return _aliases().get(ckpt_suffix, ckpt_suffix)


# --------------------------------------------------------------------------- a model's keys
def _model_shape(config) -> tuple:
    from megatron_coe.arch import moe_layer_pattern

    return (bool(getattr(config, "multi_latent_attention", False)),
            bool(getattr(config, "qk_layernorm", False)),
            tuple(moe_layer_pattern(getattr(config, "moe_layer_freq", 1), config.num_layers)))


def _layer_of(key: str, pattern: tuple):
    """(prefix, suffix, moe) of a decoder-layer key (stacked ``decoder.layers.X`` or per-layer
    ``decoder.layers.N.X``, N global), else None."""
    m = _KEY.match(key)
    if not m:
        return None
    prefix, layer, suffix = m.group(1), m.group(2), m.group(3)
    if layer is None:
        return prefix, suffix, all(pattern)
    index = int(layer)
    if index >= len(pattern):
        return None
    return f"{prefix}{layer}.", suffix, pattern[index]


def respell(key: str, config, spelling: str) -> str:
    """``key`` (a model or checkpoint key of ``config``'s model, any spelling) as ``spelling``
    spells it."""
    mla, qk, pattern = _model_shape(config)
    parts = _layer_of(key, pattern)
    if parts is None:
        return key
    prefix, suffix, moe = parts
    canonical = canonical_suffix(suffix)
    target = layer_norm_keys(spelling, mla, qk, moe).get(canonical)
    if target is None or target == suffix or canonical_suffix(target) != canonical:
        return key
    return prefix + target


def spelling_of(keys: Iterable[str], config) -> Optional[str]:
    """The spelling the keys of ``config``'s model are in: the one whose keys of the norms the
    two specs spell differently are present (None: this model's specs spell them alike, or
    the keys are mixed)."""
    mla, qk, pattern = _model_shape(config)
    found = set()
    for key in keys:
        parts = _layer_of(key, pattern)
        if parts is None:
            continue
        _, suffix, moe = parts
        spelled = {s: layer_norm_keys(s, mla, qk, moe) for s in SPELLINGS}
        for s in SPELLINGS:
            other = spelled[SPELLINGS[1 - SPELLINGS.index(s)]]
            if any(v == suffix and other.get(c) != v for c, v in spelled[s].items()):
                found.add(s)
    return found.pop() if len(found) == 1 else None


def spelling_of_config(config) -> str:
    """The spelling a model built from ``config`` saves (its ``transformer_impl``)."""
    impl = getattr(config, "transformer_impl", LOCAL)
    return TRANSFORMER_ENGINE if impl == TRANSFORMER_ENGINE else LOCAL


def record(sharded_state_dict: dict, config) -> str:
    """What a checkpoint of this model records under ``RECORD_KEY``: the spelling of its keys
    (``config``'s, where the two specs spell this model's keys alike)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    keys = [getattr(v, "key", None) for v in nested_values(sharded_state_dict)]
    return spelling_of([k for k in keys if isinstance(k, str)], config) or spelling_of_config(config)


def respell_sharded(sharded_state_dict: dict, config, spelling: str) -> int:
    """Rename, in place, the model's sharded tensors to ``spelling``'s keys (number renamed).
    The distributed optimizer's keys, built from these afterwards, follow."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    renamed = 0
    for sharded in nested_values(sharded_state_dict):
        key = getattr(sharded, "key", None)
        if isinstance(key, str):
            new = respell(key, config, spelling)
            if new != key:
                sharded.key = new
                renamed += 1
    return renamed


def match_checkpoint(sharded_state_dict: dict, config, saved_keys: Iterable[str],
                     recorded: Optional[str] = None) -> Optional[str]:
    """Respell the model's keys (``respell_sharded``) as the checkpoint spells them: its
    ``recorded`` spelling (``RECORD_KEY`` of its metadata), or for a checkpoint without the
    record, the spelling its ``saved_keys`` show. Returns the spelling used (None: none
    needed)."""
    spelling = recorded if recorded in SPELLINGS else spelling_of(saved_keys, config)
    if spelling is not None:
        respell_sharded(sharded_state_dict, config, spelling)
    return spelling


# A one-pass (C=1) layer's router: Megatron-Core's MoELayer key, which this trainer saves
# (ChainOfExpertsLayer.sharded_state_dict: Megatron-LM loads it as is), and the key checkpoints
# written before that spell it with.
ROUTER_KEYS = (".mlp.router.", ".mlp.routers.0.")


def match_router_spelling(sharded_state_dict: dict, saved_keys: Iterable[str]) -> None:
    """Rename a one-pass layer's router in the model's sharded state dict to the spelling the
    checkpoint's ``saved_keys`` use (``ROUTER_KEYS``)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = list(saved_keys)
    for asked, stored in (ROUTER_KEYS, ROUTER_KEYS[::-1]):
        if any(asked in key for key in saved) or not any(stored in key for key in saved):
            continue  # the checkpoint has this spelling (or not the other): nothing to rename
        for sharded in nested_values(sharded_state_dict):
            key = getattr(sharded, "key", None)
            if isinstance(key, str) and asked in key:
                sharded.key = key.replace(asked, stored)


def match_to_checkpoint(sharded_state_dict: dict, config, path: str) -> None:
    """Collective: make the model's sharded state dict ask checkpoint ``path`` for what it holds,
    under its keys, before ``dist_checkpointing.load`` (the trainer's ``--load`` and the HF
    exporter's and importer's loads; the optimizer state built from it afterwards follows).

    * a one-pass layer's router takes the checkpoint's spelling (``match_router_spelling``);
    * norms that the local and the TE layer specs spell differently take the checkpoint's
      spelling (``match_checkpoint``);
    * a TE module's ``_extra_state`` (its FP8 scaling state) that the checkpoint lacks (saved by
      the local spec) keeps the model's own;
    * a tensor the checkpoint still lacks is refused on every rank in one line
      (``CheckpointError``, not a ``KeyError`` from inside the load)."""
    import torch
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject,
                                                          ShardedObject, ShardedTensor,
                                                          ShardedTensorFactory)
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    from megatron_coe import checkpointing

    metadata = load_sharded_metadata(path)  # tensors by key, objects by unique key
    saved = {sh.key for sh in metadata.values()}
    match_router_spelling(sharded_state_dict, saved)
    recorded = (checkpointing.read_meta_quiet(path) or {}).get(RECORD_KEY)
    match_checkpoint(sharded_state_dict, config, saved, recorded)

    def keep_own_extra_state(x):
        if (isinstance(x, ShardedObject) and x.key.endswith("_extra_state")
                and x.unique_key not in metadata):
            return LocalNonpersistentObject(x.data)
        return x

    dict_list_map_inplace(keep_own_extra_state, sharded_state_dict)
    missing = sorted({x.key for x in nested_values(sharded_state_dict)
                      if isinstance(x, (ShardedTensor, ShardedTensorFactory))
                      and x.key not in saved})
    if torch.distributed.is_initialized():
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, missing)
        missing = sorted({k for part in everyone for k in part})
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise checkpointing.CheckpointError(
            f"--load: checkpoint {path} has no tensor {missing[0]}{more}, which this model needs: "
            "it holds a different model; load a checkpoint of this model or give the "
            "checkpoint's model options.")
