"""Channel compaction: whole-channel sparsity turned into physically smaller dense layers.

A channel ``j`` between a *producer* (a Linear whose output feature ``j`` it is:
row ``j`` of its weight) and its *consumers* (the Linears reading feature ``j``:
column ``j`` of their weights) can be deleted from all of them when doing so
leaves every output unchanged. :func:`compact` decides that channel by channel
from the weights, then swaps in smaller ``nn.Linear`` weights (same module
objects, same dtype and device), so a channel-pruned model simply becomes a
smaller model. :func:`compact_model` does it for the MLP of every block of a
Hugging Face model, :func:`compact_inputs` compacts the zero input columns of a
lone Linear.

When a channel is removed (the exactness conditions)
-----------------------------------------------------
Write ``h_j`` for the value of channel ``j`` that the consumers read, ``act`` for
the elementwise activation between producer and consumers, ``p`` for the
producer (``u`` and ``g`` for the up and gate projections of a gated MLP,
``h = act(g(x)) * u(x)``) and ``b`` for biases (an absent bias is 0).

* **Exactly zero** — removed: the consumers' column ``j`` is zero in every
  consumer (``h_j`` is multiplied by 0; this is how a ``columns`` pattern on the
  consumer shrinks its producer too), or
  - plain: the producer row is zero and ``act(b_p[j]) == 0``;
  - gated: the up row is zero and ``b_u[j] == 0`` (the product is 0 whatever the
    gate), or the gate row is zero and ``act(b_g[j]) == 0`` (SiLU, GELU and ReLU
    all give ``act(0) = 0``, so a LLaMA channel whose gate row *or* up row is
    pruned is removed).
* **Constant** — removed and folded: the producer row (gated: both rows) is zero,
  so ``h_j`` is the constant ``c_j = act(b_p[j])`` (gated: ``act(b_g[j])·b_u[j]``),
  and every consumer has a bias: ``b_c += W_c[:, j] · c_j`` (computed in float64
  for float32 weights, float32 for half types). Turned off by ``fold_bias=False``.
* **Kept** otherwise — e.g. a zero up row with a non-zero up bias
  (``h_j = act(g(x))·b_u[j]`` still depends on the input), a zero gate row whose
  ``act(b_g[j]) != 0`` (``h_j = act(b_g[j])·u(x)``), or a constant channel whose
  consumer has no bias. Such channels are listed in
  :attr:`ChannelCompaction.kept_dead` with the reason; ``strict=True`` raises instead.

"Unchanged" means: the same function of the input for every input on which the
original layers give finite values (a removed channel whose value would have been
``inf`` or ``NaN`` times zero no longer produces a NaN), up to floating-point
summation order — a product with fewer terms rounds differently, so outputs agree
to round-off, not bit for bit; a folded constant is one more rounding.
``act`` is evaluated on the biases with the layers' own dtype, as the forward does.

Reloading a compacted Hugging Face model
----------------------------------------
:func:`compact_model` sets ``config.intermediate_size`` (GPT-2: ``n_inner``) only
when every compacted MLP ends with the same width; then ``save_pretrained`` /
``from_pretrained`` work as usual. With per-layer widths the config is left alone
(the report says so) and ``from_pretrained`` would refuse the smaller tensors:
save with :func:`save_compacted` (``save_pretrained`` plus a sidecar
``s3sparse_compact.json`` recording the shape of every Linear) and reload with
:func:`load_compacted`, which loads the model with ``ignore_mismatched_sizes=True``
and rebuilds every layer whose recorded shape differs from the checkpoint's
tensors. :func:`load_compacted` works in the uniform case too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..block import BlockCoupling, BlockSpec
from ..errors import ArgumentTypeError, CouplingError, ShapeMismatchError, SpecError, UnknownNameError
from ..scope import ScopeCoupling, ScopeSpec
from .layer import LinearLayer, is_conv1d, is_linear

__all__ = [
    "compact",
    "compact_inputs",
    "compact_model",
    "GatherLinear",
    "ChannelCompaction",
    "CompactReport",
    "ACTIVATIONS",
    "MLP_KINDS",
    "SIDECAR_NAME",
    "save_compacted",
    "load_compacted",
]

#: The activations ``act=`` takes by name (anything elementwise and callable works too).
ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

#: The sidecar :func:`save_compacted` writes next to the weights.
SIDECAR_NAME = "s3sparse_compact.json"
_SIDECAR_FORMAT = "s3sparse.compact/1"

Spec = Union[BlockSpec, BlockCoupling, ScopeSpec, ScopeCoupling]
ModuleRef = Union[nn.Module, str]


# ------------------------------------------------------------------ layer arguments (nn.Linear or Conv1D: .layer)
def _layer(obj: object, arg: str) -> LinearLayer:
    if not is_linear(obj):
        raise ArgumentTypeError(
            f"`{arg}` must be an nn.Linear or a transformers Conv1D (GPT-2), got {type(obj).__name__}"
        )
    if obj.weight.device.type == "meta":
        raise SpecError(f"`{arg}` has its weight on the meta device (no values); load the weights before compacting")
    return LinearLayer(arg, obj)


def _resolve_act(act: object, needed: bool) -> Optional[Callable[[Tensor], Tensor]]:
    if act is None:
        if needed:
            raise SpecError(
                "`act`: give the elementwise activation between the producer and the consumers "
                "(e.g. act=mlp.act_fn, act=torch.nn.functional.gelu, or act='identity' when the producer feeds the "
                "consumers directly); it decides whether a pruned channel's constant output act(bias) is zero"
            )
        return None
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            known = ", ".join(repr(k) for k in ACTIVATIONS)
            raise UnknownNameError(f"`act`: unknown activation {act!r}; known names: {known}, or pass the callable itself")
        return ACTIVATIONS[act]
    if not callable(act):
        raise ArgumentTypeError(f"`act` must be a callable (elementwise), an activation name or None, got {type(act).__name__}")
    return act  # type: ignore[return-value]


def _apply_act(act: Callable[[Tensor], Tensor], values: Tensor, arg: str) -> Tensor:
    out = act(values.clone())  # a clone: an in-place activation (ReLU(inplace=True)) must not touch a bias
    if not isinstance(out, Tensor) or out.shape != values.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise SpecError(f"`act` must be elementwise (same shape out as in): on {tuple(values.shape)} it returned {got} ({arg})")
    return out


def _zero_rows(m: Tensor) -> Tensor:
    return ~(m != 0).any(dim=1)  # NaN != 0, so a NaN row is not zero


def _zero_cols(m: Tensor) -> Tensor:
    return ~(m != 0).any(dim=0)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _shape_error(arg: str, expected: str, got: str, fix: str) -> ShapeMismatchError:
    err = ShapeMismatchError(expected, got, arg)
    err.args = (f"{err.args[0]}; {fix}",)
    return err


# ------------------------------------------------------------------ the result of one compaction
@dataclass
class ChannelCompaction:
    """What :func:`compact` did (or, with ``dry_run=True``, would do) to one producer → consumers channel set.

    Attributes:
        producer: the producer's name (module path, or the argument name).
        gate: the gate's name (gated MLPs), else ``None``.
        consumers: the consumers' names.
        channels_before: channels (producer output features) before.
        kept: indices of the channels kept, ascending (a long tensor on the CPU).
        removed_zero: channels removed because their value, or their consumers' columns, are exactly zero.
        removed_folded: constant channels removed after folding their value into the consumers' biases.
        kept_dead: ``{channel: reason}`` for channels with a zero producer (or gate) row that had to stay.
        params_before: parameters (weights and biases) of the layers involved, before.
        params_after: the same after.
        applied: whether the smaller weights were installed (False for ``dry_run``).
        name: the MLP's module path (:func:`compact_model`), else ``""``.
        family: the MLP family (:func:`compact_model`), else ``""``.
        replaced: ``{module path: new module}`` of modules replaced by a :class:`GatherLinear`.
    """

    producer: str
    gate: Optional[str]
    consumers: Tuple[str, ...]
    channels_before: int
    kept: Tensor
    removed_zero: List[int]
    removed_folded: List[int]
    kept_dead: Dict[int, str]
    params_before: int
    params_after: int
    applied: bool = False
    name: str = ""
    family: str = ""
    replaced: Dict[str, nn.Module] = field(default_factory=dict)

    @property
    def channels_after(self) -> int:
        """Channels kept."""
        return int(self.kept.numel())

    @property
    def params_saved(self) -> int:
        """``params_before - params_after``."""
        return self.params_before - self.params_after

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready summary (channel lists as lists, no modules)."""
        return {
            "name": self.name,
            "family": self.family,
            "producer": self.producer,
            "gate": self.gate,
            "consumers": list(self.consumers),
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "removed_zero": list(self.removed_zero),
            "removed_folded": list(self.removed_folded),
            "kept_dead": {str(k): v for k, v in self.kept_dead.items()},
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_saved": self.params_saved,
            "applied": self.applied,
        }


