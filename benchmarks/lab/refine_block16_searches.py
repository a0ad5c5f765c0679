"""Lab probe (issue 19): wider searches for the row-coupled 16-column blocks (block16) than refine_mask's sweeps.

block16 keeps, in each 16-column block shared by rows r and r+8, the block of one of the two
rows; the layer error is a sum over row pairs, so every search below works per row pair with
exact costs and keeps, pair by pair, the better of the old and the new mask. Three searches:

* ``admm``: ADMM on min tr((W0 − U) H (W0 − U)ᵀ) with U on the pattern, in Jacobi-scaled
  coordinates; the projection keeps, per block pair, the row of larger block energy; ρ grows
  geometrically; then the exact optimum for its mask and 2 sweeps.
* ``ils``: iterated local search from True OBS + 2 sweeps: flip ``--flips`` random blocks of
  every row pair, 2 sweeps, keep each pair's better mask; ``--rounds`` rounds.
* ``lns``: large-neighbourhood search: for every row pair, all 2^n assignments of ``--nvar``
  random blocks (the rest fixed) costed exactly (a Schur complement onto the free blocks, one
  masked solve per assignment), the best taken, then 1 sweep; ``--rounds`` rounds.

    OMP_NUM_THREADS=1 python benchmarks/lab/refine_block16_searches.py admm|ils|lns [--layer 0]

Measured (2026-12-05, 1 thread, MiniLM encoder.layer.0.attention.self.query, True OBS 0.2952,
refine_mask 2 sweeps 0.2870 = 2.8%): admm best schedule (ρ0 1e-3, ×1.03, 400 steps) 0.2899
alone, 0.2851 (3.4%) after 2 sweeps; ils 3 flips, 9 rounds 0.2835 (3.95%, the gain per round
falling from 84 pairs to 5); lns 8 blocks, 8 rounds 0.2846 (3.6%, 3–36 of 192 pairs improved a
round). With refine_pair_moves.py (3.8%, best of three starts 4.1%), every search stops
between 3.4 and 4.1%; the issue's target is 5%.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from s3sparse import StructuredOBS, output_error, patterns, refine_mask  # noqa: E402
from s3sparse.pruners.hessian import damped_inverse  # noqa: E402

F64 = torch.float64
BW = 16


def refined(W0, H, keep, sweeps):
    """The exact optimum for mask ``keep`` after ``sweeps`` sweeps of refine_mask."""
    W = torch.nn.Parameter(torch.where(keep, W0, torch.zeros_like(W0)))
    scope, nnz = patterns.by_name("block16", W)
    refine_mask(scope, H, nnz, W0, sweeps=sweeps)
    return W.detach().clone()


def true_obs_start(layer: int):
    """(name, W0, H, True OBS weight) of MiniLM default layer ``layer`` pruned to block16."""
    import real_layers

    name = real_layers.DEFAULT_LAYERS[layer]
    W0, H = real_layers.minilm_layers(real_layers.DEFAULT_LAYERS)[name]
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = patterns.by_name("block16", W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        StructuredOBS(scope, H).prune_true_obs(nnz)
    return name, W0, H, W.detach().clone()


def pair_errors(W, W0, H):
    """(M/2,) output error of every row pair (r, r+8)."""
    M = W.shape[0]
    D = W.double() - W0.double()
    return ((D @ H.double()) * D).sum(1).reshape(M // 16, 2, 8).sum(1).reshape(-1)


def better_pairs(Wa, Wb, W0, H):
    """Pair by pair, the better of two weights (and how many pairs ``Wb`` improved)."""
    M = Wa.shape[0]
    ea, eb = pair_errors(Wa, W0, H), pair_errors(Wb, W0, H)
    take = (eb < ea).reshape(M // 16, 1, 8).expand(-1, 2, -1).reshape(M, 1)
    return torch.where(take, Wb, Wa), int((eb < ea).sum())


def row0_keeps(keep):
    """(M/16, 8, nb) whether row r (of pair r, r+8) keeps each block."""
    M, K = keep.shape
    return keep.reshape(M // 16, 2, 8, K // BW, BW)[:, 0, :, :, 0]


def expand(k0, M, K):
    """The block16 mask whose rows r keep ``k0`` and rows r+8 the rest."""
    return torch.stack([k0, ~k0], 1)[..., None].expand(-1, -1, -1, -1, BW).reshape(M, K)


def admm_mask(W0, H, rho0, growth, steps, damp=1e-4):
    M, K = W0.shape
    Hd = H.to(F64) + damp * H.diagonal().mean() * torch.eye(K, dtype=F64)
    d = Hd.diagonal().sqrt()
    Hs, Ws = Hd / d[:, None] / d[None, :], W0.to(F64) * d
    lam, Q = torch.linalg.eigh(Hs)

    def project(Z):
        e = (Z * Z).reshape(M // 16, 2, 8, K // BW, BW).sum(-1)
        return expand(e[:, 0] >= e[:, 1], M, K)

    keep = project(Ws)
    Z, Lam, rho = Ws * keep, torch.zeros_like(Ws), rho0
    for _ in range(steps):
        U = ((Ws @ Hs + rho * (Z - Lam)) @ Q) / (lam + rho) @ Q.T
        keep = project(U + Lam)
        Z = (U + Lam) * keep
        Lam = Lam + U - Z
        rho *= growth
    return keep


def lns_round(W0, C, keep, nvar, g):
    M, K = keep.shape
    nb = K // BW
    bits = ((torch.arange(1 << nvar)[:, None] >> torch.arange(nvar)) & 1).bool()  # 1: row r keeps the block
    w64, keep, improved = W0.to(F64), keep.clone(), 0

    def costs(w, F, v, prune_when):  # every assignment's cost of one row: pruned = F ∪ free blocks pruned
        L = torch.linalg.cholesky(C[F[:, None], F[None, :]])
        CFv = C[F[:, None], v[None, :]]
        X = torch.cholesky_solve(torch.cat([CFv, w[F, None]], 1), L)
        S = C[v[:, None], v[None, :]] - CFv.T @ X[:, :-1]
        r = w[v] - CFv.T @ X[:, -1]
        m = (bits == prune_when).repeat_interleave(BW, 1).to(F64)
        Sm = S[None] * m[:, :, None] * m[:, None, :] + torch.diag_embed(1 - m)
        return w[F] @ X[:, -1] + (r * m * torch.linalg.solve(Sm, (r * m)[..., None]).squeeze(-1)).sum(-1)

    for g0 in range(0, M, 16):
        for p in range(8):
            r0, r1 = g0 + p, g0 + p + 8
            blocks = torch.randperm(nb, generator=g)[:nvar].sort().values
            v = (blocks[:, None] * BW + torch.arange(BW)).reshape(-1)
            free = torch.zeros(K, dtype=torch.bool)
            free[v] = True
            tot = (costs(w64[r0], ((~keep[r0]) & ~free).nonzero().squeeze(1), v, False)
                   + costs(w64[r1], ((~keep[r1]) & ~free).nonzero().squeeze(1), v, True))
            cur = int((keep[r0, blocks * BW].long() << torch.arange(nvar)).sum())
            best = int(tot.argmin())
            if tot[best] < tot[cur] * (1 - 1e-10):
                improved += 1
                kb = bits[best].repeat_interleave(BW)
                keep[r0, v], keep[r1, v] = kb, ~kb
    return keep, improved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("search", choices=["admm", "ils", "lns"])
    ap.add_argument("--layer", type=int, default=0, help="index into the MiniLM default layers")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--flips", type=int, default=3)
    ap.add_argument("--nvar", type=int, default=8)
    a = ap.parse_args(argv)
    name, W0, H, W_tobs = true_obs_start(a.layer)
    M, K = W0.shape
    e_tobs = output_error(W_tobs, W0, H)
    show = lambda tag, Wb: print(f"{name} block16 {tag}: {output_error(Wb, W0, H):.4f} "  # noqa: E731
                                 f"({100 * (1 - output_error(Wb, W0, H) / e_tobs):.2f}% below True OBS {e_tobs:.4f})",
                                 flush=True)
    best = refined(W0, H, W_tobs != 0, 2)
    show("True OBS + 2 sweeps", best)
    if a.search == "admm":
        for rho0, growth, steps in [(1e-2, 1.1, 100), (3e-3, 1.05, 250), (1e-3, 1.03, 400)]:
            keep = admm_mask(W0, H, rho0, growth, steps)
            show(f"admm rho0={rho0} x{growth} {steps} steps", refined(W0, H, keep, 0))
            show(f"admm rho0={rho0} x{growth} {steps} steps + 2 sweeps", refined(W0, H, keep, 2))
        return
    g = torch.Generator().manual_seed(0)
    C = damped_inverse(H.to(F64), 1e-4, dtype=F64, what="C")[0]
    for r in range(a.rounds):
        t = time.time()
        if a.search == "ils":
            k0 = row0_keeps(best != 0)
            flips = torch.zeros_like(k0)
            flips.scatter_(-1, torch.rand(k0.shape, generator=g).argsort(-1)[..., : a.flips], True)
            best, n = better_pairs(best, refined(W0, H, expand(k0 ^ flips, M, K), 2), W0, H)
        else:
            keep, n = lns_round(W0, C, best != 0, a.nvar, g)
            best = refined(W0, H, keep, 1)
        show(f"{a.search} round {r} ({n} pairs improved, {time.time() - t:.0f} s)", best)


if __name__ == "__main__":
    main()
