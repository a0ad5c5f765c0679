"""PackedWeight and PackedLinear (s3sparse.sparse): packing any S3 pattern, exact round trips,
the product, state dicts and safetensors files without spec objects, torch.compile."""

from __future__ import annotations

import copy
import math
import pickle
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from s3sparse import BlockCoupling, BlockSpec, ScopeCoupling, ScopeSpec, View, patterns
from s3sparse import reference as ref
from s3sparse.llm import parse_pattern
from s3sparse.errors import ArgumentError
from s3sparse.sparse import PackedLinear, PackedWeight
from s3sparse.sparse.linear import _versions
from spec_utils import prune_randomly, random_covering_scope

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REFERENCE = ["2:4", "4:8", "coupled-2:4", "block16-rows"]
# Every form of the pattern names (s3sparse/patterns.py: parse_pattern), on 32 x 64.
REGISTRY_NAMES = REFERENCE + [
    "1:4", "2:8", "nm:4:8", "nm-blocks:2:4:4", "coupled-1:4", "block8-rows4", "block4-rows",
    "channels:0.5", "columns:0.25", "col-blocks:8:0.5",
]


def _id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def pruned_weight(name: str, M: int = 32, K: int = 64, dtype=torch.float32, device="cpu"):
    """(W, scope, nnz): a random weight pruned by magnitude to the registry pattern ``name``."""
    W = nn.Parameter(torch.randn(M, K, dtype=torch.float64).to(dtype=dtype, device=device))
    scope, nnz = parse_pattern(name).build(W)
    scope.hard_threshold(nnz=nnz)
    return W, scope, nnz


def kept_indices(p: PackedWeight) -> torch.Tensor:
    """(S, nnz) in-scope indices of the kept blocks, decoded with the oracle's field reader."""
    S, nnz = p.num_scopes, p.nnz
    if p.subsets is not None:
        return p.subsets.long().cpu()[ref.packed_fields(p.meta.cpu(), p.meta_bits, S)]
    return ref.packed_fields(p.meta.cpu(), p.meta_bits, S * nnz).view(S, nnz)


def check_against_spec(W: torch.Tensor, scope: ScopeSpec, p: PackedWeight) -> None:
    """Round trip exact; kept blocks agree with the ScopeSpec's own block order and norms."""
    assert torch.equal(p.to_dense().cpu(), W.detach().cpu()), p
    assert torch.equal(ref.packed_to_dense(p.values.cpu(), p.meta.cpu(), None if p.subsets is None else p.subsets.cpu(),
                                           p.block_off.cpu(), p.elem_off.cpu(), p.scope_shape, p.scope_stride,
                                           p.meta_bits, *p.shape), W.detach().cpu())
    norms = scope.block_norms().reshape(p.num_scopes, -1).cpu()  # the spec's in-scope order
    kept = kept_indices(p)
    assert bool((kept[:, 1:] > kept[:, :-1]).all()), "kept blocks by increasing in-scope index"
    nonzero = norms != 0
    picked = torch.zeros_like(nonzero)
    picked.scatter_(1, kept, True)
    assert bool((nonzero <= picked).all()), "every non-zero block is kept"
    # The packed blocks are the spec's blocks at those indices (norms agree to the norms' rounding).
    torch.testing.assert_close(torch.linalg.vector_norm(p.values.cpu().double(), dim=-1),
                               norms.gather(1, kept).double(), rtol=1e-2, atol=0)


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", FLOATS, ids=_id)
@pytest.mark.parametrize("name", REGISTRY_NAMES)
def test_round_trip_every_registry_pattern(name, dtype):
    W, scope, nnz = pruned_weight(name, dtype=dtype)
    p = PackedWeight.from_pattern(W, name)
    check_against_spec(W, scope, p)
    assert p.dtype == dtype and p.shape == (32, 64) and p.device.type == "cpu"
    assert p.pattern["registry_name"] == parse_pattern(name).name and p.pattern["nnz"] == nnz
    for fmt in ("subsets", "indices"):
        if fmt == "subsets" and math.comb(scope.numblk_per_scope(), nnz) > 4096:
            continue
        q = PackedWeight.from_scope(scope, nnz, index_format=fmt)
        assert q.index_format == fmt
        check_against_spec(W, scope, q)


