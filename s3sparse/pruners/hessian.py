"""Layer Hessians from calibration inputs, their damped inverses, and output error.

For a linear layer ``y = x Wᵀ`` and calibration inputs ``X`` (N×K), the layer-wise
reconstruction loss ``‖X ΔWᵀ‖²`` has Hessian (per row of W) ``H = XᵀX / N``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import Tensor

from ..checks import INPUT_FIX, _arg, check_damp, check_dtype, check_finite, check_hessian, check_int
from ..dtypes import opmath_dtype
from ..errors import ArgumentError, ArgumentTypeError, NumericalError

__all__ = [
    "compute_hessian",
    "HessianAccumulator",
    "output_error",
    "check_hessian",
    "damping_value",
    "damped_inverse",
]

DeviceLike = Union[str, torch.device, None]


def compute_hessian(
    X: Tensor, device: DeviceLike = None, batch_size: Optional[int] = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``H = XᵀX / N`` from calibration inputs.

    Args:
        X: inputs of shape (N, K) or (..., K) (leading dims are flattened into N).
        device: where to accumulate (default: the device of X).
        batch_size: rows per accumulation step, to bound memory (default: all).
        dtype: accumulation and result dtype (float32 or float64).

    Returns:
        (K, K) symmetric positive semi-definite matrix.

    Raises:
        NonFiniteError: ``X`` holds NaN or Inf (the message gives the first bad index).
    """
    if not isinstance(X, Tensor):
        raise ArgumentTypeError(f"`X` must be a tensor of calibration inputs (N, K), got {type(X).__name__}")
    if X.dim() < 2:
        raise ArgumentError(f"`X` must be (N, K) or (..., K) calibration inputs, got shape {tuple(X.shape)}")
    acc = HessianAccumulator(X.shape[-1], device=device if device is not None else X.device, dtype=dtype)
    acc.add(X, batch_size=batch_size, name="X")
    return acc.hessian


# The shortest calibration window (tokens) whose Gram matrix goes through the float32-output GEMM
# (_window_grams): a window's float64 add costs about 1500 / tokens of its GEMM's time, so shorter
# windows are cheaper as one float64 GEMM.
_GRAM_MIN_TOKENS = 512
# Whether torch.mm(..., out_dtype=torch.float32) runs on this build, by (dtype, device type).
_MM_FP32_OUT: dict = {}


