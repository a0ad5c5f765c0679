"""Helpers shared by the benchmark scripts: environment facts for the JSON, device sync, timing."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
GIB = 2.0**30


def git_commit() -> str:
    """``$S3SPARSE_GIT_COMMIT`` / ``$S3SPARSE_COMMIT`` if set (a copy without .git, e.g. on a GPU
    machine), else ``git rev-parse HEAD`` (+``dirty``), else ``'unknown'``."""
    for var in ("S3SPARSE_GIT_COMMIT", "S3SPARSE_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=HERE
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=HERE).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device) -> dict:
    import s3sparse

    return dict(
        device=device_name(device),
        device_type=device.type,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        s3sparse=s3sparse.__version__,
        build=s3sparse.build_info(),
        commit=git_commit(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls without TF32, whatever the callers set."""
    prev_mm, prev_cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev_mm, prev_cudnn


def timeit(
    fn: Callable[[], object],
    device: torch.device,
    repeat: int = 5,
    setup: Optional[Callable[[], object]] = None,
    min_sample_s: float = 0.02,
    max_inner: int = 200,
) -> dict:
    """Median seconds of one ``fn()`` call after a warm-up call.

    On CUDA the time is taken with CUDA events around the calls, on the CPU with
    ``perf_counter``. Without ``setup``, each of the ``repeat`` samples times ``inner``
    back-to-back calls (``inner`` chosen so that a sample lasts about ``min_sample_s``) and
    divides; with ``setup`` (e.g. restoring an input an in-place op consumed), ``setup()``
    runs before every single call, outside the timed interval.
    """
    if setup is not None:
        setup()
    fn()  # warm-up
    sync(device)
    inner = 1
    if setup is None:
        t0 = time.perf_counter()
        fn()
        sync(device)
        once = max(time.perf_counter() - t0, 1e-7)
        inner = int(max(1, min(max_inner, math.ceil(min_sample_s / once))))
    samples = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return dict(seconds=statistics.median(samples), seconds_min=min(samples), samples=len(samples), inner=inner)
