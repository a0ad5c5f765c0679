"""Loading a Hugging Face model directory (offline) for pruning and evaluation.

The model class is the one the checkpoint names (``config.architectures[0]``,
e.g. ``Qwen3ForCausalLM`` or ``BertModel``), so the pruned checkpoint keeps its
head and loads back with the same class as well as with ``AutoModel``.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Tuple

import torch

from .errors import UsageError

__all__ = ["check_model_dir", "model_kind", "load_model", "load_tokenizer", "DTYPES"]

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("loading models needs transformers: pip install 's3sparse[llm]' (transformers, safetensors, tqdm)")
    return transformers


def check_model_dir(model_dir: str) -> None:
    """Raise :class:`UsageError` unless ``model_dir`` is a directory with a ``config.json``."""
    if not os.path.isdir(model_dir):
        raise UsageError(f"model directory {model_dir!r} does not exist")
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


def load_model(model_dir: str, dtype: str = "auto", kind: Optional[str] = None) -> Tuple[torch.nn.Module, str]:
    """``(model, kind)`` loaded from ``model_dir`` on the CPU, in eval mode.

    ``kind=None`` loads the checkpoint's own class; ``"causal-lm"`` / ``"encoder"``
    load ``AutoModelForCausalLM`` / ``AutoModel``.
    """
    transformers = _transformers()
    check_model_dir(model_dir)
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
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
    """The tokenizer saved in ``model_dir``."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise UsageError(f"model directory {model_dir!r} has no usable tokenizer ({type(exc).__name__}: {str(exc).splitlines()[0]})")
