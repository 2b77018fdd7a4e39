"""Reading and writing the trainer's ``dist_checkpointing`` checkpoints for conversion.

Reading (``MegatronCheckpoint``) needs no process group and no model: ``dist_checkpointing``'s
``torch_dist`` backend is PyTorch Distributed Checkpoint (DCP), whose metadata gives every
tensor's global shape, and DCP reads any slice of a global tensor from whatever shards hold it.
So a checkpoint saved under any TP / EP / PP / DP layout is read one layer at a time (the layer
axis of Megatron's stacked ``decoder.layers.*`` keys is sliced) and only one layer is held.
(DCP deserialises each stored chunk whole before slicing it, so the transient peak per read is
one saved chunk: one training rank's shard of one weight over the layers of its pipeline stage.)

Writing (``save_megatron_checkpoint``, run on every rank of the target layout) builds the
target-layout model, fills each local shard from global tensors by name and offset (the model's own
``sharded_state_dict`` says which global slice every local tensor is), and saves it with
``dist_checkpointing`` exactly as ``megatron_coe.training.checkpoint`` does, plus the
``coe_checkpoint.json`` that the trainer's ``--load`` looks for.

The checkpoint format (names, tracker, metadata, checksums, publishing) is
``megatron_coe.checkpointing``'s; this module finds, verifies and saves only through it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Callable, Dict, Optional

import torch

from megatron_coe import checkpointing
from megatron_coe.arch import RECORD_KEY, ModelArch
from megatron_coe.checkpointing import META, SHARDING_METADATA, CheckpointError
from megatron_coe.conversion import mapping
from megatron_coe.conversion import hf_config
from megatron_coe.conversion.hf_config import ConversionError

LAYER_PREFIX = "decoder.layers."
# keys of models with dense layers (Megatron's non-homogeneous layers): decoder.layers.{l}.suffix
_PER_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


@contextlib.contextmanager
def as_conversion_errors():
    """The format owner's ``CheckpointError`` as this package's ``ConversionError``."""
    try:
        yield
    except CheckpointError as e:
        raise ConversionError(str(e)) from None


def find_checkpoint_dir(path: str) -> str:
    """``path`` itself if it is a published iteration directory, else the one its tracker names."""
    if not os.path.exists(path):
        raise ConversionError(f"checkpoint path {path} does not exist")
    with as_conversion_errors():
        found = checkpointing.find_checkpoint(path)
    if found is None:
        raise ConversionError(
            f"{path} holds no published checkpoint ({checkpointing.TRACKER} naming an iter_NNNNNNN "
            f"with {META}); pass the --save directory of a training run or one of its iter_* "
            "directories")
    return found


# --------------------------------------------------------------------------- DCP slice reads
def _dcp_planner_cls():
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Reads ``state_dict[key]`` from the global-tensor slice starting at ``offsets[key]``."""

        def __init__(self, offsets):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.offsets = offsets

        def create_local_plan(self):
            items = []
            for key, dest in self.state_dict.items():
                chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets[key]), sizes=dest.size())
                items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key],
                                                          [chunk])
            return LoadPlan(items)

        def resolve_tensor(self, read_item):
            dest = self.state_dict[read_item.dest_index.fqn]
            return dest[tuple(slice(o, o + n) for o, n in zip(read_item.dest_offsets, read_item.lengths))]

    return SlicePlanner


