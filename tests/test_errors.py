"""Bad arguments, tried as a new user would, against every pruner.

For each mistake and each pruner (magnitude, OBD, SparseGPT, StructuredOBS.prune
and .prune_true_obs, and the reference's functional wrappers) the call must
raise an :class:`~s3sparse.errors.S3Error` that is also the built-in kind
(``ValueError`` / ``TypeError``), whose message names the argument and says what
to do, and must leave the weight exactly as it was. One shared check decides
each argument, so the same value is accepted or refused by every pruner alike.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import numpy as np
import pytest
import torch

import s3sparse
from s3sparse import (
    ArgumentError,
    ArgumentIndexError,
    ArgumentTypeError,
    BlockSpec,
    S3Error,
    ScopeSpec,
    SpecError,
    StructuredOBS,
    UnknownNameError,
    View,
    patterns,
    prune_magnitude,
    prune_obd,
    prune_sparsegpt,
)
from s3sparse.pruners.functional import magnitude, obd_prune, sparsegpt_block16, sparsegpt_coupled_24, sparsegpt_prune

from pruner_utils import assert_pattern_holds, make_layer

M, K = 16, 32  # 16 rows and 32 columns fit every reference pattern (block16 needs 16 | M, 16 | K)

# ---------------------------------------------------------------- the pruners, uniformly
# Scope-based pruners: fn(W, H, nnz, **options) prunes W (in place) to 2:4.
SCOPE_PRUNERS: dict[str, Callable] = {
    "magnitude": lambda W, H, nnz, **kw: prune_magnitude(patterns.nm(W, 2, 4)[0], nnz, **kw),
    "obd": lambda W, H, nnz, **kw: prune_obd(patterns.nm(W, 2, 4)[0], H, nnz, **kw),
    "sparsegpt": lambda W, H, nnz, **kw: prune_sparsegpt(patterns.nm(W, 2, 4)[0], H, nnz, **kw),
    "obs_prune": lambda W, H, nnz, **kw: StructuredOBS(patterns.nm(W, 2, 4)[0], H).prune(nnz, **kw),
    "obs_full": lambda W, H, nnz, **kw: StructuredOBS(patterns.nm(W, 2, 4)[0], H).prune(nnz, compensate="full", **kw),
    "true_obs": lambda W, H, nnz, **kw: StructuredOBS(patterns.nm(W, 2, 4)[0], H).prune_true_obs(nnz, **kw),
}
HESSIAN_PRUNERS = [name for name in SCOPE_PRUNERS if name != "magnitude"]

# Functional wrappers: fn(W0, H, num_keep) returns a pruned copy (W0 untouched).
FUNCTIONAL: dict[str, Callable] = {
    "magnitude_fn": lambda W0, H, keep=2: magnitude(W0, 4, keep),
    "obd_prune": lambda W0, H, keep=2: obd_prune(W0, H, 4, keep),
    "sparsegpt_prune": lambda W0, H, keep=2: sparsegpt_prune(W0, H, scope_size=4, num_keep=keep),
    "sparsegpt_coupled_24": lambda W0, H, keep=2: sparsegpt_coupled_24(W0, H),
    "sparsegpt_block16": lambda W0, H, keep=2: sparsegpt_block16(W0, H),
}
FUNCTIONAL_WITH_H = [name for name in FUNCTIONAL if name != "magnitude_fn"]
FUNCTIONAL_WITH_KEEP = ["magnitude_fn", "obd_prune", "sparsegpt_prune"]


@pytest.fixture
def layer(seed):
    W, _, H = make_layer(M, K, 64, seed)
    return W, H


def expect_error(fn, kind: type, *needles: str) -> S3Error:
    """``fn()`` raises ``kind`` (an S3Error and a built-in kind) whose message holds every needle."""
    with pytest.raises(Exception) as info:
        fn()
    err = info.value
    assert isinstance(err, S3Error), f"{type(err).__mro__} is not an S3Error: {err}"
    assert isinstance(err, kind), f"{type(err).__name__} is not a {kind.__name__}: {err}"
    message = str(err)
    for needle in needles:
        assert needle in message, f"{needle!r} not in the message {message!r}"
    return err


def test_the_error_classes_are_also_the_builtin_kinds():
    assert issubclass(ArgumentError, ValueError) and issubclass(ArgumentError, S3Error)
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, S3Error)
    assert issubclass(ArgumentIndexError, IndexError) and issubclass(ArgumentIndexError, S3Error)
    assert issubclass(UnknownNameError, KeyError) and issubclass(UnknownNameError, S3Error)
    for cls in (SpecError, s3sparse.ShapeMismatchError, s3sparse.CouplingError):
        assert issubclass(cls, ArgumentError)
    # Existing `except ValueError` code keeps catching a bad count.
    W = torch.randn(4, 8)
    scope, _ = patterns.nm(W, 2, 4)
    try:
        prune_magnitude(scope, 7)
    except ValueError as err:
        assert "`nnz`" in str(err)
    else:  # pragma: no cover
        raise AssertionError("nnz=7 of 4 was accepted")


# ---------------------------------------------------------------- nnz: one check everywhere
BAD_NNZ = [
    (2.0, ArgumentTypeError, ("got the float 2.0", "int(")),
    (2.5, ArgumentTypeError, ("got the float 2.5",)),
    (True, ArgumentTypeError, ("bool",)),
    ("2", ArgumentTypeError, ("str",)),
    (None, ArgumentTypeError, ("NoneType",)),
    (-1, SpecError, ("[0, 4]", "got -1")),
    (5, SpecError, ("[0, 4]", "got 5")),
]


@pytest.mark.parametrize("pruner", list(SCOPE_PRUNERS))
@pytest.mark.parametrize("nnz,kind,needles", BAD_NNZ, ids=[repr(c[0]) for c in BAD_NNZ])
def test_bad_nnz_is_refused_alike_by_every_pruner(layer, pruner, nnz, kind, needles):
    W0, H = layer
    W = W0.clone()
    expect_error(lambda: SCOPE_PRUNERS[pruner](W, H, nnz), kind, "`nnz`", *needles)
    assert torch.equal(W, W0)


@pytest.mark.parametrize("pruner", FUNCTIONAL_WITH_KEEP)
@pytest.mark.parametrize("keep,kind,needles", BAD_NNZ, ids=[repr(c[0]) for c in BAD_NNZ])
def test_bad_num_keep_is_refused_alike_by_the_functional_wrappers(layer, pruner, keep, kind, needles):
    if keep is None and pruner == "sparsegpt_prune":
        pytest.skip("num_keep=None is sparsegpt_prune's default (half of each scope)")
    W0, H = layer
    keep_copy = W0.clone()
    expect_error(lambda: FUNCTIONAL[pruner](W0, H, keep), kind, "`num_keep`", *needles)
    assert torch.equal(W0, keep_copy)


@pytest.mark.parametrize("pruner", list(SCOPE_PRUNERS))
def test_integer_like_nnz_is_accepted_alike_by_every_pruner(layer, pruner):
    """Anything operator.index takes is an int: the result equals that of a plain int."""
    W0, H = layer
    expected = W0.clone()
    SCOPE_PRUNERS[pruner](expected, H, 2)
    for nnz in (np.int64(2), torch.tensor(2)):
        W = W0.clone()
        SCOPE_PRUNERS[pruner](W, H, nnz)
        assert torch.equal(W, expected), (pruner, type(nnz))


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("pruner", list(SCOPE_PRUNERS))
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int8, torch.bool], ids=str)
def test_integer_weights_are_refused_by_every_pruner(layer, pruner, dtype):
    W0, H = layer
    W = (W0 * 4).to(dtype)
    before = W.clone()
    expect_error(lambda: SCOPE_PRUNERS[pruner](W, H, 2), ArgumentTypeError, "`scope`", str(dtype), ".float()")
    assert torch.equal(W, before)


@pytest.mark.parametrize("pruner", list(FUNCTIONAL))
def test_integer_weights_are_refused_by_the_functional_wrappers(layer, pruner):
    W0, H = layer
    W = (W0 * 4).to(torch.int32)
    before = W.clone()
    expect_error(lambda: FUNCTIONAL[pruner](W, H), ArgumentTypeError, "`W0`", "torch.int32", ".float()")
    assert torch.equal(W, before)


@pytest.mark.parametrize("pruner", list(SCOPE_PRUNERS))
@pytest.mark.parametrize("shape", [(0, K), (M, 0)], ids=["no_rows", "no_cols"])
def test_empty_weights_are_refused_by_every_pruner(pruner, shape):
    W = torch.randn(*shape)
    H = torch.eye(shape[1])
    expect_error(lambda: SCOPE_PRUNERS[pruner](W, H, 2), ArgumentError, "`scope`", "empty", str(tuple(shape)))


@pytest.mark.parametrize("pruner", list(FUNCTIONAL))
@pytest.mark.parametrize("shape", [(0, K), (M, 0)], ids=["no_rows", "no_cols"])
def test_empty_weights_are_refused_by_the_functional_wrappers(pruner, shape):
    W = torch.randn(*shape)
    expect_error(lambda: FUNCTIONAL[pruner](W, torch.eye(shape[1])), ArgumentError, "`W0`", "empty")


@pytest.mark.parametrize("pruner", list(SCOPE_PRUNERS))
def test_meta_weights_are_refused_by_every_pruner(pruner):
    W = torch.empty(M, K, device="meta")
    H = torch.eye(K)
    expect_error(lambda: SCOPE_PRUNERS[pruner](W, H, 2), ArgumentError, "`scope`", "meta", "load")


@pytest.mark.parametrize("pruner", list(FUNCTIONAL))
def test_meta_weights_are_refused_by_the_functional_wrappers(pruner):
    W = torch.nn.Linear(K, M, device="meta").weight
    expect_error(lambda: FUNCTIONAL[pruner](W, torch.eye(K)), ArgumentError, "`W0`", "meta", "load")


@pytest.mark.parametrize("pruner", ["sparsegpt", "obs_prune", "true_obs"])
def test_second_order_pruners_refuse_non_2d_weights(pruner):
    W = torch.randn(4, 4, 8)
    scope = ScopeSpec(BlockSpec(W, (1, 1, 1)), (1, 1, 4))
    if pruner == "sparsegpt":
        fn = lambda: prune_sparsegpt(scope, torch.eye(8), 2)  # noqa: E731
    else:
        fn = lambda: StructuredOBS(scope, torch.eye(8))  # noqa: E731
    expect_error(fn, ArgumentError, "2-D", "`scope`")


# ---------------------------------------------------------------- NaN / Inf: one check up front
NON_FINITE = [float("nan"), float("inf"), float("-inf")]
BAD_AT = (3, 5)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits, so NaN compares equal to itself (``torch.equal`` says NaN != NaN)."""
    return t.detach().clone().view(torch.int32)


