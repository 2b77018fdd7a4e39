"""Errors the trainer reports as one line (``coe-train: error: ...``, exit 2), without a traceback."""

from __future__ import annotations


class SetupError(ValueError):
    """A run that cannot start as configured; the message says which option to change."""
