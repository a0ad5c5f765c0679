"""The lowrank_sub op (``base - a @ b.mT``, the panel product of left-looking True OBS)
against its oracle, on CPU, CUDA and (fp32/fp64 only: the emulator runs on CPU
tensors, whose BLAS has no fp16 GEMM with fp32 output) the CUDA host emulator."""

from __future__ import annotations

import pytest
import torch

from s3sparse import ops
from s3sparse import reference as ref
from emu_utils import EMU_LIB, use_emulator

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
if EMU_LIB:
    DEVICES.append(pytest.param("emu", id="cuda_emu"))


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    if request.param == "emu":
        use_emulator(monkeypatch)
        return "emu"
    return request.param


def _dev(device: str) -> str:
    return "cpu" if device == "emu" else device


# Tolerances relative to the size of the product, per operand storage.
_RTOL = {torch.float16: 2e-6, torch.bfloat16: 2e-6, torch.float32: 2e-5, torch.float64: 1e-12}


def _case(dev, dtype, N, P, R, O, Kc, seed):
    g = torch.Generator().manual_seed(seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    base = torch.randn(N, P, R, generator=g, dtype=acc)
    a = torch.randn(N, P, O, generator=g).to(dtype)
    full = torch.randn(N, Kc, O + 3, generator=g).to(dtype)
    b = full[:, Kc - R :, :O]  # a strided view, as the pruner passes U[:, s0:, :o]
    return base.to(dev), a.to(dev), b.to(dev)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (2, 16, 40, 33), (1, 1, 1, 1), (2, 3, 4, 0), (0, 2, 3, 4)])
def test_lowrank_sub_matches_oracle(device, dtype, shape, seed):
    if device == "emu" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("the emulator's CPU BLAS has no fp16/bf16 GEMM with fp32 output")
    N, P, R, O = shape
    base, a, b = _case(_dev(device), dtype, N, P, R, O, R + 5, seed)
    got = ops.lowrank_sub(base, a, b)
    want = ref.lowrank_sub(base.cpu(), a.cpu(), b.cpu())
    assert got.dtype == base.dtype and got.shape == (N, P, R)
    scale = (a.double().abs().cpu() @ b.double().abs().cpu().mT + base.double().abs().cpu()).clamp(min=1)
    err = (got.cpu().double() - want.double()).abs()
    assert bool((err <= _RTOL[dtype] * scale * max(O, 1) + 1e-30).all()), f"max error {float(err.max()) if err.numel() else 0}"
    # The inputs are left as they were.
    assert torch.equal(base.cpu(), _case("cpu", dtype, N, P, R, O, R + 5, seed)[0])