def _poisoned(W0: torch.Tensor, value: float) -> torch.Tensor:
    W = W0.clone()
    W[BAD_AT] = value
    W[BAD_AT[0] + 2, 0] = value  # a second bad entry, after the first in row-major order
    return W


def _expect_non_finite(fn, *needles: str) -> s3sparse.NonFiniteError:
    err = expect_error(fn, s3sparse.NonFiniteError, *needles)
    assert isinstance(err, ArgumentError) and isinstance(err, ValueError)
    assert err.index == BAD_AT, err.index
    assert str(BAD_AT) in str(err), "the message gives the first bad index"
    assert "2 of" in str(err), "the message counts the bad entries"
    return err


@pytest.mark.parametrize("pruner", list(SCOPE_PRUNERS))
@pytest.mark.parametrize("value", NON_FINITE, ids=str)
def test_non_finite_weights_are_refused_by_every_pruner(layer, pruner, value):
    """Today magnitude and OBD zero the NaN silently, SparseGPT and OBS raise a bare
    FloatingPointError after the work: now one NonFiniteError, up front, weight untouched."""
    W0, H = layer
    W = _poisoned(W0, value)
    before = _bits(W)
    err = _expect_non_finite(
        lambda: SCOPE_PRUNERS[pruner](W, H, 2), "the weight behind `scope`", f"shape {(M, K)}", "float32", "nan_to_num"
    )
    assert err.name == "the weight behind `scope`"
    assert torch.equal(_bits(W), before)


