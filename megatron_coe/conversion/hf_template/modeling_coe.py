# Written for megatron-coe (Chain-of-Experts on Megatron-Core); copied next to exported weights.
"""PyTorch Chain-of-Experts (CoE) causal language model for Hugging Face ``transformers``.

The math follows the Megatron-Core model it was exported from (``megatron_coe``), so that logits
match to fp32 rounding:

* attention: DeepSeek-V2 multi-latent attention (``attention_type="mla"``; RoPE on the last
  ``qk_rope_head_dim`` dims of q and k, applied to the de-interleaved pairs ``[x0, x2, ..; x1, x3, ..]``
  as Megatron's MLA does, optional YaRN) or standard attention with grouped query heads and
  rotary embeddings (``"mha"``; rotate-half, or interleaved pairs with ``rope_interleaved``);
* every layer's MLP is a CoE layer of ``inner_iter`` chained MoE passes (see ``configuration_coe``).

Weights use DeepSeek-V2 names (``model.layers.N.self_attn.kv_a_proj_with_mqa`` ...,
``model.layers.N.mlp.experts.E.{gate,up,down}_proj``); the router of pass ``T`` is
``model.layers.N.mlp.gate.T.weight`` (``mlp.gate.weight`` when all passes share one gate).
Eager attention only; ``generate()`` uses a ``DynamicCache`` of per-head keys and values.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from .configuration_coe import CoeConfig, CoeGPTConfig, CoeMegatronConfig


# --------------------------------------------------------------------------- norms
class CoeRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def make_norm(config, size, eps=None):
    eps = config.rms_norm_eps if eps is None else eps
    if config.norm_type == "layernorm":
        return nn.LayerNorm(size, eps=eps)
    if config.norm_type == "rmsnorm":
        return CoeRMSNorm(size, eps=eps)
    raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {config.norm_type!r}")


# --------------------------------------------------------------------------- rotary embeddings
def _yarn_find_correction_dim(num_rotations, dim, base, max_position_embeddings):
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings):
    low = math.floor(_yarn_find_correction_dim(low_rot, dim, base, max_position_embeddings))
    high = math.ceil(_yarn_find_correction_dim(high_rot, dim, base, max_position_embeddings))
    return max(low, 0), min(high, dim - 1)


def _yarn_linear_ramp_mask(low, high, dim):
    if low == high:
        high += 0.001
    linear = (torch.arange(dim, dtype=torch.float32) - low) / (high - low)
    return torch.clamp(linear, 0, 1)


def yarn_get_mscale(scale=1.0, mscale=1.0):
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


class CoeRotaryEmbedding(nn.Module):
    """cos/sin of the rotary angles (``[b, s, dim]``, the two halves or the pairs repeated).

    The inverse frequencies are computed in ``forward`` (no buffer): models are materialised from
    the meta device by ``from_pretrained``, which does not restore non-persistent buffers.
    """

    def __init__(self, dim, base=10000.0, interleaved=False, rope_scaling=None):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved
        self.rope_scaling = dict(rope_scaling) if rope_scaling else None
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: yarn)")

    def inv_freq_and_mscale(self):
        dim, base = self.dim, self.base
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        rs = self.rope_scaling
        if rs is None:
            return inv_freq, 1.0
        factor = rs["factor"]
        inv_freq_inter = 1.0 / (factor * base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        low, high = _yarn_find_correction_range(rs.get("beta_fast", 32), rs.get("beta_slow", 1), dim, base,
                                                rs.get("original_max_position_embeddings", 4096))
        inv_freq_mask = 1.0 - _yarn_linear_ramp_mask(low, high, dim // 2)
        inv_freq = inv_freq_inter * (1 - inv_freq_mask) + inv_freq * inv_freq_mask
        mscale = float(yarn_get_mscale(factor, rs.get("mscale", 1.0))
                       / yarn_get_mscale(factor, rs.get("mscale_all_dim", 0.0)))
        return inv_freq, mscale

    def forward(self, position_ids):
        """``position_ids [b, s]`` -> ``cos, sin [b, s, dim]`` (fp32)."""
        inv_freq, mscale = self.inv_freq_and_mscale()
        freqs = position_ids.to(torch.float32)[..., None] * inv_freq.to(position_ids.device)  # [b, s, dim/2]
        if self.interleaved:
            emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * mscale, emb.sin() * mscale


def _rotate_half(x, interleaved):
    if not interleaved:
        x1, x2 = torch.chunk(x, 2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x, cos, sin, interleaved=False, deinterleave=False):
    """Rotate the first ``cos.shape[-1]`` dims of ``x [b, heads, s, d]``; ``cos/sin [b, s, r]``.

    ``deinterleave`` (MLA): the rotated dims are first reordered ``[x0, x2, ..., x1, x3, ...]``.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if deinterleave:
        x_rot = torch.cat((x_rot[..., 0::2], x_rot[..., 1::2]), dim=-1)
    cos = cos[:, None].to(x.dtype)
    sin = sin[:, None].to(x.dtype)
    x_rot = x_rot * cos + _rotate_half(x_rot, interleaved) * sin
    return torch.cat((x_rot, x_pass), dim=-1)


