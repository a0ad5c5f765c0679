"""Where the blocks and scopes of a ScopeSpec sit in the 2-D weight they prune: the one scope geometry.

A ScopeSpec over a strided View orders its elements as scope (row-major over
the scope grid), block within the scope (row-major over the scope shape) and
element within the block (row-major over the block shape). Because a View is
strided, the offset of element ``e`` of in-scope block ``g`` of scope ``s`` is
``Σ_d idx_d(s)·scope_stride[d] + block_off[g] + elem_off[e]``: a
:class:`ScopeGeometry`, derived here from the view's strides by
:func:`scope_geometry`. Everything else uses it:

* second-order pruners (SparseGPT, Structured OBS) need, for every scope, the
  (row, column) of each element of each of its blocks: they act on columns of
  the weight (the Hessian is over input columns). :func:`scope_layout` turns a
  ScopeSpec (or a ScopeSpec over a coupling of blocks on one weight) into those
  index tensors once, from the geometry of each member; the algorithms then
  never look at strides again.
* the packed format (:mod:`s3sparse.sparse.format`) stores the geometry itself,
  expressed in row-major positions of the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..block import BlockCoupling
from ..checks import check_nnz
from ..errors import ArgumentError
from ..scope import ScopeCoupling, check_scope

__all__ = [
    "ScopeGeometry",
    "scope_geometry",
    "scope_bases",
    "ScopeLayout",
    "RowGroups",
    "scope_layout",
    "row_groups",
    "row_components",
    "restrict_rows",
]


@dataclass(frozen=True)
class ScopeGeometry:
    """Where every block element of a ScopeSpec lies, as offsets in one linear index of its weight.

    The index is the parameter's storage offset (relative to the parameter's
    own) unless :func:`scope_geometry` was given other strides (the packed
    format uses row-major positions ``i·K + j``).

    Attributes:
        scope_grid: the ScopeSpec's own scope grid (``scope.grid_shape``); its
            row-major order is the scope order.
        scope_shape: the same grid with size-1 dims dropped and contiguous dims
            merged (the same row-major order, fewer dims for the kernels).
        scope_stride: offset stride of each dim of ``scope_shape``.
        block_off: (G,) int64 offset of every in-scope block of scope 0 (the
            view's own offset included), in-scope blocks row-major over the
            scope shape, as :meth:`ScopeSpec.block_norms` orders them.
        elem_off: (B,) int64 offset of every element of a block, row-major
            over the block shape, relative to the block's first element.
    """

    scope_grid: tuple[int, ...]
    scope_shape: tuple[int, ...]
    scope_stride: tuple[int, ...]
    block_off: Tensor
    elem_off: Tensor

    def offsets(self) -> Tensor:
        """Every element's offset, ``(S, G, B)`` int64: scopes, their blocks, the blocks' elements."""
        bases = scope_bases(self.scope_shape, self.scope_stride)
        return bases[:, None, None] + self.block_off[None, :, None] + self.elem_off[None, None, :]


def _offsets(sizes: Sequence[int], strides: Sequence[int], origin: int) -> Tensor:
    """Row-major offsets ``origin + Σ i_d·strides[d]`` over ``sizes``, as a 1-D int64 tensor."""
    out = torch.tensor([origin], dtype=torch.int64)
    for size, step in zip(sizes, strides):
        out = (out[:, None] + torch.arange(size, dtype=torch.int64) * step).reshape(-1)
    return out


def scope_bases(scope_shape: Sequence[int], scope_stride: Sequence[int], device=None) -> Tensor:
    """``Σ_d idx_d(s)·scope_stride[d]`` of every scope ``s`` (row-major over ``scope_shape``), int64 (S,)."""
    base = torch.zeros((), dtype=torch.int64, device=device)
    for n, st in zip(scope_shape, scope_stride):
        base = (base.reshape(-1, 1) + torch.arange(n, dtype=torch.int64, device=device) * st).reshape(-1)
    return base.reshape(-1)


def _tile(
    block_grid: Sequence[int], grid_stride: Sequence[int], per_scope: Sequence[int],
    block_shape: Sequence[int], elem_stride: Sequence[int], origin: int,
) -> ScopeGeometry:
    """The geometry of scopes of ``per_scope`` blocks tiling a block grid.

    ``grid_stride[d]``: offset between neighbouring blocks along grid dim ``d``;
    ``elem_stride``: offsets between neighbouring elements of a block, along
    the block's own dims; ``origin``: the first element's offset.
    """
    scope_grid = tuple(int(g) // int(s) for g, s in zip(block_grid, per_scope))
    full_stride = tuple(int(s) * int(st) for s, st in zip(per_scope, grid_stride))
    block_off = _offsets(per_scope, grid_stride, origin)
    elem_off = _offsets(block_shape, elem_stride, 0)
    # Drop size-1 scope dims and merge dims d, d+1 whose strides chain (same row-major order).
    shape: list[int] = []
    stride: list[int] = []
    for n, st in zip(scope_grid, full_stride):
        if n == 1:
            continue
        if shape and stride[-1] == n * st:
            shape[-1] *= n
            stride[-1] = st
        else:
            shape.append(n)
            stride.append(st)
    return ScopeGeometry(scope_grid, tuple(shape), tuple(stride), block_off, elem_off)


def scope_geometry(
    scope, *, strides: Optional[Sequence[int]] = None, origin: Optional[int] = None
) -> ScopeGeometry:
    """The :class:`ScopeGeometry` of a ScopeSpec over one BlockSpec.

    A view dim of size ``Sg·sc·b`` (scopes × blocks per scope × block) splits its
    index into scope, in-scope block and element parts, which is exactly how
    ``ScopeSpec.block_to_scope`` and ``BlockSpec.block_view(merge=True)`` order
    scopes, blocks and elements.

    Args:
        scope: a ScopeSpec whose block is a BlockSpec.
        strides, origin: the offset steps of the view's dims and of its first
            element in another linear index of the weight (e.g. row-major
            positions); by default the view's own storage strides and offset.
    """
    block = scope.block
    view = block.view
    strides = tuple(view.stride) if strides is None else tuple(strides)
    origin = int(view.offset) if origin is None else int(origin)
    grid_stride = [b * s for b, s in zip(block.shape, strides)]
    return _tile(block.grid_shape, grid_stride, scope.shape, block.shape, strides, origin)


def _member_offsets(spec, order: Sequence[int], per_scope: Sequence[int]) -> Tensor:
    """Storage offsets ``(S, G, B)`` of a coupling member's blocks, its grid aligned by ``order``."""
    view = spec.view
    grid_stride = [b * s for b, s in zip(spec.shape, view.stride)]
    grid = [spec.grid_shape[a] for a in order]
    geometry = _tile(grid, [grid_stride[a] for a in order], per_scope, spec.shape, view.stride, view.offset)
    return geometry.offsets()


@dataclass(frozen=True)
class ScopeLayout:
    """Element positions of every scope of a pattern on one (M, K) weight.

    ``rows[s, j, e]`` / ``cols[s, j, e]``: row and column of element ``e`` of block
    ``j`` (row-major within the scope) of scope ``s`` (row-major over the scope
    grid). Every scope has the same ``blocks_per_scope`` and ``block_numel``.
    """

    param: Tensor
    rows: Tensor
    cols: Tensor

    @property
    def num_rows(self) -> int:
        return self.param.shape[0]

    @property
    def num_cols(self) -> int:
        return self.param.shape[1]

    @property
    def num_scopes(self) -> int:
        return self.rows.shape[0]

    @property
    def blocks_per_scope(self) -> int:
        return self.rows.shape[1]

    @property
    def block_numel(self) -> int:
        return self.rows.shape[2]

    @property
    def elems_per_scope(self) -> int:
        return self.blocks_per_scope * self.block_numel


@dataclass(frozen=True)
class RowGroups:
    """The rows of a weight partitioned into groups that scopes never cross.

    A pattern whose scopes each lie in one row has one group per row; a pattern
    whose scopes span rows p and p+8 (the row-coupled 16-column pattern) has
    groups {p, p+8}. The pruners hold every row of a group together.

    ``rows[r]``: the weight rows of group ``r`` (ascending). ``scope_ids[r, g]``:
    the g-th scope of group r, scopes ordered by first column. Because patterns
    are regular, the g-th scope of every group has the same columns ``cols[g]``
    (E,) and the same row positions within its group ``local_rows[g]`` (E,).
    """

    rows: Tensor
    scope_ids: Tensor
    cols: Tensor
    local_rows: Tensor

    @property
    def num_groups(self) -> int:
        return self.rows.shape[0]

    @property
    def rows_per_group(self) -> int:
        return self.rows.shape[1]

    @property
    def scopes_per_group(self) -> int:
        return self.scope_ids.shape[1]


def _block_members(block) -> tuple[list, list[tuple[int, ...]]]:
    """The BlockSpecs behind a block node and the axis order aligning each to the node's grid."""
    if isinstance(block, BlockCoupling):
        return list(block.specs), [tuple(int(a) for a in o) for o in block.orders]
    return [block], [tuple(range(len(block.grid_shape)))]


def scope_layout(scope) -> ScopeLayout:
    """Index tensors of a ScopeSpec whose blocks all lie on one 2-D weight.

    The elements of a block of a coupling are the members' blocks' elements,
    member after member.

    Raises an :class:`~s3sparse.errors.ArgumentError` (a ``ValueError``) for a
    ScopeCoupling or blocks on several parameters (second-order pruners use one
    layer's Hessian), and the errors of :func:`~s3sparse.scope.check_scope`
    for anything that is not a scope over a 2-D floating-point weight with data.
    """
    check_scope(scope)
    if isinstance(scope, ScopeCoupling):
        raise ArgumentError(
            "`scope` is a ScopeCoupling: second-order pruners (SparseGPT, Structured OBS) prune one weight "
            "with its own Hessian, and a ScopeCoupling spans several parameters — prune it with magnitude() or obd(), "
            "or prune each member scope separately"
        )
    specs, orders = _block_members(scope.block)
    param = specs[0].view.param
    for spec in specs[1:]:
        if spec.view.param is not param:
            raise ArgumentError(
                "`scope` couples blocks of different parameters; second-order pruners need all "
                "blocks on one weight matrix — use magnitude() or obd() for cross-parameter couplings"
            )
    if param.dim() != 2:
        raise ArgumentError(
            "second-order pruners need a 2-D weight (out_features, in_features) behind `scope`, "
            f"got shape {tuple(param.shape)}"
        )
    grid = tuple(int(g) for g in scope.block.grid_shape)
    scope_shape = tuple(int(s) for s in scope.shape)
    if len(scope_shape) != len(grid):
        raise ArgumentError(f"scope shape {scope_shape} must have one entry per block-grid dim {grid}")
    parts = [_member_offsets(spec, order, scope_shape) for spec, order in zip(specs, orders)]
    offsets = (torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]).to(param.device)
    rc = specs[0].view.offsets_to_param_index(offsets)  # (S, G, B, 2): row, column
    rows, cols = rc[..., 0], rc[..., 1]
    if len(specs) > 1 and torch.unique(rows * param.shape[1] + cols).numel() != rows.numel():
        raise ArgumentError("the coupled blocks of this scope overlap: an element belongs to two blocks")
    return ScopeLayout(param=param, rows=rows, cols=cols)


