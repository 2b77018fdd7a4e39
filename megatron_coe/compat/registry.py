"""Every patch, stand-in and version adaptation between megatron-coe and Megatron-Core.

One ``Entry`` per workaround: its name, the compat module that holds it (``area``), what kind
of change it is, the upstream call sites it covers (paths inside ``megatron/core``), the
Megatron-Core versions it applies to, and a one-line summary. Outside these versions the
code path is not taken (a version adaptation picks the other branch).

Kinds:
    stand-in    replaces a CUDA API that Megatron-Core calls unconditionally (CPU only)
    patch       rebinds a name inside ``megatron.core`` (an upstream bug or a CPU limitation)
    adaptation  calls or builds what the installed version expects (no upstream change)
    internal    an upstream internal (``@internal_api``, a private name, a signature) that CoE
                code outside this package calls or substitutes into Megatron's specs, unchanged
                (``internals.verify_internals`` checks it against the installed release)

Each workaround calls ``mark(name)`` when it is applied or its code path is taken, so
``used()`` tells which entries this process exercised. ``tests/test_compat_registry.py`` lists
the registry, runs a probe per entry and checks that exactly the entries that apply to the
installed version (and machine: ``cuda.*`` only without CUDA) were exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from megatron_coe.compat.versions import megatron_core_version, in_range


@dataclass(frozen=True)
class Entry:
    name: str
    area: str  # module of megatron_coe.compat that implements it
    kind: str  # "stand-in" | "patch" | "adaptation" | "internal"
    upstream: Tuple[str, ...]  # call sites / names inside megatron/core
    versions: str  # ">=A,<B" (see versions.in_range)
    summary: str

    def applies(self, version=None) -> bool:
        return in_range(version or megatron_core_version(), self.versions)


ALL = ">=0.16.1"

REGISTRY: Tuple[Entry, ...] = (
    # ---------------------------------------------------------------- cuda_on_cpu (no CUDA only)
    Entry("cuda.streams", "cuda_on_cpu", "stand-in",
          ("transformer/moe/token_dispatcher.py: torch.cuda.Stream(), torch.cuda.stream()",
           "dist_checkpointing/strategies/filesystem_async.py: torch.cuda.synchronize()"),
          ALL, "CUDA streams, events and synchronize are no-ops"),
    Entry("cuda.current_device", "cuda_on_cpu", "stand-in",
          ("transformer/moe/router.py", "utils.py", "tensor_parallel/mappings.py",
           "tensor_parallel/layers.py", "models/common/embeddings/rotary_pos_embedding.py",
           "distributed/param_and_grad_buffer.py",
           "dist_checkpointing/strategies/state_dict_saver.py"),
          ALL, "torch.cuda.current_device() returns the CPU device"),
    Entry("cuda.rng", "cuda_on_cpu", "stand-in",
          ("tensor_parallel/random.py: _set_cuda_rng_state, model_parallel_cuda_manual_seed, "
           "CudaRNGStatesTracker.fork",),
          ALL, "the CUDA RNG calls drive the CPU default generator (and the fork's 'CPU RNG "
          "state changed within GPU RNG context' warning, always true then, is filtered)"),
    Entry("cuda.alltoall_split_sizes", "cuda_on_cpu", "patch",
          ("transformer/moe/moe_utils.py: maybe_move_tensor_to_cpu",
           "transformer/moe/token_dispatcher.py (its imported binding)"),
          ALL, "all-to-all split sizes become numpy for CPU tensors too (gloo all_to_all_single)"),
    Entry("cuda.uneven_all_gather", "cuda_on_cpu", "patch",
          ("tensor_parallel/mappings.py: _gather_along_first_dim(output_split_sizes=...)",),
          ALL, "uneven all-gather (expert-TP > 1 all-to-all dispatcher) padded for gloo"),
    Entry("cuda.causal_mask", "cuda_on_cpu", "patch",
          ("fusions/fused_softmax.py: get_default_causal_mask (transformer/utils.py, device='cuda')",),
          ALL, "default causal mask allocated on the CPU"),
    Entry("cuda.device_redirect", "cuda_on_cpu", "stand-in",
          ("optimizer/optimizer.py, optimizer/clip_grads.py: device='cuda'",
           "optimizer/distrib_optimizer.py: param.type() == 'torch.cuda.FloatTensor'",
           "pipeline_parallel/schedules.py: device='cuda' counters",
           "models/common/language_module/language_module.py: tied embedding copy .cuda() at PP > 1"),
          ALL, "opt-in context mapping device='cuda' to the CPU for DDP/optimizer/schedules; "
               "suspended around the model forward (torch's private function-mode stack API)"),
    # ---------------------------------------------------------------- te_absent
    Entry("te.router_gemm_name", "te_absent", "patch",
          ("transformer/moe/moe_utils.py: RouterGatingLinearFunction reads te_general_gemm",),
          ">=0.16.1,<0.17", "te_general_gemm defined as None (NameError in every router forward)"),
    Entry("te.mla_have_te", "te_absent", "patch",
          ("transformer/multi_latent_attention.py: HAVE_TE (a MagicMock TE counts as present)",),
          ">=0.16.1,<0.17", "multi_latent_attention.HAVE_TE forced False without TE"),
    # ---------------------------------------------------------------- te_layer_spec
    Entry("te.layer_spec_stand_in", "te_layer_spec", "stand-in",
          ("models/gpt/gpt_layer_specs.py: get_gpt_layer_with_transformer_engine_spec reads the "
           "module global TESpecProvider (undefined without TE in 0.16.1, None in 0.19.2)",),
          ALL, "without TE, the TE layer spec is built with a placeholder backend provider, to "
               "read its checkpoint keys (never to build modules)"),
    # ---------------------------------------------------------------- moe_specs_and_signatures
    Entry("specs.moe_spec_form", "moe_specs_and_signatures", "adaptation",
          ("models/gpt/moe_module_specs.py: get_moe_module_spec_for_backend",
           "models/backends.py: LocalSpecProvider.grouped_mlp_modules"),
          ALL, "MoE/expert specs read from ModuleSpec (<0.18) or functools.partial (>=0.18)"),
    Entry("signatures.moe_layer_kwargs", "moe_specs_and_signatures", "adaptation",
          ("transformer/transformer_layer.py: mlp(config=, pg_collection=, is_mtp_layer=, name=)",
           "transformer/moe/moe_layer.py: router(..., is_mtp_layer=), experts(..., name=)"),
          ALL, "CoE modules accept is_mtp_layer (>=0.17) / name (>=0.18) and forward only "
               "the keywords the installed base class takes"),
    Entry("signatures.mlp_pg_collection", "moe_specs_and_signatures", "adaptation",
          ("transformer/transformer_layer.py: [Module 8] passes pg_collection only to MoELayer "
           "itself",),
          ">=0.16.1,<0.18", "CoETransformerLayer puts its pg_collection into the CoE MLP spec's "
                            "params (and silences the 'Unknown MLP type' warning)"),
    # ---------------------------------------------------------------- mla_q_norm
    Entry("mla.no_q_norm_without_q_lora", "mla_q_norm", "adaptation",
          ("transformer/mla_qk_norm_config.py: QKNormConfigResolver (qk_layernorm without "
           "q_lora_rank = a q norm fused into linear_q_proj)",
           "transformer/multi_latent_attention.py: MLASelfAttention._resolve_qk_norm_config"),
          ">=0.19", "MLA with latent norms and no query compression builds no q norm "
                    "(DeepSeek-V2; 0.16's behaviour) instead of a TE-fused one"),
    # ---------------------------------------------------------------- mla_latent_eps
    Entry("mla.latent_eps_kept", "mla_latent_eps", "adaptation",
          ("transformer/mla_qk_norm_config.py: QKNormConfigResolver._is_fused_norm_linear "
           "(class identity with the backend's fused norm+linear) replaces a wrapped "
           "linear_q_up_proj / linear_kv_up_proj by the backend default",
           "transformer/multi_latent_attention.py: MLASelfAttention._resolve_qk_norm_config"),
          ">=0.19", "the q/kv latent norms keep --mla-latent-norm-epsilon when fused into "
                    "Transformer Engine's LayerNormColumnParallelLinear (the spec's eps wrapper "
                    "is put back where the resolver chose the class it wraps)"),
    # ---------------------------------------------------------------- float32_buffers
    Entry("float16.float32_count_buffers", "float32_buffers", "adaptation",
          ("transformer/module.py: Float16Module.__init__ module.bfloat16() / .half() (casts "
           "every floating buffer)",
           "transformer/moe/router.py: TopKRouter local_tokens_per_expert, "
           "global_tokens_per_expert, ga_steps (float32 counts; only expert_bias is converted "
           "back, _maintain_float32_expert_bias)"),
          ALL, "the CoE layer's per-pass counts and its routers' count buffers and expert bias "
               "stay float32 (exact) in a bf16/fp16 model"),
    # ---------------------------------------------------------------- router_losses
    Entry("router.pass_metric_names", "router_losses", "patch",
          ("transformer/moe/router.py: save_to_aux_losses_tracker (<0.18) / "
           "get_moe_metrics_tracker().record (>=0.18) in attach_and_log_load_balancing_loss "
           "and apply_z_loss",),
          ALL, "during a CoE router's forward, router metrics are recorded as <name>_pass<t>; "
               "the losses themselves are upstream's"),
    Entry("router.metrics_tracker", "router_losses", "adaptation",
          ("transformer/moe/moe_logging.py: get_moe_metrics_tracker().metrics (>=0.18)",
           "transformer/moe/moe_logging.py: MoEMetricsTracker._sync_metrics (>=0.18, private; "
           "what the deprecated reduce_aux_losses_tracker_across_ranks calls)",
           "transformer/moe/moe_utils.py: get_moe_layer_wise_logging_tracker, "
           "reduce_aux_losses_tracker_across_ranks, clear_aux_losses_tracker (<0.18; "
           "deprecated from 0.16 in 0.19.2's code)"),
          ALL, "read, reduce across ranks and clear the per-layer router metrics through the "
               "installed release's tracker API"),
    # ---------------------------------------------------------------- transformer_config
    Entry("config.cuda_graph_field", "transformer_config", "adaptation",
          ("transformer/transformer_config.py: cuda_graph_scope (<0.18), cuda_graph_modules "
           "(>=0.18; cuda_graph_scope a deprecated alias migrated in __post_init__)",),
          ALL, "the CoE CUDA-graph guard reads the field(s) the installed version uses"),
    # ---------------------------------------------------------------- dist_checkpointing
    Entry("ckpt.write_results_queue", "dist_checkpointing", "adaptation",
          ("dist_checkpointing/strategies/filesystem_async.py: _get_write_results_queue (<0.17), "
           "get_write_results_queue (>=0.17), module global _results_queue",),
          ALL, "get / install dist_checkpointing's write-results queue"),
    Entry("ckpt.common_state_location", "dist_checkpointing", "adaptation",
          ("dist_checkpointing/serialization.py: save stores the common state in common.pt "
           "(0.16.1) or as the 'common_state' ShardedObject in the torch_dist shards (0.19.2); "
           "load_common_state_dict / _legacy_common_state_exists (0.19.2 reads both)",),
          ALL, "--load of a checkpoint the installed release cannot read (0.19.2's saved under "
               "0.16.1) is refused in one line before loading"),
    # ---------------------------------------------------------------- context_parallel
    Entry("cp.batch_slicing", "context_parallel", "adaptation",
          ("utils.py: get_batch_on_this_cp_rank(batch, cp_group) (0.16.1); "
           "get_batch_on_this_cp_rank(batch, is_hybrid_cp, cp_group, ...) (0.19.2)",),
          ALL, "the trainer's forward step slices each micro-batch to this context-parallel "
               "rank's load-balanced chunks through the installed signature"),
    # ---------------------------------------------------------------- async_checkpoint
    Entry("ckpt.async_strategy", "async_checkpoint", "adaptation",
          ("dist_checkpointing/serialization.py: save(async_sharded_save=True) takes "
           "async_strategy (>=0.17, default 'nvrx' = nvidia-resiliency-ext); Megatron-Core's own "
           "async writer is 'mcore' (the only one before 0.17)",),
          ALL, "--async-save requests Megatron-Core's own async writer in every release"),
    # ---------------------------------------------------------------- batch_rampup
    Entry("batch.rampup_calculator", "batch_rampup", "adaptation",
          ("num_microbatches_calculator.py: RampupBatchsizeNumMicroBatchesCalculator (<0.18)",),
          ">=0.16.1,<0.18", "--rampup-batch-size is Megatron-Core's ramp calculator"),
    Entry("batch.rampup_step_schedule", "batch_rampup", "adaptation",
          ("num_microbatches_calculator.py: StepBatchsizeNumMicroBatchesCalculator (>=0.18; the "
           "ramp calculator removed, Megatron-LM's --rampup-batch-size ignored)",),
          ">=0.18", "--rampup-batch-size is a step schedule with the ramp calculator's "
                    "thresholds (the same batch at every consumed-sample count)"),
    # ---------------------------------------------------------------- optimizer_state
    Entry("optim.fresh_adam_state", "optimizer_state", "adaptation",
          ("optimizer/distrib_optimizer.py: DistributedOptimizer.state_dict reads state['step'] "
           "of every parameter (non-Apex/TE torch AdamW, whose state is created lazily)",),
          ALL, "a fresh torch AdamW gets the zero state of its first step before a save / load"),
    Entry("optim.load_missing_step", "optimizer_state", "patch",
          ("optimizer/distrib_optimizer.py: DistributedOptimizer.load_state_dict (one shared "
           "'step' tensor) -> _set_main_param_and_optimizer_states (KeyError 'step' on "
           "fully_reshardable tensors)",),
          ALL, "during an optimizer load the missing 'step' is copied onto itself; steps unshared "
               "afterwards"),
    # ---------------------------------------------------------------- datasets
    Entry("data.blended_get_rank", "datasets", "patch",
          ("datasets/blended_dataset.py: BlendedDataset._build_indices calls "
           "torch.distributed.get_rank() unguarded on a cache miss (guarded in 0.19.2)",),
          ">=0.16.1,<0.19", "while building datasets without a process group, "
                            "blended_dataset's torch.distributed.get_rank() answers 0"),
    Entry("data.helpers_cpp", "datasets", "adaptation",
          ("datasets/helpers.py: the compiled helpers_cpp extension (shipped in the wheels; "
           "datasets/utils.py compile_helpers needs a Makefile the wheels lack)",),
          ALL, "a missing compiled extension is one error naming the installed release"),
    # ---------------------------------------------------------------- internals (unchanged)
    Entry("internal.moe_layer_stages", "internals", "internal",
          ("transformer/moe/moe_layer.py: MoELayer.route, preprocess, dispatch, "
           "shared_experts_compute, routed_experts_compute (@internal_api), combine, "
           "postprocess (called per pass by transformer/coe_layer.py)",),
          ALL, "the CoE layer runs MoELayer's stages once per pass"),
    Entry("internal.local_norm", "internals", "internal",
          ("transformer/torch_norm.py: WrappedTorchNorm (local spec; no sequence parallelism) "
           "replaced by transformer/local_modules.py TorchNorm",),
          ALL, "local-spec norms that accept sequence parallelism (WrappedTorchNorm's keywords)"),
    Entry("internal.local_mla_attention", "internals", "internal",
          ("transformer/multi_latent_attention.py: core_attention(k_channels=, v_channels=)",
           "transformer/dot_product_attention.py: DotProductAttention.__init__ (takes neither) "
           "-> transformer/local_modules.py MLADotProductAttention"),
          ALL, "local core attention for MLA (kv_channels == v_head_dim)"),
    Entry("internal.ddp_forward_pre_hook", "internals", "internal",
          ("distributed/distributed_data_parallel.py: DistributedDataParallel."
           "_make_forward_pre_hook, remove_forward_pre_hook_handles (called by training/setup.py "
           "for --overlap-param-gather with grouped experts)",),
          ALL, "DDP's param all-gather wait hook run for experts read without a module call"),
)

BY_NAME = {e.name: e for e in REGISTRY}

_USED: set = set()


def mark(name: str) -> None:
    """Record that workaround ``name`` was applied / taken in this process."""
    if name not in BY_NAME:
        raise KeyError(f"{name!r} is not in megatron_coe.compat.registry.REGISTRY")
    _USED.add(name)


def used() -> frozenset:
    """Names of the workarounds this process applied or took so far."""
    return frozenset(_USED)


def entry(name: str) -> Entry:
    return BY_NAME[name]


def applicable(version=None) -> Tuple[Entry, ...]:
    """Entries that apply to ``version`` (default: the installed Megatron-Core)."""
    return tuple(e for e in REGISTRY if e.applies(version))


def describe(version=None) -> str:
    """A table of the registry for the installed version (``python -m megatron_coe.compat``)."""
    lines = []
    width = max(len(e.name) for e in REGISTRY)
    for e in REGISTRY:
        mark = "applies" if e.applies(version) else "n/a"
        lines.append(f"{e.name:{width}s} {e.kind:10s} {e.versions:18s} {mark:7s} {e.area}: "
                     f"{e.summary}")
    return "\n".join(lines)