# --------------------------------------------------------------------------- attention
def _attend(query, key, value, attention_mask, scale):
    """``query [b, h, q, d]``, ``key/value [b, h_kv, k, d]``; returns ``[b, q, h * d_v]``."""
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)
    return out.transpose(1, 2).reshape(query.shape[0], query.shape[2], -1)


class CoeMLAttention(nn.Module):
    """DeepSeek-V2 multi-latent attention (Megatron-Core ``MLASelfAttention`` math)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.q_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        h = config.hidden_size
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(h, self.num_heads * self.q_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, self.q_lora_rank, bias=False)
            self.q_a_layernorm = (make_norm(config, self.q_lora_rank, config.latent_norm_eps)
                                  if config.qk_layernorm else nn.Identity())
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.q_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = (make_norm(config, self.kv_lora_rank, config.latent_norm_eps)
                               if config.qk_layernorm else nn.Identity())
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, h, bias=False)
        mscale = 1.0
        if config.rope_scaling is not None:
            mscale = yarn_get_mscale(config.rope_scaling["factor"], config.rope_scaling.get("mscale_all_dim", 0.0))
        self.softmax_scale = mscale * mscale / math.sqrt(self.q_head_dim)

    def forward(self, hidden_states, cos, sin, attention_mask=None, past_key_values=None):
        b, s, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(b, s, self.num_heads, self.q_head_dim).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        kv_a = self.kv_a_proj_with_mqa(hidden_states)
        compressed, k_pe = torch.split(kv_a, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(compressed))
        kv = kv.view(b, s, self.num_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, value = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe.view(b, 1, s, self.qk_rope_head_dim)
        q_pe = apply_rotary(q_pe, cos, sin, deinterleave=True)
        k_pe = apply_rotary(k_pe, cos, sin, deinterleave=True)
        query = torch.cat((q_nope, q_pe), dim=-1)
        key = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        return self.o_proj(_attend(query, key, value, attention_mask, self.softmax_scale))


class CoeGQAttention(nn.Module):
    """Standard attention with grouped query heads, optional q/k norms and rotary embeddings."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.interleaved = config.rope_interleaved
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        if config.qk_layernorm:
            self.q_norm = make_norm(config, self.head_dim)
            self.k_norm = make_norm(config, self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim)

    def forward(self, hidden_states, cos, sin, attention_mask=None, past_key_values=None):
        b, s, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q = apply_rotary(q, cos, sin, interleaved=self.interleaved)
        k = apply_rotary(k, cos, sin, interleaved=self.interleaved)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        return self.o_proj(_attend(q, k, v, attention_mask, self.softmax_scale))


# --------------------------------------------------------------------------- MoE / CoE
class CoeMLP(nn.Module):
    def __init__(self, config, intermediate_size):
        super().__init__()
        h = config.hidden_size
        self.gated = config.mlp_gated
        if self.gated:
            self.gate_proj = nn.Linear(h, intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, h, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act_fn(self.up_proj(x)))


