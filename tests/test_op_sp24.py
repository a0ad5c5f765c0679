"""sp24_linear (a 2:4 weight on the sparse tensor cores) against its oracle in s3sparse.reference.

The weights are random 2:4 prunes packed by ``PackedWeight.from_pattern``, their metadata built by
``sp24_meta_words``. Tests run on the CPU kernel, on CUDA where a GPU is present (the `cuda` marker)
and, with S3SPARSE_CUDA_EMU=<library> (tools/cuda_emu/build.sh), on the host emulation of the CUDA
kernel (`-k cuda_emu`), whose ``mma.sp`` follows the layout measured on an H100.
"""

from __future__ import annotations


import pytest
import torch

from s3sparse import ops
from s3sparse import reference as ref
from s3sparse.patterns import parse_pattern
from s3sparse.sparse import PackedWeight
from s3sparse.sparse.sp24 import sp24_column_order, sp24_meta_words
from emu_utils import EMU_LIB, host_ops, use_emulator

HALVES = [torch.float16, torch.bfloat16]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
if EMU_LIB:
    DEVICES.append(pytest.param("emu", id="cuda_emu"))
REAL_DEVICES = DEVICES[:2]
OUT_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(params=DEVICES)
def device(request, monkeypatch):
    """The torch device of the inputs ("cpu" for the emulator, whose kernels run on CPU tensors)."""
    if request.param == "emu":
        use_emulator(monkeypatch)
        return "cpu"
    return request.param


def _is_emu() -> bool:
    return ops._ops is not torch.ops.s3sparse


def _id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


PATTERNS = {"2:4": 0, "4:8": 1, "coupled-2:4": 2}  # pattern -> column order


def sp24_case(M: int, K: int, dtype, device, gen: torch.Generator, pattern: str = "2:4"):
    """(W, values, sp_meta) of a random prune of an M×K Gaussian weight to ``pattern``."""
    W = torch.nn.Parameter(torch.randn(M, K, generator=gen).to(dtype=dtype, device=device))
    with host_ops():  # (the case is built by the compiled kernels; the tests check sp24_linear)
        scope, nnz = parse_pattern(pattern).build(W)
        scope.hard_threshold(nnz=nnz)
        packed = PackedWeight.from_pattern(W.detach(), pattern)
    assert sp24_column_order(packed) == PATTERNS[pattern]
    return W.detach(), packed.values, sp24_meta_words(packed, PATTERNS[pattern])


