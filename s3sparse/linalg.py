"""Small numerical solvers used around pruning: LSQR, thresholds and proximal steps.

Everything here is plain torch (CPU or CUDA, any float dtype), batched over
leading dimensions, and free of the rest of s3sparse, so it can be tested and
reused on its own.

* :func:`lsqr_gkl` — LSQR (Paige & Saunders) by Golub–Kahan–Lanczos
  bidiagonalisation: ``min ‖A x − b‖² + damp² ‖x‖²`` for a dense ``A`` or a
  ``(matvec, rmatvec)`` pair, for many right-hand sides at once.
* :func:`hard_threshold`, :func:`soft_threshold` — element-wise or group
  (block-norm) thresholding.
* :func:`solve_proximal_adam` — the diagonally conditioned group-lasso proximal
  step ``argmin_w ½ Σ h_i (w_i − v_i)² + t ‖w‖₂`` per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .errors import ArgumentError, ArgumentTypeError

__all__ = [
    "LSQRResult",
    "LSQR_STOP_REASONS",
    "lsqr_gkl",
    "hard_threshold",
    "soft_threshold",
    "group_norms",
    "solve_proximal_adam",
]

MatVec = Callable[[Tensor], Tensor]
Operator = Union[Tensor, Tuple[MatVec, MatVec]]
Dims = Union[int, Sequence[int]]

# Why LSQR stopped (the ``istop`` codes of Paige & Saunders / scipy).
LSQR_STOP_REASONS = {
    0: "x = 0 is the exact solution (b = 0 or Aᵀb = 0)",
    1: "A x − b is small enough (atol/btol): x solves A x = b approximately",
    2: "Aᵀ(A x − b) is small enough (atol): x is an approximate least-squares solution",
    3: "the estimated condition number of A exceeded conlim",
    4: "like 1, to machine precision",
    5: "like 2, to machine precision",
    6: "like 3, cond(A) beyond machine precision",
    7: "max_iter reached",
}


@dataclass
class LSQRResult:
    """What :func:`lsqr_gkl` returns; every statistic has the batch shape of ``b``.

    Attributes:
        x: the solution, shape ``(*batch, n)``.
        istop: int64 stop reason per system (see ``LSQR_STOP_REASONS``):
            0 exact zero solution, 1/4 residual small, 2/5 normal-equation
            residual small, 3/6 ill-conditioned, 7 iteration limit.
        itn: int64 number of iterations each system ran.
        r1norm: ``‖b − A x‖``.
        r2norm: ``sqrt(‖b − A x‖² + damp² ‖x‖²)``.
        anorm: estimate of the Frobenius norm of ``[A; damp·I]``.
        acond: estimate of its condition number.
        arnorm: ``‖Aᵀ(b − A x) − damp² x‖``.
        xnorm: ``‖x‖``.
    """

    x: Tensor
    istop: Tensor
    itn: Tensor
    r1norm: Tensor
    r2norm: Tensor
    anorm: Tensor
    acond: Tensor
    arnorm: Tensor
    xnorm: Tensor

    @property
    def converged(self) -> Tensor:
        """Bool per system: stopped on a residual test (``istop`` in 0, 1, 2, 4, 5)."""
        return (self.istop <= 2) | (self.istop == 4) | (self.istop == 5)

    def __iter__(self):
        """Unpack as ``x, info`` (``info`` is this result)."""
        return iter((self.x, self))


def _operators(A: Operator) -> Tuple[MatVec, MatVec]:
    """``(matvec, rmatvec)`` acting on the last dim of batched vectors."""
    if isinstance(A, Tensor):
        if A.ndim < 2:
            raise ArgumentError(f"lsqr_gkl: `A` must be a matrix (…, m, n), got shape {tuple(A.shape)}")

        def matvec(x: Tensor) -> Tensor:
            return (A @ x.unsqueeze(-1)).squeeze(-1)

        def rmatvec(y: Tensor) -> Tensor:
            return (A.mT @ y.unsqueeze(-1)).squeeze(-1)

        return matvec, rmatvec
    if isinstance(A, (tuple, list)) and len(A) == 2 and all(callable(f) for f in A):
        return A[0], A[1]
    raise ArgumentTypeError(
        "lsqr_gkl: `A` must be a dense tensor (…, m, n) or a pair (matvec, rmatvec) of callables, "
        f"got {type(A).__name__}"
    )


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` where ``b != 0``, else 0."""
    nz = b != 0
    return torch.where(nz, a / torch.where(nz, b, torch.ones_like(b)), torch.zeros_like(a))


