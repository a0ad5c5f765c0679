"""Calibration data: text from local files, tokenized into seeded random windows.

Sources (:func:`read_texts`):

* a plain-text file (``.txt`` or any other extension): paragraphs split on blank lines;
* a ``.jsonl`` file: one JSON object per line, its ``text`` field (``text_field``);
* a directory written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``:
  its ``train`` split, else the first): the ``text`` column (needs ``datasets``);
* ``pydoc`` — the help topics of :mod:`pydoc_data.topics`, which ship with every
  Python (about 0.5 MB of English and code): an offline source for demos and
  tests. ``pydoc:calib`` is the first 80 % of the topics (sorted by name) and
  ``pydoc:heldout`` the last 20 %, so evaluation can use text that calibration never saw.

:func:`calibration_windows` concatenates the tokenized documents and draws
``n_samples`` windows of ``seq_len`` tokens at random start positions from a
``torch.Generator`` seeded with ``seed``; the tokenizer's special tokens (BERT's
``[CLS] … [SEP]``, Llama's BOS) frame every window and count towards ``seq_len``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .errors import UsageError

__all__ = [
    "CalibrationSet",
    "read_texts",
    "tokenize_texts",
    "special_token_frame",
    "calibration_windows",
    "load_calibration",
    "PYDOC_SOURCES",
]

PYDOC_SOURCES = ("pydoc", "pydoc:calib", "pydoc:heldout")
_PYDOC_CALIB_FRACTION = 0.8
# Characters tokenized at most per sample requested (documents are drawn at random
# beyond that), so a huge corpus is not tokenized in full for 128 windows.
_CHARS_PER_TOKEN_BUDGET = 40
_MIN_CHARS_TOKENIZED = 2_000_000


@dataclass
class CalibrationSet:
    """Token windows for calibration.

    Attributes:
        input_ids: ``(n_samples, seq_len)`` long tensor.
        source: where the text came from.
        seed: the seed of the window positions.
        corpus_tokens: tokens in the (possibly sampled) corpus the windows came from.
    """

    input_ids: Tensor
    source: str = "tensor"
    seed: Optional[int] = None
    corpus_tokens: Optional[int] = None

    @property
    def n_samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def batches(self, batch_size: int) -> List[Tensor]:
        """The windows in batches of ``batch_size`` (the last may be smaller)."""
        return list(self.input_ids.split(max(1, int(batch_size))))

    def describe(self) -> Dict[str, Any]:
        """Plain data for the JSON report."""
        return {
            "source": self.source,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "corpus_tokens": self.corpus_tokens,
        }


def _pydoc_texts(which: str) -> List[str]:
    from pydoc_data.topics import topics

    names = sorted(topics)
    cut = int(round(len(names) * _PYDOC_CALIB_FRACTION))
    if which == "pydoc:calib":
        names = names[:cut]
    elif which == "pydoc:heldout":
        names = names[cut:]
    return [topics[name] for name in names]


def _paragraphs(text: str) -> List[str]:
    parts = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
    return [p for p in parts if p]


def _jsonl_texts(path: str, text_field: str) -> List[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"calibration file {path!r} line {lineno}: not JSON ({exc.msg})")
            if not isinstance(record, dict) or text_field not in record:
                raise UsageError(f"calibration file {path!r} line {lineno}: no {text_field!r} field")
            if record[text_field]:
                texts.append(str(record[text_field]))
    return texts


def _dataset_texts(path: str, text_field: str) -> List[str]:
    try:
        import datasets
    except ImportError:
        raise UsageError(f"calibration {path!r} is a directory: reading a saved dataset needs `pip install datasets`")
    try:
        data = datasets.load_from_disk(path)
    except Exception as exc:  # datasets raises several kinds for a directory that is not a dataset
        raise UsageError(f"calibration {path!r}: not a dataset saved with save_to_disk ({type(exc).__name__}: {exc})")
    if isinstance(data, datasets.DatasetDict):
        split = "train" if "train" in data else next(iter(data))
        data = data[split]
    if text_field not in data.column_names:
        raise UsageError(f"calibration dataset {path!r} has no {text_field!r} column (columns: {', '.join(data.column_names)})")
    return [str(t) for t in data[text_field] if t]


def read_texts(source: str, text_field: str = "text") -> List[str]:
    """The documents of a calibration ``source`` (see the module docstring).

    Raises:
        UsageError: a missing file, an unreadable format, or no text at all.
    """
    if source in PYDOC_SOURCES:
        texts = _pydoc_texts(source)
    elif os.path.isdir(source):
        texts = _dataset_texts(source, text_field)
    elif os.path.isfile(source):
        if source.endswith((".jsonl", ".jsonl.txt")):
            texts = _jsonl_texts(source, text_field)
        else:
            with open(source, encoding="utf-8", errors="replace") as f:
                texts = _paragraphs(f.read())
    else:
        raise UsageError(
            f"calibration file {source!r} does not exist (give a .txt, a .jsonl, a saved dataset directory, or {', '.join(PYDOC_SOURCES)})"
        )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UsageError(f"calibration source {source!r} holds no text")
    return texts


def _sample_documents(texts: Sequence[str], max_chars: int, generator: torch.Generator) -> List[str]:
    """All of ``texts`` if small, else a seeded random subset of about ``max_chars`` characters (in corpus order)."""
    if sum(len(t) for t in texts) <= max_chars:
        return list(texts)
    order = torch.randperm(len(texts), generator=generator).tolist()
    chosen, total = [], 0
    for i in order:
        chosen.append(i)
        total += len(texts[i])
        if total >= max_chars:
            break
    return [texts[i] for i in sorted(chosen)]


def special_token_frame(tokenizer) -> Tuple[List[int], List[int]]:
    """The special tokens the tokenizer puts before and after a text: ``(prefix, suffix)``.

    Found by tokenizing one word with and without special tokens, so it works for
    any tokenizer (``([101], [102])`` for BERT, ``([bos], [])`` for Llama, ``([], [])`` for Qwen).
    """
    probe = "hello"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    framed = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start : start + len(plain)] == plain:
            return list(framed[:start]), list(framed[start + len(plain) :])
    return [], []


def tokenize_texts(tokenizer, texts: Sequence[str], chunk_chars: int = 2000) -> List[int]:
    """The token ids of ``texts`` joined by blank lines, without special tokens.

    Long documents are tokenized in pieces of about ``chunk_chars`` characters
    (cut at line ends), so no tokenizer warns about sequences longer than its maximum.
    """
    pieces: List[str] = []
    for text in texts:
        start = 0
        while start < len(text):
            end = min(len(text), start + chunk_chars)
            if end < len(text):
                cut = text.rfind("\n", start, end)
                end = cut + 1 if cut > start else end
            pieces.append(text[start:end])
            start = end
        pieces.append("\n\n")
    ids: List[int] = []
    step = 256
    # Pieces are tokenized without truncation and never fed to a model as they are:
    # lift the model's length limit meanwhile, so that no "longer than the maximum" warning is logged.
    limit = getattr(tokenizer, "model_max_length", None)
    try:
        if limit is not None:
            tokenizer.model_max_length = int(1e30)
        for i in range(0, len(pieces), step):
            batch = pieces[i : i + step]
            for row in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                ids.extend(row)
    finally:
        if limit is not None:
            tokenizer.model_max_length = limit
    return ids


def calibration_windows(
    token_ids: Sequence[int],
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    prefix: Sequence[int] = (),
    suffix: Sequence[int] = (),
) -> Tensor:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random positions: ``(n_samples, seq_len)``.

    Each window is ``prefix + token_ids[s : s + body] + suffix`` with
    ``body = seq_len − len(prefix) − len(suffix)``.

    Raises:
        UsageError: fewer tokens than one window needs, or bad sizes.
    """
    if int(n_samples) < 1:
        raise UsageError(f"n_samples must be >= 1, got {n_samples}")
    body = int(seq_len) - len(prefix) - len(suffix)
    if body < 1:
        raise UsageError(f"seq_len={seq_len} leaves no room for text after the {len(prefix) + len(suffix)} special tokens")
    if len(token_ids) < body:
        raise UsageError(
            f"the calibration text has {len(token_ids)} tokens, fewer than one window of seq_len={seq_len} needs; "
            "give more text or a smaller --seq-len"
        )
    tokens = torch.as_tensor(list(token_ids), dtype=torch.long)
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(token_ids) - body + 1, (int(n_samples),), generator=generator)
    windows = torch.stack([tokens[s : s + body] for s in starts.tolist()])
    parts = []
    if prefix:
        parts.append(torch.as_tensor(list(prefix), dtype=torch.long).expand(int(n_samples), -1))
    parts.append(windows)
    if suffix:
        parts.append(torch.as_tensor(list(suffix), dtype=torch.long).expand(int(n_samples), -1))
    return torch.cat(parts, dim=1).contiguous()


def load_calibration(
    source: str,
    tokenizer,
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    text_field: str = "text",
) -> CalibrationSet:
    """Read ``source``, tokenize it and draw ``n_samples`` seeded windows of ``seq_len`` tokens.

    The same source, tokenizer, sizes and seed always give the same windows.
    """
    texts = read_texts(source, text_field)
    generator = torch.Generator().manual_seed(int(seed) + 1)
    budget = max(_MIN_CHARS_TOKENIZED, max(1, int(n_samples)) * max(1, int(seq_len)) * _CHARS_PER_TOKEN_BUDGET)
    texts = _sample_documents(texts, budget, generator)
    prefix, suffix = special_token_frame(tokenizer)
    ids = tokenize_texts(tokenizer, texts)
    windows = calibration_windows(ids, n_samples, seq_len, seed, prefix, suffix)
    return CalibrationSet(windows, source=str(source), seed=int(seed), corpus_tokens=len(ids))
