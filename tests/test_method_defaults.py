"""A method picked by name prunes exactly as the library's default call of that method.

``s3sparse prune --method X``, a recipe naming X and ``prune_model(..., method=X)``
all go through :func:`s3sparse.llm.parse_method`; with no options given, every
method must give the weights of the plain library call, bit for bit, on the four
reference patterns — the reference API's call and the method class's default
alike (the registry once passed its own ``damp`` and ``ng``, which made ``obs-*``
and row-coupled ``true-obs`` worse than the library).
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from s3sparse import (
    OBD,
    Magnitude,
    SharedOBS,
    SparseGPT,
    StructuredOBS,
    TrueOBS,
    prune_magnitude,
    prune_obd,
    prune_sparsegpt,
)
from s3sparse.llm import METHOD_NAMES, parse_method, parse_pattern

from pruner_utils import make_layer

# The reference API's default call of every method name. obs-split and obs-interleaved
# name four column chunks (StructuredOBS.prune keeps the reference's n_splits=1,
# which makes them 'full').
LIBRARY_CALL = {
    "magnitude": lambda scope, H, nnz: prune_magnitude(scope, nnz),
    "obd": prune_obd,
    "sparsegpt": prune_sparsegpt,
    "obs-local": lambda scope, H, nnz: StructuredOBS(scope, H).prune(nnz, compensate="local"),
    "obs-full": lambda scope, H, nnz: StructuredOBS(scope, H).prune(nnz, compensate="full"),
    "obs-split": lambda scope, H, nnz: StructuredOBS(scope, H).prune(nnz, compensate="split", n_splits=4),
    "obs-interleaved": lambda scope, H, nnz: StructuredOBS(scope, H).prune(nnz, compensate="interleaved", n_splits=4),
    "true-obs": lambda scope, H, nnz: StructuredOBS(scope, H).prune_true_obs(nnz),
}
# The method classes with their default options.
CLASS_CALL = {
    "magnitude": lambda scope, H, nnz: Magnitude().prune(scope, None, nnz),
    "obd": lambda scope, H, nnz: OBD().prune(scope, H, nnz),
    "sparsegpt": lambda scope, H, nnz: SparseGPT().prune(scope, H, nnz),
    **{
        f"obs-{mode}": (lambda mode: lambda scope, H, nnz: SharedOBS(compensate=mode).prune(scope, H, nnz))(mode)
        for mode in ("local", "full", "split", "interleaved")
    },
    "true-obs": lambda scope, H, nnz: TrueOBS().prune(scope, H, nnz),
}
# The four reference patterns, by their registry names.
PATTERNS = ("2:4", "4:8", "coupled-2:4", "block16-rows")


def test_every_method_name_has_a_library_call():
    assert sorted(LIBRARY_CALL) == sorted(METHOD_NAMES) == sorted(CLASS_CALL)


def _pruned(W0: torch.Tensor, pattern: str, call) -> torch.Tensor:
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = parse_pattern(pattern).build(W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        call(scope, nnz)
    return W.detach()


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_a_method_by_name_is_the_library_default_call(method, pattern, seed):
    W0, _, H = make_layer(32, 128, 256, seed)
    by_name = _pruned(W0, pattern, lambda scope, nnz: parse_method(method).run(scope, nnz, H))
    assert not torch.equal(by_name, W0)
    for calls in (LIBRARY_CALL, CLASS_CALL):
        direct = _pruned(W0, pattern, lambda scope, nnz: calls[method](scope, H, nnz))
        assert torch.equal(by_name, direct), f"{method} on {pattern}: max diff {float((by_name - direct).abs().max())}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from test_llm_support import save_tiny_model

    return save_tiny_model(str(tmp_path_factory.mktemp("tiny") / "qwen3"))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_cli_prune_calls_the_library_default_on_every_layer(method, model_dir, tmp_path, monkeypatch):
    """``s3sparse prune --method X`` (one pattern per projection, the four reference
    patterns in all): every layer's result is the library default call on the same
    weight and Hessian."""
    from s3sparse.llm.cli import main
    from s3sparse.llm.method_registry import MethodChoice

    calls = []
    real_run = MethodChoice.run

    def spy(self, scope, nnz, hessian, progress_fn=None, process_group=None):
        param = next(iter(scope.block_specs())).view.param
        before = param.detach().clone()
        real_run(self, scope, nnz, hessian, progress_fn, process_group)
        calls.append((scope, param, nnz, hessian.clone(), before, param.detach().clone()))

    monkeypatch.setattr(MethodChoice, "run", spy)
    overrides = ["*.k_proj=4:8", "*.v_proj=coupled-2:4", "*.o_proj=block16-rows", "*.up_proj=block16-rows",
                 "*.down_proj=coupled-2:4"]
    argv = ["prune", model_dir, "--out", str(tmp_path / "out"), "--pattern", "2:4", "--method", method,
            "--calib", "pydoc:calib", "--n-samples", "4", "--seq-len", "32", "--no-progress"]
    for rule in overrides:
        argv += ["--override", rule]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(argv) == 0
    assert len(calls) == 14
    for scope, param, nnz, H, before, after in calls:
        with torch.no_grad():
            param.copy_(before)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            LIBRARY_CALL[method](scope, H, nnz)
        assert torch.equal(param.detach(), after), f"{method}: a layer differs from the library default call"
