"""Checkpoints with ``megatron.core.dist_checkpointing``, published atomically.

Layout of ``--save DIR``::

    DIR/iter_0000020/              a published checkpoint (complete by construction)
        metadata.json, common.pt,  dist_checkpointing: model + distributed optimizer
        *.distcp, .metadata          (resharding formats) + scheduler (common state)
        coe_checkpoint.json        iteration, consumed samples, args, padded vocab, layout,
                                   model_config (``ArchSpec``; what the HF exporter reads)
        rng/rank_00000.pt          per-rank RNG states (python, numpy, torch, CUDA, Megatron)
    DIR/iter_0000030.tmp/          being written (or left by a crash): never loaded
    DIR/latest_checkpointed_iteration.txt

All ranks write into ``iter_N.tmp``; after a barrier rank 0 renames it to ``iter_N`` and then
replaces the tracker file (write-temp + ``os.replace``). ``--load`` considers only directories
named exactly ``iter_NNNNNNN`` that hold ``coe_checkpoint.json``, so a checkpoint interrupted at
any point is never picked. Model tensors use Megatron's sharded state dicts and the distributed
optimizer the ``fully_reshardable`` format (model-space tensors, one per parameter), so model and
optimizer state reload under other TP / PP / EP / DP sizes; the RNG states are restored only
under the same layout. (``fully_sharded_model_space``, the 0.16.1 default, cannot be saved: it
builds ``ShardedTensor.flattened_range``, which 0.16.1's dist_checkpointing rejects.)

A checkpoint whose metadata says ``weights_only: true`` (written by ``tools/convert_from_hf.py``)
holds the model only: ``--load`` takes its weights and starts at iteration 0 with a fresh
optimizer, schedule and data position, as ``--no-load-optim`` would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import threading
from typing import Optional

import numpy as np
import torch

from megatron_coe.training.options import OPTIONS, TrainArgs, flag_name

TRACKER = "latest_checkpointed_iteration.txt"
META = "coe_checkpoint.json"
FORMAT_VERSION = 1
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                     "chained_optim_avoid_prefix": True, "singleton_local_shards": False}
_ITER_DIR = re.compile(r"^iter_(\d{7})$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into this run; the message says why."""


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def find_checkpoint(load: str) -> Optional[str]:
    """The newest published checkpoint under ``load`` (or ``load`` itself if it is one)."""
    if os.path.isfile(os.path.join(load, META)):
        return load
    if not os.path.isdir(load):
        return None
    found = [(int(m.group(1)), name) for name in os.listdir(load)
             if (m := _ITER_DIR.match(name)) and os.path.isfile(os.path.join(load, name, META))]
    return os.path.join(load, max(found)[1]) if found else None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def check_compatible(meta: dict, args: TrainArgs, vocab_size: int, path: str) -> None:
    """Refuse a checkpoint whose model shape differs from this run's, naming every field."""
    saved = meta["args"]
    diffs = [(name, saved.get(name), getattr(args, name)) for name, f in OPTIONS.items()
             if f.metadata["shape"] and saved.get(name) != getattr(args, name)
             and _matters(name, saved, args)]
    if meta["vocab_size"] != vocab_size:
        diffs.append(("padded vocab size (tokenizer)", meta["vocab_size"], vocab_size))
    if diffs:
        lines = "\n".join(f"  {name} ({flag_name(name) if name in OPTIONS else 'tokenizer'}): "
                          f"checkpoint {a!r}, this run {b!r}" for name, a, b in diffs)
        raise CheckpointError(f"checkpoint {path} has a different model shape than this run:\n"
                              f"{lines}\nUse the checkpoint's values or a different --load.")


def _matters(name: str, saved: dict, args: TrainArgs) -> bool:
    """MLA dims only matter when MLA is on (in both, as the flag itself is compared too)."""
    mla_dims = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
    return not (name in mla_dims and not args.multi_latent_attention
                and not saved.get("multi_latent_attention"))


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


