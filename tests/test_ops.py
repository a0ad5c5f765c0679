"""Every s3sparse operator against its oracle in s3sparse.reference.

Each test draws fresh random inputs from the seed conftest.py gives every test
(the ``seed`` fixture; printed in the report of a failing test and in the
messages below; set S3SPARSE_TEST_SEED=<seed> to replay one). Tests run on the CPU
kernels and, where a GPU is present, on the CUDA kernels (the `cuda` marker).

S3SPARSE_CUDA_EMU=<library> (built by tools/cuda_emu/build.sh) adds a third
device, `cuda_emu`: the CUDA host code and kernels compiled as C++ against a
host emulator, run on CPU tensors. It is a development check for machines
without a GPU and is never on by default.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

import s3sparse
from s3sparse import ops
from s3sparse import reference as ref
from emu_utils import EMU_LIB, use_emulator

HAS_CUDA = torch.cuda.is_available()

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
ACC_FLOATS = [torch.float32, torch.float64]

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
if EMU_LIB:
    DEVICES.append(pytest.param("emu", id="cuda_emu"))
# Devices with real kernels registered under torch.ops.s3sparse (opcheck, compile).
REAL_DEVICES = DEVICES[:2]


def _dtype_id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The torch device of the inputs ("cpu" for the emulator)."""
    if request.param == "emu":
        use_emulator(monkeypatch)
        return "cpu"
    return request.param


def _is_emu() -> bool:
    return ops._ops is not torch.ops.s3sparse


# ---------------------------------------------------------------- comparison helpers
def assert_close(actual, expected, rtol, atol, msg):
    """|actual - expected| <= atol + rtol * |expected| elementwise (atol may be a
    tensor broadcasting against them); NaN and +-inf must match exactly."""
    a = actual.detach().cpu().to(torch.float64)
    e = expected.detach().cpu().to(torch.float64)
    assert a.shape == e.shape, f"{msg}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(a.isnan(), e.isnan()), f"{msg}: NaN positions differ\n{a}\n{e}"
    fin_e = torch.isfinite(e)
    special = ~fin_e & ~e.isnan()
    assert torch.equal(a[special], e[special]), f"{msg}: infinities differ"
    assert torch.equal(torch.isfinite(a), fin_e), f"{msg}: finiteness differs\n{a}\n{e}"
    atol_t = torch.as_tensor(atol, dtype=torch.float64).expand(e.shape)
    err = (a - e).abs()
    bound = atol_t + rtol * e.abs()
    bad = fin_e & (err > bound)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{msg}: {int(bad.sum())} of {e.numel()} elements out of tolerance; first at {i}: "
            f"got {a[tuple(i)].item()!r}, expected {e[tuple(i)].item()!r}, bound {bound[tuple(i)].item()!r}"
        )


def assert_bitwise(actual, expected, msg):
    a, e = actual.detach().cpu(), expected.detach().cpu()
    assert a.dtype == e.dtype and a.shape == e.shape, f"{msg}: {a.dtype}{tuple(a.shape)} vs {e.dtype}{tuple(e.shape)}"
    if a.is_floating_point():
        same = (a == e) | (a.isnan() & e.isnan())
        # -0.0 == 0.0 above: compare the signs of zeros too (not of NaNs).
        same &= (torch.signbit(a) == torch.signbit(e)) | a.isnan()
    else:
        same = a == e
    assert bool(same.all()), f"{msg}: {int((~same).sum())} elements differ\n{a}\n{e}"


# Rounding of one output value / relative accumulation error, per storage dtype.
OUT_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-14}
ACC_RTOL = {torch.float16: 3e-5, torch.bfloat16: 3e-5, torch.float32: 3e-5, torch.float64: 1e-12}


# ---------------------------------------------------------------- strided block views
M16, K16 = 32, 48  # a layer of M x K for the 16-column views (K multiple of 16)

