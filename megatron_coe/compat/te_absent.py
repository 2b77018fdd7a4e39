"""Transformer Engine absent: detection, clear refusals, and Megatron-Core bugs that show without TE.

``have_transformer_engine()`` / ``transformer_engine_import_error()`` (the import error's text)
/ ``require_transformer_engine(what)``: GPU-only paths (TE specs, FP8, grouped GEMM) call the
latter and never fall back silently; the trainer refuses a CUDA machine whose TE does not import
unless ``--transformer-impl local`` is given (``training/precision.resolve_transformer_impl``).

``install_megatron_fixes()`` (idempotent, every machine) works around two Megatron-Core 0.16
bugs that appear whenever TE is absent; both were fixed upstream in 0.17, where nothing is done:

* ``te.router_gemm_name``: ``transformer/moe/moe_utils.py`` (``RouterGatingLinearFunction``)
  reads the global ``te_general_gemm``, defined only when TE imports: every router forward
  raises ``NameError``. It is defined as ``None`` (the non-TE branch, as upstream from 0.17).
* ``te.mla_have_te``: ``extensions/transformer_engine.py`` replaces a missing TE by a
  ``MagicMock``, so ``transformer/multi_latent_attention.py`` believes TE is there
  (``HAVE_TE=True``) and MLA fails in ``isinstance``: ``HAVE_TE`` is set to False.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_coe.compat.registry import mark
from megatron_coe.compat.versions import mcore_in

_FIXES_INSTALLED = False


def transformer_engine_import_error() -> Optional[str]:
    """None when ``transformer_engine.pytorch`` imports; else the import error's text in one
    line (``ModuleNotFoundError: No module named 'transformer_engine'``, or the undefined
    symbol of a TE built against another torch)."""
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a TE build that does not match torch (OSError ...)
        text = " ".join(str(e).split()) or "(no message)"
        return f"{type(e).__name__}: {text}"
    return None


def have_transformer_engine() -> bool:
    return transformer_engine_import_error() is None


def cpu_note() -> str | None:
    """The one line a CPU run prints about the GPU packages (Megatron-Core's own import-time
    warnings about them are filtered in ``megatron_coe/__init__.py``); None on a GPU machine."""
    if torch.cuda.is_available():
        return None
    return ("no GPU: Megatron-Core runs with its torch implementations on CPU (Transformer Engine "
            "and Apex are GPU packages and are not needed here)")


class TransformerEngineUnavailable(RuntimeError):
    """The Transformer Engine spec or FP8 was requested where TE or a CUDA GPU is missing."""


def require_transformer_engine(what: str) -> None:
    """Raise a clear error unless Transformer Engine and a CUDA device are both present.

    GPU-only paths (TE specs, FP8, grouped GEMM) call this and never fall back silently."""
    if not torch.cuda.is_available():
        raise TransformerEngineUnavailable(
            f"{what} needs a CUDA GPU with Transformer Engine; this machine has no CUDA device. "
            "On CPU use the local spec (--transformer-impl local) and no --fp8-format."
        )
    if not have_transformer_engine():
        raise TransformerEngineUnavailable(
            f"{what} needs Transformer Engine, which is not importable here. Install it "
            "(requirements-gpu.txt, or use an NVIDIA PyTorch container) or use --transformer-impl local."
        )


def install_megatron_fixes() -> None:
    """Apply the registry's ``te.*`` patches that apply to the installed Megatron-Core."""
    global _FIXES_INSTALLED
    if _FIXES_INSTALLED:
        return
    if mcore_in("<0.17"):
        import megatron.core.transformer.moe.moe_utils as moe_utils

        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
            mark("te.router_gemm_name")
        if not have_transformer_engine():
            import megatron.core.transformer.multi_latent_attention as mla

            mla.HAVE_TE = False
            mark("te.mla_have_te")
    _FIXES_INSTALLED = True
