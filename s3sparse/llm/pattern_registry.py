"""Sparsity patterns by name, for recipes and the command line.

A pattern name becomes a :class:`PatternChoice`, which builds ``(scope, nnz)``
on any ``nn.Linear`` weight through :mod:`s3sparse.patterns` and checks that a
pruned weight obeys it. Names:

======================  =====================================================================
name                    pattern
======================  =====================================================================
``2:4``                 2:4 — keep 2 of every 4 adjacent weights of a row (``patterns.nm``)
``4:8``                 the paper's 4:8 — keep 2 of every 4 adjacent column *pairs* (``nm_blocks``)
``N:M``                 any other N:M over single weights, e.g. ``1:4``, ``2:8``
``nm:N:M``              N:M over single weights, always (``nm:4:8`` keeps 4 of 8 weights)
``nm-blocks:N:M:B``     keep N of M adjacent blocks of B columns
``coupled-2:4``         columns j and j+8 of each 16-column tile pruned together, 2 of 4 pairs kept
``coupled-N:M``         the same with N of M pairs
``block16-rows``        16-column blocks; rows p and p+8 of every 16 rows compete, 1 of 2 kept
``blockB-rowsR``        B-column blocks; rows p and p+R compete (``row_coupled_blocks``)
``channels:S``          output channels (whole rows), fraction S pruned per layer
``columns:S``           input columns (whole columns), fraction S pruned per layer
``col-blocks:W:S``      full-height blocks of W columns, fraction S pruned
``dense``               leave the layer as it is (also ``none``)
======================  =====================================================================

Other spellings of the fixed names (:data:`PATTERN_ALIASES`) are accepted too,
among them the registry names of :data:`s3sparse.patterns.PATTERNS` (``24``,
``48``, ``coupled24``, ``block16``); a pruned model's report records the
canonical name. :func:`pattern_names_table` is the table ``s3sparse prune
--help`` shows: every name with its meaning, and every alias.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

import torch
from torch import Tensor

from .. import patterns
from .errors import UsageError

__all__ = ["PatternChoice", "parse_pattern", "pattern_names_help", "pattern_names_table", "PATTERN_NAMES", "PATTERN_ALIASES"]

#: Every pattern name (or form of names) with its meaning, in the order the help lists them.
PATTERN_NAMES: Tuple[Tuple[str, str], ...] = (
    ("2:4", "keep 2 of every 4 adjacent weights of a row"),
    ("4:8", "the paper's 4:8: every 8 columns of a row keep 2 of their 4 column PAIRS (4 of 8 single weights: nm:4:8)"),
    ("N:M", "keep N of every M adjacent weights of a row, e.g. 1:4, 2:8 (4:8 excepted: see above)"),
    ("nm:N:M", "N of M adjacent single weights, always (nm:4:8 keeps 4 of every 8 weights)"),
    ("nm-blocks:N:M:B", "keep N of every M adjacent blocks of B columns (4:8 is nm-blocks:2:4:2)"),
    ("coupled-2:4", "columns j and j+8 of each 16-column tile pruned together, 2 of every 4 such pairs kept"),
    ("coupled-N:M", "the same with N of every M pairs"),
    ("block16-rows", "16-column blocks; rows p and p+8 of every 16 rows compete for each block, 1 of the 2 kept"),
    ("blockB-rowsR", "B-column blocks; rows p and p+R compete, 1 of the 2 kept (block16-rows is block16-rows8)"),
    ("channels:S", "whole output channels (rows): fraction S of them pruned per layer, e.g. channels:0.25"),
    ("columns:S", "whole input columns: fraction S of them pruned per layer"),
    ("col-blocks:W:S", "full-height blocks of W columns: fraction S of them pruned per layer"),
    ("dense", "leave the layer as it is"),
)

#: Other spellings of the fixed names -> the name they stand for (``_`` is read as ``-``, case is ignored).
PATTERN_ALIASES: Dict[str, str] = {
    "24": "2:4",
    "48": "4:8",
    "coupled24": "coupled-2:4",
    "coupled-24": "coupled-2:4",
    "coupled2:4": "coupled-2:4",
    "block16": "block16-rows",
    "block16-row-coupled": "block16-rows",
    "none": "dense",
}

_INT = r"(\d+)"
_NUM = r"([0-9]*\.?[0-9]+)"


@dataclass(frozen=True)
class PatternChoice:
    """A pattern picked by name: ``build(weight) -> (scope, nnz)``.

    Attributes:
        name: the name as given (canonical spelling for the report).
        constructor: a :mod:`s3sparse.patterns` constructor, ``None`` for ``dense``.
        kwargs: its keyword arguments.
    """

    name: str
    constructor: Callable[..., Tuple[Any, int]] | None
    kwargs: Dict[str, Any] = field(default_factory=dict)

    @property
    def is_dense(self) -> bool:
        """True for ``dense``: the layer is left unpruned."""
        return self.constructor is None

    def build(self, weight: Tensor) -> Tuple[Any, int]:
        """``(scope, nnz)`` of this pattern on the ``M × K`` ``weight`` (a ``SpecError`` if it cannot divide it)."""
        if self.constructor is None:
            raise ValueError("the dense pattern has no scope")
        return self.constructor(weight, **self.kwargs)

    def holds(self, weight: Tensor) -> bool:
        """Whether ``weight`` keeps at most ``nnz`` non-zero blocks in every scope of this pattern."""
        if self.constructor is None:
            return True
        with torch.no_grad():
            scope, nnz = self.build(weight.detach())
            return bool((scope.nnz_per_scope(weight.detach()) <= nnz).all())

    def __str__(self) -> str:
        return self.name


#: The names with fixed arguments: name -> (name, constructor, kwargs).
_FIXED: Dict[str, Tuple[str, Any, Dict[str, Any]]] = {
    "dense": ("dense", None, {}),
    "2:4": ("2:4", patterns.nm, {"n": 2, "m": 4}),
    "4:8": ("4:8", patterns.nm_blocks, {"n": 2, "m": 4, "block_cols": 2}),
    "coupled-2:4": ("coupled-2:4", patterns.coupled_nm, {"n": 2, "m": 4, "stride": 8}),
    "block16-rows": ("block16-rows", patterns.row_coupled_blocks, {"block_cols": 16, "rows_apart": 8, "keep": 1}),
}


def _fraction(text: str, name: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"pattern {name!r}: the pruned fraction must lie in [0, 1], got {value}")
    return value


def parse_pattern(name: str) -> PatternChoice:
    """The :class:`PatternChoice` called ``name`` (see the module docstring).

    Raises:
        UsageError: an unknown or malformed name (the message lists the known forms).
    """
    if isinstance(name, PatternChoice):
        return name
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"a pattern must be a name such as '2:4', got {name!r}")
    text = name.strip()
    key = text.lower().replace("_", "-")
    key = PATTERN_ALIASES.get(key, key)
    fixed = _FIXED.get(key)
    if fixed is not None:
        return PatternChoice(*fixed)
    match = re.fullmatch(rf"(?:nm:)?{_INT}:{_INT}", key)
    if match:
        n, m = int(match[1]), int(match[2])
        _check_n_of_m(name, n, m)
        return PatternChoice(f"nm:{n}:{m}" if key.startswith("nm:") else f"{n}:{m}", patterns.nm, {"n": n, "m": m})
    match = re.fullmatch(rf"nm-blocks:{_INT}:{_INT}:{_INT}", key)
    if match:
        n, m, b = (int(g) for g in match.groups())
        _check_n_of_m(name, n, m)
        if b < 1:
            raise UsageError(f"pattern {name!r}: the block width must be >= 1")
        return PatternChoice(f"nm-blocks:{n}:{m}:{b}", patterns.nm_blocks, {"n": n, "m": m, "block_cols": b})
    match = re.fullmatch(rf"coupled-?{_INT}:{_INT}", key)
    if match:
        n, m = int(match[1]), int(match[2])
        _check_n_of_m(name, n, m)
        return PatternChoice(f"coupled-{n}:{m}", patterns.coupled_nm, {"n": n, "m": m, "stride": 8})
    match = re.fullmatch(rf"block{_INT}-rows{_INT}?", key)
    if match:
        b, r = int(match[1]), int(match[2] or 8)
        if b < 1 or r < 1:
            raise UsageError(f"pattern {name!r}: block width and row distance must be >= 1")
        label = f"block{b}-rows" if r == 8 else f"block{b}-rows{r}"
        return PatternChoice(label, patterns.row_coupled_blocks, {"block_cols": b, "rows_apart": r, "keep": 1})
    match = re.fullmatch(rf"(channels|columns):{_NUM}", key)
    if match:
        constructor = patterns.channels if match[1] == "channels" else patterns.columns
        return PatternChoice(f"{match[1]}:{match[2]}", constructor, {"sparsity": _fraction(match[2], name)})
    match = re.fullmatch(rf"col-?blocks:{_INT}:{_NUM}", key)
    if match:
        width = int(match[1])
        if width < 1:
            raise UsageError(f"pattern {name!r}: the block width must be >= 1")
        return PatternChoice(
            f"col-blocks:{width}:{match[2]}", patterns.col_blocks, {"width": width, "sparsity": _fraction(match[2], name)}
        )
    raise UsageError(f"unknown pattern {name!r}; {pattern_names_help()}")


def _check_n_of_m(name: str, n: int, m: int) -> None:
    if m < 1 or n < 1 or n > m:
        raise UsageError(f"pattern {name!r}: need 1 <= N <= M in N:M, got N={n}, M={m}")


def pattern_names_help() -> str:
    """One line listing the pattern names (for error messages; the meanings are in :func:`pattern_names_table`)."""
    return "known patterns: " + ", ".join(name for name, _ in PATTERN_NAMES) + " (see `s3sparse prune --help`)"


def pattern_names_table() -> str:
    """Every pattern name with its meaning, one per line, then the aliases (the ``s3sparse prune --help`` epilog)."""
    width = max(len(name) for name, _ in PATTERN_NAMES)
    lines = ["patterns (--pattern, and SPEC in --override):"]
    lines += [f"  {name:<{width}}  {meaning}" for name, meaning in PATTERN_NAMES]
    aliases = ", ".join(f"{alias} = {name}" for alias, name in PATTERN_ALIASES.items())
    lines.append(f"  aliases (reported under the name they stand for): {aliases}")
    return "\n".join(lines)