class MegatronCheckpoint:
    """A published trainer checkpoint, read one layer at a time.

    Attributes: ``path`` (iteration directory), ``meta`` (``coe_checkpoint.json``), ``arch``
    (the architecture record, ``ModelArch``), ``dtype`` (the stored weights'), ``tensors``
    ({key: (global shape, dtype)} of the model tensors).
    """

    def __init__(self, path: str, arch: Optional[ModelArch] = None):
        import torch.distributed.checkpoint as dcp

        self.path = find_checkpoint_dir(path)
        self.meta = read_meta(self.path)
        with as_conversion_errors():
            checkpointing.verify(self.path, self.meta)
        backend = _read_json(os.path.join(self.path, "metadata.json"), required=False) or {}
        if backend and backend.get("sharded_backend") != "torch_dist":
            raise ConversionError(
                f"{self.path} uses the dist_checkpointing backend {backend.get('sharded_backend')!r}; "
                "only 'torch_dist' (the trainer's) is supported")
        if not os.path.isfile(os.path.join(self.path, ".metadata")):
            raise ConversionError(f"{self.path} has no .metadata file: not a complete torch_dist checkpoint")
        self._reader_cls = dcp.FileSystemReader
        md = dcp.FileSystemReader(self.path).read_metadata()
        self._check_shard_files(md)
        self.tensors = {}
        for key, m in md.state_dict_metadata.items():
            if key.startswith("optimizer.") or "_extra_state" in key or not hasattr(m, "size"):
                continue
            self.tensors[key] = (tuple(m.size), m.properties.dtype)
        self.arch = arch or arch_from_meta(self.meta, self.tensors, self.path)
        self.dtype = _stored_dtype(self.tensors) or "float32"
        self._check_matches_record()

    def _check_shard_files(self, md) -> None:
        files = {info.relative_path for info in md.storage_data.values()}
        missing = sorted(f for f in files if not os.path.isfile(os.path.join(self.path, f)))
        if missing:
            raise ConversionError(
                f"checkpoint {self.path} is incomplete: missing shard file(s) {missing} "
                f"(of {len(files)}); copy the whole iteration directory")

    # ------------------------------------------------------------------ layout
    def layer_keys(self, layer: Optional[int] = None) -> Dict[str, tuple]:
        """Stacked per-layer keys -> global shape (with the layer axis first); with dense layers
        (``moe_layer_freq``, Megatron's non-homogeneous layers) the keys of global layer
        ``layer``, ``decoder.layers.{layer}.*``, whose shapes have no layer axis."""
        if layer is not None and self.per_layer_keys:
            prefix = f"{LAYER_PREFIX}{layer}."
            return {k: s for k, (s, _) in self.tensors.items() if k.startswith(prefix)}
        return {k: s for k, (s, _) in self.tensors.items() if k.startswith(LAYER_PREFIX)}

    @property
    def per_layer_keys(self) -> bool:
        return any(_PER_LAYER_RE.match(k) for k in self.tensors)

    def expected_shapes(self) -> Dict[str, tuple]:
        """{checkpoint key: global shape} that ``self.arch`` implies (aliases resolved from the file)."""
        inverse = {}  # per layer: a TE checkpoint spells a dense layer's pre-MLP norm otherwise
        for key in self.layer_keys():
            m = _PER_LAYER_RE.match(key)
            layer, suffix = (int(m.group(1)), m.group(2)) if m else (None, key[len(LAYER_PREFIX):])
            inverse[(layer, mapping.canonical_suffix(suffix))] = suffix
        out = {}
        L, E = self.arch.num_layers, self.arch.num_moe_experts
        per_layer = any(not v for v in self.arch.moe_layer_pattern())
        for layer in range(L if per_layer else 1):
            lead, prefix = ((), f"{LAYER_PREFIX}{layer}.") if per_layer else ((L,), LAYER_PREFIX)
            for canon, shape in layer_shapes(self.arch, layer).items():
                m = mapping._EXPERT_RE.match(canon)
                if m:
                    if m.group(1) != "0":
                        continue
                    out[prefix + mapping.STACKED_EXPERT_PREFIX + m.group(2)] = lead + (E,) + shape
                else:
                    out[prefix + inverse.get((layer if per_layer else None, canon), canon)] = lead + shape
        out.update(canonical_shapes(self.arch)["non_layer"])
        return out

    def _check_matches_record(self) -> None:
        expected = self.expected_shapes()
        problems = []
        for key, shape in expected.items():
            if key not in self.tensors:
                problems.append(f"missing tensor {key} (expected shape {list(shape)})")
            elif tuple(self.tensors[key][0]) != tuple(shape):
                problems.append(f"{key}: shape {list(self.tensors[key][0])} in the checkpoint, "
                                f"{list(shape)} from its config")
        for key in self.tensors:
            if key not in expected:
                problems.append(f"unexpected tensor {key} {list(self.tensors[key][0])}")
        if problems:
            raise ConversionError(
                f"checkpoint {self.path} does not match its recorded configuration "
                f"({META} {RECORD_KEY} / model_config / args):\n  - " + "\n  - ".join(problems[:20])
                + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""))

    # ------------------------------------------------------------------ reads
    def read(self, requests: Dict[str, tuple]) -> Dict[str, torch.Tensor]:
        """``{key: (offsets, shape)}`` -> ``{key: tensor}`` (global-tensor slices)."""
        import torch.distributed.checkpoint as dcp

        dests = {k: torch.empty(shape, dtype=self.tensors[k][1]) for k, (_, shape) in requests.items()}
        planner = _dcp_planner_cls()({k: off for k, (off, _) in requests.items()})
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(dests, storage_reader=self._reader_cls(self.path), planner=planner, no_dist=True)
        return dests

    def read_layer(self, layer: int) -> Dict[str, torch.Tensor]:
        """Canonical Megatron tensors of global layer ``layer`` (see ``mapping``)."""
        requests = {}
        per_layer = self.per_layer_keys
        for key, shape in self.layer_keys(layer).items():
            if per_layer:
                requests[key] = ((0,) * len(shape), tuple(shape))
            else:
                requests[key] = ((layer,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:]))
        loaded = self.read(requests)
        out = {}
        for key, t in loaded.items():
            if per_layer:
                suffix = _PER_LAYER_RE.match(key).group(2)
            else:
                suffix, t = key[len(LAYER_PREFIX):], t[0]
            if suffix.startswith(mapping.STACKED_EXPERT_PREFIX):
                out.update(mapping.split_stacked_experts(suffix, t))
            else:
                out[mapping.canonical_suffix(suffix)] = t
        return out

    def read_non_layer(self) -> Dict[str, torch.Tensor]:
        keys = [k for k in self.tensors if not k.startswith(LAYER_PREFIX)]
        return self.read({k: ((0,) * len(self.tensors[k][0]), self.tensors[k][0]) for k in keys})


