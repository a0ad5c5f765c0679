"""Packed execution (``s3sparse.sparse.PackedLinear``) against dense ``F.linear`` and torch's 2:4 semi-structured sparsity.

    python benchmarks/packed.py --device cuda --check --out /tmp/packed.json   # the full table, fp16, a few minutes
    python benchmarks/packed.py --quick --check      # CPU smoke run: small shapes, a few seconds
    python benchmarks/packed.py --shapes 4096x4096 --tokens 1 16 --patterns 2:4 --methods dense packed

For every weight shape M×K (default 2560×9728, 9728×2560, 4096×4096) and pattern (default the four
reference patterns 2:4, 4:8, coupled-2:4, block16-rows, and the block pattern col-blocks:16:0.5:
full-height blocks of 16 columns, half of them pruned), a random weight is drawn on the device and
magnitude-pruned to the pattern (``scope.hard_threshold``), packed once, and for every token count N
(default 1, 4, 16, 64, 512, 4096) multiplied by a random (N, K) input three ways:

* ``dense``  — ``F.linear(x, W)`` with the pruned weight stored dense (cuBLAS on a GPU);
* ``packed`` — ``PackedLinear`` (the ``s3sparse::packed_linear`` op on the packed weight, or on CUDA for
  2:4 / 4:8 / coupled 2:4 at up to 16 tokens ``s3sparse::sp24_linear``: then ``packed_path`` says
  ``sp24`` and GB/s count the bytes that path reads, the values and ``sp24_meta``;
  ``S3SPARSE_PACKED_SP24=0`` turns that path off; with ``--dense-cache-tokens T``, calls of T tokens or more
  run as dense ``F.linear`` on the module's cached decoded W, ``PackedLinear.use_dense_cache(T)``: then
  ``packed_path`` says ``dense cache`` and GB/s count the dense bytes);
* ``semi``   — ``F.linear(x, torch.sparse.to_sparse_semi_structured(W))``, torch's 2:4 semi-structured
  sparsity (cuSPARSELt or CUTLASS), where it runs: only a weight that is 2:4 (2:4 and coupled 2:4 are),
  fp16 / bf16 on a GPU that supports it; otherwise the row says why not (``semi_status``);
* ``gather`` — for the patterns of whole input columns (``columns:S``, ``col-blocks:W:S``), what
  ``s3sparse pack`` makes of such a layer: ``s3sparse.sparse.compact_inputs``'s ``GatherLinear``, the
  kept columns as a smaller dense Linear behind ``index_select`` (bytes: that weight and the index).

Two timings of each, labelled in the table and the JSON:

* ``graph`` (CUDA only) — GPU time per call: about 2 ms of calls (20–50 calls of under 100 µs, at most
  50) captured in one CUDA graph after a warm-up outside the capture, the graph replayed ``--repeat``
  times, CUDA events around each replay, the median replay divided by the calls. Host overhead is
  gone: this is what the kernels take.
* ``eager`` — wall time per call of a plain Python loop of calls, synchronised at the end: what a
  plain PyTorch user sees (host launch cost and GPU time, whichever is larger). On the CPU it is
  the only timing.

On a GPU each timed call reads its own copy of the weight, in turn, with enough copies that they
span ``--rotate`` × the L2 cache (default 4×): the weight comes from device memory, not from the
L2 cache where the previous call left it (``*_copies`` in the JSON says how many).

Reported per row: µs per call, speedup over dense (same timing), ``GB/s`` of the weight as stored
(packed bytes for ``packed``, the dense weight for ``dense``, values + metadata for ``semi``) and the
fraction ``of_copy`` of the device-to-device copy bandwidth (bytes read + written per second of a
large ``copy_``) measured at the start of the same run, dense-equivalent TFLOP/s (2·N·M·K / time),
and ``ratio``, packed bytes over dense bytes. The weight bytes are a floor on what a call moves; at
1–64 tokens they are nearly all of it, so GB/s against the copy bandwidth says how close a
memory-bound kernel is to its ceiling.

``--check`` verifies, once per (shape, pattern), that the packed weight decodes to the pruned dense
weight exactly, and once per row the relative error ‖y − y_ref‖ / ‖y_ref‖ of every method against
``F.linear`` of the pruned dense weight computed in fp32 (TF32 off); an error above the dtype's
tolerance is reported as a failure.

A table is printed; JSON (device name, torch version, git commit — ``$S3SPARSE_GIT_COMMIT`` /
``$S3SPARSE_COMMIT`` override it — the copy bandwidth and every row) goes to ``--out`` (default
``benchmarks/results/packed-<device>[-quick].json``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    copy_bandwidth, environment, exact_fp32, l2_cache_bytes, pick_calls, sync, time_eager, time_graph, warm_up,
)

from s3sparse.llm import parse_pattern  # noqa: E402
from s3sparse.sparse import PackedLinear, PackedWeight, compact_inputs  # noqa: E402

SHAPES = ["2560x9728", "9728x2560", "4096x4096"]
TOKENS = [1, 4, 16, 64, 512, 4096]
PATTERNS = ["2:4", "4:8", "coupled-2:4", "block16-rows", "col-blocks:16:0.5"]
METHODS = ["dense", "packed", "semi", "gather"]
COLUMN_PATTERNS = ("columns:", "col-blocks:")  # whole input columns: the gather method runs
QUICK_SHAPES = ["64x256", "128x128"]
QUICK_TOKENS = [1, 4, 64]
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# --check: largest ‖y − y_ref‖ / ‖y_ref‖ accepted (y_ref in fp32; the output's rounding dominates).
CHECK_TOL = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-4}
# A timed sample (one graph replay, one eager loop) lasts about this long, in at most MAX_CALLS calls:
# 20-50 calls for a call under 100 µs, fewer for slower ones.
GRAPH_TARGET_S, EAGER_TARGET_S, MAX_CALLS = 2e-3, 5e-3, 50
MAX_COPIES = 64


def parse_shape(text: str) -> tuple[int, int]:
    try:
        m, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is MxK, e.g. 2560x9728, got {text!r}") from None
    return m, k


def is_two_four(W: torch.Tensor) -> bool:
    """Whether every run of 4 adjacent weights of a row holds at most 2 non-zeros."""
    M, K = W.shape
    return K % 4 == 0 and bool(((W != 0).view(M, K // 4, 4).sum(-1) <= 2).all())


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def semi_structured(W: torch.Tensor):
    """``(weight, stored bytes, backend, None)`` as torch 2:4 semi-structured, or ``(None, None, None, reason)``."""
    if W.device.type != "cuda":
        return None, None, None, "semi-structured sparsity runs on CUDA only"
    if not is_two_four(W):
        return None, None, None, "the weight is not 2:4 (semi-structured sparsity needs 2 of every 4)"
    try:
        from torch.sparse import to_sparse_semi_structured

        Ws = to_sparse_semi_structured(W)
    except Exception as exc:  # noqa: BLE001 - the reason is the result
        return None, None, None, _why(exc)
    # The forward reads `packed` (values, and the metadata too with cuSPARSELt) and `meta` (CUTLASS).
    parts = [getattr(Ws, name, None) for name in ("packed", "meta")]
    stored = sum(p.numel() * p.element_size() for p in parts if isinstance(p, torch.Tensor))
    return Ws, stored or None, type(Ws).__name__, None


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in fp32 (inf when ``got`` has a NaN or an inf)."""
    if not want.numel():
        return 0.0
    got, want = got.float(), want.float()
    if not bool(torch.isfinite(got).all()):
        return math.inf
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _gathered(W: torch.Tensor) -> torch.nn.Module:
    """The GatherLinear of the pruned weight W: its nonzero input columns as a smaller dense Linear."""
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(W, requires_grad=False)
    return compact_inputs(layer)


