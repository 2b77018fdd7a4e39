"""Tensor mapping between Megatron-Core CoE models and Hugging Face weights, one layer at a time.

Megatron side, "canonical" names: the module names of a TP=EP=PP=1 model relative to
``decoder.layers.N.`` (global expert index ``E``, global tensors)::

    input_layernorm.weight                       pre_mlp_layernorm.weight
    self_attention.linear_qkv.weight             (standard attention; QKV interleaved per query group)
    self_attention.{q,k}_layernorm.weight        (qk_layernorm; MLA: q_layernorm / kv_layernorm latents)
    self_attention.linear_q_proj.weight | linear_q_down_proj / linear_q_up_proj      (MLA)
    self_attention.linear_kv_down_proj.weight, linear_kv_up_proj.weight              (MLA)
    self_attention.linear_proj.weight
    mlp.routers.T.weight [, mlp.routers.T.expert_bias]
    mlp.experts.local_experts.E.linear_fc1.weight   ([gate; up] along dim 0 when gated)
    mlp.experts.local_experts.E.linear_fc2.weight
    mlp.shared_experts.linear_fc1.weight, linear_fc2.weight

plus ``embedding.word_embeddings.weight``, ``decoder.final_layernorm.weight``, ``output_layer.weight``.

Hugging Face side: DeepSeek-V2 names under ``model.layers.N.`` (see ``hf_template/modeling_coe.py``).
Every function here is a pure tensor reshuffle (no arithmetic), so a round trip is bit-exact.
"""

from __future__ import annotations

import re
from typing import Dict

import torch

from megatron_coe.arch import ModelArch
from megatron_coe.conversion.hf_config import ConversionError
from megatron_coe.models import checkpoint_keys

Tensor = torch.Tensor

# Some norms are saved under the key of the TE linear they are fused into, or under the key the
# layer spec's ``sharded_state_dict_keys_map`` gives them; a C=1 router under Megatron-Core's
# MoELayer key. The one table of those spellings (read from Megatron-Core's local and TE layer
# specs, shared with the trainer's --load) is ``models.checkpoint_keys``: checkpoint suffix ->
# canonical suffix is ``canonical_suffix`` / ``checkpoint_keys.checkpoint_aliases()``.
# Routed experts are saved stacked over a global-expert axis (SequentialMLP and TEGroupedMLP alike).
STACKED_EXPERT_PREFIX = "mlp.experts.experts."
EXPERT_PREFIX = "mlp.experts.local_experts."
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")

NON_LAYER = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "decoder.final_layernorm.bias": "model.norm.bias",
    "output_layer.weight": "lm_head.weight",
}


def canonical_suffix(ckpt_suffix: str) -> str:
    """A layer tensor's canonical name, whichever layer spec's checkpoint spelled it."""
    return checkpoint_keys.canonical_suffix(ckpt_suffix)


def split_stacked_experts(suffix: str, tensor: Tensor) -> Dict[str, Tensor]:
    """``mlp.experts.experts.linear_fc1.weight [E, ...]`` -> per-expert canonical names."""
    rest = suffix[len(STACKED_EXPERT_PREFIX):]
    return {f"{EXPERT_PREFIX}{e}.{rest}": tensor[e] for e in range(tensor.shape[0])}


# --------------------------------------------------------------------------- helpers
def _norm_names(arch: ModelArch) -> tuple:
    return ("weight", "bias") if arch.normalization == "LayerNorm" else ("weight",)


def _take(sd: Dict[str, Tensor], name: str, where: str) -> Tensor:
    try:
        return sd.pop(name)
    except KeyError:
        raise ConversionError(f"missing tensor {name!r} ({where})") from None


def _gate_name(arch: ModelArch, t: int, stock: bool) -> str:
    return "mlp.gate" if (stock or arch.coe_shared_router) else f"mlp.gate.{t}"


def _split_qkv(arch: ModelArch, qkv: Tensor):
    ng, d = arch.resolved("num_query_groups"), arch.resolved("kv_channels")
    npg = arch.num_attention_heads // ng
    w = qkv.reshape(ng, (npg + 2) * d, -1)
    q = w[:, : npg * d].reshape(ng * npg * d, -1)
    k = w[:, npg * d: (npg + 1) * d].reshape(ng * d, -1)
    v = w[:, (npg + 1) * d:].reshape(ng * d, -1)
    return q, k, v