def test_lowrank_sub_bad_inputs(device):
    dev = _dev(device)
    base = torch.zeros(2, 3, 4, device=dev)
    a = torch.zeros(2, 3, 5, device=dev)
    b = torch.zeros(2, 4, 5, device=dev)
    cases = [
        (lambda: ops.lowrank_sub(base.half(), a.half(), b.half()), TypeError, "`base`"),
        (lambda: ops.lowrank_sub(base, a.int(), b.int()), TypeError, "`a`"),
        (lambda: ops.lowrank_sub(base, a, b.double()), TypeError, "`b`"),
        (lambda: ops.lowrank_sub(base, a.double(), b.double()), TypeError, "`base` must be float64"),
        (lambda: ops.lowrank_sub(base[0], a, b), ValueError, "`base`"),
        (lambda: ops.lowrank_sub(base, a[:, :2], b), ValueError, "shapes"),
        (lambda: ops.lowrank_sub(base, a, b[:, :, :4]), ValueError, "shapes"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.cuda
def test_lowrank_sub_mismatched_devices():
    base = torch.zeros(2, 3, 4, device="cuda")
    with pytest.raises(ValueError, match="`a`"):
        ops.lowrank_sub(base, torch.zeros(2, 3, 5), torch.zeros(2, 4, 5, device="cuda"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_lowrank_sub_opcheck_and_compile(device):
    base, a, b = _case(device, torch.float16 if device == "cuda" else torch.float32, 2, 4, 6, 3, 9, 7)
    torch.library.opcheck(torch.ops.s3sparse.lowrank_sub.default, (base, a, b.contiguous()))
    torch.library.opcheck(torch.ops.s3sparse.lowrank_sub.default, (base, a, b))

    def f(base, a, b):
        return ops.lowrank_sub(base, a, b) * 2

    torch._dynamo.reset()
    for backend in ("eager", "aot_eager", "inductor"):
        got = torch.compile(f, backend=backend, fullgraph=True)(base, a, b)
        torch.testing.assert_close(got, f(base, a, b))


# ---------------------------------------------------------------- lowrank_factor
# U_j = panelᵀ L⁻ᵀ at fp32 accuracy. Bound: relative to Σ|panel||linv| — the hi/lo split
# keeps fp32-level error (its dropped lo·lo term is 2⁻²² relative for fp16, 2⁻¹⁶ for bf16) —
# plus, for fp16, lo's absolute step in fp16's subnormal range (2⁻²⁴) times Σ|linv|: panel
# entries below ~2⁻³ lose relative accuracy there (True OBS's panels are Jacobi-scaled, |C| ≤ 1);
# and the same for linv's lo: its entries below ~2⁻³ are exact only to 2⁻²⁴, times Σ|panel| over
# linv's nonzeros (seed 1574282778: a linv entry 0.0043 against a panel entry 250 at scale 300).
_FACTOR_RTOL = {torch.float16: 2e-6, torch.bfloat16: 3e-5, torch.float32: 2e-6, torch.float64: 2e-6}
_FACTOR_ATOL = {torch.float16: 2.0**-24, torch.bfloat16: 0.0, torch.float32: 0.0, torch.float64: 0.0}


def _factor_case(dev, math_dtype, N, P, R, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    panel = (scale * torch.randn(N, P, R, generator=g, dtype=torch.float64)).to(math_dtype)
    linv = torch.linalg.inv(torch.eye(P, dtype=torch.float64) + 0.3 * torch.randn(N, P, P, generator=g,
                                                                                     dtype=torch.float64).tril(-1))
    return panel.to(dev), linv.to(math_dtype).to(dev)


@pytest.mark.parametrize("split_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 16, 40), (1, 1, 1), (2, 3, 0), (0, 2, 3), (4, 128, 130)])
def test_lowrank_factor_matches_oracle(device, split_dtype, shape, seed):
    N, P, R = shape
    dev = _dev(device)
    for math_dtype in (torch.float32, torch.float64):
        for scale in (1.0, 1e-3, 300.0):  # hi/lo must keep relative accuracy at any magnitude
            panel, linv = _factor_case(dev, math_dtype, N, P, R, seed, scale)
            got = ops.lowrank_factor(panel, linv, split_dtype)
            want = ref.lowrank_factor(panel.cpu(), linv.cpu(), split_dtype)
            assert got.dtype == math_dtype and got.shape == (N, R, P)
            bound = panel.double().abs().cpu().mT @ linv.double().abs().cpu().mT
            err = (got.cpu().double() - want.double()).abs()
            tol = _FACTOR_RTOL[split_dtype] if math_dtype == torch.float32 else 1e-12
            atol = _FACTOR_ATOL[split_dtype] if math_dtype == torch.float32 else 0.0
            linv_l1 = linv.double().abs().sum(-1).cpu().unsqueeze(1)  # (N, 1, P): Σ_i |linv[j, i]|
            # (N, R, P): Σ_i |panel[i, r]| over linv[j, i] != 0
            panel_l1 = panel.double().abs().cpu().mT @ (linv != 0).double().cpu().mT
            assert bool((err <= tol * bound + atol * (linv_l1 + panel_l1) + 1e-30).all()), (
                f"{math_dtype} split {split_dtype} scale {scale}: max error {float(err.max()) if err.numel() else 0}")


def test_lowrank_factor_non_contiguous_panel(device):
    dev = _dev(device)
    panel, linv = _factor_case(dev, torch.float32, 3, 6, 11, 5)
    wide = torch.zeros(3, 6, 20, device=dev)
    wide[:, :, 4:15] = panel
    got = ops.lowrank_factor(wide[:, :, 4:15], linv, torch.float16)
    torch.testing.assert_close(got.cpu(), ref.lowrank_factor(panel.cpu(), linv.cpu(), torch.float16), rtol=1e-5, atol=1e-5)


def test_lowrank_factor_bad_inputs(device):
    dev = _dev(device)
    panel = torch.zeros(2, 3, 4, device=dev)
    linv = torch.zeros(2, 3, 3, device=dev)
    cases = [
        (lambda: ops.lowrank_factor(panel.half(), linv.half(), torch.float16), TypeError, "`panel`"),
        (lambda: ops.lowrank_factor(panel, linv.double(), torch.float16), TypeError, "`linv`"),
        (lambda: ops.lowrank_factor(panel, linv, torch.int32), TypeError, "`split_dtype`"),
        (lambda: ops.lowrank_factor(panel[0], linv, torch.float16), ValueError, "`panel`"),
        (lambda: ops.lowrank_factor(panel, linv[:, :2], torch.float16), ValueError, "shapes"),
        (lambda: ops.lowrank_factor(panel, linv[:1], torch.float16), ValueError, "shapes"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_lowrank_factor_opcheck_and_compile(device):
    panel, linv = _factor_case(device, torch.float32, 2, 4, 6, 7)
    for split_dtype in (torch.float16, torch.float32):
        torch.library.opcheck(torch.ops.s3sparse.lowrank_factor.default, (panel, linv, split_dtype))

    def f(panel, linv):
        return ops.lowrank_factor(panel, linv, torch.float16) * 2

    torch._dynamo.reset()
    for backend in ("eager", "aot_eager", "inductor"):
        got = torch.compile(f, backend=backend, fullgraph=True)(panel, linv)
        torch.testing.assert_close(got, f(panel, linv))


# ---------------------------------------------------------------- the Schur-update op family
# True OBS stores no per-row C: after a row pruned the columns Q its C is the Schur
# complement C0 - C0[:, Q] C0[Q, Q]⁻¹ C0[Q, :], kept as C0 - U Uᵀ, and every panel it reads
# is lowrank_sub(C0[S, R], U[S], U[R]). These tests pin that this product IS the Schur
# complement, computed densely in float64.

def _dense_schur(C: torch.Tensor, Q: torch.Tensor, S: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """C[S, R] - C[S, Q] C[Q, Q]⁻¹ C[Q, R], float64."""
    C = C.double()
    if Q.numel() == 0:
        return C[S][:, R]
    return C[S][:, R] - C[S][:, Q] @ torch.linalg.solve(C[Q][:, Q], C[Q][:, R])


def _spd_inverse(K: int, g: torch.Generator) -> torch.Tensor:
    """C = (H + λI)⁻¹ for a random correlated SPD H (float64), in Jacobi-scaled coordinates
    (unit diagonal) as True OBS holds it."""
    X = torch.randn(2 * K, K, generator=g, dtype=torch.float64) @ (
        torch.eye(K, dtype=torch.float64) + 0.3 * torch.randn(K, K, generator=g, dtype=torch.float64) / K**0.5)
    H = X.T @ X / (2 * K)
    C = torch.linalg.inv(H + 1e-2 * H.diagonal().mean() * torch.eye(K, dtype=torch.float64))
    d = C.diagonal().rsqrt()
    C = C * d[:, None] * d[None, :]
    return (C + C.T) / 2


# Max |error| allowed, relative to max |C0| (1; the Schur corrections are ~0.5): the factors'
# storage dominates (measured over 10 seeds: 4e-16, 1.4e-7, 2.7e-4, 2.5e-3).
_SCHUR_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_lowrank_sub_panel_is_the_schur_complement(device, dtype, seed):
    """Factors built batch by batch as True OBS builds them (true_obs_sweep.ChunkSweep:
    panel by lowrank_sub, L = chol(C[S_j, S_j]), U_j = C[:, S_j] L⁻ᵀ by lowrank_factor): every panel C0[S, R] - U[S] U[R]ᵀ equals the dense Schur
    complement of the columns eliminated before it, per row."""
    if device == "emu" and dtype in (torch.float16, torch.bfloat16):
        pytest.skip("the emulator's CPU BLAS has no fp16/bf16 GEMM with fp32 output")
    dev = _dev(device)
    g = torch.Generator().manual_seed(seed)
    N, K, P, nb = 3, 40, 6, 4  # rows, columns, pruned per batch, batches
    math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    C0 = _spd_inverse(K, g)
    C0m = C0.to(dev, math_dtype)
    order = torch.stack([torch.randperm(K, generator=g) for _ in range(N)])  # each row its own pruning order
    U = torch.zeros(N, K, nb * P, dtype=dtype, device=dev)
    eye = torch.eye(P, dtype=math_dtype, device=dev)
    n_idx = torch.arange(N).view(N, 1)
    tol = _SCHUR_TOL[dtype]
    for j in range(nb + 1):
        o = j * P
        eliminated = order[:, :o]
        # The panel every row reads at batch j: its next pruned columns S_j against all columns.
        S = order[:, o : o + P] if j < nb else order[:, o:]
        panel = ops.lowrank_sub(C0m[S.to(dev)], U[n_idx.to(dev), S.to(dev), :o], U[:, :, :o])
        for n in range(N):
            want = _dense_schur(C0, eliminated[n], S[n], torch.arange(K))
            err = (panel[n].cpu().double() - want).abs().max().item()
            assert err <= tol, f"row {n}, batch {j}, factors {dtype}: panel off the Schur complement by {err:.3g}"
        if j == nb:
            break
        # Eliminate S_j: as ChunkSweep._pivot_inverse and ._factor.
        C_SS = torch.gather(panel, 2, S.to(dev).unsqueeze(1).expand(N, P, P))
        L = torch.linalg.cholesky(0.5 * (C_SS + C_SS.mT))
        Linv = torch.linalg.solve_triangular(L, eye.expand(N, P, P), upper=False)
        Uj = ops.lowrank_factor(panel, Linv, dtype)
        U[:, :, o : o + P] = Uj.to(dtype)


@pytest.mark.parametrize("c_dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["24", "block16"])
def test_true_obs_factors_give_the_schur_complement(name, c_dtype, seed):
    """The factors True OBS itself builds (a real ChunkSweep run, row-local 2:4 and the
    row-coupled 16-column pattern, whose rows share one factor matrix): at every batch b,
    the Schur-update op on them gives each row's C on the columns R still visited, the
    Schur complement (in C0 = (H + λI)⁻¹, float64, dense) of the columns that row pruned
    in batches before b."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pruner_utils import make_layer, pattern

    from s3sparse.pruners.hessian import damped_inverse
    from s3sparse.pruners.obs_layer import OBSLayer
    from s3sparse.pruners.true_obs import TrueOBSOptions, _schedule
    from s3sparse.pruners.true_obs_sweep import ChunkSweep, ScaledInverse

    W, _, H = make_layer(16, 64, 256, seed)
    scope, nnz = pattern(name, W)
    layer = OBSLayer(scope, H)
    options = TrueOBSOptions(ng=4 if name == "24" else 1, c_dtype=c_dtype)  # 4 batches either way
    Wk = layer.working_copy()
    s = _schedule(layer, Wk, layer.num_prune(nnz), options)
    C0 = damped_inverse(layer.hessian, options.damp, dtype=torch.float64, what="H + damp*I")[0]
    math_dtype = torch.float64 if c_dtype == torch.float64 else torch.float32
    inv = ScaledInverse.of(C0, math_dtype, s.plan.order)
    g = layer.groups
    sweep = ChunkSweep(layer, Wk[g.rows.reshape(-1)], s.batches, s.nnz, s.scoring, s.subsets, inv, c_dtype, s.plan)
    _, failed = sweep.run()
    assert not failed.any()
    order, P, nb = s.plan.order, sweep.P, sweep.nb
    Cp = C0[order][:, order]  # C0 in plan order, unscaled
    scale = inv.scale[order].double()
    pruned_at = sweep.S_all.permute(1, 0, 2).reshape(sweep.Rc, nb * P)  # plan position of each factor column
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[c_dtype]  # measured: 3e-16, 1e-7, 1.5e-4
    checked = 0
    for b in range(nb):
        s0, o = s.plan.start[b], b * P
        R = torch.arange(s0, order.numel())
        for gi in range(sweep.Rc):
            for r in range(g.rows_per_group):
                own = (sweep.owner[gi, :o] == r).to(c_dtype)
                Ug = sweep.U[gi, s0:, :o]
                panel = ops.lowrank_sub(sweep.C0p[s0:, s0:].unsqueeze(0), (Ug * own).unsqueeze(0), Ug.unsqueeze(0))[0]
                Q = pruned_at[gi, :o][sweep.owner[gi, :o] == r]
                want = _dense_schur(Cp, Q, R, R)
                got = panel.double() * scale[R, None] * scale[None, R]
                err = (got - want).abs().max().item() / Cp.abs().max().item()
                assert err <= tol, f"{name} {c_dtype}: group {gi} row {r} batch {b}: off by {err:.3g} (|Q| = {Q.numel()})"
                checked += Q.numel() > 0
    assert checked >= 3