def _read_json(path: str, required: bool = True):
    if not os.path.isfile(path):
        if required:
            raise ConversionError(f"{path} is missing")
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None


def read_meta(path: str) -> dict:
    """The checkpoint's metadata (``checkpointing.read_meta``) as a ``ConversionError`` on failure."""
    with as_conversion_errors():
        return checkpointing.read_meta(path)


def arch_from_meta(meta: dict, tensors: Optional[dict] = None, path: str = "") -> ModelArch:
    """The architecture record of a checkpoint (``arch`` in its metadata).

    Trainer checkpoints and imports record ``arch`` (``megatron_coe.arch.ModelArch``). Older
    imports carry ``model_config`` (``hf_config.from_legacy_model_config``), older trainer
    checkpoints only the trainer's ``args``, from which the record is rebuilt
    (``ModelArch.from_checkpoint_meta``: options added since get the values that code built).
    """
    where = f"{path}/{META}" if path else META
    try:
        if not isinstance(meta.get(RECORD_KEY), dict) and isinstance(meta.get("model_config"), dict):
            arch = hf_config.from_legacy_model_config(meta["model_config"])
        else:
            arch = _arch_from_record(meta, where)
    except ConversionError as e:
        raise ConversionError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConversionError(f"{where}: cannot read the recorded model ({type(e).__name__}: "
                              f"{e})") from None
    if tensors is not None:
        emb = tensors.get("embedding.word_embeddings.weight")
        if emb is not None and emb[0][0] != arch.vocab_size:
            raise ConversionError(
                f"checkpoint {path}: embedding has {emb[0][0]} rows but {META} records vocab_size "
                f"{arch.vocab_size}")
        if "output_layer.weight" not in tensors and emb is not None:
            arch = arch.replace(untie_embeddings_and_output_weights=False)
    return arch


def _stored_dtype(tensors: Optional[dict]) -> Optional[str]:
    if not tensors or "embedding.word_embeddings.weight" not in tensors:
        return None
    dtype = tensors["embedding.word_embeddings.weight"][1]
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")


def _arch_from_record(meta: dict, where: str) -> ModelArch:
    if not isinstance(meta.get(RECORD_KEY), dict) and not isinstance(meta.get("args"), dict):
        raise ConversionError(f"records neither the model ({RECORD_KEY}) nor trainer args")
    if meta.get("vocab_size") is None and not (meta.get(RECORD_KEY) or {}).get("vocab_size"):
        raise ConversionError("records no vocab_size")
    args = meta.get("args") or {}
    if args.get("moe_router_load_balancing_type") == "sinkhorn":
        raise ConversionError("cannot convert this Megatron model: sinkhorn routing is not "
                              "supported")
    arch = ModelArch.from_checkpoint_meta(meta)
    if arch.vocab_size is None:
        arch = arch.replace(vocab_size=meta.get("vocab_size"))
    return hf_config.check_convertible(arch)


