"""Prune one synthetic layer to each reference pattern with every pruner.

    python examples/demo.py [--rows 256] [--cols 1024] [--device cpu]

Prints, per pattern and pruner, the relative output error
sqrt(tr(dW H dWᵀ) / tr(W H Wᵀ)) and the time, and checks that the pattern holds.
"""

from __future__ import annotations

import argparse
import time

import torch

import s3sparse
from s3sparse import patterns
from s3sparse.pruners import (
    StructuredOBS,
    compute_hessian,
    output_error,
    prune_magnitude,
    prune_obd,
    prune_sparsegpt,
)


def correlated_inputs(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Calibration inputs with correlated features and uneven scales, like real activations."""
    mix = torch.eye(k) + 0.4 * torch.randn(k, k, generator=generator) / k**0.5
    scales = torch.rand(k, generator=generator) * 2 + 0.1
    return (torch.randn(n, k, generator=generator) @ mix) * scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    W0 = torch.randn(args.rows, args.cols, generator=gen).to(args.device)
    H = compute_hessian(correlated_inputs(args.samples, args.cols, gen).to(args.device))
    print(f"s3sparse {s3sparse.__version__}  build {s3sparse.build_info()}")
    print(f"layer {args.rows}x{args.cols} on {args.device}, {args.samples} calibration samples\n")

    pruners = {
        "magnitude": lambda scope, nnz: prune_magnitude(scope, nnz),
        "OBD": lambda scope, nnz: prune_obd(scope, H, nnz),
        "SparseGPT": lambda scope, nnz: prune_sparsegpt(scope, H, nnz),
        "True OBS": lambda scope, nnz: StructuredOBS(scope, H).prune_true_obs(nnz),
    }
    print(f"{'pattern':<14}{'pruner':<12}{'output error':>14}{'time (s)':>10}  pattern holds")
    for name in patterns.PATTERNS:
        for pruner_name, prune in pruners.items():
            W = torch.nn.Parameter(W0.clone())
            scope, nnz = patterns.by_name(name, W)
            start = time.perf_counter()
            prune(scope, nnz)
            if W.is_cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            kept = (scope.block_norms() > 0).sum(dim=-1)
            holds = bool((kept <= nnz).all())
            err = output_error(W.detach(), W0, H)
            print(f"{name:<14}{pruner_name:<12}{err:>14.4f}{seconds:>10.2f}  {holds}")


if __name__ == "__main__":
    main()
