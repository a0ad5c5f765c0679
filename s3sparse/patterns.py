"""Named sparsity patterns: a ScopeSpec and a budget without writing strides.

Every constructor takes the weight of an ``nn.Linear`` (an ``M × K`` Parameter or
tensor, ``M`` output rows, ``K`` input columns; an ``nn.Module`` with a
``.weight`` is accepted too) and returns ``(scope, nnz)``: the
:class:`~s3sparse.scope.ScopeSpec` describing the pattern and the number of
blocks to keep in every scope. Hand both to any pruner, e.g.::

    scope, nnz = patterns.coupled_nm(layer.weight)          # coupled 2:4
    StructuredOBS(scope, H).prune_true_obs(nnz=nnz)

or prune by magnitude with ``scope.hard_threshold(nnz=nnz)``.

The four patterns of the S3 paper (SPEC §2), ``W`` being ``M × K``:

=================  ==============================================  ===========  =========  ====
name               View (shape : strides)                          Block        Scope      keep
=================  ==============================================  ===========  =========  ====
``"24"``           W itself                                        (1, 1)       (1, 4)     2
``"48"``           W itself                                        (1, 2)       (1, 4)     2
``"coupled24"``    (M, K/16, 8, 2) : (K, 16, 1, 8)                 (1, 1, 1, 2) (1, 1, 4, 1) 2
``"block16"``      (M/16, 2, 8K) : (16K, 8K, 1)                    (1, 1, 16)   (1, 2, 1)  1
=================  ==============================================  ===========  =========  ====

Shapes that do not divide are refused with a :class:`~s3sparse.errors.SpecError`
(a ``ValueError``) saying which sizes would work.

Pattern names
-------------
This module is the one registry of pattern names, for recipes, the command line
(``s3sparse prune --pattern``), packing (``PackedWeight.from_pattern``) and
scripts. :func:`parse_pattern` turns a name into a :class:`PatternChoice`, which
builds ``(scope, nnz)`` on any ``nn.Linear`` weight and checks that a pruned
weight obeys it:

======================  =====================================================================
name                    pattern
======================  =====================================================================
``2:4``                 2:4 — keep 2 of every 4 adjacent weights of a row (:func:`nm`)
``4:8``                 the paper's 4:8 — keep 2 of every 4 adjacent column *pairs* (:func:`nm_blocks`)
``N:M``                 any other N:M over single weights, e.g. ``1:4``, ``2:8``
``nm:N:M``              N:M over single weights, always (``nm:4:8`` keeps 4 of 8 weights)
``nm-blocks:N:M:B``     keep N of M adjacent blocks of B columns
``coupled-2:4``         columns j and j+8 of each 16-column tile pruned together, 2 of 4 pairs kept
``coupled-N:M``         the same with N of M pairs
``block16-rows``        16-column blocks; rows p and p+8 of every 16 rows compete, 1 of 2 kept
``blockB-rowsR``        B-column blocks; rows p and p+R compete (:func:`row_coupled_blocks`)
``channels:S``          output channels (whole rows), fraction S pruned per layer
``columns:S``           input columns (whole columns), fraction S pruned per layer
``col-blocks:W:S``      full-height blocks of W columns, fraction S pruned
``dense``               leave the layer as it is (also ``none``)
======================  =====================================================================

Other spellings of the fixed names (:data:`PATTERN_ALIASES`) are accepted too,
among them the reference scripts' names of the paper's four patterns (``24``,
``48``, ``coupled24``, ``block16``); a pruned model's report records the
canonical name. :func:`pattern_names_table` is the table ``s3sparse prune
--help`` shows. :data:`PATTERNS` holds the paper's four under the reference
scripts' names, and :func:`by_name` builds one of them (overriding its arguments
if asked); unlike :func:`parse_pattern` it knows only those four.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .block import BlockSpec
from .checks import check_int
from .errors import ArgumentTypeError, SpecError, UnknownNameError, UsageError
from .scope import ScopeSpec
from .view import View

__all__ = [
    "nm",
    "nm_blocks",
    "coupled_nm",
    "row_coupled_blocks",
    "channels",
    "columns",
    "col_blocks",
    "sparsity_to_keep",
    "PatternChoice",
    "NamedPattern",
    "parse_pattern",
    "pattern_names_help",
    "pattern_names_table",
    "PATTERN_NAMES",
    "PATTERN_ALIASES",
    "PATTERNS",
    "by_name",
]

WeightLike = Union[Tensor, nn.Module]
Pattern = Tuple[ScopeSpec, int]


# ------------------------------------------------------------------ helpers
def _weight(weight: WeightLike, pattern: str) -> Tensor:
    """The 2-D weight tensor of ``weight`` (a tensor or a module with ``.weight``)."""
    if isinstance(weight, nn.Module):
        if not isinstance(getattr(weight, "weight", None), Tensor):
            raise ArgumentTypeError(f"{pattern}: module {type(weight).__name__} has no `.weight` tensor")
        weight = weight.weight
    if not isinstance(weight, Tensor):
        raise ArgumentTypeError(f"{pattern}: `weight` must be a tensor (M, K) or a module with `.weight`, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise SpecError(
            f"{pattern}: `weight` must be 2-D (M output rows × K input columns, an nn.Linear.weight), "
            f"got shape {tuple(weight.shape)}"
        )
    return weight


def _positive(pattern: str, **kwargs: int) -> None:
    for name, value in kwargs.items():
        try:
            number = check_int(value, name)  # the one int check: 2.0 and True are refused everywhere
        except ArgumentTypeError as err:
            raise ArgumentTypeError(f"{pattern}: {err}") from None
        if number < 1:
            raise SpecError(f"{pattern}: `{name}` must be a positive int, got {value!r}")


def _check_multiple(pattern: str, what: str, size: int, unit: int, why: str, instead: str) -> None:
    """Raise ``ValueError('K=100 is not a multiple of 16 (…); use … or …')`` unless ``unit | size``."""
    if size % unit != 0:
        raise SpecError(
            f"{pattern}: {what}={size} is not a multiple of {unit} ({why}); "
            f"use {what} a multiple of {unit}{' or ' + instead if instead else ''}"
        )


def sparsity_to_keep(sparsity: float, total: int, pattern: str = "sparsity_to_keep") -> int:
    """Blocks to keep out of ``total`` at ``sparsity``: ``floor((1 − sparsity)·total + ½)``.

    The nearest integer (halves round up, i.e. towards keeping), so
    ``sparsity=0.5`` of 5 blocks keeps 3. ``sparsity`` must lie in ``[0, 1]``.
    """
    if not isinstance(sparsity, (int, float)) or isinstance(sparsity, bool) or not 0.0 <= float(sparsity) <= 1.0:
        raise SpecError(f"{pattern}: `sparsity` must be a number in [0, 1], got {sparsity!r}")
    keep = math.floor((1.0 - float(sparsity)) * total + 0.5 + 1e-9)
    return max(0, min(total, keep))


# ------------------------------------------------------------------ N:M family
def nm(weight: WeightLike, n: int = 2, m: int = 4) -> Pattern:
    """N:M sparsity along rows: keep ``n`` of every ``m`` consecutive weights of a row.

    Block ``(1, 1)`` (single weights), scope ``(1, m)`` (``m`` adjacent input
    columns of one output row). ``nm(w)`` is 2:4.

    Args:
        weight: ``M × K`` weight; ``K`` must be a multiple of ``m``.
        n: weights kept per group, ``1 ≤ n ≤ m`` (``n = m`` keeps everything).
        m: group length.

    Returns:
        ``(scope, n)``.
    """
    pattern = f"nm({n}:{m})"
    w = _weight(weight, pattern)
    _positive(pattern, n=n, m=m)
    if n > m:
        raise SpecError(f"{pattern}: cannot keep n={n} of m={m} weights; need n <= m")
    M, K = w.shape
    _check_multiple(pattern, "K", K, m, f"{n}:{m} groups {m} adjacent columns", "pad the input dimension")
    block = BlockSpec(w, (1, 1), name=f"{n}:{m}.block")
    return ScopeSpec(block, (1, m), name=f"{n}:{m}"), n


def nm_blocks(weight: WeightLike, n: int = 2, m: int = 4, block_cols: int = 2) -> Pattern:
    """N:M over column blocks: keep ``n`` of every ``m`` adjacent blocks of ``block_cols`` columns.

    Block ``(1, block_cols)`` (``block_cols`` adjacent weights of one row, kept or
    pruned together), scope ``(1, m)`` blocks. ``n`` and ``m`` count *blocks*; in
    weights this is ``(n·block_cols):(m·block_cols)``. The paper's **4:8**
    (keep 2 of 4 column pairs in every 8 columns) is ``nm_blocks(w, 2, 4, 2)``,
    the default.

    Args:
        weight: ``M × K`` weight; ``K`` must be a multiple of ``m·block_cols``.
        n: blocks kept per scope, ``1 ≤ n ≤ m``.
        m: blocks per scope.
        block_cols: columns per block.

    Returns:
        ``(scope, n)``.
    """
    label = f"{n * block_cols}:{m * block_cols}" if isinstance(block_cols, int) else "?"
    pattern = f"nm_blocks({label})"
    w = _weight(weight, pattern)
    _positive(pattern, n=n, m=m, block_cols=block_cols)
    if n > m:
        raise SpecError(f"{pattern}: cannot keep n={n} of m={m} blocks; need n <= m")
    M, K = w.shape
    span = m * block_cols
    _check_multiple(
        pattern, "K", K, span, f"{label} groups {m} blocks of {block_cols} adjacent columns", f"m·block_cols dividing {K}"
    )
    block = BlockSpec(w, (1, block_cols), name=f"{label}.block")
    return ScopeSpec(block, (1, m), name=label), n


def coupled_nm(weight: WeightLike, n: int = 2, m: int = 4, stride: int = 8) -> Pattern:
    """Coupled N:M: columns ``j`` and ``j + stride`` form one block; keep ``n`` of ``m`` such pairs.

    The input columns are cut into tiles of ``2·stride``; in each tile and row,
    column ``j`` (``j < stride``) is paired with column ``j + stride`` and the two
    are kept or pruned together; the ``stride`` pairs of a tile form
    ``stride/m`` scopes of ``m`` consecutive pairs (``j`` in ``[0, m)``,
    ``[m, 2m)``, …), each keeping ``n`` pairs. The default is the paper's
    coupled 2:4 (tiles of 16 columns, pairs ``(j, j+8)``, scopes of 4 pairs)::

        View  (M, K/(2·stride), stride, 2) : (K, 2·stride, 1, stride)
        Block (1, 1, 1, 2)     Scope (1, 1, m, 1)     keep n

    Args:
        weight: ``M × K`` weight; ``K`` must be a multiple of ``2·stride``.
        n: pairs kept per scope, ``1 ≤ n ≤ m``.
        m: pairs per scope; must divide ``stride``.
        stride: distance between the two columns of a pair.

    Returns:
        ``(scope, n)``.
    """
    pattern = f"coupled_nm({n}:{m}, stride={stride})"
    w = _weight(weight, pattern)
    _positive(pattern, n=n, m=m, stride=stride)
    if n > m:
        raise SpecError(f"{pattern}: cannot keep n={n} of m={m} pairs; need n <= m")
    if stride % m != 0:
        raise SpecError(
            f"{pattern}: stride={stride} is not a multiple of m={m} (each {2 * stride}-column tile holds "
            f"{stride} pairs cut into scopes of {m}); use a stride that m divides"
        )
    M, K = w.shape
    tile = 2 * stride
    _check_multiple(
        pattern, "K", K, tile, f"coupled {n}:{m} tiles {tile} columns", f"nm(weight, {n}, {m})"
    )
    rs, cs = w.stride()
    view = View(w, (M, K // tile, stride, 2), (rs, tile * cs, cs, stride * cs))
    label = f"coupled{n}:{m}" + ("" if stride == 8 else f"/{stride}")
    block = BlockSpec(view, (1, 1, 1, 2), name=f"{label}.block")
    return ScopeSpec(block, (1, 1, m, 1), name=label), n


def row_coupled_blocks(weight: WeightLike, block_cols: int = 16, rows_apart: int = 8, keep: int = 1) -> Pattern:
    """Row-coupled column blocks: rows ``p`` and ``p + rows_apart`` compete for each block.

    Rows are grouped by ``2·rows_apart``; in each group, row ``p`` (the first
    ``rows_apart`` rows) and row ``p + rows_apart`` compete block by block: for
    every run of ``block_cols`` adjacent columns, ``keep`` of the two row
    segments survive (``keep=1``: exactly one of the two). The default is the
    paper's 16-column pattern with 8-row coupling::

        View  (M/(2·rows_apart), 2, rows_apart·K) : (2·rows_apart·K, rows_apart·K, 1)
        Block (1, 1, block_cols)     Scope (1, 2, 1)     keep

    The view flattens ``rows_apart`` rows into one dimension, so the weight must
    be contiguous (every ``nn.Linear.weight`` is).

    Args:
        weight: contiguous ``M × K`` weight; ``M`` a multiple of ``2·rows_apart``,
            ``K`` a multiple of ``block_cols``.
        block_cols: columns per block.
        rows_apart: distance between the two competing rows.
        keep: blocks kept per scope of 2 (0, 1 or 2).

    Returns:
        ``(scope, keep)``.
    """
    pattern = f"row_coupled_blocks(block_cols={block_cols}, rows_apart={rows_apart})"
    w = _weight(weight, pattern)
    _positive(pattern, block_cols=block_cols, rows_apart=rows_apart)
    if not isinstance(keep, int) or isinstance(keep, bool) or not 0 <= keep <= 2:
        raise SpecError(f"{pattern}: `keep` must be 0, 1 or 2 (a scope holds 2 blocks), got {keep!r}")
    M, K = w.shape
    group = 2 * rows_apart
    _check_multiple(
        pattern, "M", M, group, f"rows p and p+{rows_apart} pair up in groups of {group} rows",
        f"row_coupled_blocks(..., rows_apart=r) with 2r dividing {M}",
    )
    _check_multiple(
        pattern, "K", K, block_cols, f"blocks are {block_cols} columns wide",
        f"row_coupled_blocks(..., block_cols=b) with b dividing {K}",
    )
    if not w.is_contiguous():
        raise SpecError(
            f"{pattern}: `weight` must be contiguous (the view flattens {rows_apart} rows into one dimension), "
            f"got strides {tuple(w.stride())}; pass weight.contiguous() or the Parameter itself"
        )
    view = View(w, (M // group, 2, rows_apart * K), (group * K, rows_apart * K, 1))
    label = f"block{block_cols}/rows{rows_apart}"
    block = BlockSpec(view, (1, 1, block_cols), name=f"{label}.block")
    return ScopeSpec(block, (1, 2, 1), name=label), keep


# ------------------------------------------------------------------ whole rows / columns
def _one_scope(w: Tensor, block_shape: tuple[int, int], total: int, sparsity: float, name: str) -> Pattern:
    """Blocks of ``block_shape`` all competing in one scope over the whole matrix."""
    keep = sparsity_to_keep(sparsity, total, name)
    return ScopeSpec(BlockSpec(w, block_shape, name=f"{name}.block"), (-1, -1), name=name), keep


def channels(weight: WeightLike, sparsity: float = 0.5) -> Pattern:
    """Output-channel pruning: whole rows are blocks; all ``M`` rows compete in one scope.

    Block ``(1, -1)``, scope ``(-1, -1)`` (the whole ``M × 1`` block grid); keeps
    ``sparsity_to_keep(sparsity, M)`` rows.

    Returns:
        ``(scope, rows kept)``.
    """
    w = _weight(weight, "channels")
    return _one_scope(w, (1, -1), w.shape[0], sparsity, "channels")


def columns(weight: WeightLike, sparsity: float = 0.5) -> Pattern:
    """Input-column pruning: whole columns are blocks; all ``K`` columns compete in one scope.

    Block ``(-1, 1)``, scope ``(-1, -1)`` (the whole ``1 × K`` block grid); keeps
    ``sparsity_to_keep(sparsity, K)`` columns.

    Returns:
        ``(scope, columns kept)``.
    """
    w = _weight(weight, "columns")
    return _one_scope(w, (-1, 1), w.shape[1], sparsity, "columns")


def col_blocks(weight: WeightLike, width: int, sparsity: float = 0.5) -> Pattern:
    """Column-block pruning: full-height blocks of ``width`` adjacent input columns.

    Block ``(-1, width)`` (all ``M`` rows × ``width`` columns), scope
    ``(-1, -1)``: all ``K/width`` blocks of the matrix compete in one scope;
    keeps ``sparsity_to_keep(sparsity, K/width)`` of them. ``width=1`` is
    :func:`columns`.

    Args:
        weight: ``M × K`` weight; ``K`` a multiple of ``width``.
        width: columns per block.
        sparsity: fraction of blocks to prune.

    Returns:
        ``(scope, blocks kept)``.
    """
    pattern = f"col_blocks(width={width})"
    w = _weight(weight, pattern)
    _positive(pattern, width=width)
    _, K = w.shape
    _check_multiple(pattern, "K", K, width, f"blocks are {width} columns wide", f"col_blocks(..., width=b) with b dividing {K}")
    return _one_scope(w, (-1, width), K // width, sparsity, pattern)


# ------------------------------------------------------------------ names
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

_MEANING: Dict[str, str] = dict(PATTERN_NAMES)


@dataclass(frozen=True)
class PatternChoice:
    """A pattern picked by name: ``build(weight) -> (scope, nnz)``.

    Attributes:
        name: the name as given (canonical spelling for the report).
        constructor: a constructor of this module, ``None`` for ``dense``.
        kwargs: its keyword arguments.
        description: what the pattern is, one line.
    """

    name: str
    constructor: Optional[Callable[..., Pattern]]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    description: str = field(default="", compare=False)

    @property
    def is_dense(self) -> bool:
        """True for ``dense``: the layer is left unpruned."""
        return self.constructor is None

    def build(self, weight: WeightLike, **overrides: Any) -> Pattern:
        """``(scope, nnz)`` of this pattern on the ``M × K`` ``weight`` (a ``SpecError`` if it cannot divide it).

        ``overrides`` replace the registered keyword arguments (e.g. ``stride=4``).
        """
        if self.constructor is None:
            raise ValueError("the dense pattern has no scope")
        return self.constructor(weight, **{**self.kwargs, **overrides})

    __call__ = build

    def holds(self, weight: Tensor) -> bool:
        """Whether ``weight`` keeps at most ``nnz`` non-zero blocks in every scope of this pattern."""
        if self.constructor is None:
            return True
        with torch.no_grad():
            scope, nnz = self.build(weight.detach())
            return bool((scope.nnz_per_scope(weight.detach()) <= nnz).all())

    def __str__(self) -> str:
        return self.name


#: The name :data:`PATTERNS` gave a registered pattern before; the same class.
NamedPattern = PatternChoice


def _fixed(name: str, constructor: Optional[Callable[..., Pattern]], **kwargs: Any) -> PatternChoice:
    return PatternChoice(name, constructor, kwargs, _MEANING[name])


#: The names with fixed arguments: canonical name -> its PatternChoice.
_FIXED: Dict[str, PatternChoice] = {
    "dense": _fixed("dense", None),
    "2:4": _fixed("2:4", nm, n=2, m=4),
    "4:8": _fixed("4:8", nm_blocks, n=2, m=4, block_cols=2),
    "coupled-2:4": _fixed("coupled-2:4", coupled_nm, n=2, m=4, stride=8),
    "block16-rows": _fixed("block16-rows", row_coupled_blocks, block_cols=16, rows_apart=8, keep=1),
}

_INT = r"(\d+)"
_NUM = r"([0-9]*\.?[0-9]+)"


def _canonical(name: str) -> str:
    """``name`` in the registry's spelling: trimmed, lower case, ``_`` read as ``-``, aliases resolved."""
    key = name.strip().lower().replace("_", "-")
    return PATTERN_ALIASES.get(key, key)


