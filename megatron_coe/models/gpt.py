"""GPT model with Chain-of-Experts layers: Megatron-Core's ``GPTModel`` built from the CoE spec."""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_coe.models.specs import get_coe_block_spec


def build_coe_gpt_model(
    config,
    *,
    vocab_size: int,
    max_sequence_length: int,
    use_transformer_engine: bool = False,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = 10000,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """A ``GPTModel`` whose every layer is a ``CoETransformerLayer`` with a ``ChainOfExpertsLayer``.

    Rotary position embeddings are used for both attention kinds (MLA applies its own RoPE).
    ``pre_process``/``post_process`` default to this rank's pipeline stage.
    """
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_coe_block_spec(
            config, use_transformer_engine, vp_stage=vp_stage,
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        ),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )
