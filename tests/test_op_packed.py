"""The packed-weight ops (packed_to_dense, packed_linear) against their oracles in s3sparse.reference.

Inputs come from :func:`packed_case`: a random S3 pattern whose view covers a
whole weight (random factored and permuted views, blocks and scopes), pruned
at random, packed by ``PackedWeight.from_scope`` in both index formats
(subset codes and per-block indices). Tests run on the CPU kernels, on CUDA
where a GPU is present (the `cuda` marker) and, with
S3SPARSE_CUDA_EMU=<library> (tools/cuda_emu/build.sh), on the host emulation
of the CUDA kernels (`-k cuda_emu`).
"""

from __future__ import annotations

import math
import os
import random

import numpy as np
import pytest
import torch

from s3sparse import ops, patterns
from s3sparse import reference as ref
from s3sparse.sparse import PackedWeight
from s3sparse.sparse.format import MAX_SUBSET_TABLE, pack_fields
from emu_utils import EMU_LIB, use_emulator
from spec_utils import prune_randomly, random_covering_scope

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
if EMU_LIB:
    DEVICES.append(pytest.param("emu", id="cuda_emu"))
REAL_DEVICES = DEVICES[:2]
# Relative accumulation error (of sum |x||w|) and output rounding, per dtype.
ACC_RTOL = {torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float32: 2e-5, torch.float64: 1e-12}
OUT_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-6, torch.float64: 1e-14}


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The torch device of the inputs ("cpu" for the emulator, whose kernels run on CPU tensors)."""
    if request.param == "emu":
        use_emulator(monkeypatch)
        return "cpu"
    if request.param == "cuda":
        # The large-batch path ends in a cuBLAS GEMM, which by torch's default may
        # reduce split-K partial sums in fp16 / bf16 (one more rounding than the
        # oracle's, seen at 2 bf16 ulps on an H200): the tests hold the kernels
        # to fp32 reductions. A user's F.linear on the dense W follows the same switch.
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_fp16_reduced_precision_reduction", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    return request.param


def _is_emu() -> bool:
    """The host emulator runs every CUDA thread as a host thread: keep its cases small."""
    return ops._ops is not torch.ops.s3sparse


def _id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ---------------------------------------------------------------- sample inputs
def packed_case(rng: random.Random, dtype=torch.float32, device="cpu", index_format="auto", extra_zero=0.3):
    """(W, PackedWeight) of a random covering pattern pruned at random (some scopes below budget)."""
    param, scope, nnz = random_covering_scope(rng, dtype, device, transposed=rng.random() < 0.2)
    if index_format == "subsets":  # forced codes need a table of C(G, nnz) rows that stays small
        G = scope.numblk_per_scope()
        nnz = max(nnz, 1)
        while nnz > 1 and math.comb(G, nnz) * nnz > 4 * MAX_SUBSET_TABLE:
            nnz -= 1
    prune_randomly(scope, nnz, extra_zero)
    packed = PackedWeight.from_scope(scope, nnz, index_format=index_format)
    return param.detach(), packed


def reference_patterns(dtype=torch.float32, device="cpu", M=32, K=64):
    """(name, W, PackedWeight) of the four reference patterns, pruned by magnitude."""
    out = []
    for name in ("24", "48", "coupled24", "block16"):
        W = torch.nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device))
        scope, nnz = patterns.by_name(name, W)
        scope.hard_threshold(nnz=nnz)
        out.append((name, W.detach(), PackedWeight.from_scope(scope, nnz)))
    return out


def _args(p: PackedWeight):
    return (p.values, p.meta, p.subsets, p.block_off, p.elem_off, list(p.scope_shape), list(p.scope_stride), p.meta_bits)


def _linear_bound(x, W, expected, dtype):
    scale = x.double().abs().cpu() @ W.double().abs().cpu().T
    return ACC_RTOL[dtype] * scale + OUT_RTOL[dtype] * expected.double().abs().cpu() + 1e-30


def _assert_linear_close(got, expected, x, W, dtype, msg):
    assert got.dtype == expected.dtype and got.shape == expected.shape, f"{msg}: {got.dtype}{tuple(got.shape)}"
    err = (got.double().cpu() - expected.double().cpu()).abs()
    bound = _linear_bound(x.reshape(-1, x.shape[-1]), W, expected.reshape(-1, expected.shape[-1]), dtype)
    bad = err.reshape(bound.shape) > bound
    assert not bool(bad.any()), f"{msg}: {int(bad.sum())} outputs off, max error {float(err.max())}"


# ---------------------------------------------------------------- against the oracle
@pytest.mark.parametrize("index_format", ["subsets", "indices"])
@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_packed_to_dense_matches_oracle(device, seed, dtype, index_format):
    rng = random.Random(seed)
    for trial in range(4 if _is_emu() else 12):
        W, p = packed_case(rng, dtype, device, index_format)
        M, K = p.shape
        msg = f"seed={seed} trial={trial} {p}"
        got = ops.packed_to_dense(*_args(p), M, K)
        want = ref.packed_to_dense(*_args(p), M, K)
        assert got.dtype == dtype and got.shape == (M, K), msg
        assert torch.equal(got.cpu(), want.cpu()), msg
        assert torch.equal(got.cpu(), W.cpu()), msg  # and it is the weight that was packed


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_packed_to_dense_reference_patterns(device, dtype):
    for name, W, p in reference_patterns(dtype, device):
        got = ops.packed_to_dense(*_args(p), *p.shape)
        assert torch.equal(got.cpu(), ref.packed_to_dense(*_args(p), *p.shape).cpu()), name
        assert torch.equal(got.cpu(), W.cpu()), name


# Up to 8 tokens: the CUDA stream decode kernel (16 on the general decode path); more: W expanded
# into a workspace (the expansion kernel, or the general scatter), then a GEMM.
LEADING = [(), (1,), (5,), (2, 3), (0,), (2, 0, 3), (16,), (17,), (3, 11)]


@pytest.mark.parametrize("index_format", ["subsets", "indices"])
@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_packed_linear_matches_oracle(device, seed, dtype, index_format):
    rng = random.Random(seed)
    for trial in range(4 if _is_emu() else 10):
        W, p = packed_case(rng, dtype, device, index_format)
        M, K = p.shape
        lead = rng.choice(LEADING)
        x = torch.randn(*lead, K, dtype=torch.float64).to(dtype=dtype, device=device)
        bias = torch.randn(M, dtype=torch.float64).to(dtype=dtype, device=device) if rng.random() < 0.5 else None
        msg = f"seed={seed} trial={trial} lead={lead} bias={bias is not None} {p}"
        got = ops.packed_linear(x, *_args(p), M, p.row_group, bias)
        want = ref.packed_linear(x.cpu(), *(a.cpu() if isinstance(a, torch.Tensor) else a for a in _args(p)), M,
                                 p.row_group, None if bias is None else bias.cpu())
        assert got.shape == (*lead, M), msg
        _assert_linear_close(got, want, x, W, dtype, msg)
        # row_group 0 (no promise) computes the same
        got0 = ops.packed_linear(x, *_args(p), M, 0, bias)
        _assert_linear_close(got0, want, x, W, dtype, msg + " row_group=0")


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_packed_linear_reference_patterns(device, seed, dtype):
    # Long enough rows for several tiles of the CPU kernel (K * rows > 2**19 elements);
    # token counts on both sides of the CUDA kernels' switch (8: stream decode kernel, then expand + GEMM).
    M, K = (32, 1152) if _is_emu() else (64, 9216)
    for name, W, p in reference_patterns(dtype, device, M=M, K=K):
        for lead in [(1,), (2, 4), (3, 4), (2, 9)]:
            x = torch.randn(*lead, p.in_features, dtype=torch.float64).to(dtype=dtype, device=device)
            bias = torch.randn(p.out_features, dtype=torch.float64).to(dtype=dtype, device=device)
            got = ops.packed_linear(x, *_args(p), p.out_features, p.row_group, bias)
            want = torch.nn.functional.linear(x.cpu().double(), W.cpu().double(), bias.cpu().double()).to(dtype)
            _assert_linear_close(got, want, x, W, dtype, f"seed={seed} {name} lead={lead}")


def _row_block_case(name: str, M: int, K: int, dtype, device):
    """(W, PackedWeight) of a row-coupled block pattern (block16-rows, block8-rows4), pruned by magnitude."""
    W = torch.nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device))
    scope, nnz = patterns.parse_pattern(name).build(W)
    scope.hard_threshold(nnz=nnz)
    return W.detach(), PackedWeight.from_scope(scope, nnz)


def _raw_row_blocks(rng: random.Random, G: int, R: int, B: int, groups: int, K: int, dtype, device,
                    bits: int | None = None):
    """(W, op arguments after x, M, row_group) of a random row-coupled block weight of any G (rows a
    scope, R apart), written directly in the format: fields uniform in [0, G) of `bits` bits (default:
    the fewest), values random."""
    S = groups * R * (K // B)
    bits = bits or max(1, (G - 1).bit_length())
    fields = torch.tensor([rng.randrange(G) for _ in range(S)], dtype=torch.int64)
    values = torch.randn(S, 1, B, dtype=torch.float64).to(dtype=dtype, device=device)
    args = (values, pack_fields(fields, bits).to(device), None,
            torch.tensor([k * R * K for k in range(G)], dtype=torch.int64, device=device),
            torch.arange(B, dtype=torch.int64, device=device), [groups, R * K // B], [G * R * K, B], bits)
    M = groups * G * R
    W = ref.packed_to_dense(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), M, K)
    return W, args, M, G * R


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_packed_linear_row_block_kernel(device, seed, dtype):
    """Row-coupled runs (on CUDA the row-block kernel: its FMA form at 1-2 tokens and for fp32 or
    runs of 8, up to 8 tokens; its tensor-core form at 3-16 tokens, fp16/bf16 runs of 16; fp64 and
    more tokens take the other paths): several row groups, sets of two warps (block16-rows, K =
    4096: 256 runs a row), block8-rows4, G = 3 and 4 rows a scope (2-bit fields), 16 sets a group
    (two tiles of the tensor-core form; over several warps with 3-bit fields), 5 and 9 (part tiles),
    every token slot, 3-D x, a bias or not,
    a strided bias; then the same W with elem_off reversed (and each run's values with it), which
    the kernel's fast form does not take: its general form, same result."""
    rng = random.Random(seed)
    cases = []
    for name, M, K in [("block16-rows", 32, 4096), ("block8-rows4", 24, 256), ("block16-rows", 32, 48)]:
        W, p = _row_block_case(name, M, K, dtype, device)
        cases.append((name, W, _args(p), M, p.row_group))
    # (K, bits): 16 sets of several warps with 3-bit fields (10 a word), an odd run count over warps.
    for G, R, B, K, bits in [(3, 2, 16, 128, None), (4, 4, 8, 128, None), (2, 16, 16, 128, None),
                             (4, 5, 16, 128, None), (4, 16, 16, 656, 3), (2, 9, 16, 48, 5)]:
        cases.append((f"G={G} R={R} B={B} K={K} bits={bits}",
                      *_raw_row_blocks(rng, G, R, B, 2, K, dtype, device, bits)))
    for name, W, args, M, row_group in cases:
        K = W.shape[1]
        flipped = (args[0].flip(-1).contiguous(), *args[1:4], args[4].flip(0).contiguous(), *args[5:])
        for lead in [(1,), (2,), (3,), (5,), (8,), (2, 3), (16,), (17,)]:
            x = torch.randn(*lead, K, dtype=torch.float64).to(dtype=dtype, device=device)
            kind = rng.choice(["none", "bias", "strided"])
            bias = None if kind == "none" else torch.randn(2 * M, dtype=torch.float64).to(dtype=dtype, device=device)
            bias = bias[::2] if kind == "strided" else None if bias is None else bias[:M]
            want = torch.nn.functional.linear(x.cpu().double(), W.cpu().double(),
                                              None if bias is None else bias.cpu().double()).to(dtype)
            msg = f"seed={seed} {name} {M}x{K} lead={lead} bias={kind}"
            _assert_linear_close(ops.packed_linear(x, *args, M, row_group, bias), want, x, W, dtype, msg)
            _assert_linear_close(ops.packed_linear(x, *flipped, M, row_group, bias), want, x, W, dtype,
                                 msg + " elem_off reversed")


def test_packed_linear_row_block_tensor_core_form_is_deterministic(device):
    """The row-block kernel's tensor-core form (fp16 block16-rows, 3-16 tokens) sums its warps in a fixed
    order, so repeated calls give the same bits (12 warps share a row group's 256 runs here). A check on a
    GPU only: the emulator runs a block's threads in a fixed order (its atomics too), the CPU has no such form."""
    if device == "cpu":
        pytest.skip("the tensor-core form is CUDA's")
    W, p = _row_block_case("block16-rows", 64, 4096, torch.float16, device)
    for tokens in (4, 16):
        x = torch.randn(tokens, 4096, dtype=torch.float16, device=device)
        first = ops.packed_linear(x, *_args(p), p.out_features, p.row_group, None)
        for _ in range(8):
            again = ops.packed_linear(x, *_args(p), p.out_features, p.row_group, None)
            assert torch.equal(again, first), f"{tokens} tokens: a repeated call changed the result"


def test_packed_linear_row_block_bad_data(device):
    """Bad data on the row-block patterns: a block offset outside W raises (unchecked) or gives NaN in
    the rows of its group only (checked); a meta field >= G (2-bit fields, G = 2) likewise."""
    M, K = 32, 256
    W, p = _row_block_case("block16-rows", M, K, torch.float16, device)
    x = torch.randn(4, K, dtype=torch.float16, device=device)
    far = p.block_off.clone()
    far[1] = M * K  # outside W
    args = (p.values, p.meta, None, far, p.elem_off, list(p.scope_shape), list(p.scope_stride), p.meta_bits)
    with pytest.raises(ValueError, match="falls outside W"):
        ops.packed_linear(x, *args, M, p.row_group, None)
    if device != "cpu":  # (the CPU kernel checks on every call)
        y = ops.packed_linear(x, *args, M, p.row_group, None, checked=True).cpu()
        assert bool(y.isnan().all()), "every group has a scope keeping block 1: every row is NaN"
    # The same weight with 2-bit fields, then field 3 (no block of G = 2) in scope 5, of group 0.
    fields = ref.packed_fields(p.meta.cpu(), 1, p.num_scopes).to(torch.int64)
    args = (p.values, pack_fields(fields, 2).to(device), None, p.block_off, p.elem_off, list(p.scope_shape),
            list(p.scope_stride), 2)
    want = torch.nn.functional.linear(x.cpu().double(), W.cpu().double()).to(torch.float16)
    _assert_linear_close(ops.packed_linear(x, *args, M, p.row_group, None), want, x, W, torch.float16, "2-bit fields")
    fields[5] = 3
    args = (args[0], pack_fields(fields, 2).to(device), *args[2:])
    with pytest.raises(ValueError, match="in-scope block index >= G=2"):
        ops.packed_linear(x, *args, M, p.row_group, None)
    if device != "cpu":
        y = ops.packed_linear(x, *args, M, p.row_group, None, checked=True).cpu()
        assert bool(y[:, :16].isnan().all()) and not bool(y[:, 16:].isnan().any()), "NaN in group 0's rows only"
        _assert_linear_close(y[:, 16:], want[:, 16:], x, W[16:], torch.float16, "the other group")


@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
def test_packed_linear_expansion_odd_chunk_counts(device, dtype):
    """Weights whose chunks (16-byte value loads) are no multiple of a warp's 32, through the expansion path.

    The expansion kernel gives each warp 32 consecutive chunks and stores them
    together; the last warp's share is partial here.
    """
    M, K = 5, 16 * 37
    for name in ("24", "48", "coupled24"):  # (block16 needs groups of 16 rows)
        W = torch.nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device))
        scope, nnz = patterns.by_name(name, W)
        scope.hard_threshold(nnz=nnz)
        W, p = W.detach(), PackedWeight.from_scope(scope, nnz)
        x = torch.randn(40, K, dtype=torch.float64).to(dtype=dtype, device=device)  # above the tensor-core kernel's 16
        got = ops.packed_linear(x, *_args(p), M, p.row_group, None)
        want = torch.nn.functional.linear(x.cpu().double(), W.cpu().double()).to(dtype)
        _assert_linear_close(got, want, x, W, dtype, f"{name} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_packed_linear_tensor_core_kernel_odd_shapes(device, seed, dtype):
    """The span patterns at 1-17 tokens (on CUDA: the tensor-core kernel at 5-16 tokens, the
    stream kernel below, the expansion above; with S3SPARSE_PACKED_CUDA_PATH=mma the
    tensor-core kernel at every count, 16 tokens a launch).

    Rows not a multiple of its 16-row blocks, columns not a multiple of its
    64-column stages, fewer stages than warps (K = 48), every token count of
    both of its token tiles (8 and 16), bias or not.
    """
    rng = random.Random(seed)
    # (150, 64): more 16-row tiles than the emulator's blocks, so blocks loop over tiles.
    shapes = [(5, 16 * 37), (19, 48), (33, 256), (150, 64)] if _is_emu() else [(5, 16 * 37), (19, 48), (300, 2000)]
    for M, K in shapes:
        for name in ("24", "48", "coupled24"):
            W = torch.nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device))
            scope, nnz = patterns.by_name(name, W)
            scope.hard_threshold(nnz=nnz)
            W, p = W.detach(), PackedWeight.from_scope(scope, nnz)
            counts = [1, 7, 9, 16, 17] if _is_emu() else list(range(1, 18))
            for n in counts:
                x = torch.randn(n, K, dtype=torch.float64).to(dtype=dtype, device=device)
                bias = torch.randn(M, dtype=torch.float64).to(dtype=dtype, device=device) if rng.random() < 0.5 else None
                got = ops.packed_linear(x, *_args(p), M, p.row_group, bias)
                want = torch.nn.functional.linear(x.cpu().double(), W.cpu().double(),
                                                  None if bias is None else bias.cpu().double()).to(dtype)
                _assert_linear_close(got, want, x, W, dtype, f"seed={seed} {name} M={M} K={K} tokens={n}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_packed_linear_rounds_once_when_the_bias_cancels(device, dtype):
    """x Wᵀ + b rounded once to the output dtype, on every path (token counts for the decode, tensor-core
    and expansion paths; row_group 0 for the scattered workspace): each row's x Wᵀ is 1 + 2⁻¹², which
    neither 16-bit type holds, and b = -1, so the exact output is 2⁻¹²; rounding x Wᵀ first gives 0.
    (On an H100, cuBLAS's 16-bit addmm behind the workspace paths rounded x Wᵀ first at 1 token for a
    6×80 weight, the bf16 probe's shape, and not for 24×64: which cuBLAS kernel runs depends on the
    shape, so both are here.)"""
    for M, K in ((24, 64), (6, 80)):
        W = torch.zeros(M, K, dtype=dtype)
        W[:, 0], W[:, 1] = 1.0, 2.0**-12
        scope, nnz = patterns.by_name("24", torch.nn.Parameter(W.to(device)))
        scope.hard_threshold(nnz=nnz)
        p = PackedWeight.from_scope(scope, nnz)
        bias = torch.full((M,), -1.0, dtype=dtype, device=device)
        for row_group in (p.row_group, 0):
            for n in (1, 2, 4, 8, 9, 16, 17, 64):
                x = torch.ones(n, K, dtype=dtype, device=device)
                got = ops.packed_linear(x, *_args(p), M, row_group, bias)
                assert torch.equal(got.cpu(), torch.full((n, M), 2.0**-12, dtype=dtype)), (
                    f"{M}x{K} row_group={row_group} tokens={n}: {sorted(set(got.double().cpu().flatten().tolist()))}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=_id)
def test_packed_linear_spans_that_do_not_tile(device, dtype):
    """2:4-shaped formats whose chunks do not tile their 16 columns: every host check of the
    span kernels passes, so they must notice on the device and take their per-value path.

    block_off (0, 1, 1, 3): blocks 1 and 2 overlap at column 1 (their values are zeroed
    here, as the result of an overlap is not defined); (0, 1, 2, 3 + K): the last block
    of every scope lies in the next row (which the row_group=1 promise forbids) or, from
    the last row, outside W.
    """
    M, K = 20, 16 * 9
    W = torch.nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device))
    scope, nnz = patterns.by_name("24", W)
    scope.hard_threshold(nnz=nnz)
    p = PackedWeight.from_scope(scope, nnz)
    codes = ref.packed_fields(p.meta.cpu(), p.meta_bits, p.values.shape[0])
    kept = p.subsets.cpu()[codes]  # (S, nnz) in-scope blocks
    values = p.values.clone()
    values[((kept == 1) | (kept == 2)).to(device)] = 0
    args = list(_args(p))
    args[0] = values
    args[3] = torch.tensor([0, 1, 1, 3], dtype=torch.int64, device=device)
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    Wd = ref.packed_to_dense(*cpu_args, M, K)
    for n in (1, 5, 12, 40):
        x = torch.randn(n, K, dtype=torch.float64).to(dtype=dtype, device=device)
        got = ops.packed_linear(x, *args, M, 1, None)
        want = ref.packed_linear(x.cpu(), *cpu_args, M, 1, None)
        _assert_linear_close(got, want, x, Wd, dtype, f"tokens={n}")
    args[3] = torch.tensor([0, 1, 2, 3 + K], dtype=torch.int64, device=device)
    for n in (1, 12):
        x = torch.randn(n, K, dtype=torch.float64).to(dtype=dtype, device=device)
        with pytest.raises(ValueError, match="outside its group of row_group=1|falls outside W"):
            ops.packed_linear(x, *args, M, 1, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_id)
