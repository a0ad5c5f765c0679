"""Saving a model directory atomically, and replacing only what s3sparse wrote.

Everything is written to a fresh temporary directory next to ``OUT_DIR``
(for ``s3sparse prune``: safetensors weights and config via ``save_pretrained``,
the tokenizer, the source directory's other small files such as
sentence-transformers' pooling config, and ``s3sparse.json``), which is renamed
to ``OUT_DIR`` only at the end (:func:`write_atomically`; ``s3sparse pack``
writes through it too). The source model directory is only ever read.

* An error or a KeyboardInterrupt while writing removes the temporary directory:
  no half-written ``OUT_DIR`` is ever left.
* With ``overwrite`` an existing ``OUT_DIR`` is moved aside, the new one renamed
  in, and the old one deleted (put back if the rename fails). Only a directory
  that s3sparse wrote — one holding ``s3sparse.json`` or ``s3sparse-packed.json``
  (:func:`written_by_s3sparse`) — or an empty one is replaced; anything else is
  refused (:class:`~s3sparse.llm.errors.DirectoryError`).
* Ctrl-C (SIGINT) raises KeyboardInterrupt while the files are written, but
  is held back while the old and new directories are swapped and while the
  temporary directory is removed, and raised right after: an interrupt at any
  moment leaves either the complete old ``OUT_DIR`` (or none) or the complete
  new one. :func:`take_written` tells which directories were completed, so the
  CLI can say so when it is interrupted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional

from .errors import DirectoryError

__all__ = ["REPORT_NAME", "check_output_dir", "save_pruned_model", "write_atomically", "written_by_s3sparse", "take_written"]

REPORT_NAME = "s3sparse.json"
# The manifests s3sparse writes: s3sparse.json (prune) and s3sparse-packed.json (pack, = pack.MANIFEST_NAME).
_MANIFEST_NAMES = (REPORT_NAME, "s3sparse-packed.json")
# Files of the source directory never copied: the weights (written anew) and what save_pretrained writes.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_SKIPPED_NAMES = {".gitattributes", *_MANIFEST_NAMES}
_MAX_COPIED_BYTES = 50 << 20

# Absolute paths of the directories completed (renamed into place) since the last take_written().
_WRITTEN: List[str] = []


def _inside(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip(os.sep) + os.sep)


def written_by_s3sparse(path: str) -> bool:
    """Whether the directory ``path`` is one s3sparse wrote: it holds ``s3sparse.json`` or
    ``s3sparse-packed.json``, and that file is a JSON object."""
    for name in _MANIFEST_NAMES:
        manifest = os.path.join(path, name)
        if not os.path.isfile(manifest):
            continue
        try:
            with open(manifest, encoding="utf-8") as f:
                if isinstance(json.load(f), dict):
                    return True
        except (OSError, ValueError):
            continue
    return False


def check_output_dir(out_dir: str, model_dir: Optional[str] = None, overwrite: bool = False) -> None:
    """Refuse (:class:`~s3sparse.llm.errors.DirectoryError`) an ``out_dir`` that cannot be written.

    Refused: an ``out_dir`` that overlaps ``model_dir`` (which is never written);
    one that exists, without ``overwrite``; with ``overwrite``, one that is not a
    directory, or is a directory that s3sparse did not write
    (:func:`written_by_s3sparse`) and is not empty.
    """
    if model_dir is not None and (_inside(out_dir, model_dir) or _inside(model_dir, out_dir)):
        raise DirectoryError(
            f"output directory {out_dir!r} and model directory {model_dir!r} overlap; the model directory is never written"
        )
    if not os.path.lexists(out_dir):
        return
    if not overwrite:
        raise DirectoryError(f"output directory {out_dir!r} already exists; pass --overwrite to replace it "
                             "(only a directory that s3sparse wrote is replaced)")
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise DirectoryError(f"output path {out_dir!r} exists and is not a directory; --overwrite only replaces a "
                             "directory that s3sparse wrote: choose another output path or remove it first")
    if not written_by_s3sparse(out_dir) and os.listdir(out_dir):
        raise DirectoryError(
            f"output directory {out_dir!r} exists and was not written by s3sparse (it holds no "
            f"{' or '.join(_MANIFEST_NAMES)}); --overwrite only replaces a directory that s3sparse wrote, "
            "so nothing was deleted: choose another output directory, or move this one away yourself"
        )


def take_written() -> List[str]:
    """The directories :func:`write_atomically` completed since the last call (absolute paths); forgets them."""
    out = list(_WRITTEN)
    del _WRITTEN[:]
    return out


class _HeldInterrupts:
    """``with _HeldInterrupts() as held:`` — SIGINT is remembered, not raised, inside the block
    (except inside ``with held.allowed():``) and raised again on leaving it.

    Only in the main thread (where Python runs signal handlers) and when SIGINT
    has a Python-level handler; elsewhere it does nothing.
    """

    def __init__(self) -> None:
        self.previous: Any = None
        self.active = False
        self.pending = False

    def _remember(self, signum: int, frame: Any) -> None:
        self.pending = True

    def _deliver(self) -> None:
        """Deliver a remembered SIGINT to the handler in place now (KeyboardInterrupt by default)."""
        if self.pending:
            self.pending = False
            signal.raise_signal(signal.SIGINT)

    def __enter__(self) -> "_HeldInterrupts":
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
            self.previous = signal.signal(signal.SIGINT, self._remember)
            self.active = True
        return self

    def __exit__(self, *exc: Any) -> bool:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
            self.active = False
            self._deliver()
        return False

    @contextmanager
    def allowed(self) -> Iterator[None]:
        """Inside: SIGINT goes to the previous handler again (a Ctrl-C raises KeyboardInterrupt at once)."""
        if not self.active:
            yield
            return
        signal.signal(signal.SIGINT, self.previous)
        try:
            self._deliver()
            yield
        finally:
            signal.signal(signal.SIGINT, self._remember)


def write_atomically(
    out_dir: str, write: Callable[[str], None], *, model_dir: Optional[str] = None, overwrite: bool = False
) -> str:
    """Create ``out_dir`` by ``write(staging)`` into a temporary directory that is then renamed to it.

    ``write`` fills the empty directory it is given. The checks of
    :func:`check_output_dir` run before and again right before the rename. On
    any error or interrupt nothing of the new directory remains and an existing
    ``out_dir`` is as it was, unless the interrupt came after the old directory
    was moved aside: then the new one is completed first (see the module
    docstring). Returns the absolute path of ``out_dir``.
    """
    out_dir = os.path.abspath(out_dir)
    check_output_dir(out_dir, model_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    with _HeldInterrupts() as held:
        staging: Optional[str] = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
        try:
            with held.allowed():
                write(staging)
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700
            check_output_dir(out_dir, model_dir, overwrite)  # it may have appeared while we worked
            _swap_in(staging, out_dir)
            staging = None
            _WRITTEN.append(out_dir)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _swap_in(staging: str, out_dir: str) -> None:
    """Rename ``staging`` to ``out_dir``; an existing ``out_dir`` is moved aside first and deleted after
    (put back if the rename fails)."""
    parent = os.path.dirname(out_dir)
    backup = None
    if os.path.lexists(out_dir):
        backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
        os.rmdir(backup)
        os.rename(out_dir, backup)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        if backup is not None and not os.path.lexists(out_dir):
            os.rename(backup, out_dir)  # put the old OUT_DIR back
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


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
    ``overwrite`` replaces an ``out_dir`` that s3sparse wrote (see the module docstring).
    """

    def write(staging: str) -> None:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if model_dir is not None:
            _copy_extra_files(model_dir, staging)
        with open(os.path.join(staging, REPORT_NAME), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
            f.write("\n")

    return write_atomically(out_dir, write, model_dir=model_dir, overwrite=overwrite)
