"""Distributed equivalence of Chain-of-Experts models on gloo (CPU).

A tiny CoE GPT model (C=2 passes, shared experts, SwiGLU experts, seq-aux and z losses) is built at
EP=1, TP=1 (DP replicas) and run on one global batch: that is the reference. Its weights and its
gradients are saved through Megatron's ``dist_checkpointing`` and loaded back in a parallel layout
(EP=2 all-to-all / all-gather, TP=2 + sequence parallelism, EP=2 x TP=2), so Megatron's own
resharding metadata maps every global tensor onto the local shards. The parallel model then runs
the same global batch split over its data-parallel ranks and must reproduce the reference's
per-token losses, logits, per-pass routing loads and every parameter gradient.

Gradient reduction follows Megatron's DDP (``average_in_collective=False``): dense gradients are
summed over the DP group and scaled by 1/DP, expert gradients are summed over the expert-DP group
and scaled by 1/DP, and sequence-parallel parameters (norms, routers) are first summed over TP,
as ``finalize_model_grads`` does.

A single-process test checks the per-pass routers: independent routers give different decisions
on the same input, the shared-router ablation gives identical ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_coe.testing.distributed import run_distributed

SEQ = 16
MICRO_BATCH = 2
VOCAB = 64
SEED = 1234
TOL = 1e-5
NUM_EXPERTS, TOPK, EXPERT_FFN, SHARED_FFN = 8, 2, 32, 32


@pytest.fixture(scope="module", autouse=True)
def _shared_checkpoint_results_queue():
    """Create dist_checkpointing's writer-results queue once, in the pytest process.

    dist_checkpointing's results-queue getter (``compat.dist_checkpointing``) lazily starts a
    spawn-mode multiprocessing manager per process; its server imports torch to unpickle the
    first write results (3-10 s on 2 loaded cores). Forked workers inherit the parent's queue
    proxy (multiprocessing proxies are fork-aware), so each case saves in well under a second.
    """
    from megatron_coe.compat.dist_checkpointing import write_results_queue

    write_results_queue()


def _config(tp=1, ep=1, etp=None, dispatcher="alltoall", mla=False, **overrides):
    from megatron_coe.testing.configs import tiny_config

    fields = dict(
        num_layers=2,
        coe_iterations=2,
        num_moe_experts=NUM_EXPERTS,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=EXPERT_FFN,
        moe_shared_expert_intermediate_size=SHARED_FFN,
        gated_linear_unit=True,
        activation_func=F.silu,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3,
        moe_token_dispatcher_type=dispatcher,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp if etp is not None else tp,
        sequence_parallel=tp > 1,
    )
    fields.update(overrides)
    return tiny_config(mla=mla, **fields)


def _build(config, pg_collection):
    from megatron_coe.models.gpt import build_coe_gpt_model

    model = build_coe_gpt_model(config, pg_collection=pg_collection, vocab_size=VOCAB,
                                max_sequence_length=SEQ)
    model.train()
    return model


def _coe_layers(model):
    return [layer.mlp for layer in model.decoder.layers]


def _forward_backward(model, tokens):
    """Mean per-token LM loss + attached aux losses; returns (per-token loss, logits [s, b, v])."""
    b, s = tokens.shape
    labels = torch.roll(tokens, shifts=-1, dims=1)
    position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), diagonal=1)  # True = masked
    captured = {}
    handle = model.output_layer.register_forward_hook(
        # clone: Megatron's vocab-parallel cross entropy works on the logits in place
        lambda module, args, out: captured.__setitem__("logits", out[0].detach().clone())
    )
    try:
        for layer in _coe_layers(model):
            layer.reset_routing_stats()
        per_token = model(tokens, position_ids, mask, labels=labels)  # [b, s]
        per_token.mean().backward()
    finally:
        handle.remove()
    return per_token.detach(), captured["logits"].detach()


def _global_batch(num_sequences):
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(0, VOCAB, (num_sequences, SEQ), generator=gen)


def _swap_params(model, tensors):
    """Replace every parameter's ``data`` by ``tensors[name]``; returns the previous data."""
    old = {}
    for name, p in model.named_parameters():
        old[name] = p.data
        p.data = tensors[name]
    return old