@pytest.mark.parametrize(
    "name,row_group,index_format,meta_bits",
    [("2:4", 1, "subsets", 3), ("4:8", 1, "subsets", 3), ("coupled-2:4", 1, "subsets", 3),
     ("block16-rows", 16, "indices", 1), ("channels:0.5", 32, "indices", 5), ("columns:0.25", 32, "indices", 6)],
)
def test_format_choices(name, row_group, index_format, meta_bits):
    # One scope over all 32 rows (channels, columns) is one row group of 32.
    W, scope, nnz = pruned_weight(name)
    p = PackedWeight.from_scope(scope, nnz)
    assert (p.row_group, p.index_format, p.meta_bits) == (row_group, index_format, meta_bits), p


def test_no_row_group_beyond_64_rows():
    W, scope, nnz = pruned_weight("channels:0.5", M=128)
    assert PackedWeight.from_scope(scope, nnz).row_group == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False), extra_zero=st.sampled_from([0.0, 0.3]),
       transposed=st.booleans(), fmt=st.sampled_from(["auto", "indices"]))
def test_round_trip_random_specs(rng, extra_zero, transposed, fmt):
    param, scope, nnz = random_covering_scope(rng, torch.float32, transposed=transposed)
    prune_randomly(scope, nnz, extra_zero)
    p = PackedWeight.from_scope(scope, nnz, index_format=fmt)
    check_against_spec(param, scope, p)
    M, K = param.shape
    x = torch.randn(3, K)
    torch.testing.assert_close(p.linear(x), torch.nn.functional.linear(x, param.detach()), rtol=1e-5, atol=1e-5)
    # The row-group promise holds on the actual element rows whenever it is made.
    if p.row_group:
        R = p.row_group
        flat = ref._packed_flat_offsets(p.num_scopes, p.nnz, p.meta, p.subsets, p.block_off, p.elem_off,
                                        p.scope_shape, p.scope_stride, p.meta_bits)
        rows = flat // K
        group = torch.arange(p.num_scopes) // (p.num_scopes * R // M)
        assert bool(((rows >= group[:, None, None] * R) & (rows < (group[:, None, None] + 1) * R)).all())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False), transposed=st.booleans())
def test_packed_positions_are_the_pruners_positions(rng, transposed):
    """One scope geometry: where the packed format puts element e of block g of scope s is where the
    second-order pruners find it (row, column), for row-major and transposed weights alike."""
    from s3sparse.pruners.layout import scope_layout
    from s3sparse.sparse.format import packed_geometry

    param, scope, _ = random_covering_scope(rng, torch.float32, transposed=transposed)
    layout = scope_layout(scope)
    K = param.shape[1]
    assert torch.equal(packed_geometry(scope).offsets(), layout.rows * K + layout.cols)


def test_padding_scopes_with_fewer_blocks():
    W = nn.Parameter(torch.randn(4, 16))
    scope, nnz = patterns.nm(W)
    scope.hard_threshold(nnz=nnz)
    with torch.no_grad():
        W[0, 0:4] = 0          # scope 0: no block at all
        W[1, 4:8] = torch.tensor([0.0, 0.0, 0.0, 5.0])  # scope 5: one block, the last
    p = PackedWeight.from_scope(scope, nnz)
    kept = kept_indices(p)
    assert kept[0].tolist() == [0, 1] and kept[5].tolist() == [0, 3]
    assert p.values[0].abs().sum() == 0 and p.values[5, :, 0].tolist() == [0.0, 5.0]
    assert torch.equal(p.to_dense(), W.detach())
    # NaN is a non-zero value; an all-zero weight packs too.
    with torch.no_grad():
        W[2, 8] = math.nan
    scope, _ = patterns.nm(W)
    got = PackedWeight.from_scope(scope, 3).to_dense()  # the NaN scope holds 3 non-zero blocks now
    assert got.isnan().sum() == 1 and torch.equal(got.nan_to_num(7.0), W.detach().nan_to_num(7.0))
    Z = nn.Parameter(torch.zeros(8, 32))
    assert torch.equal(PackedWeight.from_pattern(Z, "4:8").to_dense(), Z.detach())