def _connected_row_labels(rows: Tensor, num_rows: int) -> Tensor:
    """Smallest row of the connected component of each row (rows linked by sharing a scope)."""
    label = torch.arange(num_rows, device=rows.device)
    if rows.numel() == 0:
        return label
    flat = rows.reshape(rows.shape[0], -1)
    while True:
        scope_min = label[flat].amin(dim=1, keepdim=True).expand_as(flat)
        new = label.scatter_reduce(0, flat.reshape(-1), scope_min.reshape(-1), reduce="amin")
        new = new[new]  # pointer jumping: follow labels to their root
        if torch.equal(new, label):
            return label
        label = new


def row_groups(layout: ScopeLayout) -> RowGroups:
    """Partition the weight's rows into independent groups (see :class:`RowGroups`)."""
    NS, E = layout.num_scopes, layout.elems_per_scope
    rows = layout.rows.reshape(NS, E)
    cols = layout.cols.reshape(NS, E)
    device = rows.device
    label = _connected_row_labels(rows, layout.num_rows)
    scope_group = label[rows[:, 0]]
    groups, group_of_scope = torch.unique(scope_group, return_inverse=True)
    R = groups.numel()
    used_rows = torch.unique(rows)
    row_order = torch.sort(label[used_rows], stable=True).indices
    if used_rows.numel() % max(R, 1) != 0:
        raise ArgumentError("this pattern's row groups have different sizes; it cannot be pruned row-group-wise")
    group_rows = used_rows[row_order].reshape(R, -1)
    if not torch.equal(label[group_rows], groups.unsqueeze(1).expand_as(group_rows)):
        raise ArgumentError("this pattern's row groups have different sizes; it cannot be pruned row-group-wise")
    if NS % max(R, 1) != 0:
        raise ArgumentError("this pattern's row groups hold different numbers of scopes")
    first_col = cols.amin(dim=1)
    key = group_of_scope * (layout.num_cols + 1) + first_col
    scope_ids = torch.sort(key, stable=True).indices.reshape(R, -1)
    if not torch.equal(group_of_scope[scope_ids], torch.arange(R, device=device).unsqueeze(1).expand_as(scope_ids)):
        raise ArgumentError("this pattern's row groups hold different numbers of scopes")
    rpc = group_rows.shape[1]
    row_to_local = torch.full((layout.num_rows,), -1, dtype=torch.long, device=device)
    row_to_local[group_rows.reshape(-1)] = torch.arange(rpc, device=device).repeat(R)
    g_cols = cols[scope_ids]
    g_local = row_to_local[rows[scope_ids]]
    if not (torch.equal(g_cols, g_cols[:1].expand_as(g_cols)) and torch.equal(g_local, g_local[:1].expand_as(g_local))):
        raise ArgumentError(
            "this pattern is not regular across row groups (the g-th scope of each group does not use "
            "the same columns); Structured OBS needs a regular pattern — use SparseGPT for this one"
        )
    return RowGroups(rows=group_rows, scope_ids=scope_ids, cols=g_cols[0], local_rows=g_local[0])


