"""Saving a pruned model atomically.

Everything is written to a fresh temporary directory next to ``OUT_DIR``
(safetensors weights and config via ``save_pretrained``, the tokenizer, the
source directory's other small files such as sentence-transformers' pooling
config, and ``s3sparse.json``), which is renamed to ``OUT_DIR`` only at the end.
An error or a KeyboardInterrupt at any point removes the temporary directory:
no half-written ``OUT_DIR`` is ever left, and the source model directory is
only ever read. With ``overwrite`` an existing ``OUT_DIR`` is moved aside, the
new one renamed in, and the old one deleted (restored if the rename fails).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Optional

from .errors import UsageError

__all__ = ["REPORT_NAME", "check_output_dir", "save_pruned_model"]

REPORT_NAME = "s3sparse.json"
# Files of the source directory never copied: the weights (written anew) and what save_pretrained writes.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_SKIPPED_NAMES = {".gitattributes", REPORT_NAME}
_MAX_COPIED_BYTES = 50 << 20


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_dir(out_dir: str, model_dir: Optional[str] = None, overwrite: bool = False) -> None:
    """Refuse (:class:`UsageError`) an ``out_dir`` that exists without ``overwrite`` or would touch ``model_dir``."""
    if model_dir is not None and (_inside(out_dir, model_dir) or _inside(model_dir, out_dir)):
        raise UsageError(
            f"output directory {out_dir!r} and model directory {model_dir!r} overlap; the model directory is never written"
        )
    if os.path.lexists(out_dir):
        if not overwrite:
            raise UsageError(f"output directory {out_dir!r} already exists; pass --overwrite to replace it")
        if not os.path.isdir(out_dir) or os.path.islink(out_dir):
            raise UsageError(f"output path {out_dir!r} exists and is not a directory; remove it first")


def _copy_extra_files(model_dir: str, target: str) -> None:
    """Copy the source directory's small non-weight files that the save did not write (e.g. ``1_Pooling/``)."""
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, model_dir)
        for name in files:
            if name in _SKIPPED_NAMES or name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"):
                continue
            src = os.path.join(root, name)
            dst = os.path.normpath(os.path.join(target, rel, name))
            if os.path.exists(dst) or os.path.getsize(src) > _MAX_COPIED_BYTES:
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)


def save_pruned_model(
    model,
    tokenizer,
    out_dir: str,
    report: Dict[str, Any],
    model_dir: Optional[str] = None,
    overwrite: bool = False,
) -> str:
    """Write ``model`` (+ ``tokenizer``, + ``report`` as ``s3sparse.json``) to ``out_dir`` atomically.

    Returns the absolute path of ``out_dir``. ``model_dir``, when given, is the
    source checkpoint: its extra files are copied and it is checked not to overlap ``out_dir``.
    """
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, model_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    backup = None
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if model_dir is not None:
            _copy_extra_files(model_dir, staging)
        with open(os.path.join(staging, REPORT_NAME), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
            f.write("\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it 0700
        check_output_dir(out_dir, model_dir, overwrite)  # it may have appeared while we worked
        old_moved = False
        try:
            if os.path.lexists(out_dir):
                backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
                os.rmdir(backup)
                os.rename(out_dir, backup)
                old_moved = True
            os.rename(staging, out_dir)
            staging = None
        except BaseException:
            if old_moved and not os.path.lexists(out_dir):
                os.rename(backup, out_dir)  # put the old OUT_DIR back
                backup = None
            raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        elif backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    return out_dir