@pytest.mark.parametrize("pruner", list(FUNCTIONAL))
def test_non_finite_weights_are_refused_by_the_functional_wrappers(layer, pruner):
    W0, H = layer
    W = _poisoned(W0, float("nan"))
    before = _bits(W)
    _expect_non_finite(lambda: FUNCTIONAL[pruner](W, H), "`W0`", "NaN at index (3, 5)")
    assert torch.equal(_bits(W), before)


@pytest.mark.parametrize("method", ["prune", "prune_true_obs"])
def test_structured_obs_checks_the_weight_again_when_it_prunes(layer, method):
    """The weight may have changed since the pruner was built."""
    W0, H = layer
    W = W0.clone()
    pruner = StructuredOBS(patterns.nm(W, 2, 4)[0], H)
    W.copy_(_poisoned(W0, float("inf")))
    before = _bits(W)
    _expect_non_finite(lambda: getattr(pruner, method)(2), "the weight behind `scope`", "Inf at index (3, 5)")
    assert torch.equal(_bits(W), before)


@pytest.mark.parametrize("pruner", ["magnitude", "obd"])
def test_non_finite_weights_are_refused_in_a_coupling(pruner):
    """A ScopeCoupling over two weights: the message names the bad one's block."""
    A = torch.randn(M, K)
    B = _poisoned(torch.randn(M, K), float("nan"))
    before_a, before_b = _bits(A), _bits(B)
    sa = ScopeSpec(BlockSpec(A, (1, 1), name="A"), (1, 4))
    sb = ScopeSpec(BlockSpec(B, (1, 1), name="B"), (1, 4))
    coupling = s3sparse.ScopeCoupling([sa, sb])
    H = torch.eye(K)
    call = {
        "magnitude": lambda: prune_magnitude(coupling, 4),
        "obd": lambda: prune_obd(coupling, {A: H, B: H}, 4),
    }[pruner]
    _expect_non_finite(call, "a weight behind `scope`", "block 'B'")
    assert torch.equal(_bits(A), before_a) and torch.equal(_bits(B), before_b)


