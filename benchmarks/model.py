"""Whole-model pruning: a random Qwen3-4B-shaped model, every block Linear to 2:4, through ``prune_model``.

    python benchmarks/model.py --device cuda --out benchmarks/results/model-h200-qwen3-4b.json   # 36 blocks, both methods
    python benchmarks/model.py --device cuda --methods sparsegpt --layers 12                      # one method, fewer blocks
    python benchmarks/model.py --tiny --device cpu --out /tmp/model-tiny.json                     # CPU smoke run, seconds

Issue 16, item 3. The model is ``transformers.Qwen3ForCausalLM`` built from a ``Qwen3Config`` of
Qwen3-4B's shape (36 blocks, hidden 2560, MLP 9728, 32 query heads and 8 KV heads of 128, vocabulary
151936, tied embeddings; ``--layers``, ``--hidden``, ``--intermediate``, ``--vocab`` change it) with
random weights (the config's initialisation, seeded with ``--seed``), built directly on ``--device``
in ``--dtype`` (default bfloat16, Qwen3's own dtype; no CPU copy). Each method starts from a
freshly built model with the same seed (``init_checksum`` in the JSON shows they are the same).

Calibration: ``--windows`` (128) windows of ``--seq-len`` (2048) random token ids (``torch.randint``
over the vocabulary, seeded), given to ``prune_model`` as an ``(n_samples, seq_len)`` tensor (its
``CalibrationSet``). The pipeline's text source (``pydoc`` via ``load_calibration``) needs the
model's tokenizer, which a machine without network does not have; the cost of calibration does not
depend on which tokens are fed.

Pruning: ``s3sparse.llm.prune_model(model, calibration, --pattern, method, device=--device,
batch_size=--batch-size, hessian_dtype=--hessian-dtype)`` with everything else at the pipeline's
defaults (the ones ``s3sparse prune`` uses): every block Linear (q, k, v, o, gate, up, down) is
pruned, the LM head is skipped. ``--methods`` takes the pipeline's method names (``sparsegpt``,
``true-obs``; ``true_obs`` is the same). An untimed warm-up prunes a one-block tiny model with the
method on the device first (``--no-warmup`` leaves it out), so library handles and the like are
not in the timings.

What is measured, per method (host clock, ``perf_counter``, after ``torch.cuda.synchronize``):

* ``total_s``: the whole ``prune_model`` call;
* ``prune_s``: the pruner calls, summed over the layers -- the pipeline's own ``LayerReport.seconds``
  (synchronised around the method's ``run``);
* ``calibration_s`` = ``capture_s`` + ``dense_forward_s`` + ``pruned_forward_s``: running the
  calibration windows up to the first block; each dense block on its inputs with the Hessian hooks
  (``hessian_s`` of it is in ``HessianAccumulator.add``, the ``Σ xᵀx`` sums); each pruned block
  again, whose outputs are the next block's inputs;
* ``other_s`` = the rest: per layer the copy of the weight and H for the pruner, its output error,
  the pattern check (``layer_overhead_s``), the block output errors (``block_error_s``), the final
  zero counts.

The pipeline's report has no calibration time, so these pieces are timed by wrapping, for the
length of one run, the functions of ``s3sparse.llm.pipeline`` that do them
(``_capture_first_inputs``, ``_block_hessians``, ``run_block``, ``_error_sums``, ``_prune_layer``,
``_prune_block``, ``HessianAccumulator.add``); each wrapper synchronises the device before and
after. Where a name is missing (the pipeline changed) that piece is ``null`` and ``calibration_s``
falls back to ``total_s − prune_s``. The ``_prune_block`` wrapper also prints one progress line per
block (flushed).

Also per method: ``peak_gib`` (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` just before the call, absolute: the model's weights are in it,
``model_gib``), the number of Linears pruned (7 per block), the mean layer output error, rows
redone in fp32, fallbacks, and the pattern check, done here from the pruned weights: for a plain
``N:M`` (the registry's ``nm``, e.g. 2:4) every group of M consecutive weights of a row must hold
at most N non-zeros (``groups_over`` counts the ones that hold more; ``groups_under`` the ones with
more zeros than needed); ``zero_fraction`` is the fraction of zeros over all pruned weights
(exactly 0.5 for 2:4 when no group is under). Other patterns (the registry's 4:8 keeps column
pairs) are checked with the pattern's own ``holds``.

Targets (issue 16): SparseGPT ≤ 1 min, True OBS ≤ 5 min for the whole 36-block model on one H200.

Printed: a progress line per block, then a table per method; JSON (device name, torch and
transformers versions, git commit -- ``$S3SPARSE_GIT_COMMIT`` overrides it --, the config, the
options, per method the figures above with per-block and per-layer times) is written to ``--out``
(default ``benchmarks/results/model-<device>-<layers>L[-tiny].json``) after each method.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import GIB, TINY_QWEN3, environment, sync  # noqa: E402

# Qwen3-4B's shape (its config.json), random weights.
QWEN3_4B = dict(
    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
TINY = TINY_QWEN3
TINY_WINDOWS, TINY_SEQ_LEN = 4, 64
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HESSIAN_DTYPES = {"float64": torch.float64, "float32": torch.float32}
TARGETS_S = {"sparsegpt": 60.0, "true-obs": 300.0}


# ------------------------------------------------------------------ the model
def model_config(args) -> Any:
    """The ``Qwen3Config``: Qwen3-4B's shape (or the tiny one), with the command line's overrides."""
    import transformers

    kwargs = dict(TINY if args.tiny else QWEN3_4B)
    for key, value in (("num_hidden_layers", args.layers), ("hidden_size", args.hidden),
                       ("intermediate_size", args.intermediate), ("vocab_size", args.vocab)):
        if value is not None:
            kwargs[key] = value
    kwargs["max_position_embeddings"] = max(kwargs["max_position_embeddings"], args.seq_len)
    config = transformers.Qwen3Config(**kwargs)
    config._attn_implementation = "sdpa"
    return config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random ``Qwen3ForCausalLM``, initialised directly on ``device`` in ``dtype`` (seeded), in eval mode."""
    import transformers

    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with torch.device(device), _default_dtype(dtype):
        model = transformers.Qwen3ForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def init_checksum(model: nn.Module) -> float:
    """Σ of the first block's q_proj weight and of the first 1000 embedding rows: equal for equal initial models."""
    q = model.model.layers[0].self_attn.q_proj.weight
    e = model.model.embed_tokens.weight[:1000]
    return float(q.double().sum() + e.double().sum())


