"""The memory estimate per rank (``training/memory.py``) against the model the trainer builds.

Exact parts: the trainer's own ``setup.build_model`` / ``build_optimizer`` at several layouts on
gloo; each rank's DDP parameter-buffer bytes and gradient-buffer bytes equal the estimate
exactly, and the optimizer state (fp32 main copies with bf16, Adam's two moments) summed over
all ranks equals the estimate's sum exactly (one rank's shard differs from the mean by at most
the buffer padding, which is checked as a bound).

Activations: measured as the peak of the bytes autograd holds for backward, over forward and
backward (recompute included), with ``torch.autograd.graph.saved_tensors_hooks``: each saved
tensor is counted once per storage (views of one storage count once; parameters, which live in
DDP's buffer, not at all), held from the moment it is saved until autograd releases it (the
packed handle is freed after its node's backward). That is the activation memory the estimate
models, without the allocator's transient buffers; the CPU has no ``torch.cuda`` memory stats.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import pytest
import torch

from megatron_coe.compat import install_cpu_compat
from megatron_coe.testing.distributed import run_distributed

install_cpu_compat()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-experts 4 "
        "--moe-router-topk 2 --moe-ffn-hidden-size 32 --ffn-hidden-size 96 --swiglu "
        "--seq-length 32 --micro-batch-size 2 --train-iters 2 --lr 1e-2 --normalization RMSNorm "
        "--vocab-size 500 --hidden-dropout 0 --attention-dropout 0 "
        "--moe-token-dispatcher-type alltoall --mock-data").split()


def _build(argv, world):
    from megatron_coe.testing.trainer_parts import build_trainer_parts

    parts = build_trainer_parts(argv, world, optimizer=False)
    return parts.args, parts.vocab, parts.model


def _measure_state(rank, world, argv):
    """This rank's DDP buffer bytes and optimizer-state bytes (after one step, zero grads)."""
    from megatron.core import parallel_state as ps

    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.training import setup

    args, vocab, model = _build(argv, world)
    optimizer = setup.build_optimizer(args, model)
    bufs = list(model[0].buffers) + list(model[0].expert_parallel_buffers)
    param_bytes = sum(b.param_data.numel() * b.param_data.element_size() for b in bufs)
    grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in bufs)
    local_params = sum(p.numel() for p in model[0].parameters())
    with cuda_device_redirect():
        model[0].zero_grad_buffer()
        optimizer.zero_grad()
        optimizer.step()  # Adam's state exists from the first step
    model_storages = {b.param_data.untyped_storage().data_ptr() for b in bufs}
    opt_bytes = 0
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                if p.untyped_storage().data_ptr() not in model_storages:  # an fp32 main copy
                    opt_bytes += p.numel() * p.element_size()
                for name, v in o.optimizer.state[p].items():
                    if name != "step" and torch.is_tensor(v):
                        opt_bytes += v.numel() * v.element_size()
    return dict(stage=ps.get_pipeline_model_parallel_rank(), param_bytes=param_bytes,
                grad_bytes=grad_bytes, opt_bytes=opt_bytes, local_params=local_params,
                vocab=vocab)


LAYOUTS = {
    "tp1_ep1": (1, []),
    "ep2_bf16": (2, ["--expert-model-parallel-size", "2", "--bf16", "--global-batch-size", "4"]),
    "tp2_sp_mla": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                       "--global-batch-size", "2", "--multi-latent-attention", "--q-lora-rank",
                       "16", "--kv-lora-rank", "16", "--qk-head-dim", "8",
                       "--qk-pos-emb-head-dim", "4", "--v-head-dim", "8",
                       "--moe-shared-expert-intermediate-size", "48"]),
    "ln_gelu_gqa_dense_untied": (1, ["--normalization", "LayerNorm", "--no-swiglu",
                                     "--moe-layer-freq", "2", "--qk-layernorm",
                                     "--num-query-groups", "2",
                                     "--untie-embeddings-and-output-weights"]),
    "etp2": (2, ["--expert-tensor-parallel-size", "2", "--global-batch-size", "4"]),
    "pp2_tied": (2, ["--pipeline-model-parallel-size", "2", "--global-batch-size", "2",
                     "--moe-layer-freq", "1"]),
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_exact_parts_equal_the_built_model(name):
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training import memory, options

    world, extra = LAYOUTS[name]
    argv = BASE + ["--coe-iterations", "2"] + extra
    got = run_distributed(_measure_state, world, timeout=400, argv=argv)
    args = options.parse_args(explicit(argv))
    est = memory.estimate(args, world, got[0]["vocab"], impl="local")
    par = memory.parallel_of(args, world)
    opt_elem = 12 if args.bf16 else 8
    for r in got:
        e = est[r["stage"]]
        assert r["local_params"] == e.params, (name, r, e)
        assert r["param_bytes"] == e.param_bytes, (name, r, e)
        assert r["grad_bytes"] == e.grad_bytes, (name, r, e)
        padding = e.buffer_numel - e.params
        assert abs(r["opt_bytes"] - e.optimizer_bytes) <= opt_elem * padding, (name, r, e)
    # summed over the ranks: each data-parallel group (TP of them per stage; EP x expert-TP
    # expert groups) shards exactly the real elements of its ranks
    want = sum(opt_elem * (par.tp * e.dense_sharded + par.ep * par.etp * e.expert_sharded)
               for e in est)
    assert sum(r["opt_bytes"] for r in got) == want, (name, got, want)


