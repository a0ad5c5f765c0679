"""The argument checks every entry point of s3sparse shares.

One function per kind of argument, so an argument is accepted or refused alike
by every pruner, the functional wrappers and the specification: ``nnz=2.0`` is
refused by all of them with the same message, an integer weight by all of them,
and so on. Every check raises an :class:`~s3sparse.errors.S3Error` that is also
the built-in kind (``ValueError`` / ``TypeError``), naming the argument, what
was expected, what was got and what to do.

The checks only read their arguments (a few small reductions over a Hessian,
one ``isfinite`` reduction over a weight) and run before any pruner writes
anything, so a refused call leaves the weight exactly as it was.

These are the ground-level checks of numbers, names and tensors: this module
imports nothing of the specification (so the View, BlockSpec and ScopeSpec
modules can use it). The check that an argument is a pattern over weights a
pruner may prune, :func:`~s3sparse.scope.check_scope`, lives beside ScopeSpec.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .errors import ArgumentError, ArgumentTypeError, NonFiniteError, ShapeMismatchError, SpecError

__all__ = [
    "check_int",
    "check_nnz",
    "check_choice",
    "check_damp",
    "check_callable",
    "check_dtype",
    "check_weight",
    "check_finite",
    "check_hessian",
    "SYMMETRY_RTOL",
]

#: Largest ``max|H − Hᵀ| / max|H|`` a Hessian may have: far above the round-off of
#: any way of forming ``XᵀX/N`` (fp32 GEMMs of long calibration sets included),
#: far below the asymmetry of a matrix that is not a Hessian at all.
SYMMETRY_RTOL = 1e-3

_META_FIX = (
    "it has a shape but no data (a model built on the meta device, e.g. with init_empty_weights or "
    "device='meta'); load the real weights first (e.g. `model.to_empty(device='cpu')` and then "
    "`model.load_state_dict(...)`, or from_pretrained without a meta device_map)"
)


def _arg(name: str) -> str:
    """``name`` in backticks unless it is already a phrase such as "the weight of `scope`"."""
    return name if "`" in name else f"`{name}`"


# ---------------------------------------------------------------- numbers
def check_int(
    value: Any, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None, what: str = ""
) -> int:
    """``value`` as an int, refusing bools, floats (even ``2.0``) and out-of-range values.

    Anything :func:`operator.index` takes is an int: Python and NumPy integers,
    0-d integer tensors. ``what`` says what the number counts, for the message.
    """
    label = _arg(name)
    desc = f" ({what})" if what else ""
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{label} must be an int{desc}, got the bool {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        hint = ""
        if isinstance(value, float) and value.is_integer():
            hint = f"; pass int({name}) = {int(value)}"
        elif isinstance(value, float):
            hint = "; round it to a whole number yourself (e.g. int() or round())"
        raise ArgumentTypeError(f"{label} must be an int{desc}, got {type(value).__name__} {value!r}{hint}") from None
    if minimum is not None and maximum is not None and not minimum <= out <= maximum:
        raise ArgumentError(f"{label} must be in [{minimum}, {maximum}]{desc}, got {out}")
    if minimum is not None and out < minimum:
        raise ArgumentError(f"{label} must be >= {minimum}{desc}, got {out}")
    if maximum is not None and out > maximum:
        raise ArgumentError(f"{label} must be <= {maximum}{desc}, got {out}")
    return out


def check_nnz(nnz: Any, blocks_per_scope: int, name: str = "nnz") -> int:
    """The number of blocks kept per scope, an int in ``[0, blocks_per_scope]``.

    Floats are refused (``nnz=2.0`` too): convert a sparsity with
    ``scope.sparsity_to_nnz(sparsity)``.
    """
    label = _arg(name)
    if isinstance(nnz, float):
        hint = f"pass int({name}) = {int(nnz)}" if nnz.is_integer() else "round it yourself"
        raise ArgumentTypeError(
            f"{label} must be an int (blocks kept per scope), got the float {nnz!r}; {hint}, "
            "or turn a sparsity into a count with scope.sparsity_to_nnz(sparsity)"
        )
    n = int(blocks_per_scope)
    value = check_int(nnz, name, what="blocks kept per scope")
    if not 0 <= value <= n:
        raise SpecError(f"{label} must be in [0, {n}] (the blocks per scope), got {value}")
    return value


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices`` (strings)."""
    if not isinstance(value, str) or value not in choices:
        raise ArgumentError(f"{_arg(name)} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_damp(damp: Any, name: str = "damp") -> float:
    """A damping: a finite real number ``>= 0`` (relative to mean(diag H) when < 1)."""
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real):
        raise ArgumentTypeError(f"{_arg(name)} must be a real number >= 0, got {type(damp).__name__} {damp!r}")
    value = float(damp)
    if not value >= 0 or value == float("inf"):
        raise ArgumentError(
            f"{_arg(name)} must be a finite number >= 0 (relative to mean(diag H) when < 1), got {damp!r}"
        )
    return value