def row_components(layout: ScopeLayout) -> list[Tensor]:
    """Every row of the weight in its connected set of rows that share a scope, for any pattern.

    Unlike :func:`row_groups` this needs no regularity: the sets may differ in
    size, and a row no scope touches is a set of its own. Sets are ordered by
    their smallest row, each ascending. Pruning one set never reads another
    (second-order pruners are row-independent given H), so sets can be pruned
    apart, e.g. on different ranks.
    """
    M = layout.num_rows
    label = _connected_row_labels(layout.rows.reshape(layout.num_scopes, -1), M).cpu()
    order = torch.sort(label, stable=True).indices  # rows by set, ascending within a set
    sizes = torch.unique_consecutive(label[order], return_counts=True)[1].tolist()
    return [part.to(layout.rows.device) for part in order.split(sizes)]


def restrict_rows(layout: ScopeLayout, rows: Tensor, param: Tensor) -> ScopeLayout:
    """The layout of the scopes lying on ``rows`` (whole row sets, see :func:`row_components`),
    renumbered onto ``param``, the (len(rows), K) tensor of those rows in the order of ``rows``."""
    local = torch.full((layout.num_rows,), -1, dtype=torch.long, device=layout.rows.device)
    local[rows] = torch.arange(rows.numel(), device=layout.rows.device)
    scope_local = local[layout.rows]  # (S, blocks, elems)
    mine = (scope_local >= 0).reshape(layout.num_scopes, -1)
    keep = mine.all(dim=1)
    if not torch.equal(keep, mine.any(dim=1)):
        raise ArgumentError("`rows` splits a scope between two row sets; give whole sets of row_components()")
    return ScopeLayout(param=param, rows=scope_local[keep], cols=layout.cols[keep])


