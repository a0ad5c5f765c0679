"""The method classes (Magnitude, OBD, SparseGPT, SharedOBS, TrueOBS): their options are
checked when built, and what the options say a method can do is what ``prune`` does."""

from __future__ import annotations

import pytest
import torch

from s3sparse import (
    OBD,
    ArgumentError,
    ArgumentTypeError,
    Magnitude,
    SharedOBS,
    SharedOBSOptions,
    SparseGPT,
    SparseGPTOptions,
    TrueOBS,
    TrueOBSOptions,
    patterns,
)

from pruner_utils import assert_pattern_holds, make_layer

METHODS = [Magnitude, OBD, SparseGPT, SharedOBS, TrueOBS]


@pytest.mark.parametrize(
    "build, kind, needle",
    [
        (lambda: TrueOBSOptions(ng=0), ArgumentError, "`ng`"),
        (lambda: TrueOBSOptions(c_dtype=torch.int8), ArgumentError, "`c_dtype`"),
        (lambda: SharedOBSOptions(compensate="nope"), ArgumentError, "`compensate`"),
        (lambda: SparseGPTOptions(blocksize=0), ArgumentError, "`blocksize`"),
        (lambda: SparseGPTOptions(damp="x"), ArgumentTypeError, "`damp`"),
        (lambda: TrueOBS(nope=1), ArgumentError, "has no option nope"),
        (lambda: SparseGPT(TrueOBSOptions()), ArgumentTypeError, "SparseGPTOptions"),
    ],
)
def test_options_are_checked_when_built(build, kind, needle):
    with pytest.raises(kind, match=needle):
        build()


def test_a_method_takes_an_options_object_and_fields_over_it():
    assert TrueOBS(TrueOBSOptions(ng=4), chunk_size=8).options == TrueOBSOptions(ng=4, chunk_size=8)
    assert SharedOBS(compensate="full").options.damp == SharedOBSOptions.damp == 0.01
    assert TrueOBS().options.scopes_per_batch(rows_per_group=1) == 64
    assert TrueOBS().options.scopes_per_batch(rows_per_group=2) == 1


@pytest.mark.parametrize("cls", METHODS)
def test_only_methods_that_shard_rows_take_a_process_group(cls, seed):
    """A method whose options say it does not shard rows refuses a process group (those
    that do ask torch.distributed for it, which is not initialised here)."""
    W0, _, H = make_layer(16, 32, 64, seed)
    W = W0.clone()
    scope, nnz = patterns.nm(W, 2, 4)
    message = "not initialised" if cls.Options.shards_rows else "does not split rows"
    with pytest.raises(ArgumentError, match=message):
        cls().prune(scope, H, nnz, process_group=object())
    assert torch.equal(W, W0)


@pytest.mark.parametrize("cls", METHODS)
def test_only_methods_that_need_h_prune_without_it(cls, seed):
    W0, _, _ = make_layer(16, 32, 64, seed)
    W = W0.clone()
    scope, nnz = patterns.nm(W, 2, 4)
    if cls.Options.needs_hessian:
        with pytest.raises((ArgumentError, ArgumentTypeError)):
            cls().prune(scope, None, nnz)
        assert torch.equal(W, W0)
    else:
        cls().prune(scope, None, nnz)
        assert_pattern_holds("24", W, nnz)


@pytest.mark.parametrize(
    "method", [Magnitude(), OBD(), SparseGPT(), SharedOBS(), TrueOBS(), TrueOBS(scoring="joint"),
               TrueOBS(scoring="hybrid")], ids=repr
)
def test_methods_that_enumerate_subsets_refuse_a_scope_with_too_many(method, seed):
    """8 of 32 kept: C(32, 24) ≈ 1e7 candidate subsets per scope."""
    W0, _, H = make_layer(8, 64, 128, seed)
    W = W0.clone()
    scope, nnz = patterns.nm(W, 8, 32)
    if method.options.enumerates_subsets:
        with pytest.raises(ArgumentError, match="candidate subsets"):
            method.prune(scope, H, nnz)
        assert torch.equal(W, W0)
    else:
        method.prune(scope, H, nnz)
        assert int((W != 0).sum()) == 8 * 2 * nnz