def _sharded_state_dict(model, prefix, param_data=None):
    """``model.sharded_state_dict()`` with ShardedTensor keys prefixed and data detached.

    Megatron builds it from ``state_dict(keep_vars=True)``: its tensors are the Parameter objects
    themselves. Detaching pins the storage present now, so that ``param_data`` (name -> tensor,
    e.g. gradients) can stand in for the parameters without aliasing them.
    """
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    saved = _swap_params(model, param_data) if param_data is not None else None
    try:
        sharded = model.sharded_state_dict()

        def detach(x):
            if isinstance(x, (ShardedTensor, ShardedTensorFactory)) and torch.is_tensor(x.data):
                x.data = x.data.detach()
            return x

        dict_list_map_inplace(detach, sharded)
    finally:
        if saved is not None:
            _swap_params(model, saved)
    add_prefix_for_sharding(sharded, prefix)
    return sharded


def _equivalence_worker(rank, world_size, *, case, ckpt_dir):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from megatron_coe.parallel import initialize_parallel

    tp, ep, etp = case["tp"], case["ep"], case.get("etp")
    overrides = case.get("overrides", {})
    dp_size = world_size // tp
    tokens = _global_batch(dp_size * MICRO_BATCH)

    # ---------------------------------------------------------------- reference: EP=1, TP=1
    pg = initialize_parallel(seed=SEED)
    ref = _build(_config(**overrides), pg)
    with torch.no_grad():  # identical replicas on every rank, whatever the per-rank RNG did
        for p in ref.parameters():
            dist.broadcast(p.data, src=0)
    ref_loss, ref_logits = _forward_backward(ref, tokens)
    clear_aux_losses_tracker()
    ref_counts = [layer.tokens_per_expert_per_pass.clone() for layer in _coe_layers(ref)]
    missing = [n for n, p in ref.named_parameters() if p.grad is None]
    assert not missing, f"reference parameters without gradient: {missing}"

    weights_sd = _sharded_state_dict(ref, "w.")
    grads_sd = _sharded_state_dict(ref, "g.", {n: p.grad for n, p in ref.named_parameters()})
    dist_checkpointing.save({"w": weights_sd, "g": grads_sd}, ckpt_dir)
    del ref
    parallel_state.destroy_model_parallel()

    # ---------------------------------------------------------------- parallel layout
    pg = initialize_parallel(tp, 1, ep, etp, seed=SEED + 7)  # other seed: weights must come from ckpt
    model = _build(_config(tp=tp, ep=ep, etp=etp, dispatcher=case["dispatcher"], **overrides), pg)
    weights_req = _sharded_state_dict(model, "w.")
    grads_req = _sharded_state_dict(
        model, "g.", {n: torch.empty_like(p) for n, p in model.named_parameters()}
    )
    loaded = dist_checkpointing.load({"w": weights_req, "g": grads_req}, ckpt_dir)
    model.load_state_dict(loaded["w"])  # strict: every parameter and buffer comes from the ckpt
    ref_grads = loaded["g"]

    dp_rank = parallel_state.get_data_parallel_rank()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = slice(dp_rank * MICRO_BATCH, (dp_rank + 1) * MICRO_BATCH)
    loss, logits = _forward_backward(model, tokens[batch])
    clear_aux_losses_tracker()

    diffs = {}
    diffs["loss"] = (loss - ref_loss[batch]).abs().max().item()
    vocab_shard = VOCAB // tp
    ref_logits_local = ref_logits[:, batch, tp_rank * vocab_shard:(tp_rank + 1) * vocab_shard]
    assert logits.shape == ref_logits_local.shape, (logits.shape, ref_logits_local.shape)
    diffs["logits"] = (logits - ref_logits_local).abs().max().item()

    # Per-pass routing loads: every token is routed on exactly one rank (DP x SP shards).
    count_diffs = []
    for layer, expected in zip(_coe_layers(model), ref_counts):
        counts = layer.tokens_per_expert_per_pass.clone()
        dist.all_reduce(counts)
        count_diffs.append((counts - expected).abs().max().item())
    diffs["routing_counts"] = max(count_diffs)

    # Gradients, reduced as Megatron's DDP + finalize_model_grads would.
    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_group = parallel_state.get_data_parallel_group()
    expt_dp_group = parallel_state.get_expert_data_parallel_group()
    grad_diffs, ref_grad_max, missing = {}, 0.0, []
    for name, p in model.named_parameters():
        if p.grad is None:
            missing.append(name)
            continue
        g = p.grad.clone()
        is_expert = not getattr(p, "allreduce", True)
        if getattr(p, "sequence_parallel", False) and tp > 1:
            dist.all_reduce(g, group=tp_group)
        dist.all_reduce(g, group=expt_dp_group if is_expert else dp_group)
        g /= dp_size
        expected = ref_grads[name]
        assert g.shape == expected.shape, (name, g.shape, expected.shape)
        grad_diffs[name] = (g - expected).abs().max().item()
        ref_grad_max = max(ref_grad_max, expected.abs().max().item())
    assert not missing, f"parameters without gradient: {missing}"
    diffs["grads"] = max(grad_diffs.values())
    worst = max(grad_diffs, key=grad_diffs.get)
    layer = _coe_layers(model)[0]
    layout = dict(
        local_experts=len(layer.experts.local_experts),
        expert_fc1_rows=layer.experts.local_experts[0].linear_fc1.weight.shape[0],
        shared_fc1_rows=layer.shared_experts.linear_fc1.weight.shape[0],
    )
    return dict(diffs=diffs, worst_grad=worst, num_params=len(grad_diffs),
                max_ref_grad=ref_grad_max, layout=layout)


