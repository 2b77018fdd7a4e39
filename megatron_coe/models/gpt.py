"""GPT model with Chain-of-Experts layers: Megatron-Core's ``GPTModel`` built from the CoE spec."""

from __future__ import annotations

import contextlib
from typing import Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.utils import (
    is_pp_first_stage,
    is_pp_last_stage,
    is_vp_first_stage,
    is_vp_last_stage,
)

from megatron_coe.compat import cuda_device_redirect
from megatron_coe.models.specs import get_coe_block_spec


def build_coe_gpt_model(
    config,
    *,
    pg_collection,
    vocab_size: int,
    max_sequence_length: int,
    use_transformer_engine: bool = False,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = 10000,
    rotary_percent: float = 1.0,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """A ``GPTModel`` whose every layer is a ``CoETransformerLayer`` with a ``ChainOfExpertsLayer``.

    ``pg_collection``: the ``ProcessGroupCollection`` from ``megatron_coe.parallel.
    initialize_parallel``; it is handed to ``GPTModel``, which passes it to the decoder block,
    every transformer layer and, through them, every CoE layer, router, dispatcher and expert.
    This rank's pipeline stage (``pre_process``/``post_process`` defaults and the layers to
    build) comes from ``pg_collection.pp``. Rotary position embeddings are used for both
    attention kinds (MLA applies its own RoPE).
    """
    if pg_collection is None:
        raise ValueError("build_coe_gpt_model needs pg_collection: pass the ProcessGroupCollection "
                         "returned by megatron_coe.parallel.initialize_parallel().")
    vp_size = config.virtual_pipeline_model_parallel_size
    if pre_process is None:
        pre_process = is_pp_first_stage(pg_collection.pp) and is_vp_first_stage(vp_stage, vp_size)
    if post_process is None:
        post_process = is_pp_last_stage(pg_collection.pp) and is_vp_last_stage(vp_stage, vp_size)
    # A tied output layer at PP > 1 keeps a copy of the embedding on the last stage that
    # LanguageModule.setup_embeddings_and_output_layer moves with .cuda() before its all-reduce
    # (registry cuda.device_redirect); nothing else in the construction needs the redirect.
    tied_copy = share_embeddings_and_output_weights and config.pipeline_model_parallel_size > 1
    with cuda_device_redirect() if tied_copy else contextlib.nullcontext():
        return GPTModel(
            config=config,
            transformer_layer_spec=get_coe_block_spec(
                config, use_transformer_engine, vp_stage=vp_stage, pp_rank=pg_collection.pp.rank(),
            ),
            vocab_size=vocab_size,
            max_sequence_length=max_sequence_length,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=share_embeddings_and_output_weights,
            position_embedding_type="rope",
            rotary_base=rotary_base,
            rotary_percent=rotary_percent,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
