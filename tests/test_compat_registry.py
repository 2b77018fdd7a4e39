"""The Megatron boundary: every workaround is in ``compat.registry`` and is exercised.

* the registry is well formed and each entry is documented in the compat module that holds it;
* a 2-rank CoE model run (EP=2, all-to-all, aux + z-loss, a checkpoint writer queue, the DDP
  device redirect) takes exactly the workarounds that apply to the installed Megatron-Core on
  this (CUDA-less) machine: none is dead, none that should be off is taken;
* outside ``megatron_coe/compat`` no module rebinds a Megatron-Core name or reads a private one
  (every workaround lives in compat), nor uses torch's private function-mode stack;
* the ``internal`` entries (upstream internals CoE modules use unchanged) match the installed
  release, and the single-process data path takes the dataset workarounds;
* a megatron-core outside the tested range gives exactly one warning line naming the range.
"""

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest
import torch

from megatron_coe.compat import registry, versions
from megatron_coe.testing.distributed import run_distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_registry_is_well_formed_and_documented_where_implemented():
    names = [e.name for e in registry.REGISTRY]
    assert len(names) == len(set(names)), names
    for e in registry.REGISTRY:
        assert e.kind in ("stand-in", "patch", "adaptation", "internal"), e
        assert e.upstream and e.summary, e
        versions.in_range((0, 16, 1), e.versions)  # parses
        assert e.applies((0, 16, 1)) or e.applies((0, 19, 2)), f"{e.name} applies to no tested release"
        module = importlib.import_module(f"megatron_coe.compat.{e.area}")
        assert f'"{e.name}"' in pathlib.Path(module.__file__).read_text(), (
            f"{e.name}: megatron_coe/compat/{e.area}.py never marks it")