@dataclass
class _Plan:
    """A checked compaction, not yet installed: :meth:`apply` builds the new tensors, then swaps them all in."""

    producer: LinearLayer
    gate: Optional[LinearLayer]
    consumers: List[LinearLayer]
    keep: Tensor  # bool (F,)
    folded: Tensor  # bool (F,)
    const: Optional[Tensor]  # (F,) constant channel values where folded
    record: ChannelCompaction

    @torch.no_grad()
    def apply(self) -> ChannelCompaction:
        index = self.keep.nonzero().squeeze(1).to(self.producer.module.weight.device)
        new: List[Tuple[LinearLayer, Tensor, Optional[Tensor]]] = []
        for layer in [self.producer] + ([self.gate] if self.gate is not None else []):
            w, b = layer.detached_matrix(), layer.bias
            new.append((layer, w.index_select(0, index), None if b is None else b.index_select(0, index)))
        for layer in self.consumers:
            w, b = layer.detached_matrix(), layer.bias
            cols = index.to(w.device)
            if b is not None and bool(self.folded.any()):
                acc = _acc_dtype(w.dtype)
                f = self.folded.nonzero().squeeze(1).to(w.device)
                shift = w.index_select(1, f).to(acc) @ self.const.index_select(0, f.to(self.const.device)).to(device=w.device, dtype=acc)
                b = (b.to(acc) + shift.to(b.device)).to(b.dtype)
            new.append((layer, w.index_select(1, cols), b))
        # Every new tensor exists: only attribute assignments from here on.
        for layer, w, b in new:
            layer.install(w, b)
        self.record.applied = True
        return self.record


# ------------------------------------------------------------------ planning: which channels go
def _check_plan_layers(producer: LinearLayer, gate: Optional[LinearLayer], consumers: List[LinearLayer]) -> None:
    """Refuse a gate or consumers whose widths do not match the producer's, or a module passed twice."""
    width = producer.out_features
    if gate is not None and gate.out_features != width:
        raise _shape_error(
            gate.name, f"out_features {width} (the producer's)", f"out_features {gate.out_features}",
            "the gate and the up projection must have the same output channels",
        )
    if gate is not None and gate.in_features != producer.in_features:
        raise _shape_error(
            gate.name, f"in_features {producer.in_features} (the producer's)", f"in_features {gate.in_features}",
            "the gate and the up projection read the same input",
        )
    for c in consumers:
        if c.in_features != width:
            raise _shape_error(
                c.name, f"in_features {width} (= the producer's out_features)", f"in_features {c.in_features}",
                "pass as consumers the layers that read the producer's output",
            )
    modules = [producer.module] + ([gate.module] if gate is not None else []) + [c.module for c in consumers]
    if len({id(m) for m in modules}) != len(modules):
        raise SpecError("`producer`, `gate` and `consumers` must be distinct modules; one was passed twice")


@dataclass
class _Channels:
    """Per-channel facts about the producer (and gate) rows that decide which channels can go."""

    bp: Tensor  # the producer's bias (zeros when it has none)
    p_zero: Tensor  # bool: producer row all zero
    g_zero: Optional[Tensor]  # bool: gate row all zero (gated only)
    g_value: Optional[Tensor]  # act(gate bias) (gated only)
    zero: Tensor  # bool: the channel's value is exactly zero
    constant: Tensor  # bool: the channel's value is a constant
    const: Tensor  # that constant's value
    dead: Tensor  # bool: some row of the channel was pruned


def _channel_values(
    producer: LinearLayer, gate: Optional[LinearLayer], act: Optional[Callable[[Tensor], Tensor]]
) -> _Channels:
    """Which channels are exactly zero, or constant (and their constant), from the rows and biases alone."""
    width = producer.out_features
    wp, dev = producer.detached_matrix(), producer.detached_matrix().device
    bp = producer.bias if producer.bias is not None else torch.zeros(width, dtype=wp.dtype, device=dev)
    p_zero = _zero_rows(wp)
    if gate is None:
        # Without consumers the producer's own output is what shrinks: its value is the pre-activation.
        value = _apply_act(act, bp, "on the producer's bias") if act is not None else bp
        return _Channels(bp, p_zero, None, None, zero=p_zero & (value == 0), constant=p_zero, const=value, dead=p_zero)
    wg = gate.detached_matrix()
    bg = gate.bias if gate.bias is not None else torch.zeros(width, dtype=wg.dtype, device=wg.device)
    g_zero = _zero_rows(wg).to(dev)
    g_value = _apply_act(act, bg, "on the gate's bias").to(dev)
    return _Channels(
        bp, p_zero, g_zero, g_value,
        zero=(p_zero & (bp == 0)) | (g_zero & (g_value == 0)),
        constant=p_zero & g_zero,
        const=g_value * bp,  # act(b_g)·b_u, in the dtype the forward multiplies in
        dead=p_zero | g_zero,
    )


