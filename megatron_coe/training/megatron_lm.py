"""The Megatron-LM side of a checkpoint: the keys Megatron-LM writes into the common state, and
reading a checkpoint that Megatron-LM wrote.

Megatron-LM (``megatron.training.checkpointing``) keeps in a ``torch_dist`` checkpoint's common
state (``common.pt``): ``args`` (its ``argparse.Namespace``, Megatron-LM option names),
``checkpoint_version`` (3.0), ``iteration``, ``opt_param_scheduler``,
``num_floating_point_operations_so_far`` and, as a sharded object, ``rng_state``.
``common_state`` builds those for this trainer's checkpoints (next to this trainer's own records,
which stay as they are), so Megatron-LM's ``load_args_from_checkpoint`` and its checkpoint
loading read them. This trainer's options already carry Megatron-LM's names; the namespace adds
what Megatron-LM derives or fixes elsewhere (``padded_vocab_size``, ``max_position_embeddings``,
position embedding, bias, tying, ``ckpt_format``, ...), read from the built model.

A standard-MoE (C=1) checkpoint crosses both ways with its whole training state: a one-pass
layer's router has Megatron-Core's key (``models.checkpoint_keys`` reads older spellings); the
optimizer is chained as Megatron-LM chains it (``regroup_optimizer_state`` for checkpoints
chained otherwise); the scheduler counts samples (``scheduler_state`` converts older
iteration-unit states); ``rng_state`` holds CUDA generator states a GPU restores
(``cuda_rng_states``), and the tokenizer is one Megatron-LM builds (``tokenizer_dir``).

A directory with dist_checkpointing's ``metadata.json`` but without this
trainer's ``coe_checkpoint.json`` is a Megatron-LM checkpoint: ``read_meta`` turns its ``args``
into this trainer's metadata (options under this trainer's names; a Megatron MoE is C=1, inner
residual off, outer residual on), and ``refuse_incompatible`` names every property of its model
that this trainer cannot build (dense layers, biases, tied embeddings, GQA, MTP, ...).
"""

from __future__ import annotations

import argparse
import os
from typing import Optional

from megatron_coe.checkpointing import CheckpointError
from megatron_coe.training.options import OPTIONS, TrainArgs

CHECKPOINT_VERSION = 3.0
COMMON = "common.pt"
# Megatron-LM's MoE layer = a CoE layer with one pass, no inner residual, the outer residual on
STANDARD_MOE = dict(coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True,
                    coe_shared_router=False)


def namespace(args: TrainArgs, model: list, vocab_size: int, iteration: int, consumed: int,
              layout, tokenizer_model: Optional[str] = None) -> argparse.Namespace:
    """Megatron-LM's ``args`` for this run (``argparse.Namespace``, Megatron-LM names).

    The tokenizer is one Megatron-LM builds: ``HuggingFaceTokenizer`` with ``tokenizer_model``
    the copy saved in the checkpoint (``tokenizer_dir``; Megatron-LM takes it with
    ``--use-checkpoint-args --use-tokenizer-model-from-checkpoint-args``), or for --mock-data
    its ``NullTokenizer`` (of ``--vocab-size`` ids)."""
    from megatron_coe.training.setup import unwrap

    gpt = unwrap(model[0])
    config = gpt.config
    values = args.to_dict()
    pe = getattr(gpt, "position_embedding_type", "rope")
    values.update(
        padded_vocab_size=vocab_size, max_position_embeddings=args.seq_length,
        position_embedding_type=pe, use_rotary_position_embeddings=pe == "rope",
        add_position_embedding=True, rotary_base=10000, rotary_percent=1.0,
        rotary_interleaved=False, add_bias_linear=bool(config.add_bias_linear),
        add_qkv_bias=bool(getattr(config, "add_qkv_bias", False)),
        untie_embeddings_and_output_weights=not getattr(
            gpt, "share_embeddings_and_output_weights", False),
        num_query_groups=config.num_query_groups,
        group_query_attention=config.num_query_groups not in (None, config.num_attention_heads),
        ffn_hidden_size=config.ffn_hidden_size, kv_channels=config.kv_channels,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
        squared_relu=False, apply_layernorm_1p=False, apply_query_key_layer_scaling=False,
        num_experts=args.num_experts, mtp_num_layers=None, spec=None,
        ckpt_format="torch_dist", use_dist_ckpt=True, use_distributed_optimizer=True,
        dist_ckpt_optim_fully_reshardable=True, iteration=iteration,
        consumed_train_samples=consumed, consumed_valid_samples=0,
        rampup_batch_size=args.rampup_batch_size or None,  # Megatron-LM's unset value
        world_size=layout.world_size, data_parallel_size=layout.dp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        moe_grouped_gemm=bool(config.moe_grouped_gemm),  # resolved: unset = the layers' choice
        fp16=False, params_dtype=config.params_dtype,
        vocab_file=None, merge_file=None)
    if args.mock_data:
        values.update(tokenizer_type="NullTokenizer", tokenizer_model=None)
    else:
        values.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_model)
    return argparse.Namespace(**values)