def test_non_finite_calibration_inputs_are_refused():
    """compute_hessian and the accumulators refuse NaN/Inf inputs up front, naming the first
    bad index; the accumulator keeps what it had (today they give a NaN Hessian)."""
    X = torch.randn(4, 8, K)
    X[1, 2, 3] = float("inf")
    X[2, 0, 0] = float("nan")

    err = expect_error(lambda: s3sparse.compute_hessian(X), s3sparse.NonFiniteError, "`X`", "(1, 2, 3)", "float32")
    assert err.index == (1, 2, 3)

    acc = s3sparse.HessianAccumulator(K)
    good = torch.randn(5, K)
    acc.add(good)
    expected = acc.hessian
    err = expect_error(lambda: acc.add(X), s3sparse.NonFiniteError, "`x`", "Inf at index (1, 2, 3)", "2 of")
    assert acc.num_samples == 5 and torch.equal(acc.hessian, expected)

    layer = torch.nn.Linear(K, 4)
    handle = acc.attach(layer)
    expect_error(lambda: layer(X), s3sparse.NonFiniteError, "the inputs of the attached `Linear`", "(1, 2, 3)")
    handle.remove()
    assert acc.num_samples == 5 and torch.equal(acc.hessian, expected)


def test_non_finite_error_survives_pickling():
    """Ranks exchange errors by pickling them: the attributes must survive."""
    import pickle

    W = _poisoned(torch.randn(M, K), float("-inf"))
    err = _expect_non_finite(lambda: prune_magnitude(patterns.nm(W, 2, 4)[0], 2), "-Inf at index (3, 5)")
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err) and str(copy) == str(err)
    assert (copy.index, copy.name, copy.value) == (err.index, err.name, err.value)


