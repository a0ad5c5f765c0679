"""Pictures of sparsity patterns: which weights form a block, which blocks compete.

:func:`draw_layout` draws a pattern on a small 2-D weight (16 × 32 by default)
as a grid of cells, one per weight (row = output channel, column = input
feature):

* **fill colour = block** — all weights of one block share a colour, even when
  the view makes them non-adjacent (coupled columns, rows 8 apart); white
  lines separate blocks. Colours are assigned so that nearby blocks differ;
  far-apart blocks may reuse one (the palette has 30 colours);
* **outline colour and number = scope** — every connected piece of a scope is
  outlined just inside its cells in the scope's colour and labelled with the
  scope's (row-major) number, so a scope split by the view into several
  pieces reads as one;
* **grey with a cross = pruned** — with ``nnz``, a second panel shows what
  ``scope.get_masks(nnz, values)`` prunes (the parameter is not modified).

matplotlib is imported only when a picture is drawn (``pip install s3sparse[viz]``);
importing this module costs nothing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .errors import ArgumentError, ArgumentTypeError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["draw_layout", "element_layout", "ElementLayout"]

MAX_CELLS = 1 << 16


def _require_matplotlib() -> Any:
    """Import matplotlib's object-oriented pieces, or explain how to install them."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "s3sparse.viz.draw_layout needs matplotlib, which is not installed; "
            "install it with `pip install s3sparse[viz]` (or `pip install matplotlib`)"
        ) from exc
    return Figure


# ------------------------------------------------------------------ geometry
@dataclass
class ElementLayout:
    """Where every weight of a 2-D parameter sits in a pattern (all ``(M, K)`` int64 tensors).

    Attributes:
        block: global row-major index of the element's block in the block grid
            (``-1`` for elements the view does not cover).
        scope: row-major index of the element's scope in the scope grid (``-1`` idem).
        slot: row-major position of the element's block inside its scope,
            ``0 … numblk_per_scope − 1`` (the order of ``ScopeSpec.block_norms``).
        view_index: for each element of the *view*, the flat index into the
            parameter it aliases (view-shaped).
    """

    block: Tensor
    scope: Tensor
    slot: Tensor
    view_index: Tensor


def _scope_parts(scope: Any) -> Tuple[Any, Any]:
    """``(block_spec, view)`` of a ScopeSpec."""
    block = None
    for attr in ("block", "block_spec", "spec"):
        block = getattr(scope, attr, None)
        if block is not None:
            break
    if block is None:
        raise ArgumentTypeError(
            f"draw_layout: expected a ScopeSpec over one BlockSpec, got {type(scope).__name__} "
            "(a ScopeCoupling spans several tensors: draw each member scope)"
        )
    view = getattr(block, "view", None)
    if view is None:
        raise ArgumentTypeError(
            f"draw_layout: expected a ScopeSpec over one BlockSpec, got one over {type(block).__name__} "
            "(a coupling spans several tensors: draw a scope over each member BlockSpec)"
        )
    return block, view


def _ravel(coords: Sequence[Tensor], shape: Sequence[int]) -> Tensor:
    """Row-major flat index of the coordinate tensors ``coords`` in a grid of ``shape``."""
    flat = torch.zeros_like(coords[0])
    for c, s in zip(coords, shape):
        flat = flat * int(s) + c
    return flat


