"""PackedLinear: an ``nn.Linear`` whose pruned weight is stored packed and multiplied by a custom op."""

from __future__ import annotations

import os
import weakref
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .. import ops
from ..errors import ArgumentError, ArgumentTypeError
from ..scope import ScopeSpec
from .packed import PackedWeight
from .sp24 import COLUMN_ORDERS, sp24_form

__all__ = ["PackedLinear"]

_BUFFERS = ("values", "meta", "subsets", "block_off", "elem_off", "geometry")
# The 2:4 kernel on the sparse tensor cores (ops.sp24_linear) up to this many tokens a call: above, the
# packed kernels. Measured on an H100 (docs/performance.md, 2026-12-07), 4096x4096 / 9728x2560 2:4: at 128
# tokens the op's tiled kernel takes 30.5 / 45.3 us against 43.7 / 63.6 us for the packed kernels' path
# (expansion + cuBLAS); at 512, 70 / 111 against 59 / 88.
# S3SPARSE_PACKED_SP24=0 turns it off for every new module (benchmarks compare the paths).
SP24_DEFAULT_TOKENS = 128
SP24_MAX_TOKENS = 0 if os.environ.get("S3SPARSE_PACKED_SP24", "1").lower() in ("0", "off", "false") else SP24_DEFAULT_TOKENS


def _versions(meta: Tensor, subsets: Optional[Tensor], block_off: Tensor, elem_off: Tensor) -> tuple:
    """The index tables' version counters (an in-place change bumps one)."""
    return meta._version, -1 if subsets is None else subsets._version, block_off._version, elem_off._version


def _is_checked(checked: Optional[tuple], meta: Tensor, subsets: Optional[Tensor], block_off: Tensor,
                elem_off: Tensor) -> bool:
    """Whether ``checked`` (``(meta, subsets, block_off, elem_off, versions)`` the CUDA op accepted, or None)
    holds these very tables, unchanged since (identity and versions: 0.3 µs a call; storage pointers too
    would double it)."""
    c = checked
    return (c is not None and c[0] is meta and c[1] is subsets and c[2] is block_off and c[3] is elem_off
            and c[4] == _versions(meta, subsets, block_off, elem_off))


