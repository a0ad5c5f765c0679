"""Sparse execution: whole-channel patterns compacted to smaller dense layers (:mod:`.compact`)."""

from __future__ import annotations

from .compact import (
    ACTIVATIONS,
    MLP_KINDS,
    SIDECAR_NAME,
    ChannelCompaction,
    CompactReport,
    GatherLinear,
    compact,
    compact_inputs,
    compact_model,
    load_compacted,
    save_compacted,
)

__all__ = [
    "compact",
    "compact_inputs",
    "compact_model",
    "GatherLinear",
    "ChannelCompaction",
    "CompactReport",
    "ACTIVATIONS",
    "MLP_KINDS",
    "SIDECAR_NAME",
    "save_compacted",
    "load_compacted",
]