def test_over_budget_names_the_scope():
    W = nn.Parameter(torch.randn(4, 16))
    scope, nnz = patterns.nm(W)
    scope.hard_threshold(nnz=nnz)
    with torch.no_grad():
        W[1, 4:8] = 1.0  # scope grid (4, 4): scope 5 at position (1, 1), 4 non-zero blocks
        W[3, 12:16] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"scope 5 \(position \(1, 1\) in the scope grid \(4, 4\); it starts near "
                                         r"W\[1, 4\]\) has 4 non-zero blocks, more than nnz=2 \(2 of 16 scopes"):
        PackedWeight.from_scope(scope, nnz)
    W2, scope2, nnz2 = pruned_weight("block16-rows")
    with torch.no_grad():
        W2[16, 16:32] = 1.0  # rows 16 and 24 now both hold block 1 of group 1
        W2[16 + 8, 16:32] = 1.0
    with pytest.raises(ValueError, match=r"position \(1, 0, 1\) .* has 2 non-zero blocks, more than nnz=1"):
        PackedWeight.from_scope(scope2, nnz2)


def test_refusals_say_what_to_do():
    W = nn.Parameter(torch.randn(8, 16))
    V = nn.Parameter(torch.randn(16, 8))
    s1, _ = patterns.nm(W)
    s2, _ = patterns.nm(nn.Parameter(torch.randn(8, 16)))
    with pytest.raises(ValueError, match="ScopeCoupling.*pack each member.*s3sparse.sparse.compact"):
        PackedWeight.from_scope(ScopeCoupling([s1, s2]), 2)
    coupling = BlockCoupling([BlockSpec(W, (1, -1)), BlockSpec(View(V, (8, 16), (1, 8)), (1, -1))])
    with pytest.raises(ValueError, match="BlockCoupling.*pack each tensor.*s3sparse.sparse.compact"):
        PackedWeight.from_scope(ScopeSpec(coupling, (-1,)), 4)
    T = nn.Parameter(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="3-D parameter.*reshape it to 2-D"):
        PackedWeight.from_scope(ScopeSpec(BlockSpec(T, (1, 1, 1)), (1, 1, 4)), 2)
    half = View(W, (8, 8), (16, 1))
    with pytest.raises(ValueError, match="covers 64 of the 8×16 = 128 elements"):
        PackedWeight.from_scope(ScopeSpec(BlockSpec(half, (1, 1)), (1, 4)), 2)
    with pytest.raises(ValueError, match=r"`nnz` must be in \[0, 4\]"):
        PackedWeight.from_scope(s1, 5)
    with pytest.raises(TypeError, match="`nnz` must be an int"):
        PackedWeight.from_scope(s1, 2.0)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        PackedWeight.from_scope(patterns.nm(torch.randint(0, 3, (4, 8), dtype=torch.int32))[0], 2)
    with pytest.raises(ValueError, match="dense: there is nothing to pack"):
        PackedWeight.from_pattern(W, "dense")
    with pytest.raises(ValueError, match="index_format"):
        PackedWeight.from_scope(s1, 2, index_format="bits")


# ---------------------------------------------------------------- sizes
@pytest.mark.parametrize("name,limit", [("2:4", 0.56), ("4:8", 0.53), ("coupled-2:4", 0.53), ("block16-rows", 0.505)])
def test_packed_size_fp16(name, limit):
    W, scope, nnz = pruned_weight(name, M=256, K=512, dtype=torch.float16)
    p = PackedWeight.from_scope(scope, nnz)
    ratio = p.nbytes / p.dense_nbytes
    assert ratio <= limit, (name, ratio)
    assert p.nbytes == sum(t.numel() * t.element_size() for t in p.state_dict().values())
    assert p.dense_nbytes == 256 * 512 * 2


