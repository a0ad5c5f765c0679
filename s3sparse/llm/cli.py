"""The command line: ``s3sparse prune`` and ``s3sparse eval`` (also ``python -m s3sparse``).

::

    s3sparse prune MODEL_DIR --out OUT_DIR --pattern 2:4 --method true-obs --calib FILE
        [--config recipe.yaml] [--opt KEY=VALUE]... [--override GLOB=SPEC]... [--skip GLOB]...
        [--n-samples 128] [--seq-len 2048] [--seed 0] [--batch-size 8]
        [--device auto|cpu|cuda|cuda:N] [--offload] [--dtype auto|float32|bfloat16|float16]
        [--overwrite] [--no-progress] [--hessian-dtype float64|float32] [--dist-timeout MINUTES]
    torchrun --nproc-per-node N -m s3sparse prune ...   (every rank prunes a share; rank 0 writes OUT_DIR)
    s3sparse eval MODEL_DIR --text FILE [--dense DENSE_DIR] [--seq-len] [--n-samples] [--json FILE] [--no-progress]
    s3sparse pack PRUNED_DIR --out PACKED_DIR [--no-compact] [--dtype ...] [--overwrite] [--no-progress]
        (load it back with s3sparse.llm.load_packed(PACKED_DIR))

Exit status: 0 done, 2 bad arguments (one line on stderr saying what), 130
interrupted (Ctrl-C at any moment: the output directory is as it was, or completely
written, and the line on stderr says which), 1 anything else (with its traceback).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .distributed import rank_prefix
from .errors import UsageError

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

_PRUNE_DEFAULTS = {"pattern": "2:4", "method": "sparsegpt", "n_samples": 128, "seq_len": 2048, "seed": 0, "text_field": "text"}


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing the usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _key_value(text: str) -> tuple:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    from .recipe import parse_scalar

    return key.strip(), parse_scalar(value.strip())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``s3sparse``: every option of ``prune``, ``eval`` and ``pack`` has a help text,
    the options a command cannot run without are listed under "required", and ``prune --help`` ends with
    every pattern name and its meaning."""
    from .method_registry import METHOD_NAMES
    from ..patterns import pattern_names_table

    parser = _Parser(prog="s3sparse", description="Prune Hugging Face models to S3 structured sparsity patterns.")
    sub = parser.add_subparsers(dest="command", metavar="{prune,eval,pack}")
    sub.required = True
    dtypes = ["auto", "float32", "bfloat16", "float16"]

    p = sub.add_parser(
        "prune", help="prune a model directory block by block and save it",
        usage="%(prog)s MODEL_DIR --out OUT_DIR --calib SOURCE [--pattern PATTERN] [--method METHOD] [options]",
        description="Prune every Linear of a Hugging Face model's transformer blocks, block by block, and save it.",
        epilog=pattern_names_table(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model directory (only read)")
    required = p.add_argument_group("required")
    required.add_argument("--out", required=True, metavar="OUT_DIR", help="where to write the pruned model (must not exist)")
    required.add_argument("--calib", metavar="SOURCE",
                          help="calibration text: .txt, .jsonl (text field), a saved datasets directory, or pydoc / pydoc:calib "
                               "(required unless the --config recipe gives calibration.source)")
    p.add_argument("--pattern", help="default pattern (2:4); every name and its meaning is listed below")
    p.add_argument("--method", help=f"default method (sparsegpt): {', '.join(METHOD_NAMES)}")
    p.add_argument("--opt", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="an option of the default method, e.g. --opt ng=32 --opt damp=0.01")
    p.add_argument("--override", action="append", default=[], metavar="GLOB=SPEC",
                   help="per-layer settings: '*.down_proj=4:8', '*.mlp.*=2:4,method=true-obs,ng=32', 'model.layers.0.*=dense'")
    p.add_argument("--skip", action="append", default=None, metavar="GLOB", help="layers left dense (default: lm_head)")
    p.add_argument("--config", metavar="RECIPE", help="recipe file (YAML or JSON); flags override it")
    p.add_argument("--text-field", help="jsonl/dataset field holding the text (text)")
    p.add_argument("--n-samples", type=int, help="calibration windows (128)")
    p.add_argument("--seq-len", type=int, help="tokens per window (2048, at most the model's maximum)")
    p.add_argument("--seed", type=int, help="seed of the window positions (0)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (8)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--offload", action="store_true", help="keep the model on the CPU; only the current block on --device")
    p.add_argument("--dtype", default="auto", choices=dtypes, help="load dtype (auto: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--hessian-dtype", default="float64", choices=["float64", "float32"],
                   help="dtype the layer Hessians are accumulated and summed over ranks in (float64: the result "
                        "does not depend on the number of ranks or --batch-size; float32: half the memory, "
                        "faster on GPUs with slow fp64, but the fp32 round-off of the sums can flip near-tied mask entries)")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="MINUTES",
                   help="under torchrun: how long a rank waits for the others in one collective "
                        "(60; rank 0 writing OUT_DIR and the slowest rank's share of a layer count)")

    e = sub.add_parser("eval", help="perplexity (causal LM) or embedding similarity to the dense model (encoder)",
                       description="Causal LM: perplexity on non-overlapping windows of held-out text (and the dense "
                                   "model's, with --dense). Encoder: mean cosine similarity of mean-pooled embeddings "
                                   "to the dense model's over held-out paragraphs.")
    e.add_argument("model_dir", metavar="MODEL_DIR", help="the model to evaluate (e.g. the OUT_DIR of `s3sparse prune`; only read)")
    required = e.add_argument_group("required")
    required.add_argument("--text", required=True, metavar="SOURCE",
                          help="held-out text: .txt, .jsonl, a saved datasets directory, or pydoc:heldout")
    e.add_argument("--dense", metavar="DENSE_DIR", help="the dense model (default for encoders: the source in s3sparse.json)")
    e.add_argument("--text-field", default="text", help="jsonl/dataset field holding the text (text)")
    e.add_argument("--seq-len", type=int, default=None, help="tokens per window / text (512, at most the model's maximum)")
    e.add_argument("--n-samples", type=int, default=None, help="windows (causal: 64) or paragraphs (encoder: 256)")
    e.add_argument("--seed", type=int, default=0, help="seed of the paragraph sample (encoders; 0)")
    e.add_argument("--batch-size", type=int, default=8, help="windows or paragraphs per forward pass (8)")
    e.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    e.add_argument("--dtype", default="auto", choices=dtypes, help="load dtype (auto: the checkpoint's)")
    e.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")

    k = sub.add_parser("pack", help="swap every pruned Linear of a pruned model for a packed (or compacted) one and save it",
                       description="Swap every pruned Linear of the OUT_DIR of `s3sparse prune` for a PackedLinear (or "
                                   "compact whole-channel MLPs, and keep the other layers of whole input columns as "
                                   "smaller dense ones behind a gather, GatherLinear) and save it; load it with "
                                   "s3sparse.llm.load_packed.")
    k.add_argument("model_dir", metavar="PRUNED_DIR", help="the OUT_DIR of `s3sparse prune` (only read)")
    required = k.add_argument_group("required")
    required.add_argument("--out", required=True, metavar="PACKED_DIR", help="where to write the packed model (must not exist)")
    k.add_argument("--no-compact", action="store_true",
                   help="pack whole-channel patterns too instead of compacting the MLPs to smaller dense layers "
                        "(and gathering the other column-pattern layers' kept columns into smaller dense ones)")
    k.add_argument("--dtype", default="auto", choices=dtypes, help="load dtype (auto: the checkpoint's)")
    k.add_argument("--overwrite", action="store_true", help="replace PACKED_DIR if it exists")
    k.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# ------------------------------------------------------------------ shared checks
def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_source(source: str, what: str) -> None:
    from .calibration import PYDOC_SOURCES

    if source not in PYDOC_SOURCES and not os.path.exists(source):
        raise UsageError(f"{what} {source!r} does not exist")


def _max_positions(model) -> Optional[int]:
    value = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


# ------------------------------------------------------------------ prune
def _recipe_from(args) -> tuple:
    from .recipe import Recipe, load_recipe_file, parse_override

    kwargs: Dict[str, Any] = {}
    calibration: Dict[str, Any] = {}
    if args.config:
        kwargs, calibration = load_recipe_file(args.config)
    if args.pattern is not None:
        kwargs["pattern"] = args.pattern
    if args.method is not None:
        if kwargs.get("method") not in (None, args.method):
            kwargs.pop("method_options", None)  # the recipe's options belonged to its method
        kwargs["method"] = args.method
    if args.opt:
        kwargs["method_options"] = {**kwargs.get("method_options", {}), **dict(args.opt)}
    overrides = kwargs.get("overrides") or []
    if isinstance(overrides, dict):
        overrides = [{"match": glob, **(v if isinstance(v, dict) else {"pattern": v})} for glob, v in overrides.items()]
    overrides = list(overrides) + [parse_override(text) for text in args.override]
    kwargs["overrides"] = overrides
    if args.skip is not None:
        kwargs["skip"] = list(kwargs.get("skip") or []) + args.skip if args.config else args.skip
    kwargs.setdefault("pattern", _PRUNE_DEFAULTS["pattern"])
    kwargs.setdefault("method", _PRUNE_DEFAULTS["method"])
    unknown = sorted(set(calibration) - {"source", "n_samples", "seq_len", "seed", "text_field"})
    if unknown:
        raise UsageError(f"recipe calibration: unknown key(s) {', '.join(unknown)}; use source, n_samples, seq_len, seed, text_field")
    settings = {
        "source": args.calib if args.calib is not None else calibration.get("source"),
        "n_samples": args.n_samples if args.n_samples is not None else calibration.get("n_samples", _PRUNE_DEFAULTS["n_samples"]),
        "seq_len": args.seq_len if args.seq_len is not None else calibration.get("seq_len"),
        "seed": args.seed if args.seed is not None else calibration.get("seed", _PRUNE_DEFAULTS["seed"]),
        "text_field": args.text_field or calibration.get("text_field", _PRUNE_DEFAULTS["text_field"]),
    }
    return Recipe.create(**kwargs), settings


def _versions() -> Dict[str, str]:
    from .. import __version__

    out = {"s3sparse": __version__, "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def _prune(args, argv: Sequence[str]) -> int:
    from .distributed import DEFAULT_TIMEOUT_MINUTES, launch, torchrun_env
    from .loading import check_model_dir
    from .save import check_output_dir

    started = time.perf_counter()
    check_model_dir(args.model_dir)
    recipe, calib = _recipe_from(args)
    if calib["source"] is None:
        raise UsageError("no calibration text: pass --calib FILE (or calibration.source in the recipe)")
    _check_source(calib["source"], "calibration file")
    for name in ("n_samples", "seq_len"):
        _positive(f"--{name.replace('_', '-')}", calib[name])
    _positive("--batch-size", args.batch_size)
    timeout = DEFAULT_TIMEOUT_MINUTES if args.dist_timeout is None else args.dist_timeout
    if not timeout > 0:
        raise UsageError(f"--dist-timeout must be > 0 minutes, got {args.dist_timeout}")
    device = _device(args.device)
    env = torchrun_env()
    if env is None or env.world_size == 1:  # several ranks: rank 0 checks it, on its own file system
        check_output_dir(args.out, args.model_dir, args.overwrite)  # after the argument checks: it must not hide them
    if args.no_progress:
        _quiet_transformers()
    # Under torchrun (WORLD_SIZE > 1) every rank runs this with its own device; alone, as before.
    with launch(device, timeout) as (ranks, device):
        return _prune_on_ranks(args, argv, recipe, calib, device, ranks, started)


def _prune_on_ranks(args, argv: Sequence[str], recipe, calib: Dict[str, Any], device: torch.device, ranks, started: float) -> int:
    """Load, prune (on every rank of ``ranks``), and on rank 0 print and save."""
    from .calibration import load_calibration
    from .loading import load_model, load_tokenizer
    from .pipeline import check_model_fits, prune_model
    from .save import check_output_dir

    with ranks.sync("loading the model and the calibration text"):
        if ranks.is_main and ranks.distributed:  # OUT_DIR is rank 0's to write, on rank 0's file system
            check_output_dir(args.out, args.model_dir, args.overwrite)
        model, kind = load_model(args.model_dir, args.dtype)
        tokenizer = load_tokenizer(args.model_dir)
        check_model_fits(model, recipe)  # shape errors before the calibration text is read
        limit = _max_positions(model)
        seq_len = calib["seq_len"] or min(_PRUNE_DEFAULTS["seq_len"], limit or _PRUNE_DEFAULTS["seq_len"])
        if limit is not None and seq_len > limit:
            raise UsageError(f"--seq-len {seq_len} is longer than the model's maximum of {limit} positions")
        calibration = load_calibration(calib["source"], tokenizer, calib["n_samples"], seq_len, calib["seed"], calib["text_field"])
    if ranks.is_main:
        on = f"{ranks.world_size} processes (torchrun), rank 0 on {device}" if ranks.distributed else f"device {device}"
        print(
            f"s3sparse prune: {type(model).__name__} from {args.model_dir}; pattern {recipe.pattern}, method {recipe.method} "
            f"{recipe.method.options or ''}; calibration {calibration.n_samples} x {calibration.seq_len} tokens from "
            f"{calibration.source} (seed {calibration.seed}); {on}{' with offload' if args.offload else ''}",
            flush=True,
        )
    report = prune_model(
        model, calibration, recipe=recipe, device=device, offload=args.offload, batch_size=args.batch_size,
        progress=not args.no_progress, hessian_dtype=getattr(torch, args.hessian_dtype), process_group=ranks.group,
    )
    with ranks.sync("writing OUT_DIR on rank 0"):  # the other ranks wait here for rank 0's save
        if ranks.is_main:
            _print_and_save(args, argv, model, kind, tokenizer, calib, report, started)
    return EXIT_OK


def _print_and_save(args, argv: Sequence[str], model, kind: str, tokenizer, calib: Dict[str, Any], report, started: float) -> None:
    from .save import save_pruned_model

    print()
    print(report.layer_table())
    print()
    print(report.block_table())
    print()
    print(report.sparsity_report(), flush=True)

    data = {
        **_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_model": os.path.abspath(args.model_dir),
        "model_class": type(model).__name__,
        "model_kind": kind,
        "command": ["s3sparse", *argv],
        **report.to_dict(),
    }
    data["calibration"]["text_field"] = calib["text_field"]
    out = save_pruned_model(model.to("cpu"), tokenizer, args.out, data, model_dir=args.model_dir, overwrite=args.overwrite)
    print(f"saved the pruned model to {out} ({time.perf_counter() - started:.1f} s in all)")


def _quiet_transformers() -> None:
    """No transformers progress bars (loading / writing shards) either."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except (ImportError, AttributeError):
        pass


# ------------------------------------------------------------------ eval
def _eval(args) -> int:
    from .calibration import read_texts
    from .eval import embedding_similarity, heldout_paragraphs, mean_pooled_embeddings, perplexity, perplexity_windows
    from .loading import check_model_dir, load_model, load_tokenizer
    from .pack import is_packed_dir, read_manifest

    check_model_dir(args.model_dir, packed=True)
    _check_source(args.text, "evaluation text")
    _positive("--seq-len", args.seq_len)
    _positive("--n-samples", args.n_samples)
    _positive("--batch-size", args.batch_size)
    dense_dir = args.dense
    if dense_dir is not None:
        check_model_dir(dense_dir, packed=True)
    device = _device(args.device)
    show = not args.no_progress
    if not show:
        _quiet_transformers()
    texts = read_texts(args.text, args.text_field)
    tokenizer = load_tokenizer(args.model_dir)
    from transformers import AutoConfig

    from .loading import model_kind

    if is_packed_dir(args.model_dir):  # transformers cannot read its config.json: the manifest says
        kind = read_manifest(args.model_dir).get("model_kind", "encoder")
    else:
        kind = model_kind(AutoConfig.from_pretrained(args.model_dir, local_files_only=True))
    if kind == "encoder" and dense_dir is None:
        dense_dir = _dense_source(args.model_dir)
        if not dense_dir or not os.path.isdir(dense_dir):
            raise UsageError("an encoder is evaluated against its dense model: pass --dense DENSE_DIR")
    results: Dict[str, Any] = {"model": os.path.abspath(args.model_dir), "kind": kind, "text": args.text}

    def load(path):
        model, _ = load_model(path, args.dtype, kind, packed=True)
        return model.to(device)

    model = load(args.model_dir)
    limit = _max_positions(model)
    seq_len = args.seq_len or min(512, limit or 512)
    if limit is not None and seq_len > limit:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's maximum of {limit} positions")
    results["seq_len"] = seq_len
    if kind == "causal-lm":
        windows = perplexity_windows(tokenizer, texts, seq_len, args.n_samples or 64)
        results["windows"] = int(windows.shape[0])
        results["perplexity"] = perplexity(model, windows, args.batch_size, device, progress=show, desc="perplexity")
        line = f"perplexity: {results['perplexity']:.3f} on {results['windows']} windows of {seq_len} tokens"
        if dense_dir is not None:
            del model
            dense = load(dense_dir)
            results["dense"] = os.path.abspath(dense_dir)
            results["dense_perplexity"] = perplexity(dense, windows, args.batch_size, device, progress=show,
                                                     desc="perplexity (dense)")
            line += f" (dense: {results['dense_perplexity']:.3f})"
    else:
        paragraphs = heldout_paragraphs(texts, args.n_samples or 256, args.seed)
        pruned_emb = mean_pooled_embeddings(model, tokenizer, paragraphs, seq_len, args.batch_size, device,
                                            progress=show, desc="embeddings")
        del model
        dense = load(dense_dir)
        dense_emb = mean_pooled_embeddings(dense, tokenizer, paragraphs, seq_len, args.batch_size, device,
                                           progress=show, desc="embeddings (dense)")
        results["dense"] = os.path.abspath(dense_dir)
        results.update(embedding_similarity(pruned_emb, dense_emb))
        line = (
            f"mean cosine similarity of mean-pooled embeddings to the dense model: {results['mean_cosine']:.4f} "
            f"(min {results['min_cosine']:.4f}, {results['texts']} texts of up to {seq_len} tokens)"
        )
    print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    return EXIT_OK


def _dense_source(model_dir: str) -> Optional[str]:
    """The dense model an s3sparse directory comes from: the ``source_model`` of its ``s3sparse.json``;
    for a packed directory, the dense model of the pruned directory it was packed from."""
    from .pack import is_packed_dir, read_manifest
    from .save import REPORT_NAME

    if is_packed_dir(model_dir):
        manifest = read_manifest(model_dir)
        if manifest.get("dense_model"):
            return manifest["dense_model"]
        model_dir = manifest.get("source_model")  # packed by an s3sparse that did not record it: the pruned dir
        if not model_dir:
            return None
    report_path = os.path.join(model_dir, REPORT_NAME)
    if not os.path.isfile(report_path):
        return None
    with open(report_path, encoding="utf-8") as f:
        return json.load(f).get("source_model")


# ------------------------------------------------------------------ pack
def _pack(args, argv: Sequence[str]) -> int:
    from .loading import check_model_dir, load_model, load_tokenizer
    from .pack import pack_model, save_packed_model
    from .save import REPORT_NAME, check_output_dir

    started = time.perf_counter()
    check_model_dir(args.model_dir)
    report_path = os.path.join(args.model_dir, REPORT_NAME)
    if not os.path.isfile(report_path):
        raise UsageError(f"{args.model_dir!r} has no {REPORT_NAME}: pack the OUT_DIR of `s3sparse prune`, which records "
                         "every layer's pattern")
    with open(report_path, encoding="utf-8") as f:
        pruned = json.load(f)
    layer_patterns = {
        layer["name"]: layer["pattern"] for layer in pruned.get("layers", []) if layer.get("status") == "pruned"
    }
    if not layer_patterns:
        raise UsageError(f"{report_path} lists no pruned layer: nothing to pack")
    check_output_dir(args.out, args.model_dir, args.overwrite)  # after the argument checks: it must not hide them
    if args.no_progress:
        _quiet_transformers()
    model, kind = load_model(args.model_dir, args.dtype)
    tokenizer = load_tokenizer(args.model_dir)
    print(f"s3sparse pack: {type(model).__name__} from {args.model_dir}; {len(layer_patterns)} pruned layers", flush=True)
    report = pack_model(model, layer_patterns, compact_channels=not args.no_compact, progress=not args.no_progress)
    print()
    print(report.table(), flush=True)
    info = {
        **_versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_model": os.path.abspath(args.model_dir),
        "dense_model": pruned.get("source_model"),
        "command": ["s3sparse", *argv],
        "pack": report.to_dict(),
    }
    out = save_packed_model(model, tokenizer, args.out, info, kind=kind, model_dir=args.model_dir, overwrite=args.overwrite)
    print(f"saved the packed model to {out} ({time.perf_counter() - started:.1f} s in all); "
          "load it with s3sparse.llm.load_packed(PACKED_DIR)")
    return EXIT_OK


# ------------------------------------------------------------------ entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``s3sparse``; returns the exit status (see the module docstring)."""
    from .save import take_written

    argv = list(sys.argv[1:] if argv is None else argv)
    take_written()  # forget directories an earlier main() in this process wrote
    try:
        args = build_parser().parse_args(argv)
        if args.command == "prune":
            return _prune(args, argv)
        if args.command == "pack":
            return _pack(args, argv)
        return _eval(args)
    except UsageError as exc:
        if not getattr(exc, "_s3sparse_printed", False):  # under torchrun, launch() printed it already
            print(f"s3sparse{rank_prefix()}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        _say_interrupted()
        return EXIT_INTERRUPTED
    except Exception as exc:
        if getattr(exc, "_s3sparse_printed", False):  # printed with its traceback on every rank (torchrun)
            return EXIT_FAILED
        raise


def _say_interrupted() -> None:
    """One line on stderr: interrupted, and whether an output directory had been completed (by the save's
    record, :func:`s3sparse.llm.save.take_written`; a save is never left half done)."""
    from .save import take_written

    written = take_written()
    if written:
        what = f"{', '.join(written)} had been written completely before the interrupt"
    else:
        what = "nothing was written (an existing output directory is as it was)"
    print(f"s3sparse{rank_prefix()}: interrupted; {what}", file=sys.stderr, flush=True)


def _interrupted_at_exit(signum, frame) -> None:
    """SIGINT handler once the run is over: end the process now with status 130 (its work is complete)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream: nothing more to say on it
            pass
    try:
        os.write(2, f"s3sparse{rank_prefix()}: interrupted while exiting; the run had finished\n".encode())
    finally:
        os._exit(EXIT_INTERRUPTED)


def console_main() -> None:
    """Console-script (and ``python -m s3sparse``) entry point: ``sys.exit(main())``.

    A Ctrl-C after :func:`main` returned — while the interpreter shuts down,
    where Python would only print "Exception ignored" and exit 0 — ends the
    process at once with status 130 as well.
    """
    code = EXIT_INTERRUPTED
    try:
        code = main()
    except KeyboardInterrupt:  # between main()'s own handler and here
        _say_interrupted()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, _interrupted_at_exit)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        # A torchrun rank: its work is done and its process group destroyed.
        # Skip the interpreter's teardown, where the C++ destructors of the
        # collective backends' threads can abort a finished rank
        # ("terminate called without an active exception", about 1 run in 20
        # with gloo), turning a complete run into a failed one.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed or broken stream: nothing more to say on it
                pass
        os._exit(code if isinstance(code, int) else 1)
    sys.exit(code)