def common_state(args: TrainArgs, model: list, vocab_size: int, iteration: int, consumed: int,
                 layout, scheduler_state: dict, flops_so_far: float,
                 tokenizer_model: Optional[str] = None) -> dict:
    """The Megatron-LM keys of the common state (``rng_state`` is added by the caller as a
    sharded object, see ``rng_sharded_object``)."""
    return {"args": namespace(args, model, vocab_size, iteration, consumed, layout,
                              tokenizer_model),
            "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration,
            "opt_param_scheduler": scheduler_state,
            "num_floating_point_operations_so_far": float(flops_so_far)}


TOKENIZER_DIR = "tokenizer"  # in iter_N: tokenizer.json + tokenizer_config.json


def tokenizer_dir(root: str, iteration: int, args: TrainArgs) -> Optional[str]:
    """The ``tokenizer_model`` Megatron-LM reads: the tokenizer copy saved in the published
    iteration directory (absolute path); None for --mock-data."""
    from megatron_coe import checkpointing

    if args.mock_data:
        return None
    return os.path.join(os.path.abspath(checkpointing.iteration_dir(root, iteration)),
                        TOKENIZER_DIR)


def write_tokenizer(tmp: str, args: TrainArgs) -> None:
    """Save the run's tokenizer into the iteration directory being written, as a directory
    ``AutoTokenizer`` (Megatron-LM's ``HuggingFaceTokenizer``) loads."""
    from megatron_coe.training.data import load_tokenizer

    if args.mock_data:
        return
    out = os.path.join(tmp, TOKENIZER_DIR)
    os.makedirs(out, exist_ok=True)
    load_tokenizer(args).save_for_transformers(out, args.seq_length)


def philox_state(seed: int, offset: int = 0):
    """A CUDA (Philox) generator's state as ``torch.cuda.get_rng_state`` returns it: seed and
    offset, little-endian int64 each (16 bytes)."""
    import torch

    raw = int(seed).to_bytes(8, "little") + int(offset).to_bytes(8, "little", signed=True)
    return torch.tensor(list(raw), dtype=torch.uint8)


def cuda_rng_states(rng: dict, seed: int) -> tuple:
    """(default CUDA generator state, tracker states) for Megatron-LM's ``rng_state``: the CUDA
    states of a GPU run as they are. A CPU run has no CUDA generator (its tracker streams are CPU
    generator states, which ``torch.cuda.set_rng_state`` refuses): it writes the CUDA states
    Megatron-Core's seeding gives this rank (``model_parallel_cuda_manual_seed`` of the
    trainer's seed + 100 x pipeline rank, offset 0), so that a GPU run of Megatron-LM restores
    them and starts its CUDA streams as seeded."""
    if "cuda" in rng:
        return rng["cuda"], rng["tracker"]
    from megatron.core import parallel_state as ps

    base = seed + 100 * ps.get_pipeline_model_parallel_rank()
    seeds = {"model-parallel-rng": base + 2718 + ps.get_tensor_model_parallel_rank(),
             "expert-parallel-rng": base + 1024 + 100 * ps.get_expert_model_parallel_rank()
             + ps.get_expert_tensor_parallel_rank()}
    return philox_state(base), {name: philox_state(seeds.get(name, base))
                                for name in rng["tracker"]}