def check_callable(fn: Any, name: str) -> None:
    """``fn`` is None or callable."""
    if fn is not None and not callable(fn):
        raise ArgumentTypeError(f"{_arg(name)} must be a callable (e.g. print) or None, got {type(fn).__name__} {fn!r}")


def check_dtype(dtype: Any, name: str, allowed: Sequence[torch.dtype]) -> torch.dtype:
    """``dtype`` if it is one of ``allowed``."""
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ArgumentError(f"{_arg(name)} must be one of {names}, got {dtype!r}")
    return dtype


# ---------------------------------------------------------------- tensors
def check_weight(weight: Any, name: str = "weight", *, ndim: Optional[int] = None) -> None:
    """A weight a pruner may prune: a tensor with data, floating point, not empty.

    Args:
        weight: the tensor.
        name: how to call it in messages: an argument name (``"W0"``) or a
            phrase (``"the weight behind `scope`"``).
        ndim: the number of dims it must have (2 for a linear layer's weight).
    """
    label = _arg(name)
    if not isinstance(weight, Tensor):
        raise ArgumentTypeError(f"{label} must be a torch.Tensor or nn.Parameter, got {type(weight).__name__}")
    if weight.device.type == "meta":
        raise ArgumentError(f"{label} is on the meta device: {_META_FIX}")
    if not weight.is_floating_point():
        raise ArgumentTypeError(
            f"{label} has dtype {weight.dtype}; pruning needs a floating-point weight (float32, float16, "
            "bfloat16 or float64) because it zeroes and compensates values. Convert it before building the "
            "pattern, e.g. `layer.weight.data = layer.weight.data.float()` or `W = W.float()`"
        )
    if ndim is not None and weight.dim() != ndim:
        shape = "(out_features, in_features), an nn.Linear.weight" if ndim == 2 else f"{ndim}-D"
        raise ArgumentError(f"{label} must be {ndim}-D {shape}; got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ArgumentError(
            f"{label} is empty (shape {tuple(weight.shape)}): there is nothing to prune; "
            "skip this layer, or check how the weight was built"
        )


#: What to do about a weight holding NaN/Inf (the end of :func:`check_finite`'s message).
WEIGHT_FIX = (
    "pruning would zero or spread them, so it was refused and the weight left as it was. Find where they came "
    "from (a diverged training run, a float16 overflow, a damaged checkpoint) and load finite weights, or "
    "replace the bad entries yourself if you know what they should be (e.g. `W.nan_to_num_(0.0)`)"
)

#: What to do about calibration inputs holding NaN/Inf.
INPUT_FIX = (
    "a Hessian XᵀX/N of them would be NaN/Inf, so they were refused (nothing was accumulated). Calibration "
    "inputs must be finite: if a float16 forward pass overflowed, run the model in float32 or bfloat16; "
    "otherwise drop the bad samples"
)


def _first_non_finite(tensor: Tensor) -> tuple[tuple[int, ...], float, int]:
    """``(index, value, count)`` of the first non-finite entry (row-major) and how many there are."""
    bad = ~torch.isfinite(tensor.detach())
    flat = bad.reshape(-1)
    count = int(flat.sum())
    position = int(flat.to(torch.uint8).argmax())  # the first True (argmax returns the first maximum)
    index = []
    for size in reversed(tuple(tensor.shape)):
        position, i = divmod(position, int(size))
        index.append(i)
    index_t = tuple(reversed(index))
    return index_t, float(tensor.detach()[index_t]), count


