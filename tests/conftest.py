"""pytest setup: CPU compatibility layer before any Megatron model is built, and no torch.compile."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # Megatron's jit_fuser is torch.compile: 15 s/step on CPU
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*Apex is not installed.*")

from megatron_coe.compat import install_cpu_compat  # noqa: E402

install_cpu_compat()