# ---------------------------------------------------------------- dtype and device
def test_to_dtype_and_device():
    W, scope, nnz = pruned_weight("4:8")
    p = PackedWeight.from_scope(scope, nnz)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        q = p.to(dtype)
        assert q.dtype == dtype and q.meta.dtype == torch.int32 and q.block_off.dtype == torch.int64
        assert torch.equal(q.to_dense(), W.detach().to(dtype))
    assert p.to("cpu", torch.float16).dtype == torch.float16
    assert p.to(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    assert p.dtype == torch.float32  # unchanged
    with pytest.raises(TypeError, match="must stay floating point"):
        p.to(torch.int32)


@pytest.mark.cuda
def test_to_cuda_and_back():
    W, scope, nnz = pruned_weight("coupled-2:4")
    p = PackedWeight.from_scope(scope, nnz).to("cuda")
    assert {t.device.type for t in p.state_dict().values()} == {"cuda"}
    assert torch.equal(p.to_dense().cpu(), W.detach())
    assert torch.equal(p.to("cpu").to_dense(), W.detach())


# ---------------------------------------------------------------- PackedLinear
def pruned_linear(name: str, M=32, K=64, bias=True, dtype=torch.float32, device="cpu") -> nn.Linear:
    lin = nn.Linear(K, M, bias=bias).to(device=device, dtype=dtype)
    scope, nnz = parse_pattern(name).build(lin.weight)
    scope.hard_threshold(nnz=nnz)
    return lin


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_id)
@pytest.mark.parametrize("name", REFERENCE)
def test_packed_linear_equals_f_linear(name, dtype, device):
    lin = pruned_linear(name, dtype=dtype, device=device)
    packed = PackedLinear.from_linear(lin, pattern=name)
    assert packed.in_features == 64 and packed.out_features == 32
    assert torch.equal(packed.weight, lin.weight.detach())
    for lead in [(), (1,), (7,), (2, 3), (0,), (2, 1, 5)]:
        x = torch.randn(*lead, 64, device=device, dtype=dtype)
        with torch.no_grad():
            want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float()).to(dtype)
            got = packed(x)
        assert got.shape == (*lead, 32) and got.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype])


def test_from_linear_with_scope_and_without_bias():
    lin = pruned_linear("4:8", bias=False)
    scope, nnz = patterns.nm_blocks(lin.weight)
    packed = PackedLinear.from_linear(lin, scope, nnz)
    assert packed.bias is None
    x = torch.randn(5, 64)
    torch.testing.assert_close(packed(x), lin(x).detach())
    other, _ = patterns.nm_blocks(nn.Parameter(torch.zeros(32, 64)))
    with pytest.raises(ValueError, match="another tensor than `linear.weight`"):
        PackedLinear.from_linear(lin, other, nnz)
    with pytest.raises(ValueError, match="either `scope` and `nnz`, or `pattern`"):
        PackedLinear.from_linear(lin, scope, nnz, pattern="4:8")
    with pytest.raises(ValueError, match="`nnz`"):
        PackedLinear.from_linear(lin, scope)
    with pytest.raises(ValueError, match="more than nnz=2"):
        PackedLinear.from_linear(nn.Linear(64, 32), pattern="2:4")  # not pruned


def _model(names=("2:4", "block16-rows"), dtype=torch.float32):
    first = pruned_linear(names[0], M=32, K=64, dtype=dtype)
    second = pruned_linear(names[1], M=16, K=32, bias=False, dtype=dtype)
    return nn.Sequential(first, nn.ReLU(), second)


def _packed_model(dense: nn.Sequential, names=("2:4", "block16-rows")) -> nn.Sequential:
    return nn.Sequential(PackedLinear.from_linear(dense[0], pattern=names[0]), nn.ReLU(),
                         PackedLinear.from_linear(dense[2], pattern=names[1]))


def test_packed_weight_safetensors_round_trip(tmp_path):
    for name in REFERENCE + ["channels:0.5"]:
        W, scope, nnz = pruned_weight(name, dtype=torch.float16)
        p = PackedWeight.from_pattern(W, name)
        path = tmp_path / f"{name.replace(':', '_')}.safetensors"
        p.save(path, metadata={"layer": "demo"})
        del scope
        q = PackedWeight.load(path)
        assert q.pattern == p.pattern and q.config() == p.config()
        for k, t in p.state_dict().items():
            assert torch.equal(q.state_dict()[k], t), k
        assert torch.equal(q.to_dense(), W.detach())
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            assert f.metadata()["layer"] == "demo"


def test_packed_linear_state_dict_safetensors_load_without_specs(tmp_path):
    from safetensors.torch import load_file, save_file

    dense = _model()
    model = _packed_model(dense)
    x = torch.randn(4, 64)
    want = model(x)
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    configs = {i: model[i].config() for i in (0, 2)}
    state = load_file(str(path))
    # 1. From the state alone (the geometry tensor describes every module).
    rebuilt = nn.Sequential(PackedLinear.from_state_dict(state, "0."), nn.ReLU(), PackedLinear.from_state_dict(state, "2."))
    assert torch.equal(rebuilt(x), want)
    # 2. Empty modules of the right shapes from the configs, swapped in, then load_state_dict.
    skeleton = _model()
    for i, cfg in configs.items():
        skeleton[i] = PackedLinear.from_config(cfg)
    assert not torch.equal(skeleton(x), want)
    skeleton.load_state_dict(state)
    assert torch.equal(skeleton(x), want)
    assert torch.equal(skeleton[0].weight, dense[0].weight.detach())
    assert skeleton[0].pattern == model[0].pattern and skeleton[2].bias is None
    # A state of another geometry is refused with a message saying what to do.
    other = PackedLinear.from_linear(pruned_linear("4:8"), pattern="4:8")
    with pytest.raises(RuntimeError, match="packed geometry .* differs .* PackedLinear.from_state_dict"):
        skeleton[0].load_state_dict(other.state_dict())


