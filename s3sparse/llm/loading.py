"""Loading a Hugging Face model directory (offline) for pruning and evaluation.

The model class is the one the checkpoint names (``config.architectures[0]``,
e.g. ``Qwen3ForCausalLM`` or ``BertModel``), so the pruned checkpoint keeps its
head and loads back with the same class as well as with ``AutoModel``.

A packed directory (``s3sparse pack``'s output, which transformers refuses) is
recognised by its ``s3sparse-packed.json``: :func:`load_model` loads it with
:func:`s3sparse.llm.load_packed` where a packed model can be used (``packed=True``:
evaluation), and :func:`check_model_dir` refuses it everywhere else (pruning,
packing) with a :class:`~s3sparse.llm.errors.DirectoryError` naming ``load_packed``.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch

from .errors import DirectoryError, UsageError

__all__ = ["check_model_dir", "model_kind", "load_model", "load_tokenizer", "DTYPES"]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("loading models needs transformers: pip install 's3sparse[llm]' (transformers, safetensors, tqdm)")
    return transformers


def check_model_dir(model_dir: str, packed: bool = False) -> None:
    """Raise :class:`UsageError` unless ``model_dir`` is a directory with a ``config.json``; a packed
    directory (``s3sparse pack``'s output) only with ``packed=True``."""
    from .pack import MANIFEST_NAME, is_packed_dir

    if not os.path.isdir(model_dir):
        raise UsageError(f"model directory {model_dir!r} does not exist")
    if is_packed_dir(model_dir):
        if packed:
            return
        raise DirectoryError(
            f"model directory {model_dir!r} is a packed model (it holds {MANIFEST_NAME}), which cannot be pruned or "
            f"packed again: give the model it was pruned / packed from, and load this one with "
            f"s3sparse.llm.load_packed({model_dir!r}) or evaluate it with `s3sparse eval`"
        )
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"model directory {model_dir!r} has no config.json (not a Hugging Face model directory)")


def model_kind(config: Any) -> str:
    """``"causal-lm"`` for decoder language models, ``"encoder"`` for the rest (BERT-like)."""
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
        return "causal-lm"
    if architectures:
        return "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    encoders = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "albert", "deberta", "deberta-v2", "mpnet"}
    model_type = getattr(config, "model_type", "")
    return "causal-lm" if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in encoders else "encoder"


def load_model(
    model_dir: str, dtype: str = "auto", kind: Optional[str] = None, packed: bool = False
) -> Tuple[torch.nn.Module, str]:
    """``(model, kind)`` loaded from ``model_dir`` on the CPU, in eval mode.

    ``kind=None`` loads the checkpoint's own class; ``"causal-lm"`` / ``"encoder"``
    load ``AutoModelForCausalLM`` / ``AutoModel``. With ``packed=True`` a packed
    directory is loaded by :func:`s3sparse.llm.load_packed` (its own class and
    kind; ``dtype`` must be ``auto`` or the dtype it was packed in); without, it
    is refused (:func:`check_model_dir`).
    """
    transformers = _transformers()
    check_model_dir(model_dir, packed=packed)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    from .pack import is_packed_dir, load_packed, read_manifest

    if is_packed_dir(model_dir):
        manifest = read_manifest(model_dir)
        if dtype not in ("auto", manifest.get("dtype")):
            raise UsageError(f"--dtype {dtype}: the packed model {model_dir!r} runs in the dtype it was packed in "
                             f"({manifest.get('dtype')}); pass --dtype auto, or pack it again with --dtype {dtype}")
        return load_packed(model_dir), manifest.get("model_kind", "encoder")
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    detected = model_kind(config)
    if kind is None:
        architectures = getattr(config, "architectures", None) or []
        cls = getattr(transformers, architectures[0], None) if architectures else None
        if cls is None:
            cls = transformers.AutoModelForCausalLM if detected == "causal-lm" else transformers.AutoModel
    else:
        cls = transformers.AutoModelForCausalLM if kind == "causal-lm" else transformers.AutoModel
    model = cls.from_pretrained(model_dir, dtype=DTYPES[dtype], local_files_only=True)
    model.eval()
    return model, detected if kind is None else kind


def load_tokenizer(model_dir: str):
    """The tokenizer saved in ``model_dir`` (a Hugging Face or a packed model directory)."""
    transformers = _transformers()
    from .pack import _manifest_config, is_packed_dir, read_manifest

    # A packed directory's config.json is a guard transformers refuses: give AutoTokenizer the model's config.
    kwargs = {"config": _manifest_config(model_dir, read_manifest(model_dir))} if is_packed_dir(model_dir) else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model directory {model_dir!r} has no usable tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0]})")
