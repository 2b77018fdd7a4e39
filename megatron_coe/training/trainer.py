"""The training loop: Megatron-Core schedules, DDP + distributed optimizer, eval, checkpoints.

``preflight(args, world_size)`` checks everything a user can get wrong before any process group
exists; ``Trainer(args, preflight)`` builds the rest (``setup.py``); ``Trainer.train()`` runs::

    for each step: zero grads -> forward_backward_func (all micro-batches, pipeline schedule,
                   finalize_model_grads: DP/EP grad reduction, SP norms, expert-bias update)
                -> optimizer.step (clip, AdamW) -> LR scheduler -> metrics
                -> validate / save / exit (interval, signal, time limit) at the step boundary

Each step's global batch comes from Megatron-Core's number-of-micro-batches calculator
(``setup.batch_calculator``), updated from the consumed samples at the start of the step as in
Megatron-LM: constant, or the ``--rampup-batch-size`` ramp (more micro-batches per rank). The LR
scheduler, the consumed samples, the aux-loss scale and the logged throughput follow it; a
resumed run recomputes it from the checkpoint's consumed samples.

Stopping early (``signals.py``, ``timelimit.py``): a SIGTERM/SIGUSR1 (handler installed by
``train.main`` before anything is loaded) or a time limit that the next step would overrun is
seen by every rank through the step's loss all-reduce; all ranks save at the same boundary and
exit 0. A signal during start-up ends the run before its first step, writing nothing. With
``$COE_EXIT_REASON_FILE`` set, rank 0 writes why the run stopped into that file
(``finished``, ``time_limit``, ``signal``, ``exit_interval``) after the last checkpoint is
published, for a launcher that must decide whether to requeue.

Faults (``train.main`` turns each into one line and an exit status):

* non-finite values (``--check-for-nan-in-loss-and-grad``, on by default): after every step the
  lm loss, each aux loss and the gradient norm are checked, the verdicts combined in the step's
  loss all-reduce (all ranks stop at the same step), and the run raises ``NonFiniteError`` (exit
  3) without saving; before every save (whether or not the per-step check is on) all
  parameters are checked finite across ranks, so no published checkpoint holds NaN/Inf;
* other runs' checkpoints: a lost tracker resumes the newest iteration that verifies (one note
  line; all damaged: refused), and no save replaces an ``iter_N`` this run did not write
  (refused at start for the iterations the run covers, and again at each save);
* nothing to train: ``preflight`` raises ``NothingToTrain`` (exit 0) when the ``--load``
  checkpoint is already at ``--train-iters``, before anything is built;
* a hung or dead peer: a collective that times out (``--distributed-timeout-minutes``) or loses
  its peer becomes ``CollectiveError`` naming what this rank was doing (``Trainer.phase``).

Loss scaling for MoE aux losses is done by Megatron's schedule itself
(``MoEAuxLossAutoScaler.set_loss_scale(1 / num_microbatches)`` in ``forward_step_calc_loss``,
0.16.1), matching the lm loss's per-micro-batch mean; nothing is added here.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from megatron_coe import checkpointing
from megatron_coe.compat import cuda_device_redirect, outside_cuda_device_redirect
from megatron_coe.training import checkpoint as ckpt
from megatron_coe.training import data, memory, metrics, profiling, setup, signals, timelimit
from megatron_coe.training.options import TrainArgs

EXIT_REASON_ENV = "COE_EXIT_REASON_FILE"
EXIT_NON_FINITE = 3  # exit status of a run stopped by a NaN/Inf (user errors: 2)


class NothingToTrain(Exception):
    """The ``--load`` checkpoint is already at ``--train-iters``: nothing to do (exit 0)."""


class NonFiniteError(RuntimeError):
    """A NaN/Inf lm loss, aux loss, gradient norm or parameter; raised on every rank alike."""


class CollectiveError(RuntimeError):
    """A collective timed out (a hung peer) or lost its peer (a dead one); names the operation."""


_TIMED_OUT = re.compile(r"timed out|timeout", re.IGNORECASE)
_PEER_GONE = re.compile(r"connection (closed|reset)|broken pipe|peer", re.IGNORECASE)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron 0.16 3-tuple: (summed loss, token count, {'lm loss': [sum, count]}).

    The schedule divides the sum by the count and by the number of micro-batches. With context
    parallelism each rank sees its share of the tokens (``on_this_cp_rank``), as in Megatron-LM's
    ``loss_func``: the report's sums and counts are added over all ranks
    (``metrics.reduce_lm_loss``; Megatron-LM adds them over the data-parallel-with-CP group), and
    the gradients of the ranks' partial means are averaged over that group by Megatron-Core's
    DDP.
    """
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach().clone(), mask.sum().detach()])
    return loss, num_tokens, {"lm loss": report}


SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def on_this_cp_rank(batch: dict, attention_mask: torch.Tensor, cp_group) -> dict:
    """The micro-batch's sequence tensors and the causal ``attention_mask`` [1, 1, s, s], as
    this context-parallel rank sees them: with CP > 1 its two load-balanced chunks of each
    sequence (of 2 x CP; the mask's query rows), by Megatron-Core's ``get_batch_on_this_cp_rank``
    as Megatron-LM's ``get_batch`` does; with CP = 1 unchanged. Other keys (``dataset_id``) are
    dropped."""
    out = {key: batch[key] for key in SEQUENCE_KEYS}
    out["attention_mask"] = attention_mask
    if cp_group.size() > 1:
        from megatron_coe.compat.context_parallel import batch_on_this_cp_rank

        out = batch_on_this_cp_rank(out, cp_group)
    return out


@dataclass
class Preflight:
    """What is checked before any process group exists: every user error surfaces here."""

    layout: setup.Layout
    model_config: object
    tokenizer: object
    vocab_size: int
    resume_from: Optional[str]


def preflight(args: TrainArgs, world_size: int) -> Preflight:
    """Layout and batch arithmetic, model config, tokenizer + data files, --load compatibility."""
    setup.check_runtime(args)
    timelimit.check(args)
    if args.global_batch_size is None:  # Megatron-LM: one micro-batch per data-parallel rank
        model_parallel = (args.tensor_model_parallel_size * args.pipeline_model_parallel_size
                          * args.context_parallel_size)
        args.global_batch_size = args.micro_batch_size * max(1, world_size // model_parallel)
    layout = setup.check_layout(args, world_size)
    if args.train_samples is not None:  # Megatron-LM derives the steps from the samples
        args.train_iters = setup.train_iters_and_samples(args)[0]
    metrics.check_wandb(args)
    profiling.check(args, world_size)
    model_config = setup.build_model_config(args)  # validates itself (CoEConfigError / SetupError)
    data.validate_data(args, None)  # files first: a wrong --data-path names the data files
    tokenizer = data.load_tokenizer(args)
    data.validate_data(args, tokenizer)
    vocab_size = setup.padded_vocab_size(tokenizer.vocab_size, args)
    resume_from = ckpt.find_checkpoint(args.load) if args.load else None
    if args.load and resume_from is None and os.path.isdir(args.load):
        # a lost tracker: the newest iteration that verifies (or a refusal), never a new run
        resume_from = checkpointing.recover_untracked(args.load)
        note = checkpointing.untracked_note(args.load)
        if note and int(os.environ.get("RANK", "0")) == 0:
            print(note, flush=True)
    start = 0
    if resume_from:  # a wrong shape fails here, before any tensor is built or read
        meta = ckpt.read_meta(resume_from)
        ckpt.check_compatible(meta, args, vocab_size, resume_from)
        check_something_to_train(meta, args, resume_from)
        if not (args.no_load_optim or meta.get("weights_only")):
            start = int(meta.get("iteration", 0))
    elif args.load:
        _report_missing_checkpoint(args)
    if args.save:  # a file, read-only or full --save is found now, not after the steps are spent
        if not args.skip_train:  # no save of this run may replace a checkpoint it did not write
            checkpointing.refuse_overlap(args.save, start, args.train_iters)
        need = ckpt.estimated_bytes(args, model_config, vocab_size)
        if resume_from:
            need = max(need, checkpointing.checkpoint_bytes(resume_from))
        checkpointing.check_save_dir(args.save, need)
    return Preflight(layout, model_config, tokenizer, vocab_size, resume_from)


def _report_missing_checkpoint(args: TrainArgs) -> None:
    """--load found nothing: an error with --exit-on-missing-checkpoint, else one information
    line (a first run's --load is empty; a warning only when unpublished iterations are there)."""
    why = checkpointing.describe_missing(args.load)
    if args.exit_on_missing_checkpoint:
        raise ckpt.CheckpointError(f"{why}; --exit-on-missing-checkpoint is set: fix --load or "
                                   "drop that flag to train from scratch")
    if int(os.environ.get("RANK", "0")) == 0:
        level = "warning: " if "not a published checkpoint" in why else ""
        print(f"{level}starting from scratch: {why} (--exit-on-missing-checkpoint makes this an "
              "error)", flush=True)


def set_schedule_hooks(config, model: list, args: TrainArgs) -> None:
    """The schedule's gradient and parameter sync hooks, as Megatron-LM sets them for its model
    chunks (a list with several chunks, the function itself with one): ``no_sync_func`` (each
    chunk's ``no_sync``: the gradient reduce waits for the last micro-batch); with
    --overlap-grad-reduce ``grad_sync_func`` (each chunk's ``start_grad_sync``, which the
    interleaved schedule launches as soon as a chunk's last backward is done); with
    --overlap-param-gather and model chunks ``param_sync_func`` (each chunk's
    ``start_param_sync``, dispatched by the schedule before that chunk's first forward)."""
    def hooks(name: str):
        found = [getattr(chunk, name) for chunk in model]
        return found[0] if len(found) == 1 else found

    config.no_sync_func = hooks("no_sync")
    if args.overlap_grad_reduce:
        config.grad_sync_func = hooks("start_grad_sync")
    if args.overlap_param_gather and len(model) > 1:
        config.param_sync_func = hooks("start_param_sync")


def _first_sentence(error: BaseException) -> str:
    """The gist of a backend error: its first line, without gloo's ``[file.cc:N]`` prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]


def check_something_to_train(meta: dict, args: TrainArgs, path: str) -> None:
    """``NothingToTrain`` when resuming ``path`` (its metadata ``meta``) would start at or past
    ``--train-iters`` (a finished run started again); weights-only loads start at 0."""
    iteration = int(meta.get("iteration", 0))
    if args.skip_train or args.no_load_optim or meta.get("weights_only"):
        return
    if iteration >= args.train_iters:
        length = (f"--train-samples {args.train_samples} ({args.train_iters} steps)"
                  if args.train_samples is not None else f"--train-iters {args.train_iters}")
        flag = length.split()[0]
        raise NothingToTrain(f"nothing to train: checkpoint {path} is at iteration {iteration} "
                             f">= {length} (raise {flag} to train further)")


class Trainer:
    def __init__(self, args: TrainArgs, pre: Preflight, start_time: Optional[float] = None):
        """``start_time``: epoch seconds the process started (``--exit-duration-in-mins``)."""
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import finalize_model_grads
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_coe.parallel import initialize_parallel

        self.args = args
        self.phase = "start-up"  # what this rank is doing, for CollectiveError messages
        self.time_guard = timelimit.TimeGuard(timelimit.deadline(
            args, time.time() if start_time is None else start_time))
        self.eval_seconds = self.save_seconds = 0.0  # last validation / checkpoint durations
        world = torch.distributed.get_world_size()
        self.rank = torch.distributed.get_rank()
        self.layout, self.model_config = pre.layout, pre.model_config
        self.vocab_size, self.resume_from = pre.vocab_size, pre.resume_from
        tokenizer = pre.tokenizer

        vpp = self.model_config.virtual_pipeline_model_parallel_size  # None: not interleaved
        with self.doing("start-up: building process groups, datasets, model and optimizer"):
            self.pg_collection = initialize_parallel(
                args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                args.expert_model_parallel_size, args.expert_tensor_parallel_size, args.seed,
                distributed_timeout_minutes=args.distributed_timeout_minutes,  # also seeds
                context_parallel_size=args.context_parallel_size,
                virtual_pipeline_model_parallel_size=vpp)
            self.dp_rank = ps.get_data_parallel_rank()
            self.dp_size = ps.get_data_parallel_world_size()
            # Megatron-Core's calculator: the global batch and micro-batches of each step
            # (constant, or the --rampup-batch-size ramp over the consumed samples)
            self.batches = setup.batch_calculator(args, self.dp_size, self.rank)
            with setup.dataset_build_timeout(args):  # rank 0 builds indices, others wait
                self.train_ds, self.valid_ds = data.build_datasets(args, tokenizer)

            self.model = setup.build_model(args, self.model_config, self.vocab_size,
                                           self.pg_collection)
            self.optimizer = setup.build_optimizer(args, self.model)
            self.scheduler = setup.build_scheduler(args, self.optimizer)
        config = self.model_config
        set_schedule_hooks(config, self.model, args)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        # the interleaved schedule with virtual stages (one data iterator per model chunk)
        self.forward_backward = get_forward_backward_func(pp_size=self.layout.pp, vp_size=vpp)

        self.iteration, self.consumed = 0, 0
        if self.resume_from:
            with self.doing(f"start-up: loading checkpoint {self.resume_from}"):
                self.iteration, self.consumed = ckpt.load_checkpoint(
                    self.resume_from, self.model, self.optimizer, self.scheduler, args,
                    self.layout)
            self._log(f"resumed from {self.resume_from} at iteration {self.iteration}")
        self.last_saved = self.iteration if self.resume_from else None
        # --async-save: Megatron-Core's queue of background checkpoint writes, and
        # {call index: (iteration, path, start time)} of the unpublished ones
        self.async_queue, self.async_pending = None, {}
        if args.async_save:
            from megatron_coe.compat.async_checkpoint import calls_queue

            self.async_queue = calls_queue()

        s = args.seq_length
        mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
        self.attention_mask = mask.cuda() if torch.cuda.is_available() else mask
        self.flops_per_sample = metrics.flops_per_token(args, self.vocab_size) * s
        flops = self.flops_per_sample * args.global_batch_size  # a step of the full batch
        self.metrics = metrics.MetricsWriter(args, self.flops_per_sample, world)
        self.consumed_at_log = self.consumed  # straggler report: FLOPs since the last log line
        self.global_batch, self.num_microbatches = args.global_batch_size, None  # of this step
        self.profiler = profiling.StepProfiler(args, self.rank)
        self.straggler = profiling.StragglerReport(args, self.rank, world)
        self.lr = args.lr  # LR of the current step (for the metrics)
        with self.doing("start-up: counting parameters (all-reduce)"):
            params = setup.count_parameters(self.model)
        self._log(f"model: {type(config).__name__} C={config.coe_iterations} "
                  f"layers={config.num_layers} hidden={config.hidden_size} "
                  f"experts={config.num_moe_experts} top-k={config.moe_router_topk} | "
                  f"params {params['total']:,} (routed experts {params['routed_experts']:,}; "
                  f"rank 0 holds {params['local']:,}) | layout {vars(self.layout)} | "
                  f"model TFLOPs/step {flops / 1e12:.4g}")
        self._log(memory.startup_line(memory.estimate(args, world, self.vocab_size,
                                                      setup.transformer_impl(args)), args))

    # ------------------------------------------------------------------ helpers
    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    @contextlib.contextmanager
    def doing(self, what: str):
        """Run a block that talks to other ranks as ``what``: a collective that times out or
        loses its peer inside it becomes one ``CollectiveError`` naming ``what``."""
        outer, self.phase = self.phase, what
        try:
            yield
        except RuntimeError as e:
            if isinstance(e, (CollectiveError, NonFiniteError)):
                raise
            text = _first_sentence(e)
            if _TIMED_OUT.search(text):
                minutes = self.args.distributed_timeout_minutes
                raise CollectiveError(
                    f"rank {self.rank}: {what}: a collective timed out after "
                    f"--distributed-timeout-minutes {minutes:g}: a peer rank is hung or stopped; "
                    f"{self._last_published()} ({text})") from None
            if _PEER_GONE.search(text):
                raise CollectiveError(
                    f"rank {self.rank}: {what}: a peer rank exited or lost its connection; "
                    f"{self._last_published()} ({text})") from None
            raise
        finally:
            self.phase = outer

    def _last_published(self) -> str:
        if not self.args.save:
            return "no --save"
        found = ckpt.find_checkpoint(self.args.save)
        return f"last published checkpoint: {found or 'none'}"

    def _all_parameters_finite(self) -> bool:
        """Every parameter of every rank is finite (collective: all ranks call it)."""
        bad = torch.zeros(1, dtype=torch.float32)
        for chunk in self.model:
            for p in chunk.parameters():
                if not torch.isfinite(p).all():
                    bad += 1
                    break
        if torch.cuda.is_available():
            bad = bad.cuda()
        torch.distributed.all_reduce(bad)
        return bad.item() == 0

    @property
    def signal(self) -> int:
        """The stop signal this rank received (0: none)."""
        return signals.received()

    def _write_exit_reason(self, reason: str) -> None:
        path = os.environ.get(EXIT_REASON_ENV)
        if self.rank != 0 or not path:
            return
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(reason + "\n")
        os.replace(tmp, path)

    def forward_step(self, data_iterator, model):
        batch = on_this_cp_rank(next(data_iterator), self.attention_mask, self.pg_collection.cp)
        with outside_cuda_device_redirect():  # the schedule needs the redirect, the model not
            output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                           labels=batch["labels"])
        return output, partial(loss_func, batch["loss_mask"])

    def _run_schedule(self, iterator, forward_only: bool,
                      num_microbatches: Optional[int] = None) -> list:
        """The schedule over ``num_microbatches`` micro-batches per rank (default: those of the
        full --global-batch-size). ``iterator``: the micro-batches, or with model chunks
        (``data.per_chunk``) one iterator per chunk, each giving every micro-batch."""
        return self.forward_backward(
            forward_step_func=self.forward_step, data_iterator=iterator, model=self.model,
            num_microbatches=num_microbatches or self.layout.num_microbatches,
            seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size, forward_only=forward_only)

    # ------------------------------------------------------------------ steps
    def train_step(self, iterator):
        """One optimizer step of ``self.num_microbatches`` micro-batches per rank (the global
        batch ``self.global_batch``, set by ``_one_step`` from the consumed samples)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        self.lr = self.optimizer.param_groups[0]["lr"]  # the LR this step uses
        with cuda_device_redirect():
            with self.straggler.timed():
                reports = self._run_schedule(iterator, forward_only=False,
                                             num_microbatches=self.num_microbatches)
            _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.global_batch)  # in samples (build_scheduler)
        return reports, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted lm loss over the first ``eval_iters`` global validation batches."""
        with self.doing(f"validation at iteration {self.iteration}"), self.params_gathered():
            return self._evaluate()

    @contextlib.contextmanager
    def params_gathered(self):
        """With --overlap-param-gather the updated parameters are all-gathered lazily by forward
        pre-hooks; validation and checkpoint saves need them now (Megatron-LM does the same)."""
        if not self.args.overlap_param_gather:
            yield
            return
        with cuda_device_redirect():
            for chunk in self.model:
                chunk.disable_forward_pre_hook()  # also finishes the all-gather (force_sync)
        try:
            yield
        finally:
            for chunk in self.model:
                chunk.enable_forward_pre_hook()

    def _evaluate(self) -> float:
        t0 = metrics.now()
        iterator = data.per_chunk(
            data.micro_batches(self.valid_ds, self.args.micro_batch_size, 0, self.dp_rank,
                               self.dp_size, self.args.num_workers), len(self.model))
        for chunk in self.model:
            chunk.eval()
        reports = []
        with cuda_device_redirect():
            for _ in range(self.args.eval_iters):
                reports += self._run_schedule(iterator, forward_only=True)  # the full batch
        for chunk in self.model:
            chunk.train()
        loss, _ = metrics.reduce_lm_loss(reports)
        self.metrics.validation(self.iteration, loss)
        self.eval_seconds = metrics.now() - t0
        return loss

    def save(self) -> None:
        if not self.args.save or self.last_saved == self.iteration:
            return
        t0 = metrics.now()
        with self.doing(f"checkpoint save at iteration {self.iteration}"), \
                self.params_gathered():
            # whatever --check-for-nan-in-loss-and-grad says: no published checkpoint holds
            # NaN/Inf
            if not self._all_parameters_finite():
                raise NonFiniteError(
                    f"non-finite parameters at iteration {self.iteration}: checkpoint not saved; "
                    f"{self._last_published()} (lower --lr or check --init-method-std and the "
                    "data)")
            if self.async_queue is not None:  # at most one background save at a time
                self.finalize_async_saves(blocking=True)
            checkpointing.refuse_replacing(self.args.save, self.iteration)  # another run's
            path = ckpt.save_checkpoint(self.args.save, self.iteration, self.consumed,
                                        self.model, self.optimizer, self.scheduler, self.args,
                                        self.vocab_size, self.layout,
                                        flops_so_far=self.flops_per_sample * self.consumed,
                                        async_queue=self.async_queue)
        self.last_saved = self.iteration
        self.save_seconds = metrics.now() - t0
        if self.async_queue is None:
            self._log(f"saved checkpoint {path} ({self.save_seconds:.1f} s)")
            return
        self.async_pending[self.async_queue.call_idx] = (self.iteration, path, t0)
        self._log(f"checkpoint {path}: writing in the background ({self.save_seconds:.1f} s "
                  "blocked; published once every rank has finished)")

    def finalize_async_saves(self, blocking: bool) -> None:
        """--async-save: publish the background saves every rank has finished writing
        (``blocking``: wait for them). Collective; every rank has the same pending saves."""
        if self.async_queue is None or not self.async_pending:
            return
        with self.doing(f"publishing an async checkpoint (iteration {self.iteration})"):
            done = self.async_queue.maybe_finalize_async_calls(blocking=blocking)
        for idx in done:
            iteration, path, t0 = self.async_pending.pop(idx)
            self._log(f"saved checkpoint {path} (async, published at iteration "
                      f"{self.iteration}; {metrics.now() - t0:.1f} s after it started)")

    # ------------------------------------------------------------------ loop
    def train(self) -> None:
        args = self.args
        if args.skip_train:
            if args.eval_iters > 0:
                self.evaluate()
            return
        if args.exit_signal_handler and not signals.installed():
            signals.install()  # train.main installs it before anything is loaded
        if self._signalled_during_startup():
            self._write_exit_reason("signal")
            self.metrics.close()
            return
        iterator = data.per_chunk(
            data.micro_batches(self.train_ds, args.micro_batch_size, self.consumed, self.dp_rank,
                               self.dp_size, args.num_workers), len(self.model))
        self._log(f"training from iteration {self.iteration} to {args.train_iters}")
        try:
            while self.iteration < args.train_iters:
                reason = self._one_step(iterator)
                if reason:
                    self.finalize_async_saves(blocking=True)
                    self._write_exit_reason(reason)
                    break
            else:
                if args.eval_iters > 0 and not self._eval_due(self.iteration):
                    self.evaluate()
                self.save()
                self.finalize_async_saves(blocking=True)
                self._write_exit_reason("finished")
        except NonFiniteError:
            self._write_exit_reason("non_finite")
            raise
        except (CollectiveError, KeyboardInterrupt):
            raise
        except BaseException:
            if self.rank == 0 and args.save:
                found = ckpt.find_checkpoint(args.save)
                print(f"training failed at iteration {self.iteration}; last published "
                      f"checkpoint: {found or 'none'} (left untouched)", flush=True)
            raise
        finally:
            self.profiler.stop()
            self.metrics.close()

    def _signalled_during_startup(self) -> bool:
        """A stop signal before the first step (any rank): exit 0 without training or saving."""
        if not self.args.exit_signal_handler:
            return False
        flag = torch.tensor([float(self.signal != 0)], dtype=torch.float64)
        if torch.cuda.is_available():
            flag = flag.cuda()
        with self.doing("start-up: signal check (all-reduce)"):
            torch.distributed.all_reduce(flag)
        if flag.item() == 0:
            return False
        self._log(f"signal {self.signal or '(on another rank)'} received during start-up: "
                  f"exiting before the first step, nothing saved (iteration {self.iteration}; "
                  f"newest checkpoint: {self.resume_from or 'none'})")
        return True

    def _stop_if_non_finite(self, loss: float, grad_norm, aux: dict, grad_seen: bool,
                            aux_seen: bool) -> None:
        """``NonFiniteError`` naming what was non-finite (every rank decides alike: the loss is
        the all-reduced one, the gradient-norm and aux-loss verdicts were all-reduced)."""
        what = []
        if not math.isfinite(loss):
            what.append(f"lm loss ({loss})")
        if grad_seen:
            what.append(f"grad norm ({grad_norm})")
        if aux_seen:
            names = sorted(n for n, vals in aux.items() if not all(map(math.isfinite, vals)))
            what.append(f"aux loss ({', '.join(names) or 'on another rank'})")
        if what:
            raise NonFiniteError(
                f"non-finite {' and '.join(what)} at iteration {self.iteration}: stopped without "
                f"saving; {self._last_published()} (lower --lr or check --init-method-std and the "
                "data; --no-check-for-nan-in-loss-and-grad trains on)")

    def _eval_due(self, iteration: int) -> bool:
        """Periodic validation at ``iteration`` (never with --eval-interval unset: only at the
        end, as in Megatron-LM)."""
        interval = self.args.eval_interval
        return bool(interval) and iteration % interval == 0

    def _boundary_work(self) -> float:
        """Estimated seconds of validation / checkpointing due at this step boundary."""
        args, it = self.args, self.iteration
        extra = 0.0
        if args.eval_iters > 0 and self._eval_due(it):
            extra += self.eval_seconds
        if args.save and args.save_interval and it % args.save_interval == 0:
            extra += self.save_seconds
        return extra

    def _one_step(self, iterator) -> Optional[str]:
        """One optimizer step plus what is due after it; the reason when the run should stop."""
        args = self.args
        self.profiler.before_step(self.iteration)
        # the step's batch from the samples consumed so far (Megatron-LM: update_num_microbatches
        # at the start of each iteration; a batch that does not divide is refused at preflight)
        self.batches.update(self.consumed, consistency_check=True)
        self.num_microbatches = self.batches.get()
        self.global_batch = self.batches.get_current_global_batch_size()
        t0 = metrics.now()
        with self.doing(f"iteration {self.iteration + 1}: forward/backward (expert all-to-all, "
                        "pipeline send/recv, gradient reduce-scatter) and optimizer step"):
            reports, grad_norm = self.train_step(iterator)
        self.iteration += 1
        self.profiler.after_step(self.iteration)
        self.consumed += self.global_batch
        self.time_guard.record_step(metrics.now() - t0)
        time_up = (self.iteration < args.train_iters
                   and self.time_guard.time_up(time.time(), self._boundary_work()))
        with self.doing(f"iteration {self.iteration}: loss and aux-loss all-reduce"):
            aux = metrics.reduce_aux_losses(self.num_microbatches, self.pg_collection)
            check = args.check_for_nan_in_loss_and_grad
            bad_grad = check and grad_norm is not None and not math.isfinite(float(grad_norm))
            bad_aux = check and not all(math.isfinite(v) for vals in aux.values() for v in vals)
            loss, (signal_seen, time_seen, grad_seen, aux_seen) = metrics.reduce_lm_loss(
                reports, extra=(float(self.signal != 0), float(time_up), float(bad_grad),
                                float(bad_aux)))
            log_now = (self.iteration % args.log_interval == 0
                       or self.iteration == args.train_iters)
            imbalance = (metrics.expert_load_imbalance(self.model, self.model_config)
                         if log_now else None)
            if log_now:
                self.straggler.report(self.flops_per_sample * (self.consumed -
                                                               self.consumed_at_log))
                self.consumed_at_log = self.consumed
        step_time = metrics.now() - t0
        self.finalize_async_saves(blocking=False)  # publish background saves that are done
        self.metrics.train_step(self.iteration, loss, self.lr, grad_norm, step_time, aux, imbalance,
                                self.global_batch, self.consumed)
        if check:
            self._stop_if_non_finite(loss, grad_norm, aux, bool(grad_seen), bool(aux_seen))

        if args.eval_iters > 0 and self._eval_due(self.iteration):
            self.evaluate()
        if args.save_interval and self.iteration % args.save_interval == 0:
            self.save()
        if signal_seen:
            self._log(f"signal {self.signal or '(on another rank)'} received at iteration "
                      f"{self.iteration}: saving and exiting")
            self.save()
            return "signal"
        if time_seen:
            left = ("" if self.time_guard.deadline is None
                    else f"{self.time_guard.deadline - time.time():.0f} s left; ")
            self._log(f"time limit: the next step (~{self.time_guard.next_step_estimate():.1f} s) "
                      f"would end after the deadline ({left}--exit-duration-in-mins / "
                      f"${timelimit.END_TIME_ENV}) at iteration {self.iteration}: saving and "
                      "exiting")
            self.save()
            return "time_limit"
        if args.exit_interval and self.iteration % args.exit_interval == 0:
            self._log(f"exit interval reached at iteration {self.iteration}")
            self.save()
            return "exit_interval"
        return None

