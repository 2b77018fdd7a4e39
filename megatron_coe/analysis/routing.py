"""Routing analysis of a trained CoE checkpoint: per (layer, pass) expert load, pass-to-pass overlap,
expert chains, and the held-out LM loss, from one process (world size 1).

Definitions (per layer; ``S_t(x)`` is the top-k expert set that pass t's router picks for token x;
N routed experts, k per pass, C passes; all counts over the evaluated tokens):

* **load** ``[C, N]``: tokens routed to each expert in each pass (``routing_map.sum(0)``), with
  ``max/mean`` and the normalised entropy of the load distribution (1 = perfectly uniform).
* **overlap(t, t+1)**: mean over tokens of ``|S_t ∩ S_{t+1}| / k`` -- how often the next pass picks
  experts the previous pass already used; ``identical`` is the fraction of tokens with
  ``S_{t+1} == S_t``. Random independent choices would give ``k / N`` (``overlap_random``).
* **chain** of a token: the ordered tuple ``(sorted S_1, sorted S_2, ..., sorted S_C)``.
  ``distinct_chains`` is the number of different chains the evaluated tokens used,
  ``chain_space = C(N, k) ** C`` the number that exist, and ``chain_perplexity`` ``exp(H)`` of the
  empirical chain distribution (an "effective number" of chains, less sensitive to the number of
  tokens than the distinct count, which can never exceed it). For comparison,
  ``moe_space = C(N, C*k)``: the expert sets an MoE with top-(C*k) of the same N experts can
  pick; ``chain_space / moe_space`` is the combinatorial ratio (91.2 for CoE-2(4/64) vs
  MoE(8/64)). ``distinct_unions`` counts the distinct unordered sets ``S_1 ∪ ... ∪ S_C``.
* **co-occurrence(t, t+1)** ``[N, N]``: entry ``(i, j)`` counts tokens with ``i ∈ S_t`` and
  ``j ∈ S_{t+1}``; drawn as a heatmap, row-normalised (``P(j ∈ S_{t+1} | i ∈ S_t) / k``).

For C = 1 (an MoE model) only the load, the distinct expert sets and ``C(N, k)`` are reported.

The checkpoint is loaded with the trainer's own code (``training.checkpoint.load_checkpoint``,
model weights only) into a model built by ``training.setup`` from the options stored in the
checkpoint, at TP = PP = EP = 1 (dist_checkpointing reshards EP > 1 checkpoints). Routing is
recorded by wrapping each ``ChainOfExpertsLayer.route`` (no change to the model's computation).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch


# --------------------------------------------------------------------------- statistics
@dataclass
class LayerRouting:
    """Accumulates the top-k sets of every pass of one layer over the evaluated tokens."""

    num_experts: int
    topk: int
    num_passes: int
    sets: list = field(default_factory=list)  # per pass: list of [T, k] index tensors

    def __post_init__(self):
        self.sets = [[] for _ in range(self.num_passes)]

    def add(self, pass_index: int, routing_map: torch.Tensor) -> None:
        rm = routing_map.detach().to("cpu", torch.bool)
        counts = rm.sum(dim=1)
        if not bool((counts == self.topk).all()):  # token dropping would break the chain view
            raise ValueError(f"a token was routed to {counts.min().item()}..{counts.max().item()} "
                             f"experts, expected exactly top-k = {self.topk}")
        # indices of the k selected experts, ascending (sorted sets)
        idx = torch.arange(self.num_experts).expand_as(rm)[rm].view(-1, self.topk)
        self.sets[pass_index].append(idx)

    def summary(self) -> dict:
        C, N, k = self.num_passes, self.num_experts, self.topk
        sets = [torch.cat(s) for s in self.sets]
        T = sets[0].shape[0]
        if any(s.shape[0] != T for s in sets):
            raise ValueError("passes saw different numbers of tokens")
        load = torch.zeros(C, N, dtype=torch.long)
        for t in range(C):
            load[t] = torch.bincount(sets[t].flatten(), minlength=N)
        out = {"tokens": T, "load": load.tolist(), "passes": []}
        for t in range(C):
            p = load[t].double() / load[t].sum()
            nz = p[p > 0]
            out["passes"].append({
                "pass": t + 1,
                "max_over_mean": (load[t].max() / load[t].double().mean()).item(),
                "normalized_entropy": (-(nz * nz.log()).sum() / math.log(N)).item(),
                "unused_experts": int((load[t] == 0).sum()),
                "distinct_sets": len({tuple(r) for r in sets[t].tolist()}),
            })
        out["set_space"] = math.comb(N, k)
        if C > 1:
            out["pairs"] = []
            for t in range(C - 1):
                a, b = sets[t], sets[t + 1]
                member_a = torch.zeros(T, N, dtype=torch.bool).scatter_(1, a, True)
                member_b = torch.zeros(T, N, dtype=torch.bool).scatter_(1, b, True)
                inter = (member_a & member_b).sum(1).double()
                co = member_a.double().T @ member_b.double()  # [N, N]
                out["pairs"].append({
                    "passes": [t + 1, t + 2],
                    "overlap": (inter / k).mean().item(),
                    "identical": (inter == k).double().mean().item(),
                    "overlap_random": k / N,
                    "cooccurrence": co.long().tolist(),
                })
            rows = [tuple(map(tuple, z)) for z in zip(*(s.tolist() for s in sets))]
            chains = Counter(rows)
            freq = torch.tensor(list(chains.values()), dtype=torch.float64) / T
            unions = {tuple(sorted(set().union(*r))) for r in rows}
            out.update(
                distinct_chains=len(chains),
                chain_space=math.comb(N, k) ** C,
                chain_perplexity=math.exp(-(freq * freq.log()).sum().item()),
                distinct_unions=len(unions),
                moe_space=math.comb(N, C * k) if C * k <= N else None,
            )
            if out["moe_space"]:
                out["chain_space_over_moe_space"] = out["chain_space"] / out["moe_space"]
        else:
            counts = Counter(tuple(r) for r in sets[0].tolist())
            freq = torch.tensor(list(counts.values()), dtype=torch.float64) / T
            out["set_perplexity"] = math.exp(-(freq * freq.log()).sum().item())
        return out


class RoutingRecorder:
    """Wraps every ``ChainOfExpertsLayer.route`` of ``model`` to record its routing maps."""

    def __init__(self, model):
        from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer

        self.layers = {}
        self._undo = []
        for m in model.modules():
            if isinstance(m, ChainOfExpertsLayer):
                stats = LayerRouting(m.config.num_moe_experts, m.config.moe_router_topk,
                                     m.num_passes)
                self.layers[m.layer_number] = stats
                original = m.route

                def route(hidden, padding_mask=None, pass_index=0, _orig=original, _s=stats):
                    probs, routing_map = _orig(hidden, padding_mask, pass_index=pass_index)
                    _s.add(pass_index, routing_map)
                    return probs, routing_map

                m.route = route
                self._undo.append(m)

    def remove(self) -> None:
        for m in self._undo:
            del m.route  # back to the class method

    def summary(self) -> dict:
        return {f"layer{l}": s.summary() for l, s in sorted(self.layers.items())}


# --------------------------------------------------------------------------- model loading
def _args_from_checkpoint(path: str):
    from megatron_coe import checkpointing
    from megatron_coe.training.options import OPTIONS, TrainArgs

    saved = checkpointing.read_meta(path)["args"]
    args = TrainArgs(**{k: v for k, v in saved.items() if k in OPTIONS})
    # one process, weights only
    args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
    args.expert_model_parallel_size = 1
    args.expert_tensor_parallel_size = None
    args.sequence_parallel = False
    args.no_load_optim = args.no_load_rng = True
    args.load, args.save, args.tensorboard_dir, args.metrics_file = path, None, None, None
    args.recompute_modules = []
    if not torch.cuda.is_available():
        args.bf16, args.fp8_format, args.transformer_impl = False, None, None
        args.distributed_backend = None
    return args


_PARALLEL_READY = False
_PG_COLLECTION = None  # the ProcessGroupCollection of initialize_parallel, while _PARALLEL_READY


def _ensure_parallel(seed: int) -> None:
    global _PARALLEL_READY, _PG_COLLECTION
    if _PARALLEL_READY:
        return
    from megatron_coe.compat import install_cpu_compat
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.training import setup

    install_cpu_compat()
    if not torch.distributed.is_initialized():
        setup.init_distributed(_args_from_none())
    _PG_COLLECTION = initialize_parallel(1, 1, 1, None, seed)
    _PARALLEL_READY = True


def _args_from_none():
    from megatron_coe.training.options import TrainArgs

    return TrainArgs()


def shutdown() -> None:
    """Tear down the process groups this module created (call once at the end)."""
    global _PARALLEL_READY
    if _PARALLEL_READY:
        from megatron_coe.parallel import destroy_parallel

        destroy_parallel()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        _PARALLEL_READY = False


def load_model(path: str):
    """(model chunk list, args) of the published checkpoint ``path`` (or the newest in a --save dir)."""
    from megatron_coe import checkpointing
    from megatron_coe.training import checkpoint as ckpt
    from megatron_coe.training import setup
    from megatron_coe.training.trainer import preflight

    found = checkpointing.find_checkpoint(path)
    if not found:
        raise FileNotFoundError(f"no published checkpoint in {path} ({checkpointing.TRACKER} "
                                "missing): pass a run's --save directory or an iter_* directory")
    args = _args_from_checkpoint(found)
    pre = preflight(args, 1)  # model config, tokenizer, data and shape checks
    _ensure_parallel(args.seed)
    from megatron_coe.parallel import seed_rngs

    seed_rngs(args.seed, _PG_COLLECTION)
    model = setup.build_model(args, pre.model_config, pre.vocab_size, _PG_COLLECTION)
    ckpt.load_checkpoint(found, model, None, None, args, pre.layout)
    for chunk in model:
        chunk.eval()
    return model, args, pre, found


# --------------------------------------------------------------------------- evaluation
def eval_dataset(args, tokenizer, data_path: Optional[str], num_samples: int):
    """Samples to evaluate: all documents of ``data_path`` (a held-out prefix tokenized with the
    checkpoint's tokenizer), or the validation split of the checkpoint's own training data."""
    from megatron_coe.data.datasets import build_train_valid_test_datasets

    prefixes = [data_path] if data_path else list(args.data_path)
    split = "0,1,0" if data_path else args.split
    _, valid, _ = build_train_valid_test_datasets(
        data_path=prefixes, split=split, seq_length=args.seq_length, seed=args.seed,
        num_samples=(0, num_samples, 0), tokenizer=tokenizer,
        data_cache_path=args.data_cache_path)
    return valid


def analyze_checkpoint(path: str, data_path: Optional[str] = None, num_samples: int = 512,
                       micro_batch_size: int = 16) -> dict:
    """Load ``path``, run ``num_samples`` evaluation samples, return loss + routing statistics."""
    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.training import setup
    from megatron_coe.training.data import micro_batches

    model, args, pre, found = load_model(path)
    gpt = setup.unwrap(model[0])
    dataset = eval_dataset(args, pre.tokenizer, data_path, num_samples)
    recorder = RoutingRecorder(gpt)
    s = args.seq_length
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)
    if torch.cuda.is_available():
        mask = mask.cuda()
    loss_sum, tokens, seen = 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for batch in micro_batches(dataset, micro_batch_size, 0, 0, 1):
                if seen >= num_samples:
                    break
                with cuda_device_redirect():
                    losses = gpt(batch["tokens"], batch["position_ids"], mask,
                                 labels=batch["labels"])
                lm = batch["loss_mask"].float()
                loss_sum += (losses.float() * lm).sum().item()
                tokens += lm.sum().item()
                seen += batch["tokens"].shape[0]
    finally:
        recorder.remove()
    meta = {
        "checkpoint": found,
        "data": data_path or f"{args.data_path} (validation split {args.split})",
        "samples": seen,
        "lm_loss": loss_sum / max(tokens, 1.0),
        "loss_tokens": tokens,
        "model": {"num_layers": args.num_layers, "num_experts": args.num_experts,
                  "topk": args.moe_router_topk, "coe_iterations": args.coe_iterations,
                  "coe_inner_residual": args.coe_inner_residual,
                  "coe_outer_residual": args.coe_outer_residual,
                  "coe_shared_router": args.coe_shared_router},
    }
    result = {**meta, "layers": recorder.summary()}
    del model, gpt
    return result


# --------------------------------------------------------------------------- reporting
def markdown_report(name: str, r: dict) -> str:
    m = r["model"]
    lines = [f"# Routing analysis: {name}", "",
             f"checkpoint `{r['checkpoint']}`, data {r['data']}, {r['samples']} samples "
             f"({int(r['loss_tokens'])} tokens): LM loss **{r['lm_loss']:.4f}**", "",
             f"C={m['coe_iterations']}, top-{m['topk']} of {m['num_experts']} routed experts, "
             f"inner residual {m['coe_inner_residual']}, outer residual {m['coe_outer_residual']}, "
             f"shared router {m['coe_shared_router']}", ""]
    header = ("| layer | pass | max/mean load | load entropy (norm.) | unused experts | "
              "distinct top-k sets |")
    lines += [header, "|---|---|---|---|---|---|"]
    for lname, L in r["layers"].items():
        for p in L["passes"]:
            lines.append(f"| {lname} | {p['pass']} | {p['max_over_mean']:.2f} | "
                         f"{p['normalized_entropy']:.3f} | {p['unused_experts']} | "
                         f"{p['distinct_sets']} / {L['set_space']} |")
    if m["coe_iterations"] > 1:
        lines += ["", "| layer | passes | overlap of top-k sets | identical sets | random overlap "
                  "| distinct chains (used / space) | chain perplexity | distinct unions | "
                  "C(N,k)^C / C(N,Ck) |", "|---|---|---|---|---|---|---|---|---|"]
        for lname, L in r["layers"].items():
            ratio = L.get("chain_space_over_moe_space")
            for pr in L["pairs"]:
                lines.append(
                    f"| {lname} | {pr['passes'][0]}->{pr['passes'][1]} | {pr['overlap']:.3f} | "
                    f"{pr['identical']:.3f} | {pr['overlap_random']:.3f} | "
                    f"{L['distinct_chains']} / {L['chain_space']} (tokens {L['tokens']}) | "
                    f"{L['chain_perplexity']:.0f} | {L['distinct_unions']} | "
                    + (f"{ratio:.1f} |" if ratio else "- |"))
    return "\n".join(lines) + "\n"


def _save_figure(plt, fig, out_dir: str, filename: str) -> str:
    """Lay out, write ``out_dir/filename`` as PNG, close the figure; returns the path."""
    fig.tight_layout()
    path = os.path.join(out_dir, filename)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(name: str, r: dict, out_dir: str) -> list:
    """Load histograms and co-occurrence heatmaps as PNGs; returns the file paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    files = []
    layers = r["layers"]
    C = r["model"]["coe_iterations"]
    fig, axes = plt.subplots(len(layers), C, figsize=(4.2 * C, 2.6 * len(layers)), squeeze=False)
    for i, (lname, L) in enumerate(layers.items()):
        for t in range(C):
            load = np.array(L["load"][t], dtype=float)
            ax = axes[i][t]
            ax.bar(np.arange(len(load)), load / load.sum() * len(load), color=f"C{t}")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_title(f"{lname} pass {t + 1}: max/mean {L['passes'][t]['max_over_mean']:.2f}",
                         fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("load / uniform")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{name}: expert load per pass (1 = uniform)", fontsize=10)
    files.append(_save_figure(plt, fig, out_dir, "load_histograms.png"))
    if C > 1:
        fig, axes = plt.subplots(1, len(layers), figsize=(4.6 * len(layers), 4.0), squeeze=False)
        for i, (lname, L) in enumerate(layers.items()):
            pr = L["pairs"][0]
            co = np.array(pr["cooccurrence"], dtype=float)
            norm = co / np.maximum(co.sum(axis=1, keepdims=True), 1.0)
            ax = axes[0][i]
            im = ax.imshow(norm, cmap="viridis", vmin=0)
            ax.set_title(f"{lname}: overlap {pr['overlap']:.2f} (random {pr['overlap_random']:.2f})",
                         fontsize=9)
            ax.set_xlabel(f"pass {pr['passes'][1]} expert")
            ax.set_ylabel(f"pass {pr['passes'][0]} expert")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.suptitle(f"{name}: P(pass-2 expert j | pass-1 expert i) / k", fontsize=10)
        files.append(_save_figure(plt, fig, out_dir, "cooccurrence_heatmaps.png"))
    return files


def write_outputs(name: str, r: dict, out_dir: str, plots: bool = True) -> dict:
    """``routing.json``, ``routing.md`` and (with matplotlib) PNGs under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"markdown": os.path.join(out_dir, "routing.md")}
    with open(files["markdown"], "w") as f:
        f.write(markdown_report(name, r))
    if plots:
        files["plots"] = plot(name, r, out_dir)
    tmp = os.path.join(out_dir, "routing.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"name": name, **r}, f)
    os.replace(tmp, os.path.join(out_dir, "routing.json"))  # last: marks the result complete
    files["json"] = os.path.join(out_dir, "routing.json")
    return files