def _optimizer_round_trip(model, config, directory):
    """Distributed optimizer (torch AdamW) over ``model``: save its fresh state with
    dist_checkpointing and load it back, as the trainer's checkpoints do."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_coe import checkpointing
    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.compat.optimizer_state import adam_step_tolerant_load, ensure_optimizer_state

    meta = checkpointing.SHARDING_METADATA
    with cuda_device_redirect():
        ddp = DistributedDataParallel(
            config=config, module=model,
            ddp_config=DistributedDataParallelConfig(use_distributed_optimizer=True))
        opt = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [ddp])

        def state(is_loading):
            model_sd = model.sharded_state_dict(metadata=meta)
            ensure_optimizer_state(opt)
            return {"optimizer": opt.sharded_state_dict(model_sd, is_loading=is_loading,
                                                        metadata=meta)}

        with checkpointing.sharded_writer():
            dist_checkpointing.save(state(False), directory)
        loaded = dist_checkpointing.load(state(True), directory)
        with adam_step_tolerant_load(opt):
            opt.load_state_dict(loaded["optimizer"])
    steps = [s["step"] for o in getattr(opt, "chained_optimizers", [opt])
             for s in o.optimizer.state.values()]
    assert steps and len({id(t) for t in steps}) == len(steps)  # one step tensor per parameter


def _exercise(rank, world_size, directory):
    """Build and train one step of a tiny CoE model at EP=2, touch the checkpoint writer, save
    and reload the distributed optimizer, build a blended dataset, check the internals."""
    import queue

    from megatron_coe.compat import cuda_device_redirect
    from megatron_coe.compat.dist_checkpointing import write_results_queue_swapped
    from megatron_coe.compat.router_losses import clear_recorded_metrics, recorded_metrics
    from megatron_coe.models.gpt import build_coe_gpt_model
    from megatron_coe.parallel import initialize_parallel
    from megatron_coe.testing.configs import tiny_config

    pg = initialize_parallel(expert_model_parallel_size=2, seed=5)
    config = tiny_config(expert_model_parallel_size=2, moe_aux_loss_coeff=1e-2,
                         moe_z_loss_coeff=1e-3, moe_shared_expert_intermediate_size=32)
    model = build_coe_gpt_model(config, pg_collection=pg, vocab_size=64, max_sequence_length=8)
    model.train()
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
    loss = model(tokens, torch.arange(8).expand(2, -1), None, labels=tokens).sum()
    loss.backward()
    names = sorted(n for n, v in recorded_metrics().items() if v.any())
    clear_recorded_metrics()
    # DeepSeek-V2 attention as the paper presets build it: latent norms, no query compression
    mla = tiny_config(mla=True, expert_model_parallel_size=2, qk_layernorm=True, q_lora_rank=None)
    build_coe_gpt_model(mla, pg_collection=pg, vocab_size=64, max_sequence_length=8)
    from megatron_coe.compat.te_layer_spec import te_layer_spec

    te_layer_spec(num_experts=2)  # the TE spec's checkpoint keys, read without TE
    from megatron_coe.compat.context_parallel import batch_on_this_cp_rank

    assert batch_on_this_cp_rank({"tokens": tokens}, pg.cp)["tokens"] is tokens  # CP 1: as is
    assert tiny_config(cuda_graph_impl="transformer_engine").coe_iterations == 2  # whole layers
    with write_results_queue_swapped(queue.Queue()), cuda_device_redirect():
        assert torch.zeros(1, device="cuda").device.type == "cpu"
    from megatron_coe.compat.async_checkpoint import async_save_kwargs

    assert async_save_kwargs()["async_sharded_save"]  # --async-save's writer choice
    from megatron_coe.compat.internals import verify_internals
    from megatron_coe.training.metrics import reduce_aux_losses

    verify_internals()
    _optimizer_round_trip(model, config, directory)
    from megatron_coe.compat.dist_checkpointing import common_state_unreadable

    assert common_state_unreadable(directory) is None  # what this release saved, it reads
    from megatron_coe.compat.batch_rampup import num_microbatches_calculator

    ramp = num_microbatches_calculator(12, 1, 2, (4, 4, 24))  # --rampup-batch-size 4 4 24
    ramp.update(12, consistency_check=True)
    assert (ramp.get_current_global_batch_size(), ramp.get()) == (8, 4)
    model(tokens, torch.arange(8).expand(2, -1), None, labels=tokens)
    aux = reduce_aux_losses(1, pg)  # across ranks through the installed tracker API, then cleared
    assert {"z_loss_pass1", "z_loss_pass2"} <= set(aux), aux
    assert not any(v.any() for v in recorded_metrics().values())  # cleared
    return sorted(registry.used()), names


def _single_process_data(directory, out):
    """In a process without torch.distributed (a single-process run or a tool): build a
    two-prefix blended dataset with an index cache, as the trainer does; put registry.used()."""
    try:
        from megatron_coe.data.datasets import build_train_valid_test_datasets
        from megatron_coe.data.tokenizer import load_tokenizer
        from megatron_coe.testing.data import gsm8k_subset

        assert not torch.distributed.is_initialized()
        pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
        a = gsm8k_subset(directory, 30, vocab_size=300)
        b = gsm8k_subset(directory, 10, split="test", tokenizer_model=f"{a}.tokenizer.json")
        train, _, _ = build_train_valid_test_datasets(
            ["0.5", a, "0.5", b], "90,10,0", 16, 3, (16, 2, 0), load_tokenizer(f"{a}.tokenizer.json"),
            f"{directory}/cache")
        assert len(train) == 16
        out.put(sorted(registry.used()))
    except BaseException:  # noqa: BLE001 - reported by the parent
        import traceback

        out.put(traceback.format_exc())


def _in_fresh_process_without_distributed(directory):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    proc = ctx.Process(target=_single_process_data, args=(directory, out))
    proc.start()
    try:
        used = out.get(timeout=120)
    finally:
        proc.join(10)
    assert isinstance(used, list), used
    return set(used)


@pytest.mark.timeout(180)
def test_exactly_the_applicable_workarounds_are_exercised(tmp_path):
    (tmp_path / "optim").mkdir()
    results = run_distributed(_exercise, 2, timeout=150, directory=str(tmp_path / "optim"))
    single = _in_fresh_process_without_distributed(str(tmp_path / "data"))
    assert "data.helpers_cpp" in single
    assert ("data.blended_get_rank" in single) == registry.entry("data.blended_get_rank").applies()
    expected = {e.name for e in registry.applicable()
                if not (e.name.startswith("cuda.") and torch.cuda.is_available())}
    for used, metric_names in results:
        used = set(used) | single
        assert used == expected, (
            f"megatron-core {versions.version_string()}: exercised but not applicable: "
            f"{sorted(used - expected)}; applicable but not exercised: {sorted(expected - used)}")
        assert {"load_balancing_loss_pass1", "load_balancing_loss_pass2", "z_loss_pass1",
                "z_loss_pass2"} <= set(metric_names), metric_names




# modules whose private names only compat may use (compat's own internals; torch's function-mode
# stack, which suspends cuda_device_redirect)
_PRIVATE_OK_ONLY_IN_COMPAT = {"megatron_coe.compat", "megatron_coe.compat.cuda_on_cpu",
                              "torch.overrides", "torch.utils._python_dispatch"}


def _megatron_internals_outside_compat():
    """``(file, expression)`` for every rebinding of a name imported from Megatron-Core, every
    private (``_x``) Megatron-Core name read and every private name imported from
    ``_PRIVATE_OK_ONLY_IN_COMPAT``, in ``megatron_coe`` outside ``compat/``."""
    found = set()
    for path in sorted((ROOT / "megatron_coe").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("megatron_coe/compat/"):
            continue
        tree = ast.parse(path.read_text())
        bound = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bound |= {a.asname or a.name.split(".")[0] for a in node.names
                          if a.name.startswith("megatron.")}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron."):
                for a in node.names:
                    bound.add(a.asname or a.name)
                    if a.name.startswith("_"):
                        found.add((rel, f"import {node.module}.{a.name}"))
            elif isinstance(node, ast.ImportFrom) and node.module in _PRIVATE_OK_ONLY_IN_COMPAT:
                found |= {(rel, f"import {node.module}.{a.name}") for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")}

        def base(n):
            while isinstance(n, ast.Attribute):
                n = n.value
            return n.id if isinstance(n, ast.Name) else None

        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and base(node.value) in bound):
                found.add((rel, ast.unparse(node)))
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and base(t) in bound:
                        found.add((rel, f"{ast.unparse(t)} = ..."))
    return found


# private attributes of megatron_coe's own objects (not Megatron-Core's) used across its modules
_OWN_PRIVATE = {("megatron_coe/conversion/megatron_ckpt.py", "_EXPERT_RE")}  # conversion/mapping.py


def test_private_attributes_outside_compat_are_registered_internals():
    """``obj._name`` (obj not self/cls) outside compat: a registered internal or our own."""
    from megatron_coe.compat.internals import PRIVATE_USES_OUTSIDE_COMPAT

    allowed = {(f, n) for f, names in PRIVATE_USES_OUTSIDE_COMPAT.items() for n in names}
    found = set()
    for path in sorted((ROOT / "megatron_coe").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("megatron_coe/compat/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name)
                             and node.value.id in ("self", "cls", "os", "sys"))):
                found.add((rel, node.attr))
    assert found - allowed - _OWN_PRIVATE == set(), (
        "private attributes used outside megatron_coe/compat: move the use into compat, or "
        "register the Megatron-Core internal (compat/internals.py)")
    assert allowed <= found, f"registered but no longer used: {sorted(allowed - found)}"


def test_no_megatron_patch_outside_compat():
    found = _megatron_internals_outside_compat()
    assert found == set(), (f"Megatron-Core workarounds outside megatron_coe/compat: {sorted(found)}; "
                            "move each into a compat module with a registry entry")


def test_no_coe_module_reads_parallel_state():
    """transformer/ and models/ neither import nor name Megatron's global ``parallel_state``."""
    for sub in ("transformer", "models"):
        for path in (ROOT / "megatron_coe" / sub).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                elif isinstance(node, ast.Name):
                    names = [node.id]
                elif isinstance(node, ast.Attribute):
                    names = [node.attr]
                assert not any("parallel_state" in n for n in names), (path, ast.unparse(node))


def test_version_outside_tested_range_warns_once_naming_the_range(capsys):
    import io

    assert versions.in_range(versions.megatron_core_version(), versions.TESTED_RANGE)
    assert versions.in_range((0, 19, 9), versions.TESTED_RANGE)
    assert not versions.in_range((0, 20, 0), versions.TESTED_RANGE)
    assert not versions.in_range((0, 16, 0), versions.TESTED_RANGE)
    stream = io.StringIO()
    assert versions.warn_if_untested(stream, version=(0, 19, 2)) is False
    assert stream.getvalue() == ""


def test_untested_megatron_core_prints_one_warning_line_at_import():
    code = ("import importlib.metadata as m; v = m.version; "
            "m.version = lambda n: '0.21.0' if n == 'megatron-core' else v(n); "
            "import megatron_coe.compat, megatron_coe.compat.versions as ver; "
            "ver.warn_if_untested()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [l for l in out.stderr.splitlines() if l.startswith("megatron-coe: warning")]
    assert lines == ["megatron-coe: warning: megatron-core 0.21.0 is outside the tested range "
                     "megatron-core>=0.16.1,<0.20; install a tested release "
                     "(pip install 'megatron-core>=0.16.1,<0.20')."], out.stderr[-2000:]