def _mm_fp32_out_runs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch has the float32-output GEMM for inputs of ``dtype`` on ``device``'s type (tried once)."""
    key = (dtype, device.type)
    if key not in _MM_FP32_OUT:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        try:
            _MM_FP32_OUT[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_FP32_OUT[key] = False
    return _MM_FP32_OUT[key]


def _window_grams(total: Tensor, x: Tensor) -> bool:
    """``total += Σ xᵀx`` one calibration window (``x[..., t, :]``, all leading dims but the tokens') at
    a time, each window's Gram matrix one tensor-core GEMM with float32 output, added to the float64
    ``total``; returns False, having added nothing, where that path does not apply.

    It applies to float16 / bfloat16 inputs of windows of at least ``_GRAM_MIN_TOKENS`` tokens, into a
    float64 sum on CUDA, where ``torch.mm(..., out_dtype=torch.float32)`` runs. The products of two
    such values are exact in float32; a window's sum carries float32 round-off (relative about
    √tokens · 2⁻²⁴, 3e-6 at 2048 tokens) and is the same however the windows are batched into calls
    or split over ranks, and the windows are summed in float64: so H stays independent of the
    batching and of the ranks, as with a float64 GEMM, at the tensor cores' rate (the float64 Hessian
    sums were half of SparseGPT's whole-model time on an H200).
    """
    if not (total.dtype == torch.float64 and total.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and x.dim() >= 3 and x.shape[-2] >= _GRAM_MIN_TOKENS and _mm_fp32_out_runs(x.dtype, total.device)):
        return False
    for window in x.reshape(-1, x.shape[-2], x.shape[-1]):
        w = window.to(device=total.device)
        total.add_(torch.mm(w.T, w, out_dtype=torch.float32))
    return True


class HessianAccumulator:
    """Streaming ``H = Σ xᵀx / N`` for calibration loops.

    Example::

        acc = HessianAccumulator(layer.in_features, device="cuda")
        handle = acc.attach(layer)          # or call acc.add(x) yourself
        for batch in calibration_batches:
            model(batch)
        handle.remove()
        H = acc.hessian

    Args:
        num_cols: K, the layer's number of input features.
        device: where H lives.
        dtype: float32 (default) or float64 accumulation. float64 on CUDA with
            float16 / bfloat16 inputs of windows of 512 tokens or more: each
            window's ``xᵀx`` on tensor cores in float32 (exact products), the
            windows summed in float64 (see ``_window_grams``): H is still the same
            however the windows are batched or split over ranks.
    """

    def __init__(self, num_cols: int, device: DeviceLike = None, dtype: torch.dtype = torch.float32):
        check_dtype(dtype, "dtype", (torch.float32, torch.float64))
        self.num_cols = check_int(num_cols, "num_cols", minimum=1, what="the layer's input features K")
        self.dtype = dtype
        self._sum = torch.zeros(num_cols, num_cols, dtype=dtype, device=device)
        self.num_samples = 0

    @torch.no_grad()
    def add(self, x: Tensor, batch_size: Optional[int] = None, name: str = "x") -> None:
        """Add inputs ``x`` of shape (..., K) (leading dims are samples).

        ``name`` is how messages call ``x``. Inputs holding NaN or Inf are refused
        whole, with a :class:`~s3sparse.errors.NonFiniteError` naming the first bad
        index, before anything is accumulated (the accumulator stays as it was).
        """
        if not isinstance(x, Tensor):
            raise ArgumentTypeError(f"{_arg(name)} must be a tensor of inputs (..., K), got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.num_cols:
            raise ArgumentError(
                f"{_arg(name)} must have K={self.num_cols} features in its last dim, got shape {tuple(x.shape)}"
            )
        check_finite(x, name, fix=INPUT_FIX)
        rows = x.reshape(-1, self.num_cols)
        if not _window_grams(self._sum, x):
            step = rows.shape[0] if not batch_size else int(batch_size)
            for start in range(0, rows.shape[0], max(step, 1)):
                chunk = rows[start : start + step].to(device=self._sum.device, dtype=self.dtype)
                self._sum.addmm_(chunk.T, chunk)
        self.num_samples += rows.shape[0]

    @torch.no_grad()
    def all_reduce(self, process_group) -> None:
        """Sum the accumulator over the ranks of ``process_group``, in place (a collective: every rank calls it).

        Each rank adds its own share of the calibration inputs; afterwards every
        rank holds the sum of all shares (``Σ xᵀx`` in this accumulator's dtype,
        fp32 or fp64, and the total sample count), so ``hessian`` is the H of
        all the inputs, up to the round-off of summing the shares in another order.
        """
        from .sharding import check_process_group

        group = check_process_group(process_group)
        if group is None:
            raise ArgumentError("`process_group` must be a ProcessGroup to sum over, e.g. torch.distributed.group.WORLD")
        import torch.distributed as dist

        dist.all_reduce(self._sum, group=group)
        count = torch.tensor([self.num_samples], dtype=torch.int64, device=self._sum.device)
        dist.all_reduce(count, group=group)
        self.num_samples = int(count.item())

    def attach(self, module: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Accumulate the inputs of ``module`` on every forward; returns the hook handle."""

        where = f"the inputs of the attached `{type(module).__name__}`"

        def hook(_module, args):
            self.add(args[0], name=where)

        return module.register_forward_pre_hook(hook)

    @property
    def hessian(self) -> Tensor:
        """The mean ``XᵀX / N`` so far (a new tensor)."""
        if self.num_samples == 0:
            raise RuntimeError("HessianAccumulator has no samples yet: call add(x) first")
        return self._sum / self.num_samples


def damping_value(hessian: Tensor, damp: float) -> float:
    """Absolute damping: ``damp · mean(diag H)`` when ``damp < 1``, else ``damp`` itself."""
    damp = check_damp(damp)
    if damp >= 1.0:
        return float(damp)
    # In H's own dtype, over a contiguous copy of the diagonal: the value SparseGPT's
    # `percdamp * torch.mean(torch.diag(H))` gives, to the last bit.
    mean_diag = torch.diag(hessian).mean()
    if not float(mean_diag) > 0:  # an all-zero Hessian: any positive scale will do
        return float(damp)
    return float(damp * mean_diag)


def _with_dead_inputs_fixed(hessian: Tensor, dtype: torch.dtype) -> Tensor:
    """A copy of H in ``dtype`` whose zero diagonal entries (dead inputs) are 1.

    Dead inputs carry no information; unit curvature keeps the inverse finite
    (as SparseGPT does) without touching the other coordinates.
    """
    H = hessian.to(dtype=dtype, copy=True)
    diag = torch.diagonal(H)
    diag[diag == 0] = 1.0
    return H


def damped_inverse(
    hessian: Tensor,
    damp: float,
    dtype: torch.dtype = torch.float32,
    max_tries: int = 6,
    what: str = "H + damp*I",
    upper_factor: bool = False,
) -> tuple[Tensor, float]:
    """``(H + λI)⁻¹`` by Cholesky, raising λ tenfold until it is positive definite.

    ``λ = damp · mean(diag H)`` for ``damp < 1``, else ``damp``; dead inputs (zero
    diagonal) get unit curvature first. With ``upper_factor`` the result is the
    upper Cholesky factor ``U`` of the inverse (``UᵀU = (H + λI)⁻¹``), SparseGPT's
    form. Returns the matrix (``dtype``) and the λ actually used; warns when λ had
    to grow, raises :class:`~s3sparse.errors.NumericalError` when even the largest λ fails.
    """
    work_dtype = opmath_dtype(dtype)
    H0 = _with_dead_inputs_fixed(hessian, work_dtype)
    lam = damping_value(H0, damp)
    eye = torch.eye(H0.shape[0], dtype=work_dtype, device=H0.device)
    for attempt in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H0 + lam * eye)
        if int(info) == 0:
            result = torch.cholesky_inverse(L)
            if upper_factor:
                result, info = torch.linalg.cholesky_ex(result, upper=True)
            if int(info) == 0 and torch.isfinite(result).all():
                if attempt:
                    warnings.warn(
                        f"{what} was not positive definite; damping raised to {lam:.3g} "
                        f"({attempt} retries)",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return result.to(dtype), lam
        lam = max(lam * 10.0, damping_value(H0, 1e-6))
    raise NumericalError(
        f"{what} is not positive definite even with damping {lam:.3g}; the weight was left unchanged. "
        "Compute H in float64 (e.g. compute_hessian(X, dtype=torch.float64)), raise `damp`, or prune this "
        "layer with prune_obd / prune_magnitude"
    )


def output_error(W_pruned: Tensor, W_orig: Tensor, H: Tensor, N: Optional[int] = None) -> float:
    """Reconstruction error of a pruned layer on the calibration distribution.

    Relative (default): ``sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))``. With ``N`` (the number
    of calibration samples behind ``H = XᵀX/N``): the absolute ``‖X ΔWᵀ‖_F =
    sqrt(N · tr(ΔW H ΔWᵀ))``.
    """
    for arg, t in (("W_pruned", W_pruned), ("W_orig", W_orig)):
        if not isinstance(t, Tensor):
            raise ArgumentTypeError(f"`{arg}` must be a tensor, got {type(t).__name__}")
    if W_pruned.shape != W_orig.shape:
        raise ArgumentError(
            f"`W_pruned` {tuple(W_pruned.shape)} and `W_orig` {tuple(W_orig.shape)} must have the same shape"
        )
    check_hessian(H, W_orig.shape[-1], name="H", allow_zero=True)
    if N is not None:
        N = check_int(N, "N", minimum=1, what="calibration samples behind H")
    Hd = H.double().to(W_orig.device)
    W = W_orig.double()
    dW = W_pruned.double().to(W.device) - W
    num = float(((dW @ Hd) * dW).sum())
    if N is not None:
        return math.sqrt(max(num, 0.0) * N)
    den = float(((W @ Hd) * W).sum())
    if den <= 0:
        raise ArgumentError("tr(W H Wᵀ) is zero: the relative error is undefined; pass N for the absolute error")
    return math.sqrt(max(num, 0.0) / den)