def test_packed_linear_nm_path_and_its_fallback(device, seed, dtype):
    """2:4, 4:8 and coupled 2:4 at 1-2 tokens: on CUDA, the span kernel's n:m path, which
    assumes the tables PackedWeight writes and checks them on the device (3-4 tokens here
    run the span path, for comparison).

    The same weights with the subset table's rows permuted (the meta codes remapped, so
    the dense weight is unchanged) are valid but not the tables the path assumes: the
    kernel must notice and take its span path; so must a permuted ``block_off`` (another
    valid format, compared with the oracle). A code past the table (6 or 7) must raise,
    or come back NaN with checked=True, through either path. Odd rows and a chunk count
    that is no multiple of a warp's 32; more rows than warps (a warp streams several rows:
    the emulator has 2 SMs, an H200 3168 warp slots); bias or not.
    """
    if os.environ.get("S3SPARSE_PACKED_CUDA_PATH"):
        pytest.skip("a forced kernel path: the n:m path is the automatic path's")
    rng = random.Random(seed)
    shapes = [(7, 16 * 37), (100, 64)] if _is_emu() else [(37, 16 * 301), (3300, 64)]
    for (M, K), name in ((mk, nm) for mk in shapes for nm in ("24", "48", "coupled24")):
        W = torch.nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device))
        scope, nnz = patterns.by_name(name, W)
        scope.hard_threshold(nnz=nnz)
        W, p = W.detach(), PackedWeight.from_scope(scope, nnz)
        args = list(_args(p))
        S = p.values.shape[0]
        codes = ref.packed_fields(p.meta.cpu(), p.meta_bits, S)
        perm = torch.tensor(rng.sample(range(6), 6))
        while bool((perm == torch.arange(6)).all()):
            perm = torch.tensor(rng.sample(range(6), 6))
        permuted = list(args)
        permuted[2] = p.subsets[perm.to(device)].contiguous()  # row i of the new table: old code perm[i]
        new_codes = torch.argsort(perm)[codes]
        permuted[1] = pack_fields(new_codes, p.meta_bits).to(device)
        moved = list(args)  # blocks 0 and 1 of every scope trade places: another valid format
        moved[3] = p.block_off[torch.tensor([1, 0, 2, 3], device=device)].contiguous()
        moved_cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in moved]
        bad_row = (S // 2) // (S // M)  # every scope grid here has the rows outermost
        bad_codes, bad_new = codes.clone(), new_codes.clone()
        bad_codes[S // 2] = bad_new[S // 2] = 6 + rng.randrange(2)
        bad = list(args)
        bad[1] = pack_fields(bad_codes, p.meta_bits).to(device)
        bad_permuted = list(permuted)
        bad_permuted[1] = pack_fields(bad_new, p.meta_bits).to(device)
        for n in (1, 2, 3, 4) if (M, K) == shapes[0] and not _is_emu() else (1, 2):  # the n:m path's counts
            x = torch.randn(n, K, dtype=torch.float64).to(dtype=dtype, device=device)
            bias = torch.randn(M, dtype=torch.float64).to(dtype=dtype, device=device) if rng.random() < 0.5 else None
            msg = f"seed={seed} {name} M={M} K={K} tokens={n}"
            want = torch.nn.functional.linear(x.cpu().double(), W.cpu().double(),
                                              None if bias is None else bias.cpu().double()).to(dtype)
            for what, a in (("canonical", args), ("permuted table", permuted)):
                got = ops.packed_linear(x, *a, M, p.row_group, bias)
                _assert_linear_close(got, want, x, W, dtype, f"{msg} {what}")
            got = ops.packed_linear(x, *moved, M, p.row_group, bias)
            want_moved = ref.packed_linear(x.cpu(), *moved_cpu, M, p.row_group, None if bias is None else bias.cpu())
            W_moved = ref.packed_to_dense(*moved_cpu, M, K)
            _assert_linear_close(got, want_moved, x, W_moved, dtype, f"{msg} permuted block_off")
            for what, a in (("canonical", bad), ("permuted table", bad_permuted)):
                with pytest.raises(ValueError, match="subset code"):
                    ops.packed_linear(x, *a, M, p.row_group, bias)
                if device != "cpu" or _is_emu():
                    y = ops.packed_linear(x, *a, M, p.row_group, bias, checked=True)
                    assert bool(torch.isnan(y[:, bad_row]).all()), f"{msg} {what}: the bad code's row must be NaN"
                    others = torch.cat([y[:, :bad_row], y[:, bad_row + 1:]], 1)
                    assert not bool(torch.isnan(others).any()), f"{msg} {what}: only the bad code's row is NaN"


def test_packed_linear_wide_rows_every_kernel_gets_its_shared_memory(device, seed):
    """Rows wide enough that x in shared memory needs more than 48 KiB at 4 and 8 tokens.

    Each decode kernel must be allowed its own shared memory: kernels of one
    signature (one per pattern and token count) once shared the record of what
    had been allowed, and the second of them failed with "invalid argument".
    """
    dtype = torch.float16
    M, K = 16, 6400
    for name, W, p in reference_patterns(dtype, device, M=M, K=K):
        for n in (12, 8, 4, 2, 1):
            x = torch.randn(n, K, dtype=torch.float64).to(dtype=dtype, device=device)
            got = ops.packed_linear(x, *_args(p), p.out_features, p.row_group, None)
            want = torch.nn.functional.linear(x.cpu().double(), W.cpu().double()).to(dtype)
            _assert_linear_close(got, want, x, W, dtype, f"seed={seed} {name} tokens={n}")


@pytest.mark.parametrize("K,tokens", [(9728, (1, 2)), (19456, (4,))], ids=["K9728", "K19456"])
def test_packed_linear_span_kernel_wide_x_blocks(device, seed, K, tokens):
    """x so wide that two or one span-kernel block fits an SM (fp16 2:4 and 4:8).

    The span kernel then runs blocks of 12 or 24 warps instead of 8 (K = 9728:
    8 warps at 1 token, 12 at 2; K = 19456: 24 at 4 tokens); every block size
    must give the oracle's rows.
    """
    if os.environ.get("S3SPARSE_PACKED_CUDA_PATH"):
        pytest.skip("a forced kernel path: the span kernel is the automatic path's")
    dtype = torch.float16
    M = 8
    for name in ("24",) if _is_emu() else ("24", "48"):
        W = torch.nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device))
        scope, nnz = patterns.by_name(name, W)
        scope.hard_threshold(nnz=nnz)
        p = PackedWeight.from_scope(scope, nnz)
        for n in tokens:
            x = torch.randn(n, K, dtype=torch.float64).to(dtype=dtype, device=device)
            got = ops.packed_linear(x, *_args(p), p.out_features, p.row_group, None)
            want = torch.nn.functional.linear(x.cpu().double(), W.detach().cpu().double()).to(dtype)
            _assert_linear_close(got, want, x, W.detach(), dtype, f"seed={seed} {name} K={K} tokens={n}")