def _fraction(text: str, name: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"pattern {name!r}: the pruned fraction must lie in [0, 1], got {value}")
    return value


def _check_n_of_m(name: str, n: int, m: int) -> None:
    if m < 1 or n < 1 or n > m:
        raise UsageError(f"pattern {name!r}: need 1 <= N <= M in N:M, got N={n}, M={m}")


def _parse_n_of_m(key: str, name: str) -> Optional[PatternChoice]:
    """The N:M forms: ``N:M``, ``nm:N:M``, ``nm-blocks:N:M:B``, ``coupled-N:M``; None for other names."""
    match = re.fullmatch(rf"(?:nm:)?{_INT}:{_INT}", key)
    if match:
        n, m = int(match[1]), int(match[2])
        _check_n_of_m(name, n, m)
        form = "nm:N:M" if key.startswith("nm:") else "N:M"
        label = f"nm:{n}:{m}" if key.startswith("nm:") else f"{n}:{m}"
        return PatternChoice(label, nm, {"n": n, "m": m}, _MEANING[form])
    match = re.fullmatch(rf"nm-blocks:{_INT}:{_INT}:{_INT}", key)
    if match:
        n, m, b = (int(g) for g in match.groups())
        _check_n_of_m(name, n, m)
        if b < 1:
            raise UsageError(f"pattern {name!r}: the block width must be >= 1")
        kwargs = {"n": n, "m": m, "block_cols": b}
        return PatternChoice(f"nm-blocks:{n}:{m}:{b}", nm_blocks, kwargs, _MEANING["nm-blocks:N:M:B"])
    match = re.fullmatch(rf"coupled-?{_INT}:{_INT}", key)
    if match:
        n, m = int(match[1]), int(match[2])
        _check_n_of_m(name, n, m)
        return PatternChoice(f"coupled-{n}:{m}", coupled_nm, {"n": n, "m": m, "stride": 8}, _MEANING["coupled-N:M"])
    return None