def element_layout(scope: Any) -> ElementLayout:
    """Block, scope and in-scope slot of every element of a ScopeSpec's 2-D parameter.

    Computed from the geometry alone (view shape, strides and offset; block and
    scope grids), so it shows what the specification *says*, independently of
    how the pruning code reads it.

    Raises:
        ValueError: the parameter is not 2-D.
    """
    block, view = _scope_parts(scope)
    param = view.param
    if param.ndim != 2:
        raise ArgumentError(f"draw_layout: draws 2-D parameters only, got shape {tuple(param.shape)}")
    M, K = param.shape
    rs, cs = param.stride()
    vshape = [int(s) for s in view.shape]
    vstride = [int(s) for s in view.stride]
    voff = int(getattr(view, "offset", 0) or 0)
    bgrid = [int(g) for g in block.grid_shape]
    sgrid = [int(g) for g in scope.grid_shape]

    # storage position -> flat parameter index (-1: not an element of the parameter)
    rows = torch.arange(M).unsqueeze(1)
    cols = torch.arange(K).unsqueeze(0)
    storage = (rows * rs + cols * cs).reshape(-1)
    lut = torch.full((int(storage.max()) + 1 if storage.numel() else 1,), -1, dtype=torch.int64)
    lut[storage] = torch.arange(M * K)
    span = voff + sum((s - 1) * st for s, st in zip(vshape, vstride)) + 1
    if span > lut.numel():
        lut = torch.cat([lut, torch.full((span - lut.numel(),), -1, dtype=torch.int64)])
    view_index = torch.as_strided(lut, vshape, vstride, voff)

    bshape = [s // g for s, g in zip(vshape, bgrid)]
    sshape = [g // s for g, s in zip(bgrid, sgrid)]
    idx = torch.meshgrid(*[torch.arange(s) for s in vshape], indexing="ij")
    bcoord = [i // b for i, b in zip(idx, bshape)]
    block_id = _ravel(bcoord, bgrid)
    scope_id = _ravel([c // s for c, s in zip(bcoord, sshape)], sgrid)
    slot = _ravel([c % s for c, s in zip(bcoord, sshape)], sshape)

    out = [torch.full((M * K,), -1, dtype=torch.int64) for _ in range(3)]
    valid = view_index >= 0
    for o, src in zip(out, (block_id, scope_id, slot)):
        o[view_index[valid]] = src[valid]
    return ElementLayout(
        block=out[0].view(M, K), scope=out[1].view(M, K), slot=out[2].view(M, K), view_index=view_index
    )


def _pruned_mask(scope: Any, nnz: int, values: Optional[Tensor], layout: ElementLayout) -> Tensor:
    """``(M, K)`` bool, True where ``scope.get_masks(nnz, values)`` prunes."""
    block, view = _scope_parts(scope)
    param = view.param
    masks = scope.get_masks(nnz, values=values)
    pruned = torch.zeros(param.shape, dtype=torch.bool)
    for mask in masks.values():
        mask = mask.detach().to("cpu", torch.bool)
        if tuple(mask.shape) == tuple(view.shape):  # BlockSpec.get_masks: view-shaped
            flat = pruned.view(-1)
            idx = layout.view_index[mask]
            flat[idx[idx >= 0]] = True
        elif tuple(mask.shape) == tuple(param.shape):
            pruned |= mask
        else:
            raise ArgumentError(
                f"draw_layout: get_masks returned a mask of shape {tuple(mask.shape)}, neither the parameter's "
                f"{tuple(param.shape)} nor the view's {tuple(view.shape)}"
            )
    return pruned


# ------------------------------------------------------------------ colours
def _hex(colours: Sequence[str]) -> list[Tuple[float, float, float]]:
    return [tuple(int(h[i : i + 2], 16) / 255 for i in (1, 3, 5)) for h in colours]  # type: ignore[misc]


#: Light fill colours for blocks (no greys: grey means pruned), consecutive entries of different hue.
BLOCK_FILLS = _hex([
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#dbdb8d", "#9edae5", "#f7b6d2",
    "#c49c94", "#8dd3c7", "#fdb462", "#bebada", "#b3de69", "#fb8072", "#80b1d3", "#ffed6f",
    "#bc80bd", "#ccebc5", "#fccde5", "#e5d8bd", "#b3cde3", "#fed9a6", "#decbe4", "#ffffb3",
    "#66c2a5", "#e78ac3", "#d8b365", "#8da0cb", "#a6d854", "#e5c494",
])

#: Dark outline colours for scopes, all readable on every fill.
SCOPE_EDGES = _hex([
    "#000000", "#d62728", "#1f3fb4", "#2ca02c", "#9400d3", "#e66100", "#8c564b", "#e7298a",
    "#008b8b", "#808000", "#5f9ea0", "#800000", "#4b9a00", "#b8860b", "#ff1493", "#606060",
])

PRUNED_GREY = (0.93, 0.93, 0.93)


def _assign_colours(ids: Tensor, ncolours: int, dilate: int = 1, max_groups: int = 4096) -> dict[int, int]:
    """A colour index per id of the ``(M, K)`` grid ``ids`` (``-1`` ignored).

    Two ids whose bounding boxes, grown by ``dilate`` cells, intersect get
    different colours whenever the palette allows (greedy, in reading order,
    taking the first free colour after the last one used so that colours
    spread); far-apart ids may share one. More than ``max_groups`` ids fall back
    to ``id mod ncolours``.
    """
    M, K = ids.shape
    uniq = torch.unique(ids[ids >= 0])
    if uniq.numel() == 0:
        return {}
    if uniq.numel() > max_groups:
        return {int(u): int(u) % ncolours for u in uniq}
    rows = torch.arange(M).unsqueeze(1).expand(M, K)
    cols = torch.arange(K).unsqueeze(0).expand(M, K)
    valid = ids >= 0
    pos = torch.searchsorted(uniq, ids[valid])
    big = M + K + 1
    rmin = torch.full((uniq.numel(),), big).scatter_reduce(0, pos, rows[valid], "amin")
    rmax = torch.full((uniq.numel(),), -1).scatter_reduce(0, pos, rows[valid], "amax")
    cmin = torch.full((uniq.numel(),), big).scatter_reduce(0, pos, cols[valid], "amin")
    cmax = torch.full((uniq.numel(),), -1).scatter_reduce(0, pos, cols[valid], "amax")
    conflict = (
        (rmin.unsqueeze(1) <= rmax.unsqueeze(0) + dilate)
        & (rmin.unsqueeze(0) <= rmax.unsqueeze(1) + dilate)
        & (cmin.unsqueeze(1) <= cmax.unsqueeze(0) + dilate)
        & (cmin.unsqueeze(0) <= cmax.unsqueeze(1) + dilate)
    )
    order = sorted(range(uniq.numel()), key=lambda i: (int(rmin[i]), int(cmin[i]), int(uniq[i])))
    colour = [-1] * uniq.numel()
    last = -1
    for i in order:
        taken = {colour[j] for j in conflict[i].nonzero().flatten().tolist() if colour[j] >= 0}
        choice = None
        for step in range(1, ncolours + 1):
            cand = (last + step) % ncolours
            if cand not in taken:
                choice = cand
                break
        if choice is None:  # more neighbours than colours: reuse the next one
            choice = (last + 1) % ncolours
        colour[i] = last = choice
    return {int(u): c for u, c in zip(uniq.tolist(), colour)}


def _pieces(scp: list[list[int]]) -> list[Tuple[int, float, float]]:
    """``(scope, x, y)`` label positions: one per connected piece of every scope.

    Each piece (4-connected cells of one scope) is labelled at the member cell
    nearest its centroid.
    """
    M, K = len(scp), len(scp[0])
    seen = [[False] * K for _ in range(M)]
    out = []
    for r0 in range(M):
        for c0 in range(K):
            s = scp[r0][c0]
            if s < 0 or seen[r0][c0]:
                continue
            stack, cells = [(r0, c0)], []
            seen[r0][c0] = True
            while stack:
                r, c = stack.pop()
                cells.append((r, c))
                for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                    if 0 <= rr < M and 0 <= cc < K and not seen[rr][cc] and scp[rr][cc] == s:
                        seen[rr][cc] = True
                        stack.append((rr, cc))
            cy = sum(r for r, _ in cells) / len(cells) + 0.5
            cx = sum(c for _, c in cells) / len(cells) + 0.5
            if (int(cy), int(cx)) in set(cells):
                out.append((s, cx, cy))
            else:
                r, c = min(cells, key=lambda rc: (rc[0] + 0.5 - cy) ** 2 + (rc[1] + 0.5 - cx) ** 2)
                out.append((s, c + 0.5, r + 0.5))
    return out


def _resolve(scope_or_pattern: Any, shape: Tuple[int, int], seed: int) -> Tuple[Any, Optional[int], str]:
    """``(scope, default nnz, title)`` for a ScopeSpec, a ``(scope, nnz)`` pair, a name or a constructor."""
    from . import patterns

    if isinstance(scope_or_pattern, tuple) and len(scope_or_pattern) == 2:
        scope, nnz = scope_or_pattern
        return scope, int(nnz), str(getattr(scope, "name", "") or "")
    if isinstance(scope_or_pattern, str) or callable(scope_or_pattern) and not hasattr(scope_or_pattern, "grid_shape"):
        g = torch.Generator().manual_seed(seed)
        weight = torch.nn.Parameter(torch.randn(shape, generator=g))
        if isinstance(scope_or_pattern, str):
            scope, nnz = patterns.by_name(scope_or_pattern, weight)
            title = scope_or_pattern
        else:
            scope, nnz = scope_or_pattern(weight)
            title = str(getattr(scope, "name", "") or getattr(scope_or_pattern, "name", "") or "")
        return scope, int(nnz), title
    return scope_or_pattern, None, str(getattr(scope_or_pattern, "name", "") or "")


def _describe(scope: Any) -> str:
    block, view = _scope_parts(scope)
    vs = "×".join(str(int(s)) for s in view.shape)
    st = ",".join(str(int(s)) for s in view.stride)
    bshape = tuple(int(s) // int(g) for s, g in zip(view.shape, block.grid_shape))
    sshape = tuple(int(g) // int(s) for g, s in zip(block.grid_shape, scope.grid_shape))
    return f"view ({vs}):({st})   block {bshape}   scope {sshape} blocks"


# ------------------------------------------------------------------ drawing
def _outline_segments(scp: list[list[int]], inset: float) -> Tuple[list, list]:
    """Inset boundary segments of every scope region, with the scope id of each.

    A cell gets a line on each side whose neighbour lies in another scope (or
    off the grid), drawn ``inset`` inside the cell; a line runs on through the
    cell boundary when the next cell along it continues the same boundary, so a
    contiguous part of a scope is outlined by one unbroken rectangle.
    """
    M, K = len(scp), len(scp[0])

    def same(r: int, c: int, s: int) -> bool:
        return 0 <= r < M and 0 <= c < K and scp[r][c] == s

    segs, ids = [], []
    for r in range(M):
        for c in range(K):
            s = scp[r][c]
            if s < 0:
                continue
            left, right = not same(r, c - 1, s), not same(r, c + 1, s)
            up, down = not same(r - 1, c, s), not same(r + 1, c, s)
            x0 = c + (inset if left else 0.0)
            x1 = c + 1 - (inset if right else 0.0)
            y0 = r + (inset if up else 0.0)
            y1 = r + 1 - (inset if down else 0.0)
            if up:
                segs.append([(x0, r + inset), (x1, r + inset)])
                ids.append(s)
            if down:
                segs.append([(x0, r + 1 - inset), (x1, r + 1 - inset)])
                ids.append(s)
            if left:
                segs.append([(c + inset, y0), (c + inset, y1)])
                ids.append(s)
            if right:
                segs.append([(c + 1 - inset, y0), (c + 1 - inset, y1)])
                ids.append(s)
    return segs, ids


def _draw_panel(
    ax: Any,
    blk: list[list[int]],
    scp: list[list[int]],
    prn: Optional[list[list[bool]]],
    fill_of: dict[int, Tuple[float, float, float]],
    edge_of: dict[int, Tuple[float, float, float]],
    cell_size: float,
    labels: bool,
    top_ticks: bool,
    ylabel: str = "",
) -> None:
    """One grid of cells: block fill colours (grey where pruned), scope outlines, scope labels."""
    from matplotlib.collections import LineCollection, PatchCollection
    from matplotlib.patches import Rectangle

    M, K = len(blk), len(blk[0])
    ax.set_xlim(0, K)
    ax.set_ylim(M, 0)
    ax.set_aspect("equal")

    rects, colours = [], []
    for r in range(M):
        for c in range(K):
            b = blk[r][c]
            rects.append(Rectangle((c, r), 1, 1))
            if b < 0:
                colours.append((1.0, 1.0, 1.0))
            elif prn is not None and prn[r][c]:
                colours.append(PRUNED_GREY)
            else:
                colours.append(fill_of[b])
    ax.add_collection(PatchCollection(rects, facecolors=colours, edgecolors="none", linewidths=0.0))

    # white separators: bold between different blocks, hairline inside a block
    between, inside = [], []
    for r in range(M):
        for c in range(K):
            if c + 1 < K:
                (between if blk[r][c] != blk[r][c + 1] else inside).append([(c + 1, r), (c + 1, r + 1)])
            if r + 1 < M:
                (between if blk[r][c] != blk[r + 1][c] else inside).append([(c, r + 1), (c + 1, r + 1)])
    ax.add_collection(LineCollection(inside, colors="white", linewidths=0.35, alpha=0.7))
    ax.add_collection(LineCollection(between, colors="white", linewidths=1.6))

    if prn is not None:  # a small cross on pruned cells, so they read without colour too
        crosses = []
        for r in range(M):
            for c in range(K):
                if prn[r][c]:
                    crosses += [[(c + 0.36, r + 0.36), (c + 0.64, r + 0.64)], [(c + 0.36, r + 0.64), (c + 0.64, r + 0.36)]]
        ax.add_collection(LineCollection(crosses, colors="#a0a0a0", linewidths=0.7))

    segs, ids = _outline_segments(scp, inset=0.075)
    ax.add_collection(
        LineCollection(segs, colors=[edge_of[s] for s in ids], linewidths=max(1.0, cell_size * 5.5), capstyle="projecting")
    )

    if labels:
        font = max(3.5, min(6.5, cell_size * 20))
        for s, x, y in _pieces(scp):
            ax.text(
                x, y + 0.04, str(s), ha="center", va="center", fontsize=font * (0.8 if s >= 100 else 1.0),
                color=edge_of[s], fontweight="bold",
                bbox=dict(boxstyle="round,pad=0.12", facecolor="white", edgecolor="none", alpha=0.8),
            )

    step_c = 1 if K <= 32 else (4 if K <= 128 else 16)
    step_r = 1 if M <= 32 else (4 if M <= 128 else 16)
    tick_font = max(4.0, min(6.5, cell_size * 20))
    # row / column numbers as plain text (much cheaper than matplotlib ticks)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if top_ticks:
        for c in range(0, K, step_c):
            ax.text(c + 0.5, -0.25, str(c), ha="center", va="bottom", fontsize=tick_font, clip_on=False)
    for r in range(0, M, step_r):
        ax.text(-0.3, r + 0.5, str(r), ha="right", va="center", fontsize=tick_font, clip_on=False)
    if ylabel:
        ax.text(-0.55 / cell_size, M / 2, ylabel, rotation=90, ha="center", va="center", fontsize=7.5, clip_on=False)


def draw_layout(
    scope_or_pattern: Any,
    path: Optional[Union[str, os.PathLike]] = None,
    values: Optional[Tensor] = None,
    nnz: Optional[int] = None,
    *,
    shape: Tuple[int, int] = (16, 32),
    seed: int = 0,
    title: Optional[str] = None,
    cell_size: float = 0.3,
    annotate: bool = True,
    dpi: int = 150,
) -> "Figure":
    """Draw a sparsity pattern: blocks coloured, scopes outlined, pruned weights greyed.

    One cell per weight of the (2-D) parameter, row 0 at the top, column 0 at
    the left. The top panel shows the structure: fill colour identifies the
    block (the weights of one block share a colour wherever the view puts them,
    e.g. columns ``j`` and ``j+8`` of coupled 2:4), and each scope is outlined,
    just inside its cells, in its own colour — a scope that the view splits
    into several pieces has all its pieces outlined in the same colour. With
    ``nnz``, a second panel shows the result of ``scope.get_masks(nnz,
    values=values)``: kept weights in their block colour, pruned weights light
    grey with a small cross. The parameter itself is never modified.

    Args:
        scope_or_pattern: a ``ScopeSpec`` over one ``BlockSpec`` of a 2-D
            parameter; a ``(scope, nnz)`` pair as returned by
            :mod:`s3sparse.patterns` (``nnz`` then defaults to it); a pattern
            name of ``patterns.PATTERNS`` (``"24"``, ``"48"``, ``"coupled24"``,
            ``"block16"``, or an alias); or a constructor
            ``f(weight) -> (scope, nnz)`` — names and constructors are built on
            a random ``shape`` weight (seeded by ``seed``), with their own
            ``nnz``.
        path: where to write a PNG (parent folders are created); ``None`` to
            only return the figure.
        values: element scores for ``get_masks`` (parameter- or view-shaped);
            default the weights themselves (magnitude pruning).
        nnz: blocks kept per scope; ``None`` uses the pattern's own budget when
            it came with one, else draws the structure only; ``-1`` forces the
            structure only.
        shape: ``(M, K)`` of the weight built for a name or constructor.
        seed: seed of that weight.
        title: figure title (default: the pattern's name).
        cell_size: cell edge in inches.
        annotate: label every connected piece of every scope with the
            scope's number (structure panel), so that the pieces of a scope
            split by the view read as one.
        dpi: resolution of the PNG.

    Returns:
        The matplotlib ``Figure`` (made without pyplot: no window opens and no
        global state changes).

    Raises:
        ImportError: matplotlib is missing (``pip install s3sparse[viz]``).
        TypeError: a scope over a BlockCoupling (several parameters).
        ValueError: the parameter is not 2-D or has more than 65,536 weights.
    """
    Figure = _require_matplotlib()

    scope, default_nnz, name = _resolve(scope_or_pattern, shape, seed)
    if nnz is None:
        nnz = default_nnz
    elif nnz < 0:
        nnz = None
    (M, K), blk, scp, prn, fill_of, edge_of = _cells(scope, nnz, values)

    panels = 1 if prn is None else 2
    top, gap, bottom, side = 0.95, 0.45, 0.45, 0.7
    fig_w = K * cell_size + 2 * side
    fig_h = top + panels * M * cell_size + (panels - 1) * gap + bottom
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    per_scope = _blocks_per_scope(scope)

    _add_heading(fig, fig_h, title if title is not None else (name or "pattern"), scope)

    y = fig_h - top - M * cell_size
    ax = fig.add_axes((side / fig_w, y / fig_h, K * cell_size / fig_w, M * cell_size / fig_h))
    _draw_panel(ax, blk, scp, None, fill_of, edge_of, cell_size, annotate, top_ticks=True, ylabel="structure")
    if prn is not None:
        y -= gap + M * cell_size
        ax2 = fig.add_axes((side / fig_w, y / fig_h, K * cell_size / fig_w, M * cell_size / fig_h))
        _draw_panel(
            ax2, blk, scp, prn, fill_of, edge_of, cell_size, False, top_ticks=False, ylabel=f"keep {nnz} of {per_scope}"
        )
        fig.text(
            0.5, (y + M * cell_size + gap / 2) / fig_h,
            f"after get_masks(nnz={nnz}) on " + ("the weights' magnitudes" if values is None else "the given values")
            + ": grey × = pruned",
            ha="center", va="center", fontsize=7.5,
        )
    _add_legend(fig, fig_h, annotate)

    if path is not None:
        _save_png(fig, path, dpi)
    return fig


def _cells(
    scope: Any, nnz: Optional[int], values: Optional[Tensor]
) -> Tuple[Tuple[int, int], list, list, Optional[list], dict, dict]:
    """``(M, K)``; per cell its block id, scope id and pruned flag (``None`` without ``nnz``); block fills, scope edges."""
    layout = element_layout(scope)
    M, K = layout.block.shape
    if M * K > MAX_CELLS:
        raise ArgumentError(
            f"draw_layout: {M}×{K} = {M * K} weights is too many to draw (at most {MAX_CELLS}); draw a smaller tensor"
        )
    blk = layout.block.tolist()
    scp = layout.scope.tolist()
    fill_of = {b: BLOCK_FILLS[i] for b, i in _assign_colours(layout.block, len(BLOCK_FILLS)).items()}
    edge_of = {s: SCOPE_EDGES[i] for s, i in _assign_colours(layout.scope, len(SCOPE_EDGES)).items()}
    prn = _pruned_mask(scope, nnz, values, layout).tolist() if nnz is not None else None
    return (M, K), blk, scp, prn, fill_of, edge_of


def _add_heading(fig: "Figure", fig_h: float, heading: str, scope: Any) -> None:
    """The title line and, under it, the scope's description in monospace."""
    fig.text(0.5, 1 - 0.12 / fig_h, heading, ha="center", va="top", fontsize=11, fontweight="bold")
    fig.text(0.5, 1 - 0.38 / fig_h, _describe(scope), ha="center", va="top", fontsize=7.5, family="monospace")


def _add_legend(fig: "Figure", fig_h: float, annotate: bool) -> None:
    """The one-line key at the bottom: what rows, columns, fills and outlines mean."""
    legend = "rows = output channels, columns = input features   ·   fill colour = block   ·   outline colour"
    legend += " and number = scope" if annotate else " = scope"
    fig.text(0.5, 0.12 / fig_h, legend, ha="center", va="bottom", fontsize=7)


def _blocks_per_scope(scope: Any) -> int:
    """Blocks in one scope (the ``of`` of the result panel's "keep nnz of ..." label)."""
    return math.prod(int(g) // int(s) for g, s in zip(_scope_parts(scope)[0].grid_shape, scope.grid_shape))


def _save_png(fig: "Figure", path: Union[str, os.PathLike], dpi: int) -> None:
    """Write ``fig`` as a PNG at ``path``, creating its parent folders."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