# --------------------------------------------------------------------------- activations
class _Held:
    """Bytes of the tensors autograd holds for backward, by storage, and their peak."""

    def __init__(self, exclude: set):
        self.exclude, self.count, self.size = exclude, {}, {}
        self.live = self.peak = 0

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key in self.exclude or t.untyped_storage().nbytes() == 0:
            return t
        if key not in self.count:
            self.count[key], self.size[key] = 0, t.untyped_storage().nbytes()
            self.live += self.size[key]
            self.peak = max(self.peak, self.live)
        self.count[key] += 1
        return _Handle(self, key, t)

    @staticmethod
    def unpack(h):
        return h.tensor if isinstance(h, _Handle) else h

    def release(self, key):
        self.count[key] -= 1
        if not self.count[key]:
            del self.count[key]
            self.live -= self.size.pop(key)


class _Handle:
    def __init__(self, held, key, tensor):
        self.held, self.key, self.tensor = held, key, tensor

    def __del__(self):
        self.held.release(self.key)


def _measure_activations(rank, world, argv):
    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.training import setup

    args, vocab, model = _build(argv, world)
    s, b = args.seq_length, args.micro_batch_size
    tokens = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(3))
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    exclude = {p.untyped_storage().data_ptr() for p in model[0].parameters()}
    held = _Held(exclude)
    gc.collect()
    with cuda_device_redirect(), torch.autograd.graph.saved_tensors_hooks(held.pack, held.unpack):
        model[0].zero_grad_buffer()
        loss = model[0](tokens, torch.arange(s).expand(b, -1), mask, labels=tokens)
        loss.float().mean().backward()
        del loss
    gc.collect()
    return dict(peak=held.peak, left=held.live, vocab=vocab)


def _activation_case(extra, world=1):
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training import memory, options

    argv = BASE + ["--global-batch-size", "2"] + extra
    got = run_distributed(_measure_activations, world, timeout=400, argv=argv)
    assert all(r["left"] == 0 for r in got)  # every saved tensor was released by backward
    args = options.parse_args(explicit(argv))
    est = memory.estimate(args, world, got[0]["vocab"], impl="local")[0]
    return est.activation_per_microbatch, max(r["peak"] for r in got)


