"""Command-line helpers shared by the tools: errors as one line.

Every tool of this project reports a bad invocation or a refused input in one line that says what
to change. ``OneLineParser`` is ``argparse`` without the usage block (``prog: error: ... (see
--help)``, exit 2) that takes every negative number as a value (``--lr -1e-3``, ``--x -.5``,
``--y -inf``), so the option's own range check reports it; ``one_line`` renders a multi-line,
bulleted message (a ``ConversionError`` listing several problems) as one line.
"""

from __future__ import annotations

import argparse
import re

# A token argparse must read as a (negative) number, not as an unknown option. argparse's own
# pattern (Python 3.11/3.12: ``^-\d+$|^-\d*\.\d+$``) misses the scientific forms ``-1e-3`` and
# ``-1.5E+2`` and ``-inf``/``-nan``, so ``--lr -1e-3`` was "expected one argument" with the usage
# block. No option of this project is spelled like a number, so every such token is a value.
NEGATIVE_NUMBER = re.compile(
    r"^-(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity|nan)$", re.IGNORECASE)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): ``prog: error: ... (see --help)``;
    negative numbers in any notation are values (``NEGATIVE_NUMBER``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(error) -> str:
    """A (possibly multi-line, bulleted) message as one line."""
    parts = [p.strip() for p in str(error).splitlines()]
    parts = [p[2:] if p.startswith("- ") else p for p in parts if p]
    return "; ".join(parts).replace(":;", ":")
