"""View: a zero-copy strided window on a parameter, and the strided block ops on it.

A :class:`View` is ``torch.as_strided(param, shape, stride, offset)`` kept as a
description: the strides are *storage* strides (as in :func:`torch.as_strided`)
and ``offset`` counts elements from the parameter's first element. The view is
checked once, when built: it must stay inside the parameter and no two of its
indices may reach the same element, so in-place writes through it are well
defined.

The module also holds the two primitives every block statistic and block
mutation of s3sparse goes through, :func:`reduce_blocks` and
:func:`scale_blocks_`. They run the compiled ``s3sparse.block_reduce`` /
``s3sparse.block_scale_`` ops directly on the storage of a strided tensor, so a
strided view is never copied, and fall back to plain torch only where the ops
cannot serve: more than 8 dims, a non-float dtype, or a reduction that must be
differentiable.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from . import ops
from .checks import check_int
from .dtypes import opmath_dtype
from .errors import ArgumentIndexError, ArgumentTypeError, ShapeMismatchError, SpecError
from .tensor_ops import (
    block_dims,
    interleave_unsqueeze,
    interleaved_shape,
    normalize_tile_shape,
    reorder_permutation,
)

__all__ = ["View", "reduce_blocks", "scale_blocks_"]

#: Views with more dims than this are handled by plain torch (the ops' limit).
MAX_OP_DIMS = 8
_OP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("norm", "min", "max", "sum")


# ---------------------------------------------------------------- strided block primitives
def _storage_alias(t: Tensor) -> Tensor:
    """A 1-D contiguous tensor over the whole storage of ``t`` (no copy)."""
    numel = t.untyped_storage().nbytes() // t.element_size()
    return torch.as_strided(t.detach(), (numel,), (1,), 0)


def _grid_of(t: Tensor, block_shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(s // b for s, b in zip(t.shape, block_shape))


def reduce_blocks(t: Tensor, block_shape: Sequence[int], reduce: str = "norm", p: float = 2.0) -> Tensor:
    """One statistic per block of ``t`` (any strides), as a grid-shaped tensor.

    Runs ``s3sparse.ops.block_reduce`` on ``t``'s storage with ``t``'s own
    (shape, stride, offset), so a strided ``t`` is not copied. Plain torch is
    used instead for more than 8 dims, non-float dtypes (computed in the default
    float dtype), or when ``t`` requires grad and grad mode is on (the result
    is then differentiable).

    Args:
        t: the tensor to cut into blocks; each dim a multiple of ``block_shape``.
        block_shape: the block, one positive entry per dim of ``t``.
        reduce: ``'norm'``, ``'min'``, ``'max'`` or ``'sum'``.
        p: the norm order for ``reduce='norm'`` (``> 0`` or ``inf``).

    Returns:
        A tensor of the grid shape ``t.shape[d] // block_shape[d]``, dtype of ``t``.
    """
    if reduce not in _REDUCTIONS:
        raise SpecError(f"`reduce` must be one of {_REDUCTIONS}, got {reduce!r}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ArgumentTypeError(f"`p` must be a real number > 0 (or inf), got {type(p).__name__} {p!r}")
    if reduce == "norm" and not p > 0:
        raise SpecError(f"`p` must be > 0 (or inf), got {p}")
    if not (t.is_floating_point() or t.is_complex()):
        t = t.to(torch.get_default_dtype())
    needs_grad = torch.is_grad_enabled() and t.requires_grad
    if t.dtype in _OP_DTYPES and t.dim() <= MAX_OP_DIMS and not needs_grad:
        return ops.block_reduce(
            _storage_alias(t), t.shape, t.stride(), t.storage_offset(), block_shape, reduce, float(p)
        )
    grid = _grid_of(t, block_shape)
    if t.dim() == 0:  # a single one-element block
        interleaved, dims = t.reshape(1), (0,)
    else:
        interleaved, dims = t.view(interleaved_shape(grid, block_shape)), block_dims(t.dim())
    if reduce == "norm":
        acc = opmath_dtype(t.dtype) if t.is_floating_point() else None
        out = torch.linalg.vector_norm(interleaved, ord=p, dim=dims, dtype=acc)
    elif reduce == "min":
        out = interleaved.amin(dim=dims)
    elif reduce == "max":
        out = interleaved.amax(dim=dims)
    else:
        out = interleaved.sum(dim=dims)
    return out.reshape(grid).to(t.dtype)


@torch.no_grad()
def scale_blocks_(t: Tensor, block_shape: Sequence[int], factors: Tensor) -> None:
    """Multiply every block of ``t`` (any strides) by its factor, in place.

    ``factors`` has the grid shape; float factors multiply, bool factors keep
    (True) or zero (False). A zero factor writes an exact zero, even over inf or
    NaN. ``t``'s elements must not overlap (a :class:`View` guarantees it).
    Runs ``s3sparse.ops.block_scale_`` on ``t``'s storage; plain torch only for
    more than 8 dims or a dtype the op does not take.
    """
    grid = _grid_of(t, block_shape)
    if tuple(factors.shape) != grid:
        raise ShapeMismatchError(grid, tuple(factors.shape), "factors")
    factors = factors.to(t.device)
    if t.dtype in _OP_DTYPES and t.dim() <= MAX_OP_DIMS:
        ops.block_scale_(_storage_alias(t), t.shape, t.stride(), t.storage_offset(), block_shape, factors)
        return
    target, block = t.detach(), tuple(block_shape)
    if target.dim() == 0:  # a single one-element block
        target, block, factors = target.reshape(1), (1,), factors.reshape(1)
    interleaved = target.view(interleaved_shape(_grid_of(target, block), block))
    acc = opmath_dtype(t.dtype) if t.is_floating_point() else torch.float64
    spread = interleave_unsqueeze(factors.to(acc))
    zero = spread == 0
    interleaved.copy_((interleaved.to(acc) * spread).to(t.dtype))
    interleaved.masked_fill_(zero, 0)


# ---------------------------------------------------------------- View
def _as_int_tuple(values: Sequence[int], name: str) -> tuple[int, ...]:
    try:
        items = tuple(values)
    except TypeError:
        raise ArgumentTypeError(f"`{name}` must be a sequence of ints, got {values!r}") from None
    try:
        return tuple(check_int(v, name) for v in items)
    except ArgumentTypeError:
        raise ArgumentTypeError(f"`{name}` must be a sequence of ints, got {values!r}") from None


def _same_layout(shape: Sequence[int], stride_a: Sequence[int], stride_b: Sequence[int]) -> bool:
    """Whether two tensors of ``shape`` place every element at the same relative offset."""
    return all(s <= 1 or a == b for s, a, b in zip(shape, stride_a, stride_b))


def _is_dense(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether a layout's offsets are exactly ``0 .. numel-1`` (contiguous up to a permutation)."""
    expected = 1
    for size, step in sorted(((s, st) for s, st in zip(shape, stride) if s > 1), key=lambda x: x[1]):
        if step != expected:
            return False
        expected *= size
    return True