CASES = {
    "ep2_alltoall": dict(world_size=2, tp=1, ep=2, dispatcher="alltoall"),
    "ep2_allgather": dict(world_size=2, tp=1, ep=2, dispatcher="allgather"),
    "ep2_alltoall_shared_router": dict(world_size=2, tp=1, ep=2, dispatcher="alltoall",
                                       overrides=dict(coe_shared_router=True)),
    "tp2_sp": dict(world_size=2, tp=2, ep=1, dispatcher="alltoall"),
    "tp2_sp_mla": dict(world_size=2, tp=2, ep=1, dispatcher="alltoall", overrides=dict(mla=True)),
    # EP=2 x TP=2 on 4 processes, experts unsharded (ETP=1, expert-DP=2) and TP-sharded (ETP=2,
    # Megatron's default ETP=TP; its all-to-all dispatcher then all-gathers uneven token counts
    # over TP, which gloo only does through compat.py's padded stand-in).
    "ep2_tp2_etp1": dict(world_size=4, tp=2, ep=2, etp=1, dispatcher="alltoall"),
    "ep2_tp2_etp2": dict(world_size=4, tp=2, ep=2, etp=2, dispatcher="alltoall"),
}


@pytest.mark.timeout(150)
@pytest.mark.parametrize("name", list(CASES))
def test_parallel_layout_reproduces_reference(name, tmp_path):
    case = CASES[name]
    results = run_distributed(_equivalence_worker, case["world_size"], timeout=120,
                              case=case, ckpt_dir=str(tmp_path))
    for rank, result in enumerate(results):
        diffs = result["diffs"]
        print(f"{name} rank {rank}: {diffs} worst grad {result['worst_grad']} "
              f"(max |ref grad| {result['max_ref_grad']:.3g}, {result['num_params']} params)")
        etp = case.get("etp") or case["tp"]
        assert result["layout"] == dict(  # the parallel layout really is sharded
            local_experts=NUM_EXPERTS // case["ep"], expert_fc1_rows=2 * EXPERT_FFN // etp,
            shared_fc1_rows=2 * SHARED_FFN // case["tp"]), result["layout"]
        assert diffs["routing_counts"] == 0, (rank, diffs)
        assert diffs["loss"] < TOL, (rank, diffs)
        assert diffs["logits"] < TOL, (rank, diffs)
        assert diffs["grads"] < TOL, (rank, result["worst_grad"], diffs)


def _routing_worker(rank, world_size, *, shared):
    from megatron_coe.parallel import initialize_parallel

    pg = initialize_parallel(seed=SEED)
    model = _build(_config(coe_shared_router=shared), pg)
    out = {}
    for layer_index, layer in enumerate(_coe_layers(model)):
        # Same input through the routers of pass 1 and pass 2.
        x = torch.randn(SEQ, MICRO_BATCH, layer.config.hidden_size,
                        generator=torch.Generator().manual_seed(layer_index))
        model.eval()
        with torch.no_grad():
            probs0, map0 = layer.route(x, pass_index=0)
            probs1, map1 = layer.route(x, pass_index=1)
        model.train()
        out[layer_index] = dict(
            num_routers=len(layer.routers),
            same_router_object=layer.router_for_pass(0) is layer.router_for_pass(1),
            same_router_weights=torch.equal(layer.router_for_pass(0).weight,
                                            layer.router_for_pass(1).weight),
            tokens_differently_routed=int((map0 != map1).any(dim=1).sum()),
            maps_equal=torch.equal(map0, map1),
            probs_equal=torch.equal(probs0, probs1),
        )

    # A real training forward: record which router module runs in each pass, with its decision.
    calls = []
    hooks = [
        router.register_forward_hook(
            lambda module, args, output, li=li, ri=ri: calls.append((li, ri, output[1].detach()))
        )
        for li, layer in enumerate(_coe_layers(model))
        for ri, router in enumerate(layer.routers)
    ]
    _forward_backward(model, _global_batch(MICRO_BATCH))
    for hook in hooks:
        hook.remove()
    for layer_index, layer in enumerate(_coe_layers(model)):
        layer_calls = [(ri, routing_map) for li, ri, routing_map in calls if li == layer_index]
        out[layer_index].update(
            routers_called=[ri for ri, _ in layer_calls],
            hooked_counts=torch.stack([m.sum(dim=0).float() for _, m in layer_calls]),
            per_pass_counts=layer.tokens_per_expert_per_pass.clone(),
        )
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shared", [False, True], ids=["independent_routers", "shared_router"])
def test_per_pass_routing_decisions(shared):
    (result,) = run_distributed(_routing_worker, 1, timeout=45, shared=shared)
    num_tokens = SEQ * MICRO_BATCH
    for layer_index, r in result.items():
        counts = r["per_pass_counts"]  # [C=2, num_experts]
        # Each pass routes every token to top-k experts, and the buffer holds exactly the
        # decisions of the router module that ran in that pass.
        assert counts.shape == (2, NUM_EXPERTS)
        assert torch.equal(counts.sum(dim=1), torch.full((2,), float(TOPK * num_tokens)))
        assert torch.equal(r["hooked_counts"], counts), (layer_index, r)
        if shared:
            assert r["num_routers"] == 1 and r["same_router_object"]
            assert r["routers_called"] == [0, 0]
            assert r["maps_equal"] and r["probs_equal"], (layer_index, r)
            assert r["tokens_differently_routed"] == 0
        else:
            assert r["num_routers"] == 2 and not r["same_router_object"]
            assert not r["same_router_weights"]
            assert r["routers_called"] == [0, 1]
            assert not r["maps_equal"], (layer_index, r)
            assert r["tokens_differently_routed"] > 0
            # Pass 2 routes x_1 with its own router: the per-pass expert loads differ.
            assert not torch.equal(counts[0], counts[1]), (layer_index, counts)
        print(f"layer {layer_index} shared={shared}: {r['tokens_differently_routed']}/"
              f"{num_tokens} tokens routed differently on the same input; per-pass loads "
              f"{counts.tolist()}")
