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

:func:`by_name` builds them from those names (the names of the reference
scripts' ``--pattern`` flag). Shapes that do not divide are refused with a
:class:`~s3sparse.errors.SpecError` (a ``ValueError``) saying which sizes would work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple, Union

from torch import Tensor, nn

from .block import BlockSpec
from .checks import check_int
from .errors import ArgumentTypeError, SpecError, UnknownNameError
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
    "NamedPattern",
    "PATTERNS",
    "by_name",
    "sparsity_to_keep",
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


# ------------------------------------------------------------------ registry
@dataclass(frozen=True)
class NamedPattern:
    """A registered pattern: ``constructor(weight, **kwargs)`` with a one-line description."""

    name: str
    constructor: Callable[..., Pattern]
    kwargs: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def __call__(self, weight: WeightLike, **overrides: Any) -> Pattern:
        """Build ``(scope, nnz)`` on ``weight``; ``overrides`` replace registered kwargs."""
        return self.constructor(weight, **{**self.kwargs, **overrides})


PATTERNS: Dict[str, NamedPattern] = {
    "24": NamedPattern("24", nm, {"n": 2, "m": 4}, "2:4 — keep 2 of every 4 adjacent weights of a row"),
    "48": NamedPattern(
        "48", nm_blocks, {"n": 2, "m": 4, "block_cols": 2}, "4:8 — keep 2 of every 4 adjacent column pairs of a row"
    ),
    "coupled24": NamedPattern(
        "coupled24",
        coupled_nm,
        {"n": 2, "m": 4, "stride": 8},
        "coupled 2:4 — columns j and j+8 of each 16-column tile pruned together, 2 of 4 pairs kept",
    ),
    "block16": NamedPattern(
        "block16",
        row_coupled_blocks,
        {"block_cols": 16, "rows_apart": 8, "keep": 1},
        "16-column blocks; rows p and p+8 of each 16-row group compete, 1 of 2 kept",
    ),
}
"""The four patterns of the S3 paper under the reference scripts' names."""

_ALIASES: Dict[str, str] = {
    "2:4": "24",
    "4:8": "48",
    "coupled2:4": "coupled24",
    "coupled_2:4": "coupled24",
    "coupled_24": "coupled24",
    "block16_row_coupled": "block16",
}


def by_name(name: str, weight: WeightLike, **overrides: Any) -> Pattern:
    """``(scope, nnz)`` of the registered pattern ``name`` on ``weight``.

    ``name`` is one of ``PATTERNS`` (``"24"``, ``"48"``, ``"coupled24"``,
    ``"block16"``) or an alias (``"2:4"``, ``"4:8"``, ``"coupled2:4"``, …);
    ``overrides`` replace the registered keyword arguments (e.g.
    ``by_name("coupled24", w, stride=4)``).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    key = _ALIASES.get(name, name)
    if key not in PATTERNS:
        known = ", ".join(repr(k) for k in [*PATTERNS, *_ALIASES])
        raise UnknownNameError(f"unknown pattern {name!r}; known patterns: {known}")
    return PATTERNS[key](weight, **overrides)