def rng_sharded_object(rng: dict, seed: int):
    """Megatron-LM's ``rng_state``: one ``ShardedObject`` per (pipeline, tensor) rank, replicated
    over data parallelism, holding ``[{random_rng_state, np_rng_state, torch_rng_state,
    cuda_rng_state, rng_tracker_states}]`` (CUDA states: ``cuda_rng_states``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    cuda, tracker = cuda_rng_states(rng, seed)
    state = {"random_rng_state": rng["random"], "np_rng_state": rng["numpy"],
             "torch_rng_state": rng["torch"], "cuda_rng_state": cuda,
             "rng_tracker_states": tracker}
    pp, tp = ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", [state], (pp, tp),
                         (ps.get_pipeline_model_parallel_rank(),
                          ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


# --------------------------------------------------------------------------- reading
def is_checkpoint(path: str) -> bool:
    """A Megatron-LM ``torch_dist`` iteration directory (not one of this trainer's)."""
    from megatron_coe.checkpointing import META

    # dist_checkpointing's metadata.json; the common state is common.pt (megatron-core 0.16) or
    # inside the .distcp shards (0.19)
    return (os.path.isfile(os.path.join(path, "metadata.json"))
            and not os.path.exists(os.path.join(path, META)))


def load_common(path: str) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001 - any unreadable common state is one line
        raise CheckpointError(f"{path}: the common state cannot be read as a Megatron-LM "
                              f"checkpoint's: {type(e).__name__}: {e}") from None


def options_from(ns) -> dict:
    """This trainer's options (its names) from Megatron-LM's ``args``; a Megatron-LM MoE without
    CoE fields is the standard MoE (C=1, outer residual)."""
    values = {}
    for name in OPTIONS:
        if hasattr(ns, name):
            values[name] = getattr(ns, name)
    for name, value in STANDARD_MOE.items():
        if getattr(ns, name, None) is None:
            values[name] = value
    if not getattr(ns, "group_query_attention", False):
        # Megatron-LM keeps --num-query-groups (default 1) but uses one group per head unless
        # --group-query-attention; here unset means one group per head
        values["num_query_groups"] = None
    return values


def refuse_incompatible(ns, path: str) -> None:
    """``CheckpointError`` naming every property of the checkpoint's model that this trainer
    cannot build: properties that are not among this trainer's options (dense layers between
    MoE layers, MTP, squared ReLU, ...; biases, tying, GQA and RoPE settings while the option
    table has no such option)."""
    reasons = []
    if getattr(ns, "num_experts", None) in (None, 0):
        reasons.append("dense GPT (no --num-experts): this trainer builds MoE/CoE layers only")
    freq = getattr(ns, "moe_layer_freq", 1)
    if "moe_layer_freq" not in OPTIONS and freq != 1 and not (
            isinstance(freq, list) and all(f == 1 for f in freq)):
        reasons.append(f"--moe-layer-freq {freq}: dense layers between MoE layers")
    if "add_bias_linear" not in OPTIONS and getattr(ns, "add_bias_linear", False):
        reasons.append("linear biases (Megatron-LM's default; trained without "
                       "--disable-bias-linear)")
    if "untie_embeddings_and_output_weights" not in OPTIONS and not getattr(
            ns, "untie_embeddings_and_output_weights", False):
        reasons.append("tied input/output embeddings (trained without "
                       "--untie-embeddings-and-output-weights)")
    if "position_embedding_type" not in OPTIONS and getattr(
            ns, "position_embedding_type", "rope") != "rope":
        reasons.append(f"--position-embedding-type {ns.position_embedding_type} (this trainer: "
                       "rope)")
    if "num_query_groups" not in OPTIONS and getattr(ns, "group_query_attention", False):
        reasons.append(f"grouped-query attention (--num-query-groups {ns.num_query_groups})")
    if getattr(ns, "mtp_num_layers", None):
        reasons.append(f"multi-token prediction (--mtp-num-layers {ns.mtp_num_layers})")
    if getattr(ns, "squared_relu", False) or getattr(ns, "apply_layernorm_1p", False):
        reasons.append("--squared-relu / --apply-layernorm-1p")
    if "rotary_base" not in OPTIONS and (getattr(ns, "rotary_base", 10000),
                                         getattr(ns, "rotary_percent", 1.0)) != (10000, 1.0):
        reasons.append(f"--rotary-base {ns.rotary_base} --rotary-percent {ns.rotary_percent} "
                       "(this trainer: 10000, 1.0)")
    if getattr(ns, "moe_router_topk_scaling_factor", None) is not None:
        reasons.append("--moe-router-topk-scaling-factor")
    if getattr(ns, "ckpt_format", "torch_dist") != "torch_dist":
        reasons.append(f"--ckpt-format {ns.ckpt_format} (this trainer reads torch_dist)")
    if reasons:
        raise CheckpointError(f"Megatron-LM checkpoint {path} holds a model this trainer cannot "
                              f"build: {'; '.join(reasons)}")


def read_meta(path: str) -> dict:
    """This trainer's metadata for a Megatron-LM checkpoint (``checkpointing.read_meta``'s
    form): iteration, args (this trainer's names), padded vocab, layout, consumed samples."""
    common = load_common(path)
    ns = common.get("args")
    if ns is None:
        raise CheckpointError(f"{path} is a dist_checkpointing checkpoint without Megatron-LM's "
                              "'args' in its common state: neither this trainer's nor "
                              "Megatron-LM's; cannot tell its model")
    refuse_incompatible(ns, path)
    tp = getattr(ns, "tensor_model_parallel_size", 1)
    pp = getattr(ns, "pipeline_model_parallel_size", 1)
    ep = getattr(ns, "expert_model_parallel_size", 1)
    world = getattr(ns, "world_size", None)
    return dict(iteration=int(common.get("iteration", getattr(ns, "iteration", 0))),
                args=options_from(ns), vocab_size=getattr(ns, "padded_vocab_size", None),
                consumed_train_samples=int(getattr(ns, "consumed_train_samples", 0) or 0),
                layout=dict(world_size=world, tp=tp, pp=pp, ep=ep,
                            dp=getattr(ns, "data_parallel_size", None), num_microbatches=None),
                megatron_lm=True,
                num_floating_point_operations_so_far=common.get(
                    "num_floating_point_operations_so_far", 0.0))


def _plain_states(loaded: dict) -> list:
    """The checkpoint's per-optimizer plain entries (param groups, sharding type) in
    ``dist_checkpointing.load``'s ``optimizer``: Megatron-Core's ``ChainedOptimizer`` saves one
    optimizer's state dict as is and n > 1 under the keys 0..n-1."""
    if "optimizer" in loaded:
        return [loaded]
    return [loaded[k] for k in sorted(k for k in loaded if isinstance(k, int))
            if isinstance(loaded[k], dict) and "optimizer" in loaded[k]]


def regroup_optimizer_state(optimizer, loaded: dict, path: str):
    """The state dict for ``optimizer.load_state_dict`` from ``loaded`` (the ``optimizer`` entry
    ``dist_checkpointing.load`` returned: the checkpoint's plain entries in the checkpoint's
    structure, merged with the tensors ``optimizer`` asked for, by key, in its own).

    The optimizer's chaining follows Megatron-LM (``setup.mark_routed_experts``): the routed
    experts have their own distributed optimizer only at EP > 1. A checkpoint chained otherwise
    (another EP size; this trainer's checkpoints before it followed Megatron-LM, which kept the
    experts apart at EP = 1 too) holds the same per-parameter tensors (model-space keys, no
    chain prefix); only its param groups are regrouped: each of ``optimizer``'s groups takes the
    saved group with the same identifiers (weight-decay and LR multipliers, ...) but for the
    expert flag."""
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    ours = list(getattr(optimizer, "chained_optimizers", [optimizer]))
    saved = _plain_states(loaded)
    if len(saved) == len(ours) or not saved:
        return loaded
    tensors = [loaded] if len(ours) == 1 else [loaded[i] for i in range(len(ours))]
    keys = [k for k in param_group_identifier_keys if k != "is_expert_parallel"]
    saved_groups = [g for state in saved for g in state["optimizer"]["param_groups"]]
    out = []
    for i, opt in enumerate(ours):
        template = opt.state_dict()  # this optimizer's groups (without parameters) and entries
        groups = []
        for group in template["optimizer"]["param_groups"]:
            match = next((g for g in saved_groups if all(g.get(k) == group.get(k)
                                                         for k in keys)), None)
            if match is None:
                raise CheckpointError(
                    f"{path}: its optimizer has no parameter group like this run's "
                    f"{ {k: group.get(k) for k in keys} }; load it with --no-load-optim")
            groups.append({**match, "is_expert_parallel": group.get("is_expert_parallel")})
        state = {**template, "optimizer": {**template["optimizer"], "param_groups": groups},
                 "param_state": tensors[i]["param_state"],
                 "param_state_sharding_type": saved[0]["param_state_sharding_type"]}
        if "grad_scaler" in saved[0]:
            state["grad_scaler"] = saved[0]["grad_scaler"]
        out.append(state)
    return out[0] if len(out) == 1 else dict(enumerate(out))


SCHEDULER_LENGTHS = ("num_steps", "lr_warmup_steps", "lr_decay_steps", "wd_incr_steps")


def scheduler_state(loaded: dict, meta: dict) -> dict:
    """The checkpoint's LR/WD scheduler state in samples (Megatron-LM's unit for --train-iters,
    and this trainer's: ``setup.build_scheduler``). Megatron-LM's ``opt_param_scheduler`` is in
    samples; this trainer's checkpoints record the unit (``scheduler_unit``), and those without
    it counted iterations: their lengths are scaled by the global batch size they record."""
    if meta.get("megatron_lm"):
        return loaded["opt_param_scheduler"]
    state = dict(loaded["scheduler"])
    if meta.get("scheduler_unit", "iterations") == "iterations":
        gbs = int(meta["args"]["global_batch_size"])
        for key in SCHEDULER_LENGTHS:
            if state.get(key) is not None:
                state[key] = state[key] * gbs
    return state


def optimizer_layout_matches(path: str, sharding_type: str) -> Optional[str]:
    """None when the checkpoint's distributed-optimizer layout is ``sharding_type``, else why."""
    from megatron.core import dist_checkpointing

    try:
        content = dist_checkpointing.load_content_metadata(path) or {}
    except Exception:  # noqa: BLE001 - older checkpoints have no content metadata
        content = {}
    saved = content.get("distrib_optim_sharding_type")
    if saved == sharding_type:
        return None
    return (f"its optimizer state is in the {saved or 'unrecorded'} layout, this trainer's is "
            f"{sharding_type} (Megatron-LM: --dist-ckpt-optim-fully-reshardable)")


# --------------------------------------------------------------------------- --use-checkpoint-args
# Megatron-LM's load_args_from_checkpoint takes these from the checkpoint only when they are unset;
# every other model option is always the checkpoint's.
CHECKPOINT_ARGS_UNFORCED = ("num_layers", "hidden_size", "ffn_hidden_size", "seq_length",
                            "num_attention_heads", "kv_channels", "max_position_embeddings",
                            "moe_token_dispatcher_type")
# Options that are not architecture fields but that Megatron-LM takes from the checkpoint too.
CHECKPOINT_ARGS_EXTRA = ("seq_length", "hidden_dropout", "attention_dropout",
                         "moe_token_dispatcher_type")


def checkpoint_model_options(load: str) -> dict:
    """{option: value} of the model of the checkpoint ``--load`` names (this trainer's record, or
    a Megatron-LM checkpoint's ``args``); ``OptionError`` when there is none or it is unreadable."""
    from megatron_coe.arch import ModelArch
    from megatron_coe.checkpointing import describe_missing, recover_untracked
    from megatron_coe.training import checkpoint as ckpt
    from megatron_coe.training.options import OptionError

    try:
        path = ckpt.find_checkpoint(load)
        if path is None and os.path.isdir(load):  # a lost tracker: what the trainer resumes
            path = recover_untracked(load)
        if path is None:
            raise OptionError(f"option use_checkpoint_args (--use-checkpoint-args): "
                              f"{describe_missing(load)}; fix --load or give the model's "
                              "options instead")
        meta = ckpt.read_meta(path)
    except CheckpointError as e:
        raise OptionError(f"option use_checkpoint_args (--use-checkpoint-args): {e}") from None
    recorded = meta.get("args") or {}
    out = ModelArch.from_checkpoint_meta(meta).to_option_values()
    for name in CHECKPOINT_ARGS_EXTRA:
        if recorded.get(name) is not None:
            out[name] = recorded[name]
    return out