def _ensure_optimizer_state(optimizer) -> None:
    """Give a fresh torch AdamW the per-parameter state that Megatron's loading expects.

    Without Apex/TE, ``DistributedOptimizer.state_dict()`` reads ``step`` from every parameter's
    state (``distrib_optimizer.py:640``, 0.16.1), which torch creates lazily at the first step;
    loading into (or saving) a fresh optimizer would fail. Zero moments at step 0 are exactly
    what AdamW's first step would create; a load overwrites them. No step is taken.
    """
    for dist_opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = dist_opt.optimizer
        if not isinstance(inner, (torch.optim.AdamW, torch.optim.Adam)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


@contextlib.contextmanager
def _torch_adam_step_fix():
    """Load ``fully_reshardable`` optimizer state into torch AdamW (Megatron 0.16.1 w/o Apex/TE).

    ``DistributedOptimizer.load_state_dict`` gives every torch-AdamW state a ``step`` (taken from
    the saved param groups, ``distrib_optimizer.py:818-826``) and then copies each saved tensor
    onto *every* state key (``_set_main_param_and_optimizer_states``, ``:938-940``), but the
    saved per-parameter tensors hold no ``step``: KeyError. Inside this context the missing
    ``step`` is copied onto itself (a no-op). Afterwards ``_unshare_steps`` gives each parameter
    its own ``step`` tensor (the load assigns one shared tensor, which AdamW would increment once
    per parameter).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _unshare_steps(optimizer) -> None:
    for dist_opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in dist_opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].detach().clone()


def _sharded_state(model: list, optimizer, is_loading: bool) -> dict:
    from megatron_coe.training.setup import unwrap

    model_sd = unwrap(model[0]).sharded_state_dict(metadata=SHARDING_METADATA)
    state = {"model": model_sd}
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                          metadata=SHARDING_METADATA)
    return state


_WARM_UP: Optional[threading.Thread] = None
_MANAGER = None  # the results Manager we start in place of Megatron's (kept alive here)


def _results_queue():
    """dist_checkpointing's write-results queue, served by a Manager that ignores stop signals.

    Megatron creates it lazily as ``mp.get_context("spawn").Manager().Queue()``
    (``filesystem_async._get_write_results_queue``, 0.16.1), a server process that dies of the
    SIGTERM ``scancel`` / Slurm preemption send to every process of the job, so the save the
    trainer makes on that signal fails ("Connection refused"). We start the same Manager with an
    initializer that sets SIG_IGN for SIGTERM/SIGUSR1 and hand its queue to Megatron. (Blocking
    the signals around Megatron's own spawn is not enough: starting multiprocessing's
    resource tracker unblocks SIGTERM in the spawning thread right before the Manager starts.)
    """
    global _MANAGER
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_coe.training import signals

    if getattr(filesystem_async, "_results_queue", None) is None:
        from multiprocessing.managers import SyncManager

        from torch import multiprocessing as mp

        with signals.shielded():  # the resource tracker (started by the spawn) keeps USR1 blocked
            manager = SyncManager(ctx=mp.get_context("spawn"))
            manager.start(initializer=signals.ignore_in_child)
        _MANAGER = manager
        filesystem_async._results_queue = manager.Queue()
    return filesystem_async._get_write_results_queue()


def warm_up_writer() -> None:
    """Start dist_checkpointing's result-queue process in the background, while training runs.

    The first save creates a spawn-mode ``Manager`` (``filesystem_async.py:51-56``) whose server
    process imports torch to unpickle the first write results: 3-5 s inside the first save on a
    small CPU machine. Doing it now (one tensor through the queue) moves that off the save path.
    The Manager ignores SIGTERM/SIGUSR1 (``_results_queue``).
    """
    global _WARM_UP

    def warm():
        queue = _results_queue()
        queue.put(torch.zeros(1))
        queue.get()

    _WARM_UP = threading.Thread(target=warm, name="ckpt-writer-warm-up", daemon=True)
    _WARM_UP.start()


def save_checkpoint(root: str, iteration: int, consumed_samples: int, model: list, optimizer,
                    scheduler, args: TrainArgs, vocab_size: int, layout) -> str:
    """Write ``root/iter_N.tmp`` on all ranks, then publish it as ``root/iter_N``."""
    from megatron.core import dist_checkpointing

    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.training import signals

    if _WARM_UP is not None:
        _WARM_UP.join()
    _results_queue()  # no warm-up (or it failed): start the signal-proof Manager now
    rank = torch.distributed.get_rank()
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        os.makedirs(tmp)
    torch.distributed.barrier()
    # shielded: the writer processes dist_checkpointing forks (and the results Manager, if the
    # warm-up did not start it) ignore SIGTERM/SIGUSR1; the trainer still sees them afterwards.
    with cuda_device_redirect(), signals.shielded():
        state = _sharded_state(model, optimizer, is_loading=False)
        state["scheduler"] = scheduler.state_dict()
        dist_checkpointing.save(state, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))
    if rank == 0:
        meta = dict(format_version=FORMAT_VERSION, iteration=iteration,
                    consumed_train_samples=consumed_samples, vocab_size=vocab_size,
                    layout=vars(layout), args=args.to_dict())
        model_config = _model_config(model, vocab_size, args)
        if model_config is not None:
            meta["model_config"] = model_config
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=1)
    torch.distributed.barrier()  # every rank finished writing
    if rank == 0:
        _publish(root, tmp, final, iteration)
    torch.distributed.barrier()
    return final


def _model_config(model: list, vocab_size: int, args: TrainArgs) -> Optional[dict]:
    """The model's ``ArchSpec`` as a dict (the exporter's ``model_config``), or None.

    None where the architecture has no Hugging Face form (``ArchSpec`` refuses it); the exporter
    then rebuilds the config from ``args`` and reports the problem itself.
    """
    from megatron_coe.conversion.spec import ArchSpec, ConversionError
    from megatron_coe.training.setup import unwrap

    gpt = unwrap(model[0])
    try:
        spec = ArchSpec.from_megatron_config(
            gpt.config, vocab_size=vocab_size, max_position_embeddings=args.seq_length,
            tie_word_embeddings=bool(getattr(gpt, "share_embeddings_and_output_weights", False)))
    except (ConversionError, AttributeError, TypeError):  # never fail a save over this field
        return None
    return spec.to_dict()


def _publish(root: str, tmp: str, final: str, iteration: int) -> None:
    old = final + ".old"
    if os.path.exists(final):  # re-saving an iteration (e.g. after a resume)
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    try:
        fd = os.open(root, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


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
    weights_only = bool(meta.get("weights_only"))
    load_optim = not (args.no_load_optim or weights_only)
    rank = torch.distributed.get_rank()
    with cuda_device_redirect():
        state = _sharded_state(model, optimizer if load_optim else None, is_loading=True)
        loaded = dist_checkpointing.load(state, path)
        unwrap(model[0]).load_state_dict(loaded["model"])
        if load_optim:
            with _torch_adam_step_fix():
                optimizer.load_state_dict(loaded["optimizer"])
            _unshare_steps(optimizer)
            scheduler.load_state_dict(loaded["scheduler"])
    if weights_only:
        if rank == 0:
            print(f"note: {path} holds model weights only (converted checkpoint): starting at "
                  "iteration 0 with a new optimizer, LR schedule and data position.", flush=True)
    elif not args.no_load_rng:
        if meta["layout"] == vars(layout):
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