def _zero_consumer_cols(width: int, consumers: List[LinearLayer], dev: torch.device) -> Tensor:
    """Bool per channel: its column is zero in every consumer (False for all when there are none)."""
    cols_zero = torch.zeros(width, dtype=torch.bool, device=dev)
    if consumers:
        cols_zero = torch.ones(width, dtype=torch.bool, device=dev)
        for c in consumers:
            cols_zero &= _zero_cols(c.detached_matrix()).to(dev)
    return cols_zero


def _kept_dead_reasons(
    ch: _Channels,
    keep: Tensor,
    producer_label: str,
    gate_label: Optional[str],
    has_consumers: bool,
    fold_bias: bool,
) -> Dict[int, str]:
    """``{channel: why}`` for every channel with a pruned row that must nevertheless stay."""
    bp, const = ch.bp, ch.const
    reasons: Dict[int, str] = {}
    for j in (ch.dead & keep).nonzero().squeeze(1).tolist():
        if gate_label is None:
            if not has_consumers:
                why = f"row zero but bias {float(bp[j]):.6g} != 0: the output is that constant, not zero"
            elif not torch.isfinite(const[j]):
                why = f"row zero; constant output act(bias) = {float(const[j])} is not finite"
            else:
                why = (
                    f"row zero; constant output act(bias) = {float(const[j]):.6g} != 0 and "
                    + ("fold_bias=False" if not fold_bias else "a consumer has no bias to fold it into")
                )
            reasons[j] = f"{producer_label}: {why}"
        elif bool(ch.p_zero[j]) and not bool(ch.g_zero[j]):
            reasons[j] = (
                f"{producer_label}: row zero but its bias {float(bp[j]):.6g} != 0, so the channel is "
                f"act(gate(x))·{float(bp[j]):.6g} and still depends on the input"
            )
        elif bool(ch.g_zero[j]) and not bool(ch.p_zero[j]):
            reasons[j] = (
                f"{gate_label}: row zero but act(gate bias) = {float(ch.g_value[j]):.6g} != 0, so the channel is "
                f"{float(ch.g_value[j]):.6g}·up(x) and still depends on the input"
            )
        else:
            reasons[j] = (
                f"{producer_label} and {gate_label}: rows zero; constant output {float(const[j]):.6g} "
                + ("is not finite" if not torch.isfinite(const[j]) else
                   "and fold_bias=False" if not fold_bias else "and a consumer has no bias to fold it into")
            )
    return reasons


def _params_after(producer: LinearLayer, gate: Optional[LinearLayer], consumers: List[LinearLayer], kept_n: int) -> int:
    """Parameters of the producer, gate and consumers once only ``kept_n`` channels remain."""
    params_after = 0
    for layer in [producer] + ([gate] if gate else []):
        params_after += kept_n * layer.in_features + (0 if layer.bias is None else kept_n)
    for c in consumers:
        params_after += c.out_features * kept_n + (0 if c.bias is None else c.out_features)
    return params_after


@torch.no_grad()
def _plan(
    producer: LinearLayer,
    gate: Optional[LinearLayer],
    consumers: List[LinearLayer],
    act: Optional[Callable[[Tensor], Tensor]],
    fold_bias: bool,
    strict: bool,
    names: Optional[Mapping[int, str]] = None,
) -> _Plan:
    """Check the layers, decide channel by channel what is removed, folded or kept, and record it."""
    names = names or {}

    def label(layer: LinearLayer) -> str:
        return names.get(id(layer.module), layer.name)

    _check_plan_layers(producer, gate, consumers)
    width = producer.out_features
    dev = producer.detached_matrix().device
    ch = _channel_values(producer, gate, act)
    removed_zero = ch.zero | _zero_consumer_cols(width, consumers, dev)
    can_fold = fold_bias and bool(consumers) and all(c.bias is not None for c in consumers)
    folded = ch.constant & ~removed_zero & torch.isfinite(ch.const) & can_fold
    keep = ~(removed_zero | folded)

    gate_label = None if gate is None else label(gate)
    reasons = _kept_dead_reasons(ch, keep, label(producer), gate_label, bool(consumers), fold_bias)
    if strict and reasons:
        j, why = next(iter(reasons.items()))
        arg = gate.name if gate is not None and why.startswith(f"{label(gate)}:") else producer.name
        raise SpecError(
            f"`{arg}`: {len(reasons)} pruned channel(s) cannot be removed exactly, e.g. channel {j}: {why}; "
            "prune the matching rows/biases too, or pass strict=False to keep such channels"
        )

    params_before = sum(layer.numel() for layer in [producer] + ([gate] if gate else []) + consumers)
    record = ChannelCompaction(
        producer=label(producer),
        gate=gate_label,
        consumers=tuple(label(c) for c in consumers),
        channels_before=width,
        kept=keep.nonzero().squeeze(1).cpu(),
        removed_zero=removed_zero.nonzero().squeeze(1).tolist(),
        removed_folded=folded.nonzero().squeeze(1).tolist(),
        kept_dead=reasons,
        params_before=params_before,
        params_after=_params_after(producer, gate, consumers, int(keep.sum())),
    )
    return _Plan(producer, gate, consumers, keep.cpu(), folded.cpu(), ch.const.detach(), record)