def _parse_whole(key: str, name: str) -> Optional[PatternChoice]:
    """The forms with a width or fraction: ``blockB-rowsR``, ``channels:S``, ``columns:S``, ``col-blocks:W:S``."""
    match = re.fullmatch(rf"block{_INT}-rows{_INT}?", key)
    if match:
        b, r = int(match[1]), int(match[2] or 8)
        if b < 1 or r < 1:
            raise UsageError(f"pattern {name!r}: block width and row distance must be >= 1")
        label = f"block{b}-rows" if r == 8 else f"block{b}-rows{r}"
        kwargs = {"block_cols": b, "rows_apart": r, "keep": 1}
        return PatternChoice(label, row_coupled_blocks, kwargs, _MEANING["blockB-rowsR"])
    match = re.fullmatch(rf"(channels|columns):{_NUM}", key)
    if match:
        constructor = channels if match[1] == "channels" else columns
        kwargs = {"sparsity": _fraction(match[2], name)}
        return PatternChoice(f"{match[1]}:{match[2]}", constructor, kwargs, _MEANING[f"{match[1]}:S"])
    match = re.fullmatch(rf"col-?blocks:{_INT}:{_NUM}", key)
    if match:
        width = int(match[1])
        if width < 1:
            raise UsageError(f"pattern {name!r}: the block width must be >= 1")
        kwargs = {"width": width, "sparsity": _fraction(match[2], name)}
        return PatternChoice(f"col-blocks:{width}:{match[2]}", col_blocks, kwargs, _MEANING["col-blocks:W:S"])
    return None


