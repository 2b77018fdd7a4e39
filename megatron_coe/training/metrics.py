"""What a run reports: progress lines, a per-step JSONL file and TensorBoard scalars.

All ranks take part in the reductions (they are collectives); only global rank 0 writes.

* lm loss: token-weighted mean over the global batch (``[sum, tokens]`` summed over all ranks;
  only last pipeline stages contribute, tensor-parallel duplicates cancel in the ratio).
* aux losses: Megatron's aux-loss tracker, one entry per (name, layer); CoE names end in
  ``_pass{t}``. Values are per micro-batch means of ``loss / coeff`` (as Megatron-LM logs them).
* expert-load imbalance: max/mean of ``tokens_per_expert_per_pass`` per (layer, pass), summed
  over all ranks (data/expert/sequence shards see disjoint tokens, pipeline stages own disjoint
  layers) since the last log line; with token dropping also the dropped fraction of each
  (layer, pass)'s expert choices (capacity is per pass, on that pass's routing).
* global batch: each step's (the ``--rampup-batch-size`` ramp's current size) and the samples
  consumed after it, in every JSONL record (``global_batch_size``, ``consumed_samples``) and as
  TensorBoard's ``train/batch_size``; throughput and FLOPs per step use it.
* model FLOPs per step count attention, the router, C x top-k routed experts and the shared
  expert of every pass, and the output layer (x3 for forward + backward). MFU needs a peak:
  ``--peak-tflops`` or a known GPU.
* Weights & Biases (``--wandb-project``, Megatron-LM's flags): the TensorBoard scalars, under
  the same names and steps, go to a W&B run in ``--wandb-save-dir`` (default ``<--save>/wandb``)
  whose config is the run's options; ``WANDB_MODE=offline`` keeps everything in that directory
  (``wandb sync`` uploads it later). Written by global rank 0 (Megatron-LM: the last rank; the
  values are the same all-reduced ones).
* GPU memory (CUDA only): ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of rank 0
  since the start, in every JSONL record (``max_memory_*_gib``) and on the progress line.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from typing import Optional

import torch

from megatron_coe import arch
from megatron_coe.training.options import TrainArgs

_PASS = re.compile(r"^(?P<name>.+)_pass(?P<t>\d+)$")
_PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


# --------------------------------------------------------------------------- FLOPs
def flops_per_token(args: TrainArgs, vocab_size: int) -> float:
    """Training FLOPs per token of this run's architecture (``arch.flops_per_token``)."""
    return arch.flops_per_token(arch.ModelArch.from_args(args), args.seq_length, vocab_size)


def peak_flops_per_device(args: TrainArgs) -> Optional[float]:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in _PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


# --------------------------------------------------------------------------- reductions
def reduce_lm_loss(reports: list, extra=0.0):
    """(global token-weighted lm loss, ``extra`` summed over ranks); one all-reduce.

    ``extra`` is a float or a tuple of floats (per-rank flags: a sum > 0 means "some rank set
    it"); the second result has the same form.
    """
    flags = tuple(extra) if isinstance(extra, (tuple, list)) else (extra,)
    vec = torch.zeros(2 + len(flags), dtype=torch.float64)
    for r in reports:
        vec[:2] += r["lm loss"].detach().to("cpu", torch.float64)
    vec[2:] = torch.tensor(flags, dtype=torch.float64)
    if torch.cuda.is_available():
        vec = vec.cuda()
    torch.distributed.all_reduce(vec)
    vec = vec.cpu()
    summed = tuple(v.item() for v in vec[2:])
    loss = (vec[0] / vec[1].clamp(min=1)).item()
    return loss, (summed if isinstance(extra, (tuple, list)) else summed[0])


def reduce_aux_losses(num_microbatches: int, pg_collection) -> dict:
    """{tracker name: [value per layer]} for this step, then clears the tracker (through
    ``compat.router_losses``: the installed Megatron-Core's metrics tracker API)."""
    from megatron_coe.compat.router_losses import (
        clear_recorded_metrics,
        recorded_metrics,
        reduce_recorded_metrics,
    )

    names = sorted(recorded_metrics())
    if not names:
        return {}
    reduce_recorded_metrics(names, pg_collection)
    values = recorded_metrics()
    out = {n: (values[n].float() / num_microbatches).tolist() for n in names}
    clear_recorded_metrics()
    return out


def summarize_passes(aux: dict) -> dict:
    """{name_pass{t}: mean over layers}."""
    return {name: sum(v) / max(len(v), 1) for name, v in aux.items()}


class RoutingStats(dict):
    """{(layer, pass): max/mean tokens per expert}; ``dropped``: {(layer, pass): fraction of the
    pass's expert choices dropped by the capacity} (empty without token dropping)."""

    def __init__(self, imbalance: dict, dropped: dict):
        super().__init__(imbalance)
        self.dropped = dropped