# ------------------------------------------------------------------ input-column compaction of a lone Linear
class GatherLinear(nn.Module):
    """``linear(x[..., index])``: a Linear whose zero input columns were dropped.

    The input cannot shrink without its producer, so the kept input features
    are gathered (``index_select``) and fed to a smaller ``nn.Linear``. Same
    outputs as the original layer (the dropped columns were zero), computed with
    ``len(index)`` instead of ``in_features`` columns. Built by
    :func:`compact_inputs`; when the producer of the input is known, prefer
    :func:`compact` with that producer and this layer as consumer: both shrink
    and nothing is gathered.

    Args:
        index: the kept input features (1-D long tensor, ascending).
        linear: the ``nn.Linear`` over those features.
        in_features: the original input width (checked in forward).

    Attributes:
        index: a buffer (saved in the state dict).
        linear: the smaller Linear.
        in_features, out_features: the layer's interface widths (as the original's).
    """

    def __init__(self, index: Tensor, linear: nn.Linear, in_features: int) -> None:
        super().__init__()
        if index.ndim != 1 or index.numel() != linear.in_features:
            raise SpecError(
                f"`index` must be 1-D with one entry per input of `linear` ({linear.in_features}), got shape {tuple(index.shape)}"
            )
        self.in_features = int(in_features)
        self.out_features = linear.out_features
        self.register_buffer("index", index.to(device=linear.weight.device, dtype=torch.long))
        self.linear = linear

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeMismatchError(f"(..., {self.in_features})", tuple(x.shape), "input")
        return self.linear(x.index_select(-1, self.index))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, kept={self.index.numel()}, out_features={self.out_features}"


@torch.no_grad()
def compact_inputs(layer: nn.Module) -> GatherLinear:
    """A :class:`GatherLinear` computing ``layer`` with its all-zero input columns dropped.

    ``layer`` (an ``nn.Linear`` or GPT-2 ``Conv1D``) is not modified; install the
    result in its place. A layer without zero columns gives a GatherLinear that
    keeps every column. The inner Linear has the layer's dtype and device.
    """
    lin = _layer(layer, "layer")
    w, b = lin.detached_matrix(), lin.bias
    index = (~_zero_cols(w)).nonzero().squeeze(1)
    inner = nn.Linear(int(index.numel()), lin.out_features, bias=b is not None, device="meta")
    inner.weight = nn.Parameter(w.index_select(1, index).contiguous(), requires_grad=layer.weight.requires_grad)
    if b is not None:
        inner.bias = nn.Parameter(b.clone(), requires_grad=layer.bias.requires_grad)
    return GatherLinear(index, inner, lin.in_features)


# ------------------------------------------------------------------ S3 objects: roles of their members
def _block_specs(spec: Spec) -> Tuple[List[BlockSpec], List[BlockCoupling]]:
    """Every BlockSpec under ``spec`` and the BlockCouplings among them."""
    if isinstance(spec, ScopeCoupling):
        blocks = [m.block for m in spec.members]
    elif isinstance(spec, ScopeSpec):
        blocks = [spec.block]
    else:
        blocks = [spec]
    specs: List[BlockSpec] = []
    couplings: List[BlockCoupling] = []
    for block in blocks:
        if isinstance(block, BlockCoupling):
            couplings.append(block)
            specs.extend(block.specs)
        else:
            specs.append(block)
    return specs, couplings


def _describe(bs: BlockSpec) -> str:
    return f"block {bs.name!r}" if bs.name else f"block {tuple(bs.shape)} on a {tuple(bs.view.param.shape)} weight"


def _member_role(bs: BlockSpec, module: nn.Module) -> str:
    """``'rows'`` (output channels of the module) or ``'cols'`` (input channels), or a SpecError."""
    if not bs.view.is_identity() or bs.view.param.ndim != 2:
        raise SpecError(
            f"`spec`: {_describe(bs)} is on a strided view {bs.view.shape}:{bs.view.stride}, not on the weight itself; "
            "compaction needs blocks of whole rows or columns of the weight (patterns.channels / columns / col_blocks)"
        )
    rows, cols = bs.view.param.shape
    whole_row, whole_col = bs.shape[1] == cols, bs.shape[0] == rows
    if whole_row == whole_col:
        what = "covers the whole weight" if whole_row else "is not a whole row or column"
        raise SpecError(
            f"`spec`: {_describe(bs)} {what} (block shape {tuple(bs.shape)} of a {rows}×{cols} weight); compaction needs "
            "whole-channel blocks: (1, -1) rows (patterns.channels) or (-1, w) columns (patterns.columns, col_blocks). "
            "For N:M and other fine-grained patterns use packed execution (s3sparse.sparse PackedLinear)"
        )
    # A Conv1D stores (in, out): its weight rows are input channels.
    if is_conv1d(module):
        return "cols" if whole_row else "rows"
    return "rows" if whole_row else "cols"


def _owners(root: nn.Module) -> Dict[int, Tuple[str, nn.Module]]:
    return {id(m.weight): (n, m) for n, m in root.named_modules() if is_linear(m)}


def _check_coupling(coupling: BlockCoupling, names: Mapping[BlockSpec, str]) -> None:
    """A BlockCoupling prunes its members' blocks together; refuse weights that do not follow it."""
    zeros = []
    for bs in coupling.specs:
        m = bs.view.param.detach()
        # Zero per channel of the member, then per block of channels (block i of every member is coupled).
        per_row_of_param = _zero_rows(m) if bs.shape[1] == m.shape[1] else _zero_cols(m)
        width = bs.shape[0] if bs.shape[1] == m.shape[1] else bs.shape[1]
        zeros.append(per_row_of_param.reshape(-1, width).all(dim=1).cpu())
    if len({z.numel() for z in zeros}) != 1:
        return  # grids of different length cannot come out of a valid coupling of whole channels
    stacked = torch.stack(zeros)
    mixed = (stacked.any(0) & ~stacked.all(0)).nonzero().squeeze(1)
    if mixed.numel():
        i = int(mixed[0])
        zero_in = [names[bs] for bs, z in zip(coupling.specs, zeros) if bool(z[i])]
        live_in = [names[bs] for bs, z in zip(coupling.specs, zeros) if not bool(z[i])]
        raise CouplingError(
            f"`spec`: the coupling {coupling.name or ''!r} prunes its members' blocks together, but block {i} is zero in "
            f"{', '.join(zero_in)} and not in {', '.join(live_in)} ({mixed.numel()} such block(s)); the weights were "
            "not pruned with this coupling. Prune through it first (e.g. its scope's hard_threshold(nnz=...)), or call "
            "compact(up, [down], gate=gate, act=...) to decide channel by channel from the weights alone"
        )


