"""The lowrank_sub op (``base - a @ b.mT``, the panel product of left-looking True OBS)
against its oracle, on CPU, CUDA and (fp32/fp64 only: the emulator runs on CPU
tensors, whose BLAS has no fp16 GEMM with fp32 output) the CUDA host emulator."""

from __future__ import annotations

import os

import pytest
import torch

from s3sparse import ops
from s3sparse import reference as ref

EMU_LIB = os.environ.get("S3SPARSE_CUDA_EMU")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
if EMU_LIB:
    DEVICES.append(pytest.param("emu", id="cuda_emu"))


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    if request.param == "emu":
        torch.ops.load_library(EMU_LIB)
        monkeypatch.setattr(ops, "_ops", torch.ops.s3emu)
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
