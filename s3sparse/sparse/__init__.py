"""Running pruned weights: packed structured-sparse layers and compacted channels.

* :class:`PackedWeight` — a 2-D weight pruned to any S3 pattern with a fixed
  ``nnz`` per scope, stored as the kept blocks of every scope plus their
  in-scope indices (bit-packed), restored exactly by ``to_dense()``, saved and
  loaded (safetensors) without the spec objects.
* :class:`PackedLinear` — an ``nn.Module`` computing ``F.linear(x, W, b)`` from a
  PackedWeight through the custom op ``s3sparse::packed_linear``
  (``torch.compile``-able).
* :func:`compact` / :func:`compact_model` — whole-channel patterns turned into
  physically smaller dense layers (:mod:`.compact`); :class:`GatherLinear` for
  input columns whose producer cannot shrink.
* :func:`fuse_siblings` — sibling projections that read one input (q/k/v,
  gate/up) stacked into one layer each, dense or packed, in a loaded model
  (:mod:`.fuse`): fewer, larger weight reads a decode step.
* :mod:`.layer` — an ``nn.Linear`` or GPT-2 ``Conv1D`` seen as ``out × in``: the
  one adapter, which the model pipeline (:mod:`s3sparse.llm`) prunes through too.

The packed format is documented in ``docs/packed.md``, ``csrc/ops.cpp`` and
:mod:`s3sparse.reference`.
"""

from __future__ import annotations

from . import format
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
from .fuse import FuseReport, fuse_siblings
from .linear import PackedLinear
from .packed import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, PackedWeight

__all__ = [
    "PackedWeight",
    "PackedLinear",
    "format",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "METADATA_KEY",
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
    "fuse_siblings",
    "FuseReport",
]
