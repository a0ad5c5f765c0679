"""Progress bars of ``s3sparse eval`` and ``s3sparse pack`` (``prune`` has its own two-level bars).

:func:`progress_bar` gives a tqdm bar on stderr, or -- when progress is off or
tqdm is not installed -- an object with the same three methods that does
nothing, so callers never test which one they got.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["progress_bar"]


class _NoBar:
    """The methods of a tqdm bar that the pipeline uses, doing nothing."""

    def update(self, n: int = 1) -> None:
        """Nothing (a tqdm bar advances by ``n``)."""

    def set_postfix_str(self, text: str = "") -> None:
        """Nothing (a tqdm bar shows ``text`` after its counts)."""

    def close(self) -> None:
        """Nothing (a tqdm bar ends its line)."""


def progress_bar(enabled: bool, total: Optional[int], desc: str, unit: str = "it") -> Any:
    """A tqdm bar of ``total`` steps labelled ``desc`` on stderr when ``enabled``, else one that shows nothing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit)
