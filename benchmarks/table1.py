"""Table 1: every pruner on the four reference patterns of one layer — time, peak memory, error, pattern.

    python benchmarks/table1.py --quick                                   # CPU smoke run, < 1 min
    python benchmarks/table1.py --device cuda                             # 2560×9728, N=8192, everything
    python benchmarks/table1.py --device cuda --patterns 24 --methods sparsegpt true_obs_l2r \\
        --peer sparsekit --peer-path /tmp/site                            # side by side with the reference
    python benchmarks/table1.py --device cuda --real fixtures/minilm/     # real (W, H) layers

Patterns (SPEC §2): ``24`` = ``patterns.nm`` (2:4), ``48`` = ``patterns.nm_blocks`` (4:8),
``coupled24`` = ``patterns.coupled_nm`` (coupled 2:4), ``block16`` =
``patterns.row_coupled_blocks`` (16-column blocks, rows p and p+8 compete).

Methods: ``magnitude``, ``obd``, ``sparsegpt``, ``obs_local``, ``obs_full``,
``obs_interleaved`` (``StructuredOBS(scope, H).prune(nnz, compensate=..., n_splits=16)``,
``--n-splits``), ``true_obs_l2r`` / ``true_obs_lf`` (``prune_true_obs(nnz, ng=None (library default),
order='left_to_right' | 'largest_first')``, ``--ng``; ``--c-dtype float32`` — or
``--c-dtype default float32`` for both — sets the per-row C storage).

Every cell: the pattern's scope is built on a fresh ``nn.Parameter`` copy of the same W and the
method called on it (spec construction, the inverse Hessian and everything else the call does are
inside the timing); ``--warmup`` untimed runs first (``small``: one run on a 256×1024 corner of
the layer — compiles/initialises the same kernels cheaply; ``full``: one run at full size;
``none``), then ``--repeat`` timed runs (CUDA events on a GPU, ``perf_counter`` on the CPU), the
median reported. ``--cell-budget S`` stops repeating once a cell's timed runs took S seconds
(at least one run); ``--cell-timeout S`` aborts a run that is still going S seconds after its
cell began (the cell keeps the runs it finished, or is marked ``timeout``). Per run:

* ``seconds`` (GPU: CUDA events around the call, after a synchronize; ``wall_s`` the host clock);
* ``peak_gib``: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (absolute,
  including W, H and the layer copy; ``base_gib`` is what was allocated when the call began);
* ``error``: ``sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))``, fp32 without TF32, summed in fp64, computed here;
* ``pattern_ok``: from the pruned weight by plain indexing (a block is kept when any of its
  weights is non-zero; every scope must keep exactly nnz blocks), independent of the pruner;
* ``rows_fp32``: rows ``prune_true_obs`` redid with fp32 C, parsed from its RuntimeWarning
  ``prune_true_obs: N of M rows ...`` (0 when it warned nothing; null for other methods).

``--peer sparsekit`` runs the same cells through the reference implementation (sparsekit 0.1.5)
in the same process on the same W and H: its own ``BlockSpec``/``ScopeSpec`` (and ``View`` for
the coupled patterns) built like ours, its ``StructuredOBS`` (same calls, same arguments), its
SparseGPT functions (``sparsegpt_prune(W, H, block_size=1, scope_size=4)`` for 2:4,
``block_size=2, scope_size=8`` for 4:8, ``sparsegpt_coupled_24``, ``sparsegpt_block16``), and for
magnitude / OBD its ``scope.hard_threshold(nnz=...)`` (OBD: ``values = |W|·sqrt(diag H)``, whose
block 2-norms order blocks by ``Σ w²·H_cc``). The exact call is recorded per cell
(``call``). The reference needs Triton (it imports it at top level): without it ``--peer
sparsekit`` stops at once with a message. ``--skip-peer-cells 'block16:sparsegpt,...'``
(``pattern:method``, ``*`` matches anything) leaves hopeless reference cells out;
``--skip-cells`` does the same for ours.

Results are printed as a table (``--markdown`` for a Markdown one) and written, after every
cell, as JSON (device name, torch version, git commit — ``$S3SPARSE_GIT_COMMIT`` or
``$S3SPARSE_COMMIT`` overrides it where the tree has no .git — and every run) to ``--out``
(default ``benchmarks/results/table1-<device>-<M>x<K>[-real][-peer][-quick].json``).
``--merge`` keeps the cells already in ``--out`` and replaces those run again, so a long table can
be built by several shorter invocations.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import re
import signal
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import s3sparse  # noqa: E402
from s3sparse import StructuredOBS, patterns, prune_magnitude, prune_obd, prune_sparsegpt  # noqa: E402

from common import GIB, device_name, environment, exact_fp32, sync  # noqa: E402
from data import Layer, load_layers, synthetic_layer  # noqa: E402

PATTERNS = {
    "24": "2:4",
    "48": "4:8",
    "coupled24": "coupled 2:4",
    "block16": "16-col row-coupled",
}
METHODS = [
    "magnitude",
    "obd",
    "sparsegpt",
    "obs_local",
    "obs_full",
    "obs_interleaved",
    "true_obs_l2r",
    "true_obs_lf",
]
NNZ = {"24": 2, "48": 2, "coupled24": 2, "block16": 1}
TRUE_OBS = {"true_obs_l2r": "left_to_right", "true_obs_lf": "largest_first"}
C_DTYPES = {"default": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_ROWS_RE = re.compile(r"prune_true_obs: (\d+) of (\d+) rows")


# ------------------------------------------------------------------ measurements independent of the pruners
@torch.no_grad()
def quad_trace(D: Tensor, H: Tensor, rows: int = 512) -> float:
    """``tr(D H Dᵀ)`` in fp32 (no TF32), summed in fp64, ``rows`` rows at a time."""
    total = 0.0
    with exact_fp32():
        for r0 in range(0, D.shape[0], rows):
            d = D[r0 : r0 + rows].float()
            total += float(((d @ H) * d).sum(dtype=torch.float64))
    return total


@torch.no_grad()
def rel_error(Wp: Tensor, W0: Tensor, H: Tensor, ref: float) -> float:
    """``sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))`` with ``ref = tr(W0 H W0ᵀ)``."""
    num = 0.0
    with exact_fp32():
        for r0 in range(0, W0.shape[0], 512):
            d = Wp[r0 : r0 + 512].float() - W0[r0 : r0 + 512].float()
            num += float(((d @ H) * d).sum(dtype=torch.float64))
    if not math.isfinite(num):
        return float("nan")
    return math.sqrt(max(num, 0.0) / ref) if ref > 0 else float("inf")


@torch.no_grad()
def check_pattern(pattern: str, Wp: Tensor, nnz: int) -> dict:
    """Kept blocks per scope from the pruned weight alone (plain reshapes of ``Wp != 0``)."""
    nz = Wp.detach() != 0
    M, K = nz.shape
    if pattern == "24":  # blocks (1, 1), scopes of 4 adjacent columns
        el = nz.view(M, K // 4, 4, 1)
        blocks_any, blocks_all = el.any(-1), el.all(-1)
        kept = blocks_any.sum(-1)
    elif pattern == "48":  # blocks of 2 adjacent columns, scopes of 4 blocks (8 columns)
        el = nz.view(M, K // 8, 4, 2)
        blocks_any, blocks_all = el.any(-1), el.all(-1)
        kept = blocks_any.sum(-1)
    elif pattern == "coupled24":  # 16-column tiles; column j (< 8) pairs with j + 8; scopes of 4 pairs
        el = nz.view(M, K // 16, 2, 8).transpose(2, 3)  # (M, tile, j, half)
        blocks_any, blocks_all = el.any(-1), el.all(-1)  # (M, tile, 8)
        kept = blocks_any.view(M, K // 16, 2, 4).sum(-1)
    elif pattern == "block16":  # 16-column blocks; rows p and p + 8 of each 16-row group compete
        el = nz.view(M // 16, 2, 8, K // 16, 16)
        blocks_any, blocks_all = el.any(-1), el.all(-1)  # (group, half, p, colblock)
        kept = blocks_any.sum(1)
    else:
        raise KeyError(pattern)
    over = int((kept > nnz).sum())
    under = int((kept < nnz).sum())
    partial = int((blocks_any & ~blocks_all).sum())  # kept blocks holding some exact zeros
    return dict(pattern_ok=over == 0 and under == 0, scopes=int(kept.numel()), scopes_over=over, scopes_under=under,
                kept_blocks_with_zeros=partial)


# ------------------------------------------------------------------ the calls
Call = Callable[[nn.Parameter, Tensor], None]


def ours_scope(pattern: str, W: nn.Parameter):
    if pattern == "24":
        return patterns.nm(W, 2, 4)
    if pattern == "48":
        return patterns.nm_blocks(W, 2, 4, 2)
    if pattern == "coupled24":
        return patterns.coupled_nm(W, 2, 4, 8)
    if pattern == "block16":
        return patterns.row_coupled_blocks(W, 16, 8, 1)
    raise KeyError(pattern)


def ours_call(pattern: str, method: str, c_dtype, args) -> tuple[Call, str]:
    ng, n_splits = args.ng, args.n_splits
    ctor = {
        "24": "patterns.nm(W, 2, 4)",
        "48": "patterns.nm_blocks(W, 2, 4, 2)",
        "coupled24": "patterns.coupled_nm(W, 2, 4, 8)",
        "block16": "patterns.row_coupled_blocks(W, 16, 8, 1)",
    }[pattern]
    if method == "magnitude":
        return (lambda W, H: prune_magnitude(*ours_scope(pattern, W))), f"{ctor}; prune_magnitude(scope, nnz)"
    if method == "obd":
        def call(W, H):
            scope, nnz = ours_scope(pattern, W)
            prune_obd(scope, H, nnz)
        return call, f"{ctor}; prune_obd(scope, H, nnz)"
    if method == "sparsegpt":
        def call(W, H):
            scope, nnz = ours_scope(pattern, W)
            prune_sparsegpt(scope, H, nnz)
        return call, f"{ctor}; prune_sparsegpt(scope, H, nnz)"
    if method in ("obs_local", "obs_full", "obs_interleaved"):
        mode = method[4:]
        kw = dict(compensate=mode, n_splits=n_splits) if mode == "interleaved" else dict(compensate=mode)

        def call(W, H):
            scope, nnz = ours_scope(pattern, W)
            StructuredOBS(scope, H).prune(nnz, **kw)
        kws = ", ".join(f"{k}={v!r}" for k, v in kw.items())
        return call, f"{ctor}; StructuredOBS(scope, H).prune(nnz, {kws})"
    if method in TRUE_OBS:
        order = TRUE_OBS[method]

        def call(W, H):
            scope, nnz = ours_scope(pattern, W)
            StructuredOBS(scope, H).prune_true_obs(nnz, ng=ng, order=order, c_dtype=c_dtype)
        return call, f"{ctor}; StructuredOBS(scope, H).prune_true_obs(nnz, ng={ng}, order={order!r}, c_dtype={c_dtype})"
    raise KeyError(method)


class Peer:
    """The reference implementation (sparsekit 0.1.5), called through its public API only."""

    name = "sparsekit"

    def __init__(self, extra_path: Optional[str] = None):
        if extra_path:
            sys.path.insert(0, extra_path)
        try:
            import sparsekit  # noqa: F401
        except ImportError as exc:
            missing = getattr(exc, "name", None)
            why = (
                "sparsekit imports Triton at top level (sparsekit/kernels.py), so it runs only where Triton is "
                "installed — in practice the GPU machine"
                if missing == "triton"
                else "install it without its dependencies, e.g. `python3 -m pip install --no-deps --target /tmp/site "
                ".whl/sparsekit-0.1.5-py3-none-any.whl`, and pass --peer-path /tmp/site"
            )
            raise SystemExit(f"--peer sparsekit: cannot import sparsekit ({type(exc).__name__}: {exc}); {why}") from exc
        import sparsekit as sk

        self.sk = sk
        try:
            from importlib.metadata import version

            self.version = version("sparsekit")
        except Exception:  # noqa: BLE001
            self.version = getattr(sk, "__version__", "unknown")
        if self.version != "0.1.5":
            print(f"note: sparsekit {self.version} found; this benchmark was written against 0.1.5", file=sys.stderr)
        self.file = sk.__file__

    # Built exactly like SPEC §2 / sparsekit's README table (W contiguous, strides in elements).
    def scope(self, pattern: str, W: nn.Parameter):
        sk = self.sk
        M, K = W.shape
        if pattern == "24":
            return sk.ScopeSpec(sk.BlockSpec(W, (1, 1)), (1, 4)), 2
        if pattern == "48":
            return sk.ScopeSpec(sk.BlockSpec(W, (1, 2)), (1, 4)), 2
        if pattern == "coupled24":
            view = sk.View(W, (M, K // 16, 8, 2), (K, 16, 1, 8))
            return sk.ScopeSpec(sk.BlockSpec(view, (1, 1, 1, 2)), (1, 1, 4, 1)), 2
        if pattern == "block16":
            view = sk.View(W, (M // 16, 2, 8 * K), (16 * K, 8 * K, 1))
            return sk.ScopeSpec(sk.BlockSpec(view, (1, 1, 16)), (1, 2, 1)), 1
        raise KeyError(pattern)

    SPEC_TEXT = {
        "24": "ScopeSpec(BlockSpec(W, (1, 1)), (1, 4)), nnz=2",
        "48": "ScopeSpec(BlockSpec(W, (1, 2)), (1, 4)), nnz=2",
        "coupled24": "ScopeSpec(BlockSpec(View(W, (M, K/16, 8, 2), (K, 16, 1, 8)), (1, 1, 1, 2)), (1, 1, 4, 1)), nnz=2",
        "block16": "ScopeSpec(BlockSpec(View(W, (M/16, 2, 8K), (16K, 8K, 1)), (1, 1, 16)), (1, 2, 1)), nnz=1",
    }

    def call(self, pattern: str, method: str, c_dtype, args) -> tuple[Call, str]:
        sk = self.sk
        spec = f"sparsekit: {self.SPEC_TEXT[pattern]}"
        ng, n_splits = args.ng, args.n_splits
        if method == "magnitude":
            def call(W, H):
                scope, nnz = self.scope(pattern, W)
                scope.hard_threshold(nnz=nnz)
            return call, f"{spec}; scope.hard_threshold(nnz=nnz)"
        if method == "obd":
            def call(W, H):
                scope, nnz = self.scope(pattern, W)
                values = W.detach().abs() * H.diagonal().clamp_min(0).sqrt()[None, :]
                scope.hard_threshold(nnz=nnz, values=values)
            return call, f"{spec}; scope.hard_threshold(nnz=nnz, values=|W|*sqrt(diag H))"
        if method == "sparsegpt":
            fn, text = {
                "24": (lambda W, H: sk.sparsegpt_prune(W, H, block_size=1, scope_size=4),
                       "sparsegpt_prune(W, H, block_size=1, scope_size=4)"),
                "48": (lambda W, H: sk.sparsegpt_prune(W, H, block_size=2, scope_size=8),
                       "sparsegpt_prune(W, H, block_size=2, scope_size=8)"),
                "coupled24": (lambda W, H: sk.sparsegpt_coupled_24(W, H), "sparsegpt_coupled_24(W, H)"),
                "block16": (lambda W, H: sk.sparsegpt_block16(W, H), "sparsegpt_block16(W, H)"),
            }[pattern]

            def call(W, H):
                out = fn(W.detach(), H)
                W.data.copy_(out)
            return call, f"sparsekit.{text}; W.copy_(result)"
        if method in ("obs_local", "obs_full", "obs_interleaved"):
            mode = method[4:]
            kw = dict(compensate=mode, n_splits=n_splits) if mode == "interleaved" else dict(compensate=mode)

            def call(W, H):
                scope, nnz = self.scope(pattern, W)
                sk.StructuredOBS(scope, H).prune(nnz, **kw)
            kws = ", ".join(f"{k}={v!r}" for k, v in kw.items())
            return call, f"{spec}; StructuredOBS(scope, H).prune(nnz, {kws})"
        if method in TRUE_OBS:
            order = TRUE_OBS[method]

            def call(W, H):
                scope, nnz = self.scope(pattern, W)
                sk.StructuredOBS(scope, H).prune_true_obs(nnz, ng=64 if ng is None else ng, order=order, c_dtype=c_dtype)
            text = f"{spec}; StructuredOBS(scope, H).prune_true_obs(nnz, ng={64 if ng is None else ng}, order={order!r}, c_dtype={c_dtype})"
            if pattern == "block16" and c_dtype not in (None, torch.float16):
                text += "  [sparsekit's row-coupled path ignores c_dtype: fp16 C]"
            return call, text
        raise KeyError(method)


# ------------------------------------------------------------------ timing
class CellTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(at: Optional[float]):
    """Raise CellTimeout in this (main) thread once ``time.monotonic()`` passes ``at``."""
    if at is None or not hasattr(signal, "setitimer"):
        yield
        return
    remaining = at - time.monotonic()
    if remaining <= 0:
        raise CellTimeout()

    def handler(signum, frame):
        raise CellTimeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_once(fn: Callable[[], None], device: torch.device) -> dict:
    """One call: device time (CUDA events) or host time, and peak memory."""
    sync(device)
    out: dict = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        out["base_gib"] = torch.cuda.memory_allocated(device) / GIB
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        end.synchronize()
        out["wall_s"] = time.perf_counter() - t0
        out["seconds"] = start.elapsed_time(end) / 1e3
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    else:
        t0 = time.perf_counter()
        fn()
        out["seconds"] = out["wall_s"] = time.perf_counter() - t0
        out["peak_gib"] = None
    return out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def rows_redone(messages: List[str]) -> Optional[int]:
    total = None
    for m in messages:
        hit = _ROWS_RE.search(m)
        if hit:
            total = (total or 0) + int(hit.group(1))
    return total


def run_cell(call: Call, layer: Layer, pattern: str, nnz: int, method: str, args, device, ref_trace: float) -> dict:
    """Warm-up, then up to ``args.repeat`` timed runs of ``call`` on fresh copies of ``layer.W``."""
    W0, H = layer.W, layer.H
    began = time.monotonic()
    at = began + args.cell_timeout if args.cell_timeout else None
    cell: dict = dict(status="ok", runs=[])
    try:
        if args.warmup != "none":
            if args.warmup == "small":
                m = min(W0.shape[0], 256)
                k = min(W0.shape[1], 1024)
                Ww, Hw = W0[:m, :k].clone(), H[:k, :k].clone()
            else:
                Ww, Hw = W0, H
            Wp = nn.Parameter(Ww.clone())
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with deadline(at):
                        t = time.perf_counter()
                        call(Wp, Hw)
                        sync(device)
                        cell["warmup_s"] = time.perf_counter() - t
            except (CellTimeout, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - the timed runs say whether the call works at full size
                cell["warmup_exception"] = f"{type(exc).__name__}: {exc}"
                free_memory(device)
            del Wp, Ww, Hw
        spent = 0.0
        for r in range(args.repeat):
            Wp = nn.Parameter(W0.clone())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with deadline(at):
                    run = run_once(lambda Wp=Wp: call(Wp, H), device)
            messages = sorted({str(w.message) for w in caught})
            run["error"] = rel_error(Wp.detach(), W0, H, ref_trace)
            run.update(check_pattern(pattern, Wp, nnz))
            run["rows_fp32"] = rows_redone(messages) if method in TRUE_OBS else None
            if method in TRUE_OBS and run["rows_fp32"] is None:
                run["rows_fp32"] = 0
            if messages:
                run["warnings"] = messages
            cell["runs"].append(run)
            del Wp
            spent += run["seconds"]
            if args.cell_budget and spent >= args.cell_budget and r + 1 < args.repeat:
                cell["stopped_by_budget"] = True
                break
    except CellTimeout:
        cell["status"] = "timeout" if not cell["runs"] else "ok"
        cell["timed_out_after_s"] = round(time.monotonic() - began, 1)
    except torch.cuda.OutOfMemoryError as exc:
        cell["status"] = "oom"
        cell["exception"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    except Exception as exc:  # noqa: BLE001 - a failing cell must not stop the table
        cell["status"] = "failed"
        cell["exception"] = f"{type(exc).__name__}: {exc}"
        cell["traceback"] = traceback.format_exc(limit=6)
    finally:
        free_memory(device)
    runs = cell["runs"]
    if runs:
        cell["n_runs"] = len(runs)
        cell["seconds"] = statistics.median(r["seconds"] for r in runs)
        cell["seconds_min"] = min(r["seconds"] for r in runs)
        cell["peak_gib"] = max(r["peak_gib"] for r in runs) if runs[0]["peak_gib"] is not None else None
        cell["base_gib"] = runs[0].get("base_gib")
        cell["error"] = runs[-1]["error"]
        errs = [r["error"] for r in runs]
        cell["error_spread"] = max(errs) - min(errs)
        cell["pattern_ok"] = all(r["pattern_ok"] for r in runs)
        cell["rows_fp32"] = runs[-1]["rows_fp32"]
    return cell


# ------------------------------------------------------------------ table
def cell_key(c: dict) -> tuple:
    return (c["layer"], c["pattern"], c["method"], c.get("c_dtype") or "default", c["impl"])


def fmt(v, spec: str, width: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return f"{'-':>{width}}"
    return f"{format(v, spec):>{width}}"


def status_text(c: Optional[dict]) -> str:
    if c is None:
        return "-"
    if c["status"] == "ok":
        return "ok" if c.get("pattern_ok") else "BROKEN"
    return c["status"]


def print_table(cells: List[dict], peer: bool, markdown: bool) -> None:
    by = {cell_key(c): c for c in cells}
    rows = sorted({k[:4] for k in by}, key=lambda k: (k[0], list(PATTERNS).index(k[1]), METHODS.index(k[2]), k[3]))
    head = ["layer", "pattern", "method", "error", "time s", "peak GiB", "fp32 rows", "pattern"]
    if peer:
        head += ["ref error", "ref time s", "ref peak GiB", "ref pattern", "time ours/ref", "error ours/ref"]
    lines = []
    for key in rows:
        o, r = by.get(key + ("s3sparse",)), by.get(key + ("sparsekit",))
        method = key[2] + ("" if key[3] == "default" else f" [{key[3]}]")

        def get(c, name):
            return c.get(name) if c and c["status"] == "ok" else None

        row = [key[0], PATTERNS[key[1]], method,
               fmt(get(o, "error"), ".4f", 0), fmt(get(o, "seconds"), ".3f", 0),
               fmt(get(o, "peak_gib"), ".2f", 0), fmt(get(o, "rows_fp32"), "d", 0), status_text(o)]
        if peer:
            ratio_t = (get(o, "seconds") / get(r, "seconds")) if get(o, "seconds") and get(r, "seconds") else None
            ratio_e = (get(o, "error") / get(r, "error")) if get(o, "error") is not None and get(r, "error") else None
            row += [fmt(get(r, "error"), ".4f", 0), fmt(get(r, "seconds"), ".3f", 0), fmt(get(r, "peak_gib"), ".2f", 0),
                    status_text(r), fmt(ratio_t, ".3f", 0), fmt(ratio_e, ".3f", 0)]
        lines.append([s.strip() for s in row])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for ln in lines:
            print("| " + " | ".join(ln) + " |")
        return
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) if lines else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for ln in lines:
        print("  ".join(s.ljust(w) if i < 3 else s.rjust(w) for i, (s, w) in enumerate(zip(ln, widths))))


def skip_matcher(spec: str) -> Callable[[str, str], bool]:
    pairs = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if ":" not in item:
            raise SystemExit(f"--skip-*-cells: {item!r} is not pattern:method (e.g. block16:sparsegpt, block16:*)")
        p, m = item.split(":", 1)
        pairs.append((p.strip(), m.strip()))

    def match(pattern: str, method: str) -> bool:
        return any(p in ("*", pattern) and m in ("*", method) for p, m in pairs)
    return match


def combine(files: List[str], out: Optional[str], markdown: bool) -> None:
    """Merge several table1 JSON files (e.g. one per GPU invocation) into one table."""
    cells: List[dict] = []
    invocations: List[dict] = []
    for f in files:
        res = json.loads(Path(f).read_text())
        offset = len(invocations)
        invocations += res.get("invocations") or [res["meta"]]
        for c in res.get("cells", []):
            c = dict(c, invocation=offset + int(c.get("invocation", 0)), source=str(f))
            cells = [x for x in cells if cell_key(x) != cell_key(c)] + [c]
    devices = sorted({m.get("device", "?") for m in invocations})
    commits = sorted({m.get("commit", "?") for m in invocations})
    print(f"{len(files)} files, {len(cells)} cells; devices {devices}; commits {commits}")
    print_table(cells, any(c["impl"] == "sparsekit" for c in cells), markdown)
    if out:
        meta = dict(invocations[-1], combined_from=[str(f) for f in files]) if invocations else {}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(dict(meta=meta, invocations=invocations, cells=cells), indent=1, default=str))
        print(f"\nwrote {out}")


def split_list(values: List[str]) -> List[str]:
    return [v for item in values for v in item.replace(",", " ").split()]


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--rows", "-M", type=int, default=2560)
    ap.add_argument("--cols", "-K", type=int, default=9728)
    ap.add_argument("--samples", "-N", type=int, default=8192, help="calibration rows of the synthetic layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--real", default=None, metavar="PATH", help=".pt file or directory of real-layer (W, H) pairs")
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), help=f"subset of {list(PATTERNS)}")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"subset of {METHODS}")
    ap.add_argument("--c-dtype", nargs="+", default=["default"], choices=list(C_DTYPES),
                    help="per-row C storage of the true_obs methods; several run each (default: the pruner's)")
    ap.add_argument("--ng", type=int, default=None, help="scopes per True OBS batch (default: the library's: 64, 1 for row-coupled patterns; the reference: 64)")
    ap.add_argument("--n-splits", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=None, help="timed runs per cell, median reported (default 3; 1 with --quick)")
    ap.add_argument("--warmup", choices=["small", "full", "none"], default="small")
    ap.add_argument("--cell-budget", type=float, default=0.0, help="stop repeating once timed runs took S s (0: off)")
    ap.add_argument("--cell-timeout", type=float, default=0.0, help="abort a cell after S s (0: off)")
    ap.add_argument("--peer", choices=["sparsekit"], default=None, help="also run the reference implementation")
    ap.add_argument("--peer-path", default=None, help="directory to put first on sys.path for the peer (e.g. /tmp/site)")
    ap.add_argument("--peer-only", action="store_true", help="run only the peer's cells")
    ap.add_argument("--skip-peer-cells", default="", help="pattern:method,... reference cells to leave out (* = any)")
    ap.add_argument("--skip-cells", default="", help="pattern:method,... s3sparse cells to leave out (* = any)")
    ap.add_argument("--quick", action="store_true", help="128×512, N=1024, CPU, 1 timed run: a smoke test")
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true", help="keep the cells already in --out, replace those re-run")
    ap.add_argument("--markdown", action="store_true", help="print the final table as Markdown")
    ap.add_argument("--combine", nargs="+", default=None, metavar="JSON",
                    help="run nothing: merge these result files (later ones win per cell), print the table, "
                    "write --out if given")
    args = ap.parse_args(argv)
    if args.combine:
        combine(args.combine, args.out, args.markdown)
        return

    args.patterns = split_list(args.patterns)
    args.methods = split_list(args.methods)
    for p in args.patterns:
        if p not in PATTERNS:
            ap.error(f"unknown pattern {p!r}; choose from {list(PATTERNS)}")
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}; choose from {METHODS}")
    if args.quick:
        args.rows, args.cols, args.samples = 128, 512, 1024
        if args.device is None:
            args.device = "cpu"
        if args.peer:
            ap.error("--quick is the CPU smoke test of s3sparse alone; drop --peer (or pass -M/-K/-N without --quick)")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch.cuda.is_available() is False")
    skip_peer, skip_ours = skip_matcher(args.skip_peer_cells), skip_matcher(args.skip_cells)
    peer = Peer(args.peer_path) if args.peer else None
    if args.peer_only and not peer:
        ap.error("--peer-only needs --peer sparsekit")

    if args.real:
        layers = load_layers(args.real, device)
    else:
        layers = [synthetic_layer(args.rows, args.cols, args.samples, args.seed, device)]

    tag = "real" if args.real else f"{args.rows}x{args.cols}"
    out = Path(args.out) if args.out else HERE / "results" / (
        f"table1-{device.type}-{tag}{'-peer' if peer else ''}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cells: List[dict] = []
    earlier: List[dict] = []
    if args.merge and out.exists():
        old = json.loads(out.read_text())
        cells = old.get("cells", [])
        earlier = old.get("invocations") or ([old["meta"]] if "meta" in old else [])
    meta = dict(
        benchmark="table1",
        **environment(device),
        peer=dict(name=peer.name, version=peer.version, file=peer.file) if peer else None,
        layers=[dict(name=L.name, **L.meta) for L in layers],
        args={k: v for k, v in vars(args).items()},
        timing=("CUDA events around each call" if device.type == "cuda" else "time.perf_counter around each call")
        + f", warm-up {args.warmup}, median of up to {args.repeat} runs",
    )

    invocations = earlier + [meta]  # with --merge, every invocation's meta; cells say which one made them

    def save() -> None:
        out.write_text(json.dumps(dict(meta=meta, invocations=invocations, cells=cells), indent=1, default=str))

    impls = ([] if args.peer_only else ["s3sparse"]) + (["sparsekit"] if peer else [])
    print(f"{device_name(device)}, torch {torch.__version__}, s3sparse {s3sparse.__version__} "
          f"({'CUDA' if s3sparse.build_info().get('cuda') else 'CPU'} build), commit {meta['commit']}"
          + (f", peer sparsekit {peer.version}" if peer else ""), flush=True)
    for layer in layers:
        print(f"layer {layer.name}: W {tuple(layer.W.shape)}, H {tuple(layer.H.shape)}", flush=True)
        ref_trace = quad_trace(layer.W, layer.H)
        H_check = layer.H.detach().cpu().clone()
        for pattern in args.patterns:
            for method in args.methods:
                dtypes = args.c_dtype if method in TRUE_OBS else ["default"]
                for dt in dtypes:
                    c_dtype = C_DTYPES[dt]
                    for impl in impls:
                        base = dict(layer=layer.name, pattern=pattern, method=method, c_dtype=dt, impl=impl,
                                    invocation=len(invocations) - 1, commit=meta["commit"])
                        if (impl == "s3sparse" and skip_ours(pattern, method)) or (
                            impl == "sparsekit" and skip_peer(pattern, method)
                        ):
                            cell = dict(base, status="skipped")
                        else:
                            try:
                                if impl == "s3sparse":
                                    call, text = ours_call(pattern, method, c_dtype, args)
                                else:
                                    call, text = peer.call(pattern, method, c_dtype, args)
                                nnz = NNZ[pattern]
                                cell = dict(base, call=text, **run_cell(call, layer, pattern, nnz, method, args, device,
                                                                        ref_trace))
                            except Exception as exc:  # noqa: BLE001
                                cell = dict(base, status="failed", exception=f"{type(exc).__name__}: {exc}")
                            if not torch.equal(layer.H.detach().cpu(), H_check):
                                cell["h_modified"] = True
                                layer.H.copy_(H_check.to(layer.H.device))
                        cells = [c for c in cells if cell_key(c) != cell_key(cell)] + [cell]
                        save()
                        label = method + ("" if dt == "default" else f"[{dt}]")
                        if cell["status"] == "ok":
                            print(f"  {impl:<9} {PATTERNS[pattern]:<19} {label:<22} err {cell['error']:.5f}  "
                                  f"{cell['seconds']:9.3f} s (n={cell['n_runs']})"
                                  + (f"  peak {cell['peak_gib']:.2f} GiB" if cell.get("peak_gib") is not None else "")
                                  + (f"  fp32 rows {cell['rows_fp32']}" if cell.get("rows_fp32") is not None else "")
                                  + ("" if cell["pattern_ok"] else "  PATTERN BROKEN")
                                  + ("  H MODIFIED" if cell.get("h_modified") else ""), flush=True)
                        else:
                            print(f"  {impl:<9} {PATTERNS[pattern]:<19} {label:<22} {cell['status']}"
                                  + (f": {cell['exception']}" if cell.get("exception") else ""), flush=True)
    print()
    print_table(cells, peer is not None or any(c["impl"] == "sparsekit" for c in cells), args.markdown)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