class View:
    """A zero-copy strided view of a parameter: ``torch.as_strided(param, shape, stride, offset)``.

    Args:
        param: the tensor (usually an ``nn.Parameter``) to view.
        shape: the view's shape.
        stride: the view's strides, in storage elements (non-negative).
        offset: elements from ``param``'s first element to the view's first.

    Raises:
        SpecError: ``shape`` and ``stride`` of different lengths, a negative
            size, stride or offset, a view that reaches outside the parameter,
            or one whose elements overlap (two indices, one element).

    Attributes:
        param: the viewed tensor.
        shape: the view's shape (tuple).
        stride: the view's strides (tuple).
        offset: the view's offset (int).
    """

    def __init__(self, param: Tensor, shape: Sequence[int], stride: Sequence[int], offset: int = 0) -> None:
        if not isinstance(param, Tensor):
            raise ArgumentTypeError(f"`param` must be a torch.Tensor or Parameter, got {type(param).__name__}")
        shape = _as_int_tuple(shape, "shape")
        stride = _as_int_tuple(stride, "stride")
        try:
            if isinstance(offset, bool):
                raise TypeError
            offset = operator.index(offset)
        except TypeError:
            raise ArgumentTypeError(f"`offset` must be an int, got {offset!r}") from None
        if len(shape) != len(stride):
            raise SpecError(
                f"`stride` must have one entry per dim of `shape` {shape}, got {len(stride)} entries {stride}"
            )
        if any(s < 0 for s in shape):
            raise SpecError(f"`shape` must be non-negative, got {shape}")
        if any(s < 0 for s in stride):
            raise SpecError(f"`stride` must be non-negative (torch has no negative strides), got {stride}")
        if offset < 0:
            raise SpecError(f"`offset` must be >= 0 (elements from the parameter's first element), got {offset}")
        self.param: Tensor = param
        self.shape: tuple[int, ...] = shape
        self.stride: tuple[int, ...] = stride
        self.offset: int = int(offset)
        self._check_inside_param()
        self._check_no_overlap()

    # ------------------------------------------------------------ construction
    @staticmethod
    def from_existing(t: Union["View", Tensor]) -> "View":
        """``t`` itself when it is a View, else the identity view of the tensor ``t``."""
        if isinstance(t, View):
            return t
        if isinstance(t, Tensor):
            return View(t, tuple(t.shape), tuple(t.stride()), 0)
        raise ArgumentTypeError(f"expected a View, Tensor or Parameter, got {type(t).__name__}")

    # ------------------------------------------------------------ geometry
    @property
    def ndim(self) -> int:
        """Number of dims of the view."""
        return len(self.shape)

    def numel(self) -> int:
        """Number of elements of the view."""
        return math.prod(self.shape)

    @property
    def cosize(self) -> int:
        """The largest offset the view reaches, plus one (0 for an empty view)."""
        if self.numel() == 0:
            return 0
        return self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.stride)) + 1

    @property
    def dtype(self) -> torch.dtype:
        """The parameter's dtype."""
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        """The parameter's device."""
        return self.param.device

    def is_identity(self) -> bool:
        """Whether the view is the parameter itself (same shape, layout and first element)."""
        return (
            self.shape == tuple(self.param.shape)
            and self.offset == 0
            and _same_layout(self.shape, self.stride, self.param.stride())
        )

    # ------------------------------------------------------------ data
    @property
    def data(self) -> Tensor:
        """The live view (detached from autograd): in-place writes land in the parameter."""
        return torch.as_strided(self.param.detach(), self.shape, self.stride, self.param.storage_offset() + self.offset)

    def tensor(self) -> Tensor:
        """The live view, tracked by autograd (for losses on the viewed weights)."""
        return torch.as_strided(self.param, self.shape, self.stride, self.param.storage_offset() + self.offset)

    def resolve(self, values: Optional[Tensor], name: str = "values") -> Tensor:
        """``values`` seen through this view, as a view-shaped tensor (no copy where possible).

        Args:
            values: ``None`` (the live parameter data), a tensor of the view's
                shape (taken as is), or a tensor of the parameter's shape (viewed
                with this view's strides; copied once into the parameter's layout
                only when its own layout differs). When the two shapes are equal,
                a tensor is taken as view-shaped.
            name: the argument's name, for error messages.
        """
        if values is None:
            return self.data
        if not isinstance(values, Tensor):
            raise ArgumentTypeError(f"`{name}` must be a tensor or None, got {type(values).__name__}")
        if values.device.type == "meta" and self.param.device.type != "meta":
            raise SpecError(f"`{name}` is on the meta device (a shape without data); pass a tensor with values")
        if tuple(values.shape) == self.shape:
            return values
        param_shape = tuple(self.param.shape)
        if tuple(values.shape) == param_shape:
            base = values
            if not _same_layout(param_shape, values.stride(), self.param.stride()):
                base = torch.empty_strided(
                    param_shape, self.param.stride(), dtype=values.dtype, device=values.device
                )
                base.copy_(values)
            return torch.as_strided(base, self.shape, self.stride, base.storage_offset() + self.offset)
        raise ShapeMismatchError(
            f"{self.shape} (the view's) or {param_shape} (the parameter's)", tuple(values.shape), name
        )

    # ------------------------------------------------------------ block ops on the parameter
    def reduce_blocks(
        self, block_shape: Sequence[int], reduce: str = "norm", p: float = 2.0, values: Optional[Tensor] = None
    ) -> Tensor:
        """One statistic per block of the view (of ``values`` resolved by :meth:`resolve`).

        See :func:`reduce_blocks`; ``block_shape`` must be normalized (one positive
        entry per dim, dividing it).
        """
        return reduce_blocks(self.resolve(values), block_shape, reduce, p)

    @torch.no_grad()
    def scale_blocks_(self, block_shape: Sequence[int], factors: Tensor) -> None:
        """Multiply each block of the view by its factor, in place in the parameter (see :func:`scale_blocks_`)."""
        scale_blocks_(self.data, block_shape, factors)

    def apply_multiplier(self, multiplier: Tensor, block_shape: Sequence[int]) -> None:
        """The reference's name of :meth:`scale_blocks_` (arguments in its order)."""
        self.scale_blocks_(block_shape, multiplier)

    # ------------------------------------------------------------ indices
    def _check_view_index(self, idx: Tensor, name: str) -> Tensor:
        if not isinstance(idx, Tensor) or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise ArgumentTypeError(f"`{name}` must be an integer tensor of view indices, got {idx!r}")
        if idx.dim() == 0 or idx.shape[-1] != self.ndim:
            raise ShapeMismatchError(f"(..., {self.ndim})", tuple(idx.shape), name)
        idx = idx.long()
        limits = torch.tensor(self.shape, dtype=torch.long, device=idx.device)
        if bool(((idx < 0) | (idx >= limits)).any()):
            raise ArgumentIndexError(f"`{name}` holds an index outside the view's shape {self.shape}")
        return idx

    def linear_offset(self, idx: Tensor) -> Tensor:
        """Storage offsets (from the parameter's first element) of view indices.

        Args:
            idx: integer tensor ``(..., ndim)`` of view indices.

        Returns:
            Long tensor ``(...)``.
        """
        idx = self._check_view_index(idx, "idx")
        strides = torch.tensor(self.stride, dtype=torch.long, device=idx.device)
        return (idx * strides).sum(-1) + self.offset

    def offsets_to_param_index(self, offsets: Tensor) -> Tensor:
        """Parameter indices ``(..., param.ndim)`` of relative storage offsets.

        Peels dims off in decreasing stride order, which inverts every layout that
        slicing, transposing and permuting produce.
        """
        pshape, pstride = tuple(self.param.shape), tuple(self.param.stride())
        index = torch.zeros(*offsets.shape, len(pshape), dtype=torch.long, device=offsets.device)
        rest = offsets.clone()
        for d in sorted(range(len(pshape)), key=lambda d: -pstride[d]):
            if pshape[d] > 1 and pstride[d] > 0:
                index[..., d] = rest // pstride[d]
                rest -= index[..., d] * pstride[d]
        return index

    def to_param_index(self, idx: Tensor) -> Tensor:
        """Parameter indices ``(..., param.ndim)`` of view indices ``(..., ndim)``."""
        return self.offsets_to_param_index(self.linear_offset(idx))

    def to_param_rc(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``(row, col)`` in a 2-D parameter of view indices ``(..., ndim)``."""
        if self.param.dim() != 2:
            raise SpecError(f"to_param_rc needs a 2-D parameter, this one has shape {tuple(self.param.shape)}")
        index = self.to_param_index(idx)
        return index[..., 0], index[..., 1]

    def all_offsets(self) -> Tensor:
        """The storage offset of every view element, row-major, as a 1-D long tensor (on CPU)."""
        offsets = torch.tensor([self.offset], dtype=torch.long)
        for size, step in zip(self.shape, self.stride):
            offsets = (offsets[:, None] + torch.arange(size, dtype=torch.long) * step).reshape(-1)
        return offsets

    # ------------------------------------------------------------ validation
    def _describe(self) -> str:
        return f"view (shape={self.shape}, stride={self.stride}, offset={self.offset})"

    def _check_inside_param(self) -> None:
        if self.numel() == 0:
            return
        pshape, pstride = tuple(self.param.shape), tuple(self.param.stride())
        last = self.cosize - 1
        if self.param.numel() == 0:
            raise SpecError(f"{self._describe()} is not empty but the parameter {pshape} is")
        if _is_dense(pshape, pstride):
            if last >= self.param.numel():
                raise SpecError(
                    f"{self._describe()} reaches element offset {last}, past the parameter "
                    f"(shape {pshape}, {self.param.numel()} elements): check `shape`, `stride` and `offset`"
                )
            return
        # A parameter with gaps (e.g. a strided slice): every element must be one of the parameter's.
        offsets = self.all_offsets()
        index = self.offsets_to_param_index(offsets)
        recomposed = (index * torch.tensor(pstride, dtype=torch.long)).sum(-1)
        inside = (index < torch.tensor(pshape, dtype=torch.long)).all(-1) & (recomposed == offsets)
        if not bool(inside.all()):
            bad = int(offsets[~inside][0])
            raise SpecError(
                f"{self._describe()} reaches element offset {bad}, which is not an element of the parameter "
                f"(shape {pshape}, strides {pstride}): check `shape`, `stride` and `offset`"
            )

    def _check_no_overlap(self) -> None:
        # Sufficient test: sorted by stride, each stride exceeds the span of the smaller dims.
        span = 0
        disjoint = True
        for size, step in sorted(((s, st) for s, st in zip(self.shape, self.stride) if s > 1), key=lambda x: x[1]):
            if step <= span:
                disjoint = False
                break
            span += (size - 1) * step
        if disjoint:
            return
        offsets = self.all_offsets()
        ordered, order = torch.sort(offsets, stable=True)
        repeats = (ordered[1:] == ordered[:-1]).nonzero()
        if repeats.numel() == 0:
            return
        i = int(repeats[0, 0])
        first, second = (torch.unravel_index(order[j], self.shape) for j in (i, i + 1))
        raise SpecError(
            f"{self._describe()} overlaps itself: indices {tuple(int(v) for v in first)} and "
            f"{tuple(int(v) for v in second)} both reach element offset {int(ordered[i])}; "
            "check `stride`"
        )

    # ------------------------------------------------------------ static layout helpers
    @staticmethod
    def block_view_of(
        t: Tensor, block_shape: Sequence[int], reorder: bool = True, merge: bool = False
    ) -> Tensor:
        """``t`` of shape ``(B0*b0, B1*b1, ...)`` seen block by block.

        Args:
            t: the tensor (any strides).
            block_shape: the block (``-1`` = whole dim, ``()`` = all ones).
            reorder: ``False``: interleaved ``(B0, b0, B1, b1, ...)``; ``True``:
                ``(B0, B1, ..., b0, b1, ...)``.
            merge: ``(B0, B1, ..., b0*b1*...)`` (implies reorder).

        Returns:
            The interleaved and reordered forms are always views of ``t`` (writes
            go through); the merged form is a view when ``t``'s layout allows,
            else a copy.
        """
        block = normalize_tile_shape(t.shape, block_shape, arg="block_shape", of="the tensor", missing="ones")
        grid = _grid_of(t, block)
        interleaved = t.view(interleaved_shape(grid, block))
        if not (reorder or merge):
            return interleaved
        reordered = interleaved.permute(reorder_permutation(t.dim()))
        if merge:
            return reordered.reshape(*grid, math.prod(block))
        return reordered

    @staticmethod
    def broadcast_block_to_element(values: Tensor, block_shape: Sequence[int], fake: bool = False) -> Tensor:
        """Grid-shaped ``values`` ``(B0, B1, ...)`` repeated over each block: ``(B0*b0, B1*b1, ...)``.

        With ``fake=True`` only unsqueezed to ``(B0, 1, B1, 1, ...)``, which
        broadcasts against the interleaved block view without copying.
        """
        block = tuple(block_shape) or (1,) * values.dim()
        if len(block) != values.dim() or any(int(b) < 1 for b in block):
            raise SpecError(
                f"`block_shape` must have one positive entry per dim of `values` {tuple(values.shape)}, "
                f"got {tuple(block_shape)}"
            )
        spread = interleave_unsqueeze(values)
        if fake:
            return spread
        full = tuple(g * b for g, b in zip(values.shape, block))
        return spread.expand(interleaved_shape(values.shape, block)).reshape(full)

    # ------------------------------------------------------------ identity
    def _key(self) -> tuple:
        return (id(self.param), self.shape, self.stride, self.offset)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, View):
            return NotImplemented
        return self.param is other.param and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        p = self.param
        return (
            f"View(param=<{type(p).__name__} {tuple(p.shape)} {p.dtype} {p.device}>, "
            f"shape={self.shape}, stride={self.stride}, offset={self.offset})"
        )