def block_subsets(blocks_per_scope: int, num_prune: int, block_numel: int, device) -> tuple[Tensor, Tensor]:
    """All ways to prune ``num_prune`` of a scope's blocks.

    Returns ``(block_sets, element_sets)``: (S, num_prune) block indices and the
    (S, num_prune * block_numel) element indices within the scope they cover.
    """
    from itertools import combinations

    combos = list(combinations(range(blocks_per_scope), num_prune))
    block_sets = torch.tensor(combos, dtype=torch.long, device=device).reshape(len(combos), num_prune)
    elems = block_sets.unsqueeze(-1) * block_numel + torch.arange(block_numel, device=device)
    return block_sets, elems.reshape(len(combos), num_prune * block_numel)


def subset_ranks(block_sets: Tensor, blocks_per_scope: int) -> Tensor:
    """The index in :func:`block_subsets`' order (lexicographic) of each set of blocks:
    ``block_sets`` (N, k) ascending block indices → (N,) int64. The rank of
    ``c_0 < … < c_{k-1}`` among the k-subsets of n blocks is ``C(n, k) - 1 - Σ_i C(n-1-c_i, k-i)``."""
    n, k = blocks_per_scope, block_sets.shape[1]
    binom = torch.tensor([[math.comb(a, b) for b in range(k + 1)] for a in range(n)], dtype=torch.long,
                         device=block_sets.device)  # binom[a, b] = C(a, b), a < n
    taken = binom[n - 1 - block_sets, torch.arange(k, 0, -1, device=block_sets.device)]  # (N, k)
    return math.comb(n, k) - 1 - taken.sum(dim=1)


def count_subsets(blocks_per_scope: int, num_prune: int) -> int:
    return math.comb(blocks_per_scope, num_prune)


def normalize_nnz(nnz: int, blocks_per_scope: int) -> int:
    """Validate ``nnz`` against the scope size and return it as an int (:func:`s3sparse.checks.check_nnz`)."""
    return check_nnz(nnz, blocks_per_scope)