CASES = {
    "C1": ["--coe-iterations", "1"],
    "C2": ["--coe-iterations", "2"],
    "C2_mla_shared": ["--coe-iterations", "2", "--multi-latent-attention", "--q-lora-rank", "16",
                      "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4",
                      "--v-head-dim", "8", "--moe-shared-expert-intermediate-size", "48"],
    "C2_dropout": ["--coe-iterations", "2", "--hidden-dropout", "0.1", "--attention-dropout",
                   "0.1"],
    "C2_bf16": ["--coe-iterations", "2", "--bf16"],
    "C2_tp2_sp": ["--coe-iterations", "2", "--tensor-model-parallel-size", "2",
                  "--sequence-parallel"],
    "C2_ln_gelu_gqa_dense": ["--coe-iterations", "2", "--normalization", "LayerNorm",
                             "--no-swiglu", "--moe-layer-freq", "2", "--num-query-groups", "2"],
    "C2_recompute_core_attn_moe": ["--coe-iterations", "2", "--recompute-modules", "core_attn",
                                   "moe"],
    "C2_full_recompute": ["--coe-iterations", "2", "--recompute-granularity", "full",
                          "--recompute-method", "uniform", "--recompute-num-layers", "1"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_estimate_within_25_percent(case):
    world = 2 if "tp2" in case else 1
    est, peak = _activation_case(CASES[case], world)
    assert abs(est - peak) <= 0.25 * peak, (case, est, peak)
    if "recompute" in case:  # recompute lowers both the measurement and the estimate
        est_plain, peak_plain = _activation_case(CASES["C2"])
        assert est < est_plain and peak < peak_plain, (case, est, est_plain, peak, peak_plain)


# --------------------------------------------------------------------------- start-up and tool
@pytest.mark.one_env
def test_trainer_prints_the_estimate_at_start_up(tmp_path):
    from megatron_coe.testing.train_args import explicit
    from megatron_coe.training import memory, options, setup

    argv = explicit(BASE + ["--coe-iterations", "2", "--global-batch-size", "2",
                            "--train-iters", "1", "--eval-iters", "0"])
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "megatron_coe.train", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    args = options.parse_args(argv)
    vocab = setup.padded_vocab_size(args.vocab_size, args)
    want = memory.startup_line(memory.estimate(args, 1, vocab, "local"), args)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("memory per rank")]
    assert lines == [want], (lines, want)
    assert "C=2 passes" in want and "no recompute" in want


def test_tool_prints_the_table_without_data(capsys):
    from megatron_coe.testing.tools import load_tool
    from megatron_coe.training import memory, options, setup

    tool = load_tool("estimate_memory")
    flags = ["--config", os.path.join(ROOT, "examples", "coe2_4_64.yaml"), "--bf16",
             "--vocab-size", "32000", "--pipeline-model-parallel-size", "2",
             "--expert-model-parallel-size", "7"]
    assert tool.main(flags + ["--nodes", "2", "--gpus-per-node", "7"]) == 0
    out = capsys.readouterr().out
    args = options.parse_args(flags + ["--mock-data"])
    args.global_batch_size = args.global_batch_size or args.micro_batch_size * 7
    ranks = memory.estimate(args, 14, setup.padded_vocab_size(32000, args))
    assert [r.stage for r in ranks] == [0, 1] and ranks[0].params != ranks[1].params
    assert memory.table(ranks, args, 14) in out and memory.startup_line(ranks, args) in out
    # EP must divide the experts (63): one line, exit 2
    assert tool.main(flags[:-1] + ["8", "--world-size", "16"]) == 2
    assert capsys.readouterr().err.strip() == (
        "estimate_memory: --num-experts 63 is not divisible by --expert-model-parallel-size 8: "
        "choose an EP size that divides the number of experts.")


@pytest.mark.parametrize("n,pp,vpp,first,last", [
    (8, 2, 1, None, None), (8, 2, 2, None, None), (12, 2, 3, None, None), (27, 2, 1, 13, None),
    (10, 4, 1, 1, 3), (12, 2, 2, 2, None), (14, 3, 2, 2, 4)])
def test_stage_layers_are_megatron_cores(n, pp, vpp, first, last):
    """The layers of each pipeline rank (its virtual stages together) are the ones
    Megatron-Core builds there (uneven first / last stages and virtual stages)."""
    from types import SimpleNamespace

    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_coe.testing.configs import tiny_config
    from megatron_coe.training import memory

    kw = dict(num_layers=n, pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32)
    if vpp > 1:
        kw["virtual_pipeline_model_parallel_size"] = vpp
    if first is not None:
        kw["num_layers_in_first_pipeline_stage"] = first
    if last is not None:
        kw["num_layers_in_last_pipeline_stage"] = last
    config = tiny_config(**kw)
    want = []
    for rank in range(pp):
        layers = []
        for v in range(vpp):
            stage = v if vpp > 1 else None
            offset = get_transformer_layer_offset(config, stage, rank)
            layers += range(offset, offset + get_num_layers_to_build(config, stage, rank))
        want.append(layers)
    args = SimpleNamespace(
        num_layers=n, pipeline_model_parallel_size=pp, decoder_first_pipeline_num_layers=first,
        decoder_last_pipeline_num_layers=last, num_layers_per_virtual_pipeline_stage=None,
        num_virtual_stages_per_pipeline_rank=vpp if vpp > 1 else None,
        tensor_model_parallel_size=1, expert_model_parallel_size=1,
        expert_tensor_parallel_size=None, sequence_parallel=False)
    assert memory.stage_layers(args, memory.parallel_of(args, pp)) == want