def test_packed_linear_module_dtype_and_device_moves():
    model = _packed_model(_model())
    x = torch.randn(3, 64)
    want = model(x)
    half = model.half()
    assert half[0].values.dtype == torch.float16 and half[0].meta.dtype == torch.int32
    assert half[0].bias.dtype == torch.float16
    torch.testing.assert_close(half(x.half()).float(), want, rtol=1e-2, atol=1e-2)
    assert half[0].packed.dtype == torch.float16 and half[0].nbytes < 32 * 64 * 2


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_sequential(device):
    torch._dynamo.reset()
    model = _packed_model(_model()).to(device)
    compiled = torch.compile(model, fullgraph=True)
    for lead in [(4,), (2, 3)]:
        x = torch.randn(*lead, 64, device=device)
        torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.cuda
def test_packed_linear_cuda_matches_cpu():
    for name in REFERENCE:
        lin = pruned_linear(name, M=64, K=256, dtype=torch.float16)
        packed = PackedLinear.from_linear(lin, pattern=name)
        x = torch.randn(9, 256, dtype=torch.float16)
        on_gpu = copy.deepcopy(packed).to("cuda")  # Module.to moves in place: keep the CPU one
        for tokens in (1, 9, 40):  # the decode kernels and the expanded-workspace GEMM
            xt = torch.randn(tokens, 256, dtype=torch.float16)
            torch.testing.assert_close(on_gpu(xt.cuda()).cpu(), packed(xt), rtol=2e-3, atol=2e-3)