def _find_module(ref: ModuleRef, root: Optional[nn.Module], arg: str) -> nn.Module:
    if isinstance(ref, str):
        if root is None:
            raise ArgumentTypeError(f"`{arg}` is the name {ref!r}; names need `root` (the module holding the layers)")
        try:
            return root.get_submodule(ref)
        except AttributeError:
            raise UnknownNameError(f"`{arg}`: no module named {ref!r} under `root` ({type(root).__name__})") from None
    return ref  # type: ignore[return-value]


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _spec_layers(
    spec: Spec, root: nn.Module
) -> Tuple[List[Tuple[str, nn.Module]], List[Tuple[str, nn.Module]]]:
    """The ``(name, module)`` producers (whole rows) and consumers (whole columns) of ``spec`` under ``root``."""
    owners = _owners(root)
    specs, couplings = _block_specs(spec)
    roles: Dict[BlockSpec, str] = {}
    names: Dict[BlockSpec, str] = {}
    members: Dict[BlockSpec, Tuple[str, nn.Module]] = {}
    for bs in specs:
        owner = owners.get(id(bs.view.param))
        if owner is None:
            raise SpecError(
                f"`spec`: the weight of {_describe(bs)} is not the weight of any nn.Linear or Conv1D under `root`; "
                "build the pattern on layer.weight itself (not a copy) and pass the module that holds the layer"
            )
        members[bs] = owner
        names[bs] = owner[0] or "root"
        roles[bs] = _member_role(bs, owner[1])
    for coupling in couplings:
        _check_coupling(coupling, names)
    by_module: Dict[int, Tuple[str, nn.Module, str]] = {}
    for bs in specs:
        name, module = members[bs]
        previous = by_module.get(id(module))
        if previous is not None and previous[2] != roles[bs]:
            raise SpecError(f"`spec`: {name} appears both as producer (rows) and consumer (columns); compact one at a time")
        by_module[id(module)] = (name, module, roles[bs])
    producers = [(n, m) for n, m, r in by_module.values() if r == "rows"]
    spec_consumers = [(n, m) for n, m, r in by_module.values() if r == "cols"]
    return producers, spec_consumers


def _compact_spec_inputs(
    spec_consumers: List[Tuple[str, nn.Module]],
    consumers: Sequence[ModuleRef],
    gate: Optional[ModuleRef],
    root: nn.Module,
    dry_run: bool,
) -> ChannelCompaction:
    """A spec of input columns only: replace its one layer under ``root`` by a :class:`GatherLinear`."""
    if consumers or gate is not None:
        raise SpecError(
            "`spec` holds only input columns; `consumers` and `gate` apply to output-channel specs. To shrink the "
            "producer as well, call compact(producer, [consumer], act=...)"
        )
    # Standalone input-column compaction: the input keeps its width, the kept columns are gathered.
    if len(spec_consumers) > 1:
        raise SpecError(
            f"`spec` holds the input columns of {len(spec_consumers)} layers "
            f"({', '.join(n for n, _ in spec_consumers)}) and no producer; compact each layer's columns on its own"
        )
    name, module = spec_consumers[0]
    if not name:
        raise SpecError("`root` is itself the layer whose inputs are compacted; pass its parent module as root")
    lin = _layer(module, name)
    gathered = compact_inputs(module)
    kept = gathered.index.cpu()
    dropped = torch.ones(lin.in_features, dtype=torch.bool)
    dropped[kept] = False
    record = ChannelCompaction(
        producer="",
        gate=None,
        consumers=(name,),
        channels_before=lin.in_features,
        kept=kept,
        removed_zero=dropped.nonzero().squeeze(1).tolist(),
        removed_folded=[],
        kept_dead={},
        params_before=lin.numel(),
        params_after=sum(p.numel() for p in gathered.linear.parameters()),
        replaced={name: gathered},
    )
    if not dry_run:
        _set_module(root, name, gathered)
        record.applied = True
    return record


def _spec_producer(
    producers: List[Tuple[str, nn.Module]], gate_module: Optional[nn.Module]
) -> Tuple[str, nn.Module]:
    """The spec's producer (the up projection when it has two: the one that is not ``gate``)."""
    if len(producers) > 2:
        raise SpecError(
            f"`spec`: {len(producers)} layers have whole output rows in the pattern ({', '.join(n for n, _ in producers)}); "
            "a channel has one producer (or an up and a gate projection)"
        )
    if len(producers) == 2:
        if gate_module is None or id(gate_module) not in {id(m) for _, m in producers}:
            raise SpecError(
                f"`gate`: the spec has two producers ({producers[0][0]}, {producers[1][0]}); pass gate= the one whose "
                "output goes through the activation (gate_proj), e.g. gate=mlp.gate_proj"
            )
        return next((n, m) for n, m in producers if m is not gate_module)
    producer_name, producer_module = producers[0]
    if gate_module is producer_module:
        raise SpecError("`gate` is the spec's only producer; pass the up projection's rows in the spec as well")
    return producer_name, producer_module


def _compact_spec(
    spec: Spec,
    consumers: Sequence[ModuleRef],
    gate: Optional[ModuleRef],
    act: object,
    root: Optional[nn.Module],
    fold_bias: bool,
    strict: bool,
    dry_run: bool,
) -> ChannelCompaction:
    """:func:`compact` of an S3 spec: find its layers under ``root``, then compact them as layers."""
    if not isinstance(root, nn.Module):
        raise ArgumentTypeError(
            "`root`: compacting an S3 spec needs root= the module holding its layers (e.g. the MLP or the model), "
            f"to find the Linears that own the spec's weights; got {type(root).__name__}"
        )
    producers, spec_consumers = _spec_layers(spec, root)
    name_of = {id(m): n for n, m in ((n, m) for n, m in root.named_modules())}

    if not producers:
        return _compact_spec_inputs(spec_consumers, consumers, gate, root, dry_run)

    gate_module = None if gate is None else _find_module(gate, root, "gate")
    producer_name, producer_module = _spec_producer(producers, gate_module)
    extra = [_find_module(c, root, f"consumers[{i}]") for i, c in enumerate(consumers)]
    consumer_modules = [m for _, m in spec_consumers] + [m for m in extra if all(m is not s for _, s in spec_consumers)]
    if not consumer_modules:
        raise SpecError(
            f"`consumers`: the spec covers only the output rows of {producer_name}; shrinking them alone would change "
            f"{producer_name}'s output width. Pass consumers=[the layers reading its output] (and act=), or call "
            f"compact({producer_name}) to shrink the output on purpose"
        )
    act_fn = _resolve_act(act, needed=True)
    label = {id(m): (name_of.get(id(m)) or "root") for m in [producer_module, gate_module, *consumer_modules] if m is not None}
    producer_layer = _layer(producer_module, "spec (producer)")
    gate_layer = None if gate_module is None else _layer(gate_module, "gate")
    consumer_layers = [_layer(m, f"consumers[{i}]") for i, m in enumerate(consumer_modules)]
    plan = _plan(producer_layer, gate_layer, consumer_layers, act_fn, fold_bias, strict, label)
    return plan.record if dry_run else plan.apply()


