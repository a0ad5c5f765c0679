"""Prune whole Hugging Face models: calibration, block-by-block pipeline, CLI, safe save, evaluation.

``prune_model(model, calibration, pattern="2:4", method="sparsegpt")`` prunes
every linear layer of the model's transformer blocks in place and returns a
:class:`PruneReport`; ``load_calibration(source, tokenizer, n_samples, seq_len, seed)``
draws the calibration windows; the command line is ``s3sparse prune|eval|pack``; ``pack_model`` / ``load_packed``
run and reload a pruned model in packed form
(``python -m s3sparse``). Needs ``transformers`` only for loading, saving and
evaluating models (``pip install s3sparse[llm]``); the pipeline itself is plain torch.
"""

from __future__ import annotations

from ..patterns import PatternChoice, parse_pattern
from .blocks import find_blocks, linear_layers
from .calibration import CalibrationSet, calibration_windows, load_calibration, read_texts
from .errors import UsageError
from .method_registry import METHOD_NAMES, MethodChoice, parse_method
from .pack import PackReport, load_packed, pack_model
from .pipeline import prune_model
from .recipe import Recipe, Rule
from .report import BlockReport, LayerReport, PruneReport

__all__ = [
    "prune_model",
    "pack_model",
    "load_packed",
    "PackReport",
    "load_calibration",
    "read_texts",
    "calibration_windows",
    "CalibrationSet",
    "Recipe",
    "Rule",
    "PatternChoice",
    "parse_pattern",
    "MethodChoice",
    "parse_method",
    "METHOD_NAMES",
    "PruneReport",
    "LayerReport",
    "BlockReport",
    "find_blocks",
    "linear_layers",
    "UsageError",
]
