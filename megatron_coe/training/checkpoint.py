"""The Megatron state of a trainer checkpoint: sharded model + optimizer, scheduler, RNG.

The on-disk format (directory and file names, tracker, metadata, checksums, atomic publish, the
``--save`` lock and storage checks) belongs to ``megatron_coe.checkpointing``; this module builds
what goes into a checkpoint and restores it:

    iter_N/  *.distcp, .metadata, common.pt, metadata.json   ``dist_checkpointing``: model +
                                              distributed optimizer + scheduler (common state)
             rng/rank_00000.pt                per-rank RNG states (python, numpy, torch, CUDA,
                                              Megatron's tracker)
             coe_checkpoint.json              consumed samples, args, padded vocab, layout,
                                              arch (the ``megatron_coe.arch.ModelArch`` record:
                                              the model's one description, which ``--load``
                                              checks and the HF exporter reads), plus the
                                              format owner's fields

Model tensors use Megatron's sharded state dicts and the distributed optimizer the
``fully_reshardable`` format (model-space tensors, one per parameter), so model and optimizer
state reload under other TP / PP / EP / DP sizes; the RNG states are restored only under the same
layout. (``fully_sharded_model_space``, the 0.16.1 default, cannot be saved: it builds
``ShardedTensor.flattened_range``, which 0.16.1's dist_checkpointing rejects.)

A checkpoint whose metadata says ``weights_only: true`` (written by ``tools/convert_from_hf.py``)
holds the model only: ``--load`` takes its weights and starts at iteration 0 with a fresh
optimizer, schedule and data position, as ``--no-load-optim`` would.
"""

from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from megatron_coe import checkpointing
from megatron_coe.arch import RECORD_KEY, ModelArch
from megatron_coe.checkpointing import (  # noqa: F401 - re-exported for the trainer's callers
    SHARDING_METADATA, CheckpointError)
from megatron_coe.compat.dist_checkpointing import common_state_unreadable
from megatron_coe.compat.optimizer_state import adam_step_tolerant_load, ensure_optimizer_state
from megatron_coe.training import megatron_lm
from megatron_coe.training.options import TrainArgs

BYTES_PER_PARAMETER = 16  # fp32 weights + optimizer main param, exp_avg, exp_avg_sq


def find_checkpoint(load: str) -> Optional[str]:
    """``checkpointing.find_checkpoint``, also finding a Megatron-LM checkpoint: ``load`` itself
    if it is one of its iteration directories, or the one its tracker names."""
    if os.path.isdir(load) and megatron_lm.is_checkpoint(load):
        return load
    iteration = checkpointing.read_tracker(load) if os.path.isdir(load) else None
    if iteration is not None and megatron_lm.is_checkpoint(checkpointing.iteration_dir(load,
                                                                                     iteration)):
        return checkpointing.iteration_dir(load, iteration)
    return checkpointing.find_checkpoint(load)


def read_meta(path: str) -> dict:
    """The checkpoint's metadata; for a Megatron-LM checkpoint built from its ``args``
    (``megatron_lm.read_meta``, which refuses a model this trainer cannot build)."""
    if megatron_lm.is_checkpoint(path):
        return megatron_lm.read_meta(path)
    return checkpointing.read_meta(path)


def check_compatible(meta: dict, args: TrainArgs, vocab_size: int, path: str) -> None:
    """Refuse a checkpoint whose model differs from this run's, naming every field.

    The checkpoint's model is its architecture record (``ModelArch.from_checkpoint_meta``: the
    recorded ``arch``, or for older and Megatron-LM checkpoints, their ``args``). First, a
    checkpoint in a format the installed Megatron-Core cannot read is refused (compat). A
    different shape is always refused; a different function with equal shapes (the record's
    ``function`` fields: residuals, norm eps, RoPE/YaRN, routing) is refused in one line unless
    ``--override-checkpoint-arch`` says this run changes it on purpose (then one note line)."""
    unreadable = common_state_unreadable(path)
    if unreadable:
        raise CheckpointError(f"--load: checkpoint {path} cannot be loaded: {unreadable}.")
    saved, ours = ModelArch.from_checkpoint_meta(meta), ModelArch.from_args(args)
    diffs = [(name, flag, a, b) for name, flag, a, b in saved.shape_differences(ours)]
    if meta["vocab_size"] != vocab_size:
        diffs.append(("padded vocab size", "tokenizer", meta["vocab_size"], vocab_size))
    if diffs:
        lines = "\n".join(f"  {name} ({flag}): checkpoint {a!r}, this run {b!r}"
                          for name, flag, a, b in diffs)
        raise CheckpointError(f"checkpoint {path} has a different model shape than this run:\n"
                              f"{lines}\nUse the checkpoint's values or a different --load.")
    changed = "; ".join(f"{name} ({flag}): checkpoint {a!r}, this run {b!r}"
                        for name, flag, a, b in saved.function_differences(ours))
    if not changed:
        return
    if getattr(args, "override_checkpoint_arch", False):
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"note: --override-checkpoint-arch: training checkpoint {path} with this run's "
                  f"values of {changed}", flush=True)
        return
    raise CheckpointError(f"--load: checkpoint {path} computes a different function than this "
                          f"run: {changed}; give the checkpoint's values (or "
                          "--use-checkpoint-args), or --override-checkpoint-arch to change them "
                          "on purpose")