def expert_load_imbalance(model: list, config) -> RoutingStats:
    """{(layer, pass): max/mean tokens per expert} over all ranks, and the dropped fractions
    (``RoutingStats``); resets the counters.

    Every rank joins the one all-reduce, including a pipeline stage that holds no CoE layer
    (dense layers, ``--moe-layer-freq``): the buffer's shape comes from the model config, not
    from the local layers, so no rank can skip the collective.
    """
    from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer

    layers = [m for chunk in model for m in chunk.modules() if isinstance(m, ChainOfExpertsLayer)]
    device = layers[0].tokens_per_expert_per_pass.device if layers else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    # [..., :E] kept tokens per expert, [..., E:] dropped and all choices: one all-reduce
    experts = config.num_moe_experts
    counts = torch.zeros(config.num_layers, config.coe_iterations, experts + 2,
                         dtype=torch.float64, device=device)
    for layer in layers:
        kept, dropped = layer.reset_routing_stats()
        counts[layer.layer_number - 1, :, :experts] += kept.to(torch.float64)
        counts[layer.layer_number - 1, :, experts:] += dropped.to(torch.float64)
    torch.distributed.all_reduce(counts)
    counts, dropped, chosen = counts[..., :experts], counts[..., experts], counts[..., experts + 1]
    mean = counts.mean(dim=-1).clamp(min=1e-12)
    ratio = (counts.max(dim=-1).values / mean).cpu()
    used = [(l, t) for l in range(ratio.shape[0]) for t in range(ratio.shape[1])
            if counts[l, t].sum() > 0]
    return RoutingStats({(l + 1, t + 1): ratio[l, t].item() for l, t in used},
                        {(l + 1, t + 1): (dropped[l, t] / chosen[l, t]).item() for l, t in used
                         if chosen[l, t] > 0})


