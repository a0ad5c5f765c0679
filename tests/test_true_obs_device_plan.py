"""True OBS's device plan (issue 16, item 4: the CPU must not pay for the GPU design).

The sweep's only device-dependent choices are :class:`DevicePlan`'s: where the factors
U live (fp16 on CUDA; fp32 holding the same fp16-rounded values on CPU, whose BLAS has
no fp16 GEMM), whether U_b is formed by hi/lo half products, and the memory budget
that sizes the row chunks. Every plan must give the same pruned weight to fp32
round-off; the chunk planning must respect the budget it is given.
"""

from __future__ import annotations

import pytest
import torch

from pruner_utils import make_layer, pattern
from s3sparse.pruners.hessian import damped_inverse
from s3sparse.pruners.obs_layer import OBSLayer
from s3sparse.pruners.true_obs import TrueOBSOptions, _auto_chunk_rows, _schedule
from s3sparse.pruners.true_obs_sweep import ChunkSweep, DevicePlan, ScaledInverse

HALF = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("c_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_the_cpu_plan_holds_half_factors_in_fp32_and_cuda_keeps_them_half(c_dtype):
    cpu = DevicePlan.for_device(torch.device("cpu"), c_dtype)
    cuda = DevicePlan.for_device(torch.device("cuda"), c_dtype)  # a plan only: no GPU needed
    math = torch.float64 if c_dtype == torch.float64 else torch.float32
    assert cpu.store_dtype == math
    assert cuda.store_dtype == c_dtype
    assert cpu.factor_budget_bytes < cuda.factor_budget_bytes


def _sweep(name: str, c_dtype: torch.dtype, device_plan: DevicePlan, seed: int, ng: int):
    W, _, H = make_layer(32, 128, 512, seed)
    scope, nnz = pattern(name, W)
    layer = OBSLayer(scope, H)
    options = TrueOBSOptions(ng=ng, c_dtype=c_dtype)
    Wk = layer.working_copy()
    s = _schedule(layer, Wk, layer.num_prune(nnz), options)
    C0 = damped_inverse(layer.hessian, options.damp, dtype=torch.float64, what="H + damp*I")[0]
    math = torch.float64 if c_dtype == torch.float64 else torch.float32
    inv = ScaledInverse.of(C0.to(math), math, s.plan.order)
    g = layer.groups
    sweep = ChunkSweep(layer, Wk[g.rows.reshape(-1)], s.batches, s.nnz, s.scoring, s.subsets, inv, c_dtype, s.plan,
                       device_plan)
    Wc, failed = sweep.run()
    assert not failed.any()
    return Wc, sweep


@pytest.mark.parametrize("name,ng", [("24", 4), ("48", 4), ("block16", 1)])
@pytest.mark.parametrize("c_dtype", HALF, ids=str)
def test_the_cpu_plan_gives_the_gpu_plans_result(name, ng, c_dtype, seed):
    """The GPU plan (half factors) run on the CPU against the CPU plan:
    the same mask, the same weights to round-off, and the CPU plan's factors are exactly
    values of c_dtype held in fp32."""
    gpu_plan = DevicePlan(store_dtype=c_dtype, factor_budget_bytes=4 << 30)
    cpu_plan = DevicePlan.for_device(torch.device("cpu"), c_dtype)
    W_gpu, s_gpu = _sweep(name, c_dtype, gpu_plan, seed, ng)
    W_cpu, s_cpu = _sweep(name, c_dtype, cpu_plan, seed, ng)
    assert s_gpu.U.dtype == c_dtype and s_cpu.U.dtype == torch.float32
    for b, s0 in enumerate(s_cpu.plan.start):  # the factors written: rows [start[b], Kc) of batch b's columns
        U_b = s_cpu.U[:, s0:, b * s_cpu.P : (b + 1) * s_cpu.P]
        assert torch.equal(U_b, U_b.to(c_dtype).float())  # rounded to c_dtype, stored wider
    # The same mask, but for near-ties: a c_dtype rounding of a factor can tip which of two
    # almost equal choices a scope makes (bf16, about 1 seed in 12: 2-4 of 4096 elements; the
    # rest of that row then follows another path). Such rows are few; every other row agrees.
    differ = (W_cpu == 0) != (W_gpu == 0)
    assert int(differ.sum()) <= W_gpu.numel() // 400, f"{int(differ.sum())} mask elements differ"
    same_rows = ~differ.any(1)
    assert int((~same_rows).sum()) <= 1 + (c_dtype == torch.bfloat16)
    # the factors differ by one c_dtype rounding where the product's fp32 round-off tips it
    tol = 2e-3 if c_dtype == torch.float16 else 2e-2
    torch.testing.assert_close(W_cpu[same_rows], W_gpu[same_rows], rtol=tol, atol=tol * W_gpu.abs().max().item())


def test_the_cpu_plan_matches_fp64_as_closely_as_the_gpu_plan(seed):
    """Quality: both plans' output errors are the fp64 result's to within 1%."""
    def err(Wp, W0, H):
        D = (Wp - W0).double()
        return torch.einsum("ij,jk,ik->", D, H.double(), D).item()

    W0, _, H = make_layer(32, 128, 512, seed)
    W0r = W0.clone()
    scope, nnz = pattern("24", W0r)
    layer = OBSLayer(scope, H)
    W_cpu, _ = _sweep("24", torch.float16, DevicePlan.for_device(torch.device("cpu"), torch.float16), seed, 4)
    W_gpu, _ = _sweep("24", torch.float16, DevicePlan(torch.float16, 4 << 30), seed, 4)
    W_64, _ = _sweep("24", torch.float64, DevicePlan.for_device(torch.device("cpu"), torch.float64), seed, 4)
    rows = layer.groups.rows.reshape(-1)
    ref = W0[rows]
    e64 = err(W_64, ref, H)
    assert abs(err(W_cpu, ref, H) - e64) <= 0.01 * e64
    assert abs(err(W_gpu, ref, H) - e64) <= 0.01 * e64


@pytest.mark.parametrize("budget_mib", [1, 4, 16])
def test_chunk_rows_respect_the_device_plans_budget(budget_mib, seed):
    W, _, H = make_layer(512, 256, 512, seed)
    scope, nnz = pattern("24", W)
    layer = OBSLayer(scope, H)
    s = _schedule(layer, layer.working_copy(), layer.num_prune(nnz), TrueOBSOptions())
    budget = budget_mib << 20
    plan = DevicePlan(store_dtype=torch.float32, factor_budget_bytes=budget)
    rows = _auto_chunk_rows(layer, s.plan, plan)
    per_row = s.plan.bytes_per_group(torch.float32, 1)
    assert 1 <= rows <= layer.M
    assert rows == layer.M or rows * per_row <= max(budget, 32 * per_row)
    # more budget, never fewer rows; fp16 storage fits twice the factors
    more = _auto_chunk_rows(layer, s.plan, DevicePlan(torch.float32, 4 * budget))
    half = _auto_chunk_rows(layer, s.plan, DevicePlan(torch.float16, budget))
    assert more >= rows and half >= rows


def test_the_cpu_default_chunks_a_layer_whose_factors_exceed_the_budget(seed):
    """On CPU the default schedule holds at most ~256 MiB of factors: a layer needing
    more is swept in several chunks (and the result is the one chunk's)."""
    W, _, H = make_layer(256, 1024, 2048, seed)
    scope, nnz = pattern("24", W)
    layer = OBSLayer(scope, H)
    s = _schedule(layer, layer.working_copy(), layer.num_prune(nnz), TrueOBSOptions())
    per_row = s.plan.bytes_per_group(s.device_plan.store_dtype, 1)
    assert s.device_plan == DevicePlan.for_device(torch.device("cpu"), torch.float16)
    assert per_row * layer.M > s.device_plan.factor_budget_bytes  # all rows would not fit
    assert s.groups_per_chunk < layer.M
    assert s.groups_per_chunk * per_row <= max(s.device_plan.factor_budget_bytes, 32 * per_row)


@pytest.mark.parametrize("name,opts", [("24", {}), ("48", {"order": "largest_first"}), ("coupled24", {}),
                                       ("block16", {"scoring": "joint"}), ("24", {"ng": 3})])
def test_no_factor_entry_is_read_before_it_is_written(name, opts, monkeypatch, seed):
    """U is allocated uninitialised (zeroing it was ~10% of a CPU sweep): a NaN-filled U
    must give the same pruned weight bit for bit."""
    import warnings

    from s3sparse import TrueOBS
    from s3sparse.pruners import true_obs_sweep

    def pruned():
        W = make_layer(32, 128, 256, seed)[0]
        scope, nnz = pattern(name, W)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            TrueOBS(chunk_size=7, **opts).prune(scope, make_layer(32, 128, 256, seed)[2], nnz)
        return W

    clean = pruned()
    init = true_obs_sweep.ChunkSweep.__init__

    def poisoned(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.U.fill_(float("nan"))

    monkeypatch.setattr(true_obs_sweep.ChunkSweep, "__init__", poisoned)
    assert torch.equal(pruned(), clean)