# --------------------------------------------------------------------------- shapes
def layer_shapes(arch: ModelArch, layer_idx: int) -> dict:
    """{canonical suffix: shape} of global layer ``layer_idx`` (CoE layer or dense MLP)."""
    shapes = canonical_shapes(arch)
    return shapes["layer"] if arch.is_moe_layer(layer_idx) else shapes["dense_layer"]


def canonical_shapes(arch: ModelArch) -> dict:
    """{"layer": {canonical suffix: shape}, "non_layer": {key: shape}} of ``arch``."""
    s = arch
    H, heads = s.hidden_size, s.num_attention_heads
    norm = [("weight",), ("weight", "bias")][s.normalization == "LayerNorm"]
    layer = {}
    for n in ("input_layernorm", "pre_mlp_layernorm"):
        layer.update({f"{n}.{w}": (H,) for w in norm})
    a = "self_attention."
    if not s.multi_latent_attention:
        d, groups = s.resolved("kv_channels"), s.resolved("num_query_groups")
        layer[a + "linear_qkv.weight"] = ((heads + 2 * groups) * d, H)
        if s.qk_layernorm_on:
            layer.update({f"{a}{n}.{w}": (d,) for n in ("q_layernorm", "k_layernorm") for w in norm})
        layer[a + "linear_proj.weight"] = (H, heads * d)
    else:
        qd = heads * (s.qk_head_dim + s.qk_pos_emb_head_dim)
        if s.q_lora_rank is None:
            layer[a + "linear_q_proj.weight"] = (qd, H)
        else:
            layer[a + "linear_q_down_proj.weight"] = (s.q_lora_rank, H)
            layer[a + "linear_q_up_proj.weight"] = (qd, s.q_lora_rank)
            if s.qk_layernorm_on:
                layer.update({f"{a}q_layernorm.{w}": (s.q_lora_rank,) for w in norm})
        layer[a + "linear_kv_down_proj.weight"] = (s.kv_lora_rank + s.qk_pos_emb_head_dim, H)
        if s.qk_layernorm_on:
            layer.update({f"{a}kv_layernorm.{w}": (s.kv_lora_rank,) for w in norm})
        layer[a + "linear_kv_up_proj.weight"] = (
            heads * (s.qk_head_dim + s.v_head_dim), s.kv_lora_rank)
        layer[a + "linear_proj.weight"] = (H, heads * s.v_head_dim)
    g = 2 if s.gated_linear_unit else 1
    dense = dict(layer)
    ffn = s.resolved("ffn_hidden_size")
    dense.update({"mlp.linear_fc1.weight": (g * ffn, H), "mlp.linear_fc2.weight": (H, ffn)})
    E = s.num_moe_experts
    for t in range(s.num_routers):
        layer[f"mlp.routers.{t}.weight"] = (E, H)
        if s.moe_router_enable_expert_bias:
            layer[f"mlp.routers.{t}.expert_bias"] = (E,)
    moe_size = s.resolved("moe_ffn_hidden_size")
    for e in range(E):
        layer[f"{mapping.EXPERT_PREFIX}{e}.linear_fc1.weight"] = (g * moe_size, H)
        layer[f"{mapping.EXPERT_PREFIX}{e}.linear_fc2.weight"] = (H, moe_size)
    shared = s.moe_shared_expert_intermediate_size
    if shared:
        layer["mlp.shared_experts.linear_fc1.weight"] = (g * shared, H)
        layer["mlp.shared_experts.linear_fc2.weight"] = (H, shared)
    non_layer = {"embedding.word_embeddings.weight": (s.vocab_size, H),
                 "decoder.final_layernorm.weight": (H,)}
    if s.normalization == "LayerNorm":
        non_layer["decoder.final_layernorm.bias"] = (H,)
    if s.untie_embeddings_and_output_weights:
        non_layer["output_layer.weight"] = (s.vocab_size, H)
    return {"layer": layer, "dense_layer": dense, "non_layer": non_layer}