# --------------------------------------------------------------------------- GPU
class GpuMonitor:
    """Utilisation and memory of this rank's GPU via NVML; inactive without CUDA or NVML."""

    def __init__(self):
        self.handle = None
        if not torch.cuda.is_available():
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.nvml = pynvml
        except Exception:  # NVMLError_LibraryNotFound and friends: no GPU metrics
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        try:
            util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu
            mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used
        except Exception:
            return {}
        return {"gpu/utilization_pct": float(util), "gpu/memory_used_gib": mem / 2**30,
                "gpu/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30}


# --------------------------------------------------------------------------- W&B
def wandb_dir(args: TrainArgs) -> Optional[str]:
    """Megatron-LM's W&B directory: ``--wandb-save-dir``, else ``<--save>/wandb``."""
    if args.wandb_save_dir:
        return args.wandb_save_dir
    return os.path.join(args.save, "wandb") if args.save else None


def check_wandb(args: TrainArgs) -> None:
    """Before anything is built: the package is importable and the run has a directory."""
    from megatron_coe.training.errors import SetupError

    if not args.wandb_project:
        return
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise SetupError(f"--wandb-project {args.wandb_project} needs the wandb package, which is "
                         "not installed: pip install wandb (pinned in requirements.txt) or drop "
                         "--wandb-project")
    if wandb_dir(args) is None:
        raise SetupError(f"--wandb-project {args.wandb_project}: W&B needs a run directory: set "
                         "--wandb-save-dir or --save (default <--save>/wandb)")
    if args.wandb_exp_name == "":
        raise SetupError("--wandb-exp-name is empty: give the W&B run a name or drop the flag")


def open_wandb(args: TrainArgs):
    """Start the W&B run (global rank 0); returns the run object."""
    import wandb

    path = wandb_dir(args)
    os.makedirs(path, exist_ok=True)
    kwargs = dict(dir=path, name=args.wandb_exp_name, project=args.wandb_project,
                  config=args.to_dict())
    if args.wandb_entity:
        kwargs["entity"] = args.wandb_entity
    return wandb.init(**kwargs)


# --------------------------------------------------------------------------- writer
def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsWriter:
    """Rank 0: progress lines, JSONL (one record per train step / validation) and TensorBoard."""

    def __init__(self, args: TrainArgs, flops_per_sample: float, world_size: int):
        self.args = args
        self.rank0 = torch.distributed.get_rank() == 0
        self.flops_per_sample = flops_per_sample
        self.world_size = world_size
        self.peak = peak_flops_per_device(args)
        self.gpu = GpuMonitor() if self.rank0 else None
        self.tb = None
        self.wandb = None
        self.jsonl = None
        self.step_times = []
        self.window = defaultdict(float)
        if not self.rank0:
            return
        path = args.metrics_file or (
            os.path.join(args.tensorboard_dir or args.save, "metrics.jsonl")
            if (args.tensorboard_dir or args.save) else None)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.jsonl = open(path, "a")
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=args.tensorboard_dir)
        if args.wandb_project:
            self.wandb = open_wandb(args)

    def _record(self, record: dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()

    def _scalars(self, values: dict, step: int) -> None:
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def train_step(self, iteration: int, loss: float, lr: float, grad_norm, step_time: float,
                   aux: dict, imbalance: Optional[dict], global_batch: int,
                   consumed: int) -> None:
        """Step ``iteration`` of ``global_batch`` samples (the batch ramp's current size), after
        which ``consumed`` samples are consumed."""
        if not self.rank0:
            return
        self.step_times = (self.step_times + [step_time])[-20:]
        tok_s = global_batch * self.args.seq_length / step_time
        flops = self.flops_per_sample * global_batch
        gn = float(grad_norm) if grad_norm is not None else None
        per_pass = summarize_passes(aux)
        record = dict(type="train", iteration=iteration, lm_loss=loss, lr=lr, grad_norm=gn,
                      global_batch_size=global_batch, consumed_samples=consumed,
                      step_time_s=step_time, tokens_per_s=tok_s,
                      model_tflops_per_step=flops / 1e12, aux=per_pass)
        scalars = {"train/lm_loss": loss, "train/lr": lr, "train/tokens_per_s": tok_s,
                   "train/step_time_ms": step_time * 1e3, "train/batch_size": global_batch,
                   "train/model_tflops_per_step": flops / 1e12}
        if gn is not None:
            scalars["train/grad_norm"] = gn
        if self.peak:
            record["mfu"] = flops / (step_time * self.world_size * self.peak)
            scalars["train/mfu"] = record["mfu"]
        for name, values in aux.items():
            scalars[f"aux/{name}"] = per_pass[name]
            for layer, v in enumerate(values, start=1):
                scalars[f"aux_per_layer/{name}/layer{layer}"] = v
        if imbalance:
            record["load_imbalance"] = {f"layer{l}_pass{t}": v for (l, t), v in imbalance.items()}
            for (l, t), v in imbalance.items():
                scalars[f"load_imbalance/layer{l}_pass{t}"] = v
        dropped = getattr(imbalance, "dropped", None)
        if dropped:
            record["dropped_fraction"] = {f"layer{l}_pass{t}": v for (l, t), v in dropped.items()}
            for (l, t), v in dropped.items():
                scalars[f"dropped_fraction/layer{l}_pass{t}"] = v
        if self.gpu:
            scalars.update(self.gpu.read())
        if torch.cuda.is_available():  # this rank's (rank 0's) peak since the start
            record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            record["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            scalars["gpu/max_allocated_gib"] = record["max_memory_allocated_gib"]
            scalars["gpu/max_reserved_gib"] = record["max_memory_reserved_gib"]
        self._record(record)
        self._scalars(scalars, iteration)
        if imbalance is not None:  # a log-interval step
            self._print(iteration, loss, lr, gn, tok_s, step_time, per_pass, imbalance,
                        record.get("mfu"), record.get("max_memory_allocated_gib"), global_batch)

    def _print(self, iteration, loss, lr, gn, tok_s, step_time, per_pass, imbalance, mfu,
               peak_gib=None, global_batch=None):
        mean_step = sum(self.step_times) / len(self.step_times)
        eta = mean_step * (self.args.train_iters - iteration)
        parts = [f"iter {iteration:>{len(str(self.args.train_iters))}}/{self.args.train_iters}",
                 f"lm loss {loss:.4f}"]
        by_pass = defaultdict(list)
        for name, v in per_pass.items():
            m = _PASS.match(name)
            if m and "load_balancing" in m["name"]:
                by_pass[int(m["t"])].append(v)
        if by_pass:
            parts.append("aux " + " ".join(f"p{t} {sum(v):.3g}" for t, v in sorted(by_pass.items())))
        if imbalance:
            worst = max(imbalance.values())
            parts.append(f"max load/mean {worst:.2f}")
        dropped = getattr(imbalance, "dropped", None)
        if dropped:  # per pass, mean over layers
            drops = defaultdict(list)
            for (_, t), v in dropped.items():
                drops[t].append(v)
            parts.append("dropped " + " ".join(f"p{t} {100 * sum(v) / len(v):.1f}%"
                                               for t, v in sorted(drops.items())))
        if self.args.rampup_batch_size:  # the ramp's current size (Megatron-LM's line has it)
            parts.append(f"global batch {global_batch}")
        parts += [f"lr {lr:.3e}", f"grad norm {gn:.3f}" if gn is not None else "grad norm -",
                  f"{tok_s:,.0f} tok/s", f"{step_time * 1e3:.1f} ms/step"]
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        if peak_gib is not None:
            parts.append(f"peak mem {peak_gib:.2f} GiB")
        parts.append(f"ETA {_fmt_time(eta)}")
        print(" | ".join(parts), flush=True)

    def validation(self, iteration: int, loss: float) -> None:
        if not self.rank0:
            return
        self._record(dict(type="valid", iteration=iteration, lm_loss=loss))
        self._scalars({"valid/lm_loss": loss}, iteration)
        print(f"validation at iter {iteration} | lm loss {loss:.6f}", flush=True)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