@pytest.mark.parametrize("pruner", ["sparsegpt", "obs_full", "true_obs"])
def test_a_genuine_numerical_failure_is_a_numerical_error(layer, pruner):
    """Finite weights so large that the compensation overflows float32: a NumericalError
    (an S3Error and a FloatingPointError, not a ValueError), weight untouched."""
    W0, H = layer
    W = W0.sign() * 3e38
    before = W.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # true OBS warns about the rows it redid first
        err = expect_error(lambda: SCOPE_PRUNERS[pruner](W, H, 2), s3sparse.NumericalError, "left unchanged")
    assert isinstance(err, FloatingPointError) and not isinstance(err, ValueError)
    assert torch.equal(W, before)


def test_a_hessian_that_stays_indefinite_is_a_numerical_error():
    from s3sparse.pruners.hessian import damped_inverse

    H = -torch.eye(4)  # accepted by the checks (symmetric, finite) but no damping makes it PD
    err = expect_error(lambda: damped_inverse(H, 0.01, max_tries=2), s3sparse.NumericalError, "not positive definite")
    assert not isinstance(err, ValueError)


# ---------------------------------------------------------------- the scope argument
@pytest.mark.parametrize("pruner", list(SCOPE_PRUNERS))
def test_passing_the_pattern_tuple_says_to_unpack_it(layer, pruner):
    W0, H = layer
    W = W0.clone()
    pattern = patterns.nm(W, 2, 4)  # (scope, nnz): a common slip is to pass it whole
    calls = {
        "magnitude": lambda: prune_magnitude(pattern, 2),
        "obd": lambda: prune_obd(pattern, H, 2),
        "sparsegpt": lambda: prune_sparsegpt(pattern, H, 2),
        "obs_prune": lambda: StructuredOBS(pattern, H),
        "obs_full": lambda: StructuredOBS(pattern, H),
        "true_obs": lambda: StructuredOBS(pattern, H),
    }
    expect_error(calls[pruner], ArgumentTypeError, "`scope`", "scope, nnz = patterns.nm(W)")
    assert torch.equal(W, W0)


@pytest.mark.parametrize("pruner", ["magnitude", "sparsegpt", "obs_prune"])
def test_passing_blocks_instead_of_a_scope_says_what_to_build(layer, pruner):
    W0, H = layer
    block = BlockSpec(W0, (1, 1))
    calls = {
        "magnitude": lambda: prune_magnitude(block, 2),
        "sparsegpt": lambda: prune_sparsegpt(block, H, 2),
        "obs_prune": lambda: StructuredOBS(block, H),
    }
    expect_error(calls[pruner], ArgumentTypeError, "`scope`", "ScopeSpec(block")


# ---------------------------------------------------------------- Hessians
def _bad_hessians(H: torch.Tensor) -> dict[str, tuple[object, type, tuple[str, ...]]]:
    asym = H.clone()
    asym[0, 1] += 0.5 * H.abs().max()
    return {
        "all_zero": (torch.zeros_like(H), ArgumentError, ("all zeros", "compute_hessian(X)")),
        "not_symmetric": (asym, ArgumentError, ("not symmetric", ".T) / 2")),
        "random_matrix": (torch.randn_like(H), ArgumentError, ("not symmetric",)),
        "meta": (torch.empty_like(H, device="meta"), ArgumentError, ("meta", "load")),
        "nan": (H.masked_fill(torch.eye(K, dtype=torch.bool), float("nan")), ArgumentError, ("NaN",)),
        "int_dtype": (H.long(), ArgumentTypeError, ("float",)),
        "wrong_shape": (H[:-1, :-1], ArgumentError, (f"({K}, {K})", "compute_hessian(X)")),
        "a_list": (H.tolist(), ArgumentTypeError, ("got list", "compute_hessian")),
    }