# ------------------------------------------------------------------ the public entry point
def compact(
    target: Union[nn.Module, Spec],
    consumers: Sequence[ModuleRef] = (),
    *,
    gate: Optional[ModuleRef] = None,
    act: Union[str, Callable[[Tensor], Tensor], None] = None,
    root: Optional[nn.Module] = None,
    fold_bias: bool = True,
    strict: bool = False,
    dry_run: bool = False,
) -> Union[ChannelCompaction, "CompactReport"]:
    """Remove the channels a whole-channel pruning made dead; the layers become smaller dense Linears.

    Three forms:

    * ``compact(producer, consumers, act=..., gate=None)`` — layers. ``producer``
      is the Linear (or GPT-2 ``Conv1D``) whose output channels were pruned (for
      a gated MLP ``act(gate(x)) * up(x)``: the up projection, with ``gate=`` the
      gate projection); ``consumers`` the Linears reading those channels (their
      input columns). ``act`` is the elementwise activation between them
      (callable or a name of :data:`ACTIVATIONS`, ``'identity'`` for none); it is
      required with consumers. The module objects are modified in place
      (smaller ``weight``/``bias`` Parameters, ``in_features``/``out_features``
      updated): hooks and references stay valid, but an optimizer holding the old
      Parameters must be rebuilt. With no consumers the producer's output itself
      shrinks to the kept features (``result.kept``): only for outputs you index
      yourself.
    * ``compact(spec, root=module, act=..., gate=...)`` — an S3 object
      (ScopeSpec, ScopeCoupling, BlockSpec or BlockCoupling) whose blocks are
      whole rows or columns of layer weights (``patterns.channels``,
      ``patterns.columns``, ``col_blocks``, or a BlockCoupling of up rows, gate
      rows and down columns from ``SparsityBuilder.couple_blocks``). The layers
      owning the weights are found under ``root``; members with whole output rows
      are producers (two of them: ``gate=`` names the gate), members with whole
      input columns consumers (more can be passed in ``consumers``, as modules or
      names under ``root``). A BlockCoupling's members must be zero together
      (else :class:`~s3sparse.errors.CouplingError`). A spec of input columns
      only (no producer) replaces each layer under ``root`` by a
      :class:`GatherLinear` (see :func:`compact_inputs`).
    * ``compact(model)`` — any other module: :func:`compact_model` (``fold_bias``,
      ``strict`` and ``dry_run`` apply).

    Which channels are removed, and why that is exact, is in the module
    docstring: exactly-zero channels, and constant ones folded into the
    consumers' biases; the others are kept and listed in ``kept_dead``.

    Args:
        target: a layer, an S3 spec, or a model (see above).
        consumers: the layers reading the producer's output channels.
        gate: the gate projection of a gated MLP (``act`` is applied to it).
        act: the elementwise activation between producer and consumers.
        root: the module holding the spec's layers (S3 form only).
        fold_bias: fold constant channels into the consumers' biases.
        strict: raise instead of keeping a channel with a zero producer/gate row
            that cannot be removed exactly.
        dry_run: decide and report, change nothing.

    Returns:
        a :class:`ChannelCompaction` (layers, spec), or a :class:`CompactReport` (model).

    Raises:
        ArgumentTypeError: an argument of the wrong type (not a Linear/Conv1D, no ``root``).
        ShapeMismatchError: consumers whose ``in_features`` differ from the producer's ``out_features``, …
        SpecError: a pattern that is not whole-channel, a missing ``act``, ``strict`` violations.
        CouplingError: a BlockCoupling whose members are not zero together.
        Nothing is modified when an error is raised.
    """
    if isinstance(consumers, (nn.Module, str)):
        consumers = [consumers]
    consumers = list(consumers)
    if isinstance(target, (BlockSpec, BlockCoupling, ScopeSpec, ScopeCoupling)):
        return _compact_spec(target, consumers, gate, act, root, fold_bias, strict, dry_run)
    if isinstance(target, nn.Module) and not is_linear(target):
        if consumers or gate is not None or act is not None or root is not None:
            raise SpecError(
                f"`target` is a {type(target).__name__}, compacted as a whole model (compact_model): "
                "`consumers`, `gate`, `act` and `root` apply to a single producer layer; leave them out"
            )
        return compact_model(target, fold_bias=fold_bias, strict=strict, dry_run=dry_run)
    producer = _layer(target, "producer")
    gate_layer = None if gate is None else _layer(_find_module(gate, root, "gate"), "gate")
    consumer_layers = [_layer(_find_module(c, root, f"consumers[{i}]"), f"consumers[{i}]") for i, c in enumerate(consumers)]
    if gate_layer is not None and not consumer_layers:
        raise SpecError("`gate` needs `consumers`: the gated product act(gate(x))·up(x) only exists as their input")
    act_fn = _resolve_act(act, needed=bool(consumer_layers))
    if not consumer_layers and act_fn is not None:
        raise SpecError("`act` applies between producer and consumers; with no consumers leave it out")
    names = {} if root is None else {id(m): n for n, m in root.named_modules()}
    plan = _plan(producer, gate_layer, consumer_layers, act_fn, fold_bias, strict, names)
    return plan.record if dry_run else plan.apply()


# ------------------------------------------------------------------ whole models
@dataclass(frozen=True)
class _MLPKind:
    """Where a family keeps its MLP: attribute paths from the matched module, and the config key of its width."""

    family: str
    producer: str
    gate: Optional[str]
    consumer: str
    act: str
    config_key: str

    def parts(self, module: nn.Module) -> Optional[Tuple[nn.Module, Optional[nn.Module], nn.Module, Callable]]:
        def get(path: str) -> Any:
            obj: Any = module
            for attr in path.split("."):
                obj = getattr(obj, attr, None)
                if obj is None:
                    return None
            return obj

        producer, consumer, act = get(self.producer), get(self.consumer), get(self.act)
        gate = get(self.gate) if self.gate else None
        if not (is_linear(producer) and is_linear(consumer) and callable(act)):
            return None
        if self.gate and not is_linear(gate):
            return None
        return producer, gate, consumer, act


#: The MLP layouts :func:`compact_model` recognises, tried in order on every module.
MLP_KINDS: Tuple[_MLPKind, ...] = (
    # LLaMA, Qwen2/3, Mistral, Gemma, …: down(act(gate(x)) * up(x))
    _MLPKind("gated (LLaMA-style)", "up_proj", "gate_proj", "down_proj", "act_fn", "intermediate_size"),
    # GPT-2: c_proj(act(c_fc(x))), Conv1D layers
    _MLPKind("GPT-2", "c_fc", None, "c_proj", "act", "n_inner"),
    # BERT / MiniLM: output.dense(act(intermediate.dense(x))), matched on the BertLayer
    _MLPKind("BERT", "intermediate.dense", None, "output.dense", "intermediate.intermediate_act_fn", "intermediate_size"),
)


