"""Forms of a symmetric positive definite inverse timed on one device (issues 16 and 19 lab).

refine_mask inverts every row's ``C_PP`` (a batch of p × p, float64) when it loads a chunk of
rows, and True OBS / refine_mask invert ``H + λI`` (one K × K) once a layer; on an H100 the
batched ``cholesky_inverse`` of 8 × 4864² took most of a chunk's setup (refine profile). Each
form below: the median of ``--reps`` timed calls after one warm-up, and its residual
``max |A X − I|``. Plain torch: runs with any s3sparse build (none is imported).

    python benchmarks/lab/spd_inverse_forms.py --device cuda --out spd.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, time_eager  # noqa: E402


def chol_inv(A):
    return torch.cholesky_inverse(torch.linalg.cholesky_ex(A)[0])


def chol_trinv(A):
    L = torch.linalg.cholesky_ex(A)[0]
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    Li = torch.linalg.solve_triangular(L, eye, upper=False)
    return Li.mT @ Li


def chol_solve(A):
    L = torch.linalg.cholesky_ex(A)[0]
    return torch.cholesky_solve(torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A), L)


def lu_inv(A):
    return torch.linalg.inv_ex(A)[0]


def looped(form):
    def run(A):
        if A.dim() == 2:
            return form(A)
        return torch.stack([form(a) for a in A])
    return run


FORMS = {
    "chol_inv": chol_inv, "chol_trinv": chol_trinv, "chol_solve": chol_solve, "lu_inv": lu_inv,
    "loop_chol_inv": looped(chol_inv), "loop_chol_trinv": looped(chol_trinv), "loop_lu_inv": looped(lu_inv),
}


def spd(batch: int, n: int, dtype, device) -> torch.Tensor:
    """A batch of well-conditioned-but-not-trivial SPD matrices (a Gram matrix of 2n samples, damped)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    X = torch.randn(batch, 2 * n, n, generator=g, dtype=torch.float64).to(device)
    A = X.mT @ X / (2 * n)
    A += 1e-2 * torch.eye(n, dtype=A.dtype, device=device)
    return A.to(dtype)


def timed(fn, A, reps: int, device: torch.device):
    out = fn(A)  # warm-up (kernels, libraries, workspaces)
    sec = time_eager([lambda: fn(A)], device, 1, reps)["seconds"]
    eye = torch.eye(A.shape[-1], dtype=torch.float64, device=A.device)
    resid = float((A.double() @ out.double() - eye).abs().amax())
    return sec, resid


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cases", nargs="+", default=["1x9728:float64", "1x9728:float32", "8x4864:float64"],
                    help="BATCHxN:dtype")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    rows = []
    print(f"{'case':18s} {'form':16s} {'seconds':>9s} {'max|AX-I|':>10s}", flush=True)
    for case in a.cases:
        shape, dt = case.split(":")
        b, n = (int(v) for v in shape.split("x"))
        A = spd(b, n, getattr(torch, dt), dev)
        if b == 1:
            A = A[0]
        for form in a.forms:
            if form.startswith("loop") and b == 1:
                continue
            try:
                sec, resid = timed(FORMS[form], A, a.reps, dev)
            except RuntimeError as e:  # (out of memory, a missing kernel: say so and go on)
                print(f"{case:18s} {form:16s} failed: {str(e).splitlines()[0][:80]}", flush=True)
                continue
            rows.append(dict(case=case, form=form, seconds=sec, residual=resid))
            print(f"{case:18s} {form:16s} {sec:9.4f} {resid:10.2e}", flush=True)
        del A
        if cuda:
            torch.cuda.empty_cache()
    if a.out:
        Path(a.out).write_text(json.dumps(dict(environment=environment(dev), rows=rows), indent=1))


if __name__ == "__main__":
    main()