# (id, x shape, size, stride, offset, blocks, overlapping)
VIEWS = [
    ("1d", (37,), [36], [1], 1, [[1], [4], [9], [36]], False),
    ("rows", (6, 32), [6, 32], [32, 1], 0, [[1, 4], [2, 8], [3, 1], [1, 32], [6, 32]], False),
    ("cols", (6, 32), [32, 6], [1, 32], 0, [[4, 2], [32, 1], [1, 6]], False),
    ("odd", (7, 9), [7, 9], [9, 1], 0, [[7, 1], [1, 3], [7, 9]], False),
    # Coupled 2:4: each 16-column group of a row as (8, 2), pairing columns a and a + 8.
    ("coupled24", (M16, K16), [M16, K16 // 16, 8, 2], [K16, 16, 1, 8], 0,
     [[1, 1, 1, 2], [1, 1, 4, 2], [1, 1, 8, 2], [2, 3, 4, 1]], False),
    # 16-row groups as two halves of 8 rows, each half flattened (8 K elements).
    ("rowgroups16", (M16, K16), [M16 // 16, 2, 8 * K16], [16 * K16, 8 * K16, 1], 0,
     [[1, 1, 8], [1, 2, 16], [2, 1, K16], [1, 1, 8 * K16]], False),
    ("gaps", (120,), [5, 7], [11, 1], 3, [[5, 1], [1, 7], [5, 7]], False),
    ("stride2", (80,), [4, 6], [13, 2], 2, [[2, 3], [4, 2], [1, 1]], False),
    ("4d", (300,), [2, 3, 4, 5], [130, 40, 9, 1], 4, [[1, 3, 2, 5], [2, 1, 4, 1], [1, 1, 1, 1], [2, 3, 4, 5]], False),
    # Long blocks: a warp per block (17..4096 elements) and a thread block per block (> 4096) on CUDA.
    ("long", (4, 5000), [4, 5000], [5000, 1], 0, [[1, 100], [4, 8], [1, 5000], [2, 2500]], False),
    ("size1", (1,), [1], [1], 0, [[1]], False),
    ("empty", (8,), [0, 4], [4, 1], 0, [[1, 4], [1, 2]], False),
    ("empty_inner", (8,), [3, 0], [2, 1], 0, [[1, 1], [3, 1]], False),
    ("scalar", (5,), [], [], 2, [[]], False),
    ("broadcast", (10,), [3, 4], [0, 1], 1, [[3, 2], [1, 4]], True),
]
VIEW_IDS = [v[0] for v in VIEWS]

REDUCES = [("norm", 2.0), ("norm", 1.0), ("norm", 3.0), ("norm", 0.5), ("norm", math.inf), ("min", 2.0), ("max", 2.0), ("sum", 2.0)]


def _reduce_bound(x, size, stride, offset, block, reduce, p, expected, dtype):
    """Tolerance of one block_reduce output: accumulation error relative to the
    block's magnitude plus the rounding of the output."""
    if reduce in ("min", "max") or (reduce == "norm" and math.isinf(p)):
        return torch.zeros(expected.shape, dtype=torch.float64)  # exact
    if reduce == "sum":
        scale = ref.block_reduce(x.abs(), size, stride, offset, block, "sum").double()
        return ACC_RTOL[dtype] * scale.nan_to_num(posinf=0.0)
    scale = expected.double().abs().nan_to_num(posinf=0.0)
    return ACC_RTOL[dtype] * max(1.0, 1.0 / p) * scale


@pytest.mark.parametrize("dtype", FLOATS, ids=_dtype_id)
@pytest.mark.parametrize("view", VIEWS, ids=VIEW_IDS)
def test_block_reduce(device, seed, dtype, view):
    name, xshape, size, stride, offset, blocks, _ = view
    x = (3 * torch.randn(xshape, dtype=torch.float64)).to(dtype)
    xd = x.to(device)
    for block, (reduce, p) in itertools.product(blocks, REDUCES):
        msg = f"seed={seed} view={name} block={block} reduce={reduce} p={p} dtype={dtype}"
        out = ops.block_reduce(xd, size, stride, offset, block, reduce, p)
        exp = ref.block_reduce(x, size, stride, offset, block, reduce, p)
        assert out.dtype == dtype and out.device.type == xd.device.type, msg
        atol = _reduce_bound(x, size, stride, offset, block, reduce, p, exp, dtype)
        assert_close(out, exp, OUT_RTOL[dtype], atol, msg)


@pytest.mark.parametrize("dtype", FLOATS, ids=_dtype_id)
def test_block_reduce_nan_inf(device, seed, dtype):
    # Blocks of 8 along rows: NaN poisons min / max / every norm / sum; inf wins max and norms.
    x = torch.randn(4, 32, dtype=torch.float64).to(dtype)
    x[0, 3] = math.nan
    x[1, 9] = math.inf
    x[2, 17] = -math.inf
    x[3, 0] = math.nan
    x[3, 1] = math.inf
    xd = x.to(device)
    for block in ([1, 8], [2, 16], [4, 32]):
        for reduce, p in REDUCES:
            msg = f"seed={seed} block={block} reduce={reduce} p={p}"
            out = ops.block_reduce(xd, [4, 32], [32, 1], 0, block, reduce, p)
            exp = ref.block_reduce(x, [4, 32], [32, 1], 0, block, reduce, p)
            atol = _reduce_bound(x, [4, 32], [32, 1], 0, block, reduce, p, exp, dtype)
            assert_close(out, exp, OUT_RTOL[dtype], atol.nan_to_num(0.0), msg)


SCALE_KINDS = ["float", "bool", "half", "double"]


@pytest.mark.parametrize("dtype", FLOATS, ids=_dtype_id)
@pytest.mark.parametrize("view", [v for v in VIEWS if not v[6]], ids=[v[0] for v in VIEWS if not v[6]])
def test_block_scale(device, seed, dtype, view):
    name, xshape, size, stride, offset, blocks, _ = view
    x = (3 * torch.randn(xshape, dtype=torch.float64)).to(dtype)
    flat = x.view(-1)
    if flat.numel() >= 3:  # a zero factor writes exact zeros even over inf / NaN
        flat[0], flat[-1], flat[flat.numel() // 2] = math.nan, math.inf, -math.inf
    for block, kind in itertools.product(blocks, SCALE_KINDS):
        msg = f"seed={seed} view={name} block={block} scale={kind} dtype={dtype}"
        grid = [s // b for s, b in zip(size, block)]
        f = torch.randn(grid, dtype=torch.float64)
        u = torch.rand(grid)
        f = torch.where(u < 0.3, torch.zeros_like(f), torch.where(u < 0.5, torch.ones_like(f), f))
        scale = {"float": f.float(), "bool": u >= 0.4, "half": f.half(), "double": f}[kind]
        got = x.clone().to(device)
        assert ops.block_scale_(got, size, stride, offset, block, scale.to(device)) is None
        exp = x.clone()
        ref.block_scale_(exp, size, stride, offset, block, scale)
        assert_bitwise(got, exp, msg)


# ---------------------------------------------------------------- kth_largest
KTH_SHAPES = [(1,), (7,), (5, 4), (3, 8), (2, 3, 16), (4, 64), (6, 129), (3, 1000), (0, 5), (4, 0)]


def _kth_input(shape, mode, dtype):
    if mode == "randn":
        x = torch.randn(shape, dtype=torch.float64)
    else:  # integers: many ties
        x = torch.randint(-3, 4, shape).to(torch.float64)
        if mode == "special" and x.numel() > 0:
            flat = x.view(-1)
            n = flat.numel()
            pos = torch.randint(0, n, (max(1, n // 5),))
            vals = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0], dtype=torch.float64)
            flat[pos] = vals[torch.randint(0, 5, pos.shape)]
    return x.to(dtype)


def _check_kth(x, k, device, msg):
    values, keep = ops.kth_largest(x.to(device), k)
    ev, ek = ref.kth_largest(x, k)
    assert values.dtype == x.dtype and keep.dtype == torch.bool, msg
    assert_bitwise(keep, ek, f"{msg} keep")
    assert_bitwise(values, ev, f"{msg} values")
    assert bool((keep.sum(-1) == k).all()), msg


@pytest.mark.parametrize("dtype", FLOATS, ids=_dtype_id)
@pytest.mark.parametrize("shape", KTH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kth_largest(device, seed, dtype, shape):
    n = shape[-1]
    for mode in ("randn", "ties", "special"):
        x = _kth_input(shape, mode, dtype)
        for k in sorted({0, min(1, n), n // 3, max(n - 1, 0), n}):
            _check_kth(x, k, device, f"seed={seed} shape={shape} mode={mode} k={k} dtype={dtype}")


def test_kth_largest_noncontiguous(device, seed):
    base = _kth_input((40, 6), "special", torch.float32)
    x = base.t()  # (6, 40), last dim strided
    for k in (0, 1, 17, 40):
        _check_kth(x, k, device, f"seed={seed} k={k}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=_dtype_id)
def test_kth_largest_large_n(device, seed, dtype):
    # Whole-tensor selection: a few very long rows (a thread block per row on CUDA).
    n = 20000 if _is_emu() else 300000
    x = _kth_input((2, n), "special", dtype)
    x[1] = torch.randn(n, dtype=torch.float64).to(dtype)
    for k in (1, n // 2 + 3, n):
        _check_kth(x, k, device, f"seed={seed} n={n} k={k} dtype={dtype}")


# ---------------------------------------------------------------- score_subsets
def _spd_blocks(U, E, dtype):
    X = torch.randn(U, E, 2 * E, dtype=torch.float64)
    c = X @ X.transpose(1, 2) / (2 * E) + 0.5 * torch.eye(E, dtype=torch.float64)
    return c.to(dtype)


def _subsets(E, P, limit=None):
    """All P-subsets of range(E) in lexicographic order, or `limit` random ones
    (in random order); three empty subsets for P = 0."""
    if P == 0:
        return torch.zeros((3, 0), dtype=torch.long)
    if limit is not None:
        rows, seen = [], set()
        while len(rows) < limit:  # distinct sets (equal sets would tie up to rounding), each in random order
            r = torch.randperm(E)[:P]
            if frozenset(r.tolist()) not in seen:
                seen.add(frozenset(r.tolist()))
                rows.append(r)
        return torch.stack(rows) if rows else torch.zeros((0, P), dtype=torch.long)
    return torch.tensor(list(itertools.combinations(range(E), P)), dtype=torch.long)


# (E, P, at most this many subsets): thread per (item, subset) for P <= 8 on
# CUDA, a warp per pair above (P > 32 exercises the lane loops).
# (90, 80): fp64 needs more than the default 48 KiB of shared memory per warp.
SUBSET_CASES = [(4, 2, None), (8, 4, None), (6, 1, None), (16, 12, 5), (40, 33, 3), (90, 80, 2), (5, 0, None), (4, 2, 0)]


def _assert_best_is_an_oracle_argmin(best, ecosts, rtol, atol, msg, first_of_ties=()):
    """``best[n]`` is a least-cost subset of the oracle's costs ``ecosts[n]``.

    Subsets whose oracle cost is within the rounding of the op's costs (twice the
    tolerance of the cost comparison) of the least one tie: ``best`` may be any
    of them; where only one subset is that close, ``best`` must be exactly it.
    Rows in ``first_of_ties`` have exactly tied least costs and must pick the
    first of them; a row of only +inf costs (every subset non-PD) must pick 0.
    """
    e = ecosts.detach().cpu().to(torch.float64)
    b = best.detach().cpu()
    if e.shape[1] == 0:
        assert bool((b == 0).all()), f"{msg}: no subsets, best {b.tolist()}"
        return
    for n in range(e.shape[0]):
        row = e[n]
        lo = row.min().item()
        chosen = int(b[n])
        assert 0 <= chosen < e.shape[1], f"{msg}: row {n} best {chosen} out of range"
        if n in first_of_ties or math.isinf(lo):
            first = 0 if math.isinf(lo) else int((row == lo).nonzero()[0])
            assert chosen == first, f"{msg}: row {n} of tied costs {row.tolist()} picked {chosen}, not {first}"
            continue
        near = (row <= lo + 2 * (atol + rtol * abs(lo))).nonzero().flatten().tolist()
        assert chosen in near, (
            f"{msg}: row {n} picked subset {chosen} of oracle cost {row[chosen].item()!r}; "
            f"the least is {lo!r} (subsets {near})"
        )


@pytest.mark.parametrize("wdtype", ACC_FLOATS, ids=_dtype_id)
@pytest.mark.parametrize("cdtype", FLOATS, ids=_dtype_id)
@pytest.mark.parametrize("case", SUBSET_CASES, ids=lambda c: f"E{c[0]}P{c[1]}S{c[2]}")
def test_score_subsets(device, seed, wdtype, cdtype, case):
    E, P, limit = case
    subsets = _subsets(E, P, limit)
    for shared in (True, False):
        N = 9
        U = 3 if shared else N
        c = _spd_blocks(U, E, torch.float64)
        if E > 0:
            c[1, 0, 0] = -1.0  # not PD: every subset holding element 0 costs +inf
        c = c.to(cdtype)
        w = torch.randn(N, E, dtype=wdtype)
        w[2] = 0  # all costs 0: best is the first subset
        c_index = torch.randint(0, U, (N,)) if shared else None
        if shared:
            c_index[0] = 1
        msg = f"seed={seed} E={E} P={P} S={subsets.shape[0]} shared={shared} w={wdtype} c={cdtype}"
        costs, best = ops.score_subsets(
            w.to(device), c.to(device), subsets.to(device), None if c_index is None else c_index.to(device)
        )
        ecosts, ebest = ref.score_subsets(w, c, c_index, subsets)
        assert costs.dtype == wdtype and best.dtype == torch.long, msg
        assert costs.shape == (N, subsets.shape[0]) and best.shape == (N,), msg
        rtol, atol = (2e-4, 1e-6) if wdtype == torch.float32 else (1e-10, 1e-12)
        assert_close(costs, ecosts, rtol, atol, msg)
        # best is a least-cost subset by the oracle's costs (ties within rounding
        # allowed), the first one of exactly tied costs (row 2: w = 0).
        _assert_best_is_an_oracle_argmin(best, ecosts, rtol, atol, f"{msg} best", first_of_ties=(2,) if P else range(N))
        if wdtype == torch.float64:
            assert_bitwise(best.cpu(), ebest, f"{msg} best vs oracle")


def test_score_subsets_empty(device, seed):
    w = torch.randn(0, 4)
    c = _spd_blocks(2, 4, torch.float32)
    costs, best = ops.score_subsets(w.to(device), c.to(device), _subsets(4, 2).to(device), torch.zeros(0, dtype=torch.long, device=device))
    assert costs.shape == (0, 6) and best.shape == (0,)
    w = torch.randn(1, 1)
    c = torch.full((1, 1, 1), 2.0)
    costs, best = ops.score_subsets(w.to(device), c.to(device), torch.zeros(1, 1, dtype=torch.long, device=device))
    assert_close(costs, w.cpu() ** 2 / 2, 1e-6, 0, f"seed={seed}")
    assert best.tolist() == [0]


def test_score_subsets_very_large_p(device, seed):
    # The CPU kernel takes any P; the CUDA one keeps a P x P fp64 matrix in a
    # warp's shared memory and says so when it does not fit (P = 170 > ~168).
    E = P = 170
    w = torch.randn(1, E, dtype=torch.float64)
    c = _spd_blocks(1, E, torch.float64)
    subsets = torch.arange(P).unsqueeze(0)
    if device == "cpu" and not _is_emu():
        costs, _ = ops.score_subsets(w, c, subsets)
        assert_close(costs, ref.score_subsets(w, c, None, subsets)[0], 1e-9, 0, f"seed={seed}")
    else:
        with pytest.raises(ValueError, match="shared memory"):
            ops.score_subsets(w.to(device), c.to(device), subsets.to(device))


# ---------------------------------------------------------------- sparsegpt_block_
def _upper_factor(b, dtype=torch.float32):
    """The upper Cholesky factor of (H + 0.1 I)^-1 for a random correlated H: SparseGPT's U."""
    X = torch.randn(3 * b + 8, b, dtype=torch.float64) @ (torch.eye(b, dtype=torch.float64) + 0.3 * torch.randn(b, b, dtype=torch.float64) / b**0.5)
    H = X.T @ X / X.shape[0] + 0.1 * torch.eye(b, dtype=torch.float64)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(dtype)


def _csr(starts, b):
    ptr = torch.zeros(b + 1, dtype=torch.long)
    if len(starts):
        ptr[1:] = torch.cumsum(torch.bincount(torch.as_tensor(starts, dtype=torch.long), minlength=b), 0)
    return ptr


def _regular_scopes(kind, b):
    """(starts, cols, local rows, rows per group, block_numel, nnz) of a reference pattern over b columns."""
    if kind == "24":
        cols = [[4 * t + j for j in range(4)] for t in range(b // 4)]
        return [c[0] for c in cols], cols, [[0] * 4 for _ in cols], 1, 1, 2
    if kind == "48":
        cols = [[8 * t + j for j in range(8)] for t in range(b // 8)]
        return [c[0] for c in cols], cols, [[0] * 8 for _ in cols], 1, 2, 2
    if kind == "coupled24":  # blocks {16t + i, 16t + 8 + i}, i in 0..3 and 4..7
        cols = [[16 * t + x for i in range(4 * h, 4 * h + 4) for x in (i, i + 8)] for t in range(b // 16) for h in range(2)]
        return [min(c) for c in cols], cols, [[0] * 8 for _ in cols], 1, 2, 2
    if kind == "block16":  # rows p and p + 8 (group rows 0, 1) compete for each 16-column block
        cols = [[16 * t + j for _ in range(2) for j in range(16)] for t in range(b // 16)]
        rows = [[h for h in range(2) for _ in range(16)] for _ in cols]
        return [c[0] for c in cols], cols, rows, 2, 16, 1
    raise KeyError(kind)


def _random_scopes(b, rpg, bn, nb):
    """Scopes of nb blocks of bn elements on a group of rpg rows, disjoint, each starting at
    its listed column and spread over up to 12 columns from there (any order in the table)."""
    free = {(r, c) for r in range(rpg) for c in range(b)}
    starts, cols, rows = [], [], []
    for i in range(b):
        if random.random() < 0.35:
            cand = sorted(x for x in free if i <= x[1] < i + 12)
            if len(cand) >= nb * bn:
                pick = random.sample(cand, nb * bn)
                free -= set(pick)
                starts.append(i)
                rows.append([r for r, _ in pick])
                cols.append([c for _, c in pick])
    return starts, cols, rows, free


# (id, M, b, pattern or (rows per group, block_numel, blocks per scope, nnz), row groups):
# 'all' = every row in a group, 'some' = a random subset of the rows in random groups.
SGPT_CASES = [
    ("24", 9, 32, "24", "all"),
    ("48", 7, 40, "48", "all"),
    ("coupled24", 5, 48, "coupled24", "all"),
    ("block16", 32, 32, "block16", "all"),
    ("random", 13, 29, (3, 2, 3, 1), "some"),
    ("random_bn1", 11, 37, (1, 1, 5, 3), "some"),
    ("random_keep0", 8, 20, (2, 3, 2, 0), "some"),
    ("random_keepall", 8, 20, (2, 1, 4, 4), "some"),
    ("single_column", 6, 1, (1, 1, 1, 0), "all"),
    ("wide", 5, 240, "24", "all"),  # CUDA: u (225 KiB) too large for shared memory next to the rows
    ("many_groups", 70, 16, "24", "all"),  # CUDA: more than one thread block
]


def _sgpt_case(case):
    name, M, b, spec, cover = case
    if isinstance(spec, str):
        starts, cols, lrows, rpg, bn, nnz = _regular_scopes(spec, b)
        free = set()
    else:
        rpg, bn, nb, nnz = spec
        starts, cols, lrows, free = _random_scopes(b, rpg, bn, nb)
    E = len(cols[0]) if cols else (spec[1] * spec[2] if not isinstance(spec, str) else 4)
    order = sorted(range(len(starts)), key=lambda s: starts[s])
    starts = [starts[s] for s in order]
    scope_cols = torch.tensor([cols[s] for s in order], dtype=torch.long).reshape(len(starts), E)
    scope_rows = torch.tensor([lrows[s] for s in order], dtype=torch.long).reshape(len(starts), E)
    perm = torch.randperm(M) if cover == "some" else torch.arange(M)
    R = (M - (2 if cover == "some" else 0)) // rpg
    group_rows = perm[: R * rpg].reshape(R, rpg)
    if cover == "all" and rpg == 2:  # the row-coupled pattern's groups {16a + p, 16a + 8 + p}
        group_rows = torch.tensor([[16 * a + p, 16 * a + 8 + p] for a in range(M // 16) for p in range(8)])
    # w and pruned as strided windows of larger tensors, u too.
    w_full = torch.randn(M, b + 7)
    w = w_full[:, 3 : 3 + b]
    p_full = torch.zeros(M, b + 5, dtype=torch.bool)
    pruned = p_full[:, 2 : 2 + b]
    # Masks decided before this block (by scopes that began earlier) on elements no scope here covers.
    for r, c in free:
        if random.random() < 0.2:
            pruned[group_rows[:, r], c] = True
    u_full = torch.zeros(b + 3, b + 4)
    u_full[1 : 1 + b, 2 : 2 + b] = _upper_factor(b)
    u = u_full[1 : 1 + b, 2 : 2 + b]
    return dict(w=w, pruned=pruned, u=u, scope_ptr=_csr(starts, b), scope_cols=scope_cols, scope_rows=scope_rows,
                group_rows=group_rows, nnz=nnz, block_numel=bn)


_SGPT_ARGS = ("w", "pruned", "u", "scope_ptr", "scope_cols", "scope_rows", "group_rows", "nnz", "block_numel")


def _sgpt_call(fn, args, device, **kw):
    """Run fn (the op wrapper or the oracle) on copies of the inputs on `device`;
    returns (w, pruned, err, status) on the CPU."""
    a = {k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    err, status = fn(*(a[k] for k in _SGPT_ARGS), **kw)
    return a["w"].cpu(), a["pruned"].cpu(), err.cpu(), status.cpu()


def _check_sgpt(args, device, msg):
    got = _sgpt_call(ops.sparsegpt_block_, args, device, check=False)
    exp = _sgpt_call(ref.sparsegpt_block_, args, "cpu")
    for g, e, what in zip(got, exp, ("w", "pruned", "err", "status")):
        assert_bitwise(g, e, f"{msg} {what}")
    return got


@pytest.mark.parametrize("case", SGPT_CASES, ids=[c[0] for c in SGPT_CASES])
def test_sparsegpt_block(device, seed, case):
    args = _sgpt_case(case)
    w, pruned, err, status = _check_sgpt(args, device, f"seed={seed} case={case[0]}")
    assert int(status) == 0
    # Every scope keeps exactly nnz blocks in every group; pruned weights are exactly zero.
    cols, lrows, gr = args["scope_cols"], args["scope_rows"], args["group_rows"]
    bn = args["block_numel"]
    if cols.numel():
        elems = pruned[gr[:, lrows], cols]  # (R, S, E)
        blocks = elems.reshape(*elems.shape[:2], -1, bn)
        assert bool((blocks.all(-1) | ~blocks.any(-1)).all()), "a block is partly pruned"
        assert bool(((~blocks.all(-1)).sum(-1) == args["nnz"]).all()), "wrong number of kept blocks"
    assert bool((w[pruned] == 0).all())
    # Rows in no group are untouched, with zero error.
    rest = torch.ones(w.shape[0], dtype=torch.bool)
    rest[gr.reshape(-1)] = False
    assert_bitwise(w[rest], args["w"][rest], "rows in no group")
    assert bool((err[rest] == 0).all())


def test_sparsegpt_block_ties_and_nan(device, seed):
    # u = I: no propagation, integer scores, many ties (lower block index wins); a NaN
    # ranks as -inf (pruned first) and poisons its row's error.
    args = _sgpt_case(("24", 6, 16, "24", "all"))
    args["u"] = torch.eye(16)
    args["w"] = torch.randint(-2, 3, (6, 16)).float()
    args["w"][1, 5] = math.nan
    args["w"][2, 0:4] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # four-way tie: keep blocks 0 and 1
    w, pruned, err, _ = _check_sgpt(args, device, f"seed={seed}")
    assert pruned[2, 0:4].tolist() == [False, False, True, True]
    assert bool(pruned[1, 5])


def test_sparsegpt_block_equals_python_loop(device, seed):
    # One lazy block of the pruner's Python loop (s3sparse/pruners/sparsegpt.py), 2:4 on
    # all rows, through the op: bit for bit.
    from s3sparse.pruners.sparsegpt import _PythonSweep
    from s3sparse.pruners.layout import scope_layout

    M, K = 8, 48
    W = torch.randn(M, K)
    scope, nnz = s3sparse.patterns.nm(W, 2, 4)
    U = _upper_factor(K)
    d2 = torch.diagonal(U) ** 2
    i1, i2 = 16, 48
    Wp, Pp = W.clone(), torch.zeros(M, K, dtype=torch.bool)
    err_p = _PythonSweep(scope_layout(scope), K).block(Wp, U, d2, Pp, i1, i2, nnz)
    starts, cols, lrows, _, bn, _ = _regular_scopes("24", i2 - i1)
    Wk, Pk = W.clone().to(device), torch.zeros(M, K, dtype=torch.bool, device=device)
    err_k, status = ops.sparsegpt_block_(
        Wk[:, i1:i2], Pk[:, i1:i2], U.to(device)[i1:i2, i1:i2], _csr(starts, i2 - i1).to(device),
        torch.tensor(cols).to(device), torch.tensor(lrows).to(device), torch.arange(M).view(M, 1).to(device), nnz, bn,
    )
    assert int(status) == 0
    assert_bitwise(Wk, Wp, f"seed={seed} w")
    assert_bitwise(Pk, Pp, f"seed={seed} pruned")
    assert_bitwise(err_k, err_p, f"seed={seed} err")


def _sgpt_invalid(args, what):
    a = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    b = a["w"].shape[1]
    if what == "group row too large":
        a["group_rows"][0, 0] = a["w"].shape[0]
    elif what == "group row negative":
        a["group_rows"][-1, 0] = -1
    elif what == "ptr end":
        a["scope_ptr"][-1] -= 1
    elif what == "ptr decreasing":
        a["scope_ptr"][3] = a["scope_ptr"][4] + 1
    elif what == "col too large":
        a["scope_cols"][1, 2] = b
    elif what == "col before start":
        a["scope_cols"][2, 0] = a["scope_cols"][1, 0]
    elif what == "local row":
        a["scope_rows"][0, 1] = 1
    return a


SGPT_INVALID = {
    "group row too large": 1,
    "group row negative": 1,
    "ptr end": 2,
    "ptr decreasing": 2,
    "col too large": 4,
    "col before start": 8,
    "local row": 16,
}


@pytest.mark.parametrize("what", list(SGPT_INVALID), ids=list(SGPT_INVALID))
def test_sparsegpt_block_invalid_tables(device, what):
    # Invalid table entries: status bits, nothing written (checked on the device, no sync);
    # check=True (the default) raises with the meaning of the bits.
    args = _sgpt_invalid(_sgpt_case(("24", 6, 32, "24", "all")), what)
    exp = _sgpt_call(ref.sparsegpt_block_, args, "cpu")
    assert int(exp[3]) == SGPT_INVALID[what]
    w, pruned, err, status = _check_sgpt(args, device, what)
    assert_bitwise(w, args["w"], f"{what}: w untouched")
    assert_bitwise(pruned, args["pruned"], f"{what}: pruned untouched")
    assert not bool(err.any())
    a = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    with pytest.raises(ValueError, match="invalid index tables"):
        ops.sparsegpt_block_(*(a[k] for k in _SGPT_ARGS))


def test_sparsegpt_block_edge_sizes(device, seed):
    # No scopes at all (masks decided earlier are applied), no groups, no columns.
    args = _sgpt_case(("24", 6, 12, "24", "all"))
    args["scope_cols"] = args["scope_rows"] = torch.zeros(0, 4, dtype=torch.long)
    args["scope_ptr"] = torch.zeros(13, dtype=torch.long)
    args["pruned"][torch.rand(6, 12) < 0.5] = True
    _check_sgpt(args, device, f"seed={seed} no scopes")
    args["group_rows"] = torch.zeros(0, 1, dtype=torch.long)
    w, _, err, _ = _check_sgpt(args, device, f"seed={seed} no groups")
    assert_bitwise(w, args["w"], "no groups: w untouched")
    empty = dict(w=torch.zeros(3, 0), pruned=torch.zeros(3, 0, dtype=torch.bool), u=torch.zeros(0, 0),
                 scope_ptr=torch.zeros(1, dtype=torch.long), scope_cols=torch.zeros(0, 2, dtype=torch.long),
                 scope_rows=torch.zeros(0, 2, dtype=torch.long), group_rows=torch.arange(3).view(3, 1), nnz=1, block_numel=1)
    w, _, err, status = _check_sgpt(empty, device, "b = 0")
    assert err.shape == (3, 0) and int(status) == 0


def test_sparsegpt_block_group_too_large_for_cuda(device, seed):
    # The CPU kernel takes any row group; the CUDA one keeps a group's rows of the block
    # in shared memory and says so when they do not fit (220 rows x 128 columns).
    M, b = 220, 128
    args = dict(w=torch.randn(M, b), pruned=torch.zeros(M, b, dtype=torch.bool), u=_upper_factor(b),
                scope_ptr=_csr([0], b), scope_cols=torch.arange(b).repeat(2).view(1, 2 * b),
                scope_rows=torch.tensor([0] * b + [1] * b).view(1, 2 * b), group_rows=torch.arange(M).view(1, M),
                nnz=1, block_numel=b)
    if device == "cpu" and not _is_emu():
        _check_sgpt(args, device, f"seed={seed}")
    else:
        a = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
        with pytest.raises(ValueError, match="shared memory"):
            ops.sparsegpt_block_(*(a[k] for k in _SGPT_ARGS))


# ---------------------------------------------------------------- bad inputs
def _bad_calls(dev):
    x = torch.randn(4, 8, device=dev)
    grid = torch.ones(4, 2, device=dev)
    w = torch.randn(3, 4, device=dev)
    c = torch.eye(4, device=dev).repeat(3, 1, 1)
    sub = torch.tensor([[0, 1], [2, 3]], device=dev)
    V = ([4, 8], [8, 1], 0, [1, 4])
    return [
        # block_reduce
        ("x int", lambda: ops.block_reduce(x.long(), *V), TypeError, "`x`"),
        ("x non-contiguous", lambda: ops.block_reduce(x.t(), [8, 4], [4, 1], 0, [1, 4]), ValueError, "`x` must be contiguous"),
        ("indivisible block", lambda: ops.block_reduce(x, [4, 8], [8, 1], 0, [1, 3]), ValueError, "does not tile"),
        ("view past x", lambda: ops.block_reduce(x, [4, 8], [8, 1], 1, [1, 4]), ValueError, "`x` has only"),
        ("stride length", lambda: ops.block_reduce(x, [4, 8], [8], 0, [1, 4]), ValueError, "`stride`"),
        ("block length", lambda: ops.block_reduce(x, [4, 8], [8, 1], 0, [4]), ValueError, "`block`"),
        ("negative offset", lambda: ops.block_reduce(x, [4, 8], [8, 1], -1, [1, 4]), ValueError, "`offset`"),
        ("bad reduce", lambda: ops.block_reduce(x, *V, reduce="mean"), ValueError, "`reduce`"),
        ("bad p", lambda: ops.block_reduce(x, *V, reduce="norm", p=0.0), ValueError, "`p`"),
        ("too many dims", lambda: ops.block_reduce(x, [1] * 9, [1] * 9, 0, [1] * 9), ValueError, "at most 8 dims"),
        # block_scale_
        ("scale shape", lambda: ops.block_scale_(x, *V, torch.ones(4, 3, device=dev)), ValueError, "`scale`"),
        ("scale dtype", lambda: ops.block_scale_(x, *V, torch.ones(4, 2, dtype=torch.long, device=dev)), TypeError, "`scale`"),
        ("scale x int", lambda: ops.block_scale_(x.int(), *V, grid), TypeError, "`x`"),
        ("scale indivisible", lambda: ops.block_scale_(x, [4, 8], [8, 1], 0, [3, 4], grid), ValueError, "does not tile"),
        # kth_largest
        ("k too large", lambda: ops.kth_largest(x, 9), ValueError, "`k`"),
        ("k negative", lambda: ops.kth_largest(x, -1), ValueError, "`k`"),
        ("kth x int", lambda: ops.kth_largest(x.long(), 1), TypeError, "`x`"),
        ("kth scalar", lambda: ops.kth_largest(x[0, 0], 0), ValueError, "`x`"),
        # score_subsets
        ("w half", lambda: ops.score_subsets(w.half(), c, sub), TypeError, "`w`"),
        ("c int", lambda: ops.score_subsets(w, c.long(), sub), TypeError, "`c`"),
        ("c shape", lambda: ops.score_subsets(w, c[:, :3, :3], sub), ValueError, "`c`"),
        ("w 1-D", lambda: ops.score_subsets(w[0], c, sub), ValueError, "`w`"),
        ("subsets dtype", lambda: ops.score_subsets(w, c, sub.int()), TypeError, "`subsets`"),
        ("subsets range", lambda: ops.score_subsets(w, c, sub + 2), ValueError, "`subsets` entries"),
        ("subsets negative", lambda: ops.score_subsets(w, c, sub - 1), ValueError, "`subsets` entries"),
        ("subsets too wide", lambda: ops.score_subsets(w, c, torch.zeros(1, 5, dtype=torch.long, device=dev)), ValueError, "`subsets`"),
        ("per-item c count", lambda: ops.score_subsets(w, c[:2], sub), ValueError, "`c`"),
        ("c_index range", lambda: ops.score_subsets(w, c[:2], sub, torch.tensor([0, 1, 2], device=dev)), ValueError, "`c_index` entries"),
        ("c_index negative", lambda: ops.score_subsets(w, c[:2], sub, torch.tensor([0, -1, 1], device=dev)), ValueError, "`c_index` entries"),
        ("c_index length", lambda: ops.score_subsets(w, c[:2], sub, torch.tensor([0, 1], device=dev)), ValueError, "`c_index`"),
        ("c_index dtype", lambda: ops.score_subsets(w, c[:2], sub, torch.tensor([0, 1, 1], dtype=torch.int32, device=dev)), TypeError, "`c_index`"),
        # sparsegpt_block_
        ("sgpt w double", lambda: _sgpt_bad(dev, w=lambda a: a.double()), TypeError, "`w` must be Float"),
        ("sgpt w 1-D", lambda: _sgpt_bad(dev, w=lambda a: a[0]), ValueError, "`w` must be 2-D"),
        ("sgpt w overlapping", lambda: _sgpt_bad(dev, w=lambda a: a[:1].expand(6, 8)), ValueError, "`w` must not have overlapping"),
        ("sgpt pruned dtype", lambda: _sgpt_bad(dev, pruned=lambda a: a.to(torch.uint8)), TypeError, "`pruned` must be Bool"),
        ("sgpt pruned shape", lambda: _sgpt_bad(dev, pruned=lambda a: a[:, :7]), ValueError, "`pruned` must have the shape"),
        ("sgpt pruned overlapping", lambda: _sgpt_bad(dev, pruned=lambda a: a[:, :1].expand(6, 8)), ValueError, "`pruned` must not have overlapping"),
        ("sgpt u half", lambda: _sgpt_bad(dev, u=lambda a: a.half()), TypeError, "`u` must be Float"),
        ("sgpt u shape", lambda: _sgpt_bad(dev, u=lambda a: a[:7]), ValueError, "`u` must be \\(b, b\\)"),
        ("sgpt ptr length", lambda: _sgpt_bad(dev, scope_ptr=lambda a: a[:-1]), ValueError, "`scope_ptr` must be \\(b \\+ 1,\\)"),
        ("sgpt ptr dtype", lambda: _sgpt_bad(dev, scope_ptr=lambda a: a.int()), TypeError, "`scope_ptr` must be Long"),
        ("sgpt cols 1-D", lambda: _sgpt_bad(dev, scope_cols=lambda a: a.reshape(-1)), ValueError, "`scope_cols` must be 2-D"),
        ("sgpt rows shape", lambda: _sgpt_bad(dev, scope_rows=lambda a: a[:, :2]), ValueError, "`scope_rows` must have the shape"),
        ("sgpt group rows dtype", lambda: _sgpt_bad(dev, group_rows=lambda a: a.int()), TypeError, "`group_rows` must be Long"),
        ("sgpt block_numel zero", lambda: _sgpt_bad(dev, block_numel=0), ValueError, "`block_numel` must be >= 1"),
        ("sgpt block_numel indivisible", lambda: _sgpt_bad(dev, block_numel=3), ValueError, "do not split into blocks"),
        ("sgpt nnz too large", lambda: _sgpt_bad(dev, nnz=5), ValueError, "`nnz` must be in \\[0, 4\\]"),
        ("sgpt nnz negative", lambda: _sgpt_bad(dev, nnz=-1), ValueError, "`nnz`"),
    ]


def _sgpt_bad(dev, **change):
    """sparsegpt_block_ on a valid 2:4 block (6 x 8) with one argument changed."""
    starts, cols, lrows, _, bn, nnz = _regular_scopes("24", 8)
    args = dict(w=torch.randn(6, 8, device=dev), pruned=torch.zeros(6, 8, dtype=torch.bool, device=dev),
                u=torch.eye(8, device=dev), scope_ptr=_csr(starts, 8).to(dev), scope_cols=torch.tensor(cols, device=dev),
                scope_rows=torch.tensor(lrows, device=dev), group_rows=torch.arange(6, device=dev).view(6, 1),
                nnz=nnz, block_numel=bn)
    for k, v in change.items():
        args[k] = v(args[k]) if callable(v) else v
    return ops.sparsegpt_block_(*(args[k] for k in _SGPT_ARGS))


_BAD_IDS = [case[0] for case in _bad_calls("cpu")]


@pytest.mark.parametrize("case", range(len(_BAD_IDS)), ids=_BAD_IDS)
def test_bad_inputs(device, case):
    name, call, exc, match = _bad_calls(device)[case]
    with pytest.raises(exc, match=match):
        call()


def test_bad_input_leaves_tensors_untouched(device):
    # Validation happens before any write.
    x = torch.randn(4, 8, device=device)
    x0 = x.clone()
    with pytest.raises(ValueError, match="`scale`"):
        ops.block_scale_(x, [4, 8], [8, 1], 0, [1, 4], torch.zeros(4, 3, device=device))
    assert torch.equal(x, x0)


@pytest.mark.cuda
def test_mismatched_devices():
    cu, cpu = "cuda", "cpu"
    x = torch.randn(4, 8, device=cu)
    w = torch.randn(3, 4, device=cu)
    c = torch.eye(4, device=cu).repeat(3, 1, 1)
    sub = torch.tensor([[0, 1]], device=cu)
    with pytest.raises(ValueError, match="`scale`"):
        ops.block_scale_(x, [4, 8], [8, 1], 0, [1, 4], torch.ones(4, 2, device=cpu))
    with pytest.raises(ValueError, match="`c`"):
        ops.score_subsets(w, c.to(cpu), sub)
    with pytest.raises(ValueError, match="`subsets`"):
        ops.score_subsets(w, c, sub.to(cpu))
    with pytest.raises(ValueError, match="`c_index`"):
        ops.score_subsets(w, c, sub, torch.zeros(3, dtype=torch.long, device=cpu))
    for name in ("pruned", "u", "scope_ptr", "scope_cols", "scope_rows", "group_rows"):
        with pytest.raises(ValueError, match=f"`{name}` must be on the device of `w`"):
            _sgpt_bad(cu, **{name: lambda a: a.to(cpu)})


# ---------------------------------------------------------------- opcheck and torch.compile
def _samples(dev):
    torch.manual_seed(0)
    K = 32
    x = torch.randn(8, K, device=dev)
    view = ([8, K // 16, 8, 2], [K, 16, 1, 8], 0, [1, 1, 1, 2])
    scale = (torch.rand(8, K // 16, 8, 1, device=dev) > 0.5)
    w = torch.randn(5, 4, device=dev)
    cs = _spd_blocks(2, 4, torch.float16).to(dev)
    subsets = _subsets(4, 2).to(dev)
    c_index = torch.tensor([0, 1, 1, 0, 1], device=dev)
    return dict(x=x, view=view, scale=scale, w=w, cs=cs, subsets=subsets, c_index=c_index)


@pytest.mark.parametrize("device", REAL_DEVICES)
def test_opcheck(device):
    s = _samples(device)
    o = torch.ops.s3sparse
    size, stride, offset, block = s["view"]
    cases = [
        (o.block_reduce.default, (s["x"], size, stride, offset, block, "norm", 2.0)),
        (o.block_reduce.default, (s["x"].half(), [8, 32], [32, 1], 0, [2, 4], "max", 2.0)),
        (o.block_scale_.default, (s["x"].clone(), size, stride, offset, block, s["scale"])),
        (o.block_scale_.default, (s["x"].double(), [8, 32], [32, 1], 0, [8, 1], torch.randn(1, 32, device=device))),
        (o.kth_largest.default, (s["x"], 5)),
        (o.kth_largest.default, (s["x"].view(2, 4, 32).bfloat16(), 0)),
        (o.score_subsets.default, (s["w"], s["cs"], s["c_index"], s["subsets"])),
        (o.score_subsets.default, (s["w"].double(), s["cs"][:1].expand(5, 4, 4).contiguous(), None, s["subsets"])),
    ]
    for kind, M, b in (("24", 5, 16), ("block16", 16, 32)):
        a = _sgpt_case((kind, M, b, kind, "all"))
        a = {k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
        cases.append((o.sparsegpt_block_.default, tuple(a[k] for k in _SGPT_ARGS)))
        a["w"] = a["w"].contiguous()
        cases.append((o.sparsegpt_block_.default, tuple(a[k] for k in _SGPT_ARGS)))
    for op, args in cases:
        torch.library.opcheck(op, args)


def _all_ops(x, scale, w, cs, c_index, subsets):
    K = x.shape[1]
    size, stride, offset, block = [8, K // 16, 8, 2], [K, 16, 1, 8], 0, [1, 1, 1, 2]
    norms = ops.block_reduce(x, size, stride, offset, block, "norm", 2.0)
    y = x.clone()
    ops.block_scale_(y, size, stride, offset, block, scale)
    vals, keep = ops.kth_largest(norms.flatten(1), 7)
    costs, best = ops.score_subsets(w, cs, subsets, c_index)
    return norms * 2, y, vals, keep, costs, best


def _mutate_inputs(x, scale):
    # The mutating op on a graph input directly.
    K = x.shape[1]
    ops.block_scale_(x, [8, K // 16, 8, 2], [K, 16, 1, 8], 0, [1, 1, 1, 2], scale)
    return x.sum(dim=1) + 1


def _compile_check(device, backend):
    s = _samples(device)
    args = (s["x"], s["scale"], s["w"], s["cs"], s["c_index"], s["subsets"])
    torch._dynamo.reset()
    expected = _all_ops(*args)
    got = torch.compile(_all_ops, backend=backend, fullgraph=True)(*args)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    margs = (s["x"], s["scale"])
    m_eager = [a.clone() for a in margs]
    m_comp = [a.clone() for a in margs]
    r_eager = _mutate_inputs(*m_eager)
    r_comp = torch.compile(_mutate_inputs, backend=backend, fullgraph=True)(*m_comp)
    torch.testing.assert_close(r_comp, r_eager)
    for e, g in zip(m_eager, m_comp):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("device", REAL_DEVICES)
def test_compile(device, backend):
    _compile_check(device, backend)


@pytest.mark.parametrize("device", REAL_DEVICES)
def test_compile_inductor(device):
    _compile_check(device, "inductor")


def _sgpt_step(W, P, U, ptr, cols, rows, group_rows, i1: int, i2: int, nnz: int, bn: int):
    # One lazy block of the pruner: the op on views of the working weight and mask, then the trailing GEMM.
    err, status = ops.sparsegpt_block_(W[:, i1:i2], P[:, i1:i2], U[i1:i2, i1:i2], ptr, cols, rows, group_rows, nnz, bn, check=False)
    W[:, i2:] -= err @ U[i1:i2, i2:]
    return err * 1, status


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("device", REAL_DEVICES)
def test_compile_sparsegpt_block(device, backend):
    torch.manual_seed(0)
    M, K, i1, i2 = 6, 48, 16, 32
    starts, cols, lrows, _, bn, nnz = _regular_scopes("24", i2 - i1)
    W = torch.randn(M, K, device=device)
    P = torch.zeros(M, K, dtype=torch.bool, device=device)
    U = _upper_factor(K).to(device)
    tables = (_csr(starts, i2 - i1).to(device), torch.tensor(cols, device=device), torch.tensor(lrows, device=device),
              torch.arange(M, device=device).view(M, 1))
    torch._dynamo.reset()
    We, Pe = W.clone(), P.clone()
    eager = _sgpt_step(We, Pe, U, *tables, i1, i2, nnz, bn)
    Wc, Pc = W.clone(), P.clone()
    comp = torch.compile(_sgpt_step, backend=backend, fullgraph=True)(Wc, Pc, U, *tables, i1, i2, nnz, bn)
    for e, g in zip(eager + (We, Pe), comp + (Wc, Pc)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    assert int(comp[1]) == 0 and bool(Pc[:, i1:i2].any()) and not bool(Pc[:, :i1].any())


def test_build_info_describes_the_torch_we_run():
    """The extension was built against the torch it runs with, and its CUDA fields agree."""
    from s3sparse._extension import built_torch_version_from_file

    info = s3sparse.build_info()
    assert set(info) == {"cpu", "cuda", "cuda_arch_list", "cuda_version", "torch_version", "cxx_standard"}, info
    assert info["cpu"] is True and str(info["cxx_standard"]).startswith("c++"), info
    assert info["torch_version"] == torch.__version__, (
        f"built against torch {info['torch_version']} but running {torch.__version__}: rebuild s3sparse"
    )
    # The same version is in the library's bytes, where the import guard reads it when the library cannot load.
    assert built_torch_version_from_file(s3sparse._C.__file__) == torch.__version__
    info["torch_version"] = "changed"
    assert s3sparse.build_info()["torch_version"] == torch.__version__  # a fresh dict every call
    if info["cuda"]:
        assert torch.version.cuda, "CUDA kernels compiled against a CPU-only torch"
        assert info["cuda_version"] and info["cuda_arch_list"], info
        # Compiled by an nvcc of the CUDA major version torch was built with (minor versions may differ).
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0], (info, torch.version.cuda)
    else:
        assert info["cuda_version"] == "" and info["cuda_arch_list"] == "", info
    if HAS_CUDA:
        assert info["cuda"] is True, "a GPU is present but the CUDA kernels were not compiled"
