"""Helpers shared by the benchmark scripts: environment facts for the JSON, device sync, timing."""

from __future__ import annotations

import contextlib
import json
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

# A 2-block Qwen3 config (hidden 64) for CPU smoke runs of the model benchmarks.
TINY_QWEN3 = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=512, max_position_embeddings=256, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


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


def write_rows(path, device: torch.device, rows: list) -> None:
    """A lab's JSON: the environment (:func:`environment`) and its rows, written to ``path``."""
    Path(path).write_text(json.dumps(dict(environment=environment(device), rows=rows), indent=1))
    print(f"wrote {path}")


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


def copy_bandwidth(device: torch.device, nbytes: int, repeat: int, min_sample_s: float = 0.02) -> float:
    """Device-to-device ``dst.copy_(src)`` bandwidth of ``nbytes``, bytes read + written per second."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), device, repeat, min_sample_s=min_sample_s)
    return 2.0 * nbytes / t["seconds"]


# ---------------------------------------------------------------------------------------------
# Timing one call two ways: by CUDA-graph replay (GPU time) and eagerly (what a PyTorch user sees)
# ---------------------------------------------------------------------------------------------
# Both take a list of equivalent callables and call them in turn (call i runs ``fns[i % len(fns)]``):
# with one copy of the weight per callable and enough copies, every call reads its weight from
# device memory rather than from the L2 cache of the call before.


def l2_cache_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size in bytes (0 on the CPU; 50 MiB where torch does not report it)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


def warm_up(fns, device: torch.device) -> None:
    """Call every ``fn`` once and the first once more (kernel loading, library handles and plans,
    one-time host checks of each weight copy), then sync.

    On CUDA this runs on a side stream, as ``torch.cuda.graphs`` recommends before a capture.
    """
    def run() -> None:
        for fn in [*fns, fns[0]]:
            fn()

    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            run()
        torch.cuda.current_stream(device).wait_stream(stream)
    else:
        run()
    sync(device)


def pick_calls(fns, device: torch.device, target_s: float, max_calls: int) -> int:
    """How many calls make a timed sample of about ``target_s`` seconds, between 1 and ``max_calls``.

    From the fastest of 3 synchronised calls of ``fns[0]`` (warm it first). When there are at least
    as many calls as ``fns``, a multiple of ``len(fns)``, so that every copy is called equally often.
    """
    once = []
    for _ in range(3):  # the fastest of 3: one preempted call must not make the samples tiny
        sync(device)
        t0 = time.perf_counter()
        fns[0]()
        sync(device)
        once.append(time.perf_counter() - t0)
    calls = int(min(max_calls, max(1, math.ceil(target_s / max(min(once), 1e-7)))))
    return calls - calls % len(fns) if calls >= len(fns) else calls


def time_eager(fns, device: torch.device, calls: int, repeat: int) -> dict:
    """Eager wall time of one call: ``calls`` plain calls in a loop, synchronised before and after.

    Per call: (end − start) / calls, the median of ``repeat`` samples. This is host launch cost and
    GPU time together, whichever is larger, as a plain PyTorch loop sees it. Warm the callables first.
    """
    samples = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        sync(device)
        samples.append((time.perf_counter() - t0) / calls)
    return dict(seconds=statistics.median(samples), seconds_min=min(samples), samples=repeat, calls=calls,
                timing="eager: wall clock of a loop of calls, synchronised at the end")


def graph_us(fns, device: torch.device, repeat: int, target_s: float = 2e-3, max_calls: int = 50) -> float:
    """Microseconds of GPU time a call of ``fns`` (rotated): warmed, a sample of about ``target_s``
    (:func:`pick_calls`, at least one call of each), timed by :func:`time_graph` (the labs' one line)."""
    warm_up(fns, device)
    calls = max(pick_calls(fns, device, target_s, max_calls), len(fns))
    return time_graph(fns, device, calls, repeat)["seconds"] * 1e6


def time_graph(fns, device: torch.device, calls: int, repeat: int) -> dict:
    """GPU time of one call: ``calls`` calls captured in one CUDA graph, replayed ``repeat`` times.

    Per call: the CUDA-event time of one replay / calls, the median over the replays (one untimed
    replay first). Host launch overhead is gone: this is what the kernels take. Warm the callables
    first (:func:`warm_up`): nothing may allocate a new library handle or synchronise during capture.
    """
    if device.type != "cuda":
        raise ValueError("CUDA-graph timing needs a CUDA device")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    del graph
    return dict(seconds=statistics.median(samples), seconds_min=min(samples), samples=repeat, calls=calls,
                timing="graph: CUDA events around one replay of a graph of `calls` calls")
