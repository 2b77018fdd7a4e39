"""The CPU compatibility layer is active only without CUDA, and each stand-in behaves as documented."""

import numpy as np
import pytest
import torch

from megatron_coe import compat


def test_active_only_without_cuda():
    assert not torch.cuda.is_available()
    assert compat.install_cpu_compat() is True  # idempotent, reports active


def test_current_device_and_streams_are_cpu_noops():
    assert torch.cuda.current_device() == torch.device("cpu")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        x = torch.ones(2)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    assert x.sum().item() == 2


def test_cuda_rng_calls_drive_the_cpu_generator():
    torch.cuda.manual_seed(5)
    a = torch.rand(3)
    state = torch.cuda.get_rng_state()
    b = torch.rand(3)
    torch.cuda.set_rng_state(state)
    assert torch.equal(torch.rand(3), b)
    torch.cuda.manual_seed(5)
    assert torch.equal(torch.rand(3), a)


def test_megatron_rng_tracker_forks_reproducibly():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("compat-test", 11)
    with tracker.fork("compat-test"):
        first = torch.rand(4)
    tracker.reset()
    tracker.add("compat-test", 11)
    with tracker.fork("compat-test"):
        assert torch.equal(torch.rand(4), first)


def test_alltoall_split_sizes_become_numpy_on_cpu():
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    splits = token_dispatcher.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True)
    assert isinstance(splits, np.ndarray) and splits.tolist() == [1, 2]


def test_megatron_fixes_for_missing_transformer_engine():
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.transformer.multi_latent_attention as mla

    assert moe_utils.te_general_gemm is None
    assert mla.HAVE_TE is False


def test_cuda_device_redirect_is_scoped():
    with compat.cuda_device_redirect():
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cpu"
        assert t.type() == "torch.cuda.FloatTensor"
    assert torch.zeros(2).type() == "torch.FloatTensor"


def _uneven_gather(rank, world_size):
    import megatron.core.tensor_parallel.mappings as mappings

    group = torch.distributed.group.WORLD
    local = torch.full((rank + 1, 2), float(rank))  # rank 0: 1 row, rank 1: 2 rows
    return mappings._gather_along_first_dim(local, group, output_split_sizes=[1, 2])


def test_uneven_all_gather_works_on_gloo():
    from megatron_coe.testing.distributed import run_distributed

    for gathered in run_distributed(_uneven_gather, 2, timeout=60):
        assert gathered.tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def test_default_causal_mask_is_built_on_cpu():
    import megatron.core.fusions.fused_softmax as fused_softmax

    mask = fused_softmax.get_default_causal_mask(3)
    assert mask.device.type == "cpu"
    assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_version_read_without_distribution_metadata():
    """A Megatron-LM source checkout on PYTHONPATH has no megatron-core metadata: the version
    comes from megatron.core.package_info instead of failing the import."""
    import subprocess
    import sys

    code = ("import importlib.metadata as m; v = m.version\n"
            "def version(n):\n"
            "    if n == 'megatron-core': raise m.PackageNotFoundError(n)\n"
            "    return v(n)\n"
            "m.version = version\n"
            "from megatron_coe.compat import versions\n"
            "print(versions.megatron_core_version() == versions.parse_version(v('megatron-core')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_model_forward_runs_outside_the_redirect_and_the_redirect_resumes():
    with compat.cuda_device_redirect():
        with compat.outside_cuda_device_redirect():
            assert torch.zeros(1).type() == "torch.FloatTensor"  # no mode: plain CPU type
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"  # redirect active again
    with compat.outside_cuda_device_redirect():  # no redirect to suspend: nothing happens
        assert torch.zeros(1).type() == "torch.FloatTensor"


def test_blended_dataset_get_rank_answers_zero_only_without_a_process_group():
    from megatron.core.datasets import blended_dataset

    from megatron_coe.compat import registry
    from megatron_coe.compat.datasets import rank_zero_without_process_group

    assert not torch.distributed.is_initialized()
    original = blended_dataset.torch
    with pytest.raises(RuntimeError, match="boom"):
        with rank_zero_without_process_group():
            if registry.entry("data.blended_get_rank").applies():
                assert blended_dataset.torch is not original
                assert blended_dataset.torch.distributed.get_rank() == 0
                assert blended_dataset.torch.zeros is torch.zeros  # the rest is torch
            else:  # the release guards get_rank() itself: nothing is patched
                assert blended_dataset.torch is original
            raise RuntimeError("boom")
    assert blended_dataset.torch is original  # restored, also on an exception


def test_missing_dataset_helpers_is_one_error_naming_the_release(monkeypatch):
    import sys

    from megatron_coe.compat.datasets import check_helpers
    from megatron_coe.compat.versions import version_string
    from megatron_coe.data.datasets import DataError

    check_helpers(DataError)  # the wheel ships the compiled extension
    import megatron.core.datasets as datasets_package

    monkeypatch.setitem(sys.modules, "megatron.core.datasets.helpers", None)  # import fails
    monkeypatch.delattr(datasets_package, "helpers", raising=False)
    with pytest.raises(DataError) as err:
        check_helpers(DataError)
    message = str(err.value)
    assert "\n" not in message and f"megatron-core=={version_string()}" in message
    assert "helpers_cpp" in message


def test_checkpoint_without_common_pt_is_refused_only_where_unreadable(tmp_path):
    """0.19.2 keeps the common state inside the torch_dist shards; 0.16.1 can read only common.pt."""
    from megatron_coe.compat.dist_checkpointing import (
        common_state_unreadable,
        reads_embedded_common_state,
    )
    from megatron_coe.compat.versions import megatron_core_version

    assert reads_embedded_common_state() == (megatron_core_version() >= (0, 19))
    (tmp_path / "common.pt").write_bytes(b"")
    assert common_state_unreadable(str(tmp_path)) is None
    (tmp_path / "common.pt").unlink()
    why = common_state_unreadable(str(tmp_path))
    if megatron_core_version() >= (0, 19):
        assert why is None
    else:
        assert "no common.pt" in why and "megatron-core>=0.19" in why and "\n" not in why


def test_cpu_rng_changed_warning_is_filtered_on_cpu_only(caplog):
    """On CPU the "GPU" RNG is the CPU generator, so the tracker's fork warning would fire for
    every dropout inside a fork: the stand-in drops exactly that message, nothing else."""
    import logging

    import torch

    from megatron_coe.compat import install_cpu_compat

    if torch.cuda.is_available():
        pytest.skip("CPU-only stand-in")
    install_cpu_compat()
    log = logging.getLogger("megatron.core.tensor_parallel.random")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning("CPU RNG state changed within GPU RNG context")
        log.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
