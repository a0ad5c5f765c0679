"""PackedWeight: a pruned 2-D weight stored as its kept blocks and their in-scope indices."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from .. import ops
from ..block import BlockCoupling, BlockSpec
from ..checks import check_int, check_nnz
from ..errors import ArgumentError, ArgumentTypeError, ShapeMismatchError, SpecError
from ..patterns import parse_pattern
from ..pruners.layout import ScopeGeometry, scope_bases
from ..scope import ScopeCoupling, ScopeSpec
from . import format as fmt

__all__ = ["PackedWeight", "FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY"]

#: The format's name and version, in :meth:`PackedWeight.config` and the ``geometry`` tensor.
FORMAT_NAME = "s3sparse.packed"
FORMAT_VERSION = 1
#: The safetensors metadata key under which :meth:`PackedWeight.save` stores the config (JSON).
METADATA_KEY = "s3sparse.packed"

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TENSOR_NAMES = ("values", "meta", "subsets", "block_off", "elem_off")
# geometry = [version, M, K, nnz, G, B, meta_bits, row_group, n_codes, ndim, *scope_shape, *scope_stride]
_GEOMETRY_HEAD = 10


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if dtype not in _FLOATS:
        raise ArgumentError(f"config `dtype` must be one of float16, bfloat16, float32, float64, got {name!r}")
    return dtype


def _pattern_description(scope: ScopeSpec, nnz: int) -> dict:
    view = scope.block.view
    return dict(
        name=scope.name,
        view=dict(shape=list(view.shape), stride=list(view.stride), offset=view.offset),
        block_shape=list(scope.block.shape),
        scope_shape=list(scope.shape),
        nnz=nnz,
    )


def _check_packable(scope: ScopeSpec, index_format: str) -> None:
    """Refuse what :meth:`PackedWeight.from_scope` cannot pack: couplings, non-2-D, non-float or partial views."""
    if isinstance(scope, ScopeCoupling):
        raise SpecError(
            "cannot pack a ScopeCoupling (several tensors share one budget per scope): pack each member "
            "on its own, `PackedWeight.from_scope(member, nnz)` for member in coupling.scopes (each member scope "
            "holds at most the joint nnz), or use s3sparse.sparse.compact for channel couplings"
        )
    if not isinstance(scope, ScopeSpec):
        raise ArgumentTypeError(f"`scope` must be a ScopeSpec, got {type(scope).__name__}")
    if isinstance(scope.block, BlockCoupling):
        raise SpecError(
            f"cannot pack {scope!r}: its blocks are a BlockCoupling (blocks spanning several tensors or specs); "
            "pack each tensor with a ScopeSpec over its own BlockSpec, or use s3sparse.sparse.compact for channel "
            "couplings (e.g. a row of W_up with the matching column of W_down)"
        )
    if not isinstance(scope.block, BlockSpec):
        raise ArgumentTypeError(f"`scope.block` must be a BlockSpec, got {type(scope.block).__name__}")
    if index_format not in ("auto", "subsets", "indices"):
        raise ArgumentError(f"`index_format` must be 'auto', 'subsets' or 'indices', got {index_format!r}")
    view = scope.block.view
    param = view.param
    if param.dim() != 2:
        raise SpecError(
            f"cannot pack a {param.dim()}-D parameter (shape {tuple(param.shape)}): PackedWeight holds 2-D "
            "weights (out_features × in_features, an nn.Linear.weight); reshape it to 2-D first"
        )
    if param.dtype not in _FLOATS:
        raise ArgumentTypeError(
            f"the weight behind `scope` has dtype {param.dtype}; PackedWeight packs float16, bfloat16, float32 "
            "or float64 weights (e.g. `W = W.float()`)"
        )
    if param.device.type == "meta":
        raise SpecError("the weight behind `scope` is on the meta device (no data); load the real weight first")
    M, K = param.shape
    if M * K == 0:
        raise SpecError(f"cannot pack an empty weight (shape {(M, K)})")
    if view.numel() != param.numel():
        raise SpecError(
            f"cannot pack {scope!r}: its view covers {view.numel()} of the {M}×{K} = {param.numel()} elements of the "
            "weight; PackedWeight needs a view that covers every element exactly once (shape, strides and offset "
            "over the whole weight, as every pattern of s3sparse.patterns has)"
        )


def _check_scopes_fit(nonzero: Tensor, nnz: int, geo: ScopeGeometry, K: int) -> None:
    """Refuse, naming the first one, scopes with more than ``nnz`` non-zero blocks (``nonzero``: (S, G) bool)."""
    counts = nonzero.sum(-1)
    over = counts > nnz
    if bool(over.any()):
        S = nonzero.shape[0]
        first = int(over.nonzero()[0, 0])
        position = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), geo.scope_grid)) if geo.scope_grid else ()
        f0 = int(scope_bases(geo.scope_shape, geo.scope_stride)[first]) + int(geo.block_off.min()) + int(geo.elem_off.min())
        raise SpecError(
            f"scope {first} (position {position} in the scope grid {geo.scope_grid}; it starts near W[{f0 // K}, "
            f"{f0 % K}]) has {int(counts[first])} non-zero blocks, more than nnz={nnz} ({int(over.sum())} of {S} "
            "scopes are over); prune the weight to the pattern first (e.g. `scope.hard_threshold(nnz=nnz)` or "
            "any s3sparse pruner), or pack with a larger nnz"
        )


def _kept_indices(nonzero: Tensor, nnz: int) -> Tensor:
    """(S, nnz) in-scope indices kept: the non-zero blocks, padded with the lowest-index zero blocks; increasing."""
    G = nonzero.shape[-1]
    order = torch.arange(G - 1, -1, -1, device=nonzero.device)
    score = nonzero.to(torch.int64) * G + order
    return torch.topk(score, nnz, dim=-1).indices.sort(dim=-1).values


def _index_encoding(G: int, nnz: int, index_format: str) -> tuple:
    """``(mode, bits)``: how the kept indices are stored ("subsets" codes or "indices") and the bits per field."""
    mode, bits = fmt.choose_index_format(G, nnz)
    if index_format == "subsets" and mode != "subsets":
        codes = math.comb(G, nnz)
        if codes > 2**32 or codes * nnz > 4 * fmt.MAX_SUBSET_TABLE:
            raise ArgumentError(
                f"index_format='subsets' needs a table of C({G}, {nnz}) = {codes} kept sets; that is too many: "
                "use 'auto' or 'indices'"
            )
        mode, bits = "subsets", max(1, math.ceil(math.log2(codes))) if codes > 1 else 1
    elif index_format == "indices" and mode != "indices":
        mode, bits = "indices", max(1, math.ceil(math.log2(G))) if G > 1 else 1
    return mode, bits


class PackedWeight:
    """A pruned 2-D weight packed as the kept blocks of every scope plus their in-scope indices.

    Build one with :meth:`from_scope` (a ScopeSpec whose scopes each hold at
    most ``nnz`` non-zero blocks) or :meth:`from_pattern` (a pattern name);
    :meth:`to_dense` gives the weight back exactly, :func:`s3sparse.ops.packed_linear`
    (or :class:`~s3sparse.sparse.PackedLinear`) multiplies by it.

    The format (``csrc/ops.cpp``, :mod:`s3sparse.reference`): ``W`` (M × K,
    row-major) is covered exactly once by S scopes that keep ``nnz`` of their
    ``G`` blocks of ``B`` elements.

    * ``values`` (S, nnz, B), the weight's dtype: the kept blocks, scopes in
      row-major order of the scope grid, a scope's kept blocks by increasing
      in-scope index, a block's elements row-major over the block shape.
    * ``meta`` (W,) int32: unsigned ``meta_bits``-bit fields, ``32 // meta_bits``
      per word (field ``i`` in word ``i // per_word`` at bit ``(i % per_word)·meta_bits``).
    * ``block_off`` (G,) / ``elem_off`` (B,) int64 and ``scope_shape`` /
      ``scope_stride``: element ``e`` of in-scope block ``g`` of scope ``s`` is W's
      flat element ``Σ_d idx_d(s)·scope_stride[d] + block_off[g] + elem_off[e]``.

    Choices made here, inside that format:

    * **Index fields.** When a scope has at most 4096 possible kept sets
      (``C(G, nnz)``), the code table is small and codes pack more scopes per
      word than block indices would, a scope's field is the lexicographic rank
      of its kept set among ``subsets`` (``C(G, nnz)`` × nnz int32, every set in
      lexicographic order), ``meta_bits = max(1, ceil(log2 C(G, nnz)))``: 2:4,
      4:8 and coupled 2:4 take 3 bits per scope, 10 scopes per word, so fp16 2:4
      packs to about 0.55× dense. Otherwise (``index_format='indices'``) each
      kept block's in-scope index is a field of ``max(1, ceil(log2 G))`` bits
      (the 16-column row-coupled pattern: 1 bit per scope). Either way the
      smallest field that holds the number, bit-packed.
    * **Geometry** comes from the ScopeSpec's view (shape, strides, offset
      relative to the parameter), block shape and scope shape; in-scope blocks
      are numbered row-major over the scope shape, exactly as
      ``ScopeSpec.block_norms`` orders them. Size-1 scope-grid dims are dropped
      and chained dims merged (the row-major scope order is unchanged).
    * **Padding.** A scope with fewer than ``nnz`` non-zero blocks is filled up
      with its lowest-index zero blocks (stored as zeros), so every scope has
      exactly ``nnz``. A block is non-zero when any element is (NaN counts).
    * **row_group** is the smallest ``R`` ≤ 64 dividing M for which the
      scopes come in groups owning ``R`` rows each, verified on the offsets of
      every in-scope block; 0 when there is none. 2:4, 4:8 and coupled 2:4
      give 1, the 16-column row-coupled pattern 16.

    Attributes:
        values, meta, subsets, block_off, elem_off: the tensors (``subsets``
            may be None).
        scope_shape, scope_stride: the scope grid and its flat strides (tuples).
        meta_bits: bits per field.
        out_features, in_features: M and K.
        row_group: the routing promise (0 = none).
        pattern: a JSON-able description of the pattern it was packed from
            (name, view, block and scope shapes, nnz), or None.
    """

    def __init__(
        self,
        values: Tensor,
        meta: Tensor,
        subsets: Optional[Tensor],
        block_off: Tensor,
        elem_off: Tensor,
        scope_shape,
        scope_stride,
        meta_bits: int,
        out_features: int,
        in_features: int,
        row_group: int = 0,
        pattern: Optional[dict] = None,
    ) -> None:
        self.values = values
        self.meta = meta
        self.subsets = subsets
        self.block_off = block_off
        self.elem_off = elem_off
        self.scope_shape = tuple(check_int(v, "scope_shape") for v in scope_shape)
        self.scope_stride = tuple(check_int(v, "scope_stride") for v in scope_stride)
        self.meta_bits = check_int(meta_bits, "meta_bits", minimum=1, maximum=32)
        self.out_features = check_int(out_features, "out_features", minimum=0)
        self.in_features = check_int(in_features, "in_features", minimum=0)
        self.row_group = check_int(row_group, "row_group", minimum=0)
        self.pattern = pattern
        self._validate()

    # ------------------------------------------------------------ validation
    def _validate(self) -> None:
        tensors = {n: getattr(self, n) for n in _TENSOR_NAMES if getattr(self, n) is not None}
        for name, t in tensors.items():
            if not isinstance(t, Tensor):
                raise ArgumentTypeError(f"`{name}` must be a tensor, got {type(t).__name__}")
        if self.values.dtype not in _FLOATS:
            raise ArgumentTypeError(f"`values` must be float16, bfloat16, float32 or float64, got {self.values.dtype}")
        want = dict(meta=torch.int32, subsets=torch.int32, block_off=torch.int64, elem_off=torch.int64)
        for name, dtype in want.items():
            if name in tensors and tensors[name].dtype != dtype:
                raise ArgumentTypeError(f"`{name}` must be {dtype}, got {tensors[name].dtype}")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise ArgumentError(f"the packed tensors must be on one device, got {sorted(map(str, devices))}")
        if self.values.dim() != 3:
            raise ShapeMismatchError("(S, nnz, B)", tuple(self.values.shape), "values")
        S, nnz, B = self.values.shape
        for name in ("meta", "block_off", "elem_off"):
            if tensors[name].dim() != 1:
                raise ShapeMismatchError("a 1-D tensor", tuple(tensors[name].shape), name)
        if self.elem_off.numel() != B:
            raise ShapeMismatchError((B,), tuple(self.elem_off.shape), "elem_off")
        if self.block_off.numel() < nnz:
            raise ArgumentError(f"`block_off` lists G={self.block_off.numel()} in-scope blocks, fewer than nnz={nnz}")
        if len(self.scope_shape) != len(self.scope_stride):
            raise ArgumentError(f"`scope_stride` {self.scope_stride} must have one entry per dim of `scope_shape` {self.scope_shape}")
        if math.prod(self.scope_shape) != S:
            raise ArgumentError(f"`values` holds S={S} scopes but `scope_shape` {self.scope_shape} has {math.prod(self.scope_shape)}")
        if self.subsets is not None and (self.subsets.dim() != 2 or self.subsets.shape[1] != nnz):
            raise ShapeMismatchError(f"(n_codes, {nnz})", tuple(self.subsets.shape), "subsets")
        if self.meta.numel() < self.meta_words:
            raise ArgumentError(f"`meta` must hold at least {self.meta_words} int32 words, got {self.meta.numel()}")

    # ------------------------------------------------------------ construction
    @classmethod
    @torch.no_grad()
    def from_scope(cls, scope: ScopeSpec, nnz: int, *, index_format: str = "auto") -> "PackedWeight":
        """Pack the 2-D weight behind ``scope``, whose scopes hold at most ``nnz`` non-zero blocks each.

        Args:
            scope: a :class:`~s3sparse.scope.ScopeSpec` over one
                :class:`~s3sparse.block.BlockSpec` whose view covers every element
                of a 2-D float parameter exactly once (every pattern of
                :mod:`s3sparse.patterns` over ``nn.Linear.weight`` does).
            nnz: blocks kept per scope, in ``[0, blocks per scope]``. Scopes with
                fewer non-zero blocks are padded with zero blocks.
            index_format: ``"auto"`` (see the class doc), ``"subsets"`` (a code
                per scope) or ``"indices"`` (nnz block indices per scope).

        Raises:
            SpecError: a coupling, a non-2-D or non-float parameter, a view that
                does not cover the weight exactly once, ``nnz`` out of range, or a
                scope with more than ``nnz`` non-zero blocks (named, with its
                position and count).
        """
        _check_packable(scope, index_format)
        M, K = scope.block.view.param.shape
        G = scope.numblk_per_scope()
        nnz = check_nnz(nnz, G)
        geo = fmt.packed_geometry(scope)
        S = math.prod(geo.scope_grid)
        B = scope.block.numel_per_block()

        # (S, G, B): every block of every scope, in the spec's own order.
        blocks = scope.block_to_scope(scope.block.block_view(merge=True)).reshape(S, G, B)
        nonzero = (blocks != 0).any(-1)
        _check_scopes_fit(nonzero, nnz, geo, K)
        kept = _kept_indices(nonzero, nnz)  # (S, nnz)
        values = blocks.gather(1, kept[:, :, None].expand(S, nnz, B)).contiguous()

        mode, bits = _index_encoding(G, nnz, index_format)
        device = blocks.device
        if mode == "subsets":
            subsets = fmt.subset_table(G, nnz).to(device)
            fields = fmt.subset_codes(kept, G)
        else:
            subsets = None
            fields = kept.reshape(-1)
        meta = fmt.pack_fields(fields, bits)
        row_group = fmt.find_row_group(M, K, geo.scope_shape, geo.scope_stride, geo.block_off, geo.elem_off)
        return cls(
            values, meta, subsets, geo.block_off.to(device), geo.elem_off.to(device), geo.scope_shape,
            geo.scope_stride, bits, M, K, row_group, _pattern_description(scope, nnz),
        )

    @classmethod
    def from_pattern(cls, weight: Tensor, pattern: str, **kwargs: Any) -> "PackedWeight":
        """Pack a pruned ``weight`` (M × K) by a pattern name (``"2:4"``, ``"4:8"``,
        ``"coupled-2:4"``, ``"block16-rows"``, …; see :func:`s3sparse.patterns.parse_pattern`).

        ``kwargs`` go to :meth:`from_scope` (``index_format``).
        """
        choice = parse_pattern(pattern)
        if choice.is_dense:
            raise ArgumentError(f"pattern {pattern!r} is dense: there is nothing to pack; keep the nn.Linear as it is")
        scope, nnz = choice.build(weight)
        packed = cls.from_scope(scope, nnz, **kwargs)
        packed.pattern = dict(packed.pattern or {}, registry_name=choice.name)
        return packed

    # ------------------------------------------------------------ properties
    @property
    def shape(self) -> torch.Size:
        """``(out_features, in_features)`` of the dense weight."""
        return torch.Size((self.out_features, self.in_features))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the values (and of the dense weight)."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        """The device of every packed tensor."""
        return self.values.device

    @property
    def nnz(self) -> int:
        """Blocks kept per scope."""
        return int(self.values.shape[1])

    @property
    def num_scopes(self) -> int:
        """S, the number of scopes."""
        return int(self.values.shape[0])

    @property
    def blocks_per_scope(self) -> int:
        """G, the in-scope blocks a scope chooses from."""
        return int(self.block_off.numel())

    @property
    def block_numel(self) -> int:
        """B, elements per block."""
        return int(self.values.shape[2])

    @property
    def index_format(self) -> str:
        """``"subsets"`` (a code per scope) or ``"indices"`` (nnz block indices per scope)."""
        return "indices" if self.subsets is None else "subsets"

    @property
    def meta_words(self) -> int:
        """The int32 words the index fields need."""
        fields = self.num_scopes * (1 if self.subsets is not None else self.nnz)
        per_word = 32 // self.meta_bits
        return -(-fields // per_word)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed form: every stored tensor (values, meta, tables, geometry)."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense weight in this dtype."""
        return self.out_features * self.in_features * self.values.element_size()

    # ------------------------------------------------------------ use
    def to_dense(self) -> Tensor:
        """The dense ``(out_features, in_features)`` weight, exactly the one packed (zeros as +0.0)."""
        return ops.packed_to_dense(
            self.values, self.meta, self.subsets, self.block_off, self.elem_off, self.scope_shape,
            self.scope_stride, self.meta_bits, self.out_features, self.in_features,
        )

    def linear(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        """``F.linear(x, W, bias)`` with this packed ``W`` (:func:`s3sparse.ops.packed_linear`)."""
        return ops.packed_linear(
            x, self.values, self.meta, self.subsets, self.block_off, self.elem_off, self.scope_shape,
            self.scope_stride, self.meta_bits, self.out_features, self.row_group, bias,
        )

    def to(self, *args: Any, **kwargs: Any) -> "PackedWeight":
        """A copy on another device and/or with values of another float dtype (as ``Tensor.to``).

        The dtype applies to ``values`` only; the index tables keep theirs.
        """
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype not in _FLOATS:
            raise ArgumentTypeError(f"PackedWeight values must stay floating point (fp16/bf16/fp32/fp64), got {dtype}")
        values = self.values.to(device=device, dtype=dtype, non_blocking=non_blocking)

        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.to(device=values.device, non_blocking=non_blocking)

        return PackedWeight(
            values, move(self.meta), move(self.subsets), move(self.block_off), move(self.elem_off),
            self.scope_shape, self.scope_stride, self.meta_bits, self.out_features, self.in_features,
            self.row_group, self.pattern,
        )

    # ------------------------------------------------------------ state
    def geometry(self) -> Tensor:
        """The integers of the format as one int64 tensor (so a state dict describes itself).

        ``[version, M, K, nnz, G, B, meta_bits, row_group, n_codes (0 = no subsets),
        ndim, *scope_shape, *scope_stride]``.
        """
        n_codes = 0 if self.subsets is None else int(self.subsets.shape[0])
        head = [FORMAT_VERSION, self.out_features, self.in_features, self.nnz, self.blocks_per_scope,
                self.block_numel, self.meta_bits, self.row_group, n_codes, len(self.scope_shape)]
        return torch.tensor(head + list(self.scope_shape) + list(self.scope_stride), dtype=torch.int64,
                            device=self.device)

    def state_dict(self) -> dict[str, Tensor]:
        """``{values, meta, [subsets], block_off, elem_off, geometry}``: everything needed to rebuild it."""
        out = {n: getattr(self, n) for n in _TENSOR_NAMES if getattr(self, n) is not None}
        out["geometry"] = self.geometry()
        return out

    def config(self) -> dict:
        """A JSON-able description: the format's integers, the dtype and the pattern description.

        From it alone :meth:`empty` builds tensors of the right shapes (to load a
        state dict into).
        """
        return dict(
            format=FORMAT_NAME, version=FORMAT_VERSION, out_features=self.out_features,
            in_features=self.in_features, nnz=self.nnz, blocks_per_scope=self.blocks_per_scope,
            block_numel=self.block_numel, scope_shape=list(self.scope_shape), scope_stride=list(self.scope_stride),
            meta_bits=self.meta_bits, row_group=self.row_group, index_format=self.index_format,
            n_codes=0 if self.subsets is None else int(self.subsets.shape[0]), dtype=_dtype_name(self.dtype),
            pattern=self.pattern,
        )

    @staticmethod
    def parse_geometry(geometry: Tensor) -> dict:
        """The integers of a :meth:`geometry` tensor as a dict (keys as in :meth:`config`)."""
        if not isinstance(geometry, Tensor) or geometry.dim() != 1 or geometry.numel() < _GEOMETRY_HEAD:
            raise ArgumentError(f"`geometry` must be the 1-D int64 tensor of PackedWeight.geometry(), got {geometry!r}")
        g = [int(v) for v in geometry.tolist()]
        if g[0] != FORMAT_VERSION:
            raise ArgumentError(f"packed format version {g[0]} is not supported (this s3sparse reads {FORMAT_VERSION})")
        ndim = g[9]
        if len(g) != _GEOMETRY_HEAD + 2 * ndim:
            raise ArgumentError(f"`geometry` has {len(g)} entries; a {ndim}-dim scope grid needs {_GEOMETRY_HEAD + 2 * ndim}")
        return dict(
            out_features=g[1], in_features=g[2], nnz=g[3], blocks_per_scope=g[4], block_numel=g[5], meta_bits=g[6],
            row_group=g[7], n_codes=g[8], index_format="subsets" if g[8] else "indices",
            scope_shape=g[_GEOMETRY_HEAD:_GEOMETRY_HEAD + ndim], scope_stride=g[_GEOMETRY_HEAD + ndim:],
        )

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], prefix: str = "", pattern: Optional[dict] = None) -> "PackedWeight":
        """Rebuild from :meth:`state_dict` (keys under ``prefix``), without any spec object."""
        def get(name: str, required: bool = True) -> Optional[Tensor]:
            key = prefix + name
            if key not in state:
                if required:
                    raise ArgumentError(f"the state dict has no `{key}`: it is not a PackedWeight state (keys: "
                                        f"{sorted(k for k in state if k.startswith(prefix))[:8]})")
                return None
            return state[key]

        g = cls.parse_geometry(get("geometry"))
        subsets = get("subsets", required=g["n_codes"] > 0)
        if (subsets is None) != (g["n_codes"] == 0):
            raise ArgumentError(f"`{prefix}geometry` says n_codes={g['n_codes']} but `{prefix}subsets` is "
                                f"{'missing' if subsets is None else 'present'}")
        packed = cls(
            get("values"), get("meta"), subsets, get("block_off"), get("elem_off"), g["scope_shape"],
            g["scope_stride"], g["meta_bits"], g["out_features"], g["in_features"], g["row_group"], pattern,
        )
        packed._check_matches(g, f"`{prefix}geometry`")
        return packed

    def _check_matches(self, config: Mapping[str, Any], where: str) -> None:
        """Raise unless the shape-determining integers of ``config`` are this weight's."""
        mine = self.config()
        keys = ("out_features", "in_features", "nnz", "blocks_per_scope", "block_numel", "scope_shape",
                "scope_stride", "meta_bits", "row_group", "n_codes")
        def norm(v: Any) -> Any:
            return [int(x) for x in v] if isinstance(v, (list, tuple)) else v

        diff = {k: (config[k], mine[k]) for k in keys if k in config and norm(config[k]) != norm(mine[k])}
        if diff:
            detail = ", ".join(f"{k}: {a} there, {b} in the tensors" for k, (a, b) in diff.items())
            raise ArgumentError(f"{where} disagrees with the packed tensors ({detail})")

    @classmethod
    def empty(cls, config: Mapping[str, Any], device: Union[str, torch.device, None] = None,
              dtype: Optional[torch.dtype] = None) -> "PackedWeight":
        """Zero tensors of the shapes that ``config`` (:meth:`config`) describes, to load a state dict into."""
        try:
            M, K, nnz = int(config["out_features"]), int(config["in_features"]), int(config["nnz"])
            G, B, bits = int(config["blocks_per_scope"]), int(config["block_numel"]), int(config["meta_bits"])
            shape, stride = list(config["scope_shape"]), list(config["scope_stride"])
            n_codes, row_group = int(config.get("n_codes", 0)), int(config.get("row_group", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArgumentError(f"`config` is not a PackedWeight config ({type(exc).__name__}: {exc})") from None
        if config.get("format", FORMAT_NAME) != FORMAT_NAME or int(config.get("version", FORMAT_VERSION)) != FORMAT_VERSION:
            raise ArgumentError(f"`config` is format {config.get('format')!r} version {config.get('version')!r}; this "
                                f"s3sparse reads {FORMAT_NAME!r} version {FORMAT_VERSION}")
        dtype = dtype or _dtype_of(config.get("dtype", "float32"))
        S = math.prod(shape)
        fields = S if n_codes else S * nnz
        words = -(-fields // (32 // bits)) if 1 <= bits <= 32 else 0
        return cls(
            torch.zeros(S, nnz, B, dtype=dtype, device=device), torch.zeros(words, dtype=torch.int32, device=device),
            torch.zeros(n_codes, nnz, dtype=torch.int32, device=device) if n_codes else None,
            torch.zeros(G, dtype=torch.int64, device=device), torch.zeros(B, dtype=torch.int64, device=device),
            shape, stride, bits, M, K, row_group, config.get("pattern"),
        )

    def save(self, path, metadata: Optional[Mapping[str, str]] = None) -> None:
        """Write a safetensors file: the :meth:`state_dict` tensors, the :meth:`config` as JSON metadata.

        ``metadata`` adds string entries of your own.
        """
        save_file = _safetensors().save_file
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        meta = {**(metadata or {}), METADATA_KEY: json.dumps(self.config())}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path, device: Union[str, torch.device] = "cpu") -> "PackedWeight":
        """Read a file written by :meth:`save` (no spec objects needed); the pattern description comes back too."""
        safe_open = _safetensors().safe_open
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None
        packed = cls.from_state_dict(state, pattern=(config or {}).get("pattern"))
        if config is not None:
            packed._check_matches(config, f"the metadata of {path}")
        return packed

    def __repr__(self) -> str:
        name = (self.pattern or {}).get("registry_name") or (self.pattern or {}).get("name")
        return (
            f"PackedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, pattern={name!r}, "
            f"scopes={self.num_scopes}, nnz={self.nnz} of {self.blocks_per_scope} blocks of {self.block_numel}, "
            f"{self.index_format} meta_bits={self.meta_bits}, row_group={self.row_group}, "
            f"nbytes={self.nbytes} ({self.nbytes / max(1, self.dense_nbytes):.3f} of dense))"
        )


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as exc:  # pragma: no cover - safetensors ships with the llm and test extras
        raise ImportError("saving and loading packed weights needs safetensors: `pip install safetensors`") from exc
    return st
