"""Probe: the bf16 packed_linear case that came out double-rounded on an H200.

``tests/test_op_packed.py::test_packed_linear_matches_oracle[cuda-bfloat16-subsets]`` with
``S3SPARSE_TEST_SEED=1375462347`` and ``S3SPARSE_PACKED_CUDA_PATH=mma``, trial 5 (a 6×80
'random' pattern, blocks of 5, 1 token, a bias, row_group=0): the GPU's outputs equal
``round(round(x Wᵀ) + b)`` in bf16, one rounding too many. The host emulator computes
it with one rounding. This replays the test's cases with its seeding and prints, per
kernel path (``S3SPARSE_PACKED_CUDA_PATH`` is read once per process, so each path runs
in its own process), every output that is off, and whether it is the double-rounded value.

    python benchmarks/lab/bf16_bias_probe.py            # on a GPU machine, PYTHONPATH at the checkout
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def replay(seed: int, device: str) -> None:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import test_op_packed as t
    from conftest import seed_everything

    from s3sparse import ops
    from s3sparse import reference as ref

    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False  # as the test's fixture
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    dtype = torch.bfloat16
    seed_everything(seed)
    rng = random.Random(seed)
    path = os.environ.get("S3SPARSE_PACKED_CUDA_PATH", "auto")
    for trial in range(10):
        W, p = t.packed_case(rng, dtype, device, "subsets")
        M, K = p.shape
        lead = rng.choice(t.LEADING)
        x = torch.randn(*lead, K, dtype=torch.float64).to(dtype=dtype, device=device)
        bias = torch.randn(M, dtype=torch.float64).to(dtype=dtype, device=device) if rng.random() < 0.5 else None
        args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in t._args(p)]
        want = ref.packed_linear(x.cpu(), *args, M, p.row_group, None if bias is None else bias.cpu())
        for rg in (p.row_group, 0):
            got = ops.packed_linear(x, *t._args(p), M, rg, bias).cpu()
            bound = t._linear_bound(x.reshape(-1, K), W, want.reshape(-1, M), dtype).reshape(want.shape)
            off = (got.double() - want.double()).abs() > bound
            if bool(off.any()):
                prod = torch.nn.functional.linear(x.cpu().double(), W.cpu().double()).to(dtype).double()
                twice = (prod + (bias.cpu().double() if bias is not None else 0.0)).to(dtype)
                print(f"path={path} trial={trial} row_group={rg} lead={lead} bias={bias is not None} {p}: "
                      f"{int(off.sum())} off; equal to the double-rounded value: {bool(torch.equal(got[off], twice[off]))}")
    print(f"path={path}: done")


def main() -> None:
    seed = int(os.environ.get("SEED", "1375462347"))
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        replay(seed, "cuda")
        return
    for path in ("", "stream", "mma", "expand"):
        env = dict(os.environ, S3SPARSE_PACKED_CUDA_PATH=path) if path else {
            k: v for k, v in os.environ.items() if k != "S3SPARSE_PACKED_CUDA_PATH"}
        subprocess.run([sys.executable, __file__, "--child"], env=env, check=False)


if __name__ == "__main__":
    main()
