"""Narrow compatibility layer between Megatron-Core 0.16.x and machines it does not expect.

Two independent parts, both idempotent and both no-ops where they are not needed:

``install_megatron_fixes()``
    Workarounds for Megatron-Core 0.16.1 bugs that show whenever Transformer Engine is absent
    (CPU machines, or GPU machines running the local spec). Applied on every machine.

    * ``moe/moe_utils.py:1192`` reads the global ``te_general_gemm``, which is only defined
      when TE imports: every router forward raises ``NameError``. We define it as ``None``
      (the non-TE branch of ``RouterGatingLinearFunction`` is then taken, as upstream does
      from 0.19 on).
    * ``extensions/transformer_engine.py:66-77`` replaces a missing ``transformer_engine`` by a
      ``MagicMock``, so ``transformer/multi_latent_attention.py:55-62`` believes TE is there
      (``HAVE_TE=True``, ``TELinear`` a mock) and MLA fails in ``isinstance``. We set
      ``multi_latent_attention.HAVE_TE = False``.

``install_cpu_compat()``
    Activated only when ``torch.cuda.is_available()`` is False. Megatron-Core calls CUDA APIs
    unconditionally in these places (file:line inside ``megatron/core``, 0.16.1):

    * ``moe/token_dispatcher.py:445`` ``torch.cuda.Stream()``, ``:874`` ``torch.cuda.stream()``;
      ``dist_checkpointing/strategies/filesystem_async.py`` ``torch.cuda.synchronize()``:
      streams, events and synchronize become no-ops.
    * ``torch.cuda.current_device()`` used as a device: ``moe/router.py:90``, ``utils.py:631``,
      ``tensor_parallel/mappings.py:141,148,181,442``, ``tensor_parallel/layers.py:552``,
      ``models/common/embeddings/rotary_pos_embedding.py:78,162``,
      ``distributed/param_and_grad_buffer.py:800,806``,
      ``dist_checkpointing/strategies/state_dict_saver.py:252``: it returns the CPU device.
    * RNG: ``tensor_parallel/random.py:235-240,422`` seed and fork the CUDA generator (attention
      dropout and expert init ``fork()`` the tracker): routed to the CPU default generator.
    * ``moe/moe_utils.py:1093`` turns all-to-all split sizes into numpy only for CUDA tensors, so
      ``tensor_parallel/mappings.py:444`` hands tensors to ``all_to_all_single`` (TypeError on
      gloo): CPU split sizes are converted too.
    * ``tensor_parallel/mappings.py:148-150`` gathers uneven shards (``output_split_sizes``, used
      by the all-to-all dispatcher with expert tensor parallelism > 1) with a list
      ``all_gather``, which gloo rejects ("invalid tensor size"): CPU tensors are padded to the
      longest shard, gathered and unpadded. (The uneven ``reduce_scatter`` of its backward works
      on gloo as is.)
    * ``transformer/utils.py:35`` ``get_default_causal_mask`` (used by ``fusions/fused_softmax.py:327``
      when no attention mask is passed) allocates on ``device="cuda"``: a CPU version is bound
      in ``fused_softmax``.

    ``cuda_device_redirect()`` is a separate, opt-in context for the training loop: Megatron's
    DDP and optimizers create tensors with a literal ``device='cuda'`` (``optimizer/optimizer.py:481,485``,
    ``optimizer/clip_grads.py:103,174``) and compare ``param.type()`` against
    ``'torch.cuda.FloatTensor'`` (``optimizer/distrib_optimizer.py:361,420,431,582``,
    ``clip_grads.py:167``). Models alone never need it.

Nothing here changes numerics; ``tests/test_compat.py`` checks each stand-in.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_FIXES_INSTALLED = False
_CPU_INSTALLED = False


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a TE build that does not match torch
        return False
    return True


class TransformerEngineUnavailable(RuntimeError):
    """The Transformer Engine spec or FP8 was requested where TE or a CUDA GPU is missing."""


def require_transformer_engine(what: str) -> None:
    """Raise a clear error unless Transformer Engine and a CUDA device are both present.

    GPU-only paths (TE specs, FP8, grouped GEMM) call this and never fall back silently."""
    if not torch.cuda.is_available():
        raise TransformerEngineUnavailable(
            f"{what} needs a CUDA GPU with Transformer Engine; this machine has no CUDA device. "
            "On CPU use the local spec (--transformer-impl local) and no --fp8-format."
        )
    if not have_transformer_engine():
        raise TransformerEngineUnavailable(
            f"{what} needs Transformer Engine, which is not importable here. Install it "
            "(requirements-gpu.txt, or use an NVIDIA PyTorch container) or use --transformer-impl local."
        )


def install_megatron_fixes() -> None:
    """Work around Megatron-Core 0.16.1 bugs that show without Transformer Engine."""
    global _FIXES_INSTALLED
    if _FIXES_INSTALLED:
        return
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if not have_transformer_engine():
        import megatron.core.transformer.multi_latent_attention as mla

        mla.HAVE_TE = False
    _FIXES_INSTALLED = True


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoOpStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoOpStream)

    def __hash__(self):
        return 0


_DEFAULT_STREAM = _NoOpStream()


def install_cpu_compat() -> bool:
    """Install the CPU stand-ins if (and only if) no CUDA device exists. Returns True if active."""
    global _CPU_INSTALLED
    install_megatron_fixes()
    if torch.cuda.is_available():
        return False
    if _CPU_INSTALLED:
        return True
    cuda = torch.cuda
    cpu = torch.device("cpu")

    def _manual_seed(seed):
        # Not torch.manual_seed: it calls torch.cuda.manual_seed_all, i.e. back here.
        torch.default_generator.manual_seed(int(seed))

    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.synchronize = lambda device=None: None
    cuda.current_device = lambda: cpu
    cuda.set_device = lambda device: None
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.manual_seed = _manual_seed
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda device=None: 0
    cuda.max_memory_allocated = lambda device=None: 0
    cuda.memory_reserved = lambda device=None: 0
    cuda.reset_peak_memory_stats = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.nvtx.range_push = lambda *args, **kwargs: None
    cuda.nvtx.range_pop = lambda *args, **kwargs: None

    import megatron.core.tensor_parallel.random as mrandom

    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(
        new_state
    )

    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original_move = moe_utils.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    import megatron.core.tensor_parallel.mappings as mappings

    original_gather = mappings._gather_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or input_.is_cuda or group.size() == 1:
            return original_gather(input_, group, output_split_sizes, use_global_buffer)
        # gloo's all_gather needs equal shapes: pad each shard to the longest, gather, unpad.
        longest = max(output_split_sizes)
        rest = tuple(input_.shape[1:])
        padded = input_.new_zeros((longest,) + rest)
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * group.size(),) + rest)
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat(
            [gathered[r * longest : r * longest + n] for r, n in enumerate(output_split_sizes)]
        )

    mappings._gather_along_first_dim = _gather_along_first_dim

    import functools

    import megatron.core.fusions.fused_softmax as fused_softmax

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    fused_softmax.get_default_causal_mask = get_default_causal_mask

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _CPU_INSTALLED = True
    return True


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites ``device='cuda'`` to the CPU and reports CPU tensors' ``.type()`` as CUDA types."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "pin_memory":
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        if name == "type" and len(args) == 1 and not kwargs:
            result = func(*args)
            if isinstance(result, str) and result.startswith("torch.") and ".cuda." not in result:
                return "torch.cuda." + result[len("torch."):]
            return result
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_device_redirect():
    """Context for Megatron's DDP/optimizer on CPU; a plain nullcontext when CUDA exists."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaToCpuMode():
        yield
