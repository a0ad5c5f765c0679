"""Shared pytest setup.

* One intra-op thread. On a small CI machine, intra-op threading of many tiny
  batched LAPACK calls costs far more than it gains (2000 ``cholesky_ex`` on
  (64, 8, 8): 11.6 s at 2 threads, 0.05 s at 1), so the test process is pinned
  to one thread at import, before any test runs (``OMP_NUM_THREADS`` /
  ``MKL_NUM_THREADS`` too, for libraries that read them; set them yourself to
  override).
* One source of randomness. Before every test, ``torch``, ``random`` and NumPy
  are seeded from one seed: ``S3SPARSE_TEST_SEED`` when set (to replay a run),
  else a fresh random one. Tests that need the value take the ``seed`` fixture
  (e.g. for their own ``torch.Generator``). A failing test's report carries a
  "s3sparse seed" section with the command that replays it.
* The ``cuda`` marker runs where a GPU is present, and is skipped (with a
  reason) everywhere else.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:  # already set, or parallel work already ran in this process
    pass

pytest_plugins = ["pytester"]  # tests/test_harness.py runs this conftest on a failing test

SEED_ENV = "S3SPARSE_TEST_SEED"
_SEED = pytest.StashKey[int]()


def _fixed_seed() -> int | None:
    value = os.environ.get(SEED_ENV, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"{SEED_ENV} must be an integer seed, got {value!r}") from None


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), ``random`` and NumPy (when installed)."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is a dependency
        return
    numpy.random.seed(seed % 2**32)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer-running quality tests")
    _fixed_seed()  # a malformed S3SPARSE_TEST_SEED is a usage error, reported once


def pytest_report_header(config):
    fixed = _fixed_seed()
    how = f"fixed by {SEED_ENV}={fixed}" if fixed is not None else f"drawn per test (set {SEED_ENV} to replay)"
    return [f"s3sparse: {torch.get_num_threads()} intra-op thread(s); seeds {how}"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Draw (or take) this test's seed and seed every generator before its fixtures run."""
    fixed = _fixed_seed()
    seed = fixed if fixed is not None else random.SystemRandom().randrange(2**31)
    item.stash[_SEED] = seed
    seed_everything(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Add the seed, and how to replay it, to the report of a failing test."""
    outcome = yield
    report = outcome.get_result()
    seed = item.stash.get(_SEED, None)
    if seed is None or not report.failed:
        return
    report.sections.append(
        ("s3sparse seed", f"{SEED_ENV}={seed}\nreplay: {SEED_ENV}={seed} python -m pytest '{item.nodeid}'")
    )


@pytest.fixture
def seed(request) -> int:
    """This test's seed (the generators are already seeded with it)."""
    return request.node.stash[_SEED]