HESSIAN_CASES = list(_bad_hessians(torch.eye(K)))


@pytest.mark.parametrize("pruner", HESSIAN_PRUNERS)
@pytest.mark.parametrize("case", HESSIAN_CASES)
def test_bad_hessians_are_refused_by_every_pruner(layer, pruner, case):
    W0, H = layer
    W = W0.clone()
    bad, kind, needles = _bad_hessians(H)[case]
    expect_error(lambda: SCOPE_PRUNERS[pruner](W, bad, 2), kind, "`hessian`", *needles)
    assert torch.equal(W, W0)


@pytest.mark.parametrize("pruner", FUNCTIONAL_WITH_H)
@pytest.mark.parametrize("case", HESSIAN_CASES)
def test_bad_hessians_are_refused_by_the_functional_wrappers(layer, pruner, case):
    W0, H = layer
    keep = W0.clone()
    bad, kind, needles = _bad_hessians(H)[case]
    expect_error(lambda: FUNCTIONAL[pruner](W0, bad), kind, "`H`", *needles)
    assert torch.equal(W0, keep)


@pytest.mark.parametrize("pruner", HESSIAN_PRUNERS + FUNCTIONAL_WITH_H)
def test_hessians_symmetric_up_to_round_off_are_accepted(seed, pruner):
    """H = XᵀX/N from fp32 GEMMs (or with relative asymmetry 1e-5 added) prunes like its symmetrised self."""
    W0, X, _ = make_layer(M, K, 64, seed)
    H = (X.T @ X / X.shape[0]).float()
    noise = torch.randn(K, K) * 1e-5 * H.abs().max()
    for H_try in (H, H + torch.triu(noise, diagonal=1)):
        assert H_try.dtype == torch.float32
        if pruner in FUNCTIONAL:
            out = FUNCTIONAL[pruner](W0, H_try)
            assert torch.isfinite(out).all()
        else:
            W = W0.clone()
            SCOPE_PRUNERS[pruner](W, H_try, 2)
            assert_pattern_holds("24", W, 2)


def test_a_fp64_hessian_of_fp32_inputs_is_accepted(seed):
    W0, X, _ = make_layer(M, K, 64, seed)
    H = (X.T @ X / 64).double()  # an fp32 GEMM, stored in fp64: asymmetric at fp32 round-off
    W = W0.clone()
    prune_sparsegpt(patterns.nm(W, 2, 4)[0], H, 2)
    assert_pattern_holds("24", W, 2)


def test_a_hessian_mapping_without_the_weight_names_the_argument(layer):
    W0, H = layer
    other = torch.randn(8, 8)
    expect_error(lambda: prune_obd(patterns.nm(W0, 2, 4)[0], {other: H}, 2), UnknownNameError, "`hessian`")
    expect_error(lambda: prune_obd(patterns.nm(W0, 2, 4)[0], "H", 2), ArgumentTypeError, "`hessian`")


def test_output_error_names_its_arguments(layer):
    W0, H = layer
    expect_error(lambda: s3sparse.output_error(W0[:, :-1], W0, H), ArgumentError, "`W_pruned`", "`W_orig`")
    expect_error(lambda: s3sparse.output_error(W0, W0, H.T.contiguous() + torch.triu(H)), ArgumentError, "`H`")
    expect_error(lambda: s3sparse.output_error(W0.tolist(), W0, H), ArgumentTypeError, "`W_pruned`")
    expect_error(lambda: s3sparse.compute_hessian(torch.randn(K)), ArgumentError, "`X`")
    expect_error(lambda: s3sparse.HessianAccumulator(0), ArgumentError, "`num_cols`")
    expect_error(lambda: s3sparse.HessianAccumulator(4.0), ArgumentTypeError, "`num_cols`")