def sp24_taken(packed: PackedLinear, x: torch.Tensor) -> bool:
    """Whether ``packed(x)`` (after a first, checking call) takes the sparse tensor cores' path."""
    return (x.is_cuda and packed._sp24_ok and packed.sp24_meta is not None and x.dtype == packed.values.dtype
            and x.numel() <= packed._sp24_max_tokens * packed.in_features)


def n_copies(nbytes: int, rotate_bytes: int) -> int:
    """Copies of a weight of ``nbytes`` that span ``rotate_bytes`` (at least 1, at most MAX_COPIES)."""
    if rotate_bytes <= 0 or not nbytes:
        return 1
    return max(1, min(MAX_COPIES, math.ceil(rotate_bytes / nbytes)))


class Bench:
    """One run: the device, dtype, timing settings, copy bandwidth, and the rows so far."""

    def __init__(self, device: torch.device, dtype: torch.dtype, methods: Sequence[str], repeat: int,
                 rotate_bytes: int, copy_bps: float, check: bool, dense_cache_tokens: Optional[int] = None):
        self.device, self.dtype, self.methods, self.repeat = device, dtype, list(methods), repeat
        self.dense_cache_tokens = dense_cache_tokens
        self.rotate_bytes, self.copy_bps, self.check = rotate_bytes, copy_bps, check
        self.modes = ["graph", "eager"] if device.type == "cuda" else ["eager"]
        self.rows: List[dict] = []
        self.check_failures: List[dict] = []

    # ---------------------------------------------------------------- the weights of one (shape, pattern)
    def pruned_weight(self, M: int, K: int, pattern: str) -> torch.Tensor:
        """A random M×K weight drawn on the device, magnitude-pruned to ``pattern``."""
        W = torch.randn(M, K, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            scope, nnz = parse_pattern(pattern).build(W)
            scope.hard_threshold(nnz=nnz)
        return W

    def case(self, M: int, K: int, pattern: str, tokens: Sequence[int]) -> None:
        """Build the weight once (and its packed and semi-structured forms), then one row per token count."""
        W = self.pruned_weight(M, K, pattern)
        esize = W.element_size()
        packed = PackedLinear(PackedWeight.from_pattern(W, pattern))
        if self.dense_cache_tokens:
            packed.use_dense_cache(self.dense_cache_tokens)
        info = dict(M=M, K=K, pattern=pattern, dtype=str(self.dtype).replace("torch.", ""),
                    ratio=packed.nbytes / (M * K * esize), row_group=packed.row_group,
                    index_format=packed.packed.index_format, meta_bits=packed.meta_bits)
        if self.check:
            try:
                info["unpack_exact"] = bool(torch.equal(packed.weight, W))  # packed_to_dense on the device
            except Exception as exc:  # noqa: BLE001 - reported, and the timings still run
                info["unpack_exact"], info["unpack_status"] = False, _why(exc)
            if not info["unpack_exact"]:
                self.fail(info, info.get("unpack_status", "packed_to_dense does not give the pruned weight back"))

        # Each method: its stored bytes and, per copy of the weight, a function of x.
        weights = {}  # method -> (stored bytes, one fn(x) per copy of the weight)
        if "dense" in self.methods:
            dense_bytes = M * K * esize
            Ws = [W] + [W.clone() for _ in range(n_copies(dense_bytes, self.rotate_bytes) - 1)]
            weights["dense"] = (dense_bytes, [lambda x, w=w: F.linear(x, w) for w in Ws])
        if "packed" in self.methods:
            mods = [packed] + [copy.deepcopy(packed) for _ in range(n_copies(packed.nbytes, self.rotate_bytes) - 1)]
            weights["packed"] = (packed.nbytes, mods)
        if "semi" in self.methods:
            Ws0, semi_bytes, backend, reason = semi_structured(W)
            if Ws0 is None:
                info["semi_status"] = reason
            else:
                info["semi_backend"] = backend
                extra = [semi_structured(W.clone())[0] for _ in range(n_copies(semi_bytes, self.rotate_bytes) - 1)]
                weights["semi"] = (semi_bytes, [lambda x, w=w: F.linear(x, w) for w in [Ws0, *extra]])
        if "gather" in self.methods:
            if not pattern.startswith(COLUMN_PATTERNS):
                info["gather_status"] = "not a pattern of whole input columns"
            else:
                gathered = _gathered(W)
                gather_bytes = sum(t.numel() * t.element_size() for t in [*gathered.parameters(), *gathered.buffers()])
                mods = [gathered] + [copy.deepcopy(gathered) for _ in range(n_copies(gather_bytes, self.rotate_bytes) - 1)]
                weights["gather"] = (gather_bytes, mods)
        for method, (nbytes, fns) in weights.items():
            info[f"{method}_bytes"], info[f"{method}_copies"] = nbytes, len(fns)

        for N in tokens:
            x = torch.randn(N, K, device=self.device, dtype=self.dtype)
            row = dict(info, tokens=N)
            with torch.no_grad():
                if self.check:
                    with exact_fp32():
                        want = F.linear(x.float(), W.float())
                for method, (nbytes, fns) in weights.items():
                    calls = [lambda f=f: f(x) for f in fns]
                    try:
                        if self.check:
                            err = rel_err(fns[0](x), want)
                            row[f"{method}_rel_err"] = err
                            if not err <= CHECK_TOL[self.dtype]:
                                self.fail(row, f"{method}: relative error {err:.3g} > {CHECK_TOL[self.dtype]:.0e}")
                        self.time(row, method, calls)
                    except Exception as exc:  # noqa: BLE001 - one method's failure must not hide the others
                        row[f"{method}_status"] = _why(exc)
                        if method == "packed":
                            traceback.print_exc(limit=3)
                        sync(self.device)
                    if method == "packed" and sp24_taken(packed, x):
                        # The sparse tensor cores' path reads the values and its own metadata, not the format's meta.
                        nbytes = packed.values.nbytes + packed.sp24_meta.nbytes
                        row["packed_path"], row["packed_read_bytes"] = "sp24", nbytes
                    if method == "packed" and self.dense_cache_tokens and N >= self.dense_cache_tokens:
                        nbytes = M * K * esize  # F.linear on the cached dense W
                        row["packed_path"], row["packed_read_bytes"] = "dense cache", nbytes
                    for mode in self.modes:
                        t = row.get(f"{method}_{mode}_s")
                        if t:
                            row[f"{method}_{mode}_GB/s"] = nbytes / t / 1e9
                            row[f"{method}_{mode}_of_copy"] = nbytes / t / self.copy_bps
                            row[f"{method}_{mode}_TFLOP/s"] = 2.0 * N * M * K / t / 1e12
            for method in ("packed", "semi", "gather"):
                for mode in self.modes:
                    if row.get(f"{method}_{mode}_s") and row.get(f"dense_{mode}_s"):
                        row[f"{method}_{mode}_speedup"] = row[f"dense_{mode}_s"] / row[f"{method}_{mode}_s"]
            self.rows.append(row)
            self.print_row(row)
        del weights, packed, W
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def time(self, row: dict, method: str, calls: List[Callable[[], object]]) -> None:
        """``{method}_eager_s`` and (CUDA) ``{method}_graph_s``: seconds per call, timed as described above.

        A failed capture leaves the eager figure and says why in ``{method}_graph_status``.
        """
        warm_up(calls, self.device)  # before any capture: one-time checks, handles, plans
        n = pick_calls(calls, self.device, EAGER_TARGET_S, MAX_CALLS)
        row[f"{method}_eager_s"] = time_eager(calls, self.device, n, self.repeat)["seconds"]
        row[f"{method}_eager_calls"] = n
        if "graph" in self.modes:
            n = pick_calls(calls, self.device, GRAPH_TARGET_S, MAX_CALLS)
            try:
                row[f"{method}_graph_s"] = time_graph(calls, self.device, n, self.repeat)["seconds"]
                row[f"{method}_graph_calls"] = n
            except Exception as exc:  # noqa: BLE001 - e.g. an op that synchronises, which a capture refuses
                row[f"{method}_graph_status"] = _why(exc)
                sync(self.device)

    def fail(self, row: dict, what: str) -> None:
        where = f"{row['M']}x{row['K']} {row['pattern']}" + (f" N={row['tokens']}" if "tokens" in row else "")
        self.check_failures.append(dict(case=where, check=what))
        print(f"CHECK FAILED {where}: {what}", flush=True)

    # ---------------------------------------------------------------- the table
    @staticmethod
    def header() -> str:
        return (f"{'shape':>10} {'pattern':<17} {'N':>5} {'timing':<6} {'dense µs':>9} {'packed µs':>9} {'×dense':>6} "
                f"{'GB/s':>7} {'of copy':>7} {'semi µs':>9} {'×dense':>6} {'gather µs':>9} {'×dense':>6} "
                f"{'dense GB/s':>10}  notes")

    def print_row(self, r: dict) -> None:
        def us(key: str) -> str:
            return f"{r[key] * 1e6:9.1f}" if r.get(key) else f"{'-':>9}"

        def num(key: str, width: int, spec: str) -> str:
            return f"{r[key]:{width}{spec}}" if r.get(key) is not None else f"{'-':>{width}}"

        for mode in self.modes:
            notes = [f"{m}: {r[m + '_status']}" for m in ("packed", "dense", "semi")
                     if r.get(m + "_status") and (m != "semi" or mode == self.modes[0])]
            notes += [f"{m} graph: {r[f'{m}_{mode}_status']}" for m in ("packed", "dense", "semi")
                      if r.get(f"{m}_{mode}_status")]
            if "packed_rel_err" in r and mode == self.modes[0]:
                notes.append(f"err {r['packed_rel_err']:.1e}")
            if r.get("packed_path") and mode == self.modes[0]:
                notes.append(f"packed: {r['packed_path']} (GB/s of its {r['packed_read_bytes'] / 2**20:.1f} MiB)")
            print(f"{r['M']:>4}x{r['K']:<5} {r['pattern']:<17} {r['tokens']:>5} {mode:<6} {us(f'dense_{mode}_s')} "
                  f"{us(f'packed_{mode}_s')} {num(f'packed_{mode}_speedup', 6, '.2f')} "
                  f"{num(f'packed_{mode}_GB/s', 7, '.1f')} {num(f'packed_{mode}_of_copy', 7, '.0%')} "
                  f"{us(f'semi_{mode}_s')} {num(f'semi_{mode}_speedup', 6, '.2f')} "
                  f"{us(f'gather_{mode}_s')} {num(f'gather_{mode}_speedup', 6, '.2f')} "
                  f"{num(f'dense_{mode}_GB/s', 10, '.1f')}  {'; '.join(notes)}", flush=True)


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; cpu with --quick)")
    ap.add_argument("--dtype", default="float16", choices=sorted(_DTYPES))
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help=f"MxK weight shapes (default {SHAPES})")
    ap.add_argument("--tokens", nargs="+", type=int, default=None, help=f"token counts N (default {TOKENS})")
    ap.add_argument("--patterns", nargs="+", default=None, help=f"pattern names of the model pipeline (default {PATTERNS})")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--repeat", type=int, default=None, help="timed samples (graph replays / eager loops) per cell "
                    "(default 10; 3 with --quick)")
    ap.add_argument("--rotate", type=float, default=4.0, help="on a GPU, the weight copies each timed call rotates "
                    "through span this many L2 caches (default 4; 0: one copy, the weight may stay in L2)")
    ap.add_argument("--check", action="store_true", help="check the packed weight and every output against the "
                    "pruned dense weight (see above)")
    ap.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, tokens {QUICK_TOKENS} on the CPU")
    ap.add_argument("--dense-cache-tokens", type=int, default=None, metavar="T",
                    help="PackedLinear.use_dense_cache(T): calls of T tokens or more run dense on a cached W")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.device = args.device or "cpu"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = args.shapes or [parse_shape(s) for s in (QUICK_SHAPES if args.quick else SHAPES)]
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    pattern_names = args.patterns or PATTERNS
    repeat = args.repeat or (3 if args.quick else 10)
    dtype = _DTYPES[args.dtype]
    torch.manual_seed(0)

    started = time.perf_counter()
    env = environment(device)
    print(f"{env['device']}, torch {env['torch']}, commit {env['commit']}, {args.dtype}")
    copy_bytes = (1024 if device.type == "cuda" else 32 if args.quick else 256) * 2**20
    copy_bps = copy_bandwidth(device, copy_bytes, repeat, 0.002 if args.quick else 0.02)
    rotate_bytes = int(args.rotate * l2_cache_bytes(device))
    print(f"device-to-device copy: {copy_bps / 1e9:.1f} GB/s (read + write, {copy_bytes / 2**20:.0f} MiB); "
          f"weights rotate over {rotate_bytes / 2**20:.0f} MiB")
    print("timing: 'graph' = GPU time per call by CUDA-graph replay; 'eager' = wall time per call of a plain loop")
    bench = Bench(device, dtype, args.methods, repeat, rotate_bytes, copy_bps, args.check, args.dense_cache_tokens)
    print(bench.header())
    failures = []
    for M, K in shapes:
        for pattern in pattern_names:
            t0 = time.perf_counter()
            try:
                bench.case(M, K, pattern, tokens)
            except Exception as exc:  # noqa: BLE001 - one case's failure must not hide the others
                failures.append(dict(M=M, K=K, pattern=pattern, status="failed", detail=_why(exc)))
                print(f"{M}x{K} {pattern}: failed: {_why(exc)}", flush=True)
                traceback.print_exc(limit=4)
            sync(device)
            print(f"  ({M}x{K} {pattern}: {time.perf_counter() - t0:.1f} s)", flush=True)

    out = Path(args.out) if args.out else HERE / "results" / f"packed-{device.type}{'-quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(benchmark="packed", **env, dtype=args.dtype, shapes=[f"{m}x{k}" for m, k in shapes], tokens=tokens,
                patterns=pattern_names, methods=args.methods, repeat=repeat, check=args.check,
                dense_cache_tokens=args.dense_cache_tokens,
                **{"copy_GB/s": copy_bps / 1e9}, l2_cache_bytes=l2_cache_bytes(device), rotate_bytes=rotate_bytes,
                timings={"graph": "GPU time per call: CUDA events around replays of a CUDA graph of `*_graph_calls` "
                                  "calls, about 2 ms (median replay / calls)",
                         "eager": "wall time per call of a plain loop of calls, synchronised at the end (median)"},
                seconds=time.perf_counter() - started)
    result = dict(meta=meta, results=bench.rows, failures=failures, check_failures=bench.check_failures)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"{len(bench.rows)} rows, {len(failures)} failed cases, {len(bench.check_failures)} failed checks, "
          f"{meta['seconds']:.0f} s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