def _graph_replayed(module, x: torch.Tensor) -> torch.Tensor:
    """module(x) captured in a CUDA graph, x then refilled in place and the graph replayed: the output."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = module(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    return y


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 16, 40])  # the decode kernel and the expanded-workspace GEMM
def test_packed_linear_cuda_graph_replay_and_the_tables_check(tokens):
    torch.manual_seed(0)
    lin = pruned_linear("2:4", M=256, K=512, dtype=torch.float16).cuda()
    packed = PackedLinear.from_linear(lin, pattern="2:4")
    x = torch.randn(tokens, 512, dtype=torch.float16, device="cuda")

    def want(x):
        return torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())

    torch.testing.assert_close(packed(x).float(), want(x), rtol=2e-3, atol=2e-3)
    assert packed._holds_checked_tables()  # the first call checked the tables
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        packed(x)  # warm-up outside the capture, as CUDA graphs require
    torch.cuda.current_stream().wait_stream(side)
    y = _graph_replayed(packed, x)
    torch.testing.assert_close(y.float(), want(x), rtol=2e-3, atol=2e-3)
    # A table replaced by another tensor is checked again: a bad code raises, it is not NaN.
    good = packed.meta
    bad = good.clone()
    bad[0] |= 7
    packed.meta = bad
    with pytest.raises(ValueError, match="subset code"):
        packed(x)
    packed.meta = good
    torch.testing.assert_close(packed(x).float(), want(x), rtol=2e-3, atol=2e-3)
    # So are tables changed in place.
    with torch.no_grad():
        packed.meta[0] |= 7
    with pytest.raises(ValueError, match="subset code"):
        packed(x)


def test_check_tables_raises_on_bad_data_and_loads_or_moves_reset_the_compiled_trust():
    """check_tables() checks now (a ValueError for a bad code, on the CPU as on a GPU); the flag that
    compiled calls trust (tables checked, not replaced since) drops on load_state_dict and on .to()."""
    packed = PackedLinear.from_linear(pruned_linear("2:4", M=32, K=64), pattern="2:4")
    assert packed.check_tables() is packed
    state = copy.deepcopy(packed.state_dict())
    for change in (lambda: packed.load_state_dict(state), lambda: packed.to(torch.float64), lambda: packed.to("cpu")):
        b = packed._buffers
        tables = (b["meta"], b["subsets"], b["block_off"], b["elem_off"])
        packed._tables_ok, packed._checked_tables = True, (*tables, _versions(*tables))
        change()  # (a cast or a no-op move keeps the index tables' storage: the key alone would still match)
        assert packed._tables_ok is False and packed._checked_tables is None
    # A pickled or deep-copied module checks its tables again (the tensors keep their identity and versions).
    b = packed._buffers
    tables = (b["meta"], b["subsets"], b["block_off"], b["elem_off"])
    packed._tables_ok, packed._checked_tables = True, (*tables, _versions(*tables))
    assert packed._holds_checked_tables()
    for copied in (pickle.loads(pickle.dumps(packed)), copy.deepcopy(packed)):
        assert copied._tables_ok is False and copied._checked_tables is None and not copied._holds_checked_tables()
    with torch.no_grad():
        packed.meta[0] |= 7
    with pytest.raises(ValueError, match="subset code"):
        packed.check_tables()


def _without_a_host_sync(fn, x):
    """``fn(x)`` with CUDA's sync debug mode raising on any host sync."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_compiled_packed_linear_runs_without_a_host_sync_once_its_tables_are_checked():
    """After check_tables(), a compiled call passes checked=True: no host sync (sync debug mode raises on
    one); after a move the compiled module syncs again (checks) and still computes the layer."""
    torch.manual_seed(0)
    lin = pruned_linear("2:4", M=256, K=512, dtype=torch.float16).cuda()
    packed = PackedLinear.from_linear(lin, pattern="2:4").check_tables()
    assert packed._tables_ok
    x = torch.randn(1, 512, dtype=torch.float16, device="cuda")
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    step = torch.compile(packed, fullgraph=True)
    torch.testing.assert_close(step(x).float(), want, rtol=2e-3, atol=2e-3)  # (compiles)
    torch.testing.assert_close(_without_a_host_sync(step, x).float(), want, rtol=2e-3, atol=2e-3)
    packed.to("cuda")  # a no-op move: the tables keep their storage, yet the check is forgotten
    assert not packed._tables_ok and packed._checked_tables is None
    torch.testing.assert_close(step(x).float(), want, rtol=2e-3, atol=2e-3)  # (recompiled: checked=False)
    assert packed.check_tables()._tables_ok  # checked again: compiled calls trust the tables again
    step(x)  # (recompiles: the flag is guarded)
    torch.testing.assert_close(_without_a_host_sync(step, x).float(), want, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- torch's 2:4 path for large batches
def test_use_semi_structured_refusals_say_what_to_do():
    packed = PackedLinear.from_linear(pruned_linear("2:4", M=64, K=128), pattern="2:4")
    with pytest.raises(ArgumentError, match="CUDA module with float16 or bfloat16"):
        packed.use_semi_structured()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ArgumentError, match="`min_tokens` must be a positive int"):
            packed.use_semi_structured(bad)
    assert packed.use_semi_structured(None) is packed  # off: always allowed
    x = torch.randn(5, 128)
    torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, packed.weight, packed.bias))


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["2:4", "coupled-2:4"])
def test_use_semi_structured_large_batches_equal_the_dense_layer(name):
    lin = pruned_linear(name, M=256, K=512, dtype=torch.float16).cuda()
    packed = PackedLinear.from_linear(lin, pattern=name).use_semi_structured(min_tokens=64)
    dense = lin.weight.double()
    for lead in [(4,), (2, 40), (128,)]:  # below the threshold (packed op), then torch's 2:4 path
        x = torch.randn(*lead, 512, dtype=torch.float16, device="cuda")
        got = packed(x)
        want = torch.nn.functional.linear(x.double(), dense, lin.bias.double())
        assert got.shape == (*lead, 256) and got.dtype == torch.float16
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-2)
    # The buffers change in place: the semi-structured copy follows.
    with torch.no_grad():
        packed.values.mul_(2)
        b = packed.bias.clone()
    x = torch.randn(128, 512, dtype=torch.float16, device="cuda")
    want = torch.nn.functional.linear(x.double(), 2 * dense, b.double())
    torch.testing.assert_close(packed(x).double(), want, rtol=2e-3, atol=4e-2)