def calibration_ids(config, windows: int, seq_len: int, seed: int) -> torch.Tensor:
    """``(windows, seq_len)`` random token ids over the vocabulary (seeded, on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (windows, seq_len), generator=generator)


# ------------------------------------------------------------------ timing the pipeline's pieces
class PipelineTimer:
    """Times the pieces of one ``prune_model`` run by wrapping functions of ``s3sparse.llm.pipeline``.

    Used as a context manager around the call; the wrappers are removed on exit. Every wrapper
    synchronises ``device`` before and after its call, so a piece's time is its own.
    """

    # Each timed piece and the function of s3sparse.llm.pipeline whose calls it is.
    PIECES = {"capture": "_capture_first_inputs", "dense_forward": "_block_hessians", "hessian": "HessianAccumulator",
              "pruned_forward": "run_block", "block_error": "_error_sums", "layer": "_prune_layer"}
    WRAPPED = tuple(PIECES.values()) + ("_prune_block",)

    def __init__(self, device: torch.device, label: str, n_blocks: int, print_fn: Callable[[str], None] = print):
        from s3sparse.llm import pipeline

        self.pipeline = pipeline
        self.device = device
        self.label = label
        self.n_blocks = n_blocks
        self.print = print_fn
        self.missing = [name for name in self.WRAPPED if not hasattr(pipeline, name)]
        self.seconds: Dict[str, float] = {k: 0.0 for k in self.PIECES}
        self.blocks: List[Dict[str, Any]] = []
        self._in_dense = False
        self._saved: Dict[str, Any] = {}
        self._started = 0.0

    def _timed(self, key: str, fn: Callable, *args, **kwargs):
        sync(self.device)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync(self.device)
            self.seconds[key] += time.perf_counter() - t0

    def __enter__(self) -> "PipelineTimer":
        p = self.pipeline
        self._started = time.perf_counter()
        originals = {name: getattr(p, name) for name in self.WRAPPED if name not in self.missing}
        self._saved = dict(originals)
        timer = self

        def timed(key: str, fn: Callable) -> Callable:
            return lambda *args, **kwargs: timer._timed(key, fn, *args, **kwargs)

        for key in ("capture", "block_error", "layer"):  # timed as they are
            name = self.PIECES[key]
            if name in originals:
                setattr(p, name, timed(key, originals[name]))

        if "_block_hessians" in originals:
            def block_hessians(*args, **kwargs):
                timer._in_dense = True
                try:
                    return timer._timed("dense_forward", originals["_block_hessians"], *args, **kwargs)
                finally:
                    timer._in_dense = False
            p._block_hessians = block_hessians

        if "run_block" in originals:
            def run_block(*args, **kwargs):
                if timer._in_dense:  # inside _block_hessians, timed there
                    return originals["run_block"](*args, **kwargs)
                return timer._timed("pruned_forward", originals["run_block"], *args, **kwargs)
            p.run_block = run_block

        if "HessianAccumulator" in originals:
            base = originals["HessianAccumulator"]

            class TimedAccumulator(base):
                def add(self, *args, **kwargs):
                    return timer._timed("hessian", super().add, *args, **kwargs)

            p.HessianAccumulator = TimedAccumulator

        if "_prune_block" in originals:
            def prune_block(run, index, *args, **kwargs):
                before = dict(timer.seconds)
                layers_before = len(run.report.layers)
                t0 = time.perf_counter()
                out = originals["_prune_block"](run, index, *args, **kwargs)
                sync(timer.device)
                timer._block_done(index, time.perf_counter() - t0, before, run.report.layers[layers_before:])
                return out
            p._prune_block = prune_block
        return self

    def _block_done(self, index: int, seconds: float, before: Dict[str, float], layers: list) -> None:
        delta = {k: self.seconds[k] - before[k] for k in self.seconds}
        prune = sum(layer.seconds for layer in layers)
        row = dict(block=index, seconds=seconds, prune_s=prune, dense_forward_s=delta["dense_forward"],
                   hessian_s=delta["hessian"], pruned_forward_s=delta["pruned_forward"])
        self.blocks.append(row)
        elapsed = time.perf_counter() - self._started
        done = len(self.blocks)
        eta = elapsed / done * (self.n_blocks - done)
        peak = f", peak {torch.cuda.max_memory_allocated(self.device) / GIB:.1f} GiB" if self.device.type == "cuda" else ""
        self.print(f"[{self.label}] block {index + 1}/{self.n_blocks}: {seconds:.2f} s (forward+H "
                   f"{delta['dense_forward']:.2f} s, of it H {delta['hessian']:.2f} s; prune {prune:.2f} s; pruned "
                   f"forward {delta['pruned_forward']:.2f} s); elapsed {elapsed:.1f} s, about {eta:.0f} s to go{peak}")

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(self.pipeline, name, fn)
        self._saved = {}

    def piece(self, key: str) -> Optional[float]:
        """Seconds of one piece, or None when the function it wraps was missing."""
        return None if self.PIECES[key] in self.missing else self.seconds[key]


# ------------------------------------------------------------------ checking the pattern from the weights
def check_weights(model: nn.Module, layer_names: List[str], pattern: str) -> Dict[str, Any]:
    """The pattern checked on every pruned Linear's weight, and the zeros among them."""
    from s3sparse.llm import parse_pattern

    choice = parse_pattern(pattern)
    # Plain N:M (the registry's ``nm``: N of every M adjacent weights of a row) is checked here from the
    # weights alone; any other pattern (the registry's 4:8 keeps column pairs) by its own holds().
    is_nm = getattr(choice.constructor, "__name__", None) == "nm"
    nm = (choice.kwargs["n"], choice.kwargs["m"]) if is_nm else None
    weights = zeros = groups = over = under = 0
    failed: List[str] = []
    with torch.no_grad():
        for name in layer_names:
            W = model.get_submodule(name).weight
            weights += W.numel()
            zeros += int((W == 0).sum())
            if nm is not None:
                n, m = nm
                if W.shape[1] % m:
                    failed.append(name)
                    continue
                nonzero = (W.reshape(W.shape[0], -1, m) != 0).sum(-1)
                groups += nonzero.numel()
                layer_over = int((nonzero > n).sum())
                over += layer_over
                under += int((nonzero < n).sum())
                if layer_over:
                    failed.append(name)
            elif not choice.holds(W):
                failed.append(name)
    return dict(checked_by="N:M groups along each row, here" if nm else "the pattern's holds()",
                layers_checked=len(layer_names), weights=weights, zeros=zeros,
                zero_fraction=zeros / weights if weights else None,
                groups=groups if nm else None, groups_over=over if nm else None, groups_under=under if nm else None,
                layers_failed=failed, pattern_ok=bool(layer_names) and not failed)