class PackedLinear(nn.Module):
    """``y = x Wᵀ + b`` with a packed structured-sparse ``W`` (:class:`PackedWeight`).

    ``forward`` is one call of the custom op ``s3sparse::packed_linear`` (CPU and
    CUDA kernels, a fake for ``torch.compile(fullgraph=True)``), accumulating in
    fp32 (fp64 for fp64) for any leading batch shape of ``x``. On CUDA, a 2:4,
    4:8 or coupled 2:4 weight (fp16 / bf16, ``out_features % 16 == 0``, ``in_features % 64 == 0``)
    runs calls of up to 128 tokens on the sparse tensor cores instead
    (``s3sparse::sp24_linear``, :meth:`use_sp24`), with the instruction's
    metadata derived once when the tables are checked (a non-persistent
    ``sp24_meta`` buffer, 1/8 byte a weight element). Large batches (prefill)
    can trade memory for speed: :meth:`use_dense_cache` runs them as dense
    ``F.linear`` on a cached decoded W (any pattern, CPU and CUDA),
    :meth:`use_semi_structured` on torch's 2:4 path.

    The packed tensors are buffers (``values``, ``meta``, ``subsets`` when the
    format uses codes, ``block_off``, ``elem_off``, and ``geometry``, the
    format's integers), ``bias`` a parameter, so ``module.to(...)``,
    ``module.half()``, ``state_dict()`` and ``load_state_dict()`` behave as for
    any module; the state dict describes itself (:meth:`from_state_dict`).

    Build one with :meth:`from_linear` (a pruned ``nn.Linear``), from a
    :class:`PackedWeight` (``PackedLinear(packed, bias)``), or, to load a saved
    state into a model, :meth:`from_config` / :meth:`from_state_dict`.

    Args:
        packed: the packed weight.
        bias: optional (out_features,) bias (kept as a parameter, in the dtype
            of the values).
    """

    # (class defaults: modules pickled before use_dense_cache existed still load)
    _dense_min_tokens: Optional[int] = None
    _dense: Optional[tuple] = None

    def __init__(self, packed: PackedWeight, bias: Optional[Tensor] = None) -> None:
        super().__init__()
        if not isinstance(packed, PackedWeight):
            raise ArgumentTypeError(f"`packed` must be a PackedWeight, got {type(packed).__name__}")
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        self.scope_shape = packed.scope_shape
        self.scope_stride = packed.scope_stride
        self.meta_bits = packed.meta_bits
        self.row_group = packed.row_group
        self.pattern = packed.pattern
        for name, tensor in packed.state_dict().items():
            self.register_buffer(name, tensor)
        if packed.subsets is None:
            self.register_buffer("subsets", None)
        if bias is not None:
            if not isinstance(bias, Tensor) or tuple(bias.shape) != (packed.out_features,):
                got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
                raise ArgumentError(f"`bias` must be a tensor of shape ({packed.out_features},), got {got}")
            bias = nn.Parameter(bias.detach().to(device=packed.device, dtype=packed.dtype).clone(), requires_grad=False)
        self.register_parameter("bias", bias)  # None too: forward reads _parameters["bias"]
        # The tables the CUDA op last accepted (the tensors themselves, held so
        # that identity means the same tables, and their versions), and whether
        # no load or move has replaced them since (what compiled code reads): see forward.
        self._checked_tables: Optional[tuple] = None
        self._tables_ok = False
        # use_semi_structured: the token count from which torch's 2:4 path runs,
        # and its weight with the key of the buffers it was built from.
        self._semi_min_tokens: Optional[int] = None
        self._semi: Optional[tuple] = None
        # use_dense_cache: the token count from which the cached dense W runs, and (key, W).
        self._dense_min_tokens: Optional[int] = None
        self._dense: Optional[tuple] = None
        # The sparse tensor cores' metadata of a 2:4 weight (a derived, non-persistent buffer), built
        # when the CUDA op accepts the tables; valid for the checked tables and values it was built
        # with (identity), and compiled code reads `_sp24_ok` (see forward and _setup_sp24).
        self.register_buffer("sp24_meta", None, persistent=False)
        self._sp24_max_tokens = SP24_MAX_TOKENS
        self._sp24_for: Optional[tuple] = None
        self._sp24_values: Optional[Tensor] = None
        self._sp24_meta_key: tuple = (None, -1)  # (the sp24_meta built, its version then)
        self._sp24_order = 0  # its column order (0: 2:4, 1: 4:8, 2: coupled 2:4)
        self._sp24_ok = False

    # ------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        scope: Optional[ScopeSpec] = None,
        nnz: Optional[int] = None,
        *,
        pattern: Optional[str] = None,
        index_format: str = "auto",
    ) -> "PackedLinear":
        """Pack a pruned ``nn.Linear``: by ``(scope, nnz)`` over its weight, or by a ``pattern`` name.

        ``pattern`` is a name of the model pipeline (``"2:4"``, ``"4:8"``,
        ``"coupled-2:4"``, ``"block16-rows"``, …: :func:`s3sparse.patterns.parse_pattern`).
        The weight must already obey the pattern (at most ``nnz`` non-zero blocks
        per scope); the bias is copied. The Linear itself is not changed.
        """
        if not isinstance(linear, nn.Linear):
            raise ArgumentTypeError(f"`linear` must be an nn.Linear, got {type(linear).__name__}")
        if (pattern is None) == (scope is None):
            raise ArgumentError("give either `scope` and `nnz`, or `pattern` (a name such as '2:4'), not both / neither")
        if pattern is not None:
            if nnz is not None:
                raise ArgumentError("`nnz` comes with `scope`; a `pattern` name sets its own")
            packed = PackedWeight.from_pattern(linear.weight, pattern, index_format=index_format)
        else:
            if nnz is None:
                raise ArgumentError("`nnz` (blocks kept per scope) is required with `scope`")
            param = getattr(getattr(scope, "block", None), "view", None)
            param = getattr(param, "param", None)
            if param is not None and param is not linear.weight and not (
                isinstance(param, Tensor) and param.data_ptr() == linear.weight.data_ptr()
                and tuple(param.shape) == tuple(linear.weight.shape)
            ):
                raise ArgumentError(
                    "`scope` describes another tensor than `linear.weight`; build it on the Linear's weight, "
                    "e.g. `scope, nnz = s3sparse.patterns.nm(linear.weight)`"
                )
            packed = PackedWeight.from_scope(scope, nnz, index_format=index_format)
        return cls(packed, linear.bias)

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any],
        *,
        bias: Optional[bool] = None,
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "PackedLinear":
        """An empty (zero) module with the buffer shapes ``config`` describes (:meth:`config`), to load a state into.

        Swap it in for an ``nn.Linear`` of a model, then ``model.load_state_dict(...)``.
        ``bias`` defaults to ``config["bias"]``.
        """
        packed = PackedWeight.empty(config, device=device, dtype=dtype)
        has_bias = bool(config.get("bias", False)) if bias is None else bool(bias)
        b = torch.zeros(packed.out_features, dtype=packed.dtype, device=packed.device) if has_bias else None
        return cls(packed, b)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], prefix: str = "") -> "PackedLinear":
        """Rebuild from a state dict (e.g. read from safetensors), keys under ``prefix``; no spec objects needed."""
        packed = PackedWeight.from_state_dict(state, prefix)
        return cls(packed, state.get(prefix + "bias"))

    # ------------------------------------------------------------ the packed weight
    @property
    def packed(self) -> PackedWeight:
        """The current buffers as a :class:`PackedWeight` (shares their storage)."""
        return PackedWeight(
            self.values, self.meta, self.subsets, self.block_off, self.elem_off, self.scope_shape,
            self.scope_stride, self.meta_bits, self.out_features, self.in_features, self.row_group, self.pattern,
        )

    @property
    def weight(self) -> Tensor:
        """The dense weight, decoded (a new tensor each time; for checks, not for speed)."""
        return self.packed.to_dense()

    def config(self) -> dict:
        """:meth:`PackedWeight.config` plus ``bias``: what :meth:`from_config` needs."""
        return dict(self.packed.config(), bias=self.bias is not None)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (without the bias)."""
        return self.packed.nbytes

    def use_semi_structured(self, min_tokens: Optional[int] = 256) -> "PackedLinear":
        """Run batches of at least ``min_tokens`` tokens through torch's 2:4 semi-structured path.

        From a few hundred tokens a layer nears the compute bound, and the sparse
        tensor cores through cuSPARSELt (``torch.sparse.to_sparse_semi_structured``)
        beat the packed kernels, whose own sparse tensor-core kernel stops at 128
        tokens (above it they expand W and call cuBLAS). Measured on an H100, 2:4
        fp16 (``benchmarks/results/semi-backends-h100-*.txt``), x dense at 256 /
        512 / 4096 tokens: this path 0.65 / 0.77 / 1.22 (2560x9728), 1.05 / 0.78 /
        1.28 (9728x2560), 0.57 / 0.77 / 1.19 (4096x4096), against the packed
        path's 0.35-0.40 / 0.41-0.48 / 0.62-0.75; below 256 the packed path is as
        fast or faster on two of the three shapes, hence the default. The cost is
        memory: the semi-structured copy of W (about 0.56 of dense) is kept beside
        the packed buffers, built now and rebuilt when the buffers change. It is
        not part of ``state_dict``. ``min_tokens=None`` turns it off and frees
        the copy. Returns the module.

        Needs a CUDA module with fp16 or bf16 values whose weight is 2:4 in
        every row (patterns ``2:4`` and ``coupled-2:4``) and a GPU torch's
        semi-structured sparsity supports; otherwise raises ``ArgumentError``
        with torch's reason. Under ``torch.compile`` and during CUDA-graph
        capture before the copy exists, the packed op runs instead.
        """
        if min_tokens is None:
            self._semi_min_tokens, self._semi = None, None
            return self
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ArgumentError(f"`min_tokens` must be a positive int (or None to turn it off), got {min_tokens!r}")
        if not self.values.is_cuda or self.values.dtype not in (torch.float16, torch.bfloat16):
            raise ArgumentError(
                f"use_semi_structured needs a CUDA module with float16 or bfloat16 values, this one is "
                f"{self.values.dtype} on {self.values.device}; move it first, e.g. module.to('cuda', torch.float16)"
            )
        self._semi = self._build_semi()
        self._semi_min_tokens = min_tokens
        return self

    def use_dense_cache(self, min_tokens: Optional[int] = 64) -> "PackedLinear":
        """Run calls of at least ``min_tokens`` tokens as dense ``F.linear`` on a cached, decoded copy of W.

        From a few dozen tokens a layer stops being memory-bound, and dense
        cuBLAS (or MKL on the CPU) multiplies faster than the packed kernels:
        on an H100 at 512 tokens the packed path runs at 0.4-0.5x of dense
        (docs/performance.md). This trades memory for that speed: the dense W
        (``out_features * in_features`` elements, about 1.8x the packed bytes
        for 2:4 fp16) is kept beside the packed buffers, built now, rebuilt
        when the values or tables change (a load, a move, an in-place edit),
        and never saved (not in ``state_dict``, not pickled). Calls below
        ``min_tokens`` (decode) still stream the packed weight. ``None`` turns
        it off and frees the copy. Returns the module.

        :meth:`use_semi_structured`, when on, takes precedence from its own
        ``min_tokens``. Under ``torch.compile``, and during CUDA-graph capture
        before the copy exists, the packed op runs instead (eager calls and
        CUDA graphs captured after the copy is built use it). A graph reads the
        copy, not the packed buffers: after changing the weights, make one
        eager large call (or call this method again) before replaying; it
        refreshes the copy in place. Do not replay such a graph after a move or
        cast of the module or ``use_dense_cache(None)``, which free the copy.
        Large calls round as ``F.linear`` on the dense layer does (for fp16 /
        bf16 with a bias, cuBLAS may round ``x Wᵀ`` before adding it; the
        packed op rounds once). In-place edits through ``.data`` bypass the
        version counters the cache is keyed on: call this method again after one.
        """
        if min_tokens is None:
            self._dense_min_tokens, self._dense = None, None
            return self
        if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
            raise ArgumentError(f"`min_tokens` must be a positive int (or None to turn it off), got {min_tokens!r}")
        self._refresh_dense()
        self._dense_min_tokens = min_tokens
        return self

    def _dense_weight(self, x: Tensor) -> Optional[Tensor]:
        """The cached dense weight when this call should use it, else None."""
        if self._dense_min_tokens is None or torch.compiler.is_compiling():
            return None
        if x.numel() // max(self.in_features, 1) < self._dense_min_tokens:
            return None
        if self._dense is None or not self._holds_weights(self._dense[0]):
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                return None
            self._refresh_dense()
        return self._dense[1]

    def _refresh_dense(self) -> None:
        """Decode W into the cache: into the same tensor when one of its shape, dtype and device is
        there (so CUDA graphs captured with it read the new W), else a new one."""
        dense = self.weight
        old = None if self._dense is None else self._dense[1]
        if old is not None and old.shape == dense.shape and old.dtype == dense.dtype and old.device == dense.device:
            old.copy_(dense)
            dense = old
        self._dense = (self._weight_key(), dense)

    def _weight_tensors(self) -> tuple:
        """The buffers W is decoded from: the values and the index tables (``subsets`` may be None)."""
        b = self._buffers
        return b["values"], b["meta"], b["subsets"], b["block_off"], b["elem_off"]

    def _weight_key(self) -> tuple:
        """The values and index tables themselves (weak references: the key keeps nothing alive) and their
        versions. Identity, not storage address: a replaced, freed buffer's address can come back."""
        return tuple((None, -1) if t is None else (weakref.ref(t), t._version) for t in self._weight_tensors())

    def _holds_weights(self, key: tuple) -> bool:
        """Whether ``key`` (:meth:`_weight_key`) names this module's current values and tables, unchanged."""
        for (ref, version), t in zip(key, self._weight_tensors()):
            if t is None:
                if ref is not None:
                    return False
            elif ref is None or ref() is not t or t._version != version:
                return False
        return True

    def _build_semi(self) -> tuple:
        from torch.sparse import to_sparse_semi_structured

        dense = self.weight
        # torch does not check the pattern (a weight that is not 2:4 would be
        # multiplied wrongly): at most 2 non-zeros in every 4 columns of a row.
        if self.in_features % 4 != 0 or int((dense.reshape(-1, 4) != 0).sum(-1).max()) > 2:
            raise ArgumentError(
                f"torch's semi-structured sparsity cannot take this weight ({self.pattern}, "
                f"{self.out_features}x{self.in_features}): it is not 2:4 (at most 2 non-zeros in every 4 "
                "consecutive columns of a row); prune it to '2:4' or 'coupled-2:4'"
            )
        try:
            weight = to_sparse_semi_structured(dense)
        except Exception as err:  # torch's reason: not 2:4, shape, dtype or GPU
            raise ArgumentError(
                f"torch's semi-structured sparsity cannot take this weight ({self.pattern}, "
                f"{self.out_features}x{self.in_features}, {self.values.dtype}): {err}"
            ) from err
        return self._weight_key(), weight

    def _semi_weight(self, x: Tensor) -> Optional[Tensor]:
        """The semi-structured weight when this call should use it, else None."""
        if self._semi_min_tokens is None or not x.is_cuda or torch.compiler.is_compiling():
            return None
        if x.numel() // max(self.in_features, 1) < self._semi_min_tokens:
            return None
        if self._semi is None or not self._holds_weights(self._semi[0]):
            if torch.cuda.is_current_stream_capturing():
                return None
            self._semi = self._build_semi()
        return self._semi[1]

    def forward(self, x: Tensor) -> Tensor:
        """``F.linear(x, W, bias)`` through :func:`s3sparse.ops.packed_linear`.

        On CUDA the first call checks the index tables on the host (one sync,
        a ``ValueError`` for bad data); later calls with the same, unchanged
        tables pass ``checked=True`` and launch without any sync, which keeps
        them capturable in CUDA graphs and as cheap on the host as ``F.linear``.
        Compiled code (``torch.compile``) cannot read the tables' identity: it
        passes ``checked=True`` when an eager call (or :meth:`check_tables`)
        checked them and no load or move (``load_state_dict``, ``.to()``) has
        replaced them since, else it syncs on every call. (Tables changed in
        place, or buffers replaced by assignment, behind a compiled module are
        not re-checked: call :meth:`check_tables` after such a change; bad data
        there gives NaN rows, never a read out of bounds.)
        """
        # The host cost of a call is the point at decode (the eager
        # target): the buffers and the bias come straight from `_buffers` /
        # `_parameters` (nn.Module's __getattr__ costs ~0.6 µs a lookup), and
        # torch's 2:4 path is looked at only when on.
        if self._semi_min_tokens is not None or self._dense_min_tokens is not None:
            w = self._semi_weight(x)
            if w is None:
                w = self._dense_weight(x)
            if w is not None:
                y = torch.nn.functional.linear(x.reshape(-1, self.in_features), w, self.bias)
                return y.reshape(*x.shape[:-1], self.out_features)
        b = self._buffers
        meta, subsets, block_off, elem_off = b["meta"], b["subsets"], b["block_off"], b["elem_off"]
        checked = eager_cuda = sp24 = False
        if x.is_cuda:
            if torch.compiler.is_compiling():
                checked = self._tables_ok  # (a guarded constant: a load or move recompiles)
                sp24 = vouched = checked and self._sp24_ok
            else:
                eager_cuda = True
                checked = _is_checked(self._checked_tables, meta, subsets, block_off, elem_off)
                sp24 = (checked and self._sp24_ok and self._sp24_for is self._checked_tables
                        and self._sp24_values is b["values"])
                # The metadata this module built, unchanged: the kernel may skip its check of every word.
                m = b["sp24_meta"]
                vouched = sp24 and m is self._sp24_meta_key[0] and m._version == self._sp24_meta_key[1]
            if sp24 and x.numel() <= self._sp24_max_tokens * self.in_features and x.dtype == b["values"].dtype:
                return ops.sp24_linear(x, b["values"], b["sp24_meta"], self.out_features, self._parameters["bias"],
                                       vouched, self._sp24_order)
        y = ops.packed_linear(
            x, b["values"], meta, subsets, block_off, elem_off, self.scope_shape, self.scope_stride,
            self.meta_bits, self.out_features, self.row_group, self._parameters["bias"], checked,
        )
        if eager_cuda and not checked and not torch.cuda.is_current_stream_capturing():
            # The op returned: it checked these tables.
            self._checked_tables = (meta, subsets, block_off, elem_off, _versions(meta, subsets, block_off, elem_off))
            self._tables_ok = True
            self._setup_sp24()
        return y

    def _setup_sp24(self) -> None:
        """Build the sparse tensor cores' metadata for the tables just checked, when the weight is 2:4, 4:8
        or coupled 2:4 as packed (fp16 / bf16, out_features % 16 == 0, in_features % 64 == 0); else leave
        the packed kernels in charge. One host sync, once per checked set of tables."""
        self._sp24_for, self._sp24_values = self._checked_tables, self._buffers["values"]
        self._buffers["sp24_meta"], self._sp24_ok = None, False
        name = (self.pattern or {}).get("registry_name")
        if (not self._sp24_max_tokens or (name is not None and name not in COLUMN_ORDERS)
                or self.values.dtype not in (torch.float16, torch.bfloat16)
                or self.out_features % 16 or self.in_features % 64 or not self.in_features
                or self.values.numel() * 2 != self.out_features * self.in_features):
            return
        try:
            try:
                order, meta = self._sp24_form(self.packed, name)
            except torch.cuda.OutOfMemoryError:  # (its transient, 4-8 bytes a weight element: on the CPU then)
                order, meta = self._sp24_form(self.packed.to("cpu"), name)
                meta = meta.to(self.values.device)
        except ArgumentError:  # not 2:4 (4:8, coupled 2:4) as the kernel reads it: the packed kernels take it
            return
        self._buffers["sp24_meta"], self._sp24_meta_key, self._sp24_ok = meta, (meta, meta._version), True
        self._sp24_order = order

    @staticmethod
    def _sp24_form(packed: PackedWeight, name: Optional[str]) -> tuple:
        """(column order, sp24 metadata) of ``packed``, its pattern ``name`` (or None: found out)."""
        return sp24_form(packed, None if name is None else COLUMN_ORDERS[name])

    def use_sp24(self, max_tokens: Optional[int] = SP24_DEFAULT_TOKENS) -> "PackedLinear":
        """Run calls of up to ``max_tokens`` tokens on the sparse tensor cores (the default, 128; ``None``
        or 0 turns it off and frees the metadata).

        On CUDA, for fp16 / bf16 2:4, 4:8 and coupled 2:4 weights with ``out_features % 16 == 0`` and
        ``in_features % 64 == 0``, the first call that checks the tables also builds the instruction's metadata
        (:func:`s3sparse.sparse.sp24.sp24_meta_words`, 1/8 byte a weight element, not in ``state_dict``),
        and such calls then take :func:`s3sparse.ops.sp24_linear`. From 17 tokens the op runs its block-tiled
        kernel (x staged in shared memory, one launch for all tokens): on an H100 faster than the packed
        kernels from 32 to 128 tokens (still below dense ``F.linear``), slower at 512, hence 128
        (docs/performance.md). Returns the module.
        """
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0):
            raise ArgumentError(f"`max_tokens` must be a non-negative int (or None to turn it off), got {max_tokens!r}")
        self._sp24_max_tokens = max_tokens or 0
        self._forget_check()
        self._buffers["sp24_meta"] = None
        return self

    def __getstate__(self):
        # A pickled module's tables come back from a file: check them again (identity survives pickling).
        state = super().__getstate__()
        state["_checked_tables"], state["_tables_ok"], state["_sp24_ok"] = None, False, False
        state["_dense"] = state["_semi"] = None  # derived copies (keyed by weak references): rebuilt when next used
        return state

    def _holds_checked_tables(self) -> bool:
        """Whether the module's index tables are the ones the CUDA op last accepted, unchanged since."""
        b = self._buffers
        return _is_checked(self._checked_tables, b["meta"], b["subsets"], b["block_off"], b["elem_off"])

    def check_tables(self) -> "PackedLinear":
        """Check the index tables on the module's device now (a ``ValueError`` for bad data).

        On CUDA this is one small call and one host sync; afterwards calls with
        these tables launch without a sync, compiled ones too (see :meth:`forward`).
        ``s3sparse.llm.load_packed`` calls it for every packed layer on a GPU.
        On the CPU the kernel checks on every call anyway. Returns ``self``.
        """
        self._forget_check()
        x = torch.zeros(1, self.in_features, dtype=self.values.dtype, device=self.values.device)
        with torch.no_grad():
            self.forward(x)
        return self

    def _forget_check(self) -> None:
        # Compiled calls must not trust the old check, and the next eager call (or
        # check_tables) checks again even where the tables kept their storage.
        self._checked_tables, self._tables_ok, self._sp24_ok = None, False, False

    def _apply(self, fn, recurse=True):
        self._forget_check()  # a move or a cast (the index tables may keep their storage)
        self._dense = None  # (its key would no longer match: free it now, not at the next large call)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The buffers' shapes and the op's integer arguments follow from `geometry`:
        # a state of another geometry cannot be loaded into this module.
        key = prefix + "geometry"
        if key in state_dict:
            theirs = state_dict[key]
            if not (isinstance(theirs, Tensor) and theirs.shape == self.geometry.shape
                    and torch.equal(theirs.cpu(), self.geometry.cpu())):
                error_msgs.append(
                    f"{key}: the packed geometry {theirs.tolist() if isinstance(theirs, Tensor) else theirs} differs "
                    f"from this module's {self.geometry.tolist()}; build the module from that state with "
                    "PackedLinear.from_state_dict(state, prefix) or PackedLinear.from_config(config)"
                )
                return
        self._forget_check()  # (loaded in place: the version key alone would not tell compiled code)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        name = (self.pattern or {}).get("registry_name") or (self.pattern or {}).get("name")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"pattern={name!r}, nnz={self.values.shape[1]}, row_group={self.row_group}, dtype={self.values.dtype}"
        )