def _assert_close(got, want, x, W, dtype, msg):
    """Within fp32 accumulation error of sum |x||w| plus one output rounding."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{msg}: {got.dtype}{tuple(got.shape)}"
    scale = x.double().abs().cpu().reshape(-1, x.shape[-1]) @ W.double().abs().cpu().T
    err = (got.double().cpu() - want.double().cpu()).abs().reshape(scale.shape)
    bound = 2e-5 * scale + OUT_RTOL[dtype] * want.double().cpu().abs().reshape(scale.shape) + 1e-30
    bad = err > bound
    assert not bool(bad.any()), f"{msg}: {int(bad.sum())} outputs off, max error {float(err.max())}"


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("dtype", HALVES, ids=_id)
def test_sp24_linear_matches_oracle(device, seed, dtype, pattern):
    gen = torch.Generator().manual_seed(seed)
    order = PATTERNS[pattern]
    shapes = [(16, 64), (32, 128), (48, 192), (32, 320)]
    # 5: 16-byte x loads from there; from 17 the tiled kernel (tiles of 32 tokens; from 33 of 64: 65 is two)
    tokens = [(1,), (3,), (5,), (8,), (9,), (2, 8), (17,), (65,)]
    for M, K in shapes:
        W, values, sp_meta = sp24_case(M, K, dtype, device, gen, pattern)
        assert torch.equal(ref.sp24_to_dense(values, sp_meta, M, K, order), W), f"{M}x{K}: the oracle's W"
        for lead in tokens:
            x = torch.randn(*lead, K, generator=gen).to(dtype=dtype, device=device)
            biases = [None, torch.randn(M, generator=gen).to(dtype=dtype, device=device)]
            if K == 128:  # a strided bias (the kernels index bias[row]: made contiguous first)
                biases.append(torch.randn(2 * M, generator=gen).to(dtype=dtype, device=device)[::2])
            for bias in biases:
                want = ref.sp24_linear(x, values, sp_meta, M, bias, False, order)
                for checked in (False, True):  # (the CUDA kernel's two forms: with and without its metadata check)
                    got = ops.sp24_linear(x, values, sp_meta, M, bias, checked, order)
                    _assert_close(got, want, x, W, dtype,
                                  f"{M}x{K} x{tuple(x.shape)} bias={bias is not None} checked={checked}")


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_sp24_linear_many_slices_of_k(device, seed, pattern):
    """K split over many slices of a tile, on the emulator's 2 SMs: 3, 6 and 17 slices (K = 768, 1536, 4352:
    the global epilogue) and 2, 4 and 8 (K = 512, 1024, 2048: summed in one block; 48 rows, 3 tiles, leave
    an inactive tile in a block); from 17 tokens the tiled kernel's 2 slices (one or two token tiles; 144
    rows: a second block of one active warp): the slices' partials summed in slice order, deterministically.
    200 tokens: four token tiles, one slice (two tiles of 128 and two slices in a lab build with
    S3_LAB_TILED_NT_LARGE=16)."""
    gen = torch.Generator().manual_seed(seed)
    order = PATTERNS[pattern]
    for M, K, n in ((48, 768, 6), (16, 1536, 16), (16, 4352, 1), (16, 4352, 16), (48, 512, 1), (48, 1024, 6),
                    (16, 2048, 16), (16, 1024, 40), (48, 2048, 70), (144, 1024, 20), (16, 1024, 200)):
        W, values, sp_meta = sp24_case(M, K, torch.float16, device, gen, pattern)
        x = torch.randn(n, K, generator=gen).to(dtype=torch.float16, device=device)
        bias = torch.randn(M, generator=gen).to(dtype=torch.float16, device=device)
        want = ref.sp24_linear(x, values, sp_meta, M, bias, False, order)
        for checked in (False, True):
            got = ops.sp24_linear(x, values, sp_meta, M, bias, checked, order)
            _assert_close(got, want, x, W, torch.float16, f"{M}x{K}, {n} tokens, checked={checked}")
            assert torch.equal(ops.sp24_linear(x, values, sp_meta, M, bias, checked, order), got), "not deterministic"


def test_sp24_column_orders_are_the_oracles():
    """The builder's column tables (s3sparse.sparse.sp24) and the oracle's formulas (reference.sp24_columns,
    sp24_stored) agree, and each order makes its pattern 2:4: every virtual group of 4 keeps 2."""
    from s3sparse.sparse import sp24 as sp

    for order in (0, 1, 2):
        cols = ref.sp24_columns(64, order)
        assert cols.tolist() == [16 * c + v for c in range(4) for v in sp._CHUNK_COLUMNS[order]]
        assert ref.sp24_stored(32, order).tolist() == [4 * c + v for c in range(8) for v in sp._QUAD_STORED[order]]
    gen = torch.Generator().manual_seed(0)
    for pattern, order in PATTERNS.items():
        W, _, _ = sp24_case(16, 128, torch.float16, "cpu", gen, pattern)
        kept = (W[:, ref.sp24_columns(128, order)] != 0).view(16, 32, 4).sum(-1)
        assert bool((kept == 2).all()), pattern


@pytest.mark.parametrize("dtype", HALVES, ids=_id)
def test_sp24_linear_rounds_once_when_the_bias_cancels(device, dtype):
    """Each row's x Wᵀ is 1 + 2⁻¹² (not a 16-bit number) and b = -1: the exact output, 2⁻¹², comes back
    only if the bias is added before the one rounding (also across the kernel's K slices)."""
    M, K = 32, 256
    W = torch.zeros(M, K, dtype=dtype)
    W[:, 0], W[:, 200] = 1.0, 2.0**-12
    packed = PackedWeight.from_pattern(W.to(device), "2:4")
    sp_meta = sp24_meta_words(packed)
    bias = torch.full((M,), -1.0, dtype=dtype, device=device)
    for n in (1, 8, 16):
        x = torch.ones(n, K, dtype=dtype, device=device)
        got = ops.sp24_linear(x, packed.values, sp_meta, M, bias)
        assert torch.equal(got.cpu(), torch.full((n, M), 2.0**-12, dtype=dtype)), f"tokens={n}"


def test_sp24_linear_empty_and_unaligned_x(device, seed):
    gen = torch.Generator().manual_seed(seed)
    M, K = 32, 128
    W, values, sp_meta = sp24_case(M, K, torch.float16, device, gen)
    assert ops.sp24_linear(torch.empty(0, K, dtype=torch.float16, device=device), values, sp_meta, M).shape == (0, M)
    assert ops.sp24_linear(torch.empty(2, 0, K, dtype=torch.float16, device=device), values, sp_meta, M).shape == (2, 0, M)
    # x starting 2 or 8 bytes into its storage (the kernel reads x in 4-byte words below 5 tokens, in
    # 16-byte vectors from 5), and a transposed x.
    for n, offset in ((3, 1), (6, 4), (12, 1)):
        base = torch.randn(n * K + offset, generator=gen).to(dtype=torch.float16, device=device)
        x = base[offset:].view(n, K)
        want = ref.sp24_linear(x, values, sp_meta, M, None)
        _assert_close(ops.sp24_linear(x, values, sp_meta, M), want, x, W, torch.float16, f"x offset {2 * offset} bytes, {n} tokens")
    xt = torch.randn(K, 5, generator=gen).to(dtype=torch.float16, device=device).T
    want = ref.sp24_linear(xt, values, sp_meta, M, None)
    _assert_close(ops.sp24_linear(xt, values, sp_meta, M), want, xt, W, torch.float16, "transposed x")


def test_sp24_linear_bad_arguments_raise_clear_errors(device, seed):
    gen = torch.Generator().manual_seed(seed)
    M, K = 32, 128
    _, values, sp_meta = sp24_case(M, K, torch.float16, device, gen)
    x = torch.randn(2, K, generator=gen).to(dtype=torch.float16, device=device)
    cases = [
        (dict(x=x.float()), TypeError, "`x` must be float16 or bfloat16"),
        (dict(values=values.bfloat16()), TypeError, "`values` must have the dtype of `x`"),
        (dict(x=torch.tensor(1.0, dtype=torch.float16, device=device)), ValueError, "`x` must be"),
        (dict(out_features=24), ValueError, "`out_features` must be a positive multiple of 16"),
        (dict(x=x[:, :96]), ValueError, "multiple of 64"),
        (dict(sp_meta=sp_meta.long()), TypeError, "`sp_meta` must be Int"),
        (dict(sp_meta=sp_meta[:1]), ValueError, "`sp_meta` must be"),
        (dict(values=values.reshape(-1)[:-2]), ValueError, "`values` must hold"),
        (dict(values=values.reshape(M, K // 2).T.contiguous().T), ValueError, "`values` must be contiguous"),
        (dict(bias=torch.zeros(M - 1, dtype=torch.float16, device=device)), ValueError, r"`bias` must be \(out_features,\)"),
        (dict(bias=torch.zeros(M, device=device)), TypeError, "`bias` must have the dtype of `x`"),
    ]
    for over, exc, match in cases:
        args = dict(x=x, values=values, sp_meta=sp_meta, out_features=M, bias=None) | over
        with pytest.raises(exc, match=match):
            ops.sp24_linear(**args)


@pytest.mark.parametrize("word", [0, 0x44444447, 0x4444F444, 0x64444444])  # p0 = p1 = 0; then one nibble 3|1<<2, F, 6
def test_sp24_linear_corrupt_metadata_never_passes_as_numbers(device, word):
    """A metadata word that is not two columns p0 < p1 in every nibble: the CPU kernel raises naming it;
    the CUDA kernel (unchecked) makes that 16-row tile's outputs NaN and leaves the other tiles right."""
    gen = torch.Generator().manual_seed(0)
    M, K = 48, 192
    W, values, sp_meta = sp24_case(M, K, torch.float16, device, gen)
    bad = sp_meta.clone()
    bad[1, 2, 5] = torch.tensor(word, dtype=torch.int64).to(torch.int32)  # tile 1: rows 16-31
    x = torch.randn(3, K, generator=gen).to(dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match="p0 < p1"):
        ref.sp24_linear(x, values, bad, M, None)
    if device == "cpu" and not _is_emu():
        with pytest.raises(ValueError, match=r"`sp_meta`\[1, 2, 5\].*sp24_meta_words"):
            ops.sp24_linear(x, values, bad, M)
        return
    got = ops.sp24_linear(x, values, bad, M).cpu()
    assert bool(got[:, 16:32].isnan().all()), "the bad tile's outputs must all be NaN"
    want = ref.sp24_linear(x, values, sp_meta, M, None).cpu()
    _assert_close(got[:, list(range(16)) + list(range(32, 48))], want[:, list(range(16)) + list(range(32, 48))],
                  x, W[list(range(16)) + list(range(32, 48))], torch.float16, "the other tiles")


# ---------------------------------------------------------------- opcheck and torch.compile
@pytest.mark.parametrize("device", REAL_DEVICES)
def test_sp24_linear_opcheck(device):
    gen = torch.Generator().manual_seed(0)
    for dtype in HALVES:
        _, values, sp_meta = sp24_case(32, 128, dtype, device, gen)
        x = torch.randn(2, 3, 128, generator=gen).to(dtype=dtype, device=device)
        bias = torch.randn(32, generator=gen).to(dtype=dtype, device=device)
        torch.library.opcheck(torch.ops.s3sparse.sp24_linear.default, (x, values, sp_meta, 32, bias))
        torch.library.opcheck(torch.ops.s3sparse.sp24_linear.default, (x[0], values, sp_meta, 32, None, True))
        _, values, sp_meta = sp24_case(32, 128, dtype, device, gen, "4:8")
        torch.library.opcheck(torch.ops.s3sparse.sp24_linear.default, (x, values, sp_meta, 32, bias, False, 1))


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
@pytest.mark.parametrize("device", REAL_DEVICES)
def test_sp24_linear_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    W, values, sp_meta = sp24_case(32, 128, torch.float16, device, gen)
    bias = torch.randn(32, generator=gen).to(dtype=torch.float16, device=device)

    def fn(x, v, m, b):
        return torch.relu(ops.sp24_linear(x, v, m, 32, b)) + x.sum(-1, keepdim=True)

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for lead in [(4,), (2, 5)]:
        x = torch.randn(*lead, 128, generator=gen).to(dtype=torch.float16, device=device)
        torch.testing.assert_close(compiled(x, values, sp_meta, bias), fn(x, values, sp_meta, bias))


@pytest.mark.parametrize("device", REAL_DEVICES)
def test_sp24_linear_eager_call_is_the_op_and_leaves_the_rest_to_torch_ops(device):
    """ops.sp24_linear's eager fast call (csrc/module.cpp) gives torch.ops' result, returns NotImplemented
    for what it leaves to torch.ops (a numpy int, a tensor subclass), and raises the op's errors."""
    import numpy as np

    assert ops._sp24_linear_call is not None, "s3sparse._C was built without _sp24_linear_call: rebuild"
    gen = torch.Generator().manual_seed(0)
    _, values, sp_meta = sp24_case(32, 128, torch.float16, device, gen)
    x = torch.randn(3, 128, generator=gen).to(dtype=torch.float16, device=device)
    bias = torch.randn(32, generator=gen).to(dtype=torch.float16, device=device)
    for b in (None, bias):
        for checked in (False, True):
            want = torch.ops.s3sparse.sp24_linear.default(x, values, sp_meta, 32, b, checked, 0)
            assert torch.equal(ops._sp24_linear_call(x, values, sp_meta, 32, b, checked, 0), want)
    assert ops._sp24_linear_call(x, values, sp_meta, np.int64(32), None, False, 0) is NotImplemented
    assert ops._sp24_linear_call(x, values, sp_meta, 32, None, 1, 0) is NotImplemented  # (a bool, not an int)
    assert ops._sp24_linear_call(x.as_subclass(torch.nn.Parameter), values, sp_meta, 32, None, False, 0) is not NotImplemented
    with pytest.raises(ValueError, match="`out_features` must be a positive multiple of 16"):
        ops._sp24_linear_call(x, values, sp_meta, 24, None, False, 0)
    with pytest.raises(ValueError, match="`column_order` must be 0"):
        ops._sp24_linear_call(x, values, sp_meta, 32, None, False, 3)
    with pytest.raises(TypeError, match="7 arguments"):
        ops._sp24_linear_call(x, values, sp_meta, 32, None, False)


@pytest.mark.skipif(not EMU_LIB, reason="the host emulator's stand-in for graph capture (S3SPARSE_CUDA_EMU)")
def test_sp24_linear_captured_launches_cuda_emu(seed, monkeypatch):
    """Launches made while the stream reports a capture take their tile counters from the arena an eager
    launch made (or a fresh zeroed buffer): the emulator's stream reports one on request, and every such
    launch, one or several a call, computes the layer; eager launches after them still do."""
    import ctypes

    use_emulator(monkeypatch)
    lib = ctypes.CDLL(EMU_LIB)
    gen = torch.Generator().manual_seed(seed)
    W, values, sp_meta = sp24_case(48, 192, torch.float16, "cpu", gen)
    xs = [torch.randn(n, 192, generator=gen).half() for n in (1, 17, 3)]

    def check(what):
        for x in xs:
            _assert_close(ops.sp24_linear(x, values, sp_meta, 48), ref.sp24_linear(x, values, sp_meta, 48, None),
                          x, W, torch.float16, f"{what}, {x.shape[0]} tokens")

    check("eager")  # (makes the arena)
    lib.s3emu_set_capturing(1)
    try:
        check("captured")
        check("captured again")
    finally:
        lib.s3emu_set_capturing(0)
    check("eager after")
