"""Process groups are passed down explicitly: the collection given to ``build_coe_gpt_model``
reaches every layer, and the RNG is seeded in one place (``parallel.initialize_parallel``)."""

import dataclasses

import torch

from megatron_coe.testing.distributed import run_distributed


def _groups_held(module):
    return {name: value for name, value in vars(module).items()
            if isinstance(value, torch.distributed.ProcessGroup)}


def _fresh_collection_reaches_every_module(rank, world_size):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.testing.configs import tiny_config
    from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer
    from megatron_coe.transformer.coe_router import CoETopKRouter

    global_pg = initialize_parallel(expert_model_parallel_size=2, seed=3)
    # The same layout, but every group a new object: a module that fell back to Megatron's
    # global parallel_state would hold one of global_pg's groups instead.
    fresh = {}
    for f in dataclasses.fields(ProcessGroupCollection):
        group = getattr(global_pg, f.name, None)
        if isinstance(group, torch.distributed.ProcessGroup):
            fresh[f.name] = torch.distributed.new_group(
                torch.distributed.get_process_group_ranks(group))
    pg = ProcessGroupCollection(**fresh)
    fresh_ids = {id(g) for g in fresh.values()}
    config = tiny_config(expert_model_parallel_size=2, coe_iterations=2)
    model = build_coe_gpt_model(config, pg_collection=pg, vocab_size=64, max_sequence_length=8)

    coe_layers = [m for m in model.modules() if isinstance(m, ChainOfExpertsLayer)]
    assert len(coe_layers) == config.num_layers
    foreign, checked = [], 0
    for layer in coe_layers:
        assert layer.ep_group is pg.ep and layer.tp_group is pg.tp
        assert len(layer.routers) == 2 and all(isinstance(r, CoETopKRouter) for r in layer.routers)
        for router in layer.routers:
            assert router.tp_cp_group is pg.tp_cp
        for name, module in layer.named_modules():
            for attr, group in _groups_held(module).items():
                checked += 1
                if id(group) not in fresh_ids:
                    foreign.append(f"{type(module).__name__} {name}.{attr}")
    assert checked > 10 and not foreign, foreign
    return checked


def test_process_group_collection_reaches_every_coe_module():
    counts = run_distributed(_fresh_collection_reaches_every_module, 2, timeout=120)
    assert counts[0] == counts[1]


def test_rng_is_seeded_in_one_place():
    """initialize_parallel seeds Python, numpy, torch and Megatron's tracker; nothing else in the
    production package does. (``testing/megatron_lm_save.py`` stands in for Megatron-LM's own
    training script, which seeds itself; production code never imports ``testing/``.)"""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "megatron_coe"
    callers = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*.py")
        if "model_parallel_cuda_manual_seed(" in p.read_text() or "np.random.seed(" in p.read_text()
    )
    assert [c for c in callers if not c.startswith("testing/")] == ["parallel.py"], callers


def _seeded_twice_equal(rank, world_size):
    import random

    import numpy as np

    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_coe.parallel import destroy_parallel, initialize_parallel

    draws = []
    for _ in range(2):
        destroy_parallel()
        initialize_parallel(seed=9)
        with get_cuda_rng_tracker().fork():
            tracked = torch.rand(2)
        draws.append((random.random(), float(np.random.rand()), torch.rand(2), tracked))
    (a, b) = draws
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    return True


def test_initialize_parallel_seeds_every_generator():
    assert run_distributed(_seeded_twice_equal, 1, timeout=60) == [True]
