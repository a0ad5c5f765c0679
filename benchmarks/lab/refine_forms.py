"""refine_mask's sweep forms timed on one device, in one process (issue 19 lab).

The forms: synced (the CPU's: a host sync a scope), sync-free, and sync-free with the scope
blocks replayed as CUDA graphs. The start is a 2:4 magnitude mask computed in plain torch, so
this runs with an s3sparse built without CUDA kernels (refine_mask itself is plain torch):
a quick build on a GPU machine is enough. Each form: ``--sweeps`` sweeps of one refine_mask
call from the same start; time, peak memory, scopes changed, output error. JSON to ``--out``.

    python benchmarks/lab/refine_forms.py --shape 256x9728 --device cuda --chunk-size 32

``--profile PATH``: afterwards, one sweep of one chunk (its first ``--chunk-size`` rows) in the
sync-free form, eagerly, under ``torch.profiler``: the ops and kernels by device time, and the
kernels a scope, written to PATH (where a sweep's time goes on the GPU; graph replay runs the
same kernels without the host's launch gaps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment  # noqa: E402
import data  # noqa: E402
from s3sparse import output_error, patterns, refine_mask  # noqa: E402
import s3sparse.pruners.refine_sweep as refine_sweep  # noqa: E402

FORMS = {"synced": (False, False), "sync-free": (True, False), "graphs": (True, True)}


def magnitude_24(W: torch.Tensor) -> torch.Tensor:
    """W with the 2 smallest |w| of every 4 consecutive columns zeroed (plain torch)."""
    M, K = W.shape
    g = W.reshape(M, K // 4, 4)
    drop = g.abs().argsort(-1)[..., :2]
    return g.scatter(-1, drop, 0.0).reshape(M, K)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="256x9728")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=32, help="row groups a chunk (0: refine_mask's default)")
    ap.add_argument("--inverse", nargs="+", default=["loop"], choices=["loop", "loop_trinv", "batched", "trinv"],
                    help="how a chunk's C_PP are inverted (refine_sweep._INVERSE); each form runs with each")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=list(FORMS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="write a torch.profiler table of one eager sync-free chunk sweep here")
    a = ap.parse_args(argv)
    M, K = (int(x) for x in a.shape.lower().split("x"))
    L = data.synthetic_layer(M, K, seed=0, device=a.device)
    W0, H = L.W.float(), L.H.float()
    start = magnitude_24(W0)
    cuda = torch.device(a.device).type == "cuda"
    rows = []
    for form, inverse in [(f, i) for f in a.forms for i in a.inverse]:
        refine_sweep._INVERSE = inverse
        sync_free, graphs = FORMS[form]
        refine_sweep._SYNC_FREE = {True: sync_free, False: sync_free}
        refine_sweep._GRAPHS = graphs
        W = torch.nn.Parameter(start.clone())
        scope, nnz = patterns.nm(W)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        res = refine_mask(scope, H, nnz, W0, sweeps=a.sweeps, chunk_size=a.chunk_size or None)
        if cuda:
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        e0, e1 = output_error(start, W0, H), output_error(W.detach(), W0, H)
        row = dict(form=form, inverse=inverse, seconds=sec, changed=list(res.changed), scopes=res.num_scopes, error_start=e0,
                   error=e1, peak_gib=peak, chunk_size=a.chunk_size, shape=[M, K], sweeps=a.sweeps)
        rows.append(row)
        print(f"{form:9s} {inverse:10s} {sec:7.1f} s  changed {list(res.changed)} of {res.num_scopes}  error {e0:.5f} -> {e1:.5f}"
              + (f"  peak {peak:.1f} GiB" if peak is not None else ""), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(environment=environment(torch.device(a.device)), rows=rows), indent=1))
    if a.profile:
        rows = a.chunk_size or 32  # (chunk_size 0 means the library's default: profile 32 rows)
        refine_sweep._INVERSE = a.inverse[0]
        profile_sweep(W0[:rows], H, start[:rows], Path(a.profile))


def profile_sweep(W0: torch.Tensor, H: torch.Tensor, start: torch.Tensor, path: Path) -> None:
    """One eager sync-free sweep of one chunk (the rows given) under torch.profiler; the table to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    refine_sweep._SYNC_FREE = {True: True, False: True}
    refine_sweep._GRAPHS = False
    cuda = W0.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    W = torch.nn.Parameter(start.clone())
    scope, nnz = patterns.nm(W)
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        res = refine_mask(scope, H, nnz, W0, sweeps=1, chunk_size=W0.shape[0])
        if cuda:
            torch.cuda.synchronize()
        sec = time.perf_counter() - t
    events = prof.key_averages()
    table = events.table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                         max_name_column_width=60)
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    head = (f"# refine_mask, 1 sweep of {W0.shape[0]}x{W0.shape[1]} (one chunk), sync-free form, eager, under the profiler: "
            f"{sec:.2f} s, {res.num_scopes} scopes, changed {list(res.changed)}; device kernels {kernels} "
            f"({kernels / max(1, res.num_scopes // W0.shape[0]):.0f} a scope position: each runs every row of the chunk)\n")
    path.write_text(head + table + "\n")
    print(head + table, flush=True)


if __name__ == "__main__":
    main()