def check_finite(tensor: Tensor, name: str, *, fix: str = WEIGHT_FIX, detail: str = "") -> None:
    """``tensor`` holds no NaN or Inf.

    One ``torch.isfinite(tensor).all()`` reduction; only when it fails is the
    first bad entry located, for the message.

    Args:
        tensor: a floating-point tensor with data (check it with
            :func:`check_weight` first).
        name: how to call it: an argument name (``"W0"``) or a phrase
            (``"the weight behind `scope`"``, ``"the weight of layer model.layers.0.q_proj"``).
        fix: what the user should do, appended to the message (default: about a weight;
            :data:`INPUT_FIX` for calibration inputs).
        detail: more about the tensor, shown after its shape and dtype (e.g. its
            block's name).

    Raises:
        NonFiniteError: an :class:`~s3sparse.errors.ArgumentError` (a ``ValueError``)
            naming the tensor (with its shape and dtype), the first bad index as a
            tuple and its value, and how many entries are bad.
    """
    if not tensor.is_floating_point() and not tensor.is_complex():
        return  # integer and bool tensors cannot hold NaN or Inf
    if tensor.numel() == 0 or bool(torch.isfinite(tensor).all()):
        return
    index, value, count = _first_non_finite(tensor)
    label = _arg(name)
    kind = "NaN" if math.isnan(value) else ("Inf" if value > 0 else "-Inf")
    about = f"shape {tuple(tensor.shape)}, {str(tensor.dtype).replace('torch.', '')}" + (f", {detail}" if detail else "")
    raise NonFiniteError(
        f"non-finite values in {label} ({about}): {kind} at index {index} ({count} of {tensor.numel()} "
        f"entries are NaN or Inf); {fix}",
        name=name,
        index=index,
        value=value,
    )


def _max_asymmetry(H: Tensor, rows_per_step: int = 1024) -> float:
    """``max |H − Hᵀ|`` without forming ``Hᵀ`` whole (bounded temporary memory)."""
    worst = torch.zeros((), dtype=H.dtype, device=H.device)
    for i in range(0, H.shape[0], rows_per_step):
        band = H[i : i + rows_per_step]
        worst = torch.maximum(worst, (band - H[:, i : i + rows_per_step].T).abs().amax())
    return float(worst)


def check_hessian(
    hessian: Any,
    num_cols: int,
    like: Optional[Tensor] = None,
    name: str = "hessian",
    *,
    allow_zero: bool = False,
) -> None:
    """A layer Hessian ``XᵀX/N`` for a weight with ``num_cols`` input columns.

    Refused: not a tensor, not floating point, not ``(K, K)``, on the meta
    device or on another device than ``like``, NaN/Inf entries, all zeros
    (unless ``allow_zero``), not symmetric beyond round-off
    (``max|H − Hᵀ| > SYMMETRY_RTOL · max|H|``).
    """
    label = _arg(name)
    K = int(num_cols)
    if not isinstance(hessian, Tensor):
        raise ArgumentTypeError(
            f"{label} must be a torch.Tensor (K, K), got {type(hessian).__name__}; "
            "compute it with s3sparse.compute_hessian(X)"
        )
    if not hessian.is_floating_point():
        raise ArgumentTypeError(
            f"{label} must be a float tensor, got {hessian.dtype}; convert it with `{name}.float()`"
        )
    if tuple(hessian.shape) != (K, K):
        err = ShapeMismatchError((K, K), tuple(hessian.shape), name)
        err.args = (
            f"{label} must be (K, K) = ({K}, {K}) for a weight with K={K} input columns, got "
            f"{tuple(hessian.shape)}; compute it from the layer's inputs X of shape (N, {K}) with compute_hessian(X)",
        )
        raise err
    if hessian.device.type == "meta":
        raise ArgumentError(f"{label} is on the meta device: {_META_FIX}")
    if like is not None and hessian.device != like.device:
        raise ArgumentError(
            f"{label} is on {hessian.device} but the weight is on {like.device}; "
            f"move one of them, e.g. `{name}.to({str(like.device)!r})`"
        )
    if K == 0:
        return
    if not bool(torch.isfinite(hessian).all()):
        raise ArgumentError(
            f"{label} holds NaN or Inf entries; recompute it (in float32 or float64) from finite calibration inputs"
        )
    scale = float(hessian.abs().amax())
    if scale == 0.0:
        if allow_zero:
            return
        raise ArgumentError(
            f"{label} is all zeros: the calibration inputs were all zero, or no samples were added; "
            "compute it from real calibration inputs with compute_hessian(X), or prune without "
            "data with prune_magnitude(scope, nnz)"
        )
    asym = _max_asymmetry(hessian)
    if asym > SYMMETRY_RTOL * scale:
        raise ArgumentError(
            f"{label} is not symmetric: max |H - H.T| = {asym:.3g} against max |H| = {scale:.3g}; a layer "
            "Hessian XᵀX/N is symmetric. Compute it with compute_hessian(X) (X of shape (N, K)), or, if the "
            f"asymmetry is round-off of your own computation, symmetrise it: `{name} = ({name} + {name}.T) / 2`"
        )
