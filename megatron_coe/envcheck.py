"""The first thing every ``tools/*.py`` does: outside the project's environment, one line naming it.

``python tools/convert_to_hf.py ...`` with a Python that has no torch or Megatron-Core (the
system Python, say) would otherwise end in a ``ModuleNotFoundError`` traceback. This module
imports nothing heavy, so the check runs before anything imports torch.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEEDED = {"torch": "torch", "megatron": "megatron-core"}


def missing_packages() -> list:
    return [dist for module, dist in NEEDED.items() if importlib.util.find_spec(module) is None]


def _shown(path: str) -> str:
    """``path`` relative to the current directory when it lies below it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def advice(argv: list | None = None) -> str:
    """The one line: which interpreter lacks what, and the command to run instead."""
    argv = list(sys.argv if argv is None else argv)
    tool = os.path.basename(argv[0]) if argv else "this tool"
    venv = os.path.join(ROOT, ".venv")
    command = " ".join([_shown(os.path.join(venv, "bin", "python")), *map(shlex.quote, argv)])
    line = (f"{tool}: error: {sys.executable} has no {' or '.join(missing_packages())}: run the "
            f"tool with the project's environment: {command} (or 'source "
            f"{_shown(os.path.join(venv, 'bin', 'activate'))}' first)")
    if not os.path.exists(os.path.join(venv, "bin", "python")):
        line += f"; 'bash {_shown(os.path.join(ROOT, 'tools', 'setup_env.sh'))}' creates it"
    return line


def require_environment() -> None:
    """Exit 2 with one line when torch or Megatron-Core cannot be imported."""
    if missing_packages():
        print(advice(), file=sys.stderr)
        raise SystemExit(2)