class CoeGate(nn.Module):
    """Megatron-Core ``TopKRouter`` routing (see ``configuration_coe``); returns (indices, weights)."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.group_limited = config.topk_method == "group_limited_greedy"
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if config.router_expert_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def _topk(self, scores):
        if not self.group_limited:
            return torch.topk(scores, k=self.top_k, dim=-1)
        t = scores.shape[0]
        group_scores = scores.view(t, self.n_group, -1).topk(self.top_k // self.topk_group, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(t, self.n_group, self.n_experts // self.n_group).reshape(t, -1)
        return torch.topk(scores.masked_fill(~score_mask.bool(), float("-inf")), k=self.top_k, dim=-1)

    def forward(self, hidden_states):
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        logits = F.linear(x.float(), self.weight.float())
        if self.scoring_func == "softmax":
            if self.norm_topk_prob:
                top, idx = self._topk(logits)
                weights = torch.softmax(top, dim=-1, dtype=torch.float32)
            else:
                weights, idx = self._topk(torch.softmax(logits, dim=-1, dtype=torch.float32))
        elif self.scoring_func == "sigmoid":
            scores = torch.sigmoid(logits)
            if self.e_score_correction_bias is not None:
                _, idx = self._topk(scores + self.e_score_correction_bias.float())
                weights = torch.gather(scores, 1, idx)
            else:
                weights, idx = self._topk(scores)
            if self.top_k > 1:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            raise ValueError(f"unsupported scoring_func {self.scoring_func!r}")
        if self.routed_scaling_factor:
            weights = weights * self.routed_scaling_factor
        return idx, weights


class CoeMoE(nn.Module):
    """``inner_iter`` chained MoE passes sharing the routed and shared experts."""

    def __init__(self, config):
        super().__init__()
        self.inner_iter = config.inner_iter
        self.inner_residual = config.inner_residual
        self.use_igate = config.use_igate
        self.experts = nn.ModuleList(
            [CoeMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)])
        if self.use_igate:
            self.gate = nn.ModuleList([CoeGate(config) for _ in range(self.inner_iter)])
        else:
            self.gate = CoeGate(config)
        shared = config.shared_expert_intermediate_size
        self.shared_experts = CoeMLP(config, shared) if shared else None

    def route(self, hidden_states, pass_index):
        """(expert indices ``[tokens, k]``, weights ``[tokens, k]``) of pass ``pass_index`` (0-based)."""
        gate = self.gate[pass_index] if self.use_igate else self.gate
        return gate(hidden_states)

    def moe(self, x, idx, weights):
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        for e in torch.unique(idx).tolist():
            token, slot = torch.where(idx == e)
            y = self.experts[e](flat[token]) * weights[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y)
        return out.view_as(x)

    def forward(self, hidden_states):
        x = hidden_states
        for t in range(self.inner_iter):
            idx, weights = self.route(x, t)
            y = self.moe(x, idx, weights)
            if self.shared_experts is not None:
                y = y + self.shared_experts(x)
            x = x + y if self.inner_residual else y
        return x


def moe_layer_pattern(config):
    """1 (CoE layer) / 0 (dense MLP) per layer: a 0/1 list ``moe_layer_freq``, else DeepSeek's
    rule ``layer >= first_k_dense_replace and layer % moe_layer_freq == 0``."""
    freq = getattr(config, "moe_layer_freq", 1) or 1
    if isinstance(freq, (list, tuple)):
        return [int(v) for v in freq]
    k = getattr(config, "first_k_dense_replace", 0) or 0
    return [1 if i >= k and i % int(freq) == 0 else 0 for i in range(config.num_hidden_layers)]


class CoeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        attention = CoeMLAttention if config.attention_type == "mla" else CoeGQAttention
        self.self_attn = attention(config, layer_idx)
        self.is_moe = bool(moe_layer_pattern(config)[layer_idx])
        # a dense layer (first_k_dense_replace / moe_layer_freq) is a plain MLP with its residual
        self.mlp = CoeMoE(config) if self.is_moe else CoeMLP(config, config.intermediate_size)
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)
        self.outer_residual = config.outer_residual or not self.is_moe

    def forward(self, hidden_states, cos, sin, attention_mask=None, past_key_values=None):
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), cos, sin,
                                       attention_mask=attention_mask, past_key_values=past_key_values)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.outer_residual:
            hidden_states = residual + hidden_states
        return hidden_states


# --------------------------------------------------------------------------- models
class CoePreTrainedModel(PreTrainedModel):
    config_class = CoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["CoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = False
    _supports_flash_attn = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, CoeGate):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, (CoeRMSNorm, nn.LayerNorm)):
            module.weight.data.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()


class CoeModel(CoePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([CoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = make_norm(config, config.hidden_size)
        if config.attention_type == "mla":
            self.rotary_emb = CoeRotaryEmbedding(config.qk_rope_head_dim, config.rope_theta,
                                                 rope_scaling=config.rope_scaling)
        else:
            rot_dim = int(config.head_dim * config.partial_rotary_factor)
            self.rotary_emb = CoeRotaryEmbedding(rot_dim, config.rope_theta, interleaved=config.rope_interleaved,
                                                 rope_scaling=config.rope_scaling)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    @staticmethod
    def _causal_mask(attention_mask, batch, q_len, past_len, dtype, device):
        """Additive mask ``[b, 1, q, past + q]`` (causal + key padding)."""
        k_len = past_len + q_len
        q_pos = torch.arange(past_len, k_len, device=device)[:, None]
        allowed = torch.arange(k_len, device=device)[None, :] <= q_pos  # [q, k]
        allowed = allowed[None, None].expand(batch, 1, q_len, k_len)
        if attention_mask is not None and attention_mask.dim() == 2:
            allowed = allowed & attention_mask[:, None, None, -k_len:].bool()
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, return_dict=None,
                **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, s, _ = inputs_embeds.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + s, device=inputs_embeds.device)[None].expand(b, s)
        mask = self._causal_mask(attention_mask, b, s, past_len, inputs_embeds.dtype, inputs_embeds.device)
        cos, sin = self.rotary_emb(position_ids)
        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, cos, sin, attention_mask=mask,
                                  past_key_values=past_key_values if use_cache else None)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       past_key_values=past_key_values if use_cache else None,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class CoeForCausalLM(CoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = CoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None,
                return_dict=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states)


class CoeGPTModel(CoeModel):
    config_class = CoeGPTConfig


class CoeGPTForCausalLM(CoeForCausalLM):
    config_class = CoeGPTConfig


class CoeMegatronModel(CoeModel):
    config_class = CoeMegatronConfig


class CoeMegatronForCausalLM(CoeForCausalLM):
    config_class = CoeMegatronConfig


__all__ = ["CoePreTrainedModel", "CoeModel", "CoeForCausalLM", "CoeGPTModel", "CoeGPTForCausalLM",
           "CoeMegatronModel", "CoeMegatronForCausalLM"]
