"""Scopes: the decision units of S3.

A :class:`ScopeSpec` tiles the block grid of a :class:`~s3sparse.block.BlockSpec`
(or :class:`~s3sparse.block.BlockCoupling`) by scopes of ``shape`` blocks; the
budget "keep ``nnz`` blocks" is enforced in every scope. A
:class:`ScopeCoupling` aligns the scope grids of several ScopeSpecs, and in each
aligned scope the blocks of all members compete for one joint budget.

Layout (a contract the pruners rely on): the *scope layout* of per-block data is
``(*grid_shape, blocks_per_scope)``, the blocks of a scope ordered row-major
over the scope's block dims; for a ScopeCoupling the last axis is the
concatenation of the members' (in member order). Masks are True where pruned.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from numbers import Number
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from . import tensor_ops
from .block import BlockSpec, SparseBlock, Values
from .checks import _arg, check_finite, check_nnz, check_weight
from .errors import ArgumentTypeError, CouplingError, ShapeMismatchError, SpecError
from .tensor_ops import (
    interleaved_shape,
    inverse_permutation,
    normalize_order,
    normalize_tile_shape,
    reorder_permutation,
)
from .view import View

__all__ = ["ScopeSpec", "ScopeCoupling", "check_scope"]

#: Per-block data of a ScopeCoupling: a tensor in the joint scope layout, or
#: ``{member ScopeSpec (or its block): tensor}``.
MemberTensors = Union[Tensor, Mapping[object, Tensor]]


class _Scopes(ABC):
    """What ScopeSpec and ScopeCoupling share: budgets, thresholds and masks on the scope layout."""

    name: Optional[str]

    # ------------------------------------------------------------ abstract interface
    @property
    @abstractmethod
    def grid_shape(self) -> tuple[int, ...]:
        """Number of scopes along each scope-grid axis."""

    @abstractmethod
    def numblk_per_scope(self) -> int:
        """Number of blocks competing in one scope."""

    @abstractmethod
    def block_norms(self, values: Values = None, p: float = 2) -> Tensor:
        """Block norms in the scope layout ``(*grid_shape, numblk_per_scope())``."""

    @property
    @abstractmethod
    def members(self) -> tuple["ScopeSpec", ...]:
        """The ScopeSpecs deciding together (``(self,)`` for a ScopeSpec)."""

    @abstractmethod
    def _to_scope_layout(self, x: MemberTensors, name: str, dtype: Optional[torch.dtype]) -> Tensor:
        """Per-block data (block-grid or scope layout) as one scope-layout tensor."""

    @abstractmethod
    def _split(self, joint: Tensor) -> list[Tensor]:
        """A scope-layout tensor as one block-grid tensor per member."""

    # ------------------------------------------------------------ structure
    def numscopes(self) -> int:
        """Number of scopes."""
        return math.prod(self.grid_shape)

    def numblk(self) -> int:
        """Number of blocks over all scopes."""
        return self.numscopes() * self.numblk_per_scope()

    def block_specs(self) -> tuple[BlockSpec, ...]:
        """Every BlockSpec the scopes decide on, in member order."""
        return tuple(s for m in self.members for s in m.block.block_specs())

    def parameters(self) -> list[View]:
        """The Views of every member spec."""
        return [s.view for s in self.block_specs()]

    @property
    def device(self) -> torch.device:
        """The device of the first parameter."""
        return self.block_specs()[0].view.param.device

    # ------------------------------------------------------------ argument checks
    def _check_nnz(self, nnz: object) -> int:
        return check_nnz(nnz, self.numblk_per_scope())

    def _scope_numbers(self, x: Union[Tensor, Number], name: str) -> Tensor:
        """A number, or a tensor broadcasting to the scope grid, as a scope-grid tensor."""
        return tensor_ops.broadcast_numbers(x, self.grid_shape, self.device, arg=name, what="the scope grid")

    def _scores(self, values: Values, block_scores: Optional[MemberTensors]) -> Tensor:
        if block_scores is None:
            return self.block_norms(values)
        if values is not None:
            raise SpecError("give either `values` or `block_scores`, not both")
        return self._to_scope_layout(block_scores, "block_scores", None)

    # ------------------------------------------------------------ budgets
    def sparsity_to_nnz(self, sparsity: float) -> int:
        """Blocks to keep per scope for a fraction ``sparsity`` of pruned blocks.

        The pruned count is the nearest integer to ``sparsity * blocks_per_scope``
        (halves round up, i.e. towards more sparsity).
        """
        if isinstance(sparsity, bool) or not isinstance(sparsity, Number) or not 0.0 <= float(sparsity) <= 1.0:
            raise SpecError(f"`sparsity` must be a number in [0, 1], got {sparsity!r}")
        n = self.numblk_per_scope()
        pruned = math.floor(float(sparsity) * n + 0.5 + 1e-9)
        return n - min(pruned, n)

    def kth_largest(self, values: Values, nnz: int, *, block_scores: Optional[MemberTensors] = None) -> Tensor:
        """The ``nnz``-th largest block norm (or score) of every scope, scope-grid-shaped (``+inf`` for 0)."""
        nnz = self._check_nnz(nnz)
        return tensor_ops.kth_largest_value(self._scores(values, block_scores), nnz)

    def kth_mid(
        self, values: Values, nnz: int, k_weight: float = 0.5, *, block_scores: Optional[MemberTensors] = None
    ) -> Tensor:
        """Per scope, ``k_weight * nnz-th + (1 - k_weight) * (nnz+1)-th`` largest block norm.

        A threshold that keeps the ``nnz`` largest blocks (distinct norms); see
        :func:`s3sparse.tensor_ops.mid_kth_largest` for the ends.
        """
        nnz = self._check_nnz(nnz)
        return tensor_ops.mid_kth_largest(self._scores(values, block_scores), nnz, k_weight=k_weight)

    def _pruned_by_budget(self, nnz: int, values: Values, block_scores: Optional[MemberTensors]) -> Tensor:
        nnz = self._check_nnz(nnz)
        _, keep = tensor_ops.kth_largest_mask(self._scores(values, block_scores), nnz)
        return ~keep

    def nnz_per_scope(self, values: Values = None, eps: float = 0.0) -> Tensor:
        """Number of blocks with norm ``> eps`` in every scope (long, scope-grid-shaped)."""
        return (self.block_norms(values) > eps).sum(-1)

    # ------------------------------------------------------------ mutations
    def _apply_joint_mask(self, pruned: Tensor) -> list[Tensor]:
        masks = self._split(pruned)
        for member, mask in zip(self.members, masks):
            member.block.apply_mask(mask)
        return masks

    @torch.no_grad()
    def _hard_threshold(
        self, thresholds: Union[Tensor, Number, None], nnz: Optional[int], values: Values
    ) -> list[Tensor]:
        if (thresholds is None) == (nnz is None):
            raise SpecError("give exactly one of `thresholds` and `nnz`")
        if nnz is not None:
            pruned = self._pruned_by_budget(nnz, values, None)
        else:
            limits = self._scope_numbers(thresholds, "thresholds")  # type: ignore[arg-type]
            pruned = self.block_norms(values) < limits[..., None]
        return self._apply_joint_mask(pruned)

    @torch.no_grad()
    def _soft_threshold(
        self,
        thresholds: Union[Tensor, Number],
        conditioners: Values,
        scale: float,
        max_iter: int,
        atol: float,
        eps: Optional[float],
    ) -> None:
        limits = self._scope_numbers(thresholds, "thresholds") * scale
        if bool((limits < 0).any()):
            raise SpecError(f"`thresholds` * `scale` must be >= 0 (scale = {scale})")
        per_block = self._split(limits[..., None].expand(*self.grid_shape, self.numblk_per_scope()))
        if conditioners is not None:  # check every member before the first one is written
            for member in self.members:
                member.block._check_conditioners(conditioners)
        for member, block_limits in zip(self.members, per_block):
            member.block.soft_threshold(block_limits, conditioners, max_iter=max_iter, atol=atol, eps=eps)

    def _masks_of(self, pruned: Tensor) -> dict[BlockSpec, Tensor]:
        element_masks: dict[BlockSpec, Tensor] = {}
        for member, mask in zip(self.members, self._split(pruned)):
            element_masks.update(member.block.get_masks(mask))
        return element_masks

    def get_masks(
        self,
        nnz: Optional[int] = None,
        values: Values = None,
        block_scores: Optional[MemberTensors] = None,
        block_mask: Optional[MemberTensors] = None,
    ) -> dict[BlockSpec, Tensor]:
        """Element masks ``{BlockSpec: bool tensor of its view's shape}``, True where pruned.

        The blocks pruned are, in order of precedence: ``block_mask`` (True =
        pruned, block-grid or scope layout; when ``nnz`` is also given every
        scope must keep exactly ``nnz``), else all but the ``nnz`` largest
        ``block_scores`` of each scope, else all but the ``nnz`` largest block
        norms of ``values`` — exactly what ``hard_threshold(nnz=nnz, values=values)``
        zeroes.
        """
        if block_mask is not None:
            if values is not None or block_scores is not None:
                raise SpecError("give `block_mask`, or `values`/`block_scores`, not both")
            pruned = self._to_scope_layout(block_mask, "block_mask", torch.bool)
            if nnz is not None:
                nnz = self._check_nnz(nnz)
                kept = (~pruned).sum(-1)
                if bool((kept != nnz).any()):
                    raise SpecError(
                        f"`block_mask` keeps between {int(kept.min())} and {int(kept.max())} blocks per scope, "
                        f"not `nnz` = {nnz}"
                    )
            return self._masks_of(pruned)
        if nnz is None:
            raise SpecError("`nnz` is required unless `block_mask` is given")
        return self._masks_of(self._pruned_by_budget(nnz, values, block_scores))

    def __str__(self) -> str:
        return repr(self)


class ScopeSpec(_Scopes):
    """The block grid of ``block`` tiled by scopes of ``shape`` blocks.

    Args:
        block: a :class:`BlockSpec` or :class:`BlockCoupling`.
        shape: blocks per scope along each grid axis; missing trailing entries
            and ``-1`` span the whole axis. Each entry must divide its axis.
        name: an optional name.

    Attributes:
        block: the blocks decided on.
        shape: the normalized scope shape (full length, ``-1`` resolved).
        name: the name, or None.
    """

    def __init__(self, block: SparseBlock, shape: Sequence[int] = (), name: Optional[str] = None) -> None:
        if not isinstance(block, SparseBlock):
            raise ArgumentTypeError(f"`block` must be a BlockSpec or BlockCoupling, got {type(block).__name__}")
        self.block: SparseBlock = block
        self.shape: tuple[int, ...] = normalize_tile_shape(
            block.grid_shape, shape, arg="shape", of="the block grid", missing="whole"
        )
        self.name = name
        self._grid_shape = tuple(g // s for g, s in zip(block.grid_shape, self.shape))

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of scopes along each block-grid axis."""
        return self._grid_shape

    @property
    def members(self) -> tuple["ScopeSpec", ...]:
        """``(self,)``."""
        return (self,)

    def numblk_per_scope(self) -> int:
        """Blocks per scope: the product of ``shape``."""
        return math.prod(self.shape)

    # ------------------------------------------------------------ layout
    def block_to_scope(self, b: Tensor, reorder: bool = True, merge: bool = True) -> Tensor:
        """Per-block data ``(*block_grid, *extra)`` arranged by scope.

        ``reorder=False``: ``(S0, s0, S1, s1, ..., *extra)``; ``reorder=True``:
        ``(S0, S1, ..., s0, s1, ..., *extra)``; ``merge=True`` (the scope layout):
        ``(S0, S1, ..., s0*s1*..., *extra)``, the scope's blocks row-major.
        """
        nd = len(self.shape)
        if not isinstance(b, Tensor) or tuple(b.shape[:nd]) != self.block.grid_shape:
            got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
            raise ShapeMismatchError(f"{self.block.grid_shape} (the block grid) + any trailing dims", got, "b")
        extra = tuple(b.shape[nd:])
        interleaved = b.reshape(*interleaved_shape(self.grid_shape, self.shape), *extra)
        if not (reorder or merge):
            return interleaved
        trailing = tuple(range(2 * nd, 2 * nd + len(extra)))
        reordered = interleaved.permute(*reorder_permutation(nd), *trailing)
        if merge:
            return reordered.reshape(*self.grid_shape, self.numblk_per_scope(), *extra)
        return reordered

    def scope_to_block(self, v: Tensor) -> Tensor:
        """Inverse of the merged :meth:`block_to_scope`: ``(*grid_shape, n, *extra)`` to ``(*block_grid, *extra)``."""
        nd = len(self.shape)
        n = self.numblk_per_scope()
        if not isinstance(v, Tensor) or v.dim() < nd + 1 or tuple(v.shape[: nd + 1]) != (*self.grid_shape, n):
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ShapeMismatchError(f"{(*self.grid_shape, n)} (the scope layout) + any trailing dims", got, "v")
        extra = tuple(v.shape[nd + 1 :])
        split = v.reshape(*self.grid_shape, *self.shape, *extra)
        to_interleaved = [axis for d in range(nd) for axis in (d, nd + d)]
        interleaved = split.permute(*to_interleaved, *range(2 * nd, 2 * nd + len(extra)))
        return interleaved.reshape(*self.block.grid_shape, *extra)

    def block_norms(self, values: Values = None, p: float = 2) -> Tensor:
        """Block norms in the scope layout ``(*grid_shape, numblk_per_scope())``."""
        return self.block_to_scope(self.block.norms(values, p))

    def _to_scope_layout(self, x: MemberTensors, name: str, dtype: Optional[torch.dtype]) -> Tensor:
        if isinstance(x, Mapping):
            key = self if self in x else self.block
            if key not in x:
                raise SpecError(f"`{name}` has no entry for {self!r}")
            x = x[key]
        if not isinstance(x, Tensor):
            raise ArgumentTypeError(f"`{name}` must be a tensor, got {type(x).__name__}")
        if dtype is not None and x.dtype != dtype:
            raise ArgumentTypeError(f"`{name}` must have dtype {dtype}, got {x.dtype}")
        x = x.to(self.device)
        if tuple(x.shape) == self.block.grid_shape:
            return self.block_to_scope(x)
        if tuple(x.shape) == (*self.grid_shape, self.numblk_per_scope()):
            return x
        raise ShapeMismatchError(
            f"{self.block.grid_shape} (the block grid) or {(*self.grid_shape, self.numblk_per_scope())} "
            "(the scope layout)",
            tuple(x.shape),
            name,
        )

    def _split(self, joint: Tensor) -> list[Tensor]:
        return [self.scope_to_block(joint)]

    # ------------------------------------------------------------ decisions
    def pruned_block_mask(
        self, nnz: int, values: Values = None, block_scores: Optional[MemberTensors] = None
    ) -> Tensor:
        """The block-grid bool mask (True = pruned) keeping the ``nnz`` largest blocks of every scope.

        Ranked by ``block_scores`` (block-grid or scope layout) when given, else by
        the block norms of ``values``. Exactly ``nnz`` per scope; ties go to the
        block earlier in the scope's row-major order.
        """
        return self.scope_to_block(self._pruned_by_budget(nnz, values, block_scores))

    def hard_threshold(
        self,
        thresholds: Union[Tensor, Number, None] = None,
        nnz: Optional[int] = None,
        values: Values = None,
    ) -> Tensor:
        """Zero blocks in place, by per-scope thresholds or by a budget (exactly one).

        Args:
            thresholds: per-scope thresholds (scope-grid-shaped, broadcasting, or a
                number): blocks whose norm is below their scope's are zeroed.
            nnz: keep exactly the ``nnz`` blocks of largest norm in every scope
                (ties never keep more).
            values: what the norms are taken over (default: the data).

        Returns:
            The block-grid bool mask of the zeroed blocks.
        """
        return self._hard_threshold(thresholds, nnz, values)[0]

    def soft_threshold(
        self,
        thresholds: Union[Tensor, Number],
        conditioners: Values = None,
        scale: float = 1.0,
        max_iter: int = 20,
        atol: float = 1e-8,
        eps: Optional[float] = None,
    ) -> None:
        """The group-lasso step of :meth:`SparseBlock.soft_threshold` with per-scope thresholds.

        Every block of a scope gets ``thresholds[scope] * scale``.
        """
        self._soft_threshold(thresholds, conditioners, scale, max_iter, atol, eps)

    def __repr__(self) -> str:
        return (
            f"ScopeSpec(name={self.name!r}, shape={self.shape}, grid_shape={self.grid_shape}, "
            f"block={self.block!r})"
        )


class ScopeCoupling(_Scopes):
    """Scopes of several ScopeSpecs aligned into one grid; each aligned scope has one joint budget.

    Member ``s``'s scope grid is aligned by ``orders[s]``: coupled scope index
    ``g`` is member scope index ``h`` with ``h[orders[s][j]] = g[j]``. In every
    coupled scope the blocks of all members compete; the scope layout's last
    axis is the concatenation of the members' (in member order).

    Args:
        scopes: the member ScopeSpecs (no BlockSpec may appear in two members).
        orders: one permutation of its scope-grid axes per member (``None`` =
            identity).
        name: an optional name.

    Raises:
        CouplingError: the aligned grids differ, or members share a BlockSpec.
    """

    def __init__(
        self,
        scopes: Sequence[ScopeSpec],
        orders: Optional[Sequence[Optional[Sequence[int]]]] = None,
        name: Optional[str] = None,
    ) -> None:
        scopes = list(scopes)
        if not scopes:
            raise SpecError("`scopes` must hold at least one ScopeSpec")
        for i, s in enumerate(scopes):
            if not isinstance(s, ScopeSpec):
                raise ArgumentTypeError(f"`scopes`[{i}] must be a ScopeSpec, got {type(s).__name__}")
        seen: dict[BlockSpec, ScopeSpec] = {}
        for s in scopes:
            for spec in s.block.block_specs():
                if spec in seen:
                    raise CouplingError(f"{spec!r} is decided by two members, {seen[spec]!r} and {s!r}")
                seen[spec] = s
        if not orders:
            orders = [None] * len(scopes)
        if len(orders) != len(scopes):
            raise SpecError(f"`orders` must have one entry per scope ({len(scopes)}), got {len(orders)}")
        #: The member ScopeSpecs, in order.
        self.scopes: tuple[ScopeSpec, ...] = tuple(scopes)
        #: One permutation of its scope-grid axes per member.
        self.orders: list[tuple[int, ...]] = [
            normalize_order(o, len(s.grid_shape), f"orders[{i}]") for i, (o, s) in enumerate(zip(orders, scopes))
        ]
        self.name = name
        aligned = [tuple(s.grid_shape[a] for a in o) for s, o in zip(scopes, self.orders)]
        for i in range(1, len(scopes)):
            if aligned[i] != aligned[0]:
                raise CouplingError(
                    f"cannot couple {scopes[0]!r} and {scopes[i]!r}: their scope grids {scopes[0].grid_shape} "
                    f"and {scopes[i].grid_shape}, permuted by `orders`[0] = {self.orders[0]} and "
                    f"`orders`[{i}] = {self.orders[i]}, give {aligned[0]} and {aligned[i]}"
                )
        self._grid_shape = aligned[0]
        self._inverse_orders = [inverse_permutation(o) for o in self.orders]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """The aligned scope grid (the first member's, permuted by ``orders[0]``)."""
        return self._grid_shape

    @property
    def members(self) -> tuple[ScopeSpec, ...]:
        """The member ScopeSpecs."""
        return self.scopes

    def numblk_per_scope(self) -> int:
        """Blocks competing in one coupled scope (summed over members)."""
        return sum(s.numblk_per_scope() for s in self.scopes)

    # ------------------------------------------------------------ layout
    def _to_coupled(self, member: int, t: Tensor) -> Tensor:
        order = self.orders[member]
        return t.permute(*order, *range(len(order), t.dim()))

    def _to_member(self, member: int, t: Tensor) -> Tensor:
        inverse = self._inverse_orders[member]
        return t.permute(*inverse, *range(len(inverse), t.dim()))

    def _join(self, pieces: list[Tensor]) -> Tensor:
        dtype = pieces[0].dtype
        for p in pieces[1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return torch.cat([self._to_coupled(i, p).to(device=self.device, dtype=dtype) for i, p in enumerate(pieces)], -1)

    def block_to_scope(self, b: Mapping[object, Tensor]) -> Tensor:
        """Per-block data ``{member ScopeSpec (or its block): block-grid tensor}`` in the joint scope layout."""
        if not isinstance(b, Mapping):
            raise ArgumentTypeError(f"`b` must be a mapping {{member ScopeSpec: block-grid tensor}}, got {type(b).__name__}")
        return self._to_scope_layout(b, "b", None)

    def scope_to_block(self, v: Tensor) -> dict[ScopeSpec, Tensor]:
        """A joint scope-layout tensor as ``{member ScopeSpec: block-grid tensor}``."""
        return dict(zip(self.scopes, self._split(v)))

    def block_norms(self, values: Values = None, p: float = 2) -> Tensor:
        """Block norms in the joint scope layout ``(*grid_shape, numblk_per_scope())``.

        ``values``: None, or ``{BlockSpec: tensor}`` covering every member spec.
        """
        return self._join([s.block_norms(values, p) for s in self.scopes])

    def _to_scope_layout(self, x: MemberTensors, name: str, dtype: Optional[torch.dtype]) -> Tensor:
        if isinstance(x, Mapping):
            return self._join([s._to_scope_layout(x, name, dtype) for s in self.scopes])
        if not isinstance(x, Tensor):
            raise ArgumentTypeError(f"`{name}` must be a tensor or a mapping, got {type(x).__name__}")
        joint = (*self.grid_shape, self.numblk_per_scope())
        if tuple(x.shape) != joint:
            raise ShapeMismatchError(f"{joint} (the joint scope layout)", tuple(x.shape), name)
        if dtype is not None and x.dtype != dtype:
            raise ArgumentTypeError(f"`{name}` must have dtype {dtype}, got {x.dtype}")
        return x.to(self.device)

    def _split(self, joint: Tensor) -> list[Tensor]:
        sizes = [s.numblk_per_scope() for s in self.scopes]
        pieces = joint.split(sizes, dim=-1)
        return [s.scope_to_block(self._to_member(i, p)) for i, (s, p) in enumerate(zip(self.scopes, pieces))]

    # ------------------------------------------------------------ decisions
    def pruned_block_mask(
        self, nnz: int, values: Values = None, block_scores: Optional[MemberTensors] = None
    ) -> dict[ScopeSpec, Tensor]:
        """``{member: block-grid bool mask}`` keeping the ``nnz`` largest blocks of every joint scope."""
        return self.scope_to_block(self._pruned_by_budget(nnz, values, block_scores))

    def hard_threshold(
        self,
        thresholds: Union[Tensor, Number, None] = None,
        nnz: Optional[int] = None,
        values: Values = None,
    ) -> dict[ScopeSpec, Tensor]:
        """Zero blocks of every member in place, by per-scope thresholds or a joint budget (exactly one).

        Returns ``{member ScopeSpec: block-grid mask of the zeroed blocks}``.
        """
        return dict(zip(self.scopes, self._hard_threshold(thresholds, nnz, values)))

    def soft_threshold(
        self,
        thresholds: Union[Tensor, Number],
        conditioners: Values = None,
        scale: float = 1.0,
        max_iter: int = 20,
        atol: float = 1e-8,
        eps: Optional[float] = None,
    ) -> None:
        """:meth:`ScopeSpec.soft_threshold` on every member, with per-coupled-scope thresholds."""
        self._soft_threshold(thresholds, conditioners, scale, max_iter, atol, eps)

    def __iter__(self):
        return iter(self.scopes)

    def __len__(self) -> int:
        return len(self.scopes)

    def __repr__(self) -> str:
        members = ", ".join(repr(s) for s in self.scopes)
        return (
            f"ScopeCoupling(name={self.name!r}, grid_shape={self.grid_shape}, orders={self.orders}, "
            f"scopes=[{members}])"
        )


# ---------------------------------------------------------------- the argument check
def _first_spec_of(scope: Any, params: Sequence[Tensor]) -> list:
    """For each of ``params``, the first block spec of ``scope`` lying on it."""
    specs = scope.block_specs()
    return [next(spec for spec in specs if spec.view.param is param) for param in params]


def check_scope(scope: Any, name: str = "scope", *, ndim: Optional[int] = None) -> list[Tensor]:
    """A pattern a pruner may prune: a ScopeSpec or ScopeCoupling over weights
    :func:`~s3sparse.checks.check_weight` and :func:`~s3sparse.checks.check_finite`
    accept (data, floating point, not empty, no NaN/Inf).

    Returns the distinct parameters behind the scope, in member order.
    """
    label = _arg(name)
    if not isinstance(scope, (ScopeSpec, ScopeCoupling)):
        hint = ""
        if isinstance(scope, tuple) and len(scope) == 2 and isinstance(scope[0], (ScopeSpec, ScopeCoupling)):
            hint = "; the patterns.* constructors return `(scope, nnz)`: unpack it, `scope, nnz = patterns.nm(W)`"
        elif isinstance(scope, SparseBlock):
            hint = "; wrap the blocks in a scope, e.g. `ScopeSpec(block, shape=(1, 4))`"
        raise ArgumentTypeError(
            f"{label} must be a ScopeSpec or ScopeCoupling, got {type(scope).__name__}{hint}"
        )
    params: list[Tensor] = []
    for spec in scope.block_specs():
        param = spec.view.param
        if any(param is p for p in params):
            continue
        which = f"the weight behind {label}" if len(scope.block_specs()) == 1 else f"a weight behind {label} ({spec!r})"
        check_weight(param, which, ndim=ndim)
        params.append(param)
    for spec, param in zip(_first_spec_of(scope, params), params):
        which = f"the weight behind {label}" if len(params) == 1 else f"a weight behind {label}"
        name = getattr(spec, "name", None)
        check_finite(param, which, detail=f"under block {name!r}" if name else "")
    return params
