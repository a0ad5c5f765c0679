"""Errors of the model pipeline.

:class:`UsageError` is a bad argument the user can fix (an unknown pattern or
method, a layer shape the pattern cannot divide, a missing calibration file, an
existing output directory...). The CLI prints its message on one line and exits
with status 2; library callers can catch it as a ``ValueError``.
"""

from __future__ import annotations

__all__ = ["UsageError"]


class UsageError(ValueError):
    """A bad argument; the message is one line saying what was wrong and what would work."""

    def __init__(self, message: str) -> None:
        # One line, always: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))
