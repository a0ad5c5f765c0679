"""Tensor helpers shared by the specification classes.

Selection (:func:`kth_largest_value`, :func:`kth_largest_mask`, :func:`mid_kth_largest`)
runs on the compiled ``s3sparse.kth_largest`` op (:func:`s3sparse.ops.kth_largest`,
which returns the values and the mask along the last dim; these take any dim). The layout helpers describe the
*interleaved block layout* used throughout s3sparse: a tensor of shape
``(B0*b0, B1*b1, ...)`` cut into blocks of ``(b0, b1, ...)`` is seen as
``(B0, b0, B1, b1, ...)``; grid axes are the even dims, in-block axes the odd dims.
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .checks import check_int
from .errors import ArgumentTypeError, ShapeMismatchError, SpecError

__all__ = [
    "kth_largest_value",
    "kth_largest_mask",
    "mid_kth_largest",
    "inverse_permutation",
    "normalize_order",
    "interleave_unsqueeze",
    "interleaved_shape",
    "grid_dims",
    "block_dims",
    "reorder_permutation",
    "normalize_tile_shape",
    "broadcast_numbers",
]


def _as_index(value: object, name: str) -> int:
    return check_int(value, name)


# ---------------------------------------------------------------- selection
def kth_largest_mask(x: Tensor, k: int, dim: int = -1) -> tuple[Tensor, Tensor]:
    """The ``k``-th largest value along ``dim`` and a mask of the ``k`` largest.

    Exactly ``k`` entries are kept along ``dim`` (ties go to the lower index,
    NaN ranks below everything). ``k = 0`` gives ``+inf`` and an all-False mask.

    Args:
        x: a float tensor (other dtypes are compared as float64).
        k: how many to keep, in ``[0, x.shape[dim]]``.
        dim: the dim to select along.

    Returns:
        ``(values, keep)``: ``values`` has ``x``'s shape without ``dim`` (dtype of
        ``x``), ``keep`` is bool of ``x``'s shape.
    """
    k = _as_index(k, "k")
    if x.dim() == 0:
        raise SpecError("`x` must have at least one dim to select along, got a scalar")
    n = x.shape[dim]
    if not 0 <= k <= n:
        raise SpecError(f"`k` must be in [0, {n}] (the size of dim {dim} of `x`), got {k}")
    work = x if x.is_floating_point() else x.to(torch.float64)
    moved = work.movedim(dim, -1).contiguous()
    values, keep = ops.kth_largest(moved, k)
    return values.to(x.dtype), keep.movedim(-1, dim)


def kth_largest_value(x: Tensor, k: int, dim: int = -1) -> Tensor:
    """The ``k``-th largest value of ``x`` along ``dim`` (``+inf`` for ``k = 0``).

    Shape: ``x``'s shape without ``dim``. See :func:`kth_largest_mask`.
    """
    return kth_largest_mask(x, k, dim)[0]


def mid_kth_largest(x: Tensor, k: int, dim: int = -1, k_weight: float = 0.5) -> Tensor:
    """A threshold between the ``k``-th and the ``(k+1)``-th largest values along ``dim``.

    ``k_weight * kth + (1 - k_weight) * (k+1)th``. Entries ``>=`` the result are
    the ``k`` largest when values are distinct, which makes it a robust
    threshold for "keep ``k``". At the ends: ``k = 0`` gives ``+inf`` (keep
    nothing) and ``k = n`` gives the smallest value (keep everything).

    Args:
        x: a float tensor.
        k: in ``[0, x.shape[dim]]``.
        dim: the dim to select along.
        k_weight: weight of the ``k``-th value, in ``[0, 1]``.
    """
    k = _as_index(k, "k")
    if not 0.0 <= k_weight <= 1.0:
        raise SpecError(f"`k_weight` must be in [0, 1], got {k_weight}")
    if x.dim() == 0:
        raise SpecError("`x` must have at least one dim to select along, got a scalar")
    n = x.shape[dim]
    if not 0 <= k <= n:
        raise SpecError(f"`k` must be in [0, {n}] (the size of dim {dim} of `x`), got {k}")
    kth = kth_largest_value(x, k, dim)
    if k == 0 or k == n:
        return kth
    next_kth = kth_largest_value(x, k + 1, dim)
    return kth * k_weight + next_kth * (1.0 - k_weight)


# ---------------------------------------------------------------- permutations
def normalize_order(order: Optional[Sequence[int]], ndim: int, name: str = "order") -> tuple[int, ...]:
    """``order`` as a tuple of non-negative axes, checked to be a permutation of ``range(ndim)``.

    ``None`` means the identity. Negative axes count from the end.
    """
    if order is None:
        return tuple(range(ndim))
    try:
        axes = [_as_index(a, name) for a in order]
    except TypeError:
        raise ArgumentTypeError(f"`{name}` must be a sequence of ints, got {order!r}") from None
    normalized = tuple(a + ndim if a < 0 else a for a in axes)
    if sorted(normalized) != list(range(ndim)):
        raise SpecError(f"`{name}` must be a permutation of the {ndim} axes {tuple(range(ndim))}, got {tuple(order)}")
    return normalized


def inverse_permutation(perm: Sequence[int]) -> tuple[int, ...]:
    """The permutation ``inv`` with ``t.permute(perm).permute(inv) == t``."""
    perm = normalize_order(perm, len(perm), "perm")
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return tuple(inverse)


# ---------------------------------------------------------------- interleaved layout
def interleaved_shape(grid_shape: Sequence[int], block_shape: Sequence[int]) -> tuple[int, ...]:
    """``(B0, b0, B1, b1, ...)`` from the grid ``(B0, B1, ...)`` and the block ``(b0, b1, ...)``."""
    return tuple(s for pair in zip(grid_shape, block_shape) for s in pair)


def grid_dims(ndim: int) -> tuple[int, ...]:
    """The grid axes ``(0, 2, 4, ...)`` of an interleaved view of an ``ndim``-D tensor."""
    return tuple(range(0, 2 * ndim, 2))


def block_dims(ndim: int) -> tuple[int, ...]:
    """The in-block axes ``(1, 3, 5, ...)`` of an interleaved view of an ``ndim``-D tensor."""
    return tuple(range(1, 2 * ndim, 2))


def reorder_permutation(ndim: int) -> tuple[int, ...]:
    """The permutation of an interleaved view to ``(B0, B1, ..., b0, b1, ...)``."""
    return grid_dims(ndim) + block_dims(ndim)


def interleave_unsqueeze(t: Tensor) -> Tensor:
    """``(B0, B1, ...)`` to ``(B0, 1, B1, 1, ...)``, so it broadcasts over an interleaved view."""
    return t.reshape(interleaved_shape(t.shape, (1,) * t.dim()))


# ---------------------------------------------------------------- tile shapes
def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def normalize_tile_shape(
    full_shape: Sequence[int],
    tile_shape: Sequence[int],
    *,
    arg: str,
    of: str,
    missing: Literal["ones", "whole"],
) -> tuple[int, ...]:
    """Resolve a block (or scope) shape against the shape it tiles.

    ``-1`` spans the whole dim. When ``tile_shape`` is shorter than ``full_shape``:
    with ``missing='ones'`` only the empty shape is allowed and means all ones
    (block shapes); with ``missing='whole'`` the missing trailing dims span the
    whole dim (scope shapes). Every entry must divide its dim.

    Args:
        full_shape: the shape being tiled.
        tile_shape: the requested tile shape.
        arg: the argument's name, for error messages.
        of: what ``full_shape`` is (``"the view"``, ``"the block grid"``), for messages.
        missing: how to complete a short ``tile_shape``.

    Raises:
        SpecError: a wrong length, an entry that is not ``-1`` or positive, or
            one that does not divide its dim (the message lists the divisors).
    """
    full_shape = tuple(int(s) for s in full_shape)
    try:
        tile = [_as_index(b, arg) for b in tile_shape]
    except TypeError:
        raise ArgumentTypeError(f"`{arg}` must be a sequence of ints, got {tile_shape!r}") from None
    ndim = len(full_shape)
    if len(tile) > ndim:
        raise SpecError(f"`{arg}` {tuple(tile)} has {len(tile)} dims but {of} {full_shape} has {ndim}")
    if len(tile) < ndim:
        if missing == "ones" and len(tile) == 0:
            tile = [1] * ndim
        elif missing == "whole":
            tile = tile + [-1] * (ndim - len(tile))
        else:
            raise SpecError(
                f"`{arg}` {tuple(tile)} has {len(tile)} dims but {of} {full_shape} has {ndim} "
                "(give one entry per dim, -1 for a whole dim, or () for all ones)"
            )
    resolved = []
    for d, (size, b) in enumerate(zip(full_shape, tile)):
        if b == -1:
            b = max(size, 1)  # an empty dim is tiled by blocks of 1
        elif b <= 0:
            raise SpecError(f"`{arg}`[{d}] must be a positive int or -1 (the whole dim), got {b}")
        if size % b != 0:
            divisors = ", ".join(str(v) for v in _divisors(size)) if size > 0 else "any"
            raise SpecError(
                f"`{arg}`[{d}] = {b} does not divide dim {d} of {of} {full_shape} (size {size}); "
                f"sizes that divide it: {divisors} (or -1 for the whole dim)"
            )
        resolved.append(b)
    return tuple(resolved)


# ---------------------------------------------------------------- per-block / per-scope numbers
def broadcast_numbers(
    x: Union[Tensor, Number], grid_shape: Sequence[int], device: torch.device, *, arg: str, what: str
) -> Tensor:
    """A number, or a real tensor broadcasting to ``grid_shape``, as a ``grid_shape`` tensor on ``device``.

    Args:
        x: the per-block (or per-scope) numbers.
        grid_shape: the shape to broadcast to.
        device: where the result lives.
        arg: the argument's name, for error messages.
        what: what ``grid_shape`` is (``"the block grid"``), for error messages.
    """
    grid_shape = tuple(grid_shape)
    if isinstance(x, Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise ArgumentTypeError(f"`{arg}` must be a real number or tensor, got dtype {x.dtype}")
        try:
            shape = torch.broadcast_shapes(tuple(x.shape), grid_shape)
        except RuntimeError:
            shape = None
        if shape != grid_shape:
            raise ShapeMismatchError(f"{grid_shape} ({what}) or a shape broadcasting to it", tuple(x.shape), arg)
        return x.to(device).expand(grid_shape)
    if isinstance(x, bool) or not isinstance(x, Number):
        raise ArgumentTypeError(f"`{arg}` must be a number or a tensor, got {type(x).__name__}")
    return torch.full(grid_shape, float(x), device=device)