def parse_pattern(name: Union[str, PatternChoice]) -> PatternChoice:
    """The :class:`PatternChoice` called ``name``: any name of :data:`PATTERN_NAMES` or :data:`PATTERN_ALIASES`.

    Raises:
        UsageError: an unknown or malformed name (the message lists the known forms).
    """
    if isinstance(name, PatternChoice):
        return name
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"a pattern must be a name such as '2:4', got {name!r}")
    key = _canonical(name)
    fixed = _FIXED.get(key)
    if fixed is not None:
        return fixed
    choice = _parse_n_of_m(key, name) or _parse_whole(key, name)
    if choice is None:
        raise UsageError(f"unknown pattern {name!r}; {pattern_names_help()}")
    return choice


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


# ------------------------------------------------------------------ the paper's four, by the reference scripts' names
_PAPER_NAMES: Dict[str, str] = {"24": "2:4", "48": "4:8", "coupled24": "coupled-2:4", "block16": "block16-rows"}

PATTERNS: Dict[str, PatternChoice] = {
    short: PatternChoice(short, _FIXED[name].constructor, _FIXED[name].kwargs, f"{name} — {_MEANING[name]}")
    for short, name in _PAPER_NAMES.items()
}
"""The four patterns of the S3 paper under the reference scripts' names (the same as :func:`parse_pattern`'s
``2:4``, ``4:8``, ``coupled-2:4`` and ``block16-rows``)."""


def by_name(name: str, weight: WeightLike, **overrides: Any) -> Pattern:
    """``(scope, nnz)`` of the registered pattern ``name`` on ``weight``.

    ``name`` is one of ``PATTERNS`` (``"24"``, ``"48"``, ``"coupled24"``,
    ``"block16"``) or another spelling of one of them (``"2:4"``, ``"4:8"``,
    ``"coupled2:4"``, ``"block16-rows"``, … : any name :func:`parse_pattern`
    reads as one of the four); ``overrides`` replace the registered keyword
    arguments (e.g. ``by_name("coupled24", w, stride=4)``).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    key = name if name in PATTERNS else None
    if key is None and isinstance(name, str):
        canonical = _canonical(name)
        key = next((short for short, full in _PAPER_NAMES.items() if full == canonical), None)
    if key is None:
        spellings = [*PATTERNS, *_PAPER_NAMES.values()]
        spellings += [alias for alias, full in PATTERN_ALIASES.items() if full in _PAPER_NAMES.values()]
        known = ", ".join(dict.fromkeys(repr(k) for k in spellings))
        raise UnknownNameError(f"unknown pattern {name!r}; known patterns: {known}")
    return PATTERNS[key](weight, **overrides)
