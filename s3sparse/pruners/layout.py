"""Where the blocks and scopes of a ScopeSpec sit in the 2-D weight they prune.

Second-order pruners (SparseGPT, Structured OBS) need, for every scope, the
(row, column) of each element of each of its blocks: they act on columns of the
weight (the Hessian is over input columns) while the pattern is expressed on an
arbitrary strided View. This module turns a ScopeSpec into index tensors once;
the algorithms then never look at strides again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch import Tensor

from ..block import BlockCoupling
from ..checks import check_nnz
from ..errors import ArgumentError
from ..scope import ScopeCoupling, check_scope
from ..view import View

__all__ = ["ScopeLayout", "RowGroups", "scope_layout", "row_groups", "row_components", "restrict_rows"]


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


def _spec_offsets(spec) -> Tensor:
    """Storage offsets of the view elements of ``spec``, shaped ``(*grid_shape, *block_shape)``."""
    view = spec.view
    return View.block_view_of(view.all_offsets().view(view.shape), spec.shape, reorder=True)


def scope_layout(scope) -> ScopeLayout:
    """Index tensors of a ScopeSpec whose blocks all lie on one 2-D weight.

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
    device = param.device
    grid = tuple(int(g) for g in scope.block.grid_shape)
    parts = []
    for spec, order in zip(specs, orders):
        off = _spec_offsets(spec)
        n = len(spec.grid_shape)
        off = off.permute(*order, *range(n, 2 * n)).reshape(*grid, -1)
        parts.append(off)
    offsets = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    # Tile the block grid by scopes: (S0, s0, S1, s1, ..., bk) -> (S0, S1, ..., s0, s1, ..., bk).
    scope_shape = tuple(int(s) for s in scope.shape)
    if len(scope_shape) != len(grid):
        raise ArgumentError(f"scope shape {scope_shape} must have one entry per block-grid dim {grid}")
    tiled = []
    for g, s in zip(grid, scope_shape):
        tiled += [g // s, s]
    m = len(grid)
    bk = offsets.shape[-1]
    offsets = offsets.reshape(*tiled, bk).permute(*range(0, 2 * m, 2), *range(1, 2 * m, 2), 2 * m)
    offsets = offsets.reshape(-1, math.prod(scope_shape), bk).to(device)
    rc = specs[0].view.offsets_to_param_index(offsets)  # (..., 2): row, column
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


def count_subsets(blocks_per_scope: int, num_prune: int) -> int:
    return math.comb(blocks_per_scope, num_prune)


def normalize_nnz(nnz: int, blocks_per_scope: int) -> int:
    """Validate ``nnz`` against the scope size and return it as an int (:func:`s3sparse.checks.check_nnz`)."""
    return check_nnz(nnz, blocks_per_scope)