def _sym_ortho(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Givens rotation ``(c, s, r)`` with ``[c s; -s c] [a; b] = [r; 0]``, ``r ≥ 0``."""
    r = torch.hypot(a, b)
    zero = r == 0
    rs = torch.where(zero, torch.ones_like(r), r)
    c = torch.where(zero, torch.ones_like(a), a / rs)
    s = torch.where(zero, torch.zeros_like(b), b / rs)
    return c, s, r


def _vnorm(t: Tensor) -> Tensor:
    """Euclidean norm over the last dim, kept as a trailing dim of 1."""
    return torch.linalg.vector_norm(t, dim=-1, keepdim=True)


def _lsqr_setup(
    A: Operator, b: Tensor, damp: Union[float, Tensor]
) -> Tuple[MatVec, MatVec, Tensor, torch.dtype, Tensor]:
    """Check the arguments; ``(matvec, rmatvec, b, dtype, damp²)`` in the dtype solved in (fp32 or fp64)."""
    matvec, rmatvec = _operators(A)
    if not isinstance(b, Tensor) or b.ndim < 1:
        raise ArgumentError(f"lsqr_gkl: `b` must be a tensor (…, m), got {b!r}")
    if isinstance(A, Tensor) and A.shape[-2] != b.shape[-1]:
        raise ArgumentError(f"lsqr_gkl: `A` has {A.shape[-2]} rows but `b` has length {b.shape[-1]}")
    dtype = b.dtype if b.dtype in (torch.float32, torch.float64) else torch.float32
    if isinstance(A, Tensor):
        dtype = torch.promote_types(dtype, A.dtype) if A.dtype in (torch.float32, torch.float64) else dtype
        A_ = A.to(dtype)
        matvec, rmatvec = _operators(A_)
    b = b.to(dtype)
    damp_t = torch.as_tensor(damp, dtype=dtype, device=b.device)
    if (damp_t < 0).any():
        raise ArgumentError(f"lsqr_gkl: `damp` must be >= 0, got {damp}")
    if damp_t.ndim > 0:
        damp_t = damp_t.unsqueeze(-1)
    return matvec, rmatvec, b, dtype, damp_t * damp_t


@dataclass
class _LSQRState:
    """The LSQR recurrences of every system of the batch: vectors ``(*batch, n|m)``, scalars ``(*batch, 1)``."""

    x: Tensor
    u: Tensor
    v: Tensor
    w: Tensor
    alpha: Tensor
    beta: Tensor
    bnorm: Tensor
    dampsq: Tensor
    damp_b: Tensor
    rhobar: Tensor
    phibar: Tensor
    rnorm: Tensor
    r1norm: Tensor
    r2norm: Tensor
    anorm: Tensor
    acond: Tensor
    ddnorm: Tensor
    res2: Tensor
    xnorm: Tensor
    xxnorm: Tensor
    z: Tensor
    sn2: Tensor
    cs2: Tensor
    arnorm: Tensor
    istop: Tensor
    itn: Tensor
    active: Tensor


def _lsqr_start(
    matvec: MatVec, rmatvec: MatVec, b: Tensor, x0: Optional[Tensor], dampsq: Tensor, dtype: torch.dtype
) -> _LSQRState:
    """Initialise the bidiagonalisation, ``beta1 u1 = b − A x0``, ``alpha1 v1 = Aᵀ u1``, and every statistic."""
    u = b.clone()
    bnorm = _vnorm(b)
    if x0 is not None:
        x = x0.to(dtype).clone()
        u = u - matvec(x)
    else:
        x = None
    beta = _vnorm(u)
    u = _safe_div(u, beta)
    v = rmatvec(u).to(dtype)
    if x is None:
        x = torch.zeros_like(v)
    batch = torch.broadcast_shapes(beta.shape[:-1], v.shape[:-1], dampsq.shape[:-1] if dampsq.ndim else ())
    x = x.expand(*batch, v.shape[-1]).clone()
    alpha = _vnorm(v)
    v = _safe_div(v, alpha)
    w = v.clone()

    def bt(t: Tensor) -> Tensor:
        return t.expand(*batch, 1).clone()

    zeros = bt(torch.zeros((), dtype=dtype, device=b.device).reshape([1] * (len(batch) + 1)))
    alpha, beta, bnorm = bt(alpha), bt(beta), bt(bnorm)
    dampsq = bt(dampsq.reshape([1] * (len(batch) + 1)) if dampsq.ndim == 0 else dampsq)
    arnorm = alpha * beta
    istop = torch.zeros(batch + (1,), dtype=torch.int64, device=b.device)
    return _LSQRState(
        x=x, u=u, v=v, w=w, alpha=alpha, beta=beta, bnorm=bnorm, dampsq=dampsq, damp_b=dampsq.sqrt(),
        rhobar=alpha.clone(), phibar=beta.clone(), rnorm=beta.clone(), r1norm=beta.clone(), r2norm=beta.clone(),
        anorm=zeros.clone(), acond=zeros.clone(), ddnorm=zeros.clone(), res2=zeros.clone(),
        xnorm=zeros.clone(), xxnorm=zeros.clone(), z=zeros.clone(), sn2=zeros.clone(),
        cs2=-torch.ones_like(zeros), arnorm=arnorm, istop=istop, itn=torch.zeros_like(istop),
        # arnorm == 0: x0 already solves the normal equations. A system with b = 0 has the exact
        # solution x = x0 (x = 0 by default).
        active=arnorm != 0,
    )


def _lsqr_bidiagonalise(st: _LSQRState, matvec: MatVec, rmatvec: MatVec, dtype: torch.dtype) -> None:
    """Continue the bidiagonalisation: the next ``u``, ``beta``, ``v``, ``alpha`` and the ``‖A‖`` estimate."""
    st.u = matvec(st.v).to(dtype) - st.alpha * st.u
    st.beta = _vnorm(st.u)
    st.u = _safe_div(st.u, st.beta)
    st.anorm = torch.where(st.beta > 0, torch.sqrt(st.anorm**2 + st.alpha**2 + st.beta**2 + st.dampsq), st.anorm)
    v_new = rmatvec(st.u).to(dtype) - st.beta * st.v
    alpha_new = _vnorm(v_new)
    v_new = _safe_div(v_new, alpha_new)
    st.alpha = torch.where(st.beta > 0, alpha_new, st.alpha)
    st.v = torch.where(st.beta > 0, v_new, st.v)


def _lsqr_rotate(st: _LSQRState) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Eliminate the damping and the subdiagonal ``beta``, update ``x`` and ``w``; ``(psi, tau, rho, theta, phi)``."""
    # ---- eliminate the damping parameter (rotation of [rhobar; damp])
    rhobar1 = torch.sqrt(st.rhobar**2 + st.dampsq)
    cs1 = _safe_div(st.rhobar, rhobar1)
    sn1 = _safe_div(st.damp_b, rhobar1)
    psi = sn1 * st.phibar
    st.phibar = cs1 * st.phibar

    # ---- plane rotation eliminating the subdiagonal beta
    cs, sn, rho = _sym_ortho(rhobar1, st.beta)
    theta = sn * st.alpha
    st.rhobar = -cs * st.alpha
    phi = cs * st.phibar
    st.phibar = sn * st.phibar
    tau = sn * phi

    # ---- update x and w
    t1 = _safe_div(phi, rho)
    t2 = _safe_div(-theta, rho)
    dk = _safe_div(st.w, rho)
    st.x = torch.where(st.active, st.x + t1 * st.w, st.x)
    st.w = st.v + t2 * st.w
    st.ddnorm = st.ddnorm + _vnorm(dk) ** 2
    return psi, tau, rho, theta, phi


def _lsqr_xnorm(st: _LSQRState, rho: Tensor, theta: Tensor, phi: Tensor) -> Tensor:
    """The new ``‖x‖`` estimate (Paige & Saunders' second rotation)."""
    delta = st.sn2 * rho
    gambar = -st.cs2 * rho
    rhs = phi - delta * st.z
    zbar = _safe_div(rhs, gambar)
    xnorm_new = torch.sqrt(st.xxnorm + zbar**2)
    gamma = torch.hypot(gambar, theta)
    st.cs2 = _safe_div(gambar, gamma)
    st.sn2 = _safe_div(theta, gamma)
    st.z = _safe_div(rhs, gamma)
    st.xxnorm = st.xxnorm + st.z**2
    return xnorm_new


@dataclass
class _LSQREstimates:
    """One iteration's statistics, recorded only for the systems still running."""

    xnorm: Tensor
    acond: Tensor
    rnorm: Tensor
    arnorm: Tensor
    r1norm: Tensor


def _lsqr_estimates(st: _LSQRState, psi: Tensor, tau: Tensor, xnorm: Tensor, dtype: torch.dtype) -> _LSQREstimates:
    """Residual and condition estimates of this iteration."""
    acond_new = st.anorm * torch.sqrt(st.ddnorm)
    res1 = st.phibar**2
    st.res2 = st.res2 + psi**2
    rnorm_new = torch.sqrt(res1 + st.res2)
    arnorm_new = st.alpha * tau.abs()
    r1sq = rnorm_new**2 - st.dampsq * st.xxnorm
    r1norm_new = torch.sqrt(r1sq.abs()) * torch.where(r1sq < 0, -1.0, 1.0).to(dtype)
    return _LSQREstimates(xnorm=xnorm, acond=acond_new, rnorm=rnorm_new, arnorm=arnorm_new, r1norm=r1norm_new)


def _lsqr_stop_code(
    st: _LSQRState, est: _LSQREstimates, it: int, max_iter: int, atol: float, btol: float, ctol: float, eps: float
) -> Tensor:
    """Each system's stop code after this iteration (0: go on), as in ``LSQR_STOP_REASONS``."""
    test1 = _safe_div(est.rnorm, st.bnorm)
    test2 = est.arnorm / (st.anorm * est.rnorm + eps)
    test3 = 1.0 / (est.acond + eps)
    t1s = test1 / (1 + _safe_div(st.anorm * est.xnorm, st.bnorm))
    rtol = btol + atol * _safe_div(st.anorm * est.xnorm, st.bnorm)

    stop = torch.full_like(st.istop, 7 if it >= max_iter else 0)
    stop = torch.where(1 + test3 <= 1, 6, stop)
    stop = torch.where(1 + test2 <= 1, 5, stop)
    stop = torch.where(1 + t1s <= 1, 4, stop)
    stop = torch.where(test3 <= ctol, 3, stop)
    stop = torch.where(test2 <= atol, 2, stop)
    stop = torch.where(test1 <= rtol, 1, stop)
    return stop


def _lsqr_record(st: _LSQRState, est: _LSQREstimates, stop: Tensor, it: int) -> None:
    """Keep this iteration's statistics for the running systems; freeze those that had already stopped."""
    st.xnorm = torch.where(st.active, est.xnorm, st.xnorm)
    st.acond = torch.where(st.active, est.acond, st.acond)
    st.rnorm = torch.where(st.active, est.rnorm, st.rnorm)
    st.arnorm = torch.where(st.active, est.arnorm, st.arnorm)
    st.r1norm = torch.where(st.active, est.r1norm, st.r1norm)
    st.r2norm = torch.where(st.active, est.rnorm, st.r2norm)
    st.istop = torch.where(st.active, stop, st.istop)
    st.itn = torch.where(st.active, torch.full_like(st.itn, it), st.itn)
    st.active = st.active & (stop == 0)


@torch.no_grad()
def lsqr_gkl(
    A: Operator,
    b: Tensor,
    damp: Union[float, Tensor] = 0.0,
    atol: float = 1e-6,
    btol: float = 1e-6,
    conlim: float = 1e8,
    max_iter: Optional[int] = None,
    x0: Optional[Tensor] = None,
) -> LSQRResult:
    """LSQR: ``min_x ‖A x − b‖² + damp² ‖x‖²`` by Golub–Kahan–Lanczos bidiagonalisation.

    The algorithm of Paige & Saunders (1982) — the same recurrences and stopping
    tests as ``scipy.sparse.linalg.lsqr`` — run on every system of a batch at
    once; each system stops on its own (its ``x`` is frozen), the loop ends when
    all have stopped. Started from ``x0 = 0`` on a consistent or inconsistent
    system it converges to the minimum-norm least-squares solution
    (``pinv(A) b`` when ``damp = 0``), over- and under-determined alike.

    Args:
        A: a dense matrix ``(m, n)`` shared by all right-hand sides, or a batch
            ``(*batch, m, n)`` (broadcast against ``b``), or a pair
            ``(matvec, rmatvec)`` of callables mapping ``(*batch, n) → (*batch, m)``
            (``A x``) and ``(*batch, m) → (*batch, n)`` (``Aᵀ y``).
        b: right-hand sides ``(*batch, m)``; a 1-D ``b`` is a single system.
            fp16/bf16 inputs are solved in fp32.
        damp: damping ``≥ 0`` (float, or a tensor broadcastable to the batch shape).
        atol, btol: relative tolerances. Stop when ``‖r‖ ≤ btol‖b‖ + atol‖A‖‖x‖``
            (consistent systems) or ``‖Aᵀr‖ ≤ atol ‖A‖ ‖r‖`` (least squares).
        conlim: stop when the condition-number estimate exceeds it (0 disables).
        max_iter: iteration limit (default ``2 n``).
        x0: optional starting point ``(*batch, n)``.

    Returns:
        An :class:`LSQRResult` (``x`` and per-system statistics). It also unpacks
        as ``x, info = lsqr_gkl(A, b)``.

    Raises:
        TypeError: ``A`` is neither a tensor nor a pair of callables.
        ValueError: negative ``damp`` or mismatched shapes.
    """
    matvec, rmatvec, b, dtype, dampsq = _lsqr_setup(A, b, damp)
    eps = torch.finfo(dtype).eps
    st = _lsqr_start(matvec, rmatvec, b, x0, dampsq, dtype)
    if max_iter is None:
        max_iter = 2 * st.x.shape[-1]
    ctol = 1.0 / conlim if conlim > 0 else 0.0

    it = 0
    while bool(st.active.any()) and it < max_iter:
        it += 1
        _lsqr_bidiagonalise(st, matvec, rmatvec, dtype)
        psi, tau, rho, theta, phi = _lsqr_rotate(st)
        xnorm = _lsqr_xnorm(st, rho, theta, phi)
        est = _lsqr_estimates(st, psi, tau, xnorm, dtype)
        _lsqr_record(st, est, _lsqr_stop_code(st, est, it, max_iter, atol, btol, ctol, eps), it)

    istop = torch.where(st.active, torch.full_like(st.istop, 7), st.istop)

    def sq(t: Tensor) -> Tensor:
        return t.squeeze(-1)

    return LSQRResult(
        x=st.x,
        istop=sq(istop),
        itn=sq(st.itn),
        r1norm=sq(st.r1norm),
        r2norm=sq(st.r2norm),
        anorm=sq(st.anorm),
        acond=sq(st.acond),
        arnorm=sq(st.arnorm),
        xnorm=sq(st.xnorm),
    )


# ------------------------------------------------------------------ thresholds
def _dims(x: Tensor, dim: Dims) -> Tuple[int, ...]:
    if isinstance(dim, int):
        return (dim,)
    dims = tuple(int(d) for d in dim)
    if not dims:
        raise ArgumentError("group dims must name at least one dimension")
    return dims


def group_norms(x: Tensor, dim: Dims = -1, keepdim: bool = True) -> Tensor:
    """Euclidean norm of every group of ``x``.

    A group is the set of entries that differ only in the dims ``dim`` (an int or
    a sequence; ``tuple(range(x.ndim))`` makes the whole tensor one group).
    """
    return torch.linalg.vector_norm(x, ord=2, dim=_dims(x, dim), keepdim=keepdim)


def hard_threshold(x: Tensor, threshold: Union[float, Tensor], dim: Optional[Dims] = None) -> Tensor:
    """Zero the entries (or groups) whose magnitude is *below* ``threshold``; out of place.

    * Element-wise (``dim=None``, the default): ``y_i = x_i`` if ``|x_i| ≥ threshold``
      else ``0``.
    * Group-wise (``dim`` an int or a sequence of ints): the groups are the
      slices along ``dim`` (see :func:`group_norms`) and
      ``y_g = x_g`` if ``‖x_g‖₂ ≥ threshold`` else ``0``.

    A group exactly at the threshold is kept, matching ``BlockSpec.hard_threshold``
    (zero the blocks whose norm is ``< threshold``).

    Args:
        x: any float tensor.
        threshold: a scalar, or a tensor broadcastable to ``x`` (element-wise)
            or to the group norms with ``keepdim=True`` (group-wise).
        dim: the group dims; ``None`` for element-wise thresholding.

    Returns:
        A new tensor of the shape and dtype of ``x``.
    """
    if dim is None:
        mag = x.abs()
    else:
        mag = group_norms(x, dim)
    keep = mag >= torch.as_tensor(threshold, dtype=mag.dtype, device=mag.device)
    return x * keep.to(x.dtype)


def soft_threshold(
    x: Tensor,
    threshold: Union[float, Tensor],
    dim: Optional[Dims] = None,
) -> Tensor:
    """Shrink entries (or groups) towards zero by ``threshold``: the proximal map of ``t‖·‖``.

    * Element-wise (``dim=None``, the default): ``y_i = sign(x_i) · max(|x_i| − t, 0)``, the
      proximal operator of ``t‖x‖₁``.
    * Group-wise (``dim`` an int or a sequence of ints):
      ``y_g = x_g · max(0, 1 − t / ‖x_g‖₂)``, the proximal operator of
      ``t Σ_g ‖x_g‖₂`` (group lasso). A group with ``‖x_g‖ ≤ t`` becomes exactly 0.

    Args:
        x: any float tensor.
        threshold: ``t ≥ 0``, a scalar or broadcastable tensor (see
            :func:`hard_threshold`).
        dim: the group dims; ``None`` for element-wise shrinkage.

    Returns:
        A new tensor of the shape and dtype of ``x``.
    """
    t = torch.as_tensor(threshold, dtype=x.dtype, device=x.device)
    if (t < 0).any():
        raise ArgumentError(f"soft_threshold: `threshold` must be >= 0, got {threshold}")
    if dim is None:
        return torch.sign(x) * torch.clamp(x.abs() - t, min=0)
    nrm = group_norms(x, dim)
    scale = torch.clamp(1 - _safe_div(t.expand_as(nrm), nrm), min=0)
    scale = torch.where(nrm > t, scale, torch.zeros_like(scale))
    return x * scale


# ------------------------------------------------------------------ proximal step
@torch.no_grad()
def solve_proximal_adam(
    v: Tensor,
    h: Tensor,
    t: Union[float, Tensor],
    dim: Dims = -1,
    max_iter: int = 100,
    rtol: float = 1e-10,
    return_mu: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Conditioned group-lasso proximal step, for every group at once.

    Solves, independently for each group ``g`` (the entries of ``v`` along
    ``dim``)::

        w_g = argmin_w  ½ Σ_i h_i (w_i − v_i)²  +  t_g ‖w‖₂

    with a positive diagonal conditioner ``h`` (e.g. Adam's ``sqrt(v̂) + ε``).
    The optimality conditions give:

    * ``w_g = 0`` when ``‖h ⊙ v‖₂ ≤ t_g`` (``0`` is in the subdifferential);
    * otherwise ``w = h ⊙ v / (h + μ)`` where ``μ > 0`` is the unique root of
      ``φ(μ) = μ ‖h ⊙ v / (h + μ)‖₂ − t_g`` (``μ = t_g / ‖w‖``).

    ``φ`` is increasing, and the root is bracketed by
    ``[t·h_min, t·h_max] / (‖h v‖ − t)``; it is found by safeguarded Newton
    (a Newton step from the current point, replaced by bisection when it leaves
    the bracket), which converges in a handful of iterations. With ``h`` constant
    this reduces to the group soft threshold ``v · max(0, 1 − t/(h‖v‖))``.

    Args:
        v: values, any shape; the groups are the slices along ``dim``
            (``tuple(range(v.ndim))`` = the whole tensor is one group).
        h: conditioner, broadcastable to ``v``, entries ``> 0``.
        t: threshold ``≥ 0``, scalar or broadcastable to the group norms
            (the shape of ``v`` with ``dim`` kept as size 1).
        dim: group dims (an int or a sequence of ints).
        max_iter: Newton/bisection iterations at most.
        rtol: stop when the bracket is narrower than ``rtol · μ`` or
            ``|φ(μ)| ≤ rtol · t``.
        return_mu: also return ``μ`` per group (0 for zeroed groups, ``+inf``
            never occurs).

    Returns:
        ``w`` (shape of ``v``), or ``(w, mu)`` with ``mu`` of the group-norm
        shape (``keepdim=True``) when ``return_mu``.
    """
    dtype = v.dtype if v.dtype in (torch.float32, torch.float64) else torch.float32
    vv = v.to(dtype)
    hh = torch.as_tensor(h, dtype=dtype, device=v.device).expand_as(vv)
    if (hh <= 0).any():
        raise ArgumentError("solve_proximal_adam: the conditioner `h` must be > 0 everywhere")
    dims = _dims(vv, dim)
    hv = hh * vv
    hv_norm = torch.linalg.vector_norm(hv, dim=dims, keepdim=True)
    tt = torch.as_tensor(t, dtype=dtype, device=v.device)
    if (tt < 0).any():
        raise ArgumentError(f"solve_proximal_adam: `t` must be >= 0, got {t}")
    tt = tt.expand_as(hv_norm)
    survive = hv_norm > tt
    gap = torch.where(survive, hv_norm - tt, torch.ones_like(hv_norm))
    h_min = torch.amin(hh, dim=dims, keepdim=True)
    h_max = torch.amax(hh, dim=dims, keepdim=True)
    lo = tt * h_min / gap
    hi = tt * h_max / gap
    mu = 0.5 * (lo + hi)

    def phi_and_grad(m: Tensor) -> Tuple[Tensor, Tensor]:
        # φ(μ) = μ ‖hv/(h+μ)‖ − t;  φ'(μ) = Σ h² v² h/(h+μ)³ / ‖hv/(h+μ)‖
        d = hh + m
        q = hv / d
        qn = torch.linalg.vector_norm(q, dim=dims, keepdim=True)
        phi = m * qn - tt
        dq = torch.sum(q * q * hh / d, dim=dims, keepdim=True)
        grad = _safe_div(dq, qn)
        return phi, grad

    tiny = torch.finfo(dtype).tiny
    for _ in range(max_iter):
        phi, grad = phi_and_grad(mu)
        lo = torch.where(phi < 0, mu, lo)
        hi = torch.where(phi > 0, mu, hi)
        newton = mu - _safe_div(phi, grad)
        inside = (newton > lo) & (newton < hi) & torch.isfinite(newton)
        mu_next = torch.where(inside, newton, 0.5 * (lo + hi))
        done = ((hi - lo) <= rtol * mu.abs() + tiny) | (phi.abs() <= rtol * tt + tiny)
        mu = torch.where(done, mu, mu_next)
        if bool((done | ~survive).all()):
            break

    mu = torch.where(survive, mu, torch.zeros_like(mu))
    w = torch.where(survive, hv / (hh + mu), torch.zeros_like(hv)).to(v.dtype)
    if return_mu:
        return w, mu
    return w
