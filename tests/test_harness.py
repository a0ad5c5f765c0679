"""The test harness itself (tests/conftest.py): one intra-op thread, one seed per
test that replays through S3SPARSE_TEST_SEED and is printed when a test fails."""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

INNER_TEST = '''
import random
import torch


def test_draws(seed):
    print("SEED", seed, "TORCH", torch.randn(3).tolist(), "RANDOM", random.random())


def test_fails(seed):
    assert seed < 0, "deliberate failure"
'''


def _run_inner(pytester, monkeypatch, seed: int) -> list[str]:
    """Run INNER_TEST under a copy of our conftest with S3SPARSE_TEST_SEED=seed; its output lines."""
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER_TEST)
    monkeypatch.setenv("S3SPARSE_TEST_SEED", str(seed))
    result = pytester.runpytest_inprocess("-q", "-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    return result.outlines


def test_one_intra_op_thread():
    assert torch.get_num_threads() == 1
    assert os.environ.get("OMP_NUM_THREADS") is not None


def test_the_generators_are_seeded_with_the_seed_fixture(seed):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    assert torch.equal(torch.random.get_rng_state(), state), "torch was not seeded with the test's seed"
    random.seed(seed)
    expected = random.random()
    random.seed(seed)
    assert random.random() == expected


def _draws(lines: list[str]) -> list[str]:
    return [line[line.index("SEED"):] for line in lines if "SEED " in line and "TORCH" in line]


def test_a_failure_prints_its_seed_and_the_seed_replays(pytester, monkeypatch):
    lines = _run_inner(pytester, monkeypatch, 424242)
    out = "\n".join(lines)
    assert "S3SPARSE_TEST_SEED=424242" in out and "test_inner.py::test_fails" in out, out
    draws = _draws(lines)
    assert len(draws) == 1 and draws[0].startswith("SEED 424242 "), out
    assert _draws(_run_inner(pytester, monkeypatch, 424242)) == draws
