"""Lab: True OBS scoring on a 2:4 layer — independent, joint, and a hybrid (independent unless the independent
choice's exact pair cost is above tau times the scope's best pair cost, then the best pair).

A plain prototype (not the library): per-row OBS with ng = 1, fp64, all rows of a layer batched, one Schur
step per scope. Layers: the ill-conditioned layer of seed 1448958295 (a duplicated outlier channel in one
scope, where independent scoring loses to OBD), two other seeds, and the real 384x384 MiniLM layers.

    python benchmarks/lab/true_obs_scoring.py        (CPU, about 5 minutes; needs the real-layer fixture)

Measured 2026-12-06 (CPU, 2 threads), output error (switched scopes):
    ill 1448958295  independent 0.2158  joint 0.1192  hybrid tau=2 0.1191 (55)  tau=4 0.1191 (54)
    ill 1           independent 0.1412  joint 0.1386  hybrid tau=2 0.1382 (38)  tau=4 0.1383 (33)
    ill 2           independent 0.1582  joint 0.1566  hybrid tau=2 0.1567 (32)  tau=4 0.1569 (23)
    L0 query        independent 0.1539  joint 0.1549  hybrid tau=2 0.1541 (27)  tau=4 0.1539 (0)
    L5 attn output  independent 0.1232  joint 0.1223  hybrid tau=2 0.1232 (2)   tau=4 0.1232 (0)

Now in the library as ``prune_true_obs(scoring="hybrid", hybrid_tau=4.0)`` (not the default: at ng = 64 it is
0.67 % worse than independent on the L2 intermediate layer at 2:4; docs/performance.md).
"""
import itertools
import sys
import time
import warnings

import torch

warnings.simplefilter("ignore")
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))
torch.set_num_threads(2)
from pruner_utils import make_ill_conditioned_layer
from real_layers import minilm_layers, short_name
from s3sparse.pruners import output_error

PAIRS = list(itertools.combinations(range(4), 2))

def true_obs(W0, H, mode, tau=2.0, damp=1e-4):
    M, K = W0.shape
    Hd = H.double()
    C0 = torch.linalg.inv(Hd + damp * Hd.diagonal().mean() * torch.eye(K, dtype=torch.float64))
    C = C0.expand(M, K, K).clone()
    W = W0.double().clone()
    ar = torch.arange(M)
    switched = 0
    for t in range(K // 4):
        cols = torch.arange(4 * t, 4 * t + 4)
        w = W[:, cols]                                   # M x 4
        Cs = C[:, cols][:, :, cols]                      # M x 4 x 4
        score = w ** 2 / torch.diagonal(Cs, dim1=1, dim2=2)
        ind = torch.sort(torch.argsort(score, dim=1)[:, :2], dim=1).values    # pruned pair, M x 2
        costs = []
        for (a, b) in PAIRS:
            P = torch.tensor([a, b])
            wp = w[:, P].unsqueeze(-1)
            Cpp = Cs[:, P][:, :, P]
            costs.append((wp.transpose(1, 2) @ torch.linalg.solve(Cpp, wp)).flatten())
        costs = torch.stack(costs, 1)                    # M x 6
        pair_index = {p: i for i, p in enumerate(PAIRS)}
        ind_i = torch.tensor([pair_index[(int(a), int(b))] for a, b in ind.tolist()])
        j_ind = costs[ar, ind_i]
        best_i = costs.argmin(1)
        if mode == "joint":
            chosen = best_i
        elif mode == "hybrid":
            take = j_ind > tau * costs[ar, best_i]
            switched += int(take.sum())
            chosen = torch.where(take, best_i, ind_i)
        else:
            chosen = ind_i
        P = torch.tensor(PAIRS)[chosen] + 4 * t          # M x 2 columns
        CPP = C[ar[:, None, None], P[:, :, None], P[:, None, :]]       # M x 2 x 2
        CP = C[ar[:, None], P]                                           # M x 2 x K
        X = torch.linalg.solve(CPP, CP)                                  # M x 2 x K
        wP = W[ar[:, None], P]                                           # M x 2
        W -= (wP.unsqueeze(1) @ X).squeeze(1)
        C -= CP.transpose(1, 2) @ X
        W[ar[:, None], P] = 0.0
    return W.float(), switched

def report(label, W0, H, taus=(2.0, 4.0)):
    res = {}
    for mode in ("independent", "joint"):
        W, _ = true_obs(W0, H, mode); res[mode] = output_error(W, W0, H)
    for tau in taus:
        W, sw = true_obs(W0, H, "hybrid", tau); res[f"hybrid{tau:g}"] = output_error(W, W0, H); res[f"sw{tau:g}"] = sw
    print(label, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}, flush=True)

def main() -> None:
    W0, H = make_ill_conditioned_layer(64, 512, 520, 1448958295)
    report("ill 1448958295", W0, H)
    for s in (1, 2):
        W0, H = make_ill_conditioned_layer(64, 512, 520, s); report(f"ill {s}", W0, H)
    layers = minilm_layers()
    for name, (W0, H) in layers.items():
        if W0.shape[0] * W0.shape[1] > 384 * 384: continue
        t = time.time(); report(short_name(name), W0, H); print(f"  {time.time()-t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
