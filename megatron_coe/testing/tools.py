"""Test helpers for the command-line tools and their outputs: ``tools/<name>.py`` loaded as a
module (its ``main(argv)`` called in the test process), a Hugging Face directory's tensors, and
the processes a fault test started (tagged through the ``COE_FAULT_TEST`` environment variable)."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"
FAULT_TAG = "COE_FAULT_TEST"


def load_tool(name: str, module_name: str = None):
    """``tools/<name>.py`` as a fresh module."""
    spec = importlib.util.spec_from_file_location(module_name or name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def hf_tensors(path) -> dict:
    """Every tensor of the ``*.safetensors`` files of a Hugging Face directory."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def tagged(tag: str) -> list:
    """Live processes started with ``COE_FAULT_TEST=tag`` (a trainer and anything it forked)."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(FAULT_TAG) == tag and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.Error, OSError):
            pass
    return out


def survivors_of_kill(proc, children: list, timeout: float = 5.0) -> list:
    """SIGKILL ``proc`` (a ``subprocess.Popen``) and return those of its ``children``
    (``psutil.Process``) still alive ``timeout`` seconds later: they should die with it."""
    import psutil

    proc.kill()
    proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=timeout)
    return alive


@contextlib.contextmanager
def reaped(proc, tag: str):
    """On leaving, kill ``proc`` if it still runs and every process tagged ``tag``."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in tagged(tag):
            p.kill()
