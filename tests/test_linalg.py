"""Tests of s3sparse.linalg: LSQR, thresholds and the conditioned proximal step."""

from __future__ import annotations

import pytest
import torch

from s3sparse.errors import ArgumentError, ArgumentTypeError
from s3sparse.linalg import (
    LSQRResult,
    group_norms,
    hard_threshold,
    lsqr_gkl,
    soft_threshold,
    solve_proximal_adam,
)

F64 = torch.float64
TIGHT = dict(atol=1e-12, btol=1e-12, conlim=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------ LSQR
@pytest.mark.parametrize("m,n", [(40, 12), (12, 40), (25, 25), (1, 5), (5, 1)])
def test_lsqr_matches_pinv_solution(m: int, n: int) -> None:
    g = _gen(m * 100 + n)
    A = torch.randn(m, n, generator=g, dtype=F64)
    b = torch.randn(m, generator=g, dtype=F64)
    res = lsqr_gkl(A, b, **TIGHT)
    expected = torch.linalg.pinv(A) @ b  # least squares (m > n) / minimum norm (m < n)
    torch.testing.assert_close(res.x, expected, atol=1e-8, rtol=1e-8)
    assert res.converged.item()
    torch.testing.assert_close(res.r1norm, torch.linalg.vector_norm(A @ res.x - b), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(res.xnorm, torch.linalg.vector_norm(res.x), atol=1e-8, rtol=1e-6)


def test_lsqr_overdetermined_matches_lstsq_and_normal_equations() -> None:
    g = _gen(1)
    A = torch.randn(60, 15, generator=g, dtype=F64)
    b = torch.randn(60, generator=g, dtype=F64)
    x, info = lsqr_gkl(A, b, **TIGHT)  # unpacks as (x, info)
    assert isinstance(info, LSQRResult)
    ref = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(x, ref, atol=1e-9, rtol=1e-9)
    assert torch.linalg.vector_norm(A.T @ (A @ x - b)) < 1e-9  # normal equations
    torch.testing.assert_close(info.arnorm, torch.linalg.vector_norm(A.T @ (b - A @ x)), atol=1e-8, rtol=1e-3)


def test_lsqr_rank_deficient_gives_minimum_norm() -> None:
    g = _gen(2)
    A = torch.randn(30, 4, generator=g, dtype=F64) @ torch.randn(4, 20, generator=g, dtype=F64)  # rank 4
    b = torch.randn(30, generator=g, dtype=F64)
    res = lsqr_gkl(A, b, **TIGHT)
    torch.testing.assert_close(res.x, torch.linalg.pinv(A) @ b, atol=1e-7, rtol=1e-7)


def test_lsqr_batched_matrices_and_rhs() -> None:
    g = _gen(3)
    A = torch.randn(3, 4, 30, 10, generator=g, dtype=F64)
    b = torch.randn(3, 4, 30, generator=g, dtype=F64)
    res = lsqr_gkl(A, b, **TIGHT)
    assert res.x.shape == (3, 4, 10) and res.istop.shape == (3, 4) and res.itn.shape == (3, 4)
    ref = torch.linalg.lstsq(A, b.unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(res.x, ref, atol=1e-9, rtol=1e-9)


def test_lsqr_shared_matrix_many_rhs_each_stops_on_its_own() -> None:
    g = _gen(4)
    A = torch.randn(20, 8, generator=g, dtype=F64)
    b = torch.randn(5, 20, generator=g, dtype=F64)
    b[1] = A @ torch.randn(8, generator=g, dtype=F64)  # consistent system: stops on the residual test
    b[3] = 0.0  # exact solution 0
    res = lsqr_gkl(A, b, **TIGHT)
    ref = (torch.linalg.pinv(A) @ b.T).T
    torch.testing.assert_close(res.x, ref, atol=1e-9, rtol=1e-9)
    assert res.istop[3].item() == 0 and res.itn[3].item() == 0 and bool((res.x[3] == 0).all())
    assert res.istop[1].item() in (1, 4)
    assert res.r1norm[1].item() < 1e-9


def test_lsqr_damped_matches_ridge_solution() -> None:
    g = _gen(5)
    A = torch.randn(25, 12, generator=g, dtype=F64)
    b = torch.randn(3, 25, generator=g, dtype=F64)
    damp = 0.7
    res = lsqr_gkl(A, b, damp=damp, **TIGHT)
    ridge = torch.linalg.solve(A.T @ A + damp**2 * torch.eye(12, dtype=F64), A.T @ b.T).T
    torch.testing.assert_close(res.x, ridge, atol=1e-10, rtol=1e-10)
    resid = torch.linalg.vector_norm(ridge @ A.T - b, dim=-1)
    torch.testing.assert_close(res.r1norm, resid, atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(
        res.r2norm, torch.sqrt(resid**2 + damp**2 * torch.linalg.vector_norm(ridge, dim=-1) ** 2), atol=1e-8, rtol=1e-6
    )


def test_lsqr_per_system_damping_tensor() -> None:
    g = _gen(6)
    A = torch.randn(10, 14, generator=g, dtype=F64)
    b = torch.randn(2, 10, generator=g, dtype=F64)
    damp = torch.tensor([0.0, 2.0], dtype=F64)
    res = lsqr_gkl(A, b, damp=damp, **TIGHT)
    for i in range(2):
        d = float(damp[i])
        ref = torch.linalg.lstsq(
            torch.cat([A, d * torch.eye(14, dtype=F64)]), torch.cat([b[i], torch.zeros(14, dtype=F64)]).unsqueeze(-1),
            driver="gelsd",
        ).solution.squeeze(-1)
        torch.testing.assert_close(res.x[i], ref, atol=1e-9, rtol=1e-9)


def test_lsqr_operator_pair_equals_dense() -> None:
    g = _gen(7)
    A = torch.randn(30, 18, generator=g, dtype=F64)
    b = torch.randn(4, 30, generator=g, dtype=F64)
    calls = {"mv": 0, "rmv": 0}

    def matvec(x: torch.Tensor) -> torch.Tensor:
        calls["mv"] += 1
        return x @ A.T

    def rmatvec(y: torch.Tensor) -> torch.Tensor:
        calls["rmv"] += 1
        return y @ A

    res = lsqr_gkl((matvec, rmatvec), b, damp=0.1, **TIGHT)
    dense = lsqr_gkl(A, b, damp=0.1, **TIGHT)
    torch.testing.assert_close(res.x, dense.x, atol=1e-12, rtol=1e-12)
    assert calls["mv"] >= 1 and calls["rmv"] >= 1


def test_lsqr_x0_and_iteration_limit() -> None:
    g = _gen(8)
    A = torch.randn(40, 20, generator=g, dtype=F64)
    b = torch.randn(40, generator=g, dtype=F64)
    ref = torch.linalg.pinv(A) @ b
    warm = lsqr_gkl(A, b, x0=ref + 1e-3 * torch.randn(20, generator=g, dtype=F64), **TIGHT)
    torch.testing.assert_close(warm.x, ref, atol=1e-9, rtol=1e-9)
    one = lsqr_gkl(A, b, max_iter=1, **TIGHT)
    assert one.istop.item() == 7 and one.itn.item() == 1 and not one.converged.item()


def test_lsqr_float32_and_default_tolerances() -> None:
    g = _gen(9)
    A = torch.randn(200, 50, generator=g)
    b = torch.randn(200, generator=g)
    res = lsqr_gkl(A, b)
    assert res.x.dtype == torch.float32
    ref = torch.linalg.lstsq(A.double(), b.double().unsqueeze(-1)).solution.squeeze(-1)
    torch.testing.assert_close(res.x.double(), ref, atol=1e-4, rtol=1e-4)


def test_lsqr_rejects_bad_arguments() -> None:
    A = torch.randn(5, 3)
    with pytest.raises(ArgumentTypeError, match="matvec"):
        lsqr_gkl("A", torch.randn(5))  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="rows"):
        lsqr_gkl(A, torch.randn(4))
    with pytest.raises(ArgumentError, match="damp"):
        lsqr_gkl(A, torch.randn(5), damp=-1.0)


# ------------------------------------------------------------------ thresholds
def test_hard_threshold_elementwise_and_group() -> None:
    x = torch.tensor([[3.0, -0.5, 1.0], [0.1, 0.2, -0.1]])
    torch.testing.assert_close(hard_threshold(x, 1.0), torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    # group over the last dim: row norms 3.2 and 0.24
    torch.testing.assert_close(hard_threshold(x, 1.0, dim=-1), torch.tensor([[3.0, -0.5, 1.0], [0.0, 0.0, 0.0]]))
    # a norm exactly at the threshold is kept; per-group thresholds broadcast
    y = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    torch.testing.assert_close(hard_threshold(y, torch.tensor([[5.0], [5.5]]), dim=1), torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    # several dims form one group
    z = torch.ones(2, 3, 4)
    z[1] *= 0.1
    out = hard_threshold(z, 1.0, dim=(1, 2))
    assert bool((out[0] == 1).all()) and bool((out[1] == 0).all())
    assert group_norms(z, (1, 2)).shape == (2, 1, 1)


def test_soft_threshold_elementwise_closed_form() -> None:
    x = torch.tensor([-2.0, -0.3, 0.0, 0.5, 4.0])
    torch.testing.assert_close(soft_threshold(x, 0.5), torch.tensor([-1.5, 0.0, 0.0, 0.0, 3.5]))
    with pytest.raises(ArgumentError):
        soft_threshold(x, -1.0)


def test_soft_threshold_group_is_the_group_lasso_prox() -> None:
    g = _gen(10)
    v = torch.randn(50, 6, generator=g, dtype=F64)
    t = 2.0
    w = soft_threshold(v, t, dim=-1)
    nrm = v.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(w, torch.where(nrm > t, v * (1 - t / nrm), torch.zeros_like(v)))

    def objective(u: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((u - v) ** 2).sum(-1) + t * u.norm(dim=-1)

    base = objective(w)
    for _ in range(20):  # no perturbation does better
        assert bool((objective(w + 1e-3 * torch.randn(w.shape, generator=g, dtype=F64)) >= base - 1e-12).all())


# ------------------------------------------------------------------ proximal Adam step
def _prox_objective(w: torch.Tensor, v: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (h * (w - v) ** 2).sum(-1) + t.squeeze(-1) * w.norm(dim=-1)


def test_proximal_adam_optimality_conditions() -> None:
    g = _gen(11)
    v = torch.randn(200, 8, generator=g, dtype=F64)
    h = torch.rand(200, 8, generator=g, dtype=F64) * 3 + 0.05
    t = torch.rand(200, 1, generator=g, dtype=F64) * 3
    w, mu = solve_proximal_adam(v, h, t, return_mu=True)
    hv = (h * v).norm(dim=-1, keepdim=True)
    zero = (hv <= t).squeeze(-1)
    assert 0 < int(zero.sum()) < 200  # both cases occur
    assert bool((w[zero] == 0).all()) and bool((mu[zero] == 0).all())
    live = ~zero
    wn = w[live].norm(dim=-1, keepdim=True)
    # stationarity: h (w − v) + t w/‖w‖ = 0
    grad = h[live] * (w[live] - v[live]) + t[live] * w[live] / wn
    assert grad.abs().max() < 1e-9
    # μ‖w‖ = t and w = h v / (h + μ)
    torch.testing.assert_close(mu[live] * wn, t[live], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(w[live], h[live] * v[live] / (h[live] + mu[live]))


def test_proximal_adam_matches_numerical_minimisation() -> None:
    g = _gen(12)
    v = torch.randn(8, 5, generator=g, dtype=F64)
    h = torch.rand(8, 5, generator=g, dtype=F64) + 0.2
    t = torch.full((8, 1), 1.5, dtype=F64)
    w = solve_proximal_adam(v, h, t)
    # numerical minimisation by L-BFGS (the objective is smooth away from w = 0)
    u = v.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([u], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _prox_objective(u, v, h, t).sum()
        loss.backward()
        return loss

    opt.step(closure)
    best = _prox_objective(u.detach(), v, h, t)
    ours = _prox_objective(w, v, h, t)
    assert bool((ours <= best + 1e-9).all())  # never worse than the numerical optimum
    assert bool((best - ours < 1e-2).all())  # L-BFGS lands close by: both minimise the same objective
    assert bool((w.norm(dim=-1) == 0).any()) and bool((w.norm(dim=-1) > 0).any())  # both regimes tested


def test_proximal_adam_constant_conditioner_is_group_soft_threshold() -> None:
    g = _gen(13)
    v = torch.randn(30, 7, generator=g, dtype=F64)
    c = 2.5
    t = 1.7
    w = solve_proximal_adam(v, torch.full_like(v, c), t)
    torch.testing.assert_close(w, soft_threshold(v, t / c, dim=-1), atol=1e-12, rtol=1e-10)


def test_proximal_adam_multi_dim_groups_and_float32() -> None:
    g = _gen(14)
    v = torch.randn(4, 3, 5, generator=g)
    h = torch.rand(4, 3, 5, generator=g) + 0.1
    w = solve_proximal_adam(v, h, 0.5, dim=(1, 2))
    assert w.dtype == torch.float32 and w.shape == v.shape
    ref = solve_proximal_adam(v.double().reshape(4, 15), h.double().reshape(4, 15), 0.5)
    torch.testing.assert_close(w.double().reshape(4, 15), ref, atol=1e-5, rtol=1e-5)


def test_proximal_adam_rejects_bad_inputs() -> None:
    v = torch.randn(3, 4)
    with pytest.raises(ArgumentError, match="h"):
        solve_proximal_adam(v, torch.zeros(3, 4), 1.0)
    with pytest.raises(ArgumentError, match="t"):
        solve_proximal_adam(v, torch.ones(3, 4), -1.0)
