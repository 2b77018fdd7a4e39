"""Hugging Face model directory -> the trainer's ``dist_checkpointing`` checkpoint, and MoE -> CoE upcycling.

``import_hf(hf_dir, save_root, tp=, pp=, ep=)`` builds the target-layout Megatron model on
``tp * pp * ep`` gloo processes (forked here, or the ranks of a ``torchrun`` job), fills every
local shard from the HF tensors by global name and offset (``megatron_ckpt.fill_model``), and saves
``save_root/iter_0000000`` with ``dist_checkpointing`` in the trainer's format, plus
``coe_checkpoint.json`` (the architecture record ``arch``, the trainer options that build it,
``weights_only: true``) and
``latest_checkpointed_iteration.txt``. Being a ``dist_checkpointing`` checkpoint, it also loads
under any other layout. To train from it::

    python -m megatron_coe.train ... --load SAVE_ROOT

(``weights_only`` makes the trainer load just the weights and start at iteration 0 with a new
optimizer and schedule; no ``--no-load-optim`` needed.)

Upcycling (``upcycle=Upcycle(iterations=C, ...)``) turns a standard MoE (C=1) into CoE-C:

* routed and shared experts, attention, norms, embeddings: copied (shared by all C passes);
* router of every pass: a copy of the MoE router, so pass 1 routes exactly like the source
  (``coe_shared_router``: one copy);
* top-k per pass: ``k_coe = k_moe / C`` by default, so a token still meets ``k_moe`` experts per
  layer and compute stays equal (the paper's CoE-2(4/64) vs MoE(8/64)); override with
  ``topk=``. Pass 1's experts are then the first ``k_coe`` of the source's top-``k_moe``;
* residuals: inner residual on (the paper's CoE default) and the outer residual kept from the
  source (on for a standard MoE: the layer output keeps the residual stream), both overridable.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_coe.arch import ModelArch
from megatron_coe.conversion import families, hf_config, hf_io, mapping
from megatron_coe.conversion.hf_config import COE_MODEL_TYPES, MODEL_TYPE_STOCK, ConversionError


@dataclass
class Upcycle:
    iterations: int = 2
    topk: Optional[int] = None  # default: source top-k // iterations
    inner_residual: bool = True
    outer_residual: Optional[bool] = None  # default: the source's
    shared_router: bool = False

    def target_arch(self, src: ModelArch) -> ModelArch:
        if src.coe_iterations != 1:
            raise ConversionError(f"upcycling starts from a standard MoE (C=1); this model already has "
                                  f"C={src.coe_iterations}")
        if self.iterations < 2:
            raise ConversionError(f"upcycling needs iterations >= 2, got {self.iterations}")
        topk, src_topk = self.topk, src.moe_router_topk
        group_topk = src.moe_router_num_groups and src.moe_router_group_topk
        if topk is None:
            if src_topk % self.iterations:
                raise ConversionError(
                    f"default top-k per pass is k_moe / C = {src_topk} / {self.iterations}, not an integer: "
                    "pass an explicit top-k (--upcycle-topk)")
            topk = src_topk // self.iterations
        if not 1 <= topk <= src.num_moe_experts:
            raise ConversionError(f"top-k per pass must be in [1, {src.num_moe_experts}], got {topk}")
        if group_topk and topk % group_topk:
            raise ConversionError(f"top-k per pass {topk} must be a multiple of the routing group top-k "
                                  f"{group_topk}")
        outer = src.coe_outer_residual if self.outer_residual is None else self.outer_residual
        if not (self.inner_residual or outer):
            raise ConversionError("inner and outer residual both off would drop the residual stream")
        pre_softmax = src.moe_router_pre_softmax
        if topk == 1 and src.moe_router_score_function == "softmax" and not pre_softmax:
            # a renormalised top-1 weight is always 1; Megatron-Core requires pre-softmax there
            pre_softmax = True
        return src.replace(coe_iterations=self.iterations, moe_router_topk=topk,
                           coe_inner_residual=self.inner_residual, coe_outer_residual=outer,
                           coe_shared_router=self.shared_router, moe_router_pre_softmax=pre_softmax)

    @staticmethod
    def notes(src: ModelArch, dst: ModelArch) -> list:
        """Lines printed about what upcycling changed beyond C and top-k."""
        out = []
        g = src.moe_router_num_groups and src.moe_router_group_topk
        if g and dst.moe_router_topk // g != src.moe_router_topk // g:
            out.append(f"note: group-limited routing scores a group by its top "
                       f"topk // group_topk experts: {src.moe_router_topk // g} in the source, "
                       f"{dst.moe_router_topk // g} per pass here, so pass 1 may choose other "
                       "groups than the source router")
        if dst.moe_router_pre_softmax and not src.moe_router_pre_softmax:
            out.append("note: top-1 per pass: the source renormalises its top-k weights, which "
                       "makes a top-1 weight always 1; Megatron-Core routes top-1 with the "
                       "softmax probability instead (--moe-router-pre-softmax); pass 1 selects "
                       "the source's best expert")
        return out


def upcycle_layer(layer: dict, src: ModelArch, dst: ModelArch) -> dict:
    """Canonical tensors of a C=1 layer -> the CoE-C layer (every pass router = the MoE router)."""
    out = {k: v for k, v in layer.items() if not k.startswith("mlp.routers.")}
    for t in range(dst.num_routers):
        out[f"mlp.routers.{t}.weight"] = layer["mlp.routers.0.weight"]
        if dst.moe_router_enable_expert_bias:
            out[f"mlp.routers.{t}.expert_bias"] = layer["mlp.routers.0.expert_bias"]
    return out


class HFSource:
    """An HF directory as canonical Megatron tensors: ``arch`` (the record of the model to
    build; ``source_arch`` before upcycling), ``dtype`` (the weights'), ``layer(l)``,
    ``non_layer()``."""

    def __init__(self, path: str, upcycle: Optional[Upcycle] = None):
        self.path = path
        # Everything about the source is checked here, before any worker process starts: the
        # config.json fields, the model Megatron-Core would build, and every tensor's name and shape.
        self.config = hf_io.read_hf_config(path)
        cfg_path = os.path.join(path, "config.json")
        families.check_importable(self.config, cfg_path)  # the one list of importable types
        hf_io.check_hf_config(self.config, cfg_path, COE_MODEL_TYPES + (MODEL_TYPE_STOCK,))
        self.family = families.family_of(self.config)  # a stock family (families.py) or None
        self.stock = self.family is not None
        try:
            if self.family is not None:
                self.source_arch = families.arch_from_family_config(self.config, cfg_path)
            else:
                self.source_arch = hf_config.from_hf_config(self.config)
        except ConversionError as e:
            raise ConversionError(f"{cfg_path}: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConversionError(f"{cfg_path}: cannot read the model configuration ({type(e).__name__}: "
                                  f"{e}); fix config.json") from None
        self.arch = upcycle.target_arch(self.source_arch) if upcycle else self.source_arch
        self.dtype = hf_config.hf_dtype(self.config)
        self.upcycle = upcycle
        _check_buildable(self.arch, cfg_path)
        self.weights = hf_io.HFWeights(path)
        self._check_names()

    def _check_names(self) -> None:
        """Every tensor config.json implies is there, with its shape, and nothing else."""
        from megatron_coe.conversion.megatron_ckpt import layer_shapes

        try:
            expected = {n: tuple(t.shape) for n, t in
                        mapping.non_layer_to_hf(self.source_arch, _meta_non_layer(self.source_arch)).items()}
            for layer_idx in range(self.source_arch.num_layers):
                meta_layer = {k: torch.empty(s, device="meta")
                              for k, s in layer_shapes(self.source_arch, layer_idx).items()}
                hf = mapping.layer_to_hf(self.source_arch, meta_layer, layer_idx, stock=self.stock)
                expected.update((n, tuple(t.shape)) for n, t in
                                families.to_family_names(self.family, hf).items())
        except (RuntimeError, ValueError, TypeError) as e:  # sizes that do not fit together (heads x head_dim)
            raise ConversionError(
                f"{os.path.join(self.path, 'config.json')}: the attention sizes do not fit together "
                f"({(str(e).splitlines() or [''])[0]}); check num_attention_heads, num_key_value_heads, "
                "head_dim (MLA: q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim)"
            ) from None
        cfg, shapes = self.config, self.weights.shapes
        if self.family:  # the family's own expert-count key; MTP layers beyond the model dropped
            cfg = dict(cfg, n_routed_experts=self.source_arch.num_moe_experts)
            shapes = families.without_mtp(self.config, shapes)
        hf_io.check_weights(self.path, cfg, shapes, expected)

    def layer(self, layer_idx: int) -> dict:
        hf = families.from_family_names(self.family,
                                        self.weights.get_prefix(f"model.layers.{layer_idx}."))
        layer = mapping.layer_from_hf(self.source_arch, hf, layer_idx, stock=self.stock)
        if self.upcycle and self.source_arch.is_moe_layer(layer_idx):
            layer = upcycle_layer(layer, self.source_arch, self.arch)
        return layer

    def non_layer(self) -> dict:
        names = [n for n in self.weights.names() if not n.startswith("model.layers.")]
        return mapping.non_layer_from_hf(self.source_arch, {n: self.weights.get(n) for n in names})


# Megatron config field -> config.json key, to name the field a Megatron-Core refusal is about
_HF_FIELD = {"moe_router_topk": "num_experts_per_tok", "num_moe_experts": "n_routed_experts",
             "coe_iterations": "inner_iter", "num_layers": "num_hidden_layers",
             "moe_ffn_hidden_size": "moe_intermediate_size", "ffn_hidden_size": "intermediate_size",
             "kv_channels": "head_dim", "num_query_groups": "num_key_value_heads"}


def _check_buildable(arch: ModelArch, cfg_path: str) -> None:
    """The Megatron-Core config of ``arch`` validates (one line naming the config.json field)."""
    import warnings

    try:
        with warnings.catch_warnings():  # Megatron-Core's notices are printed by the workers anyway
            warnings.simplefilter("ignore")
            hf_config.megatron_config(arch)
    except ConversionError:
        raise
    except Exception as e:  # CoEConfigError, Megatron-Core's ValueError / AssertionError
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fields = [f"{hf} ({mc})" for mc, hf in _HF_FIELD.items() if re.search(rf"\b{mc}\b", msg)]
        raise ConversionError(f"{cfg_path} describes a model Megatron-Core refuses: {msg}"
                              + (f" [config.json field: {', '.join(fields)}]" if fields else "")
                              + "; fix config.json") from None


def _meta_non_layer(arch: ModelArch) -> dict:
    from megatron_coe.conversion.megatron_ckpt import canonical_shapes

    return {k: torch.empty(s, device="meta") for k, s in canonical_shapes(arch)["non_layer"].items()}


# --------------------------------------------------------------------------- per-rank work
def build_model(arch: ModelArch, tp: int = 1, pp: int = 1, ep: int = 1, etp: Optional[int] = None,
                seed: int = 1234, dtype: str = "float32"):
    """Initialise Megatron's parallel state (already-initialised torch.distributed) and build
    ``arch`` with ``dtype`` parameters."""
    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel

    install_cpu_compat()
    pg_collection = initialize_parallel(tp, pp, ep, etp, seed=seed)
    config = hf_config.megatron_config(
        arch, dtype, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp or tp,
        sequence_parallel=tp > 1, pipeline_dtype=getattr(torch, dtype))
    model = build_coe_gpt_model(config, pg_collection=pg_collection, vocab_size=arch.vocab_size,
                                max_sequence_length=arch.max_position_embeddings,
                                **arch.gpt_model_kwargs())
    return model, config


def save_model_checkpoint(model, arch: ModelArch, save_root: str, layout: dict, args_dict: dict,
                          extra_meta: Optional[dict] = None) -> str:
    """Collective: save ``model`` as ``save_root/iter_0000000`` in the trainer's format."""
    from megatron.core import dist_checkpointing

    from megatron_coe import checkpointing
    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.conversion.megatron_ckpt import as_conversion_errors, import_meta

    def write(tmp: str) -> None:
        with cuda_device_redirect(), checkpointing.sharded_writer():
            sharded = model.sharded_state_dict(metadata=checkpointing.SHARDING_METADATA)
            dist_checkpointing.save({"model": sharded}, tmp)

    meta = import_meta(arch, args_dict, layout, extra_meta) if torch.distributed.get_rank() == 0 else None
    if meta is not None:  # the local or TE spelling of its norm keys (models.checkpoint_keys)
        from megatron_coe.models import checkpoint_keys

        meta[checkpoint_keys.RECORD_KEY] = checkpoint_keys.record(
            model.sharded_state_dict(metadata=checkpointing.SHARDING_METADATA), model.config)
    with as_conversion_errors():
        return checkpointing.save(save_root, 0, write, meta)


def _rank_main(rank, world, hf_dir, save_root, tp, pp, ep, etp, upcycle, seq_length, verbose):
    from megatron_coe.conversion.megatron_ckpt import fill_model

    t0 = time.time()
    source = HFSource(hf_dir, upcycle)
    arch = source.arch
    if seq_length:
        arch = arch.replace(max_position_embeddings=seq_length)
    model, _ = build_model(arch, tp, pp, ep, etp, dtype=source.dtype)
    n = fill_model(model, lambda i: source.non_layer() if i < 0 else source.layer(i))
    layout = dict(world_size=world, tp=tp, pp=pp, ep=ep, dp=world // (tp * pp), num_microbatches=None)
    args = dict(hf_config.trainer_options(arch), tensor_model_parallel_size=tp,
                pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                expert_tensor_parallel_size=etp, sequence_parallel=tp > 1)
    extra = {"converted_from": os.path.abspath(hf_dir)}
    if source.family:
        extra["source_family"] = source.family
    if upcycle is not None:
        extra["upcycled_from"] = source.source_arch.to_dict()
    path = save_model_checkpoint(model, arch, save_root, layout, args, extra)
    if verbose and rank == 0:
        print(f"rank 0: filled {n} local tensors; saved {path} ({time.time() - t0:.1f} s)", flush=True)
    return path


def import_hf(hf_dir: str, save_root: str, *, tp: int = 1, pp: int = 1, ep: int = 1,
              etp: Optional[int] = None, upcycle: Optional[Upcycle] = None,
              seq_length: Optional[int] = None, verbose: bool = True, timeout: float = 1800.0) -> str:
    """HF directory -> ``save_root/iter_0000000`` saved from a ``tp x pp x ep`` layout.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank calls this and the
    job's ranks are used (their number must be ``tp * pp * ep * k``); otherwise ``tp * pp * ep``
    gloo processes are forked on this machine.
    """
    from megatron_coe import checkpointing
    from megatron_coe.conversion.megatron_ckpt import as_conversion_errors

    with as_conversion_errors():  # a run's checkpoints are never replaced by an import
        checkpointing.refuse_import_into_run(save_root, hf_dir)
    source = HFSource(hf_dir, upcycle)  # config / weight errors before any process starts
    arch = source.arch
    _check_layout(arch, tp, pp, ep, etp)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    verbose = verbose and int(os.environ.get("RANK", "0")) == 0
    if verbose:
        src = source.source_arch
        kind = "MLA" if arch.multi_latent_attention else "MHA"
        what = (f"upcycling MoE top-{src.moe_router_topk} -> CoE-{arch.coe_iterations} "
                f"top-{arch.moe_router_topk} per pass" if upcycle
                else f"{kind} C={arch.coe_iterations}")
        print(f"importing {hf_dir} ({source.config.get('model_type')}; {what}) as TP={tp} PP={pp} EP={ep}",
              flush=True)
        notes = [families.mtp_note(source.config)]
        if upcycle:
            notes += Upcycle.notes(source.source_arch, arch)
        for note in filter(None, notes):
            print(note, flush=True)
    if world_env > 1:
        if not torch.distributed.is_initialized():  # conversion is CPU work: gloo, also on GPU nodes
            torch.distributed.init_process_group("gloo")
        world = torch.distributed.get_world_size()
        if world % (tp * pp * ep):
            raise ConversionError(f"WORLD_SIZE {world} is not a multiple of tp*pp*ep = {tp * pp * ep}")
        with as_conversion_errors():
            lock = checkpointing.lock_collective(save_root)
        try:
            return _rank_main(torch.distributed.get_rank(), world, hf_dir, save_root, tp, pp, ep,
                              etp, upcycle, seq_length, verbose)
        finally:
            if lock is not None:
                lock.release()
    from megatron_coe.local_launch import run_distributed

    with as_conversion_errors():
        lock = checkpointing.SaveLock(save_root)  # the forked ranks do not inherit it
    try:
        return run_distributed(_rank_main, tp * pp * ep, timeout=timeout, hf_dir=hf_dir, save_root=save_root,
                               tp=tp, pp=pp, ep=ep, etp=etp, upcycle=upcycle, seq_length=seq_length,
                               verbose=verbose)[0]
    finally:
        lock.release()


def _check_layout(arch: ModelArch, tp: int, pp: int, ep: int, etp: Optional[int]) -> None:
    p = []
    if min(tp, pp, ep) < 1:
        p.append("tp, pp and ep must be >= 1")
    if arch.num_layers % pp:
        p.append(f"num_layers {arch.num_layers} is not divisible by pp={pp}")
    if arch.num_moe_experts % ep:
        p.append(f"{arch.num_moe_experts} experts are not divisible by ep={ep}")
    if arch.num_attention_heads % tp:
        p.append(f"{arch.num_attention_heads} attention heads are not divisible by tp={tp}")
    if arch.vocab_size % tp:
        p.append(f"vocab size {arch.vocab_size} is not divisible by tp={tp}")
    if etp is not None and (tp * ep) % (ep * etp):
        p.append(f"expert tensor-parallel size {etp} does not fit tp={tp} x ep={ep}")
    if p:
        raise ConversionError("invalid target layout:\n  - " + "\n  - ".join(p))


def load_checkpoint_into(model, path: str) -> None:
    """Collective: load a trainer checkpoint's model weights into ``model`` (any saved layout)."""
    from megatron.core import dist_checkpointing

    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe import checkpointing
    from megatron_coe.conversion.megatron_ckpt import (SHARDING_METADATA, as_conversion_errors,
                                                       find_checkpoint_dir, read_meta)
    from megatron_coe.models.checkpoint_keys import match_to_checkpoint

    path = find_checkpoint_dir(path)
    with as_conversion_errors():
        checkpointing.verify(path, read_meta(path))
    with cuda_device_redirect():
        state = {"model": model.sharded_state_dict(metadata=SHARDING_METADATA)}
        # router (mlp.router or, older, routers.0) and local / TE norm spellings
        match_to_checkpoint(state["model"], model.config, path)
        loaded = dist_checkpointing.load(state, path)
    model.load_state_dict(loaded["model"])