# ---------------------------------------------------------------- the other options
def _option_cases():
    return [
        ("sparsegpt", {"damp": -0.1}, ArgumentError, "`damp`"),
        ("sparsegpt", {"damp": float("nan")}, ArgumentError, "`damp`"),
        ("sparsegpt", {"damp": "0.01"}, ArgumentTypeError, "`damp`"),
        ("sparsegpt", {"blocksize": 0}, ArgumentError, "`blocksize`"),
        ("sparsegpt", {"blocksize": 64.0}, ArgumentTypeError, "`blocksize`"),
        ("sparsegpt", {"progress_fn": "print"}, ArgumentTypeError, "`progress_fn`"),
        ("obs_prune", {"compensate": "nope"}, ArgumentError, "`compensate`"),
        ("obs_prune", {"compensate": "split", "n_splits": 0}, ArgumentError, "`n_splits`"),
        ("obs_prune", {"compensate": "split", "n_splits": 2.0}, ArgumentTypeError, "`n_splits`"),
        ("obs_prune", {"block_size": 0}, ArgumentError, "`block_size`"),
        ("true_obs", {"order": "random"}, ArgumentError, "`order`"),
        ("true_obs", {"scoring": "best"}, ArgumentError, "`scoring`"),
        ("true_obs", {"scoring": "hybrid", "hybrid_tau": 0.5}, ArgumentError, "`hybrid_tau`"),
        ("true_obs", {"hybrid_tau": "4"}, ArgumentTypeError, "`hybrid_tau`"),
        ("true_obs", {"ng": 0}, ArgumentError, "`ng`"),
        ("true_obs", {"ng": 1.5}, ArgumentTypeError, "`ng`"),
        ("true_obs", {"chunk_size": 0}, ArgumentError, "`chunk_size`"),
        ("true_obs", {"c_dtype": torch.int8}, ArgumentError, "`c_dtype`"),
        ("true_obs", {"c_dtype": "float16"}, ArgumentError, "`c_dtype`"),
        ("true_obs", {"progress_fn": 3}, ArgumentTypeError, "`progress_fn`"),
    ]