def test_packed_linear_empty_and_degenerate(device):
    dtype = torch.float32
    _, W, p = reference_patterns(dtype, device)[0]
    M, K = p.shape
    for lead in [(0,), (3, 0), (0, 5)]:
        x = torch.randn(*lead, K, device=device)
        y = ops.packed_linear(x, *_args(p), M, p.row_group, None)
        assert y.shape == (*lead, M) and y.dtype == dtype
    # No scopes at all: W is zero; the product is the bias.
    values = torch.zeros(0, 2, 1, device=device)
    empty = (values, torch.zeros(0, dtype=torch.int32, device=device), None,
             torch.zeros(4, dtype=torch.int64, device=device), torch.zeros(1, dtype=torch.int64, device=device),
             [0], [4], 2)
    assert torch.equal(ops.packed_to_dense(*empty, 3, 5).cpu(), torch.zeros(3, 5))
    bias = torch.randn(3, device=device)
    x = torch.randn(2, 5, device=device)
    torch.testing.assert_close(ops.packed_linear(x, *empty, 3, 0, bias), bias.expand(2, 3))
    y1 = ops.packed_linear(x[:1], *empty, 3, 0, bias)  # one token: a new tensor, not the bias itself
    assert torch.equal(y1, bias[None]) and y1.untyped_storage().data_ptr() != bias.untyped_storage().data_ptr()
    # nnz = 0: every scope keeps nothing.
    Wp = torch.nn.Parameter(torch.zeros(4, 8, device=device))
    scope, _ = patterns.nm(Wp)
    p0 = PackedWeight.from_scope(scope, 0)
    assert p0.values.shape == (8, 0, 1)
    assert torch.equal(p0.to_dense().cpu(), torch.zeros(4, 8))
    assert torch.equal(ops.packed_linear(torch.ones(3, 8, device=device), *_args(p0), 4, p0.row_group, None).cpu(),
                       torch.zeros(3, 4))