# ------------------------------------------------------------------ one method
def run_method(method: str, args, config, ids: torch.Tensor, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """Build the model, prune it with ``method``, time the pieces, check the weights."""
    from s3sparse.llm import parse_method, prune_model

    canonical = parse_method(method).name
    hessian_dtype = _HESSIAN_DTYPES[args.hessian_dtype]
    if args.warmup:
        warm_cfg = model_config(argparse.Namespace(**{**vars(args), "tiny": True, "layers": 1, "hidden": None,
                                                      "intermediate": None, "vocab": None}))
        warm = build_model(warm_cfg, device, dtype, args.seed)
        t0 = time.perf_counter()
        prune_model(warm, calibration_ids(warm_cfg, 2, 32, args.seed), args.pattern, canonical, device=device,
                    progress=False, hessian_dtype=hessian_dtype)
        sync(device)
        print(f"[{canonical}] warm-up (a 1-block tiny model, untimed): {time.perf_counter() - t0:.2f} s", flush=True)
        del warm
        gc.collect()

    sync(device)
    t0 = time.perf_counter()
    model = build_model(config, device, dtype, args.seed)
    sync(device)
    build_s = time.perf_counter() - t0
    checksum = init_checksum(model)
    n_blocks = config.num_hidden_layers
    print(f"[{canonical}] built the model on {device} in {build_s:.1f} s "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters, "
          f"{next(model.parameters()).dtype})", flush=True)

    from s3sparse.llm import CalibrationSet

    calibration = CalibrationSet(ids, source=f"random token ids (torch.randint, seed {args.seed})", seed=args.seed)
    model_gib = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        model_gib = torch.cuda.memory_allocated(device) / GIB
    timer = PipelineTimer(device, canonical, n_blocks, print_fn=lambda s: print(s, flush=True))
    sync(device)
    t0 = time.perf_counter()
    with timer:
        report = prune_model(model, calibration, args.pattern, canonical, device=device, batch_size=args.batch_size,
                             progress=False, hessian_dtype=hessian_dtype)
    sync(device)
    total = time.perf_counter() - t0
    peak_gib = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None

    pruned = report.pruned_layers()
    prune_s = sum(layer.seconds for layer in pruned)
    pieces = {k: timer.piece(k) for k in timer.seconds}
    if None in (pieces["capture"], pieces["dense_forward"], pieces["pruned_forward"]):
        calibration_s, split = total - prune_s, "total - prune (some pipeline functions were not found to time)"
    else:
        calibration_s = pieces["capture"] + pieces["dense_forward"] + pieces["pruned_forward"]
        split = "wrapped pipeline functions"
    other_s = total - calibration_s - prune_s
    check = check_weights(model, [layer.name for layer in pruned], args.pattern)
    summary = report.sparsity_summary()
    expected = LINEARS_PER_BLOCK * n_blocks
    res = dict(
        method=canonical, status="ok", total_s=total, calibration_s=calibration_s, prune_s=prune_s, other_s=other_s,
        capture_s=pieces["capture"], dense_forward_s=pieces["dense_forward"], hessian_s=pieces["hessian"],
        pruned_forward_s=pieces["pruned_forward"], block_error_s=pieces["block_error"],
        layer_overhead_s=None if pieces["layer"] is None else pieces["layer"] - prune_s,
        split=split, wrappers_missing=timer.missing, report_seconds=report.seconds, build_s=build_s,
        peak_gib=peak_gib, model_gib=model_gib, init_checksum=checksum,
        linears_pruned=len(pruned), linears_expected=expected, all_pruned=len(pruned) == expected,
        mean_error=report.mean_error(), fp32_redos=summary["fp32_redos"], fallbacks=summary["fallback_count"],
        pipeline_pattern_violations=summary["pattern_violations"], check=check,
        target_s=TARGETS_S.get(canonical) if n_blocks == QWEN3_4B["num_hidden_layers"] and not args.tiny else None,
        recipe=report.recipe, calibration=report.calibration,
        blocks=timer.blocks,
        layers=[dict(name=layer.name, shape=list(layer.shape), seconds=layer.seconds, error=layer.error,
                     fp32_redos=layer.fp32_redos, fallback=layer.fallback) for layer in report.layers],
    )
    del model, report
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_table(res: Dict[str, Any]) -> None:
    """A few lines per method: the time split, memory, the check."""
    c = res["check"]
    rows = [
        ("total", f"{res['total_s']:.2f} s" + (f" (target {res['target_s']:.0f} s)" if res.get("target_s") else "")),
        ("calibration", f"{res['calibration_s']:.2f} s  (capture {_fmt(res['capture_s'], '.2f')} s, dense forward + "
                        f"Hessians {_fmt(res['dense_forward_s'], '.2f')} s of which Hessian sums "
                        f"{_fmt(res['hessian_s'], '.2f')} s, pruned forward {_fmt(res['pruned_forward_s'], '.2f')} s)"),
        ("pruning", f"{res['prune_s']:.2f} s  (pruner calls, {res['linears_pruned']} Linears)"),
        ("other", f"{res['other_s']:.2f} s  (per-layer copies, output errors, pattern checks "
                  f"{_fmt(res['layer_overhead_s'], '.2f')} s; block errors {_fmt(res['block_error_s'], '.2f')} s)"),
        ("peak memory", "-" if res["peak_gib"] is None else f"{res['peak_gib']:.1f} GiB (model {res['model_gib']:.1f} GiB)"),
        ("linears pruned", f"{res['linears_pruned']} of {res['linears_expected']}"),
        ("zeros", f"{c['zero_fraction']:.4%} of {c['weights']:,} weights" if c["zero_fraction"] is not None else "-"),
        ("pattern check", ("ok" if c["pattern_ok"] else f"FAILED in {len(c['layers_failed'])} layers: "
                           f"{', '.join(c['layers_failed'][:5])}") +
         (f" ({c['groups_over']} groups over, {c['groups_under']} under, of {c['groups']:,})"
          if c["groups"] is not None else "")),
        ("mean layer error", _fmt(res["mean_error"], ".4f")),
        ("fp32 redos / fallbacks", f"{res['fp32_redos']} / {res['fallbacks']}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{res['method']}:")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    sys.stdout.flush()


# ------------------------------------------------------------------ main
def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="model dtype (bfloat16)")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default 36, Qwen3-4B's; 2 with --tiny)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 2560; 64 with --tiny)")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP size (default 9728; 128 with --tiny)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 151936; 512 with --tiny)")
    ap.add_argument("--windows", type=int, default=None, help="calibration windows (default 128; 4 with --tiny)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per window (default 2048; 64 with --tiny)")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (8, the pipeline's default)")
    ap.add_argument("--hessian-dtype", default="float64", choices=sorted(_HESSIAN_DTYPES),
                    help="dtype the Hessians are accumulated in (float64, the pipeline's default)")
    ap.add_argument("--methods", nargs="+", default=["sparsegpt", "true-obs"],
                    help="pipeline method names (default: sparsegpt true-obs)")
    ap.add_argument("--pattern", default="2:4", help="pattern of every block Linear (2:4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model's weights and of the token ids (0)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the untimed warm-up on a one-block tiny model")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny Qwen3 (2 blocks, hidden 64, MLP 128, vocabulary 512; 4 windows of 64 tokens)")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/model-<device>-<layers>L[-tiny].json)")
    args = ap.parse_args(argv)
    if args.windows is None:
        args.windows = TINY_WINDOWS if args.tiny else 128
    if args.seq_len is None:
        args.seq_len = TINY_SEQ_LEN if args.tiny else 2048
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = _DTYPES[args.dtype]
    started = time.perf_counter()

    import transformers

    from s3sparse.llm import parse_method

    methods = [parse_method(m).name for m in args.methods]  # unknown names fail here, before any work
    config = model_config(args)
    env = environment(device)
    env["transformers"] = transformers.__version__
    ids = calibration_ids(config, args.windows, args.seq_len, args.seed)
    print(f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}")
    print(f"Qwen3 {config.num_hidden_layers} blocks, hidden {config.hidden_size}, MLP {config.intermediate_size}, "
          f"vocabulary {config.vocab_size}, {args.dtype}; {args.windows} windows x {args.seq_len} tokens (random ids), "
          f"batch {args.batch_size}, Hessians in {args.hessian_dtype}; pattern {args.pattern}; methods "
          f"{', '.join(methods)}", flush=True)

    out = Path(args.out) if args.out else \
        HERE / "results" / f"model-{device.type}-{config.num_hidden_layers}L{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shape_keys = set(QWEN3_4B) | {"rope_parameters", "hidden_act"}
    meta = dict(benchmark="model", **env, dtype=args.dtype, pattern=args.pattern, windows=args.windows,
                seq_len=args.seq_len, batch_size=args.batch_size, hessian_dtype=args.hessian_dtype, seed=args.seed,
                warmup=args.warmup, tiny=args.tiny, methods=methods,
                config={k: v for k, v in config.to_dict().items() if k in shape_keys},
                calibration="random token ids: torch.randint(0, vocab_size, (windows, seq_len)) with a "
                            "torch.Generator seeded with seed, passed to prune_model as a CalibrationSet",
                timing="host perf_counter after torch.cuda.synchronize; see benchmarks/model.py's docstring")
    result: Dict[str, Any] = dict(meta=meta, results={})
    for method in methods:
        try:
            res = run_method(method, args, config, ids, device, dtype)
        except Exception as exc:  # noqa: BLE001 - keep the other method's figures
            import traceback

            traceback.print_exc(limit=6)
            res = dict(method=method, status="failed", detail=f"{type(exc).__name__}: {exc}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["results"][method] = res
        if res["status"] == "ok":
            print_table(res)
        meta["seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    ok = all(r["status"] == "ok" and r["check"]["pattern_ok"] and r["all_pruned"] for r in result["results"].values())
    result["ok"] = ok
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"\n{'all checks passed' if ok else 'CHECK FAILED'}; {meta['seconds']:.0f} s; wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