@pytest.mark.parametrize("pruner,options,kind,needle", _option_cases(), ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_options_are_refused(layer, pruner, options, kind, needle):
    W0, H = layer
    W = W0.clone()
    expect_error(lambda: SCOPE_PRUNERS[pruner](W, H, 2, **options), kind, needle)
    assert torch.equal(W, W0)


@pytest.mark.parametrize("damp", [-1.0, "a lot", math.inf])
def test_structured_obs_refuses_a_bad_damp(layer, damp):
    W0, H = layer
    W = W0.clone()
    kind = ArgumentTypeError if isinstance(damp, str) else ArgumentError
    expect_error(lambda: StructuredOBS(patterns.nm(W, 2, 4)[0], H, damp=damp), kind, "`damp`")
    assert torch.equal(W, W0)


def test_functional_wrappers_refuse_bad_sizes(layer):
    W0, H = layer
    expect_error(lambda: magnitude(W0, 0, 0), ArgumentError, "`scope_size`")
    expect_error(lambda: magnitude(W0, 4.0, 2), ArgumentTypeError, "`scope_size`")
    expect_error(lambda: sparsegpt_prune(W0, H, block_size=0), ArgumentError, "`block_size`")
    expect_error(lambda: sparsegpt_prune(W0[:, :30], H[:30, :30]), ArgumentError, "multiple")
    expect_error(lambda: magnitude(W0.flatten()), ArgumentError, "`W0`", "2-D")


# ---------------------------------------------------------------- the specification layer
def test_spec_layer_errors_are_s3_errors():
    W = torch.randn(8, 16)
    cases = [
        (lambda: View(W, (8, 16), (16,)), SpecError, "`stride`"),
        (lambda: View(W, (8, 17), (16, 1)), SpecError, "past the parameter"),
        (lambda: View(W, (8, 16), (1, 1)), SpecError, "overlap"),
        (lambda: View(W.tolist(), (8, 16), (16, 1)), ArgumentTypeError, "`param`"),
        (lambda: View(W, (8, 16.5), (16, 1)), ArgumentTypeError, "`shape`"),
        (lambda: View(W, (8, 16), (16, 1), offset=1.0), ArgumentTypeError, "`offset`"),
        (lambda: View.from_existing([1, 2]), ArgumentTypeError, "View, Tensor or Parameter"),
        (lambda: View.from_existing(W).linear_offset(torch.tensor([[8, 0]])), ArgumentIndexError, "`idx`"),
        (lambda: View.from_existing(W).linear_offset(torch.tensor([[0.5, 0.0]])), ArgumentTypeError, "`idx`"),
        (lambda: BlockSpec(W, (3, 1)), SpecError, "`shape`"),
        (lambda: BlockSpec(W, (1, "4")), ArgumentTypeError, "`shape`"),
        (lambda: BlockSpec(W, (1, 1)).apply_mask(torch.zeros(8, 16)), ArgumentTypeError, "`mask`"),
        (lambda: BlockSpec(W, (1, 1)).apply_mask(torch.zeros(8, 8, dtype=torch.bool)), s3sparse.ShapeMismatchError, "`mask`"),
        (lambda: ScopeSpec(W, (1, 4)), ArgumentTypeError, "`block`"),
        (lambda: ScopeSpec(BlockSpec(W, (1, 1)), (1, 5)), SpecError, "`shape`"),
        (lambda: ScopeSpec(BlockSpec(W, (1, 1)), (1, 4)).hard_threshold(nnz=2.0), ArgumentTypeError, "`nnz`"),
        (lambda: ScopeSpec(BlockSpec(W, (1, 1)), (1, 4)).sparsity_to_nnz(1.5), SpecError, "`sparsity`"),
        (lambda: patterns.by_name("3:7", W), UnknownNameError, "known patterns"),
        (lambda: patterns.nm(W, 2, 3), SpecError, "multiple of 3"),
        (lambda: patterns.nm(W, 2.0, 4), ArgumentTypeError, "`n`"),
        (lambda: patterns.col_blocks(W, width=True), ArgumentTypeError, "`width`"),
        (lambda: patterns.nm("W"), ArgumentTypeError, "`weight`"),
        (lambda: s3sparse.SparsityBuilder().get_block("nope"), UnknownNameError, "nope"),
        (lambda: s3sparse.SparsityBuilder().add_block(W, (1, 1), ""), ArgumentTypeError, "`name`"),
        (lambda: s3sparse.tensor_ops.kth_largest_value(torch.randn(3, 4), 2.0), ArgumentTypeError, "`k`"),
        (lambda: BlockSpec(W, (1, 4)).norms(p="2"), ArgumentTypeError, "`p`"),
        (lambda: BlockSpec(W, (1, 4)).reduce(W, lambda t: 1), ArgumentTypeError, "`fn`"),
        (lambda: BlockSpec(W, (1, 4)).norms(torch.ones(8, 16, device="meta")), SpecError, "`values`"),
        (lambda: s3sparse.output_error(W, W, torch.eye(16), N="8"), ArgumentTypeError, "`N`"),
    ]
    for fn, kind, needle in cases:
        expect_error(fn, kind, needle)


def test_spec_layer_errors_leave_the_weight_untouched():
    W = torch.randn(8, 16)
    W0 = W.clone()
    scope = ScopeSpec(BlockSpec(W, (1, 1)), (1, 4))
    for fn in (
        lambda: scope.hard_threshold(nnz=9),
        lambda: scope.hard_threshold(thresholds=1.0, nnz=2),
        lambda: scope.block.apply_mask(torch.zeros(8, 15, dtype=torch.bool)),
        lambda: scope.block.soft_threshold(-1.0),
    ):
        with pytest.raises(S3Error):
            fn()
        assert torch.equal(W, W0)


def test_ops_wrappers_refuse_bad_arguments_with_s3_errors():
    x = torch.randn(8, 16)
    expect_error(lambda: s3sparse.ops.block_reduce(x, [8, 16], [16, 1], 0, [3, "a"]), ArgumentTypeError, "`block`")