def test_packed_linear_noncontiguous_x(device):
    _, W, p = reference_patterns(torch.float32, device)[1]
    x = torch.randn(p.in_features, 6, device=device).t()  # (6, K), strided
    got = ops.packed_linear(x, *_args(p), p.out_features, p.row_group, None)
    want = torch.nn.functional.linear(x.double(), W.double()).float()
    _assert_linear_close(got, want, x, W, torch.float32, "strided x")


def test_packed_fields_layout_is_the_oracles():
    # The bit layout the kernels read is exactly what the packer writes (every meta_bits).
    g = torch.Generator().manual_seed(0)
    from s3sparse.sparse.format import pack_fields

    for bits in range(1, 33):
        fields = torch.randint(0, 2**bits, (97,), generator=g, dtype=torch.int64)
        meta = pack_fields(fields, bits)
        assert meta.dtype == torch.int32 and meta.numel() == -(-97 // (32 // bits))
        assert torch.equal(ref.packed_fields(meta, bits, 97), fields), bits


# ---------------------------------------------------------------- bad inputs
def _good(device):
    W = torch.nn.Parameter(torch.randn(8, 16, device=device))
    scope, nnz = patterns.nm(W)
    scope.hard_threshold(nnz=nnz)
    return PackedWeight.from_scope(scope, nnz, index_format="subsets")


def _call_dense(p, **over):
    a = dict(values=p.values, meta=p.meta, subsets=p.subsets, block_off=p.block_off, elem_off=p.elem_off,
             scope_shape=list(p.scope_shape), scope_stride=list(p.scope_stride), meta_bits=p.meta_bits,
             out_features=p.out_features, in_features=p.in_features)
    a.update(over)
    return ops.packed_to_dense(**a)


def _call_linear(p, x, **over):
    a = dict(values=p.values, meta=p.meta, subsets=p.subsets, block_off=p.block_off, elem_off=p.elem_off,
             scope_shape=list(p.scope_shape), scope_stride=list(p.scope_stride), meta_bits=p.meta_bits,
             out_features=p.out_features, row_group=p.row_group, bias=None)
    a.update(over)
    return ops.packed_linear(x, **a)


def test_bad_arguments_raise_clear_errors(device):
    p = _good(device)
    x = torch.randn(3, 16, device=device)
    cases = [
        (dict(values=p.values.int()), TypeError, "`values` must be float16"),
        (dict(values=p.values[0]), ValueError, "`values` must be 3-D"),
        (dict(values=p.values.transpose(0, 1).contiguous().transpose(0, 1)), ValueError, "`values` must be contiguous"),
        (dict(meta=p.meta.long()), TypeError, "`meta` must be Int"),
        (dict(meta=p.meta[:-1]), ValueError, "`meta` must hold"),
        (dict(subsets=p.subsets.long()), TypeError, "`subsets` must be Int"),
        (dict(subsets=p.subsets[:, :1].contiguous()), ValueError, "`subsets` rows must list nnz=2"),
        (dict(subsets=None), ValueError, "`meta` must hold"),  # nnz fields per scope need more words
        (dict(block_off=p.block_off.int()), TypeError, "`block_off` must be Long"),
        (dict(block_off=p.block_off[:1]), ValueError, "G=1"),
        (dict(elem_off=torch.zeros(2, dtype=torch.int64, device=device)), ValueError, "`elem_off` must have one entry"),
        (dict(scope_shape=[3]), ValueError, "`scope_shape`"),
        (dict(scope_stride=[4, 1]), ValueError, "`scope_stride` must have one entry"),
        (dict(meta_bits=0), ValueError, r"`meta_bits` must be in \[1, 32\]"),
        (dict(meta_bits=33), ValueError, r"`meta_bits` must be in \[1, 32\]"),
        (dict(out_features=-1), ValueError, "`out_features` must be >= 0"),
    ]
    for over, exc, match in cases:
        with pytest.raises(exc, match=match):
            _call_dense(p, **over)
        with pytest.raises(exc, match=match):
            _call_linear(p, x, **over)
    with pytest.raises(ValueError, match="`in_features` must be >= 0"):
        _call_dense(p, in_features=-2)
    linear_cases = [
        (dict(), x.double(), TypeError, "`x` must have the dtype of `values`"),
        (dict(), torch.tensor(1.0, device=device), ValueError, "`x` must be"),
        (dict(bias=torch.zeros(7, device=device)), x, ValueError, r"`bias` must be \(out_features,\) = \(8,\)"),
        (dict(bias=torch.zeros(8, device=device).half()), x, TypeError, "`bias` must have the dtype of `x`"),
        (dict(row_group=-1), x, ValueError, "`row_group` must be >= 0"),
        (dict(row_group=3), x, ValueError, "`row_group`=3 must divide out_features=8"),
    ]
    for over, xx, exc, match in linear_cases:
        with pytest.raises(exc, match=match):
            _call_linear(p, xx, **over)


def test_bad_data_raise_clear_errors(device):
    p = _good(device)
    x = torch.randn(3, 16, device=device)
    # A subset code past the table (3-bit fields, 6 codes): field 0 = 7.
    meta = p.meta.clone()
    meta[0] = meta[0] | 7
    p16 = p.to(torch.float16)  # (at 6 tokens on CUDA: the tensor-core kernel)
    x6 = torch.randn(6, 16, device=device, dtype=torch.float16)
    for call in (lambda: _call_dense(p, meta=meta), lambda: _call_linear(p, x, meta=meta),
                 lambda: _call_linear(p16, x6, meta=meta)):
        with pytest.raises(ValueError, match="subset code >= n_codes=6"):
            call()
    bad_sub = p.subsets.clone()
    bad_sub[2, 1] = 4
    with pytest.raises(ValueError, match=r"`subsets`\[2, 1\] = 4 is not an in-scope block index"):
        _call_dense(p, subsets=bad_sub)
    # Per-block indices of 2 bits, G = 3: index 3 is out of range.
    q = PackedWeight.from_scope(patterns.nm(torch.nn.Parameter(torch.zeros(8, 16, device=device)))[0], 2,
                                index_format="indices")
    meta = q.meta.clone()
    meta[0] = meta[0] | 3
    with pytest.raises(ValueError, match="in-scope block index >= G=3"):
        _call_dense(q, meta=meta, block_off=q.block_off[:3].contiguous())
    # Offsets outside W.
    with pytest.raises(ValueError, match="outside W"):
        _call_dense(p, block_off=p.block_off + 128)
    with pytest.raises(ValueError, match="outside W"):
        _call_dense(p, in_features=15)
    # Offsets far outside W (rows past the CUDA kernels' int32 clamp) are reported as offsets, not
    # as bad block indices, on every path: decode (3 tokens), tensor-core (fp16, 6), workspace (20).
    # (The tensor-core and workspace paths said "block index" for +2**40 before b64c2d7.)
    x20 = torch.randn(20, 16, device=device)
    for shift in (2**40, -(2**40)):
        far = p.block_off + shift
        for call in (lambda: _call_dense(p, block_off=far), lambda: _call_linear(p, x, block_off=far),
                     lambda: _call_linear(p16, x6, block_off=far),
                     lambda: _call_linear(p, x20, block_off=far)):
            with pytest.raises(ValueError, match="outside W") as raised:
                call()
            assert "block index" not in str(raised.value), str(raised.value)
    # A row_group promise that does not hold: 2:4 scopes taken column-major over the scope grid
    # (scope_shape (K/4, M), strides (4, K)) with row_group=1 claims a row per K/4 consecutive
    # scopes. With W larger than one CPU tile (2**19 elements), a tile's scopes reach other rows.
    # (The CUDA kernels check every element, so a small W shows it there.)
    M, K = (8, 64) if _is_emu() else (64, 16384)
    Wl = torch.nn.Parameter(torch.randn(M, K, device=device))
    scope, nnz = patterns.nm(Wl)
    scope.hard_threshold(nnz=nnz)
    pl = PackedWeight.from_scope(scope, nnz)
    for tokens in (2, 20):  # the CUDA decode kernel and the expanded-workspace path
        xl = torch.randn(tokens, K, device=device)
        with pytest.raises(ValueError, match="touches rows outside its group of row_group=1"):
            _call_linear(pl, xl, scope_shape=[K // 4, M], scope_stride=[4, K], row_group=1)
        # The same column-major order without the promise is a valid (if slow) layout.
        Wc = ref.packed_to_dense(pl.values.cpu(), pl.meta.cpu(), pl.subsets.cpu(), pl.block_off.cpu(),
                                 pl.elem_off.cpu(), [K // 4, M], [4, K], pl.meta_bits, M, K)
        want = torch.nn.functional.linear(xl.double().cpu(), Wc.double())
        got = _call_linear(pl, xl, scope_shape=[K // 4, M], scope_stride=[4, K], row_group=0).cpu()
        # fp32 sums of K/2 = 8192 products of size ~1: round-off up to ~1e-4 absolute is normal (seed
        # 1197651926 gave 1.4e-4 on an output of 0.1); a wrong layout is off by O(1).
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_id)
def test_checked_bad_data_never_passes_as_numbers(device, dtype):
    # checked=True lets the CUDA kernels skip the host check (one sync); bad data
    # must then come back NaN, never as numbers (and never be read out of bounds).
    # The CPU kernel checks either way. (fp16 at 6 tokens on CUDA: the tensor-core kernel.)
    p = _good(device).to(dtype)
    meta = p.meta.clone()
    meta[0] = meta[0] | 7  # scope 0: a code past the table
    for tokens in (3, 6, 20):
        x = torch.randn(tokens, 16, device=device, dtype=dtype)
        if device == "cpu" and not _is_emu():
            with pytest.raises(ValueError, match="subset code"):
                _call_linear(p, x, meta=meta, checked=True)
            continue
        y = _call_linear(p, x, meta=meta, checked=True)
        assert bool(torch.isnan(y[:, 0]).all()), f"tokens={tokens}: row 0 (the bad scope's) must be NaN"
        # The good tables with checked=True compute the right numbers.
        if tokens < 20:  # (the decode kernels NaN the bad rows; the workspace paths all of y)
            assert not bool(torch.isnan(y[:, 1:]).any()), f"tokens={tokens}: only row 0 is bad"
        want = torch.nn.functional.linear(x.double(), p.to_dense().double())
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(_call_linear(p, x, checked=True).double(), want, rtol=tol, atol=tol)


def test_checked_bad_rows_of_later_row_tiles_are_nan(device):
    """A bad code in rows far down W (fp16, 6 tokens, checked=True): exactly those rows come back NaN.

    Kernels that loop over row tiles (the tensor-core kernel's persistent blocks) must
    not carry a tile's bad rows into the next tile, nor lose them.
    """
    M, K = 150, 64
    W = torch.nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=torch.float16, device=device))
    scope, nnz = patterns.by_name("24", W)
    scope.hard_threshold(nnz=nnz)
    p = PackedWeight.from_scope(scope, nnz)
    per_row = K // 4  # 2:4 scopes a row, one 3-bit field each, 10 fields a word
    meta = p.meta.clone()
    bad_rows = [37, 130]
    for r in bad_rows:
        f = r * per_row
        meta[f // 10] = meta[f // 10] | (7 << (3 * (f % 10)))
    x = torch.randn(6, K, dtype=torch.float16, device=device)
    if device == "cpu" and not _is_emu():
        with pytest.raises(ValueError, match="subset code"):
            _call_linear(p, x, meta=meta, checked=True)
        return
    y = _call_linear(p, x, meta=meta, checked=True).cpu()
    nan_rows = torch.isnan(y).all(0).nonzero().flatten().tolist()
    assert nan_rows == bad_rows, nan_rows
    assert not bool(torch.isnan(y[:, [r for r in range(M) if r not in bad_rows]]).any())


# ---------------------------------------------------------------- the eager call (csrc/module.cpp)
def _linear_call_args(p: PackedWeight, x, bias=None, checked=False) -> list:
    return [x, p.values, p.meta, p.subsets, p.block_off, p.elem_off, list(p.scope_shape), list(p.scope_stride),
            p.meta_bits, p.out_features, p.row_group, bias, checked]


class _Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("device", REAL_DEVICES)
def test_eager_call_is_the_op_and_leaves_the_rest_to_torch_ops(device, seed):
    """``ops.packed_linear``'s typed C++ call gives torch.ops' result bit for bit; arguments that need Python-level
    semantics (subclasses, numpy or float ints, a non-bool ``checked``, an overflowing int) give NotImplemented,
    and the wrapper's result through torch.ops is the same."""
    assert ops._packed_linear_call is not None, "s3sparse._C was built without _packed_linear_call: rebuild"
    _, p = packed_case(random.Random(seed), device=device)
    x = torch.randn(5, p.in_features, device=device)
    bias = torch.randn(p.out_features, device=device)
    for args in (_linear_call_args(p, x), _linear_call_args(p, x[:2], bias, True)):
        want = torch.ops.s3sparse.packed_linear.default(*args)
        got = ops._packed_linear_call(*args)
        assert got is not NotImplemented and torch.equal(got, want), f"seed {seed}"
        args[6], args[7] = tuple(args[6]), tuple(args[7])
        assert torch.equal(ops._packed_linear_call(*args), want)
    want = ops.packed_linear(*_linear_call_args(p, x))
    left = [(0, x.as_subclass(_Sub)), (1, p.values.as_subclass(_Sub)), (3, torch.ones(1).as_subclass(_Sub)),
            (8, np.int64(p.meta_bits)), (9, float(p.out_features)), (6, [float(v) for v in p.scope_shape] + [1.0]),
            (6, range(len(p.scope_shape))), (10, 2**70), (12, 0)]
    for i, value in left:
        args = _linear_call_args(p, x)
        args[i] = value
        assert ops._packed_linear_call(*args) is NotImplemented, (i, value)
    for i, value in [(8, np.int64(p.meta_bits)), (9, np.int32(p.out_features)), (12, 0)]:
        args = _linear_call_args(p, x)
        args[i] = value
        assert torch.equal(ops.packed_linear(*args), want), (i, value)
    with pytest.raises(TypeError, match="13 arguments"):
        ops._packed_linear_call(*_linear_call_args(p, x)[:12])
    with pytest.raises(TypeError, match="`x` must have the dtype of `values`"):  # the kernel's errors, as torch.ops'
        ops._packed_linear_call(*_linear_call_args(p, x.double()))


@pytest.mark.parametrize("device", REAL_DEVICES)
def test_eager_call_is_seen_by_torch_function_and_dispatch_modes(device):
    """A __torch_function__ mode sees ``ops.packed_linear`` as torch.ops' op (the fast call steps aside); a
    __torch_dispatch__ mode sees the op through the fast call's dispatcher entry."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen:
        def __init__(self):
            super().__init__()
            self.funcs = []

        def _record(self, func, args, kwargs):
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    class FunctionSeen(Seen, TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return self._record(func, args, kwargs)

    class DispatchSeen(Seen, TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return self._record(func, args, kwargs)

    p = _good(device)
    x = torch.randn(3, p.in_features, device=device)
    want = ops.packed_linear(*_linear_call_args(p, x))
    for mode in (FunctionSeen(), DispatchSeen()):
        with mode:
            got = ops.packed_linear(*_linear_call_args(p, x))
        assert torch.ops.s3sparse.packed_linear.default in mode.funcs, (type(mode).__name__, mode.funcs)
        assert torch.equal(got, want)


# ---------------------------------------------------------------- opcheck and torch.compile
def _opcheck_cases(device):
    cases = []
    for _, W, p in reference_patterns(torch.float32, device, M=16, K=32):
        M, K = p.shape
        x = torch.randn(2, 3, K, device=device)
        bias = torch.randn(M, device=device)
        cases.append((torch.ops.s3sparse.packed_to_dense.default, (*_args(p), M, K)))
        cases.append((torch.ops.s3sparse.packed_linear.default, (x, *_args(p), M, p.row_group, bias)))
        cases.append((torch.ops.s3sparse.packed_linear.default, (x[0].half(), *_args(p.to(torch.float16)), M, 0, None)))
    return cases


@pytest.mark.parametrize("device", REAL_DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


def _dense_then_linear(x, values, meta, subsets, block_off, elem_off, bias, geo: tuple):
    shape, stride, bits, M, K, R = geo
    W = ops.packed_to_dense(values, meta, subsets, block_off, elem_off, shape, stride, bits, M, K)
    y = ops.packed_linear(x, values, meta, subsets, block_off, elem_off, shape, stride, bits, M, R, bias)
    return torch.relu(y) + x.sum(-1, keepdim=True), W * 2


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("device", REAL_DEVICES)
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    for _, W, p in reference_patterns(torch.float32, device, M=16, K=32):
        geo = (list(p.scope_shape), list(p.scope_stride), p.meta_bits, p.out_features, p.in_features, p.row_group)
        args = (p.values, p.meta, p.subsets, p.block_off, p.elem_off, torch.randn(16, device=device))
        fn = torch.compile(lambda x, *a: _dense_then_linear(x, *a, geo), backend=backend, fullgraph=True)
        for lead in [(4,), (2, 5)]:  # a second shape: recompiles (or goes dynamic) without breaking the graph
            x = torch.randn(*lead, p.in_features, device=device)
            got = fn(x, *args)
            want = _dense_then_linear(x, *args, geo)
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["2:4", "4:8", "coupled-2:4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_id)
def test_cpu_direct_decode_matches_the_tile_path_and_the_reference(name, dtype):
    """On the CPU, 1-8 tokens of a row_group-1 weight with subset codes take the direct decode (each kept
    element multiplied into its row's sums as decoded); 9 and more the tile path (decode a tile, BLAS)."""
    from s3sparse.patterns import parse_pattern

    W = torch.randn(48, 128)
    scope, nnz = parse_pattern(name).build(W)
    scope.hard_threshold(nnz=nnz)
    p = PackedWeight.from_pattern(W, name).to(dtype)
    bias = torch.randn(48, dtype=dtype)
    x = torch.randn(9, 128, dtype=dtype)
    want = torch.nn.functional.linear(x.double(), p.to_dense().double(), bias.double())
    tile = _call_linear(p, x, bias=bias)  # 9 tokens: the tile path
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for n in (1, 3, 8):
        direct = _call_linear(p, x[:n], bias=bias)
        torch.testing.assert_close(direct.double(), want[:n], rtol=tol, atol=tol)
        torch.testing.assert_close(direct, tile[:n], rtol=tol, atol=tol)


def test_cpu_direct_decode_edge_cases_match_the_tile_path():
    """Found by review of the CPU direct decode: no scopes, empty blocks, and a subset row naming one block
    twice must give at 1-8 tokens what 9+ tokens (the tile path) and the reference give."""
    op = torch.ops.s3sparse
    table = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.int32)
    no_scopes = (torch.zeros(0, 2, 1), torch.zeros(0, dtype=torch.int32), table, torch.arange(4),
                 torch.zeros(1, dtype=torch.int64), [0], [4], 3)
    empty_blocks = (torch.zeros(2, 1, 0), torch.zeros(1, dtype=torch.int32), torch.zeros(1, 1, dtype=torch.int32),
                    torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), [2], [100], 1)
    for args, (M, K) in ((no_scopes, (4, 8)), (empty_blocks, (2, 4))):
        for n in (2, 9):
            assert torch.equal(op.packed_linear(torch.randn(n, K), *args, M, 1, None), torch.zeros(n, M))
    # One code whose row names block 1 twice: the reference stores the value twice at one place (the last
    # wins); every CPU path must agree with it, whatever the token count.
    dup = (torch.tensor([[[1.0], [1.0]], [[1.0], [1.0]]]), torch.zeros(1, dtype=torch.int32),
           torch.tensor([[1, 1]], dtype=torch.int32), torch.arange(4), torch.zeros(1, dtype=torch.int64), [2], [4], 1)
    W = ref.packed_to_dense(*dup, 2, 4)
    assert torch.equal(op.packed_to_dense(*dup, 2, 4), W)
    for n in (1, 8, 9):
        x = torch.ones(n, 4)
        torch.testing.assert_close(op.packed_linear(x, *dup, 2, 1, None), x @ W.t())


def _raw_subset_rows(rng: random.Random, M: int, K: int, E: int, grid: str, extra_code_hi: int = 0):
    """Op arguments after x (and M, K) of a row_group-1 weight with subset codes written directly in the
    format: scopes of E columns, 2 of them kept (blocks of 1), on a scope grid laid out as `grid`:
    "flat" (one dimension, stride E: 2:4's), "rows" ((M, K/E), strides (K, E)) or "pairs" (runs of 2 scopes
    interleaved in 2E columns, coupled 2:4's). `extra_code_hi` > 0 adds a code no scope uses whose second
    element sits that far past the scope (its reach is what a whole-row check must allow for)."""
    pairs = [(a, b) for a in range(E) for b in range(a + 1, E)]
    table = [[a, b] for a, b in pairs]
    block_off = list(range(E))
    if extra_code_hi:
        block_off.append(E - 1 + extra_code_hi)
        table.append([0, E])
    S = M * K // E
    fields = torch.tensor([rng.randrange(len(pairs)) for _ in range(S)], dtype=torch.int64)
    bits = max(1, (len(table) - 1).bit_length())
    if grid == "flat":
        shape, stride = [S], [E]
    elif grid == "rows":
        shape, stride = [M, K // E], [K, E]
    else:  # "pairs": scope 2j + i of a row at columns 2E j + i + {its code's two of 0, 2, .., 2E - 2}
        shape, stride = [S // 2, 2], [2 * E, 1]
        block_off = [2 * b for b in block_off]
    return (torch.randn(S, 2, 1), pack_fields(fields, bits), torch.tensor(table, dtype=torch.int32),
            torch.tensor(block_off, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), shape, stride, bits)


@pytest.mark.parametrize("grid", ["flat", "rows", "pairs"])
def test_cpu_direct_decode_regular_rows_and_their_fallback(grid, seed):
    """The CPU direct decode checks a row once where its scopes are regular (RowSteps) and scope by scope
    otherwise: both give the reference's numbers, on every scope layout of subset codes; a code reaching
    past the row (in the table, used by no scope) sends boundary rows to the per-scope checks, still exact;
    a bad code raises either way."""
    rng = random.Random(seed)
    M, E = rng.choice([3, 8, 17]), rng.choice([4, 8])
    K = 2 * E * rng.choice([1, 3, 8])
    for extra in (0, 1, K):
        args = _raw_subset_rows(rng, M, K, E, grid, extra_code_hi=extra)
        W = ref.packed_to_dense(*args, M, K).double()
        x = torch.randn(9, K)
        for n in (1, 2, 5, 8, 9):  # (9: the tile path)
            got = torch.ops.s3sparse.packed_linear(x[:n], *args, M, 1, None)
            torch.testing.assert_close(got.double(), x[:n].double() @ W.t(), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"grid={grid} M={M} K={K} E={E} extra={extra} n={n}: {m}")
    values, meta, *rest = _raw_subset_rows(rng, M, K, E, grid)
    bad = meta.clone()
    bad[-1] = bad[-1] | int(2 ** 31 - 1)  # the last word's fields all ones: codes past the table
    for n in (1, 8):
        with pytest.raises(ValueError, match="subset code"):
            torch.ops.s3sparse.packed_linear(torch.randn(n, K), values, bad, *rest, M, 1, None)


def test_cpu_direct_decode_huge_strides_and_offsets_are_refused_not_wrapped():
    """Found by fuzzing the one check a regular row takes: strides or offsets near 2^63 wrapped its 64-bit
    bounds into a false yes (numbers where the tile path refuses, reads before x, a crash). Every token
    count now refuses them alike."""
    op = torch.ops.s3sparse.packed_linear
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    cases = [  # (values, meta, subsets, block_off, elem_off, scope_shape, scope_stride, bits), M, K
        ((torch.ones(3, 1, 1), pack_fields(torch.zeros(3, dtype=torch.int64), 1), table[:1].clone(),
          torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), [3], [-(2**63)], 1), 1, 4),
        ((torch.ones(9, 1, 1), pack_fields(torch.zeros(9, dtype=torch.int64), 1), table[:1].clone(),
          torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), [9], [2**61], 1), 1, 4),
        ((torch.ones(2, 1, 1), pack_fields(torch.tensor([1, 0]), 1), table, torch.tensor([0, 2**63 - 1]),
          torch.zeros(1, dtype=torch.int64), [2], [1], 1), 1, 2),
    ]
    for args, M, K in cases:
        for n in (1, 8, 9):
            with pytest.raises(ValueError, match="outside W"):
                op(torch.randn(n, K), *args, M, 1, None)
