"""Blocks: the atomic pruning units of S3.

A :class:`BlockSpec` tiles a :class:`~s3sparse.view.View` of a parameter by
blocks of a fixed shape; the blocks form a grid (``grid_shape``). A
:class:`BlockCoupling` joins several BlockSpecs whose grids agree (after axis
permutations) into one grid of larger blocks: block ``i`` of the coupling is the
union of block ``i`` of every member, so they are kept or pruned together.

Conventions:
    * Masks are bool tensors of the grid shape; ``True`` means pruned (zeroed).
    * Block statistics (``norms``, ``min``, ``max``) and every block-wise
      mutation (masks, multipliers, thresholds) run on the compiled strided
      block ops over the parameter's storage; a strided view is never copied.
    * ``values`` arguments take ``None`` (the parameter's own data), a tensor of
      the view's or of the parameter's shape, or a mapping ``{BlockSpec: tensor}``
      (required by a coupling: one entry per member).
    * All mutations run under ``torch.no_grad()`` and validate every argument
      before writing anything.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Number
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .dtypes import get_dtype_epsilon, opmath_dtype
from .errors import ArgumentTypeError, CouplingError, ShapeMismatchError, SpecError
from .tensor_ops import (
    broadcast_numbers,
    inverse_permutation,
    normalize_order,
    normalize_tile_shape,
)
from .view import View

__all__ = ["Values", "SparseBlock", "BlockSpec", "BlockCoupling"]

#: What a ``values`` argument may be: ``None``, a tensor, or ``{BlockSpec: tensor}``.
Values = Union[Tensor, Mapping[Any, Optional[Tensor]], None]


def _combine_dtypes(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class SparseBlock(ABC):
    """A grid of blocks over one or more parameters (a :class:`BlockSpec` or a :class:`BlockCoupling`).

    Subclasses provide the grid, the per-spec plumbing and the merged block
    layout; everything a pruner calls (statistics, masks, thresholds) is defined
    here once on top of them.
    """

    #: The name, or None.
    name: Optional[str]

    # ------------------------------------------------------------ abstract interface
    @property
    @abstractmethod
    def grid_shape(self) -> tuple[int, ...]:
        """Number of blocks along each grid axis."""

    @abstractmethod
    def block_specs(self) -> tuple["BlockSpec", ...]:
        """The BlockSpecs making up these blocks: ``(self,)``, or a coupling's members."""

    @abstractmethod
    def numel_per_block(self) -> int:
        """Number of elements in one block (summed over members for a coupling)."""

    @abstractmethod
    def parameters(self) -> list[View]:
        """The Views (one per member spec) these blocks live in."""

    @property
    @abstractmethod
    def data(self) -> Union[Tensor, dict["BlockSpec", Tensor]]:
        """The live viewed data (a tensor, or ``{spec: tensor}`` for a coupling)."""

    @abstractmethod
    def set_data(self, data: Values) -> None:
        """Copy ``data`` into the viewed parameter(s)."""

    @abstractmethod
    def nnz(self, eps: float = 1e-8) -> int:
        """Number of viewed elements with ``|x| > eps``."""

    @abstractmethod
    def block_view(self, values: Values = None, reorder: bool = True, merge: bool = False) -> Tensor:
        """``values`` laid out block by block (see the subclasses)."""

    @abstractmethod
    def get_masks(self, block_mask: Tensor) -> dict["BlockSpec", Tensor]:
        """Element masks ``{spec: bool tensor of the spec's view shape}`` of a grid-shaped block mask."""

    @abstractmethod
    def _per_spec(self, values: Values, name: str) -> list[Values]:
        """``values`` split into one entry per member spec (unresolved)."""

    @abstractmethod
    def _block_stat(self, values: Values, reduce: str, p: float) -> Tensor:
        """One statistic per block over ``values`` (op-backed), grid-shaped."""

    @abstractmethod
    def _merged(self, values: Values, name: str) -> Tensor:
        """``values`` as ``(*grid_shape, numel_per_block)`` (a copy where the layout needs it)."""

    @abstractmethod
    def _write_merged_(self, merged: Tensor) -> None:
        """Write a ``(*grid_shape, numel_per_block)`` tensor back into the parameter(s)."""

    @abstractmethod
    def _scale_(self, factors: Tensor) -> None:
        """Multiply each block by its factor (validated grid-shaped tensor), op-backed."""

    # ------------------------------------------------------------ grid
    @property
    def grid_ndim(self) -> int:
        """Number of grid axes."""
        return len(self.grid_shape)

    def numblk(self) -> int:
        """Number of blocks."""
        return math.prod(self.grid_shape)

    def numel(self) -> int:
        """Number of elements over all blocks."""
        return self.numblk() * self.numel_per_block()

    @property
    def device(self) -> torch.device:
        """The device of the first member's parameter."""
        return self.block_specs()[0].view.param.device

    def expand_block_tensor(self, block_values: Tensor) -> Tensor:
        """``block_values`` with ``numblk()`` elements reshaped to ``grid_shape``."""
        if block_values.numel() != self.numblk():
            raise ShapeMismatchError(self.grid_shape, tuple(block_values.shape), "block_values")
        return block_values.reshape(self.grid_shape)

    def _grid_numbers(self, x: Union[Tensor, Number], name: str) -> Tensor:
        """``x`` (a number, or a tensor that broadcasts to the grid) as a grid-shaped tensor."""
        return broadcast_numbers(x, self.grid_shape, self.device, arg=name, what="the block grid")

    def _grid_mask(self, mask: Tensor, name: str) -> Tensor:
        """``mask`` checked to be a bool tensor of exactly the grid shape."""
        if not isinstance(mask, Tensor):
            raise ArgumentTypeError(
                f"`{name}` must be a bool tensor of the block grid shape {self.grid_shape}, got {type(mask).__name__}"
            )
        if mask.dtype != torch.bool:
            raise ArgumentTypeError(f"`{name}` must be a bool tensor (True = pruned), got dtype {mask.dtype}")
        if tuple(mask.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, tuple(mask.shape), name)
        return mask.to(self.device)

    # ------------------------------------------------------------ statistics
    def norms(self, values: Values = None, p: float = 2) -> Tensor:
        """The ``p``-norm of every block of ``values`` (default: the parameter data), grid-shaped."""
        return self._block_stat(values, "norm", p)

    def min(self, values: Values = None) -> Tensor:
        """The smallest value of every block, grid-shaped."""
        return self._block_stat(values, "min", 2.0)

    def max(self, values: Values = None) -> Tensor:
        """The largest value of every block, grid-shaped."""
        return self._block_stat(values, "max", 2.0)

    def sum(self, values: Values = None) -> Tensor:
        """The sum of every block, grid-shaped."""
        return self._block_stat(values, "sum", 2.0)

    def reduce(self, values: Values, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Any per-block statistic: ``fn`` reduces the last dim of the merged block view.

        ``fn`` receives ``values`` laid out as ``(*grid_shape, numel_per_block)``
        (see :meth:`block_view` with ``merge=True``) and returns one value per
        block (``grid_shape``, or ``(*grid_shape, 1)``). Plain torch; the layout
        may be a copy.
        """
        out = fn(self._merged(values, "values"))
        if not isinstance(out, Tensor):
            raise ArgumentTypeError(f"the result of `fn` must be a tensor (one value per block), got {type(out).__name__}")
        if out.numel() != self.numblk():
            raise ShapeMismatchError(self.grid_shape, tuple(out.shape), "the result of `fn`")
        return out.reshape(self.grid_shape)

    # ------------------------------------------------------------ mutations
    @torch.no_grad()
    def apply_mask(self, mask: Tensor) -> None:
        """Zero every block where the grid-shaped bool ``mask`` is True."""
        mask = self._grid_mask(mask, "mask")
        self._scale_(~mask)

    @torch.no_grad()
    def apply_multiplier(self, multiplier: Union[Tensor, Number]) -> None:
        """Multiply every block by its entry of ``multiplier`` (grid-shaped, or broadcasting to it)."""
        self._scale_(self._grid_numbers(multiplier, "multiplier"))

    @torch.no_grad()
    def hard_threshold(self, thresholds: Union[Tensor, Number], values: Values = None) -> Tensor:
        """Zero every block whose norm (over ``values``, default the data) is below its threshold.

        Args:
            thresholds: per-block thresholds (grid-shaped, broadcasting to it, or a number).
            values: what the norms are taken over (see the module doc).

        Returns:
            The grid-shaped bool mask of the zeroed blocks.
        """
        thresholds = self._grid_numbers(thresholds, "thresholds")
        pruned = self.norms(values) < thresholds
        self._scale_(~pruned)
        return pruned

    @torch.no_grad()
    def soft_threshold(
        self,
        thresholds: Union[Tensor, Number],
        conditioners: Values = None,
        max_iter: int = 20,
        atol: float = 1e-8,
        eps: Optional[float] = None,
    ) -> None:
        """The group-lasso proximal step on every block, in place.

        Without ``conditioners``: ``w <- w * max(0, 1 - t / ||w||)``, i.e. blocks
        with ``||w|| <= t`` are zeroed and the others' norm shrinks by exactly ``t``.

        With a diagonal conditioner ``h`` (e.g. Adam's ``sqrt(v) + eps``, same
        layout as the data): ``w <- h / (h + mu) * w`` with ``mu >= 0`` found per
        block by bisection so that ``mu * ||h w / (h + mu)|| = t``; blocks with
        ``||h w|| <= t`` are zeroed.

        Args:
            thresholds: per-block ``t >= 0`` (grid-shaped, broadcasting, or a number).
            conditioners: the diagonal ``h >= 0``, as a ``values`` argument.
            max_iter: most bisection steps.
            atol: stop once ``|mu ||h w / (h + mu)|| - t| <= atol`` in every block.
            eps: floor of ``||h w|| - t`` in the bisection bracket (default: the
                dtype's epsilon).
        """
        thresholds = self._grid_numbers(thresholds, "thresholds")
        if bool((thresholds < 0).any()):
            raise SpecError("`thresholds` must be >= 0")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise SpecError(f"`max_iter` must be a non-negative int, got {max_iter!r}")
        if conditioners is None:
            norms = self.norms(None)
            acc = opmath_dtype(norms.dtype)
            norms, t = norms.to(acc), thresholds.to(acc)
            factors = torch.where(norms > t, 1 - t / norms.clamp_min(torch.finfo(acc).tiny), 0)
            self._scale_(factors)
            return
        self._soft_threshold_conditioned(thresholds, conditioners, max_iter, atol, eps)

    def _check_conditioners(self, conditioners: Values) -> None:
        """Raise unless ``conditioners`` resolves for every member and is ``>= 0``."""
        for spec, h in zip(self.block_specs(), self._per_spec(conditioners, "conditioners")):
            if bool((spec._resolve(h, "conditioners") < 0).any()):
                raise SpecError(f"`conditioners` must be >= 0 (a diagonal preconditioner); {spec!r} has negatives")

    def _soft_threshold_conditioned(
        self, thresholds: Tensor, conditioners: Values, max_iter: int, atol: float, eps: Optional[float]
    ) -> None:
        self._check_conditioners(conditioners)
        weights = self._merged(None, "data")
        conditioner = self._merged(conditioners, "conditioners").to(weights.device)
        acc = opmath_dtype(torch.promote_types(weights.dtype, conditioner.dtype))
        w, h, t = weights.to(acc), conditioner.to(acc), thresholds.to(acc)
        tiny = torch.finfo(acc).tiny
        hw = h * w
        hw_norm = torch.linalg.vector_norm(hw, dim=-1)
        survive = hw_norm > t
        # phi(mu) = mu ||hw / (h + mu)|| rises from 0 to ||hw||, and
        # mu/(h_max+mu) ||hw|| <= phi(mu) <= mu/(h_min+mu) ||hw|| brackets its root.
        gap = (hw_norm - t).clamp_min(get_dtype_epsilon(acc, eps))
        low = (t * h.amin(-1) / gap).clamp_min(0)
        high = (t * h.amax(-1) / gap).clamp_min(0)
        mu = (low + high) / 2
        for _ in range(max_iter):
            phi = mu * torch.linalg.vector_norm(hw / (h + mu[..., None]).clamp_min(tiny), dim=-1)
            if bool(((phi - t).abs() <= atol).logical_or(~survive).all()):
                break
            too_small = phi < t
            low = torch.where(too_small, mu, low)
            high = torch.where(too_small, high, mu)
            mu = (low + high) / 2
        denom = h + mu[..., None]
        factor = torch.where(denom > 0, h / denom.clamp_min(tiny), 1)
        self._write_merged_((w * factor).to(weights.dtype))
        self._scale_(survive)

    # ------------------------------------------------------------ misc
    def __str__(self) -> str:
        return repr(self)


class BlockSpec(SparseBlock):
    """A view of a parameter tiled by blocks of ``shape``.

    Args:
        view: a :class:`View`, or a tensor/Parameter (viewed as itself).
        shape: the block shape, one entry per view dim; ``-1`` spans the whole
            dim, ``()`` means all ones. Each entry must divide its dim.
        name: an optional name.

    Attributes:
        view: the View (always a :class:`View`).
        shape: the normalized block shape (full length, ``-1`` resolved).
        name: the name, or None.
    """

    def __init__(self, view: Union[View, Tensor], shape: Sequence[int], name: Optional[str] = None) -> None:
        self.view: View = View.from_existing(view)
        self.shape: tuple[int, ...] = normalize_tile_shape(
            self.view.shape, shape, arg="shape", of="the view", missing="ones"
        )
        self.name = name
        self._grid_shape = tuple(s // b for s, b in zip(self.view.shape, self.shape))

    # ------------------------------------------------------------ structure
    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of blocks along each view dim."""
        return self._grid_shape

    def block_specs(self) -> tuple["BlockSpec", ...]:
        """``(self,)``."""
        return (self,)

    def blocks(self) -> list["BlockSpec"]:
        """``[self]`` (the reference's name)."""
        return [self]

    @property
    def ndim(self) -> int:
        """Number of view dims."""
        return self.view.ndim

    @property
    def param(self) -> Tensor:
        """The viewed parameter."""
        return self.view.param

    def numel_per_block(self) -> int:
        """Number of elements in one block."""
        return math.prod(self.shape)

    def parameters(self) -> list[View]:
        """``[self.view]``."""
        return [self.view]

    @property
    def data(self) -> Tensor:
        """The live view of the parameter (writes land in it)."""
        return self.view.data

    @torch.no_grad()
    def set_data(self, data: Values) -> None:
        """Copy ``data`` (view- or parameter-shaped, or ``{self: tensor}``) into the view."""
        source = self._resolve(data, "data")
        self.view.data.copy_(source)

    def nnz(self, eps: float = 1e-8) -> int:
        """Number of viewed elements with ``|x| > eps``."""
        return int((self.view.data.abs() > eps).sum())

    # ------------------------------------------------------------ values
    def _per_spec(self, values: Values, name: str) -> list[Values]:
        return [values]

    def _resolve(self, values: Values, name: str) -> Tensor:
        if isinstance(values, Mapping):
            if self not in values:
                raise SpecError(f"`{name}` has no entry for {self!r}")
            values = values[self]
        return self.view.resolve(values, name)

    def block_view(self, values: Values = None, reorder: bool = True, merge: bool = False) -> Tensor:
        """``values`` (default: the live data) seen block by block.

        ``reorder=False``: ``(B0, b0, B1, b1, ...)``; ``reorder=True``:
        ``(B0, B1, ..., b0, b1, ...)``; ``merge=True``: ``(B0, B1, ..., b0*b1*...)``.
        The first two are views (writes into the live data go through).
        """
        return View.block_view_of(self._resolve(values, "values"), self.shape, reorder=reorder, merge=merge)

    def _merged(self, values: Values, name: str) -> Tensor:
        return View.block_view_of(self._resolve(values, name), self.shape, merge=True)

    def _write_merged_(self, merged: Tensor) -> None:
        live = View.block_view_of(self.view.data, self.shape, reorder=True)
        live.copy_(merged.reshape(live.shape))

    def _block_stat(self, values: Values, reduce: str, p: float) -> Tensor:
        return self.view.reduce_blocks(self.shape, reduce, p, self._resolve(values, "values"))

    def _scale_(self, factors: Tensor) -> None:
        self.view.scale_blocks_(self.shape, factors)

    # ------------------------------------------------------------ masks
    def broadcast_block_to_element(self, block_values: Tensor, fake: bool = False) -> Tensor:
        """Grid-shaped ``block_values`` to the view's shape (``fake``: ``(B0, 1, B1, 1, ...)``)."""
        if tuple(block_values.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, tuple(block_values.shape), "block_values")
        return View.broadcast_block_to_element(block_values, self.shape, fake=fake)

    def get_masks(self, block_mask: Tensor) -> dict["BlockSpec", Tensor]:
        """``{self: element mask of the view's shape}`` of a grid-shaped bool ``block_mask``."""
        block_mask = self._grid_mask(block_mask, "block_mask")
        return {self: self.broadcast_block_to_element(block_mask)}

    # ------------------------------------------------------------ identity
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockSpec):
            return NotImplemented
        return self.view == other.view and self.shape == other.shape

    def __hash__(self) -> int:
        return hash((self.view, self.shape))

    def __repr__(self) -> str:
        return (
            f"BlockSpec(name={self.name!r}, view_shape={self.view.shape}, shape={self.shape}, "
            f"grid_shape={self.grid_shape})"
        )


class BlockCoupling(SparseBlock):
    """Several BlockSpecs pruned together: block ``g`` is the union of block ``g`` of every member.

    Member ``s``'s grid is aligned to the coupled grid by ``orders[s]``: coupled
    grid index ``g`` is member grid index ``h`` with ``h[orders[s][j]] = g[j]``
    (the coupled grid is ``spec_grid_tensor.permute(orders[s])``).

    Args:
        specs: the member BlockSpecs (on the same or different parameters).
        orders: one axis permutation per member (``None``, or a ``None`` entry,
            means the identity).
        name: an optional name.

    Raises:
        CouplingError: the permuted grids differ, or a spec repeats.
    """

    def __init__(
        self,
        specs: Sequence[BlockSpec],
        orders: Optional[Sequence[Optional[Sequence[int]]]] = None,
        name: Optional[str] = None,
    ) -> None:
        specs = list(specs)
        if not specs:
            raise SpecError("`specs` must hold at least one BlockSpec")
        for i, s in enumerate(specs):
            if not isinstance(s, BlockSpec):
                raise ArgumentTypeError(f"`specs`[{i}] must be a BlockSpec, got {type(s).__name__}")
        if len(set(specs)) != len(specs):
            raise CouplingError(f"`specs` repeats a BlockSpec: {specs}")
        if not orders:
            orders = [None] * len(specs)
        if len(orders) != len(specs):
            raise SpecError(f"`orders` must have one entry per spec ({len(specs)}), got {len(orders)}")
        #: The member BlockSpecs, in order.
        self.specs: tuple[BlockSpec, ...] = tuple(specs)
        self.orders: list[tuple[int, ...]] = [
            normalize_order(o, s.grid_ndim, f"orders[{i}]") for i, (o, s) in enumerate(zip(orders, specs))
        ]
        self.name = name
        aligned = [tuple(s.grid_shape[a] for a in o) for s, o in zip(specs, self.orders)]
        for i in range(1, len(specs)):
            if aligned[i] != aligned[0]:
                raise CouplingError(
                    f"cannot couple {specs[0]!r} and {specs[i]!r}: their block grids {specs[0].grid_shape} and "
                    f"{specs[i].grid_shape}, permuted by `orders`[0] = {self.orders[0]} and `orders`[{i}] = "
                    f"{self.orders[i]}, give {aligned[0]} and {aligned[i]}"
                )
        self._grid_shape = aligned[0]
        self._inverse_orders = [inverse_permutation(o) for o in self.orders]

    # ------------------------------------------------------------ structure
    def block_specs(self) -> tuple[BlockSpec, ...]:
        """The member BlockSpecs (:attr:`specs`)."""
        return self.specs

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """The coupled grid: the first member's grid permuted by ``orders[0]``."""
        return self._grid_shape

    def numel_per_block(self) -> int:
        """Elements in one coupled block (summed over members)."""
        return sum(s.numel_per_block() for s in self.specs)

    def parameters(self) -> list[View]:
        """The members' Views."""
        return [s.view for s in self.specs]

    @property
    def data(self) -> dict[BlockSpec, Tensor]:
        """``{spec: live view}`` of every member."""
        return {s: s.data for s in self.specs}

    @torch.no_grad()
    def set_data(self, data: Values) -> None:
        """Copy ``{spec: tensor}`` into every member (all checked before any write)."""
        sources = [s._resolve(v, "data") for s, v in zip(self.specs, self._per_spec(data, "data"))]
        for s, source in zip(self.specs, sources):
            s.view.data.copy_(source)

    def nnz(self, eps: float = 1e-8) -> int:
        """Number of non-zero elements over all members."""
        return sum(s.nnz(eps) for s in self.specs)

    # ------------------------------------------------------------ grid alignment
    def to_coupled_grid(self, member: int, t: Tensor) -> Tensor:
        """A tensor ``(*member_grid, *extra)`` of member ``member`` as ``(*grid_shape, *extra)``."""
        order = self.orders[member]
        return t.permute(*order, *range(len(order), t.dim()))

    def to_member_grid(self, member: int, t: Tensor) -> Tensor:
        """A tensor ``(*grid_shape, *extra)`` as ``(*member_grid, *extra)`` of member ``member``."""
        inverse = self._inverse_orders[member]
        return t.permute(*inverse, *range(len(inverse), t.dim()))

    def _per_spec(self, values: Values, name: str) -> list[Values]:
        if values is None:
            return [None] * len(self.specs)
        if not isinstance(values, Mapping):
            raise ArgumentTypeError(
                f"`{name}` of a BlockCoupling must be None or a mapping {{BlockSpec: tensor}} with one entry "
                f"per member, got {type(values).__name__}"
            )
        missing = [s for s in self.specs if s not in values]
        if missing:
            raise SpecError(f"`{name}` has no entry for the member(s) {missing}")
        return [values[s] for s in self.specs]

    # ------------------------------------------------------------ values
    def _merged(self, values: Values, name: str) -> Tensor:
        pieces = [
            self.to_coupled_grid(i, s._merged(v, name))
            for i, (s, v) in enumerate(zip(self.specs, self._per_spec(values, name)))
        ]
        dtype = _combine_dtypes(pieces)
        return torch.cat([p.to(device=pieces[0].device, dtype=dtype) for p in pieces], dim=-1)

    def block_view(self, values: Values = None, reorder: bool = True, merge: bool = False) -> Tensor:
        """The members' merged block views concatenated: ``(*grid_shape, numel_per_block)``.

        Members may have different block shapes, so only the merged form
        exists; ``reorder`` and ``merge`` are accepted for signature compatibility.
        The result is a copy.
        """
        return self._merged(values, "values")

    def _write_merged_(self, merged: Tensor) -> None:
        sizes = [s.numel_per_block() for s in self.specs]
        for i, (s, piece) in enumerate(zip(self.specs, merged.split(sizes, dim=-1))):
            s._write_merged_(self.to_member_grid(i, piece))

    def _block_stat(self, values: Values, reduce: str, p: float) -> Tensor:
        stats = [
            self.to_coupled_grid(i, s._block_stat(v, reduce, p))
            for i, (s, v) in enumerate(zip(self.specs, self._per_spec(values, "values")))
        ]
        dtype = _combine_dtypes(stats)
        acc = opmath_dtype(dtype) if dtype.is_floating_point else dtype
        stacked = torch.stack([x.to(device=stats[0].device, dtype=acc) for x in stats])
        if reduce == "norm":
            if math.isinf(p):
                out = stacked.amax(0)
            else:
                out = stacked.pow(p).sum(0).pow(1.0 / p)
        elif reduce == "min":
            out = stacked.amin(0)
        elif reduce == "max":
            out = stacked.amax(0)
        else:
            out = stacked.sum(0)
        return out.to(dtype)

    def _scale_(self, factors: Tensor) -> None:
        for i, s in enumerate(self.specs):
            s._scale_(self.to_member_grid(i, factors))

    # ------------------------------------------------------------ masks
    def broadcast_block_to_element(self, block_values: Tensor, fake: bool = False) -> dict[BlockSpec, Tensor]:
        """``{spec: element tensor}``: grid-shaped ``block_values`` spread over every member's blocks."""
        if tuple(block_values.shape) != self.grid_shape:
            raise ShapeMismatchError(self.grid_shape, tuple(block_values.shape), "block_values")
        return {
            s: s.broadcast_block_to_element(self.to_member_grid(i, block_values), fake=fake)
            for i, s in enumerate(self.specs)
        }

    def get_masks(self, block_mask: Tensor) -> dict[BlockSpec, Tensor]:
        """``{spec: element mask}`` for every member of a grid-shaped bool ``block_mask``."""
        block_mask = self._grid_mask(block_mask, "block_mask")
        return self.broadcast_block_to_element(block_mask)

    # ------------------------------------------------------------ identity
    def __iter__(self) -> Iterator[BlockSpec]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockCoupling):
            return NotImplemented
        return self.specs == other.specs and self.orders == other.orders

    def __hash__(self) -> int:
        return hash((tuple(self.specs), tuple(self.orders)))

    def __repr__(self) -> str:
        members = ", ".join(repr(s) for s in self.specs)
        return (
            f"BlockCoupling(name={self.name!r}, grid_shape={self.grid_shape}, orders={self.orders}, "
            f"specs=[{members}])"
        )
