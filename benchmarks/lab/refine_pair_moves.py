"""Lab probe (issue 19): balanced pair moves for the row-coupled 16-column blocks, after refine_mask.

block16 keeps, in each 16-column scope shared by rows r and r+8, the block of one of the two
rows. refine_mask's sweep flips one scope at a time, which moves 16 kept weights from one row
to the other: every flip changes both rows' sparsity, and the sweep stops in a local optimum
2.8% below True OBS on MiniLM layer 0's query (the issue asks for 5%). A *pair move* flips two
scopes of a row pair in opposite directions — row r prunes block b instead of block a, row r+8
the reverse — so both rows keep their number of weights. Its exact cost for one row,
f(P \\ a ∪ b) − f(P) with f(P) = w_Pᵀ (C_PP)⁻¹ w_P, comes from the row's (C_PP)⁻¹ without a new
solve: adding b is a Schur complement S_b = C_bb − C_bP A⁻¹ C_Pb, and removing a from P ∪ b is
the OBS downdate with the (a, a) block of the enlarged inverse, A⁻¹_aa + Z_a S_b⁻¹ Z_aᵀ
(Z = A⁻¹ C_Pb). This probe takes the best move of each row pair until none lowers the pair's
cost, then re-sweeps, and reports the layer error (pure torch, row by row: a probe, not the
library's batched code).

    OMP_NUM_THREADS=2 python benchmarks/lab/refine_pair_moves.py [--layers 1] [--rounds 3]

Measured (2026-12-04, 2-core CPU, MiniLM encoder.layer.0.attention.self.query, 384×384, real H):
True OBS 0.2952 → refine_mask 2 sweeps 0.2870 (2.8%) → pair moves 0.2842 (201 moves) →
sweeps 0.2840 (3.8%); with three rounds 0.2838; the best of three starts (True OBS, SparseGPT,
magnitude, each refined so) per row pair 0.2830 (4.1%). The damping (1e-4 to 1e-8) does not
change the sweep's result. encoder.layer.2.intermediate.dense (1536×384): True OBS 0.2091 →
refine_mask 4 sweeps 0.2020 (3.4%) → with pair moves 0.2006 (4.1%, 867 moves). So local moves of
one or two scopes stop near 4% on these layers; the issue's 5% needs a wider search.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from s3sparse import StructuredOBS, output_error, patterns, refine_mask  # noqa: E402
from s3sparse.pruners.hessian import damped_inverse  # noqa: E402

F64 = torch.float64
BW = 16  # columns a block


def pair_terms(C: torch.Tensor, w: torch.Tensor, P: torch.Tensor, pruned: list, kept: list) -> torch.Tensor:
    """(len(pruned), len(kept)): f(P \\ a ∪ b) − f(P) for blocks a (pruned by this row) and b (kept)."""
    Ainv = torch.cholesky_inverse(torch.linalg.cholesky(C[P[:, None], P[None, :]]))
    u = Ainv @ w[P]
    pos = torch.full((C.shape[0],), -1, dtype=torch.long)
    pos[P] = torch.arange(P.numel())
    bc = torch.stack([torch.arange(b * BW, (b + 1) * BW) for b in kept])  # (nb, BW) columns
    CPb = C[P[:, None], bc.reshape(-1)[None, :]].reshape(P.numel(), len(kept), BW)
    Z = torch.einsum("pq,qbj->pbj", Ainv, CPb)  # A⁻¹ C_Pb
    S = C[bc[:, :, None], bc[:, None, :]] - torch.einsum("pbi,pbj->bij", CPb, Z)  # (nb, BW, BW)
    r = w[bc] - torch.einsum("pbi,p->bi", CPb, u)  # residual of b
    S_inv = torch.linalg.inv(S)
    S_inv_r = (S_inv @ r[..., None]).squeeze(-1)
    gain = (r * S_inv_r).sum(-1)  # f(P ∪ b) − f(P)
    ai = torch.stack([pos[torch.arange(a * BW, (a + 1) * BW)] for a in pruned])  # (na, BW) positions in P
    Zab = Z[ai].permute(0, 2, 1, 3)  # (na, nb, BW_a, BW_b)
    M = Ainv[ai[:, :, None], ai[:, None, :]][:, None] + Zab @ S_inv[None] @ Zab.transpose(-1, -2)
    y = u[ai][:, None, :] - (Zab @ S_inv_r[None, :, :, None]).squeeze(-1)  # (A⁻¹ over P ∪ b) w, at a
    drop = (y * torch.linalg.solve(M, y[..., None]).squeeze(-1)).sum(-1)
    return gain[None, :] - drop


def pair_moves(C: torch.Tensor, W0: torch.Tensor, kept: torch.Tensor, max_moves: int = 300) -> int:
    """Best pair move of each row pair (r, r+8) of every 16 rows until none helps; ``kept`` (M, K) bool, in place."""
    M, K = W0.shape
    nb, moves = K // BW, 0
    for g0 in range(0, M, 16):
        for p in range(8):
            r0, r1 = g0 + p, g0 + p + 8
            for _ in range(max_moves):
                k0 = kept[r0].reshape(nb, BW).any(-1)
                A0 = [j for j in range(nb) if not k0[j]]  # pruned by r0, kept by r1
                A1 = [j for j in range(nb) if k0[j]]
                if not A0 or not A1:
                    break
                P0, P1 = (~kept[r0]).nonzero().squeeze(1), (~kept[r1]).nonzero().squeeze(1)
                D = pair_terms(C, W0[r0], P0, A0, A1) + pair_terms(C, W0[r1], P1, A1, A0).T
                if float(D.min()) >= -1e-12:
                    break
                ia, ib = divmod(int(D.argmin()), D.shape[1])
                a, b = A0[ia], A1[ib]
                kept[r0, a * BW:(a + 1) * BW], kept[r0, b * BW:(b + 1) * BW] = True, False
                kept[r1, b * BW:(b + 1) * BW], kept[r1, a * BW:(a + 1) * BW] = True, False
                moves += 1
    return moves


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="how many of the MiniLM default layers")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (2 sweeps, pair moves)")
    a = ap.parse_args(argv)
    import real_layers

    for name, (W0, H) in real_layers.minilm_layers(real_layers.DEFAULT_LAYERS[: a.layers]).items():
        W = torch.nn.Parameter(W0.clone())
        scope, nnz = patterns.by_name("block16", W)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            StructuredOBS(scope, H).prune_true_obs(nnz)
        errors = [output_error(W.detach(), W0, H)]
        C, _ = damped_inverse(H.to(F64), 1e-4, dtype=F64, what="C")
        for _ in range(a.rounds):
            refine_mask(scope, H, nnz, W0, sweeps=2)
            kept = W.detach() != 0
            moves = pair_moves(C, W0.to(F64), kept)
            W.data.copy_(torch.where(kept, W0, torch.zeros_like(W0)))
            refine_mask(scope, H, nnz, W0, sweeps=0)  # the optimal weights of the new mask
            errors.append(output_error(W.detach(), W0, H))
            print(f"{name} block16: round error {errors[-1]:.4f} ({moves} pair moves)", flush=True)
            if moves == 0:
                break
        print(f"{name} block16: True OBS {errors[0]:.4f} -> {errors[-1]:.4f} "
              f"({100 * (1 - errors[-1] / errors[0]):.1f}% below)", flush=True)


if __name__ == "__main__":
    main()