@dataclass
class CompactReport:
    """What :func:`compact_model` did, one :class:`ChannelCompaction` per MLP.

    Attributes:
        layers: per MLP, in model order (``name``, ``family``, channels, parameters).
        config_key: the config attribute of the MLP width (``intermediate_size``, ``n_inner``).
        config_updated: whether ``model.config.<config_key>`` was set to the new width.
        new_size: the common new width, or ``None`` when the MLPs differ.
        note: one line on the config and how to reload.
        applied: False for ``dry_run``.
    """

    layers: List[ChannelCompaction]
    config_key: Optional[str]
    config_updated: bool
    new_size: Optional[int]
    note: str
    applied: bool

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.layers)

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after

    def table(self) -> str:
        """A text table: per MLP, channels before → after, removed (zero / folded), kept dead, parameters."""
        head = ("MLP", "channels", "zero", "folded", "dead kept", "params before", "params after", "saved")
        rows = [
            (r.name, f"{r.channels_before} → {r.channels_after}", str(len(r.removed_zero)), str(len(r.removed_folded)),
             str(len(r.kept_dead)), f"{r.params_before:,}", f"{r.params_after:,}", f"{r.params_saved:,}")
            for r in self.layers
        ]
        rows.append(("total", "", "", "", "", f"{self.params_before:,}", f"{self.params_after:,}", f"{self.params_saved:,}"))
        widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + [self.note])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "layers": [r.to_dict() for r in self.layers],
            "config_key": self.config_key,
            "config_updated": self.config_updated,
            "new_size": self.new_size,
            "note": self.note,
            "applied": self.applied,
            "params_before": self.params_before,
            "params_after": self.params_after,
        }

    def __str__(self) -> str:
        return self.table()


def compact_model(
    model: nn.Module, *, fold_bias: bool = True, strict: bool = False, dry_run: bool = False
) -> CompactReport:
    """Compact the MLP of every block of a Hugging Face model (see :data:`MLP_KINDS`).

    Recognised: gated MLPs with ``gate_proj``/``up_proj``/``down_proj`` and
    ``act_fn`` (LLaMA, Qwen, Mistral…), GPT-2's ``c_fc``/``c_proj`` (``Conv1D``,
    transposed weights, handled) with ``act``, BERT/MiniLM's
    ``intermediate.dense``/``output.dense`` with ``intermediate_act_fn``. In each,
    the channels that are exactly dead (see the module docstring) are removed
    from producer(s) and consumer; the hidden size (residual stream) never
    changes. Other modules (attention, fused ``gate_up_proj`` MLPs, MoE
    experts) are left alone.

    Every MLP is planned and checked first; only then are the layers swapped,
    one MLP at a time (each swap is all-or-nothing and exact on its own), and
    the config last. ``config.<intermediate_size|n_inner>`` (and an MLP's own
    ``intermediate_size`` attribute) is updated only when all MLPs end with the
    same width; otherwise the report's ``note`` says so: save with
    :func:`save_compacted` and reload with :func:`load_compacted`.

    Args:
        model: the model (compacted in place).
        fold_bias: fold constant channels into the consumers' biases (BERT, GPT-2).
        strict: raise when a pruned channel cannot be removed exactly.
        dry_run: report what would be removed, change nothing.

    Returns:
        a :class:`CompactReport`.

    Raises:
        SpecError: no recognised MLP in ``model``; ``strict`` violations (nothing modified).
    """
    if not isinstance(model, nn.Module):
        raise ArgumentTypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
    found: List[Tuple[str, _MLPKind, nn.Module, Tuple]] = []
    for name, module in model.named_modules():
        for kind in MLP_KINDS:
            parts = kind.parts(module)
            if parts is not None:
                found.append((name, kind, module, parts))
                break
    if not found:
        known = "; ".join(f"{k.family}: {k.producer}{'/' + k.gate if k.gate else ''} → {k.consumer}" for k in MLP_KINDS)
        raise SpecError(
            f"`model`: found no MLP that compact_model knows in {type(model).__name__} ({known}); "
            "compact its layers with compact(producer, [consumer], act=...)"
        )
    plans: List[Tuple[nn.Module, _MLPKind, _Plan]] = []
    for name, kind, module, (producer, gate, consumer, act) in found:
        prefix = f"{name}." if name else ""
        names = {id(producer): prefix + kind.producer, id(consumer): prefix + kind.consumer}
        if gate is not None:
            names[id(gate)] = prefix + kind.gate
        plan = _plan(
            _layer(producer, names[id(producer)]),
            None if gate is None else _layer(gate, names[id(gate)]),
            [_layer(consumer, names[id(consumer)])],
            act, fold_bias, strict, names,
        )
        plan.record.name, plan.record.family = name, kind.family
        plans.append((module, kind, plan))

    keys = {kind.config_key for _, kind, _ in plans}
    sizes = {plan.record.channels_after for _, _, plan in plans}
    before = {plan.record.channels_before for _, _, plan in plans}
    config = getattr(model, "config", None)
    key = next(iter(keys)) if len(keys) == 1 else None
    new_size = next(iter(sizes)) if len(sizes) == 1 else None
    changed = any(p.record.channels_after != p.record.channels_before for _, _, p in plans)
    update = key is not None and new_size is not None and config is not None and changed and hasattr(config, key)
    if not changed:
        note = "nothing to remove: no MLP channel is dead"
    elif update:
        note = f"config.{key} set to {new_size}: save_pretrained / from_pretrained work as usual"
    elif config is None:
        note = "the model has no config; nothing else to update"
    else:
        per_layer = ", ".join(str(p.record.channels_after) for _, _, p in plans)
        old = next(iter(before)) if len(before) == 1 else sorted(before)
        note = (
            f"MLP widths differ per layer ({per_layer}); config.{key or '/'.join(sorted(keys))} left at {old}. "
            "from_pretrained would refuse these shapes: save with save_compacted() and reload with load_compacted()"
        )
    if dry_run:
        return CompactReport([p.record for _, _, p in plans], key, False, new_size, note, applied=False)
    for module, _, plan in plans:
        plan.apply()
        if isinstance(getattr(module, "intermediate_size", None), int):
            module.intermediate_size = plan.record.channels_after  # LlamaMLP keeps its width as an attribute
    if update:
        setattr(config, key, new_size)
    return CompactReport([p.record for _, _, p in plans], key, bool(update), new_size, note, applied=True)


