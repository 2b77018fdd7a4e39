"""The Chain-of-Experts layer: C chained expert-parallel MoE passes inside one layer.

With ``x0`` the pre-MLP layernorm output, pass t (1..C) computes::

    x_t = I_inner * x_{t-1} + sum_i g_{t,i} E_i(x_{t-1}) + S(x_{t-1})

Each pass is a complete Megatron-Core MoE round, built from ``MoELayer``'s own stages:
route (the pass's router) -> preprocess/permute -> dispatch (all-to-all or all-gather) ->
routed experts -> combine -> unpermute (+ shared experts). Pass t+1 routes on pass t's output.
The routed experts, shared experts and the token dispatcher are the same objects in every pass;
each pass has its own ``TopKRouter`` (``routers.{t-1}``) unless ``coe_shared_router`` is set.

The outer residual (``y = x_C + I_outer * h``) is not applied here: it is the transformer
layer's residual add (see ``coe_transformer_layer.py``).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from megatron.core import tensor_parallel
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.typed_torch import apply_module

from megatron_coe.compat.float32_buffers import Float32Buffers
from megatron_coe.compat.moe_specs_and_signatures import supported_kwargs
from megatron_coe.transformer.coe_router import CoETopKRouter


class ChainOfExpertsLayer(Float32Buffers, MoELayer):
    """Megatron-Core ``MoELayer`` that runs ``config.coe_iterations`` chained routing passes.

    Shapes: input and output ``[s, b, h]`` (``s`` is the local sequence shard under sequence
    parallelism). Returns ``(output, None)`` like ``MoELayer``.

    Buffers:
        tokens_per_expert_per_pass ``[C, num_experts]``: tokens each pass routed to each expert on
        this rank since the last ``reset_routing_stats()`` (counted once per training step, also
        under activation recompute; not saved in checkpoints). float32 in every precision: exact
        up to 2**24 tokens per (pass, expert) between resets (the trainer resets every
        ``--log-interval`` steps).
        dropped_tokens_per_pass ``[C, 2]``: with token dropping (``moe_expert_capacity_factor``),
        per pass the (token, expert) choices the capacity dropped and all choices made (tokens x
        top-k), counted alike.

    Count buffers stay float32 under bf16/fp16: ``Float16Module`` calls ``module.bfloat16()``,
    which casts every floating buffer, and a bf16 counter is exact only up to 256 (from 256 to
    512 it holds even numbers only: one more token is rounded away). ``.bfloat16()``,
    ``.half()``, ``.to(dtype)`` and ``.cuda()`` move these buffers but never change their dtype
    (``compat.float32_buffers``): ``tokens_per_expert_per_pass`` here and, in this layer's
    routers, Megatron's ``local_tokens_per_expert`` (expert-bias counts), ``expert_bias``,
    ``global_tokens_per_expert`` and ``ga_steps`` (global aux loss); see ``FLOAT32_BUFFERS``.
    """

    # Buffers of this layer and of its routers (Megatron's TopKRouter) that hold token counts or
    # the expert bias: float32 whatever the model's dtype (Megatron keeps only expert_bias float32,
    # and only by converting it back before each forward/save/load).
    FLOAT32_BUFFERS = ("tokens_per_expert_per_pass", "dropped_tokens_per_pass",
                       "local_tokens_per_expert", "expert_bias", "global_tokens_per_expert",
                       "ga_steps")

    def __init__(self, config, submodules: Optional[MoESubmodules] = None, layer_number=None,
                 pg_collection=None, **kwargs):
        # kwargs: keywords newer releases pass (is_mtp_layer >= 0.17, name >= 0.18), forwarded
        # where the installed MoELayer takes them (compat.moe_specs_and_signatures).
        if pg_collection is None:  # no silent fallback to Megatron's global process groups
            raise ValueError(
                "ChainOfExpertsLayer needs pg_collection: build the model with build_coe_gpt_model("
                "pg_collection=...) or pass the ProcessGroupCollection from "
                "megatron_coe.parallel.initialize_parallel() to the layer spec.")
        base_kwargs = supported_kwargs(MoELayer.__init__, kwargs)
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **base_kwargs)
        self.num_passes = config.coe_iterations
        # MoELayer built one router (``self.router``); it becomes pass 1's router so that a C=1
        # CoE layer consumes the RNG exactly like MoELayer. Later passes get their own routers,
        # built with the same arguments as MoELayer's.
        first_router = self.router
        del self.router
        num_routers = 1 if config.coe_shared_router else self.num_passes
        router_kwargs = {k: v for k, v in base_kwargs.items() if k == "is_mtp_layer"}
        self.routers = torch.nn.ModuleList(
            [first_router]
            + [
                submodules.router(config=self.config, pg_collection=pg_collection,
                                  **router_kwargs)
                for _ in range(num_routers - 1)
            ]
        )
        self.register_buffer(
            "tokens_per_expert_per_pass",
            torch.zeros(self.num_passes, config.num_moe_experts, dtype=torch.float32),
            persistent=False,
        )
        self.register_buffer("dropped_tokens_per_pass",
                             torch.zeros(self.num_passes, 2, dtype=torch.float32),
                             persistent=False)
        self.keep_float32(*self.FLOAT32_BUFFERS)

    # ----------------------------------------------------------------------------- routers
    def router_for_pass(self, pass_index: int):
        """The router of pass ``pass_index`` (0-based)."""
        return self.routers[0 if self.config.coe_shared_router else pass_index]

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number
        for router in self.routers:
            router.set_layer_number(layer_number)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Megatron-Core's sharded state dict; a one-pass layer (C=1, one router) stores its
        router under Megatron-Core's own ``MoELayer`` key ``{prefix}router.*`` (not
        ``routers.0.*``), so that Megatron-LM loads the checkpoint of a standard MoE as is.
        Only the checkpoint keys change (the module keeps ``routers.0``); loading a checkpoint
        that spells it ``routers.0`` (older ones) is ``models.checkpoint_keys.match_to_checkpoint``."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values

        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.num_passes == 1 and len(self.routers) == 1:
            ours, megatron = f"{prefix}routers.0.", f"{prefix}router."
            for sharded in nested_values(state):
                key = getattr(sharded, "key", None)
                if isinstance(key, str) and key.startswith(ours):
                    sharded.key = megatron + key[len(ours):]
        return state

    def route(self, hidden_states, padding_mask=None, pass_index: int = 0):
        """Pass ``pass_index``'s routing: ``(probs [T, E], routing_map [T, E])``."""
        router = self.router_for_pass(pass_index)
        if isinstance(router, CoETopKRouter):
            router.pass_number = pass_index + 1
        probs, routing_map = apply_module(router)(hidden_states, padding_mask)
        if torch.is_grad_enabled():  # once per step, also under recompute (like expert bias)
            with torch.no_grad():
                self.tokens_per_expert_per_pass[pass_index] += routing_map.sum(dim=0).float()
                if self.config.moe_expert_capacity_factor is not None:
                    # each token chose top-k experts; kept = routed with a non-zero weight (a
                    # slot padded to capacity has weight 0)
                    kept = torch.logical_and(routing_map, probs != 0).sum()
                    chosen = routing_map.shape[0] * self.config.moe_router_topk
                    self.dropped_tokens_per_pass[pass_index, 0] += (chosen - kept).float()
                    self.dropped_tokens_per_pass[pass_index, 1] += chosen
        return probs, routing_map

    def reset_routing_stats(self) -> tuple:
        """Return and zero ``(tokens_per_expert_per_pass, dropped_tokens_per_pass)``."""
        stats = (self.tokens_per_expert_per_pass.clone(), self.dropped_tokens_per_pass.clone())
        self.tokens_per_expert_per_pass.zero_()
        self.dropped_tokens_per_pass.zero_()
        return stats

    # ----------------------------------------------------------------------------- forward
    def coe_pass(self, pass_index: int, x_prev, padding_mask=None):
        """One complete expert-parallel round on ``x_prev`` ``[s, b, h]``; returns ``x_t``."""
        shared_output = self.shared_experts_compute(x_prev)
        probs, routing_map = self.route(x_prev, padding_mask, pass_index=pass_index)
        hidden, probs = self.preprocess(x_prev, probs, routing_map)
        dispatched, probs = self.dispatch(hidden, probs)
        expert_output, _ = self.routed_experts_compute(dispatched, probs)
        combined = self.combine(expert_output)
        x_t = self.postprocess(combined, shared_output)
        if self.config.coe_inner_residual:
            x_t = x_prev + x_t
        return x_t

    def chain(self, hidden_states, padding_mask=None):
        """All C passes: ``x_0 -> x_C``."""
        x = hidden_states
        # GroupedSequentialMLP computes the passes' weight gradients together (chain_scope).
        scope = getattr(self.experts, "chain_scope", contextlib.nullcontext)
        with scope():
            for pass_index in range(self.num_passes):
                x = self.coe_pass(pass_index, x, padding_mask)
        return x

    def forward(self, hidden_states, intermediate_tensors=None, padding_mask=None):
        if intermediate_tensors is not None:
            raise NotImplementedError(
                "ChainOfExpertsLayer does not support partial CUDA-graph capture of MoE modules."
            )
        if self.training and self.attn_tp_group.size() > 1 and not self.config.sequence_parallel:
            raise ValueError(
                "MoE/CoE layers with tensor parallelism need sequence parallelism during training: "
                "set sequence_parallel=True (--sequence-parallel)."
            )
        if padding_mask is not None:  # [b, s] -> [s, b], as MoELayer does
            padding_mask = padding_mask.transpose(0, 1).bool()

        if self.moe_layer_recompute:
            if self.config.fp8 or self.config.fp4:
                from megatron.core.extensions.transformer_engine import te_checkpoint

                output = te_checkpoint(
                    self.chain,
                    False,
                    tensor_parallel.random.get_cuda_rng_tracker,
                    self.tp_group,
                    hidden_states,
                    padding_mask,
                )
            else:
                output = tensor_parallel.checkpoint(self.chain, False, hidden_states, padding_mask)
        else:
            output = self.chain(hidden_states, padding_mask)
        return output, None
