"""Command-line helpers shared by the tools: errors as one line.

Every tool of this project reports a bad invocation or a refused input in one line that says what
to change. ``OneLineParser`` is ``argparse`` without the usage block (``prog: error: ... (see
--help)``, exit 2); ``one_line`` renders a multi-line, bulleted message (a ``ConversionError``
listing several problems) as one line.
"""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block): ``prog: error: ... (see --help)``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(error) -> str:
    """A (possibly multi-line, bulleted) message as one line."""
    parts = [p.strip() for p in str(error).splitlines()]
    parts = [p[2:] if p.startswith("- ") else p for p in parts if p]
    return "; ".join(parts).replace(":;", ":")