# ------------------------------------------------------------------ saving and reloading per-layer widths
def _linear_shapes(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    shapes = {}
    for name, module in model.named_modules():
        if is_linear(module):
            layer = LinearLayer(name, module)
            shapes[name] = {
                "type": "Conv1D" if layer.transposed else "Linear",
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "bias": layer.bias is not None,
            }
    return shapes


def save_compacted(model: nn.Module, path: str, *, overwrite: bool = False, **save_kwargs: Any) -> str:
    """``model.save_pretrained(path)`` plus ``s3sparse_compact.json``, the shape of every Linear.

    Written into a temporary directory next to ``path`` and renamed at the end:
    a failed save leaves no ``path``. With per-layer MLP widths (the config could
    not record them) reload with :func:`load_compacted`.

    Args:
        model: a Hugging Face model (has ``save_pretrained``).
        path: the directory to create.
        overwrite: replace an existing ``path``.
        save_kwargs: passed to ``save_pretrained``.

    Returns:
        ``path``.
    """
    if not hasattr(model, "save_pretrained"):
        raise ArgumentTypeError(f"`model` must be a Hugging Face model with save_pretrained, got {type(model).__name__}")
    path = os.path.abspath(path)
    if os.path.lexists(path) and not overwrite:
        raise SpecError(f"`path`: {path!r} already exists; pass overwrite=True to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".s3sparse-compact-", dir=parent)
    try:
        model.save_pretrained(tmp, **save_kwargs)
        sidecar = {"format": _SIDECAR_FORMAT, "class": type(model).__name__, "linears": _linear_shapes(model)}
        with open(os.path.join(tmp, SIDECAR_NAME), "w", encoding="utf-8") as fh:
            json.dump(sidecar, fh, indent=1)
        if os.path.lexists(path):
            aside = tempfile.mkdtemp(prefix=".s3sparse-old-", dir=parent)
            os.rename(path, os.path.join(aside, "old"))
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(os.path.join(aside, "old"), path)
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _checkpoint_tensors(path: str, keys: Sequence[str]) -> Dict[str, Tensor]:
    from safetensors import safe_open

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
    else:
        weight_map = {k: "model.safetensors" for k in keys}
    out: Dict[str, Tensor] = {}
    by_file: Dict[str, List[str]] = {}
    for k in keys:
        if k not in weight_map:
            raise SpecError(f"`path`: the checkpoint in {path!r} has no tensor {k!r} recorded in {SIDECAR_NAME}")
        by_file.setdefault(weight_map[k], []).append(k)
    for file, file_keys in by_file.items():
        with safe_open(os.path.join(path, file), framework="pt", device="cpu") as fh:
            present = set(fh.keys())
            for k in file_keys:
                if k not in present:
                    raise SpecError(f"`path`: {file} in {path!r} has no tensor {k!r} recorded in {SIDECAR_NAME}")
                out[k] = fh.get_tensor(k)
    return out


def load_compacted(path: str, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_compacted`, per-layer MLP widths included.

    Loads with ``model_class.from_pretrained(path, ignore_mismatched_sizes=True,
    **kwargs)`` (so dtype, device and tied weights are handled as usual), then
    rebuilds every Linear whose shape in ``s3sparse_compact.json`` differs from
    the model built from the config, with its tensors read from the checkpoint.
    Without the sidecar it is plain ``from_pretrained``.

    Args:
        path: the directory.
        model_class: a transformers model class (default: the class recorded at save).
        kwargs: passed to ``from_pretrained`` (e.g. ``dtype``).
    """
    import transformers

    sidecar_path = os.path.join(path, SIDECAR_NAME)
    sidecar = None
    if os.path.isfile(sidecar_path):
        with open(sidecar_path, encoding="utf-8") as fh:
            sidecar = json.load(fh)
        if sidecar.get("format") != _SIDECAR_FORMAT:
            raise SpecError(f"`path`: {sidecar_path} has format {sidecar.get('format')!r}, expected {_SIDECAR_FORMAT!r}")
    if model_class is None:
        name = sidecar["class"] if sidecar else None
        if name is None:
            raise SpecError(f"`model_class`: {path!r} has no {SIDECAR_NAME}; pass the transformers class to load it with")
        model_class = getattr(transformers, name, None)
        if model_class is None:
            raise UnknownNameError(f"`model_class`: transformers has no class {name!r} (recorded in {SIDECAR_NAME}); pass it")
    if sidecar is None:
        return model_class.from_pretrained(path, **kwargs)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the size mismatches are expected: they are fixed below
    try:
        model = model_class.from_pretrained(path, ignore_mismatched_sizes=True, **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)
    fixes = []
    for name, shape in sidecar["linears"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SpecError(f"`model_class`: {model_class.__name__} has no module {name!r} recorded in {SIDECAR_NAME}") from None
        layer = _layer(module, name)
        if (layer.out_features, layer.in_features) != (shape["out_features"], shape["in_features"]):
            fixes.append((name, layer, shape))
    keys = [f"{n}.{p}" for n, _, s in fixes for p in (("weight", "bias") if s["bias"] else ("weight",))]
    tensors = _checkpoint_tensors(path, keys)
    new = []
    for name, layer, shape in fixes:
        ref = layer.module.weight
        stored = tensors[f"{name}.weight"].to(device=ref.device, dtype=ref.dtype)
        weight = stored.t() if layer.transposed else stored  # the checkpoint holds the module's own layout
        if shape["bias"] != (layer.bias is not None):
            raise SpecError(f"`model_class`: {name} {'has no' if shape['bias'] else 'has a'} bias, unlike the one recorded in {SIDECAR_NAME}")
        bias = tensors[f"{name}.bias"].to(device=ref.device, dtype=layer.bias.dtype) if shape["bias"] else None
        if (int(weight.shape[0]), int(weight.shape[1])) != (shape["out_features"], shape["in_features"]):
            raise SpecError(f"`path`: {name}.weight in the checkpoint has shape {tuple(stored.shape)}, not the recorded one {shape}")
        new.append((layer, weight, bias))
    for layer, weight, bias in new:
        layer.install(weight, bias)
    for module in model.modules():  # LlamaMLP-style width attributes follow the layers
        kind = next((k for k in MLP_KINDS if k.gate and k.parts(module) is not None), None)
        if kind is not None and isinstance(getattr(module, "intermediate_size", None), int):
            module.intermediate_size = LinearLayer("", getattr(module, kind.producer)).out_features
    return model
