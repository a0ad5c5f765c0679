"""The sparse tensor cores' metadata of a 2:4 weight (s3sparse.sparse.sp24), checked through a pure-torch
model of what the lab kernel (benchmarks/lab/sp24_lab.cu) hands ``mma.sp`` m16n8k32: its A registers
(the packed values as stored), its metadata words and its B registers (x at the permuted k). The model
follows the PTX ISA fragment layouts; the metadata layout it decodes is the one measured correct on an
H100 (docs/performance.md)."""

import pytest
import torch

from s3sparse import patterns
from s3sparse.sparse import PackedLinear, PackedWeight
from s3sparse.sparse.sp24 import sp24_meta_words

_X_OFFSETS = (0, 32, 4, 36)  # a lane's B registers 0-3 in step 0 (step 1: + 8), after 16 (t // 2) + 2 (t % 2)


def _pruned(M: int, K: int, seed: int, dtype=torch.float16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(M, K, generator=g).to(dtype))
    scope, nnz = patterns.by_name("24", W)
    scope.hard_threshold(nnz=nnz)
    return W.detach()


def _model_linear(x: torch.Tensor, values: torch.Tensor, words: torch.Tensor, M: int) -> torch.Tensor:
    """y = x Wᵀ as the kernel computes it, in float64: each step's dense 16×32 A from the values and the
    metadata the instruction reads (selector s: lanes t = 2 s, 2 s + 1), times its 32×N B."""
    N, K = x.shape
    tiles, iters = M // 16, K // 64
    vals = values.double().view(M, K // 2)
    x = x.double()
    y = torch.zeros(N, M, dtype=torch.float64)
    for T in range(tiles):
        for i in range(iters):
            for s in range(2):
                A = torch.zeros(16, 32, dtype=torch.float64)
                for g in range(8):
                    for half in range(2):  # the lane pair's first (columns 0-7) and second (8-15) word
                        word = int(words[T, i, 4 * g + 2 * s + half]) & 0xFFFFFFFF
                        for r, bits in ((g, word & 0xFFFF), (g + 8, word >> 16)):
                            for jj in range(8):
                                j = 8 * half + jj  # compressed column
                                t, e = (j % 8) // 2, j % 2
                                v = vals[16 * T + r, 32 * i + 8 * t + 4 * s + 2 * (j // 8) + e]
                                A[r, 4 * (j // 2) + ((bits >> (2 * jj)) & 3)] = v
                B = torch.zeros(32, N, dtype=torch.float64)
                for t in range(4):
                    for reg in range(4):
                        for e in range(2):
                            col = 64 * i + 16 * (t // 2) + 2 * (t % 2) + 8 * s + _X_OFFSETS[reg] + e
                            B[8 * reg + 2 * t + e] = x[:, col]
                y[:, 16 * T : 16 * T + 16] += (A @ B).T
    return y


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sp24_meta_words_give_x_wt_through_the_fragment_model(seed, dtype):
    M, K = 32, 128
    W = _pruned(M, K, seed, dtype)
    p = PackedWeight.from_pattern(W, "2:4")
    words = sp24_meta_words(p)
    assert words.shape == (M // 16, K // 64, 32) and words.dtype == torch.int32
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    got = _model_linear(x, p.values, words, M)
    want = x.double() @ W.double().T
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), float((got - want).abs().max())


def test_sp24_meta_words_refuse_what_the_layout_cannot_hold(seed):
    with pytest.raises(ValueError, match="out_features % 16 == 0 and in_features % 64 == 0, got 32x96"):
        sp24_meta_words(PackedWeight.from_pattern(_pruned(32, 96, seed), "2:4"))
    with pytest.raises(ValueError, match="out_features % 16 == 0 and in_features % 64 == 0, got 24x128"):
        sp24_meta_words(PackedWeight.from_pattern(_pruned(24, 128, seed), "2:4"))
    W = torch.nn.Parameter(torch.randn(32, 128, generator=torch.Generator().manual_seed(seed)).half())
    scope, nnz = patterns.by_name("48", W)
    scope.hard_threshold(nnz=nnz)
    with pytest.raises(ValueError, match="keeps M\\*K/2|not 2:4"):
        sp24_meta_words(PackedWeight.from_scope(scope, nnz))
    p = PackedWeight.from_pattern(_pruned(32, 128, seed), "2:4")
    with pytest.raises(ValueError, match="float16 or bfloat16 values, got torch.float32"):
        sp24_meta_words(p.to(torch.float32))
    # A valid format whose values run down the columns of each group (block_off reversed): the kernel would
    # misread it, so it is refused.
    sub = torch.tensor([sorted(3 - v for v in s) for s in p.subsets.tolist()], dtype=p.subsets.dtype)
    flipped = PackedWeight(p.values.flip(1).contiguous(), p.meta.clone(), sub, p.block_off.flip(0).contiguous(),
                           p.elem_off.clone(), p.scope_shape, p.scope_stride, p.meta_bits, 32, 128, p.row_group)
    assert torch.equal(flipped.to_dense(), p.to_dense())
    with pytest.raises(ValueError, match="not stored in the order this column order reads them"):
        sp24_meta_words(flipped)
    strided = p.values.transpose(0, 2).contiguous().transpose(0, 2)
    with pytest.raises(ValueError, match="must be contiguous"):
        sp24_meta_words(PackedWeight(strided, p.meta, p.subsets, p.block_off, p.elem_off, p.scope_shape,
                                     p.scope_stride, p.meta_bits, 32, 128, p.row_group))


# ---------------------------------------------------------------- PackedLinear's sparse tensor-core path
def _module(M: int, K: int, seed: int, pattern: str = "2:4", dtype=torch.float16, device="cpu") -> PackedLinear:
    from s3sparse.patterns import parse_pattern

    g = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter(torch.randn(M, K, generator=g).to(dtype))
    scope, nnz = parse_pattern(pattern).build(W)
    scope.hard_threshold(nnz=nnz)
    bias = torch.randn(M, generator=g).to(dtype)
    return PackedLinear(PackedWeight.from_pattern(W.detach(), pattern), bias).to(device)


def test_packed_linear_builds_the_metadata_for_2_4_4_8_and_coupled(seed):
    """_setup_sp24 (run when the CUDA op accepts the tables) builds sp24_meta for 2:4, 4:8 and coupled 2:4
    fp16 / bf16 weights of a fitting shape, and for nothing else; a reload or a move drops it (rebuilt
    at the next check)."""
    for pattern, order in (("2:4", 0), ("4:8", 1), ("coupled-2:4", 2)):
        m = _module(32, 128, seed, pattern)
        m._checked_tables = ("tables",)  # (what the CUDA op's acceptance records)
        m._setup_sp24()
        assert m._sp24_ok and m._sp24_order == order, pattern
        assert torch.equal(m.sp24_meta, sp24_meta_words(m.packed, order)), pattern
    assert "sp24_meta" not in m.state_dict()
    m.load_state_dict(m.state_dict())
    assert not m._sp24_ok
    for other in (_module(32, 128, seed, "block16-rows"), _module(32, 96, seed),
                  _module(32, 128, seed, dtype=torch.float32), _module(32, 128, seed).use_sp24(None)):
        other._checked_tables = ("tables",)
        other._setup_sp24()
        assert not other._sp24_ok and other.sp24_meta is None, other.extra_repr()
    with pytest.raises(ValueError, match="`max_tokens` must be a non-negative int"):
        m.use_sp24(-1)


def test_packed_linear_builds_the_metadata_on_the_cpu_when_the_device_runs_out(seed, monkeypatch):
    """The metadata's transient (a numbered copy of W) runs out of GPU memory: built on the CPU instead."""
    m = _module(32, 128, seed)
    real, devices = PackedLinear._sp24_form, []

    def form(packed, name):
        devices.append(packed.device.type)
        if len(devices) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(packed, name)

    monkeypatch.setattr(PackedLinear, "_sp24_form", staticmethod(form))
    m._checked_tables = ("tables",)
    m._setup_sp24()
    assert devices == ["cpu", "cpu"] and m._sp24_ok and torch.equal(m.sp24_meta, sp24_meta_words(m.packed))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_linear_takes_the_sparse_tensor_cores_at_decode(seed, dtype, monkeypatch):
    from s3sparse import ops

    calls = []
    real = ops.sp24_linear
    vouched = []
    monkeypatch.setattr(ops, "sp24_linear", lambda *a: calls.append(a[0].shape) or vouched.append(a[5]) or real(*a))
    m = _module(64, 256, seed, dtype=dtype, device="cuda")
    W, b = m.weight.float(), m.bias.float()
    for n in (1, 1, 5, 16, 17, 65, 128, 129):  # the first call checks the tables (the packed op) and builds the metadata
        x = torch.randn(n, 256, device="cuda", dtype=dtype)
        want = torch.nn.functional.linear(x.float(), W, b)
        torch.testing.assert_close(m(x).float(), want, rtol=1e-2, atol=2e-2)
    assert calls == [(1, 256), (5, 256), (16, 256), (17, 256), (65, 256), (128, 256)], calls  # (129: packed kernels)
    assert vouched == [True] * 6  # (its own metadata: the kernel skips the check)
    with pytest.raises(TypeError, match="`x` must have the dtype of `values`"):  # (packed_linear's error, not sp24's)
        m(torch.randn(1, 256, device="cuda"))
    m.sp24_meta.add_(0)  # an in-place change: no longer vouched for, checked by the kernel
    m(torch.randn(2, 256, device="cuda", dtype=dtype))
    assert vouched[-1] is False
    # Graph capture and replay through the same path.
    x = torch.randn(4, 256, device="cuda", dtype=dtype)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = m(x)
    x.copy_(torch.randn(4, 256, device="cuda", dtype=dtype))
    graph.replay()
    torch.testing.assert_close(y.float(), torch.nn.functional.linear(x.float(), W, b), rtol=1e-2, atol=2e-2)
    # 4:8 and coupled 2:4 take it too; a 16-column block pattern stays on the packed kernels.
    for pattern, want_calls in (("4:8", 1), ("coupled-2:4", 1), ("block16-rows", 0)):
        calls.clear()
        mp = _module(64, 256, seed, pattern, dtype=dtype, device="cuda")
        Wp, bp = mp.weight.float(), mp.bias.float()
        for _ in range(2):
            x = torch.randn(2, 256, device="cuda", dtype=dtype)
            torch.testing.assert_close(mp(x).float(), torch.nn.functional.linear(x.float(), Wp, bp), rtol=1e-2, atol=2e-2)
        assert len(calls) == want_calls, pattern
