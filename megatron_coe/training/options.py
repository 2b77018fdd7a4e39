"""Trainer options: ONE table (the ``TrainArgs`` dataclass) for the command line and YAML files.

Every option is one dataclass field declared with ``opt(...)``. The command-line flag is the field
name with dashes (``moe_router_topk`` -> ``--moe-router-topk``, the Megatron-LM spelling); YAML
files use the same keys, with dashes or underscores. Precedence: defaults < ``--config FILE.yaml``
< flags. Boolean options get ``--name`` / ``--no-name``, except those whose name already starts
with ``no_`` (``--no-load-optim``, ``--no-load-rng``): a plain switch.

``model=`` names the Megatron-Core ``TransformerConfig`` field an option feeds (``True``: same
name); ``setup.build_model_config`` passes these through, and the config validates them itself.
``shape=True`` marks the options that change parameter shapes or state-dict keys: a ``--load``
checkpoint must agree on all of them (``checkpoint.check_compatible``).

``valid=`` is the option's range (``'>= 1'``, ``'> 0'``, ``'[0, 1)'``; None, the unset value of an
optional option, is always allowed, and a float must be finite). ``parse_args`` checks every value
against it, and the few rules between options that need nothing but the options (``--min-lr <=
--lr``, the ``--split`` string, ``--train-iters`` or ``--train-samples`` with only the LR
lengths (and the batch ramp) of that kind of training, LR warmup shorter than the decay, the
architecture record's ``ModelArch.check``), once, before anything else runs: an ``OptionError``
naming the flag, the value and the valid range. Rules that need the world size, the data or the
machine live with their owners (model config ``__post_init__``; parallel layout, batch
arithmetic, the batch ramp's sizes and memory in ``setup.check_layout``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml

from megatron_coe import arch
from megatron_coe.cli import OneLineParser


class OptionError(ValueError):
    """A bad option value or config file; the message names the option."""


class Range:
    """A closed/open numeric interval parsed from ``'>= 1'``, ``'> 0'``, ``'[0, 1)'``, ``'(0, 1]'``."""

    _BOUND = re.compile(r"^(>=|>)\s*(\S+)$")
    _INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")

    def __init__(self, text: str):
        self.text = text
        if m := self._BOUND.match(text):
            self.lo, self.lo_open, self.hi, self.hi_open = float(m[2]), m[1] == ">", math.inf, True
        elif m := self._INTERVAL.match(text):
            self.lo, self.hi = float(m[2]), float(m[3])
            self.lo_open, self.hi_open = m[1] == "(", m[4] == ")"
        else:
            raise ValueError(f"bad range {text!r}")

    def __contains__(self, value) -> bool:
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        return self.text


def opt(default, help, *, type=None, choices=None, model=None, shape=False, list_of=None,
        group="training", valid=None, flag=None, arch=None):
    """Declare one option. ``type`` defaults to the default's type; ``list_of`` for list options;
    ``valid`` the numeric range (see the module docstring); ``flag`` the command-line flag when it
    is not the name with dashes (Megatron-LM's ``--norm-epsilon`` for ``layernorm_epsilon``);
    ``arch`` the ``megatron_coe.arch.ModelArch`` field of an architecture option."""
    if type is None and list_of is None:
        if default is None:
            raise TypeError(f"option with default None needs type= ({help!r})")
        type = default.__class__
    if type in (int, float) and valid is None:
        raise TypeError(f"numeric option needs valid= ({help!r})")
    meta = dict(help=help, type=type, choices=choices, model=model, shape=shape, list_of=list_of,
                group=group, valid=None if valid is None else Range(valid), flag=flag, arch=arch)
    if list_of is not None:
        return field(default_factory=lambda: list(default or []), metadata=meta)
    return field(default=default, metadata=meta)


M, P, T, D, C, L = "model", "parallelism", "training", "data", "checkpointing", "logging"


# The architecture rows (shapes, attention, norms, RoPE, experts and router, CoE chain) come from
# the one architecture record, megatron_coe.arch.ModelArch: same defaults, flags and help.
_ArchOptions = dataclasses.make_dataclass("_ArchOptions", arch.option_rows(opt))


@dataclass
class TrainArgs(_ArchOptions):
    # ------------------------------------------------------------------ model (not architecture)
    moe_router_load_balancing_type: str = opt(
        "aux_loss", "Load-balancing loss.",
        choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"], model=True,
        group=M)
    moe_aux_loss_coeff: float = opt(0.0, "Load-balancing loss coefficient.", model=True, group=M,
                                    valid='>= 0')
    moe_z_loss_coeff: Optional[float] = opt(None, "Router z-loss coefficient.", type=float,
                                            model=True, group=M, valid='>= 0')
    moe_token_dispatcher_type: str = opt("allgather", "Token dispatcher.",
                                         choices=["allgather", "alltoall", "flex"], model=True,
                                         group=M)
    moe_router_bias_update_rate: float = opt(1e-3, "Expert-bias update rate.", model=True,
                                             group=M, valid='>= 0')
    moe_flex_dispatcher_backend: str = opt(
        "deepep", "Backend of the flex dispatcher: deepep, or hybridep (both from the deep_ep "
        "package, refused when it does not import).", choices=["deepep", "hybridep"],
        model=True, group=M)
    moe_expert_capacity_factor: Optional[float] = opt(
        None, "Token dropping: each expert takes at most factor x tokens x top-k / experts "
        "tokens per CoE pass (capacity computed per pass on that pass's routing); the rest are "
        "dropped (None: no dropping). HF export refuses it.", type=float, model=True, group=M,
        valid="> 0")
    moe_pad_expert_input_to_capacity: bool = opt(
        False, "With --moe-expert-capacity-factor: pad every expert's input to its capacity.",
        model=True, group=M)
    moe_token_drop_policy: str = opt("probs", "With --moe-expert-capacity-factor: drop the "
                                     "lowest-probability tokens (probs) or the latest in the "
                                     "sequence (position).", choices=["probs", "position"],
                                     model=True, group=M)
    moe_grouped_gemm: Optional[bool] = opt(
        None, "Grouped-GEMM experts (TEGroupedMLP): unset = on with the Transformer Engine "
        "layers (--no-moe-grouped-gemm: SequentialMLP of TE linears); the local layers always "
        "use GroupedSequentialMLP (Megatron-LM: off).", type=bool, group=M)
    moe_router_dtype: Optional[str] = opt(
        None, "Dtype of router logits, routing probabilities and the weighted sum of expert "
        "outputs: fp32 or fp64 (unset: the params dtype, bf16 with --bf16; the paper presets "
        "use fp32).", type=str, choices=["fp32", "fp64"], model=True, group=M)
    init_method_std: float = opt(0.02, "Std of the normal weight init.", model=True, group=M,
                                 valid='> 0')
    coe_router_init_method: str = opt(
        "normal", "Router weight init: normal (Megatron's, N(0, --init-method-std)) or "
        "kaiming_uniform (torch.nn.Linear's default U(+-1/sqrt(hidden)), as the paper's code).",
        choices=["normal", "kaiming_uniform"], model=True, group=M)
    hidden_dropout: float = opt(0.1, "Dropout on hidden states.", model=True, group=M,
                                valid='[0, 1)')
    attention_dropout: float = opt(0.1, "Dropout on attention probabilities.", model=True, group=M,
                                   valid='[0, 1)')
    seq_length: Optional[int] = opt(None, "Sequence length (tokens per sample; required).",
                                    type=int, group=M, valid='>= 1')
    make_vocab_size_divisible_by: int = opt(128, "Pad the vocabulary to a multiple of this.",
                                            group=M, valid='>= 1')
    # ------------------------------------------------------------------ parallelism
    tensor_model_parallel_size: int = opt(1, "Tensor-parallel size.", model=True, group=P,
                                          valid='>= 1')
    pipeline_model_parallel_size: int = opt(1, "Pipeline-parallel size.", model=True, group=P,
                                            valid='>= 1')
    context_parallel_size: int = opt(
        1, "Context-parallel size: each sequence split over this many ranks (Megatron-Core's "
        "load-balanced 2 x CP chunks). Needs Transformer Engine's attention (a CUDA GPU; refused "
        "on CPU and with --transformer-impl local) and --seq-length divisible by 2 x CP.",
        model=True, group=P, valid='>= 1')
    cp_comm_type: list = opt(
        ["p2p"], "Context-parallel communication of the attention: p2p, a2a or allgather; one "
        "for every layer, or one per layer (as many as --num-layers).", list_of=str, group=P)
    decoder_first_pipeline_num_layers: Optional[int] = opt(
        None, "Uneven pipeline: layers of the first stage (the other stages share the rest "
        "evenly; e.g. DeepSeek-V3's dense first layers).", type=int,
        model="num_layers_in_first_pipeline_stage", group=P, valid=">= 1")
    decoder_last_pipeline_num_layers: Optional[int] = opt(
        None, "Uneven pipeline: layers of the last stage.", type=int,
        model="num_layers_in_last_pipeline_stage", group=P, valid=">= 1")
    num_layers_per_virtual_pipeline_stage: Optional[int] = opt(
        None, "Interleaved pipeline: layers per virtual stage (each pipeline rank then holds "
        "layers / (pipeline size x this) model chunks; even stages only, excludes "
        "--num-virtual-stages-per-pipeline-rank).", type=int, group=P, valid=">= 1")
    num_virtual_stages_per_pipeline_rank: Optional[int] = opt(
        None, "Interleaved pipeline: model chunks (virtual stages) per pipeline rank; also with "
        "--decoder-first/last-pipeline-num-layers (every stage's layers divisible by it).",
        type=int, group=P, valid=">= 1")
    expert_model_parallel_size: int = opt(1, "Expert-parallel size.", model=True, group=P,
                                          valid='>= 1')
    expert_tensor_parallel_size: Optional[int] = opt(None, "Expert tensor-parallel size "
                                                     "(default: tensor-parallel size).", type=int,
                                                     model=True, group=P, valid='>= 1')
    sequence_parallel: bool = opt(False, "Sequence parallelism (required by MoE with TP > 1).",
                                  model=True, group=P)
    distributed_backend: Optional[str] = opt(None, "torch.distributed backend (default: nccl "
                                             "with CUDA, else gloo; Megatron-LM: nccl).", type=str,
                                             choices=["gloo", "nccl"], group=P)
    transformer_impl: Optional[str] = opt(None, "Layer implementation (default: "
                                          "transformer_engine on a GPU with TE, else local; "
                                          "Megatron-LM: transformer_engine).",
                                          type=str, choices=["local", "transformer_engine"],
                                          group=P)
    bf16: bool = opt(False, "bf16 mixed precision (GPU).", group=P)
    fp8_format: Optional[str] = opt(None, "FP8 training on a Hopper/Ada GPU with Transformer "
                                    "Engine: e4m3, or hybrid (E4M3 forward, E5M2 gradients). "
                                    "Implies --bf16, the TE layers, grouped-GEMM experts and "
                                    "router padding (training/precision.py).",
                                    type=str, choices=["e4m3", "hybrid"], group=P)
    fp8_recipe: str = opt("tensorwise", "FP8 scaling recipe (Megatron-Core fp8_recipe): "
                          "tensorwise (current scaling; the default for CoE, whose passes call "
                          "the same TE modules C times per step), delayed (Megatron-LM's "
                          "default; unverified with C > 1), blockwise (Hopper), mxfp8 "
                          "(Blackwell).",
                          choices=["delayed", "tensorwise", "mxfp8", "blockwise"], group=P)
    # Megatron-LM's fused kernels: on by default on a GPU where each one's kernel imports, always
    # off on CPU (training/precision.plan_fusions); the start-up line lists those in force.
    bias_swiglu_fusion: bool = opt(True, "Fused bias + SwiGLU (GPU).", group=P)
    masked_softmax_fusion: bool = opt(True, "Fused scale + mask + softmax of the local "
                                      "attention (GPU, Apex kernels).", group=P)
    bias_dropout_fusion: bool = opt(True, "Fused bias + dropout + residual add (GPU).", group=P)
    apply_rope_fusion: bool = opt(True, "Fused RoPE (GPU: Transformer Engine; MLA: YaRN only, "
                                  "triton).", flag="--rope-fusion", group=P)
    gradient_accumulation_fusion: bool = opt(
        True, "Weight gradients accumulated straight into the fp32 main grads (GPU; needs "
        "Apex's fused_weight_gradient_mlp_cuda).", group=P)
    moe_permute_fusion: Optional[bool] = opt(
        None, "Fused token permutation in the dispatcher: unset = on on a GPU whose Transformer "
        "Engine has it (>= 2.1); --moe-permute-fusion insists (Megatron-LM: off).", type=bool,
        group=P)
    moe_router_fusion: bool = opt(False, "Fused router top-k and aux-loss scores (GPU, "
                                  "Transformer Engine >= 2.6; as in Megatron-LM, off unless "
                                  "given).", group=P)
    distributed_timeout_minutes: float = opt(
        10.0, "Timeout of every collective, on the default process group and every TP/PP/EP/DP "
        "group (Megatron-LM's flag); a rank that waits longer for a hung peer stops with an "
        "error. Fractions of a minute are accepted (tests use 0.1).", group=P, valid="> 0")
    recompute_modules: list = opt(None, "Selective activation recompute of these modules "
                                  "(e.g. core_attn moe layernorm mla_up_proj shared_experts); "
                                  "implies --recompute-granularity selective.",
                                  list_of=str, group=P)
    recompute_activations: bool = opt(False, "Megatron-LM's shorthand for "
                                      "--recompute-granularity selective.", group=P)
    recompute_granularity: Optional[str] = opt(
        None, "Activation recompute: full (whole transformer layers, every CoE pass included; "
        "needs --recompute-method and --recompute-num-layers) or selective (the modules of "
        "--recompute-modules, default core_attn).", type=str, choices=["full", "selective"],
        model=True, group=P)
    recompute_method: Optional[str] = opt(
        None, "Full recompute: uniform (checkpoint every --recompute-num-layers layers as one "
        "unit) or block (the first --recompute-num-layers layers of each pipeline stage).",
        type=str, choices=["uniform", "block"], model=True, group=P)
    recompute_num_layers: Optional[int] = opt(None, "Layers per recompute unit (uniform) or "
                                              "recomputed layers per pipeline stage (block).",
                                              type=int, model=True, group=P, valid=">= 1")
    overlap_grad_reduce: bool = opt(False, "Overlap the data-parallel gradient reduce-scatter "
                                    "with the backward pass (Megatron-Core DDP buckets).", group=P)
    overlap_param_gather: bool = opt(False, "Overlap the distributed optimizer's parameter "
                                     "all-gather with the next forward pass (needs "
                                     "--overlap-grad-reduce).", group=P)
    # ------------------------------------------------------------------ training
    micro_batch_size: Optional[int] = opt(None, "Samples per micro-batch per data-parallel rank "
                                          "(required).", type=int, valid='>= 1')
    global_batch_size: Optional[int] = opt(None, "Samples per optimizer step (all ranks, all "
                                           "micro-batches; default: --micro-batch-size x the "
                                           "data-parallel size).", type=int, valid='>= 1')
    rampup_batch_size: list = opt(
        None, "START INCR SAMPLES: ramp the global batch from START up to --global-batch-size "
        "in steps of INCR spread evenly over the first SAMPLES samples (Megatron-LM's ramp; "
        "needs --train-samples).", list_of=int)
    train_iters: Optional[int] = opt(None, "Optimizer steps to train for (this or "
                                     "--train-samples is required).", type=int, valid='>= 1')
    train_samples: Optional[int] = opt(
        None, "Samples to train on, instead of --train-iters (the LR schedule and the batch "
        "ramp count samples; the steps are derived as in Megatron-LM).", type=int, valid='>= 1')
    lr: Optional[float] = opt(None, "Peak learning rate (required).", type=float, valid='> 0')
    min_lr: float = opt(0.0, "Final learning rate of the decay.", valid='>= 0')
    lr_decay_style: str = opt("linear", "LR decay after warmup (WSD: warmup-stable-decay, the "
                              "last --lr-wsd-decay-iters steps decay).",
                              choices=["cosine", "constant", "linear", "inverse-square-root",
                                       "WSD"])
    lr_wsd_decay_style: str = opt("exponential", "Decay shape of the WSD decay phase.",
                                  choices=["exponential", "linear", "cosine", "minus_sqrt"])
    lr_wsd_decay_iters: Optional[int] = opt(None, "Steps of the WSD decay phase (required with "
                                            "--lr-decay-style WSD).", type=int, valid='>= 1')
    lr_wsd_decay_samples: Optional[int] = opt(None, "Samples of the WSD decay phase (with "
                                              "--train-samples).", type=int, valid='>= 1')
    lr_warmup_iters: int = opt(0, "Linear warmup steps (from 0).", valid='>= 0')
    lr_warmup_samples: int = opt(0, "Linear warmup samples (with --train-samples).",
                                 valid='>= 0')
    lr_warmup_fraction: Optional[float] = opt(None, "Warmup as a fraction of the decay "
                                              "(overrides --lr-warmup-iters/-samples).",
                                              type=float, valid='[0, 1)')
    lr_decay_iters: Optional[int] = opt(None, "Decay steps (default: --train-iters).", type=int,
                                        valid='>= 1')
    lr_decay_samples: Optional[int] = opt(None, "Decay samples (with --train-samples; default: "
                                          "--train-samples).", type=int, valid='>= 1')
    weight_decay: float = opt(0.01, "AdamW weight decay (not on biases and norms).", valid='>= 0')
    adam_beta1: float = opt(0.9, "AdamW beta1.", valid='[0, 1)')
    adam_beta2: float = opt(0.999, "AdamW beta2.", valid='[0, 1)')
    adam_eps: float = opt(1e-8, "AdamW epsilon.", valid='> 0')
    clip_grad: float = opt(1.0, "Clip the global gradient norm to this (0: off).", valid='>= 0')
    seed: int = opt(1234, "Random seed (init, data order).", valid='>= 0')
    calculate_per_token_loss: bool = opt(
        False, "Scale the loss and gradients by the number of loss tokens of the whole global "
        "batch (all micro-batches and data-parallel ranks) instead of averaging per micro-batch "
        "(Megatron-Core's mechanism: the schedule and finalize_model_grads).", model=True)
    check_for_nan_in_loss_and_grad: bool = opt(
        True, "Stop (exit 3) at the first step whose lm loss, aux loss or gradient norm is NaN or "
        "Inf, without saving; a checkpoint is saved only when every parameter is finite.")
    exit_interval: Optional[int] = opt(None, "Save (if --save) and exit after an iteration "
                                       "divisible by this.", type=int, valid='>= 1')
    exit_signal_handler: bool = opt(False, "On SIGTERM/SIGUSR1: save at the next step boundary "
                                    "and exit 0 (off: the signal ends the process at once, as "
                                    "in Megatron-LM; slurm/pretrain.sbatch turns it on).")
    exit_duration_in_mins: Optional[float] = opt(
        None, "Save and exit 0 at the last step boundary before this many minutes of wall time "
        "since the trainer started.", type=float, valid='> 0')
    exit_time_margin_mins: float = opt(
        5.0, "With $COE_JOB_END_TIME (epoch seconds, set by slurm/pretrain.sbatch): save and "
        "exit 0 at the last step boundary this many minutes before it.", valid='>= 0')
    # ------------------------------------------------------------------ data
    data_path: list = opt(None, "Data prefixes (optionally weighted: W1 P1 W2 P2).",
                          list_of=str, group=D)
    split: Optional[str] = opt(None, "Train,valid,test split weights of --data-path (default, "
                               "as Megatron-LM's legacy value: 969,30,1).", type=str, group=D)
    train_data_path: list = opt(None, "Training data prefixes (blend), used whole; with "
                                "--valid-data-path, instead of --data-path and --split.",
                                list_of=str, group=D)
    valid_data_path: list = opt(None, "Validation data prefixes (blend), used whole.",
                                list_of=str, group=D)
    tokenizer_type: Optional[str] = opt(None, "Megatron-LM's tokenizer class; this trainer reads "
                                        "Hugging Face tokenizer files (tools/preprocess_data.py "
                                        "writes them): HuggingFaceTokenizer, or unset.", type=str,
                                        choices=["HuggingFaceTokenizer"], group=D)
    tokenizer_model: Optional[str] = opt(None, "Tokenizer file or directory (default: the one "
                                         "beside the first data prefix).", type=str, group=D)
    data_cache_path: Optional[str] = opt(None, "Where dataset index caches are written.",
                                         type=str, group=D)
    mock_data: bool = opt(False, "Synthetic learnable sequences instead of --data-path.",
                          group=D)
    vocab_size: Optional[int] = opt(None, "Vocabulary of --mock-data (required with it).",
                                    type=int, group=D, valid='>= 1')
    num_workers: int = opt(2, "DataLoader worker processes per rank (0: load in the training "
                           "process).", group=D, valid='>= 0')
    # ------------------------------------------------------------------ evaluation / logging
    eval_interval: Optional[int] = opt(None, "Validate every this many steps (unset: only at "
                                       "the end, as in Megatron-LM).", type=int, group=L,
                                       valid='>= 1')
    eval_iters: int = opt(100, "Global batches per validation (the same ones each time).", group=L,
                          valid='>= 0')
    skip_train: bool = opt(False, "Only evaluate (after --load) and exit.", group=L)
    log_interval: int = opt(100, "Print a progress line every this many steps.", group=L,
                            valid='>= 1')
    tensorboard_dir: Optional[str] = opt(None, "TensorBoard event directory.", type=str, group=L)
    metrics_file: Optional[str] = opt(None, "Per-step JSONL metrics (default: "
                                      "<tensorboard-dir or save>/metrics.jsonl).", type=str,
                                      group=L)
    peak_tflops: Optional[float] = opt(None, "Peak TFLOP/s per device for MFU (default: known "
                                       "GPUs only).", type=float, group=L, valid='> 0')
    wandb_project: Optional[str] = opt(None, "Weights & Biases project: log the TensorBoard "
                                       "scalars to W&B too (WANDB_MODE=offline: only to the run "
                                       "directory).", type=str, group=L)
    wandb_exp_name: Optional[str] = opt(None, "W&B run name (default: W&B's generated name).",
                                        type=str, group=L)
    wandb_save_dir: Optional[str] = opt(None, "W&B run directory (default: <--save>/wandb).",
                                        type=str, group=L)
    wandb_entity: Optional[str] = opt(None, "W&B entity (user or team).", type=str, group=L)
    profile: bool = opt(False, "Profile steps --profile-step-start..--profile-step-end on "
                        "--profile-ranks: a torch profiler trace with --use-pytorch-profiler, "
                        "else a CUDA profiler (nsys) capture range.", group=L)
    use_pytorch_profiler: bool = opt(False, "With --profile: torch.profiler, trace written to "
                                     "<--tensorboard-dir>/../torch_profile/rank-N.json.gz.",
                                     group=L)
    profile_step_start: int = opt(10, "First profiled iteration.", group=L, valid='>= 0')
    profile_step_end: int = opt(12, "Profiling stops after this iteration.", group=L,
                                valid='>= 1')
    profile_ranks: list = opt(None, "Global ranks to profile (default: all).", list_of=int,
                              group=L)
    log_straggler: bool = opt(False, "Report the slowest and fastest rank (step time, "
                              "throughput) every --log-interval steps: Megatron-Core's "
                              "StragglerDetector on CUDA, per-rank step times on CPU.", group=L)
    disable_straggler_on_startup: bool = opt(False, "Start the straggler detector switched off "
                                             "(toggled through its control port).", group=L)
    straggler_ctrlr_port: int = opt(65535, "Control port of the straggler detector (rank 0).",
                                    group=L, valid='[1, 65535]')
    straggler_minmax_count: int = opt(1, "How many slowest/fastest ranks to report.", group=L,
                                      valid='>= 1')
    # ------------------------------------------------------------------ checkpointing
    save: Optional[str] = opt(None, "Checkpoint directory to save to.", type=str, group=C)
    save_interval: Optional[int] = opt(None, "Save every this many steps (and at the end).",
                                       type=int, group=C, valid='>= 1')
    load: Optional[str] = opt(None, "Checkpoint directory to resume from (latest published "
                              "iteration; none found = start fresh).", type=str, group=C)
    no_load_optim: bool = opt(False, "Load only model weights (new optimizer and schedule, "
                              "iteration 0); implied for weights-only checkpoints (those of "
                              "tools/convert_from_hf.py).", group=C)
    no_load_rng: bool = opt(False, "Do not restore RNG states.", group=C)
    use_checkpoint_args: bool = opt(False, "Take the model's architecture from the --load "
                                    "checkpoint's record (this trainer's or Megatron-LM's "
                                    "args), as Megatron-LM: the layout of the layers always; "
                                    "--num-layers, --hidden-size, --num-attention-heads, "
                                    "--ffn-hidden-size, --kv-channels, --seq-length, "
                                    "--max-position-embeddings and the dispatcher only when "
                                    "not given.", group=C)
    override_checkpoint_arch: bool = opt(False, "With --load: train on with this run's values "
                                         "of the architecture fields that change the function "
                                         "but no shape (residuals, norm eps, RoPE/YaRN, "
                                         "routing) where they differ from the checkpoint's "
                                         "(one note line); without it such a --load is "
                                         "refused. Shapes must match either way.", group=C)
    async_save: bool = opt(False, "Write checkpoints in the background (Megatron-Core's async "
                           "dist_checkpointing): training goes on while the files are written; "
                           "the checkpoint is published (iter_N.tmp renamed, tracker updated) "
                           "at a later step boundary or at exit, once every rank has finished.",
                           group=C)
    exit_on_missing_checkpoint: bool = opt(False, "With --load: exit (status 2) when it holds no "
                                           "checkpoint (e.g. a typo) instead of training from "
                                           "scratch with a warning.", group=C)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


OPTIONS = {f.name: f for f in fields(TrainArgs)}

# Options Megatron-LM leaves unset (default None) that a run cannot do without; unset is an
# ``OptionError`` naming the flag (Megatron-LM asserts). --vocab-size only with --mock-data.
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "num_experts", "seq_length",
            "micro_batch_size", "train_iters", "lr")

# Shared flags whose default here differs from Megatron-LM's, and why (the only ones:
# tests/test_megatron_lm_defaults.py compares every shared flag with megatron.training.arguments).
MEGATRON_LM_DEFAULT_EXCEPTIONS = {
    "distributed_backend": "unset = nccl on a CUDA machine, gloo otherwise (Megatron-LM: nccl, "
                           "which every CPU run would have to override)",
    "transformer_impl": "unset = transformer_engine on a GPU with Transformer Engine, local "
                        "otherwise (Megatron-LM: transformer_engine, unavailable on CPU)",
    "num_query_groups": "unset = one group per head; Megatron-LM's 1 applies only with its "
                        "--group-query-attention, which this trainer does not have (setting "
                        "--num-query-groups is grouped-query attention)",
    "qk_layernorm": "unset = on with --multi-latent-attention (DeepSeek-V2's q/kv latent "
                    "norms), off otherwise (Megatron-LM: off)",
    "position_embedding_type": "rope (this trainer builds RoPE or YaRN only; Megatron-LM: "
                               "learned_absolute)",
    "moe_grouped_gemm": "unset = on with the Transformer Engine layers (TEGroupedMLP), off with "
                        "the local ones (Megatron-LM: off, so a bf16 run loops over experts)",
    "moe_permute_fusion": "unset = on on a GPU whose Transformer Engine has the fused "
                          "permutation (Megatron-LM: off)",
    "fp8_recipe": "tensorwise (current scaling: CoE calls the same TE modules C times per "
                  "fp8_autocast, which delayed scaling's shared amax history does not support; "
                  "Megatron-LM: delayed)",
}


def flag_name(name: str) -> str:
    """The command-line flag of option ``name`` (its ``flag=`` or the name with dashes)."""
    f = OPTIONS.get(name)
    if f is not None and f.metadata.get("flag"):
        return f.metadata["flag"]
    return "--" + name.replace("_", "-")


# YAML keys spelled like a flag that differs from its option name (norm_epsilon: 1e-6).
FLAG_KEYS = {f.metadata["flag"][2:].replace("-", "_"): f.name for f in fields(TrainArgs)
             if f.metadata.get("flag")}


def _parse_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true/false, got {value!r}")


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML/flag value to option ``name``'s type; ``OptionError`` naming the option."""
    meta = OPTIONS[name].metadata
    try:
        if value is None:
            return [] if meta["list_of"] else None
        if meta["list_of"] is not None:
            items = value.split() if isinstance(value, str) else list(value)
            return [meta["list_of"](v) for v in items]
        kind = meta["type"]
        if kind is bool:
            value = _parse_bool(value)
        elif kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        elif kind is int and isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        else:
            value = kind(value)
    except (TypeError, ValueError) as e:
        raise OptionError(f"option {name} ({flag_name(name)}): {e}") from None
    if meta["choices"] and value not in meta["choices"]:
        raise OptionError(f"option {name} ({flag_name(name)}): {value!r} is not one of "
                          f"{meta['choices']}")
    return value


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, list(OPTIONS), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def load_yaml(path: str) -> dict:
    """Read a config file into {option: value}; unknown keys are an error naming the key."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise OptionError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise OptionError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise OptionError(f"config file {path} must hold a mapping of option: value")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        name = FLAG_KEYS.get(name, name)
        if name not in OPTIONS:
            raise OptionError(f"unknown key '{key}' in config file {path}.{_suggest(name)}")
        values[name] = coerce(name, value)
    return values


def build_parser() -> argparse.ArgumentParser:
    # one-line errors, and a negative value in any notation (--lr -1e-3) reaches the range check
    parser = OneLineParser(
        prog="coe-train", argument_default=argparse.SUPPRESS,
        description="Train a Chain-of-Experts GPT with Megatron-Core. Options may also come from "
                    "--config FILE.yaml (same names); flags override the file.")
    parser.add_argument("--config", help="YAML file of options (keys as below, - or _).")
    groups = {}
    for f in fields(TrainArgs):
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(meta["group"])
        group = groups[meta["group"]]
        default = f.default if f.default is not dataclasses.MISSING else None
        if meta["list_of"] is not None:
            default = f.default_factory() or None  # an empty list shows as None
        help_text = f"{meta['help']} (default: {default})"
        flag, dest = flag_name(f.name), f.name
        if meta["list_of"] is not None:
            group.add_argument(flag, dest=dest, nargs="+", help=help_text)
        elif meta["type"] is bool and f.name.startswith("no_"):
            # a plain switch: --no-load-optim, never --no-no-load-optim (YAML: no_load_optim: true)
            group.add_argument(flag, dest=dest, action="store_true", help=meta["help"])
        elif meta["type"] is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                               help=meta["help"] + f" (default: {default})")
        else:
            group.add_argument(flag, dest=dest, help=help_text, choices=meta["choices"])
    return parser


def parse_split(split: str) -> list:
    """``--split`` as 3 weights (Megatron's syntax: ``969,30,1`` or ``969/30/1``, missing ones 0);
    ``OptionError`` unless 1-3 finite numbers >= 0 with a positive sum."""
    parts = [p.strip() for p in re.split(r"[,/]", split)]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or not all(math.isfinite(w) and w >= 0 for w in weights) \
            or sum(weights) <= 0:
        raise OptionError(f"option split (--split): {split!r} is not a split; valid: 1-3 weights "
                          ">= 0 for train,valid,test with a positive sum, e.g. 969,30,1")
    return weights + [0.0] * (3 - len(weights))


LEGACY_SPLIT = "969,30,1"


def check_required(args: TrainArgs) -> None:
    """``OptionError`` naming every required option (``REQUIRED``) that is unset."""
    missing = [n for n in REQUIRED if getattr(args, n) is None
               and not (n == "train_iters" and args.train_samples is not None)]
    if args.mock_data and args.vocab_size is None:
        missing.append("vocab_size")
    if missing:
        flags = " ".join(flag_name(n) for n in missing)
        either = " or --train-samples" if "train_iters" in missing else ""
        raise OptionError(f"missing required option{'s' if len(missing) > 1 else ''}: {flags} "
                          f"(no default, as in Megatron-LM{either}; give them as flags or in "
                          "--config, or the model's with --load DIR --use-checkpoint-args)")


# Options of iteration-based training and their counterparts for sample-based training
# (--train-samples); Megatron-LM refuses each with the other kind of training.
BY_ITERS_OR_SAMPLES = (("lr_decay_iters", "lr_decay_samples"),
                       ("lr_warmup_iters", "lr_warmup_samples"),
                       ("lr_wsd_decay_iters", "lr_wsd_decay_samples"),
                       (None, "rampup_batch_size"))


def check_training_length(args: TrainArgs) -> None:
    """Megatron-LM's rules: --train-iters or --train-samples, and only the LR lengths (and the
    batch ramp) of that kind of training."""
    if args.train_iters is not None and args.train_samples is not None:
        raise OptionError("option train_samples (--train-samples): give --train-iters or "
                          "--train-samples, not both (as in Megatron-LM)")
    by_samples = args.train_samples is not None
    for iters, samples in BY_ITERS_OR_SAMPLES:
        name, other = (iters, samples) if by_samples else (samples, iters)
        if name is None or getattr(args, name) in (None, 0, []):
            continue
        if other is None:
            raise OptionError(f"option {name} ({flag_name(name)}): needs sample-based training: "
                              "--train-samples instead of --train-iters (as in Megatron-LM)")
        kind, length = (("sample", "--train-samples") if not by_samples
                        else ("iteration", "--train-iters"))
        raise OptionError(f"option {name} ({flag_name(name)}): applies to {kind}-based training "
                          f"({length}); this run gives "
                          f"{'--train-samples' if by_samples else '--train-iters'}: use "
                          f"{flag_name(other)} (as in Megatron-LM)")
    ramp = args.rampup_batch_size
    if ramp and (len(ramp) != 3 or min(ramp) < 1):
        raise OptionError(f"option rampup_batch_size (--rampup-batch-size): {ramp} is not START "
                          "INCR SAMPLES; valid: three integers >= 1")


def lr_lengths(args: TrainArgs) -> tuple:
    """(warmup, decay, unit, warmup flag, decay flags) of the LR schedule as validated: in
    steps with --train-iters, in samples with --train-samples (warmup truncated to an integer)."""
    if args.train_samples is not None:
        decay, unit = args.lr_decay_samples or args.train_samples, "samples"
        warmup_flag = "--lr-warmup-samples"
        decay_flags = "--lr-decay-samples, default --train-samples"
        warmup = args.lr_warmup_samples
    else:
        decay, unit = args.lr_decay_iters or args.train_iters, "steps"
        warmup_flag, decay_flags = "--lr-warmup-iters", "--lr-decay-iters, default --train-iters"
        warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup, warmup_flag = int(args.lr_warmup_fraction * decay), "--lr-warmup-fraction"
    return warmup, decay, unit, warmup_flag, decay_flags


def check_ranges(args: TrainArgs) -> None:
    """Every option against its ``valid=`` range; ``OptionError`` for the first one outside."""
    for f in fields(TrainArgs):
        valid, value = f.metadata["valid"], getattr(args, f.name)
        if valid is None or value is None:
            continue
        if value not in valid:
            raise OptionError(f"option {f.name} ({flag_name(f.name)}): {value!r} is out of "
                              f"range; valid: {valid}")


# --cp-comm-type values Megatron-Core's TE attention takes; Megatron-LM's fourth, a2a+p2p, needs
# its --hierarchical-context-parallel-sizes, which this trainer does not have
CP_COMM_TYPES = ("p2p", "a2a", "allgather")


def check_context_parallel(args: TrainArgs) -> None:
    """``--cp-comm-type`` values and count, and Megatron-LM's ``--seq-length`` rule: a multiple
    of 2 x ``--context-parallel-size`` (the load-balanced chunks). Whether the machine can run
    context parallelism at all (Transformer Engine's attention) is ``setup.check_runtime``'s."""
    types, cp = args.cp_comm_type, args.context_parallel_size
    for t in types:
        if t == "a2a+p2p":
            raise OptionError("option cp_comm_type (--cp-comm-type): 'a2a+p2p' needs Megatron-LM's "
                              "--hierarchical-context-parallel-sizes, which this trainer does not "
                              f"have; valid: {', '.join(CP_COMM_TYPES)}")
        if t not in CP_COMM_TYPES:
            raise OptionError(f"option cp_comm_type (--cp-comm-type): {t!r} is not one of "
                              f"{list(CP_COMM_TYPES)}")
    if len(types) not in (1, args.num_layers):
        raise OptionError(f"option cp_comm_type (--cp-comm-type): {len(types)} values for "
                          f"--num-layers {args.num_layers}; valid: one for every layer, or one "
                          "per layer")
    if cp > 1 and args.seq_length % (2 * cp):
        raise OptionError(f"option seq_length (--seq-length): {args.seq_length} is not a multiple "
                          f"of 2 x --context-parallel-size {cp} = {2 * cp} (each sequence is "
                          f"split into {2 * cp} chunks); valid: a multiple of {2 * cp}")


def validate(args: TrainArgs) -> TrainArgs:
    """Ranges, then the rules between options that need only the options (see the docstring)."""
    check_ranges(args)
    check_required(args)
    check_context_parallel(args)
    problems = arch.ModelArch.from_args(args).check()  # the rules between architecture fields
    if problems:
        raise OptionError(problems[0])
    if args.split is None and args.data_path and not (args.train_data_path
                                                      or args.valid_data_path):
        args.split = LEGACY_SPLIT  # Megatron-LM's value for --data-path without --split
    if args.min_lr > args.lr:
        raise OptionError(f"option min_lr (--min-lr): {args.min_lr!r} is above --lr {args.lr!r}; "
                          f"valid: 0 <= --min-lr <= --lr")
    train_w, valid_w, _ = parse_split(args.split or LEGACY_SPLIT)
    uses_split = bool(args.data_path) and not (args.train_data_path or args.valid_data_path)
    if uses_split and train_w == 0 and not args.skip_train:
        raise OptionError(f"option split (--split): {args.split!r} gives the training split "
                          "weight 0, so there is nothing to train on; valid: a positive first "
                          "weight, e.g. 969,30,1")
    if uses_split and valid_w == 0 and args.eval_iters > 0:
        raise OptionError(f"option split (--split): {args.split!r} leaves no validation data but "
                          f"--eval-iters is {args.eval_iters}; give the second weight a positive "
                          "value or set --eval-iters 0")
    if args.profile and args.profile_step_end <= args.profile_step_start:
        raise OptionError(f"option profile_step_end (--profile-step-end): "
                          f"{args.profile_step_end} is not after --profile-step-start "
                          f"{args.profile_step_start}; valid: --profile-step-end > "
                          "--profile-step-start")
    check_training_length(args)
    warmup, decay, unit, warmup_flag, decay_flags = lr_lengths(args)
    if args.lr_decay_style == "WSD":
        wsd = "lr_wsd_decay_samples" if unit == "samples" else "lr_wsd_decay_iters"
        if getattr(args, wsd) is None or getattr(args, wsd) > decay:
            raise OptionError(f"option {wsd} ({flag_name(wsd)}): {getattr(args, wsd)!r} with "
                              f"--lr-decay-style WSD; valid: 1..{decay} (the LR decay {unit}, "
                              f"{decay_flags.replace(', default', ' or')})")
    if args.recompute_activations and args.recompute_granularity not in (None, "selective"):
        raise OptionError("option recompute_activations (--recompute-activations): means "
                          "--recompute-granularity selective, but --recompute-granularity is "
                          f"{args.recompute_granularity}; give one of the two")
    if args.recompute_activations or (args.recompute_modules and not args.recompute_granularity):
        args.recompute_granularity = "selective"
    if args.recompute_granularity == "full":
        if args.recompute_modules:
            raise OptionError("option recompute_modules (--recompute-modules): applies to "
                              "--recompute-granularity selective; full recomputes whole layers "
                              "(all their modules): drop one of the two")
        if args.recompute_method is None or args.recompute_num_layers is None:
            raise OptionError("option recompute_granularity (--recompute-granularity full): needs "
                              "--recompute-method uniform|block and --recompute-num-layers N "
                              "(Megatron-LM's rule); e.g. --recompute-method uniform "
                              "--recompute-num-layers 1")
    elif args.recompute_method is not None or args.recompute_num_layers is not None:
        flag = "--recompute-method" if args.recompute_method is not None \
            else "--recompute-num-layers"
        raise OptionError(f"option {flag[2:].replace('-', '_')} ({flag}): applies only to "
                          "--recompute-granularity full; add it or drop the flag")
    if args.moe_expert_capacity_factor is None and (args.moe_pad_expert_input_to_capacity or
                                                    args.moe_token_drop_policy != "probs"):
        flag = ("--moe-pad-expert-input-to-capacity" if args.moe_pad_expert_input_to_capacity
                else "--moe-token-drop-policy")
        raise OptionError(f"option {flag[2:].replace('-', '_')} ({flag}): has no effect "
                          "without --moe-expert-capacity-factor (no token dropping); add it or "
                          "drop the flag")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise OptionError("option overlap_param_gather (--overlap-param-gather): needs "
                          "--overlap-grad-reduce (as in Megatron-LM); add it or drop "
                          "--overlap-param-gather")
    if warmup >= decay:
        raise OptionError(f"option {warmup_flag}: warmup of {warmup} {unit} is not shorter than "
                          f"the LR decay of {decay} {unit} ({decay_flags}); valid: warmup < "
                          "decay")
    return args


# Training and LR-schedule lengths in steps or in samples (Megatron-LM allows one kind per run).
LENGTH_PAIRS = (("train_iters", "train_samples"), ("lr_decay_iters", "lr_decay_samples"),
                ("lr_warmup_iters", "lr_warmup_samples"),
                ("lr_wsd_decay_iters", "lr_wsd_decay_samples"))


def parse_args(argv: Optional[list] = None) -> TrainArgs:
    """Defaults < ``--config`` file < flags, then ``validate``. A length given as a flag
    (``--train-samples``, ``--lr-decay-iters``, ...) also replaces the config file's length of the
    other kind (``train_iters``, ``lr_decay_samples``, ...). Raises ``OptionError`` (flags:
    argparse exits 2)."""
    ns = vars(build_parser().parse_args(argv))
    values = load_yaml(ns.pop("config")) if "config" in ns else {}
    for iters, samples in LENGTH_PAIRS:  # a length on the command line replaces the config's
        for given, other in ((iters, samples), (samples, iters)):  # length of the other kind
            if given in ns and other not in ns:
                values.pop(other, None)
    for name, value in ns.items():
        values[name] = coerce(name, value)
    if values.get("use_checkpoint_args"):
        values = _with_checkpoint_args(values)
    return validate(TrainArgs(**values))


def _with_checkpoint_args(values: dict) -> dict:
    """``--use-checkpoint-args``: the model options of the ``--load`` checkpoint (Megatron-LM's
    rule: the sizes given here win, everything else is the checkpoint's)."""
    if not values.get("load"):
        raise OptionError("option use_checkpoint_args (--use-checkpoint-args): needs --load DIR "
                          "(the checkpoint whose model options to take); add --load or drop "
                          "--use-checkpoint-args")
    from megatron_coe.training import megatron_lm  # reads the checkpoint (torch for Megatron-LM's)

    taken = megatron_lm.checkpoint_model_options(values["load"])
    out = dict(values)
    for name, value in taken.items():
        if name in megatron_lm.CHECKPOINT_ARGS_UNFORCED and values.get(name) is not None:
            continue
        out[name] = coerce(name, value)
    return out