def _rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"random": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def model_keys(model: list) -> list:
    """The state-dict entry of each model chunk, as Megatron-LM names them: ``model`` for one
    chunk, ``model0``, ``model1``, ... for the chunks of an interleaved pipeline. The tensors
    inside carry global names (layer numbers over the whole model), by which
    ``dist_checkpointing`` matches them, so a checkpoint loads under any other chunking."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _sharded_state(model: list, optimizer, is_loading: bool,
                   load_from: Optional[str] = None) -> dict:
    """``load_from``: the checkpoint being loaded, whose keys the model's tensors take
    (``models.checkpoint_keys.match_to_checkpoint``: router and norm spellings)."""
    from megatron_coe.models.checkpoint_keys import match_to_checkpoint
    from megatron_coe.training.setup import unwrap

    state = {}
    for key, chunk in zip(model_keys(model), model):
        state[key] = unwrap(chunk).sharded_state_dict(metadata=SHARDING_METADATA)
        if load_from:
            match_to_checkpoint(state[key], unwrap(chunk).config, load_from)
    if optimizer is not None:
        ensure_optimizer_state(optimizer)  # torch AdamW without Apex/TE (compat)
        models = state["model"] if len(model) == 1 else dict(state)
        state["optimizer"] = optimizer.sharded_state_dict(models, is_loading=is_loading,
                                                          metadata=SHARDING_METADATA)
    return state


def save_checkpoint(root: str, iteration: int, consumed_samples: int, model: list, optimizer,
                    scheduler, args: TrainArgs, vocab_size: int, layout,
                    flops_so_far: float = 0.0, async_queue=None) -> str:
    """Collective: write and publish ``root/iter_N`` (``checkpointing.save``).

    The common state also carries Megatron-LM's keys (``megatron_lm.common_state``) and the
    sharded ``rng_state`` object, so Megatron-LM's own loaders read the checkpoint.

    ``async_queue`` (``--async-save``, an ``AsyncCallsQueue``): the common state and the RNG
    files are written now and the shard files by a forked writer per rank (Megatron-Core's async
    dist_checkpointing); ``iter_N`` is published by the request's finalization, which runs on
    every rank at a later ``async_queue.maybe_finalize_async_calls`` (``checkpointing.finish``).
    Returns the path ``iter_N`` has (or will have once published)."""
    from megatron.core import dist_checkpointing

    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.compat.async_checkpoint import async_save_kwargs, request_with_finalize
    from megatron_coe.models import checkpoint_keys
    from megatron_coe.training import signals
    from megatron_coe.training.setup import unwrap

    rank = torch.distributed.get_rank()

    def state() -> dict:
        sd = _sharded_state(model, optimizer, is_loading=False)
        sd["scheduler"] = scheduler.state_dict()
        sd.update(megatron_lm.common_state(args, model, vocab_size, iteration, consumed_samples,
                                           layout, sd["scheduler"], flops_so_far,
                                           megatron_lm.tokenizer_dir(root, iteration, args)))
        sd["rng_state"] = megatron_lm.rng_sharded_object(_rng_state(), args.seed)
        return sd

    def write_rng(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        rng_file = os.path.join(tmp, "rng", f"rank_{rank:05d}.pt")
        torch.save(_rng_state(), rng_file)
        with open(rng_file, "rb+") as f:
            os.fsync(f.fileno())
        if rank == 0:  # the tokenizer Megatron-LM's args name (megatron_lm.tokenizer_dir)
            megatron_lm.write_tokenizer(tmp, args)

    def write(tmp: str) -> None:
        # shielded: the writer processes dist_checkpointing forks ignore SIGTERM/SIGUSR1 (the
        # trainer still sees them afterwards); sharded_writer: they die with this rank.
        with cuda_device_redirect(), signals.shielded(), checkpointing.sharded_writer():
            dist_checkpointing.save(state(), tmp, content_metadata=SHARDING_METADATA)
        write_rng(tmp)

    meta = None
    if rank == 0:
        meta = dict(consumed_train_samples=consumed_samples, vocab_size=vocab_size,
                    layout=vars(layout), args=args.to_dict())
        meta[RECORD_KEY] = ModelArch.from_args(args, vocab_size).to_dict()
        meta[checkpoint_keys.RECORD_KEY] = checkpoint_keys.record(  # local or TE spelling
            unwrap(model[0]).sharded_state_dict(metadata=SHARDING_METADATA),
            unwrap(model[0]).config)
        meta["scheduler_unit"] = "samples"  # megatron_lm.scheduler_state; older: iterations
    if async_queue is None:
        return checkpointing.save(root, iteration, write, meta)

    tmp = checkpointing.begin(root, iteration)
    request, error = None, None
    # the forked writer (and its file writers) block the stop signals and die with this rank;
    # its results cross processes (async_results_queue)
    with cuda_device_redirect(), signals.shielded(), \
            checkpointing.sharded_writer(checkpointing.async_results_queue()):
        try:
            request = dist_checkpointing.save(state(), tmp, content_metadata=SHARDING_METADATA,
                                              **async_save_kwargs())
            write_rng(tmp)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - every rank must learn of any failure
            error = e
        checkpointing.agree(error, root, iteration)

        def finalize(own: list) -> None:  # every rank, when every rank's writer is done
            failure = None
            try:
                with cuda_device_redirect():
                    for fn in own:  # Megatron's: write results, metadata
                        fn()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001
                failure = e
            checkpointing.finish(root, iteration, tmp, meta, failure)

        async_queue.schedule_async_request(request_with_finalize(request, finalize))
    return checkpointing.iteration_dir(root, iteration)


def estimated_bytes(args: TrainArgs, model_config, vocab_size: int) -> int:
    """About how many bytes one checkpoint of this run takes (parameters from the architecture
    record, ``BYTES_PER_PARAMETER`` each); ``model_config`` is unused (kept for callers)."""
    return ModelArch.from_args(args).num_parameters(vocab_size)["total"] * BYTES_PER_PARAMETER


def load_checkpoint(path: str, model: list, optimizer, scheduler, args: TrainArgs,
                    layout) -> tuple[int, int]:
    """Load ``path`` (a published iteration directory); returns (iteration, consumed samples).

    Weights only (iteration 0, nothing else restored) with ``--no-load-optim`` or when the
    checkpoint itself holds only weights (``weights_only`` in its metadata: ``convert_from_hf``).
    """
    from megatron.core import dist_checkpointing

    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.training.setup import unwrap

    meta = read_meta(path)
    rank = torch.distributed.get_rank()
    foreign = bool(meta.get("megatron_lm"))
    weights_only = bool(meta.get("weights_only"))
    if foreign:  # Megatron-LM's: no checksums to verify, RNG in its own form (not restored)
        why = megatron_lm.optimizer_layout_matches(
            path, SHARDING_METADATA["distrib_optim_sharding_type"])
        if why and not args.no_load_optim and rank == 0:
            print(f"note: Megatron-LM checkpoint {path}: {why}; loading its weights only "
                  "(iteration 0, new optimizer, LR schedule and data position).", flush=True)
        weights_only = weights_only or why is not None
    else:
        checkpointing.verify(path, meta)  # sizes + CRC-32 of every file (each rank reads a share)
    load_optim = not (args.no_load_optim or weights_only)
    with cuda_device_redirect():
        state = _sharded_state(model, optimizer if load_optim else None, is_loading=True,
                               load_from=path)
        loaded = dist_checkpointing.load(state, path)
        for key, chunk in zip(model_keys(model), model):
            unwrap(chunk).load_state_dict(loaded[key])
        if load_optim:  # chained as Megatron-LM chains (regrouped if saved otherwise)
            with adam_step_tolerant_load(optimizer):
                optimizer.load_state_dict(megatron_lm.regroup_optimizer_state(
                    optimizer, loaded["optimizer"], path))
            scheduler.load_state_dict(megatron_lm.scheduler_state(loaded, meta))  # in samples
    if foreign:
        if rank == 0:
            print(f"note: loaded Megatron-LM checkpoint {path} (iteration {meta['iteration']}); "
                  "its RNG states are not restored.", flush=True)
    elif weights_only:
        if rank == 0:
            print(f"note: {path} holds model weights only (converted checkpoint): starting at "
                  "iteration 0 with a new optimizer, LR schedule and data position.", flush=True)
    elif not args.no_load_rng:
        if {"cp": 1, "vpp": 1, **meta["layout"]} == vars(layout):  # older checkpoints: cp 1, vpp 1
            _set_rng_state(torch.load(os.path.join(path, "rng", f"rank_{rank:05d}.pt"),
                                      weights_only=False))
        elif rank == 0:
            print(f"note: parallel layout changed ({meta['layout']} -> {vars(layout)}); RNG "
                  "states are not restored.", flush=True)
    if not load_optim:
        from megatron_coe.training.precision import uses_bf16

        if optimizer is not None and uses_bf16(args):  # fp32 main params follow the bf16 weights
            optimizer.reload_model_params()
        return 0, 0
    return meta["iteration"], meta["consumed_train_samples"]
