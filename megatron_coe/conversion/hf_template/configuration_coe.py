# Written for megatron-coe (Chain-of-Experts on Megatron-Core); copied next to exported weights.
"""Hugging Face configuration of Chain-of-Experts (CoE) causal language models.

Two model types share one set of keys:

* ``coe_deepseekv2`` (:class:`CoeConfig`): DeepSeek-V2 multi-latent attention (MLA), the layout
  of the published CoE checkpoints;
* ``coe_megatron`` (:class:`CoeMegatronConfig`): megatron-coe's own type for an MLA model whose
  function the published ``coe_deepseekv2`` semantics would not reproduce (the exporter says why);
* ``coe_gpt`` (:class:`CoeGPTConfig`): standard multi-head / grouped-query attention with rotary
  embeddings (Llama-style ``q_proj``/``k_proj``/``v_proj``/``o_proj`` weights).

CoE layer (``x0`` = ``post_attention_layernorm(h)``), for ``t`` in ``1..inner_iter``::

    x_t = inner_residual * x_{t-1} + sum_i g_{t,i} E_i(x_{t-1}) + S(x_{t-1})
    y   = x_C + outer_residual * h

``g_t`` is the top-``num_experts_per_tok`` routing of pass ``t``'s own gate (``use_igate``) or
of one gate shared by all passes. Routing follows Megatron-Core's ``TopKRouter``:

* ``scoring_func="softmax"``: ``norm_topk_prob=False``: softmax over all experts, then top-k
  (weights not renormalised); ``norm_topk_prob=True``: top-k of the logits, softmax over the k;
* ``scoring_func="sigmoid"``: sigmoid scores, top-k (selected on ``score + e_score_correction_bias``
  when ``router_expert_bias``), normalised to sum 1 when k > 1;
* ``topk_method="group_limited_greedy"``: experts in ``n_group`` groups, the ``topk_group`` groups
  with the largest sum of their top-(k / topk_group) scores are eligible;
* the weights are then multiplied by ``routed_scaling_factor``.
"""

from transformers import PretrainedConfig


class CoeConfig(PretrainedConfig):
    model_type = "coe_deepseekv2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=None,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=None,
        head_dim=None,
        attention_type="mla",
        # MLA
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        qk_layernorm=True,
        latent_norm_eps=1e-6,
        # positions
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rope_scaling=None,
        rope_interleaved=False,
        partial_rotary_factor=1.0,
        # norms / MLP
        norm_type="rmsnorm",
        rms_norm_eps=1e-6,
        hidden_act="silu",
        mlp_gated=True,
        attention_bias=False,
        mlp_bias=False,
        # MoE
        n_routed_experts=64,
        num_experts_per_tok=2,
        moe_intermediate_size=1408,
        n_shared_experts=None,
        shared_expert_intermediate_size=None,
        scoring_func="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        n_group=None,
        topk_group=None,
        router_expert_bias=False,
        first_k_dense_replace=0,
        moe_layer_freq=1,
        # CoE
        inner_iter=1,
        use_igate=True,
        inner_residual=None,
        outer_residual=None,
        residual=None,
        # misc
        initializer_range=0.02,
        use_cache=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.attention_type = attention_type
        if head_dim is None:
            head_dim = qk_rope_head_dim if attention_type == "mla" else hidden_size // num_attention_heads
        self.head_dim = head_dim
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_layernorm = qk_layernorm
        # eps of the MLA q/kv latent norms: DeepSeek-V2 hard-codes 1e-6 (rms_norm_eps is the others')
        self.latent_norm_eps = 1e-6 if latent_norm_eps is None else latent_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.rope_interleaved = rope_interleaved
        self.partial_rotary_factor = partial_rotary_factor
        self.norm_type = norm_type
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.mlp_gated = mlp_gated
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.n_shared_experts = n_shared_experts
        if shared_expert_intermediate_size is None and n_shared_experts:
            shared_expert_intermediate_size = n_shared_experts * moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.topk_method = topk_method
        self.n_group = n_group
        self.topk_group = topk_group
        self.router_expert_bias = router_expert_bias
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.inner_iter = inner_iter
        self.use_igate = use_igate
        # Published CoE checkpoints use one string: residual in {"inner", "outer", "none"}.
        if inner_residual is None:
            inner_residual = residual in (None, "inner", "inner+outer")
        if outer_residual is None:
            outer_residual = residual in ("outer", "inner+outer")
        self.inner_residual = bool(inner_residual)
        self.outer_residual = bool(outer_residual)
        self.residual = {(True, False): "inner", (False, True): "outer",
                         (True, True): "inner+outer", (False, False): "none"}[
            (self.inner_residual, self.outer_residual)]
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id


class CoeGPTConfig(CoeConfig):
    """CoE with standard (multi-head / grouped-query) attention and rotary embeddings."""

    model_type = "coe_gpt"

    def __init__(self, attention_type="mha", **kwargs):
        super().__init__(attention_type=attention_type, **kwargs)


class CoeMegatronConfig(CoeConfig):
    """megatron-coe's own type for an MLA CoE model that ``coe_deepseekv2`` semantics do not
    describe exactly (no latent norms, another latent eps, LayerNorm, ...): the same keys, read
    as written (``qk_layernorm``, ``latent_norm_eps``, ``norm_type``, ...)."""

    model_type = "coe_megatron"

    def __init__(self, attention_type="mla", **kwargs):
        super().__init__(attention_type=attention_type, **kwargs)


__all__ = ["CoeConfig", "CoeGPTConfig", "CoeMegatronConfig"]
