"""Kernel-level breakdown of one schur_update_ call (torch.profiler), for tuning.

    python benchmarks/profile_schur.py [--rows 64] [--cols 9728] [--pruned 128]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from s3sparse import ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=9728)
    parser.add_argument("--pruned", type=int, default=128)
    args = parser.parse_args()
    B, K, P = args.rows, args.cols, args.pruned
    dev = torch.device("cuda")
    X = torch.randn(K, 2 * K, device=dev)
    H = X @ X.T / (2 * K) + 0.1 * torch.eye(K, device=dev)
    C0 = torch.cholesky_inverse(torch.linalg.cholesky(H))
    d = C0.diagonal().sqrt()
    C0 = (C0 / d[:, None] / d[None, :]).half()
    C = C0.expand(B, K, K).contiguous()
    w = torch.randn(B, K, device=dev)
    pruned = torch.stack([torch.randperm(K, device=dev)[:P] for _ in range(B)])
    for _ in range(2):
        ops.schur_update_(w, C, pruned)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            ops.schur_update_(w, C, pruned)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
