"""The positions and bit-level helpers behind :class:`~s3sparse.sparse.PackedWeight`.

The packed format itself is fixed by ``csrc/ops.cpp`` and
:mod:`s3sparse.reference` (``packed_fields``, ``packed_to_dense``): a 2-D weight
``W`` (M × K, row-major) is covered exactly once by S scopes (a scope grid,
row-major) that keep ``nnz`` of their ``G`` blocks of ``B`` elements; element
``e`` of in-scope block ``g`` of scope ``s`` is W's flat element
``f = Σ_d idx_d(s)·scope_stride[d] + block_off[g] + elem_off[e]``.

That is the scope geometry of :mod:`s3sparse.pruners.layout`
(:func:`~s3sparse.pruners.layout.scope_geometry`), expressed in row-major
positions of the weight: :func:`packed_geometry`. This module also packs and
ranks the index fields, and finds the ``row_group`` promise of a geometry.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ..errors import SpecError
from ..pruners.layout import ScopeGeometry, scope_bases, scope_geometry

__all__ = [
    "packed_geometry",
    "pack_fields",
    "subset_table",
    "subset_codes",
    "choose_index_format",
    "find_row_group",
    "MAX_SUBSET_CODES",
    "MAX_SUBSET_TABLE",
    "MAX_ROW_GROUP",
]

#: Subset codes are used only when a scope has at most this many possible kept sets ...
MAX_SUBSET_CODES = 4096
#: ... and the code table has at most this many entries (64 KiB of int32).
MAX_SUBSET_TABLE = 16384
#: ``row_group`` is searched among the divisors of M up to this many rows.
MAX_ROW_GROUP = 64


def _is_row_major(param: Tensor) -> bool:
    M, K = param.shape
    rs, cs = param.stride()
    return (M <= 1 or rs == K) and (K <= 1 or cs == 1)


def _row_major_strides(view) -> tuple[tuple[int, ...], int]:
    """Strides and offset of ``view``'s dims in row-major positions ``i·K + j`` of its 2-D parameter.

    For a row-major parameter these are the view's own (storage = position).
    Otherwise (a transposed or sliced parameter) each view element's position
    is found through :meth:`View.offsets_to_param_index`, and the view must be
    affine in it.
    """
    param = view.param
    if _is_row_major(param):
        return tuple(view.stride), int(view.offset)
    K = int(param.shape[1])
    rc = view.offsets_to_param_index(view.all_offsets())
    seen = (rc[:, 0] * K + rc[:, 1]).view(view.shape)
    origin = int(seen.reshape(-1)[0]) if seen.numel() else 0
    strides = []
    for d, size in enumerate(view.shape):
        if size > 1:
            index = [0] * len(view.shape)
            index[d] = 1
            strides.append(int(seen[tuple(index)]) - origin)
        else:
            strides.append(0)
    rebuilt = torch.full((), origin, dtype=torch.int64)
    for d, size in enumerate(view.shape):
        shape = [1] * len(view.shape)
        shape[d] = size
        rebuilt = rebuilt + (torch.arange(size, dtype=torch.int64) * strides[d]).view(shape)
    if not torch.equal(rebuilt.expand(seen.shape), seen):
        raise SpecError(
            f"cannot pack {view!r}: over this parameter's layout (strides {tuple(param.stride())}) the view is not "
            "an affine map of row-major weight positions; pack `weight.contiguous()` with the same pattern instead"
        )
    return tuple(strides), origin


def packed_geometry(scope) -> ScopeGeometry:
    """The geometry of a ScopeSpec over one BlockSpec of a 2-D parameter, in row-major positions of the weight."""
    strides, origin = _row_major_strides(scope.block.view)
    return scope_geometry(scope, strides=strides, origin=origin)


# ------------------------------------------------------------------ fields
def pack_fields(fields: Tensor, bits: int) -> Tensor:
    """Unsigned ``bits``-bit ``fields`` (1-D, int64) into int32 words, ``32 // bits`` per word.

    Field ``i`` goes to word ``i // per_word`` at bit ``(i % per_word)·bits``
    (the layout :func:`s3sparse.reference.packed_fields` reads).
    """
    per_word = 32 // bits
    count = fields.numel()
    words = -(-count // per_word)
    padded = torch.zeros(words * per_word, dtype=torch.int64, device=fields.device)
    padded[:count] = fields.reshape(-1).to(torch.int64)
    shifts = torch.arange(per_word, dtype=torch.int64, device=fields.device) * bits
    packed = (padded.view(words, per_word) << shifts).sum(-1)  # disjoint bit ranges: sum == or
    # As int32 two's complement: words with the top bit set become negative.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def subset_table(G: int, nnz: int) -> Tensor:
    """Every set of ``nnz`` of ``G`` in-scope blocks, lexicographic, as int32 ``(C(G, nnz), nnz)``."""
    from itertools import combinations

    rows = list(combinations(range(G), nnz))
    return torch.tensor(rows, dtype=torch.int32).reshape(len(rows), nnz)


def subset_codes(kept: Tensor, G: int) -> Tensor:
    """The lexicographic rank in :func:`subset_table` of each row of ``kept`` (S, nnz), increasing entries.

    Rank of ``c_0 < … < c_{k-1}``: ``Σ_j Σ_{c_{j-1} < v < c_j} C(G-1-v, k-1-j)``
    (the sets that agree up to ``j`` and put a smaller block at place ``j``).
    """
    S, k = kept.shape
    if k == 0:
        return torch.zeros(S, dtype=torch.int64, device=kept.device)
    # prefix[j, c] = Σ_{j <= v < c} C(G-1-v, k-1-j). Terms with v < j never
    # enter a rank (c_{j-1} >= j-1), and leaving them out keeps every entry
    # at most C(G, k): with them, C(G-1-v, k-1-j) overflows int64 for large G
    # even when C(G, k) is small (G=120, k=119).
    table = []
    for j in range(k):
        row, total = [0], 0
        for v in range(G):
            total += math.comb(G - 1 - v, k - 1 - j) if v >= j else 0
            row.append(total)
        table.append(row)
    prefix = torch.tensor(table, dtype=torch.int64, device=kept.device)
    kept = kept.to(torch.int64)
    previous = torch.cat([torch.full((S, 1), -1, dtype=torch.int64, device=kept.device), kept[:, :-1]], dim=1)
    rows = torch.arange(k, device=kept.device).expand(S, k)
    return (prefix[rows, kept] - prefix[rows, previous + 1]).sum(-1)


def choose_index_format(G: int, nnz: int) -> tuple[str, int]:
    """``("subsets", bits)`` or ``("indices", bits)``: how a scope's kept set is stored.

    Subset codes (one ``ceil(log2 C(G, nnz))``-bit field per scope) when there
    are at most :data:`MAX_SUBSET_CODES` kept sets, the table stays small and
    the codes pack more scopes per word than ``nnz`` block indices of
    ``ceil(log2 G)`` bits do (2:4: 10 scopes per word against 8); otherwise the
    indices. ``bits`` is at least 1.
    """
    index_bits = max(1, math.ceil(math.log2(G))) if G > 1 else 1
    codes = math.comb(G, nnz)
    if codes <= MAX_SUBSET_CODES and codes * nnz <= MAX_SUBSET_TABLE and nnz > 0:
        code_bits = max(1, math.ceil(math.log2(codes))) if codes > 1 else 1
        if (32 // code_bits) * nnz > 32 // index_bits:
            return "subsets", code_bits
    return "indices", index_bits


def find_row_group(
    M: int, K: int, scope_shape: Sequence[int], scope_stride: Sequence[int], block_off: Tensor, elem_off: Tensor,
    max_rows: int = MAX_ROW_GROUP,
) -> int:
    """The smallest ``R`` (dividing M, at most ``max_rows``) for which packed_linear's row-group promise holds, else 0.

    The promise: the S scopes come in ``M / R`` groups of ``S·R / M`` consecutive
    scopes and group ``q`` touches only rows ``[qR, (q+1)R)``. It is checked on
    the actual offsets, for every in-scope block (kept or not, so it depends on
    the pattern only): scope ``s`` spans flat offsets
    ``base(s) + [min block_off + min elem_off, max block_off + max elem_off]``
    and rows are monotone in flat offsets.
    """
    S = math.prod(scope_shape)
    if M == 0 or K == 0 or S == 0 or block_off.numel() == 0 or elem_off.numel() == 0:
        return 0
    base = scope_bases(scope_shape, scope_stride)
    lo_off = int(block_off.min()) + int(elem_off.min())
    hi_off = int(block_off.max()) + int(elem_off.max())
    row_lo = torch.div(base + lo_off, K, rounding_mode="floor")
    row_hi = torch.div(base + hi_off, K, rounding_mode="floor")
    for R in range(1, min(max_rows, M) + 1):
        if M % R or (S * R) % M:
            continue
        group = torch.arange(S, dtype=torch.int64) // (S * R // M)
        if bool(((row_lo >= group * R) & (row_hi < (group + 1) * R)).all()):
            return R
    return 0
