"""CUDA on a machine without CUDA: stand-ins for the CUDA calls Megatron-Core makes unconditionally.

``install_cpu_compat()`` is activated only when ``torch.cuda.is_available()`` is False (it is a
no-op on GPU machines; it also applies ``te_absent.install_megatron_fixes()``). Call sites
(file names inside ``megatron/core``; registry entries ``cuda.*``):

* ``moe/token_dispatcher.py`` ``torch.cuda.Stream()`` / ``torch.cuda.stream()``;
  ``dist_checkpointing/strategies/filesystem_async.py`` ``torch.cuda.synchronize()``:
  streams, events and synchronize become no-ops (``cuda.streams``).
* ``torch.cuda.current_device()`` used as a device (router, utils, tensor-parallel mappings and
  layers, rotary embeddings, DDP buffers, the checkpoint saver): it returns the CPU device
  (``cuda.current_device``).
* RNG: ``tensor_parallel/random.py`` seeds and forks the CUDA generator (attention dropout and
  expert init ``fork()`` the tracker): routed to the CPU default generator (``cuda.rng``).
* ``moe/moe_utils.py`` ``maybe_move_tensor_to_cpu`` turns all-to-all split sizes into numpy only
  for CUDA tensors, so ``all_to_all_single`` gets tensors (TypeError on gloo): CPU split sizes
  are converted too (``cuda.alltoall_split_sizes``).
* ``tensor_parallel/mappings.py`` ``_gather_along_first_dim`` gathers uneven shards (the
  all-to-all dispatcher with expert tensor parallelism > 1) with a list ``all_gather``, which
  gloo rejects: CPU tensors are padded to the longest shard, gathered and unpadded
  (``cuda.uneven_all_gather``).
* ``transformer/utils.py`` ``get_default_causal_mask`` (used by ``fusions/fused_softmax.py``
  when no mask is passed) allocates on ``device="cuda"``: a CPU version is bound in
  ``fused_softmax`` (``cuda.causal_mask``).

``cuda_device_redirect()`` is a separate, opt-in context for the training loop
(``cuda.device_redirect``): Megatron's DDP, optimizers and schedules create tensors with a
literal ``device='cuda'`` and compare ``param.type()`` against ``'torch.cuda.FloatTensor'``.
Models alone never need it: ``outside_cuda_device_redirect()`` suspends it around the model's
forward inside the schedule (torch's private function-mode stack API).

Nothing here changes numerics; ``tests/test_compat.py`` checks each stand-in.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch.overrides import TorchFunctionMode

from megatron_coe.compat.registry import mark

_CPU_INSTALLED = False


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


CUDA_RNG_STATE_BYTES = 16  # a CUDA (Philox) generator's state: seed and offset, int64 each


def _set_default_cuda_rng_state(state, device="cuda"):
    """The "CUDA" default generator is the CPU one here: a real CUDA generator's state (a
    checkpoint's ``cuda_rng_state``, restored by Megatron-LM right after ``torch_rng_state``)
    has no CPU meaning and leaves the CPU generator as it is."""
    if state.numel() != CUDA_RNG_STATE_BYTES:
        torch.set_rng_state(state)


def _as_cpu_rng_state(state):
    """A tracker stream's state for the CPU generator; a CUDA generator's state (seed, offset)
    becomes the CPU generator seeded with its seed."""
    if state.numel() != CUDA_RNG_STATE_BYTES:
        return state
    seed = int.from_bytes(bytes(state[:8].tolist()), "little")
    return torch.Generator().manual_seed(seed).get_state()


def _drop_cpu_rng_changed_warning(record: logging.LogRecord) -> bool:
    return record.getMessage() != "CPU RNG state changed within GPU RNG context"


def install_cpu_compat() -> bool:
    """Install the CPU stand-ins if (and only if) no CUDA device exists. Returns True if active."""
    global _CPU_INSTALLED
    from megatron_coe.compat.te_absent import install_megatron_fixes

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
    cuda.set_rng_state = _set_default_cuda_rng_state
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
        _as_cpu_rng_state(new_state)
    )
    # The tracker's fork warns when the CPU generator moved inside a "GPU" RNG context; here the
    # "GPU" generator *is* the CPU one, so every dropout inside a fork would log it (each step).
    logging.getLogger(mrandom.__name__).addFilter(_drop_cpu_rng_changed_warning)

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
    for name in ("cuda.streams", "cuda.current_device", "cuda.rng", "cuda.alltoall_split_sizes",
                 "cuda.uneven_all_gather", "cuda.causal_mask"):
        mark(name)
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
    mark("cuda.device_redirect")
    with _CudaToCpuMode():
        yield


@contextlib.contextmanager
def outside_cuda_device_redirect():
    """Suspend an enclosing ``cuda_device_redirect()`` (the innermost torch function mode) for
    the body, e.g. the model's forward inside Megatron's schedule: the model needs none of the
    redirect on CPU, and the mode costs every torch call of the forward (10-20% of a tiny CPU
    step). Uses torch's private mode-stack API (``torch.overrides._get_current_function_mode_stack``,
    ``_pop_mode_temporarily``); outside the redirect (or with CUDA) it does nothing."""
    from torch.overrides import _get_current_function_mode_stack, _pop_mode_temporarily

    stack = _get_current_function_mode_stack()
    if stack and isinstance(stack[-1], _CudaToCpuMode):
        mark("cuda.device_redirect")
        with _pop_mode_temporarily():
            yield
    else:
        yield
