"""The installed Megatron-Core version, the tested range, and version ranges of adaptations.

Versions are read from the installed distribution's metadata (``megatron-core``; for a source
checkout without metadata, ``megatron.core.package_info``), not from ``megatron.core.__version__``
(which appends the git hash of the current directory when run inside a git checkout). Ranges are written like pip specifiers, restricted to ``>=`` and ``<``
clauses joined by commas (``">=0.16.1,<0.18"``); an empty string means every version.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
import sys
from typing import Tuple

Version = Tuple[int, ...]

TESTED_RANGE = ">=0.16.1,<0.20"
"""Megatron-Core releases this code base is tested against (CI: 0.16.1 and 0.19.2)."""


def parse_version(text: str) -> Version:
    """``"0.19.2"`` -> ``(0, 19, 2)``; trailing local/pre-release parts are ignored."""
    match = re.match(r"\s*(\d+(?:\.\d+)*)", text)
    if not match:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in match.group(1).split("."))


def _cmp_key(v: Version) -> Version:
    return tuple(v) + (0,) * (4 - len(v))


def in_range(version: Version, spec: str) -> bool:
    """Whether ``version`` satisfies ``spec`` (``">=A,<B"``; either clause optional)."""
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        if clause.startswith(">="):
            if _cmp_key(version) < _cmp_key(parse_version(clause[2:])):
                return False
        elif clause.startswith("<"):
            if _cmp_key(version) >= _cmp_key(parse_version(clause[1:])):
                return False
        else:
            raise ValueError(f"unsupported version clause {clause!r} in {spec!r} (use >= and <)")
    return True


@functools.lru_cache(maxsize=1)
def megatron_core_version() -> Version:
    """The installed ``megatron-core`` release, e.g. ``(0, 16, 1)``: the distribution's metadata,
    or, for a source checkout on ``PYTHONPATH`` (no metadata), ``megatron.core.package_info``."""
    try:
        return parse_version(importlib.metadata.version("megatron-core"))
    except importlib.metadata.PackageNotFoundError:
        from megatron.core import package_info

        return (int(package_info.MAJOR), int(package_info.MINOR), int(package_info.PATCH))


def version_string(version: Version | None = None) -> str:
    return ".".join(str(p) for p in (version or megatron_core_version()))


def mcore_in(spec: str) -> bool:
    """Whether the installed Megatron-Core satisfies ``spec``."""
    return in_range(megatron_core_version(), spec)


_WARNED = False


def warn_if_untested(stream=None, version: Version | None = None) -> bool:
    """Print one warning line (once per process) when the installed release (or ``version``) is
    outside ``TESTED_RANGE``. Returns True if it is outside."""
    global _WARNED
    version = version or megatron_core_version()
    if in_range(version, TESTED_RANGE):
        return False
    if not _WARNED:
        _WARNED = True
        print(f"megatron-coe: warning: megatron-core {version_string(version)} is outside the "
              f"tested range megatron-core{TESTED_RANGE}; install a tested release "
              f"(pip install 'megatron-core{TESTED_RANGE}').", file=stream or sys.stderr)
    return True