# ---------------------------------------------------------------- the dense cache for large batches
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["2:4", "block16-rows", "channels:0.5"])
def test_use_dense_cache_runs_large_batches_dense_and_small_ones_packed(name, device):
    lin = pruned_linear(name, M=64, K=128, device=device)
    packed = PackedLinear.from_linear(lin, pattern=name)
    x_small = torch.randn(2, 3, 128, device=device)  # 6 tokens: below the threshold
    y_small = packed(x_small)
    keys = set(packed.state_dict())
    assert packed.use_dense_cache(min_tokens=16) is packed
    cached = packed._dense[1]
    assert torch.equal(cached, lin.weight.detach())  # the decoded W, exactly
    assert set(packed.state_dict()) == keys  # never saved
    assert torch.equal(packed(x_small), y_small)  # small calls: still the packed op
    for lead in [(16,), (2, 20), (40,)]:
        x = torch.randn(*lead, 128, device=device)
        got = packed(x)
        assert got.shape == (*lead, 64)
        # a large call is F.linear on the cached W, bit for bit
        assert torch.equal(got, torch.nn.functional.linear(x, cached, packed.bias))
        want = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert packed._dense[1] is cached  # built once
    # The values change in place: the copy follows.
    with torch.no_grad():
        packed.values.mul_(2)
    x = torch.randn(32, 128, device=device)
    want = torch.nn.functional.linear(x.double(), 2 * lin.weight.double(), lin.bias.double())
    torch.testing.assert_close(packed(x).double(), want, rtol=1e-5, atol=1e-5)
    assert packed._dense[1] is cached  # refreshed in place (CUDA graphs captured with it see the new W)
    # Values replaced by assignment, the old ones freed, again and again (a freed buffer's address can
    # come back): the copy follows the tensor itself, not its address.
    twice = packed.values.clone()
    for k in (3, 4, 5, 2):
        packed.values = twice / 2 * k
        want = torch.nn.functional.linear(x.double(), k * lin.weight.double(), lin.bias.double())
        torch.testing.assert_close(packed(x).double(), want, rtol=1e-5, atol=1e-5)
    # A cast frees the copy at once; the next large call rebuilds it in the new dtype.
    packed.double()
    assert packed._dense is None and packed._dense_min_tokens == 16
    torch.testing.assert_close(packed(x.double()), want, rtol=1e-12, atol=1e-12)
    assert packed._dense[1].dtype == torch.float64
    # Pickled without the copy; the copy comes back on the next large call.
    again = pickle.loads(pickle.dumps(packed))
    assert again._dense is None
    torch.testing.assert_close(again(x.double()), want, rtol=1e-12, atol=1e-12)
    assert packed.use_dense_cache(None)._dense is None  # off frees it
    torch.testing.assert_close(packed(x.double()), want, rtol=1e-12, atol=1e-12)


def test_use_dense_cache_refusals_and_compiled_calls():
    packed = PackedLinear.from_linear(pruned_linear("4:8", M=32, K=64), pattern="4:8")
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ArgumentError, match="`min_tokens` must be a positive int"):
            packed.use_dense_cache(bad)
    assert packed._dense is None and packed._dense_min_tokens is None  # nothing half-set
    packed.use_dense_cache(8)
    x = torch.randn(16, 64)
    # Compiled code runs the packed op (no graph break: fullgraph), with the same result to fp32 round-off.
    got = torch.compile(packed, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, packed(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_use_dense_cache_in_a_cuda_graph():
    lin = pruned_linear("coupled-2:4", M=256, K=512, dtype=torch.float16, device="cuda")
    packed = PackedLinear.from_linear(lin, pattern="coupled-2:4").use_dense_cache(64)
    x = torch.randn(128, 512, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        packed(x)  # (a large call: the copy exists before the capture)
        torch.cuda.synchronize()
        y = _graph_replayed(packed, x)
        assert torch.equal(y, torch.nn.functional.linear(x, packed._dense[1], packed.bias))


@pytest.mark.cuda
def test_use_semi_structured_refuses_a_weight_that_is_not_2_4():
    lin = pruned_linear("4:8", M=256, K=512, dtype=torch.float16).cuda()
    packed = PackedLinear.from_linear(lin, pattern="4:8")
    with pytest.raises(ArgumentError, match="semi-structured sparsity cannot take this weight"):
        packed.use_semi_structured()