def _merge_qkv(arch: ModelArch, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    ng, d = arch.resolved("num_query_groups"), arch.resolved("kv_channels")
    npg = arch.num_attention_heads // ng
    h = q.shape[-1]
    w = torch.cat([q.reshape(ng, npg * d, h), k.reshape(ng, d, h), v.reshape(ng, d, h)], dim=1)
    return w.reshape(-1, h)


def _mlp_to_hf(arch, fc1: Tensor, fc2: Tensor, prefix: str) -> Dict[str, Tensor]:
    if arch.gated_linear_unit:
        gate, up = torch.chunk(fc1, 2, dim=0)
        return {f"{prefix}.gate_proj.weight": gate, f"{prefix}.up_proj.weight": up,
                f"{prefix}.down_proj.weight": fc2}
    return {f"{prefix}.up_proj.weight": fc1, f"{prefix}.down_proj.weight": fc2}


def _mlp_from_hf(arch, sd, prefix: str, where: str):
    if arch.gated_linear_unit:
        fc1 = torch.cat([_take(sd, f"{prefix}.gate_proj.weight", where),
                         _take(sd, f"{prefix}.up_proj.weight", where)], dim=0)
    else:
        fc1 = _take(sd, f"{prefix}.up_proj.weight", where)
    return fc1, _take(sd, f"{prefix}.down_proj.weight", where)


# --------------------------------------------------------------------------- the name table
def _renamed(arch: ModelArch, stock: bool, moe: bool = True) -> list:
    """``(Megatron canonical name, HF name)`` of every layer tensor that maps one to one.

    The only tensors not listed: standard attention's fused QKV (``_split_qkv``/``_merge_qkv``)
    and the MLPs (``_mlps``), whose gated ``linear_fc1`` is HF's ``[gate_proj; up_proj]``.
    """
    pairs = []
    for n in _norm_names(arch):
        pairs += [(f"input_layernorm.{n}", f"input_layernorm.{n}"),
                  (f"pre_mlp_layernorm.{n}", f"post_attention_layernorm.{n}")]
    a = "self_attention."
    norms = _norm_names(arch) if arch.qk_layernorm_on else ()
    if not arch.multi_latent_attention:
        for n in norms:
            pairs += [(f"{a}q_layernorm.{n}", f"self_attn.q_norm.{n}"),
                      (f"{a}k_layernorm.{n}", f"self_attn.k_norm.{n}")]
    else:
        if arch.q_lora_rank is None:
            pairs.append((a + "linear_q_proj.weight", "self_attn.q_proj.weight"))
        else:
            pairs += [(a + "linear_q_down_proj.weight", "self_attn.q_a_proj.weight"),
                      (a + "linear_q_up_proj.weight", "self_attn.q_b_proj.weight")]
            pairs += [(f"{a}q_layernorm.{n}", f"self_attn.q_a_layernorm.{n}") for n in norms]
        pairs.append((a + "linear_kv_down_proj.weight", "self_attn.kv_a_proj_with_mqa.weight"))
        pairs += [(f"{a}kv_layernorm.{n}", f"self_attn.kv_a_layernorm.{n}") for n in norms]
        pairs.append((a + "linear_kv_up_proj.weight", "self_attn.kv_b_proj.weight"))
    pairs.append((a + "linear_proj.weight", "self_attn.o_proj.weight"))
    for t in range(arch.num_routers if moe else 0):
        gate = _gate_name(arch, t, stock)
        pairs.append((f"mlp.routers.{t}.weight", f"{gate}.weight"))
        if arch.moe_router_enable_expert_bias:
            pairs.append((f"mlp.routers.{t}.expert_bias", f"{gate}.e_score_correction_bias"))
    return pairs


def _mlps(arch: ModelArch, moe: bool = True) -> list:
    """``(Megatron MLP prefix, HF MLP prefix)`` of the routed and shared experts (a dense layer
    of ``arch.moe_layer_freq``: its one MLP)."""
    if not moe:
        return [("mlp", "mlp")]
    pairs = [(f"{EXPERT_PREFIX}{e}", f"mlp.experts.{e}") for e in range(arch.num_moe_experts)]
    if arch.moe_shared_expert_intermediate_size:
        pairs.append(("mlp.shared_experts", "mlp.shared_experts"))
    return pairs


_QKV = "self_attention.linear_qkv.weight"
_HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")


# --------------------------------------------------------------------------- Megatron -> HF
def layer_to_hf(arch: ModelArch, layer: Dict[str, Tensor], layer_idx: int, stock: bool = False,
                strict: bool = True) -> Dict[str, Tensor]:
    """One layer's canonical Megatron tensors -> HF tensors named ``model.layers.{layer_idx}.*``."""
    sd = dict(layer)
    where = f"Megatron layer {layer_idx}"
    out: Dict[str, Tensor] = {}
    if not arch.multi_latent_attention:
        out.update(zip(_HF_QKV, _split_qkv(arch, _take(sd, _QKV, where))))
    moe = arch.is_moe_layer(layer_idx)
    for mname, hname in _renamed(arch, stock, moe):
        out[hname] = _take(sd, mname, where)
    for mprefix, hprefix in _mlps(arch, moe):
        out.update(_mlp_to_hf(arch, _take(sd, f"{mprefix}.linear_fc1.weight", where),
                              _take(sd, f"{mprefix}.linear_fc2.weight", where), hprefix))
    if strict and sd:
        raise ConversionError(f"{where}: tensors with no Hugging Face counterpart: {sorted(sd)}")
    return {f"model.layers.{layer_idx}.{k}": v for k, v in out.items()}


def non_layer_to_hf(arch: ModelArch, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for mname, hname in NON_LAYER.items():
        if mname in tensors:
            out[hname] = tensors[mname]
    if not arch.untie_embeddings_and_output_weights:
        out.pop("lm_head.weight", None)
    elif "lm_head.weight" not in out:
        raise ConversionError("missing tensor 'output_layer.weight'")
    for needed in ("model.embed_tokens.weight", "model.norm.weight"):
        if needed not in out:
            raise ConversionError(f"missing Megatron tensor for {needed!r}")
    return out


# --------------------------------------------------------------------------- HF -> Megatron
def layer_from_hf(arch: ModelArch, hf: Dict[str, Tensor], layer_idx: int, stock: bool = False,
                  strict: bool = True) -> Dict[str, Tensor]:
    """HF tensors of layer ``layer_idx`` (full names) -> canonical Megatron tensors of that layer."""
    prefix = f"model.layers.{layer_idx}."
    sd = {k[len(prefix):]: v for k, v in hf.items() if k.startswith(prefix)}
    where = f"Hugging Face layer {layer_idx}"
    out: Dict[str, Tensor] = {}
    if not arch.multi_latent_attention:
        out[_QKV] = _merge_qkv(arch, *(_take(sd, name, where) for name in _HF_QKV))
    moe = arch.is_moe_layer(layer_idx)
    for mname, hname in _renamed(arch, stock, moe):
        out[mname] = _take(sd, hname, where)
    for mprefix, hprefix in _mlps(arch, moe):
        fc1, fc2 = _mlp_from_hf(arch, sd, hprefix, where)
        out[f"{mprefix}.linear_fc1.weight"] = fc1
        out[f"{mprefix}.linear_fc2.weight"] = fc2
    if strict and sd:
        raise ConversionError(f"{where}: unexpected tensors {sorted(sd)}")
    return out


def non_layer_from_hf(arch: ModelArch, hf: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for mname, hname in NON_LAYER.items():
        if hname in hf:
            out[mname] = hf[hname]
    if "embedding.word_embeddings.weight" not in out:
        raise ConversionError("missing tensor 'model.embed_tokens.weight'")
    if "output_layer.weight" not in out:
        if arch.untie_embeddings_and_output_weights:
            raise ConversionError("missing tensor 'lm_head.weight'")
    return out


# --------------------------------------------------------------------------- in-memory models
def module_state_to_layers(state_dict: Dict[str, Tensor], arch: ModelArch):
    """A TP=EP=PP=1 Megatron ``GPTModel.state_dict()`` -> (non-layer dict, [per-layer canonical dicts])."""
    layers = [dict() for _ in range(arch.num_layers)]
    non_layer = {}
    pat = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
    for name, t in state_dict.items():
        if name.endswith("_extra_state") or t is None:
            continue
        m = pat.match(name)
        if m:
            idx, suffix = int(m.group(1)), m.group(2)
            layers[idx][canonical_suffix(suffix)] = t
        elif name in NON_LAYER:
            non_layer[name] = t
    return non_layer, layers