# --------------------------------------------------------------------------- writing
def fill_model(model, get_tensors: Callable[[int], Dict[str, torch.Tensor]]) -> int:
    """Copy global canonical tensors into this rank's shards of ``model`` (a ``GPTModel``).

    ``get_tensors(l)`` returns global layer ``l``'s canonical tensors, ``get_tensors(-1)`` the
    embedding / final norm / output layer; only what this rank holds is requested. The model's own
    ``sharded_state_dict`` gives each local tensor's key and global offsets (layer, expert, TP
    slice; the fused GLU ``linear_fc1`` is split into its gate and up halves by Megatron's
    factory). Returns the number of tensors filled; raises on any tensor it cannot place.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    from megatron_coe.compat import cuda_device_redirect

    with cuda_device_redirect():
        sharded = model.sharded_state_dict(metadata=SHARDING_METADATA)
    shards = []
    for v in nested_values(sharded):
        if isinstance(v, ShardedTensorFactory):
            built = v.build()
            shards.extend(x for x in nested_values(built) if isinstance(x, ShardedTensor))
        elif isinstance(v, ShardedTensor):
            shards.append(v)
        elif not isinstance(v, ShardedObject):
            raise ConversionError(f"unexpected entry in the model's sharded state dict: {type(v).__name__}")
    by_layer: Dict[int, list] = {}
    for sh in shards:
        if sh.key.endswith("_extra_state"):
            continue
        m = _PER_LAYER_RE.match(sh.key)
        if m:  # dense layers (moe_layer_freq): decoder.layers.{l}.*, no layer axis
            by_layer.setdefault(int(m.group(1)), []).append(sh)
        elif sh.key.startswith(LAYER_PREFIX):
            by_layer.setdefault(int(sh.global_offset[0]), []).append(sh)
        else:
            by_layer.setdefault(-1, []).append(sh)
    count = 0
    with torch.no_grad():
        for layer_idx in sorted(by_layer):
            tensors = get_tensors(layer_idx)
            for sh in by_layer[layer_idx]:
                _copy_shard(sh, tensors, layer_idx)
                count += 1
    return count


def _copy_shard(sh, tensors: Dict[str, torch.Tensor], layer_idx: int) -> None:
    offsets = tuple(int(o) for o in sh.global_offset)
    per_layer = _PER_LAYER_RE.match(sh.key)
    if layer_idx < 0:
        name, rest = sh.key, offsets
    else:
        suffix = per_layer.group(2) if per_layer else sh.key[len(LAYER_PREFIX):]
        if not per_layer:
            offsets = offsets[1:]  # the layer axis
        if suffix.startswith(mapping.STACKED_EXPERT_PREFIX):
            name = f"{mapping.EXPERT_PREFIX}{offsets[0]}.{suffix[len(mapping.STACKED_EXPERT_PREFIX):]}"
            rest = offsets[1:]
        else:
            name, rest = mapping.canonical_suffix(suffix), offsets
    if name not in tensors:
        raise ConversionError(f"no source tensor for the model's {sh.key} (canonical {name!r}, layer {layer_idx})")
    src = tensors[name]
    local = sh.data
    if len(rest) != src.dim():
        raise ConversionError(f"{sh.key}: offsets {offsets} do not fit the source shape {list(src.shape)}")
    piece = src[tuple(slice(o, o + n) for o, n in zip(rest, local.shape))]
    if tuple(piece.shape) != tuple(local.shape):
        raise ConversionError(f"{sh.key}: source slice {list(piece.shape)} != local shard {list(local.shape)}")
    local.copy_(piece)


def import_meta(arch: ModelArch, args_dict: dict, layout: dict, extra: Optional[dict] = None) -> dict:
    """Metadata of an imported (weights-only) checkpoint; ``checkpointing.save`` adds the rest:
    the architecture record (what ``--load`` checks and a re-export reads) and the trainer
    options that build it."""
    meta = dict(consumed_train_samples=0, vocab_size=arch.vocab_size, layout=layout,
                args=args_dict, weights_only=True)
    meta[RECORD_KEY] = arch.to_dict()
    meta.update(extra or {})
    return meta
